"""The default run, timed as a user starts it: ``python -m lora_demo train`` with every default, in its
own process, on the benchmarked architecture. The hub is offline here, so the model is built from the
shipped config with random weights and saved with the bundled tokenizer: the step, the sequence
lengths and the evaluation points cost what they cost on the real checkpoint (the values of the
weights do not change the time). The German is noise, so only the times are figures."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def default_run(name: str, precision: str, tokenizer, steps: int | None = None) -> dict:
    """Training seconds (steps and evaluation points, from the run's record), mean step, and the wall
    time of the whole command (load and the BLEU scoring after the run included). ``steps`` shortens
    the run (a smoke run); None is the default run."""
    from lora_demo.core.models import build_random

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, run_dir = Path(tmp) / "model", Path(tmp) / "run"
        build_random(name).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        options = ["--precision", precision] + (["--steps", str(steps), "--bleu-size", "0"] if steps else [])
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lora_demo", "train", "--model", str(model_dir), *options,
                               "--out", str(run_dir)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"the default run failed: {proc.stderr[-2000:]}")
        rec = json.loads((run_dir / "metrics.json").read_text())
    s, cfg = rec["summary"], rec["config"]["train"]
    return {"model": name, "steps": s["steps_done"], "default": steps is None, "training_s": s["elapsed_s"],
            "mean_step_s": s["mean_step_s"], "first_loss_s": s["first_loss_s"],
            "eval_points": len(rec["heldout_losses"]), "bleu_size": cfg["bleu_size"], "command_s": wall,
            "args": " ".join(["--model", f"<random {name}>", *options])}
