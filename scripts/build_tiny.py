"""Build the bundled offline model ``assets/tiny`` reproducibly.

    python scripts/build_tiny.py [--steps 2500] [--out assets/tiny]

1. Train a SentencePiece unigram vocabulary (T5's special ids: pad 0, eos 1,
   unk 2) on the English and German of the bundled WMT16 train split.
2. Build a small T5 with FLAN-T5's layout (gated-GELU FFN, untied lm_head).
3. Pre-train it briefly, all weights, on the bundled train split with the
   ``translate English to German:`` prompt, so its output looks like German.

The tiny model is for offline use and the tests. It is not a good translator.
Everything is seeded and TF op determinism is on, so a rebuild gives the same
weights on the same software.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lora_demo  # noqa: E402,F401  (pins Keras before TensorFlow loads)
import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import tensorflow as tf  # noqa: E402
from transformers import T5Config, T5TokenizerFast, TFT5ForConditionalGeneration  # noqa: E402

from lora_demo import data  # noqa: E402

TINY_CONFIG = dict(
    vocab_size=4000, d_model=128, d_kv=32, num_heads=4, d_ff=384, num_layers=3, num_decoder_layers=3,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    eos_token_id=1, model_type="t5",
)


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


def pretrain(model, tokenizer, pairs, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    arrays = data.encode(tokenizer, pairs, max_source_len=64, max_target_len=64)
    stream = data.batches(arrays, batch_size, seed)
    schedule = tf.keras.optimizers.schedules.CosineDecay(lr, steps, alpha=0.05, warmup_target=None)
    opt = tf.keras.optimizers.Adam(schedule)

    @tf.function(autograph=False)
    def step(batch):
        with tf.GradientTape() as tape:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], training=True)
            mask = tf.cast(batch["labels"] != -100, tf.float32)
            ce = tf.keras.losses.sparse_categorical_crossentropy(
                tf.maximum(batch["labels"], 0), out.logits, from_logits=True)
            loss = tf.reduce_sum(ce * mask) / tf.reduce_sum(mask)
        grads = tape.gradient(loss, model.trainable_variables)
        grads, _ = tf.clip_by_global_norm(grads, 1.0)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    losses, t0 = [], time.time()
    for i in range(steps):
        losses.append(float(step(next(stream))))
        if i % 250 == 0 or i == steps - 1:
            print(f"step {i:5d}  loss {np.mean(losses[-50:]):.3f}  {time.time() - t0:.0f}s", flush=True)
    return losses


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "assets" / "tiny"))
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    tf.keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = data.load_pairs("train", source="bundled")

    train_vocab(pairs.items, out, TINY_CONFIG["vocab_size"])
    tokenizer = T5TokenizerFast(vocab_file=str(out / "spiece.model"), extra_ids=0)
    config = T5Config(**TINY_CONFIG)
    model = TFT5ForConditionalGeneration(config)
    model(model.dummy_inputs)
    # transformers initialises the untied lm_head with stddev 1, which gives a
    # first loss near 40 at this width; scale it to stddev d_model**-0.5.
    model.lm_head.kernel.assign(model.lm_head.kernel * config.d_model**-0.5)

    losses = pretrain(model, tokenizer, pairs, args.steps, args.batch_size, args.lr, args.seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    sample = [data.PROMPT + "The session is resumed.", data.PROMPT + "I would like to thank the Commissioner."]
    enc = tokenizer(sample, return_tensors="tf", padding=True)
    gen = model.generate(**enc, max_new_tokens=32)
    examples = dict(zip(sample, tokenizer.batch_decode(gen, skip_special_tokens=True)))
    card = {
        "built_by": "scripts/build_tiny.py", "args": vars(args), "params": int(model.count_params()),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])), "first_loss": losses[0], "examples": examples,
    }
    (out / "build_info.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(card, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
