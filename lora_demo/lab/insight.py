"""What a finished run's weights show, measured on request: the adapter taken apart (anatomy), what
it learned and forgot (analysis/learned.py, kept in the run's analysis.json), two runs' subspace
similarity, and the budget predicted when it was queued beside what it measured."""

from __future__ import annotations

import contextlib
import json

from lora_demo import adapters, data
from lora_demo.analysis import anatomy, budget
from lora_demo.analysis import learned
from lora_demo.core.config import ConfigError
from lora_demo.lab.records import Job
from lora_demo.lab.serving import Serving

ANALYSIS = "analysis.json"


def inspect(job: Job, state: dict, serving: Serving) -> dict:
    """anatomy.inspect of a run's adapter, with ‖W‖ from the served base model."""
    if not job.config.lora.adapter:
        raise ConfigError(f"run {job.id} is full fine-tuning: it has no low-rank factors to take apart. "
                          "Measure what it learned and forgot (below) for its magnitude, direction and "
                          "intruder figures")
    return {"run_id": job.id, **anatomy.inspect(job.config.lora, state, serving.norms())}


def analysed(job: Job) -> dict | None:
    """The run's analysis if it has been measured (and its file reads)."""
    with contextlib.suppress(ValueError, OSError):
        path = job.dir / ANALYSIS
        return json.loads(path.read_text()) if path.is_file() else None
    return None


def analyse(job: Job, state: dict, serving: Serving) -> dict:
    """What the run learned and forgot, from its weights: the held-out and de→en losses as its scale
    goes 0 → 1, the truncation curve (adapters), and per layer ‖ΔW‖/‖W‖, magnitude and direction change
    and intruder dimensions beside a random control. Measured once per run, then read back."""
    done = analysed(job)
    if done is not None:
        return done
    cfg = job.config
    kernels = serving.kernels()
    with serving.lock:   # the served model carries the update only inside each measurement
        batches = learned.probe_batches(serving.tokenizer, cfg.train)
        result = {"run_id": job.id, "method": cfg.lora.method,
                  "forget_name": data.LESSONS[cfg.train.data].knew_name,
                  **learned.measure(serving.model, cfg.lora, state, batches, kernels, cfg.train.seed)}
    (job.dir / ANALYSIS).write_text(json.dumps(result) + "\n")
    return result


def similarity(a: Job, state_a: dict, b: Job, state_b: dict) -> dict:
    sim = anatomy.similarity(a.config.lora, state_a, b.config.lora, state_b)
    if not sim["layers"]:
        raise ConfigError(f"runs {a.id} and {b.id} adapt no layer in common")
    return {"runs": [a.id, b.id], **sim}


def budget_of(job: Job) -> dict:
    """The run's predicted budget (made when it was queued) beside what it measured."""
    if not job.prediction:
        raise ConfigError(f"run {job.id} has no prediction (it was imported or recorded before predictions)")
    meas = budget.measured(job.record(), adapters.tensor_bytes(job.dir))
    return {"run_id": job.id, "predicted": job.prediction, "measured": meas,
            "rows": budget.side_by_side(job.prediction, meas)}
