"""Batched translation with the adapter on, off or scaled; sacreBLEU and chrF.

sacrebleu is used directly: ``evaluate.load`` fetches metric scripts from the
hub, which is not reachable offline.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter

import numpy as np
import sacrebleu
import tensorflow as tf

from lora_demo.data import PROMPT, TOKENIZER_LOCK, decode
from lora_demo.core.inject import generation, lora_layers, set_scale
from lora_demo.core.models import is_gpu
from lora_demo.core.state import state_of

log = logging.getLogger(__name__)

# Generation is traced once per padded shape into one TensorFlow graph (greedy loop included): eager
# TF generate runs a Python loop per token, which is far slower on a CPU. On a CPU the graph runs on
# oneDNN's kernels; XLA, which Hugging Face recommends for TF generate, compiled each shape twice as
# long and decoded about 15% slower on this project's CPU, with the same tokens (BENCHMARKS.md). On
# a GPU XLA is used. Shapes are bucketed so a handful of traces serve every request.
BATCH_BUCKETS = (1, 4, 16)
LENGTH_BUCKETS = (32, 64, 128, 256)
MAX_SOURCE_TOKENS = LENGTH_BUCKETS[-1]
_compile_lock = threading.Lock()


def _bucket(n: int, buckets) -> int:
    return next((b for b in buckets if n <= b), buckets[-1])


def _compiled_generate(model, batch: int, length: int, max_new_tokens: int):
    """The compiled generate function for this model's current adapter layout, kernel slots and shape."""
    from lora_demo.core.rowsplit import variant

    key = (generation(model), batch, length, max_new_tokens, variant(model))
    with _compile_lock:
        cache = state_of(model).generate
        for stale in [k for k in cache if k[0] != key[0]]:  # traced against layers that are gone
            del cache[stale]
        if key not in cache:
            cache[key] = tf.function(
                lambda ids, mask: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                                 do_sample=False, num_beams=1),
                jit_compile=is_gpu(), autograph=False)
        return cache[key]


