"""Build the bundled offline models reproducibly: ``assets/tiny`` and ``assets/micro``.

    python scripts/build_tiny.py                 # tiny: the app's offline translator (about 100 minutes on 2 cores)
    python scripts/build_tiny.py --size micro    # micro: the test suite's small model (minutes)

Both are small T5s with FLAN-T5's layout (gated-GELU FFN, untied lm_head), pre-trained from random
weights, all of them, on English->German with the ``translate English to German:`` prompt.

tiny: a small base that really translates, and has a lesson left to learn: captions (WMT16 multimodal task 1).
  * It learns English -> German from Europarl rows 0-19,499 of the bundled WMT16 train split (twice per epoch:
    long parliament sentences are the harder task) and the news of newstest2011-2013; and German -> English
    from all 29,000 Multi30k train captions. So it knows German, and the caption words, but has never
    translated a caption into German: that is LoRA's default lesson (Multi30k train). The share was chosen
    by measurement (docs/data-and-models.md): with 1,000 or 2,000 English -> German captions in the base,
    the better base leaves a minute of LoRA a held-out caption loss fall under 10% and a chrF rise under 5.
  * Europarl rows 19,500-19,999 are held out and scored, and so are Multi30k test_2016_flickr and newstest2016.
  * Its vocabulary (SentencePiece unigram) is trained on every text the app uses: all of Multi30k train, and
    the news that LoRA's news lesson trains on (newstest2008-2010), so no word LoRA meets is made of untrained
    pieces.
  * Updates are RMS-scaled (Adafactor, ``relative_step=False``): T5's embeddings start at N(0, 1) with
    no sqrt(d) scaling and its attention has no 1/sqrt(d_kv), and plain Adam underfits this model
    (the earlier Adam build reached a training loss of 4.2 and BLEU 1). Linear warm-up, cosine decay.
  * Trained under Keras' mixed_bfloat16 policy where the CPU has fast bf16 (float32 weights, bf16
    matmuls; 0.49 s per 2,048-token step against 0.74 s in float32 on the AVX512-BF16 EPYC).
  * Pairs longer than 64 tokens on either side are left out; batches come from length buckets with
    a token budget, so short captions do not pay for padding. Built and saved in float32.
micro: the 2.5M-parameter model the tests train (fast steps); trained on all 20,000 Europarl pairs
  with Adam. It is not a translator.

Everything is seeded and TF op determinism is on, so a rebuild gives the same weights on the same
software and CPU. ``build_info.json`` records the recipe, the data, the learning curve, the cost and
the scores.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lora_demo  # noqa: E402,F401  (pins Keras before TensorFlow loads)
import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import tensorflow as tf  # noqa: E402
from transformers import T5Config, T5TokenizerFast, TFT5ForConditionalGeneration  # noqa: E402

from lora_demo import data  # noqa: E402
from lora_demo.core import models
from lora_demo.analysis.evaluate import scores, translate  # noqa: E402

LAYOUT = dict(
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    model_type="t5",
)


@dataclass(frozen=True)
class Recipe:
    config: dict
    steps: int
    batch_size: int           # rows per batch; with token_budget, rows = token_budget // bucket length
    lr: float
    warmup: int               # linear warm-up steps, then cosine decay to 5% of lr
    label_smoothing: float
    dropout: float            # during pre-training only; the shipped config has 0
    buckets: tuple            # padded lengths; () = every batch padded to 64 + 64, long pairs truncated
    train_rows: tuple         # Europarl rows the base trains on
    heldout_rows: tuple       # Europarl rows held out for the in-domain score
    precision: str            # "fp32", or "mixed": Keras' mixed_bfloat16 where the CPU has fast bf16
                              # (float32 weights, bf16 matmuls), else fp32. Weights are float32 either way.
    optimizer: str = "adam"   # "adam", or "adafactor": updates scaled by each weight's RMS
    corpora: tuple = ("europarl",)          # what the base trains on ("multi30k", "europarl", "news_base")
    repeats: tuple = ()       # (corpus, times) pairs: corpora seen more than once per epoch
    vocab_corpora: tuple = ("europarl",)    # what its vocabulary is trained on (+ "news")
    token_budget: int = 0     # source tokens per batch (0: batch_size rows whatever the length)
    eval_every: int = 4000    # learning-curve points: BLEU/chrF on 100 held-out pairs of each corpus
    captions: tuple = (0, 29000)        # Multi30k train rows the base reads English -> German ("multi30k")
    captions_de_en: tuple = (0, 0)      # Multi30k train rows it reads German -> English ("multi30k_de_en")


SIZES = {
    "tiny": Recipe(
        config=dict(vocab_size=8000, d_model=256, d_kv=64, num_heads=4, d_ff=768, num_layers=3,
                    num_decoder_layers=3),
        steps=8400, batch_size=64, lr=1e-2, warmup=400, label_smoothing=0.1, dropout=0.1,
        buckets=(16, 24, 32, 48, 64), train_rows=(0, 19500), heldout_rows=(19500, 20000), precision="mixed",
        optimizer="adafactor", corpora=("europarl", "news_base", "multi30k", "multi30k_de_en"),
        repeats=(("europarl", 2),), vocab_corpora=("multi30k_all", "europarl", "news_base", "news"), token_budget=2048,
        eval_every=2100, captions=(0, data.CAPTIONS_BASE_ROWS), captions_de_en=(0, data.MULTI30K_TRAIN_ROWS)),
    "micro": Recipe(
        config=dict(vocab_size=4000, d_model=128, d_kv=32, num_heads=4, d_ff=384, num_layers=3,
                    num_decoder_layers=3),
        steps=2500, batch_size=32, lr=3e-3, warmup=0, label_smoothing=0.0, dropout=0.0,
        buckets=(), train_rows=(0, 20000), heldout_rows=(20000, 20000), precision="fp32", captions=(0, 0)),
}
EXAMPLES = ("A man is riding a bicycle down the street.", "Two children are playing in the park.",
            "The weather is nice today.", "The committee will meet again next week.",
            "I would like to thank the Commissioner.", "The government has raised taxes on petrol.")
MAX_LEN = 64


def corpus_pairs(recipe: Recipe) -> dict:
    """Every text the build reads, by name: the base's training pairs, its held-out pairs and the
    news LoRA trains on (for the vocabulary only)."""
    europarl = data.load_pairs("train", source="bundled").items
    captions = list(data.multi30k_pairs("train").items)
    return {
        "europarl": list(europarl[slice(*recipe.train_rows)]),
        "europarl_heldout": list(europarl[slice(*recipe.heldout_rows)]),
        "multi30k": captions[slice(*recipe.captions)],
        "multi30k_de_en": list(data.reversed_pairs(data.Pairs(tuple(captions[slice(*recipe.captions_de_en)]),
                                                              "bundled", "multi30k train")).items),
        "multi30k_all": captions,
        "multi30k_validation": list(data.multi30k_pairs("validation").items),
        "multi30k_test": list(data.multi30k_pairs("test_2016_flickr").items),
        "news_base": list(data.news_pairs(data.NEWS_BASE_SETS).items),
        "news": list(data.training_pairs("news", data.NEWS_TRAIN_PAIRS).items),
    }


def train_vocab(pairs, out_dir: Path, vocab_size: int) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(t for p in pairs for t in (data.PROMPT + p.en, p.de)), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(out_dir / "spiece"), vocab_size=vocab_size,
            model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            num_threads=1, shuffle_input_sentence=False, minloglevel=2,
        )
    return out_dir / "spiece.model"


def bucketed_batches(tokenizer, pairs, recipe: Recipe, seed: int):
    """Endless seeded batches. Each pair goes to the smallest bucket that holds both sides; an epoch
    shuffles each bucket, cuts it into batches and shuffles the batches. Returns (stream, kept, dropped)."""
    src = tokenizer([p.source for p in pairs])["input_ids"]
    tgt = tokenizer([p.de for p in pairs])["input_ids"]
    groups: dict[int, list[int]] = {b: [] for b in recipe.buckets}
    for i, (s, t) in enumerate(zip(src, tgt)):
        fit = next((b for b in recipe.buckets if len(s) <= b and len(t) <= b), None)
        if fit is not None:
            groups[fit].append(i)
    arrays = {}
    for b, idx in groups.items():
        ids = np.zeros((len(idx), b), np.int32)
        labels = np.full((len(idx), b), -100, np.int32)
        for row, i in enumerate(idx):
            ids[row, : len(src[i])] = src[i]
            labels[row, : len(tgt[i])] = tgt[i]
        arrays[b] = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int32), "labels": labels}
    kept = sum(map(len, groups.values()))
    rows = {b: (recipe.token_budget // b if recipe.token_budget else recipe.batch_size) for b in arrays}

    def stream():
        rng = np.random.default_rng(seed)
        while True:
            plan = []
            for b, arr in arrays.items():
                order = rng.permutation(len(arr["labels"]))
                plan += [(b, order[s : s + rows[b]]) for s in range(0, len(order) - rows[b] + 1, rows[b])]
            for k in rng.permutation(len(plan)):
                b, idx = plan[k]
                yield {name: v[idx] for name, v in arrays[b].items()}

    return stream(), kept, len(pairs) - kept


def make_optimizer(recipe: Recipe, schedule):
    if recipe.optimizer == "adafactor":
        # Keras' Adafactor multiplies the step by max(epsilon_2, RMS(weight)): the RMS scaling that
        # lets T5 train from random weights. relative_step=False keeps our schedule as given.
        return tf.keras.optimizers.Adafactor(schedule, relative_step=False)
    return tf.keras.optimizers.Adam(schedule)


def heldout_loss(model, tokenizer, pairs, batch_size: int = 64) -> float:
    """Mean next-token loss (teacher-forced, no label smoothing) over every target token of ``pairs``."""
    total, tokens = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        enc = data.encode(tokenizer, pairs[start:start + batch_size], MAX_LEN, MAX_LEN)
        logits = tf.cast(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                               labels=enc["labels"], training=False).logits, tf.float32)
        mask = enc["labels"] != -100
        nll = tf.keras.losses.sparse_categorical_crossentropy(np.maximum(enc["labels"], 0), logits, from_logits=True)
        total += float(tf.reduce_sum(nll * mask)); tokens += int(mask.sum())
    return total / tokens


def curve_point(model, tokenizer, heldout: dict, n: int = 100) -> dict:
    """BLEU/chrF (greedy) on the first ``n`` pairs of each held-out set, and the held-out caption
    loss: one learning-curve point."""
    point = {}
    for name, pairs in heldout.items():
        if name.endswith("_loss"):
            point[name] = round(heldout_loss(model, tokenizer, pairs), 4)
        elif pairs:
            s = scores(translate(model, tokenizer, [p.en for p in pairs[:n]], max_new_tokens=MAX_LEN),
                       [p.de for p in pairs[:n]])
            point[name] = {"bleu": round(s["bleu"], 2), "chrf": round(s["chrf"], 2)}
    return point


def pretrain(model, tokenizer, pairs, recipe: Recipe, seed: int, heldout: dict, log_every: int = 250,
             checkpoints: Path | None = None) -> dict:
    if recipe.buckets:
        stream, kept, dropped = bucketed_batches(tokenizer, pairs, recipe, seed)
    else:
        stream = data.batches(data.encode(tokenizer, pairs, MAX_LEN, MAX_LEN), recipe.batch_size, seed)
        kept, dropped = len(pairs), 0
    cosine = tf.keras.optimizers.schedules.CosineDecay(recipe.lr, recipe.steps - recipe.warmup, alpha=0.05)
    if recipe.warmup:
        class Schedule(tf.keras.optimizers.schedules.LearningRateSchedule):
            def __call__(self, step):
                step = tf.cast(step, tf.float32)
                return tf.where(step < recipe.warmup, recipe.lr * (step + 1) / recipe.warmup,
                                cosine(step - recipe.warmup))
        schedule = Schedule()
    else:
        schedule = cosine
    opt = make_optimizer(recipe, schedule)
    eps = recipe.label_smoothing

    @tf.function(autograph=False)
    def step(batch):
        with tf.GradientTape() as tape:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], training=True)
            mask = tf.cast(batch["labels"] != -100, tf.float32)
            logits = tf.cast(out.logits, tf.float32)
            nll = tf.keras.losses.sparse_categorical_crossentropy(tf.maximum(batch["labels"], 0), logits,
                                                                  from_logits=True)
            per_token = (1 - eps) * nll - eps * tf.reduce_mean(tf.nn.log_softmax(logits), -1) if eps else nll
            loss = tf.reduce_sum(per_token * mask) / tf.reduce_sum(mask)
        grads = tape.gradient(loss, model.trainable_variables)
        grads, _ = tf.clip_by_global_norm(grads, 1.0)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return tf.reduce_sum(nll * mask) / tf.reduce_sum(mask)

    losses, curve, t0 = [], [], time.time()
    for i in range(recipe.steps):
        losses.append(float(step(next(stream))))
        point_due = i and (i % recipe.eval_every == 0 or i == recipe.steps - 1)
        if i % log_every == 0 or point_due:
            line = f"step {i:5d}  loss {np.mean(losses[-log_every:]):.3f}  {time.time() - t0:.0f}s"
            if point_due:
                point = {"step": i, "loss": round(float(np.mean(losses[-log_every:])), 4),
                         "seconds": round(time.time() - t0, 1), **curve_point(model, tokenizer, heldout)}
                curve.append(point)
                if checkpoints is not None:   # for probing LoRA on the base as it was at this point
                    model.save_pretrained(checkpoints / f"step_{i}")
                    tokenizer.save_pretrained(checkpoints / f"step_{i}")
                line += "  " + "  ".join(f"{k} BLEU {v['bleu']:.1f} chrF {v['chrf']:.1f}"
                                         for k, v in point.items() if isinstance(v, dict))
                line += "".join(f"  {k} {v:.3f}" for k, v in point.items() if k.endswith("_loss"))
            print(line, flush=True)
    return {"seconds": round(time.time() - t0, 1), "first_loss": round(losses[0], 4),
            "final_loss_mean_last_100": round(float(np.mean(losses[-100:])), 4), "pairs_used": kept,
            "pairs_left_out_longer_than_64_tokens": dropped,
            "learning_curve (greedy, first 100 held-out pairs of each)": curve}


def score(model, tokenizer, pairs) -> dict:
    if not pairs:
        return {}
    s = scores(translate(model, tokenizer, [p.en for p in pairs], max_new_tokens=MAX_LEN), [p.de for p in pairs])
    return {"pairs": len(pairs), "bleu": round(s["bleu"], 2), "chrf": round(s["chrf"], 2)}


def what_the_base_saw(recipe: Recipe) -> str:
    times = dict(recipe.repeats)
    seen = {"multi30k": (f"Multi30k train rows {recipe.captions[0]:,}-{recipe.captions[1] - 1:,} (image captions, "
                         "assets/multi30k_en_de)"),
            "europarl": (f"Europarl rows {recipe.train_rows[0]:,}-{recipe.train_rows[1] - 1:,} of the bundled WMT16 "
                         "train split (assets/wmt16_de_en/train.jsonl.gz)"),
            "news_base": f"the news pairs of {', '.join(data.NEWS_BASE_SETS)} (assets/wmt16_de_en/news.jsonl.gz)"}
    empty = {"multi30k"} if recipe.captions[1] <= recipe.captions[0] else set()   # none English -> German
    parts = [seen[c] + (f" ({times[c]} times per epoch)" if times.get(c, 1) > 1 else "")
             for c in recipe.corpora if c in seen and c not in empty]
    back = (f"; and German to English, Multi30k train rows {recipe.captions_de_en[0]:,}-{recipe.captions_de_en[1] - 1:,}"
            if "multi30k_de_en" in recipe.corpora else "")
    news = ("none of the news that LoRA's news lesson trains on (" + ", ".join(data.NEWS_TRAIN_SETS) + ") nor the held-out "
            + data.NEWS_HELDOUT_SET) if "news_base" in recipe.corpora else "no news pairs"
    return ("English to German: " + ", ".join(parts) + back + ", mixed in every epoch; its vocabulary was trained on "
            f"{', '.join(recipe.vocab_corpora)} text; {news}; no Multi30k validation or test caption.")


def what_lora_sees() -> str:
    lesson = data.LESSONS[data.DEFAULT_LESSON]
    rows = (f"all {data.MULTI30K_TRAIN_ROWS:,} Multi30k train captions" if not data.CAPTIONS_BASE_ROWS else
            f"Multi30k train rows {data.CAPTIONS_BASE_ROWS:,}-{data.MULTI30K_TRAIN_ROWS - 1:,}")
    return (f"the default lesson, {lesson.label}: {rows} (captions the base never read English to German) for "
            f"training; the first Multi30k validation pairs for the held-out "
            f"curve; {lesson.knew_name} for the forgetting curve; {lesson.test_name} for BLEU/chrF after a run.")


def build_precision(precision: str) -> str:
    """What the base is built and trained under (``models.precision_policy``): "mixed" where the CPU has
    fast bf16 (bf16 matmuls, 1.5x faster per step on the AVX512-BF16 EPYC), else "fp32". Pure bf16 is
    never used here: its weights would be saved as bf16, which the app's float32 model cannot load."""
    if precision not in ("mixed", "fp32"):
        raise ValueError(f"a recipe's precision is 'mixed' or 'fp32', got {precision!r}")
    return "mixed" if precision == "mixed" and models.resolve_precision("auto") == "bf16" else "fp32"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--out", default=None, help="default: assets/<size>")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    ap.add_argument("--eval-every", type=int, default=None, help="override the learning curve's interval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--captions", type=int, nargs=2, default=None, metavar=("FROM", "TO"),
                    help="override the Multi30k train rows the base reads English -> German")
    ap.add_argument("--captions-de-en", type=int, nargs=2, default=None, metavar=("FROM", "TO"),
                    help="override the Multi30k train rows the base reads German -> English")
    ap.add_argument("--checkpoints", action="store_true",
                    help="also save the model at every learning-curve point (OUT/checkpoints/step_N)")
    ap.add_argument("--threads", type=int, default=0, help="TensorFlow op threads (0: every core)")
    args = ap.parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    recipe = SIZES[args.size]
    if args.captions is not None:
        recipe = replace(recipe, captions=tuple(args.captions))
    if args.captions_de_en is not None:
        recipe = replace(recipe, captions_de_en=tuple(args.captions_de_en))
    if args.captions is not None or args.captions_de_en is not None:
        recipe = replace(recipe, corpora=tuple(c for c in recipe.corpora if c not in ("multi30k", "multi30k_de_en"))
                         + (("multi30k",) if recipe.captions[1] > recipe.captions[0] else ())
                         + (("multi30k_de_en",) if recipe.captions_de_en[1] > recipe.captions_de_en[0] else ()))
    if args.steps is not None:
        recipe = replace(recipe, steps=args.steps, warmup=min(recipe.warmup, args.steps // 4))
    if args.eval_every is not None:
        recipe = replace(recipe, eval_every=args.eval_every)
    precision = build_precision(recipe.precision)

    tf.keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    out = Path(args.out or ROOT / "assets" / args.size)
    out.mkdir(parents=True, exist_ok=True)
    corpora = corpus_pairs(recipe)
    times = dict(recipe.repeats)
    train_pairs = [p for c in recipe.corpora for _ in range(times.get(c, 1)) for p in corpora[c]]
    heldout = {"multi30k_test": corpora["multi30k_test"], "europarl_heldout": corpora["europarl_heldout"],
               "multi30k_validation_loss": corpora["multi30k_validation"][:100]}

    started = time.time()
    train_vocab([p for c in recipe.vocab_corpora for p in corpora[c]], out, recipe.config["vocab_size"])
    tokenizer = T5TokenizerFast(vocab_file=str(out / "spiece.model"), extra_ids=0)
    config = T5Config(**recipe.config, **LAYOUT, dropout_rate=recipe.dropout)
    with models.precision_policy(precision):
        model = TFT5ForConditionalGeneration(config)
        model(model.dummy_inputs)
    # transformers initialises the untied lm_head with stddev 1, which gives a
    # first loss near 40 at this width; scale it to stddev d_model**-0.5.
    model.lm_head.kernel.assign(model.lm_head.kernel * config.d_model**-0.5)

    trained = pretrain(model, tokenizer, train_pairs, recipe, args.seed, heldout,
                       checkpoints=out / "checkpoints" if args.checkpoints else None)
    model.config.dropout_rate = 0.0  # the shipped model has no dropout; LoRA has its own
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    # Score the shipped files as the app loads them (fp32).
    shipped = TFT5ForConditionalGeneration.from_pretrained(out)
    card = {
        "built_by": f"scripts/build_tiny.py --size {args.size}" + (f" --steps {args.steps}" if args.steps else ""),
        "seed": args.seed,
        "recipe": {**asdict(recipe), "precision": models.KERAS_POLICIES[precision]},
        "params": int(shipped.count_params()),
        "what_the_base_saw": what_the_base_saw(recipe),
        "training": trained,
        "cost": {"wall_seconds_total": None, "cpu": platform.processor() or platform.machine(),
                 "cpu_isa": models.cpu_isa(), "threads": tf.config.threading.get_intra_op_parallelism_threads() or "all",
                 "date": time.strftime("%Y-%m-%d")},
        "scores_greedy_64_tokens": {},
        "examples": {},
    }
    scored = card["scores_greedy_64_tokens"]
    if heldout["multi30k_test"]:
        scored["multi30k test_2016_flickr"] = score(shipped, tokenizer, heldout["multi30k_test"])
    scored["europarl_heldout (rows 19,500-19,999, never trained)"] = score(shipped, tokenizer, heldout["europarl_heldout"])
    if args.size == "tiny":
        card["what_lora_sees"] = what_lora_sees()
        scored["newstest2016 (first 500)"] = score(shipped, tokenizer, list(data.load_pairs("test", 500, "bundled").items))
    card["examples"] = dict(zip(EXAMPLES, translate(shipped, tokenizer, list(EXAMPLES), max_new_tokens=MAX_LEN)))
    card["cost"]["wall_seconds_total"] = round(time.time() - started, 1)
    (out / "build_info.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(card, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
