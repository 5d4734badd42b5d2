"""Translation with the adapter on, off and scaled; metrics from sacrebleu directly."""

import numpy as np
import pytest

from lora_demo import data
from lora_demo.core.config import LoraConfig
from lora_demo.analysis.evaluate import (paired_change, paired_share_change, repetition_loop, scores, sentence_chrf,
                                         translate, translate_both, word_shift)
from lora_demo.lab.execute import quality_of, translations
from lora_demo.core.inject import apply_lora, lora_layers, remove_lora

SENTENCES = ["The session is resumed.", "I would like to thank the Commissioner.", "Obama receives Netanyahu."]


@pytest.fixture
def tiny(bundled_tiny):
    yield bundled_tiny
    remove_lora(bundled_tiny.model)


def _perturb(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model):
        layer.lora_B.assign(rng.normal(0, 0.5, layer.lora_B.shape).astype(np.float32))


def test_base_output_is_german_looking_and_batched_like_single(tiny):
    out = translate(tiny.model, tiny.tokenizer, SENTENCES, batch_size=2)
    assert len(out) == 3 and all(isinstance(s, str) and s for s in out)
    single = [translate(tiny.model, tiny.tokenizer, [s])[0] for s in SENTENCES]
    assert out == single


def test_scale_zero_reproduces_the_base_exactly(tiny):
    base_alone = translate(tiny.model, tiny.tokenizer, SENTENCES)
    apply_lora(tiny.model, LoraConfig(rank=4, targets=("q", "k", "v", "o")))
    _perturb(tiny.model)
    base, lora = translate_both(tiny.model, tiny.tokenizer, SENTENCES, scale=1.0)
    assert base == base_alone
    assert lora != base  # a large random B must change something
    base0, lora0 = translate_both(tiny.model, tiny.tokenizer, SENTENCES, scale=0.0)
    assert lora0 == base_alone
    assert all(float(layer.scale.numpy()) == 1.0 for layer in lora_layers(tiny.model))  # restored


def test_scores_have_signatures_and_known_values():
    s = scores(["Das ist ein Test ."], ["Das ist ein Test ."])
    assert s["bleu"] == pytest.approx(100.0) and s["chrf"] == pytest.approx(100.0)
    assert "tok:13a" in s["bleu_signature"] and "nc:6" in s["chrf_signature"]
    assert scores(["völlig anders"], ["Das ist ein Test ."])["bleu"] < 5
    assert sentence_chrf("Hallo Welt", "Hallo Welt") == pytest.approx(100.0)


def test_scoring_the_fixed_test_slice(tiny):
    pairs = data.load_pairs("test", 4, source="bundled")
    hyps = translate(tiny.model, tiny.tokenizer, [p.en for p in pairs.items], max_new_tokens=128)
    assert translations(tiny.model, tiny.tokenizer, pairs) == hyps
    res = quality_of(hyps, pairs)
    assert res == {**scores(hyps, [p.de for p in pairs.items]), "loops": sum(bool(repetition_loop(h)) for h in hyps)}
    assert res["n"] == 4 and 0 <= res["chrf"] <= 100


def _slice(n: int = 60):
    """n real newstest2016 pairs, and two kinds of output: the reference itself, and the reference with
    its first word dropped."""
    pairs = data.load_pairs("test", n, source="bundled").items
    refs = [p.de for p in pairs]
    return refs, [" ".join(r.split()[1:]) for r in refs]


def test_the_paired_bootstrap_calls_a_change_on_every_sentence_real_and_one_sentence_luck():
    refs, cut = _slice()
    c = paired_change(cut, refs, refs)
    for key in ("bleu", "chrf"):
        assert c[key]["change"] == pytest.approx(scores(refs, refs)[key] - scores(cut, refs)[key])
        assert c[key]["real"] and c[key]["low"] > 0 and c[key]["better"] == 1.0
    worse = paired_change(refs, cut, refs)["chrf"]            # the other way round: a real fall
    assert worse["real"] and worse["high"] < 0 and worse["better"] == 0.0
    one = paired_change(refs, [cut[0]] + refs[1:], refs)["chrf"]   # one sentence of 60 differs
    assert one["change"] < 0 and not one["real"] and one["low"] < 0 <= one["high"]
    same = paired_change(cut, cut, refs)["bleu"]
    assert same == {"change": 0.0, "low": 0.0, "high": 0.0, "better": 0.0, "real": False}
    assert paired_change(cut, refs, refs) == c                # a fixed seed: the same verdict every time
    assert all(type(c[k][f]) is float for k in ("bleu", "chrf") for f in ("change", "low", "high", "better"))


