"""Checkpoints a run can be resumed from: what a training step reads and writes, saved every N steps.

A checkpoint is everything the next step depends on besides the base weights:

- the trained variables (LoRA factors, DoRA magnitudes; every weight for full fine-tuning);
- the optimiser's variables (its step counter and moments), in the optimiser's own order;
- the data position and the dropout clock, both equal to the steps done (the batch order is a function
  of the seed, and a dropout mask of (seed, step)), so a resumed run skips that many batches and sets
  the clock to it;
- what the loop has measured so far (losses, evaluation points), for early stopping and the summary.

On disk: ``RUN_DIR/checkpoints/step-000040.npz`` (the arrays) and ``step-000040.json`` (the rest). The
JSON is written last, atomically, and is what makes a checkpoint count: a server killed while saving
leaves no half checkpoint that a resume would trust.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_demo.core.config import ConfigError

DIRNAME = "checkpoints"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    arrays: Path
    meta: Path

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.arrays, self.meta) if p.exists())

    def state(self) -> dict:
        return json.loads(self.meta.read_text())

    def load(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(trained variables, optimiser variables), in the order they were saved."""
        with np.load(self.arrays) as z:
            n_vars, n_opt = int(z["n_vars"]), int(z["n_opt"])
            return [z[f"v{i}"] for i in range(n_vars)], [z[f"o{i}"] for i in range(n_opt)]


def optimizer_variables(opt) -> list:
    variables = opt.variables() if callable(opt.variables) else opt.variables
    return list(variables)


def save(run_dir: Path, step: int, variables: list, opt, state: dict) -> Checkpoint:
    """Write the checkpoint of ``step`` (the arrays, then the JSON that commits it)."""
    folder = Path(run_dir) / DIRNAME
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    arrays, meta = folder / f"{name}.npz", folder / f"{name}.json"
    opt_vars = optimizer_variables(opt)
    tmp = folder / f".{name}.npz.tmp"
    with open(tmp, "wb") as fh:
        np.savez(fh, n_vars=len(variables), n_opt=len(opt_vars),
                 **{f"v{i}": v.numpy() for i, v in enumerate(variables)},
                 **{f"o{i}": v.numpy() for i, v in enumerate(opt_vars)})
    os.replace(tmp, arrays)
    tmp = folder / f".{name}.json.tmp"
    tmp.write_text(json.dumps({"step": step, **state}, default=float) + "\n")
    os.replace(tmp, meta)
    return Checkpoint(step, arrays, meta)


def restore(ckpt: Checkpoint, variables: list, opt) -> None:
    """Assign a checkpoint to the run's variables and its optimiser (built, same config)."""
    saved_vars, saved_opt = ckpt.load()
    opt_vars = optimizer_variables(opt)
    for what, targets, values in (("trained variables", variables, saved_vars),
                                  ("optimiser variables", opt_vars, saved_opt)):
        if len(targets) != len(values) or any(tuple(t.shape) != v.shape for t, v in zip(targets, values)):
            raise ConfigError(f"the checkpoint of step {ckpt.step} does not fit this run's {what} (it was saved "
                              "by another configuration); resume needs the run's own settings")
        for t, v in zip(targets, values):
            t.assign(v.astype(t.dtype.as_numpy_dtype))


def listed(run_dir: Path) -> list[Checkpoint]:
    """The run's complete checkpoints, oldest step first."""
    folder = Path(run_dir) / DIRNAME
    if not folder.is_dir():
        return []
    out = []
    for meta in folder.glob("step-*.json"):
        arrays = meta.with_suffix(".npz")
        if arrays.is_file():
            out.append(Checkpoint(int(meta.stem.split("-")[1]), arrays, meta))
    return sorted(out, key=lambda c: c.step)


def latest(run_dir: Path, at_most: int | None = None) -> Checkpoint | None:
    found = [c for c in listed(run_dir) if at_most is None or c.step <= at_most]
    return found[-1] if found else None


def remove(ckpt: Checkpoint) -> None:
    for p in (ckpt.meta, ckpt.arrays):   # the JSON first: a half-removed checkpoint no longer counts
        p.unlink(missing_ok=True)
