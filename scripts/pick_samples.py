"""Pick the default run's sample sentences by measurement, not by taste.

    python scripts/pick_samples.py RUN_SEED0 RUN_SEED1 RUN_SEED2 [--model tiny] [--words 10] [--top 3]

Each RUN is the output directory of a default run (``python -m lora_demo train --model tiny --seed S --out
RUN``). The candidates are the short English captions (at most ``--words`` words) of Multi30k validation after
the pairs that the held-out curve scores: captions that neither the base nor LoRA trained on. Each is translated by
the base and by every run's adapter (greedy), and scored with sentence chrF against its reference. The
sentences whose chrF rose on every seed, with no repetition loop in any output, ranked by their smallest
rise, are printed with the base's and each run's German. A summary line first says how many rose and fell
on every seed, how many outputs looped, and the corpus chrF of each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lora_demo  # noqa: E402,F401  (pins Keras before TensorFlow loads)
from lora_demo import adapters, data  # noqa: E402
from lora_demo.analysis.evaluate import repetition_loop, scores, sentence_chrf, translate  # noqa: E402
from lora_demo.core import models  # noqa: E402
from lora_demo.core.config import TrainConfig  # noqa: E402
from lora_demo.core.inject import apply_lora, remove_lora  # noqa: E402


def candidates(words: int, skip: int):
    """Short held-out captions (Multi30k validation) after the first ``skip`` (the held-out curve's slice)."""
    pairs = data.multi30k_pairs("validation").items[skip:]
    return [p for p in pairs if len(p.en.split()) <= words]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (one per seed) holding an adapter")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--words", type=int, default=10, help="longest candidate, in English words")
    ap.add_argument("--top", type=int, default=3)
    args = ap.parse_args(argv)

    loaded = models.load_model(args.model)
    pairs = candidates(args.words, TrainConfig().heldout_size)
    english, refs = [p.en for p in pairs], [p.de for p in pairs]
    base = translate(loaded.model, loaded.tokenizer, english)
    columns = []
    for run in args.runs:
        adapter = adapters.read_adapter(run)
        apply_lora(loaded.model, adapter.config)
        adapters.assign_state(loaded.model, adapter.state)
        columns.append(translate(loaded.model, loaded.tokenizer, english))
        remove_lora(loaded.model)

    chrf_base = [sentence_chrf(h, r) for h, r in zip(base, refs)]
    rises = [[sentence_chrf(h, r) - b for h, r, b in zip(col, refs, chrf_base)] for col in columns]
    per_sentence = list(zip(*rises))
    looped = [[bool(repetition_loop(h)) for h in col] for col in columns]   # [seed][sentence]
    up = [i for i, r in enumerate(per_sentence) if min(r) > 0 and not any(seed[i] for seed in looped)]
    down = [i for i, r in enumerate(per_sentence) if max(r) < 0]
    changed = [sum(c[i] != base[i] for i in range(len(base))) for c in columns]
    summary = {"candidates": len(pairs), "changed_per_seed": changed, "rose_on_every_seed": len(up),
               "fell_on_every_seed": len(down), "loops_per_seed": [sum(seed) for seed in looped],
               "loops_base": sum(bool(repetition_loop(b)) for b in base),
               "corpus_chrf_base": round(scores(base, refs)["chrf"], 2),
               "corpus_chrf_lora": [round(scores(c, refs)["chrf"], 2) for c in columns]}
    print(json.dumps(summary))
    for i in sorted(up, key=lambda i: -min(per_sentence[i]))[: args.top]:
        print(json.dumps({"en": english[i], "reference": refs[i], "base": base[i],
                          "lora": [c[i] for c in columns], "chrf_base": round(chrf_base[i], 1),
                          "smallest_rise": round(min(per_sentence[i]), 1)}, ensure_ascii=False))


if __name__ == "__main__":
    main()