def test_the_paired_bootstrap_refuses_unpaired_outputs():
    refs, cut = _slice(4)
    with pytest.raises(ValueError, match="one base and one LoRA output per reference"):
        paired_change(cut, refs[:3], refs)
    with pytest.raises(ValueError):
        paired_change([], [], [])


def test_the_first_choice_bootstrap_resamples_sentences_and_calls_one_sentence_luck():
    """paired_share_change on counts per sentence: one more token right in every one of 64 sentences is a
    real rise (and the reverse a real fall); one sentence of 64 with 3 more right is within the noise;
    the same counts give exactly zero; the shares are the counts over the tokens, as plain floats."""
    targets = [20 + i % 17 for i in range(64)]
    base = [t // 3 + i % 5 for i, t in enumerate(targets)]
    up = paired_share_change(base, [b + 1 for b in base], targets)
    assert up["change"] == pytest.approx(64 / sum(targets)) and up["real"] and up["low"] > 0
    assert up["base"] == pytest.approx(sum(base) / sum(targets)) and up["tokens"] == sum(targets)
    down = paired_share_change([b + 1 for b in base], base, targets)
    assert down["real"] and down["high"] < 0
    one = paired_share_change(base, [base[0] + 3] + base[1:], targets)
    assert one["change"] > 0 and not one["real"] and one["low"] == 0.0
    same = paired_share_change(base, base, targets)
    assert (same["change"], same["low"], same["high"], same["real"]) == (0.0, 0.0, 0.0, False)
    assert paired_share_change(base, [b + 1 for b in base], targets) == up
    assert all(type(up[k]) is float for k in ("base", "lora", "change", "low", "high"))
    with pytest.raises(ValueError, match="counts for every sentence"):
        paired_share_change(base, base[:-1], targets)


def test_word_shift_counts_the_words_and_marks_whose_count_changed_most():
    """Counts over the whole slice, case kept, punctuation counted as words; unchanged words are left
    out; ties are ordered by the word; the references' count stands beside each."""
    base = ["Er sagte, daß es regnet.", "Die Stadt, die Stadt, die Stadt"]
    lora = ["Er sagte, dass es regnet.", "Die Stadt, die Stadt, die Stadt, ,"]
    refs = ["Er sagte, dass es regnen wird.", "Die Stadt hat drei Brücken."]
    assert word_shift(base, lora, refs) == [
        {"word": ",", "base": 3, "lora": 5, "reference": 1},
        {"word": "dass", "base": 0, "lora": 1, "reference": 1},
        {"word": "daß", "base": 1, "lora": 0, "reference": 0}]
    assert word_shift(base, lora, refs, top=1) == word_shift(base, lora, refs)[:1]
    assert word_shift(base, base, refs) == []


@pytest.mark.parametrize("text, piece", [
    ("Milik sagte am Donnerstag, am Donnerstag, der am Donnerstag zu einer Pressekonferenz sagte.", "am donnerstag"),
    ("Die zwei Männer, die zwei Männer, die zwei Männer", "zwei männer"),
    ("Es ist sehr sehr sehr gut.", "sehr"),
    ("dassssss", "ssssss"),
    ("Es gibt nicht viel zu tun.", ""),
    # short words paired three times ("und die") are German, not a loop
    ("Die Katze und die Hunde und die Kinder spielen, und die Leute sehen zu, wie die Sonne scheint.", ""),
    ("", ""),
])
def test_a_greedy_repetition_loop_is_found_and_ordinary_german_is_not(text, piece):
    assert repetition_loop(text) == piece