def encode_chunk(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, mask, real rows) padded to a bucketed shape: the input of one compiled generate call."""
    with TOKENIZER_LOCK:
        enc = tokenizer(texts, truncation=True, max_length=MAX_SOURCE_TOKENS)["input_ids"]
    n, length = len(enc), _bucket(max(map(len, enc)), LENGTH_BUCKETS)
    batch = _bucket(n, BATCH_BUCKETS)
    ids = np.full((batch, length), tokenizer.pad_token_id, np.int32)
    for i, row in enumerate(enc + [enc[-1]] * (batch - n)):  # filler rows repeat the last sentence
        ids[i, : len(row)] = row
    return ids, (ids != tokenizer.pad_token_id).astype(np.int32), n


def generate_ids(model, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, compiled: bool = True):
    """Greedy generation on encoded input (no tokenizer: safe beside another thread's tokenising)."""
    if compiled:
        try:
            batch, length = ids.shape
            return _compiled_generate(model, batch, length, max_new_tokens)(tf.constant(ids), tf.constant(mask))
        except Exception as exc:  # e.g. a GPU backend without XLA: still translate, just slower
            log.warning("compiled generation failed (%s); using eager generation", exc)
    return model.generate(input_ids=tf.constant(ids), attention_mask=tf.constant(mask),
                          max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)


def _generate_chunk(model, tokenizer, texts: list[str], max_new_tokens: int, compiled: bool) -> list[str]:
    ids, mask, n = encode_chunk(tokenizer, texts)
    gen = generate_ids(model, ids, mask, max_new_tokens, compiled)
    return decode(tokenizer, gen, n)


def translate(model, tokenizer, sentences: list[str], max_new_tokens: int = 64, batch_size: int = 16,
              compiled: bool = True) -> list[str]:
    """English sentences -> German, greedy. Empty input gives an empty list.

    The output does not depend on how sentences are grouped: padding is masked and
    greedy decoding is per row.
    """
    out: list[str] = []
    step = min(batch_size, BATCH_BUCKETS[-1])
    for i in range(0, len(sentences), step):
        out += _generate_chunk(model, tokenizer, [PROMPT + s for s in sentences[i:i + step]], max_new_tokens,
                               compiled)
    return out


def translate_split(model, tokenizer, sentences: list[str], max_new_tokens: int = 64,
                    compiled: bool = True, copies: int = 2) -> tuple[list[str], ...]:
    """The German of each sentence under each of ``copies`` sets of kernels, from one greedy decode per
    chunk of up to 16: the chunk ``copies`` times over, copy 0 on W and copy g on slot g - 1 of a model
    whose layers carry kernel slots (core.rowsplit). Each row is decoded as it would be alone, so this
    equals one decode per set of kernels. Returns one list per copy."""
    from lora_demo.core.rowsplit import NO_ROW, split_of

    split = split_of(model)
    columns: list[list[str]] = [[] for _ in range(copies)]
    split.slots = copies - 1
    try:
        for i in range(0, len(sentences), BATCH_BUCKETS[-1]):
            ids, mask, n = encode_chunk(tokenizer, [PROMPT + s for s in sentences[i:i + BATCH_BUCKETS[-1]]])
            rows = ids.shape[0]
            split.row.assign(rows)
            gen = generate_ids(model, np.concatenate([ids] * copies), np.concatenate([mask] * copies),
                               max_new_tokens, compiled)
            texts = decode(tokenizer, gen)
            for g, column in enumerate(columns):
                column += texts[g * rows:g * rows + n]
    finally:
        split.row.assign(NO_ROW)
        split.slots = 0
    return tuple(columns)


def translate_both(model, tokenizer, sentences: list[str], scale: float = 1.0, **kw) -> tuple[list[str], list[str]]:
    """(base, LoRA) translations. Base is the adapter at scale 0, which is the base model exactly."""
    if not lora_layers(model):
        base = translate(model, tokenizer, sentences, **kw)
        return base, list(base)
    try:
        set_scale(model, 0.0)
        base = translate(model, tokenizer, sentences, **kw)
        set_scale(model, scale)
        lora = translate(model, tokenizer, sentences, **kw)
    finally:
        set_scale(model, 1.0)
    return base, lora


def scores(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus sacreBLEU and chrF with their signatures (default 13a tokenisation)."""
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature()), "n": len(hypotheses)}


# Resampled test sets in the paired bootstrap, and its seed (a fixed seed: the same outputs give the same verdict).
BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED = 1000, 12345


def _draws(n: int, samples: int, seed: int) -> np.ndarray:
    """The bootstrap's resampled slices: ``samples`` rows of ``n`` indices drawn with replacement, seeded."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def _interval(diffs: np.ndarray) -> dict:
    """The 2.5th-97.5th percentile interval of resampled changes, and ``real``: it leaves out 0."""
    low, high = (float(x) for x in np.percentile(diffs, [2.5, 97.5]))
    return {"low": low, "high": high, "real": bool(low > 0 or high < 0)}


def paired_change(base: list[str], lora: list[str], references: list[str],
                  samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """Is the LoRA model's BLEU/chrF change on this slice more than the luck of which sentences it holds?

    A paired bootstrap (Koehn 2004): ``samples`` times, draw as many sentences as the slice holds, with
    replacement, the same draw for both systems, and score both on it. For each metric: the change on the
    whole slice, the 2.5th and 97.5th percentiles of the resampled changes (``low``, ``high``), the share
    of draws on which LoRA scored higher (``better``), and ``real``: the interval leaves out 0. Corpus
    scores come from the summed sentence statistics of sacreBLEU's metrics, as its own paired test does.
    """
    if not (len(base) == len(lora) == len(references)) or not references:
        raise ValueError("paired_change needs one base and one LoRA output per reference, and at least one")
    draws = _draws(len(references), samples, seed)
    out: dict = {"samples": samples, "sentences": len(references)}
    for name, metric in (("bleu", sacrebleu.metrics.BLEU()), ("chrf", sacrebleu.metrics.CHRF())):
        stats = [np.asarray(metric._extract_corpus_statistics(h, [references]), np.float64) for h in (base, lora)]
        whole = [metric._compute_score_from_stats(list(s.sum(0))).score for s in stats]
        diffs = np.array([metric._compute_score_from_stats(list(stats[1][d].sum(0))).score
                          - metric._compute_score_from_stats(list(stats[0][d].sum(0))).score for d in draws])
        out[name] = {"change": float(whole[1] - whole[0]), **_interval(diffs),   # (numpy scalars: plain floats)
                     "better": float((diffs > 0).mean())}
    return out


def paired_share_change(base_right, lora_right, targets, samples: int = BOOTSTRAP_SAMPLES,
                        seed: int = BOOTSTRAP_SEED) -> dict:
    """Is the change in the share of target tokens a model ranks first (steps.first_choice) more than the
    luck of which sentences were measured? The same paired bootstrap as paired_change, over sentences
    (the tokens of one sentence are not independent draws): the shares of base and LoRA on the whole
    slice, the change, its 2.5th-97.5th percentile interval over ``samples`` resamplings and ``real``
    (the interval leaves out 0). Shares are fractions of 1."""
    if not (len(base_right) == len(lora_right) == len(targets)) or sum(targets) <= 0:
        raise ValueError("paired_share_change needs base and LoRA counts for every sentence, and some targets")
    right = np.asarray([base_right, lora_right], np.float64)
    n = np.asarray(targets, np.float64)
    draws = _draws(len(n), samples, seed)
    diffs = (right[1][draws].sum(1) - right[0][draws].sum(1)) / np.maximum(n[draws].sum(1), 1.0)
    base, lora = (float(r.sum() / n.sum()) for r in right)
    return {"samples": samples, "sentences": len(n), "tokens": int(n.sum()), "base": base, "lora": lora,
            "change": lora - base, **_interval(diffs)}


# Words and punctuation marks, as word_shift counts them ("dass", ",", "2016").
WORD = re.compile(r"\w+|[^\w\s]")


def word_shift(base: list[str], lora: list[str], references: list[str], top: int = 5) -> list[dict]:
    """The words and punctuation marks whose count over the slice's German changed most, base to LoRA, with
    the references' count beside: what the adapter changed in its German, made countable. Case counts
    ("Die" is not "die"). Sorted by the size of the change, then by the word; at most ``top``. Each item:
    ``word`` and its counts in the ``base``, ``lora`` and ``reference`` German."""
    base_n, lora_n, ref_n = (Counter(w for text in texts for w in WORD.findall(text))
                             for texts in (base, lora, references))
    moved = sorted((w for w in base_n.keys() | lora_n.keys() if lora_n[w] != base_n[w]),
                   key=lambda w: (-abs(lora_n[w] - base_n[w]), w))[:top]
    return [{"word": w, "base": base_n[w], "lora": lora_n[w], "reference": ref_n[w]} for w in moved]


def sentence_chrf(hypothesis: str, reference: str) -> float:
    return sacrebleu.metrics.CHRF().sentence_score(hypothesis, [reference]).score


def repetition_loop(text: str) -> str:
    """The repeated piece if ``text`` fell into a greedy repetition loop, else "": the same word three times
    in a row, a word pair with a word of five letters or more three times anywhere ("und die" three times is
    ordinary German, "am Donnerstag" is not), or a character five times in a row ("dassssss")."""
    words = [w.strip(".,;:!?\"'„“()").lower() for w in text.split()]
    words = [w for w in words if w]
    for i in range(len(words) - 2):
        if words[i] == words[i + 1] == words[i + 2]:
            return words[i]
    for pair, times in Counter(zip(words, words[1:])).items():
        if times >= 3 and max(map(len, pair)) >= 5:
            return " ".join(pair)
    run = re.search(r"(\w)\1{4,}", text)
    return run.group(0) if run else ""


def word_diff(base: str, lora: str) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
    """Words of each output, each flagged True where it is not shared with the other (difflib alignment)."""
    import difflib

    a, b = base.split(), lora.split()
    a_flags, b_flags = [True] * len(a), [True] * len(b)
    for block in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            a_flags[block.a + k] = b_flags[block.b + k] = False
    return list(zip(a, a_flags)), list(zip(b, b_flags))
