"""A run's record: its config, live state and files (``RUNS_DIR/<run_id>/``).

- ``config.json``, written when the run is queued;
- ``events.jsonl``, one line per event, appended as they arrive;
- ``metrics.json``, the whole record, rewritten when the status changes and at the end;
- ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format) once the run has steps;
- ``checkpoints/step-NNNNNN.npz|json`` every ``checkpoint_every`` steps and at the end (training/checkpoints.py).

A record never silently disappears. A server killed mid-run leaves a record whose status is still
queued or running; the next start replays its events.jsonl and marks it "interrupted", so every step
that was logged is still there.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

from lora_demo import data
from lora_demo.core.config import RunConfig, limits
from lora_demo.core.events import (EvalLogged, RunFailed, RunFinished, RunResumed, RunStarted, SamplesLogged,
                                   StepLogged, to_dict)
from lora_demo.lab import owners
from lora_demo.training import checkpoints

FINAL = ("completed", "stopped", "failed", "interrupted", "imported")
RECORD = "metrics.json"

LIVE: dict = {"record": None}   # field metadata: not part of the record on disk

@dataclass
class Job:
    """A run: its config, its live state and its record. A field's ``record`` metadata is its key in
    metrics.json (its own name by default); fields marked ``LIVE`` exist only while the server runs."""

    id: str = field(metadata={"record": "run_id"})
    config: RunConfig
    owner: str                               # SHA-256 digest of the owner key (owners.py); never the key
    dir: Path = field(metadata=LIVE)
    sweep: str = ""                          # sweep id when the run is part of a rank sweep
    created: float = field(default_factory=time.time)
    finished: float | None = None            # when its record was complete (trained, scored): created -> finished
    status: str = "queued"                   # queued -> running -> completed | stopped | failed | interrupted
    phase: str = field(default="", metadata=LIVE)   # "training" or "evaluating" while running
    error: str = ""
    params: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    device: str = ""
    losses: list = field(default_factory=list)       # [step, loss, training tokens so far]
    val_losses: list = field(default_factory=list)   # [step, validation loss]; step 0 is the base model
    heldout_losses: list = field(default_factory=list)   # [step, held-out loss]; step 0 is the base model
    optim: list = field(default_factory=list)        # [step, learning rate, gradient norm before clipping]
    samples: list = field(default_factory=list)      # [step, [translation per sample sentence]]; 0 = base
    summary: dict = field(default_factory=dict)
    quality: dict | None = None              # sacreBLEU / chrF of base and LoRA on the test slice
    memory: dict = field(default_factory=dict)
    adapter_files: dict | None = field(default=None, metadata={"record": "adapter"})   # {"bytes": n} once written
    origin: dict = field(default_factory=dict)   # for an imported adapter: file name, base model, notices
    prediction: dict = field(default_factory=dict)   # budget.predict() at submit time, shown beside the measured
    resumes: list = field(default_factory=list)      # {"from_step", "was", "steps"} each time it was resumed
    notices: list = field(default_factory=list)      # what happened to the run's files (checkpoints pruned)
    outcome: str = field(default="", metadata=LIVE)   # how training ended; the status once the record is complete
    version: int = field(default=0, metadata=LIVE)     # bumped on every change, for streaming handlers
    recent: list = field(default_factory=list, repr=False, metadata=LIVE)   # last (step, elapsed_s), for the ETA
    adapter: dict | None = field(default=None, repr=False, metadata=LIVE)   # PEFT arrays, loaded lazily
    resume_from: checkpoints.Checkpoint | None = field(default=None, repr=False, metadata=LIVE)
    stop: threading.Event = field(default_factory=threading.Event, repr=False, metadata=LIVE)
    done: threading.Event = field(default_factory=threading.Event, repr=False, metadata=LIVE)

    @classmethod
    def new(cls, config: RunConfig, session: str, parent: Path, sweep: str = "") -> "Job":
        """A new run owned by the holder of the key ``session``."""
        run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        return cls(run_id, config, owners.digest(session), Path(parent) / run_id, sweep=sweep)

    def owned_by(self, session: str | None) -> bool:
        return owners.holds(session, self.owner)

    # -- updates -------------------------------------------------------------
    def apply(self, event) -> None:
        """Fold one train() event into the record."""
        if isinstance(event, RunStarted):
            self.params, self.device = event.params, event.device
            self.data = {"origin": event.data_origin, "train_pairs": event.train_pairs, **event.shapes}
        elif isinstance(event, StepLogged):
            seen = (self.losses[-1][2] if self.losses else 0) + event.tokens
            self.losses.append([event.step, event.loss, seen])
            self.summary["elapsed_s"] = event.elapsed_s
            self.summary["last_tokens_per_s"] = event.tokens_per_s
            self.optim.append([event.step, event.lr, event.grad_norm])
            self.recent = (self.recent + [(event.step, event.elapsed_s)])[-10:]
        elif isinstance(event, EvalLogged):
            self.val_losses.append([event.step, event.val_loss])
            if event.heldout_loss is not None:
                self.heldout_losses.append([event.step, event.heldout_loss])
        elif isinstance(event, SamplesLogged):
            self.samples.append([event.step, list(event.translations)])
        elif isinstance(event, RunFinished):
            self.outcome, self.summary = event.status, {**self.summary, **event.summary}
        elif isinstance(event, RunFailed):
            self.outcome, self.error = "failed", f"{event.reason}. {event.hint}."
        elif isinstance(event, RunResumed):   # what was logged after the checkpoint is measured again
            k = event.step
            self.losses = [x for x in self.losses if x[0] <= k]
            self.optim = [x for x in self.optim if x[0] <= k]
            self.val_losses = [x for x in self.val_losses if x[0] <= k]
            self.heldout_losses = [x for x in self.heldout_losses if x[0] <= k]
            self.samples = [x for x in self.samples if x[0] <= k]
            self.resumes.append({"from_step": k, "was": event.was, "steps": event.steps})
            self.recent = []
        self.version += 1

    # -- persistence ---------------------------------------------------------
    def eta_s(self) -> float | None:
        """Seconds left at the pace of the last few steps (measured, not guessed); None until known."""
        if len(self.recent) < 2 or self.status != "running" or self.phase != "training":
            return None
        (s0, t0), (s1, t1) = self.recent[0], self.recent[-1]
        return (t1 - t0) / (s1 - s0) * (self.config.train.steps - s1)

    @staticmethod
    def _recorded() -> list[tuple[str, str]]:
        """(field, key in metrics.json) of every recorded field."""
        return [(f.name, key) for f in fields(Job) if (key := f.metadata.get("record", f.name)) is not None]

    def record(self) -> dict:
        rec = {key: getattr(self, name) for name, key in self._recorded()}
        return {**rec, "config": self.config.to_dict(), "model": self.config.model}

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{RECORD}.tmp"
        tmp.write_text(json.dumps(self.record(), indent=2, default=float) + "\n")
        os.replace(tmp, self.dir / RECORD)  # atomic: a reader never sees half a record

    def log_event(self, event) -> None:
        with open(self.dir / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(to_dict(event), default=float) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> "Job":
        """A record from disk; an unfinished one (the server died) comes back as interrupted."""
        rec = json.loads((run_dir / RECORD).read_text())
        # records written before owner keys kept the browser's session id itself: store its digest now
        rec = {**rec, "owner": rec.get("owner") or owners.digest(rec.get("session", "")),
               "config": RunConfig.from_dict(rec["config"])}
        job = cls(dir=run_dir, **{name: rec[key] for name, key in cls._recorded() if rec.get(key) is not None})
        if "session" in rec:
            job.save()
        if job.status not in FINAL:
            job._replay()
            job.status = "interrupted"
            ckpt = checkpoints.latest(job.dir)
            job.error = ("the server stopped during this run; every step logged before that is kept"
                         + (", and so is the adapter" if job.adapter_files else "")
                         + (f"; resume it from its checkpoint at step {ckpt.step}" if ckpt else ""))
            job.save()
        job.done.set()
        return job

    def checkpoint_steps(self) -> list[int]:
        """The steps of the checkpoints on disk, oldest first (pruning may have removed some)."""
        return [c.step for c in checkpoints.listed(self.dir)]

    def _replay(self) -> None:
        path = self.dir / "events.jsonl"
        if not path.exists():
            return
        self.losses, self.val_losses, self.heldout_losses, self.optim, self.samples = [], [], [], [], []
        self.resumes = []
        kinds = {"RunStarted": RunStarted, "StepLogged": StepLogged, "EvalLogged": EvalLogged,
                 "SamplesLogged": SamplesLogged, "RunResumed": RunResumed}
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            kind = kinds.get(d.pop("event", ""))
            if kind is not None:
                self.apply(kind(**d))


def summary_row(job: Job, session: str | None = None) -> dict:
    """A compact, JSON-friendly view of a run for lists and the API. Owner keys (and their digests)
    are never shown; ``mine`` says whether ``session`` (an owner key) holds the run."""
    rec = job.record()
    for key in ("losses", "val_losses", "heldout_losses", "optim", "samples", "config", "owner"):
        rec.pop(key)
    rec["mine"] = job.owned_by(session)
    rec.update(method=job.config.lora.method, rank=job.config.lora.rank, alpha=job.config.lora.alpha,
               targets=list(job.config.lora.targets),
               steps=job.config.train.steps, steps_done=len(job.losses),
               checkpoint_steps=job.checkpoint_steps())
    return rec


def status(job: Job, position: int, wait_s: float | None) -> dict:
    """Everything a client needs about a run, as plain values; ``position`` in the queue (0: not
    waiting) and the expected ``wait_s`` come from the queue."""
    last = job.losses[-1] if job.losses else None
    cfg = job.config
    return {"run_id": job.id, "sweep": job.sweep, "method": cfg.lora.method, "rank": cfg.lora.rank,
            "status": job.status, "phase": job.phase, "queue_position": position, "wait_s": wait_s,
            "total_steps": cfg.train.steps, "step": last[0] if last else 0, "loss": last[1] if last else None,
            "tokens_per_s": job.summary.get("last_tokens_per_s"), "elapsed_s": job.summary.get("elapsed_s", 0.0),
            "eta_s": job.eta_s(), "losses": [[s, v] for s, v, _ in job.losses], "val_losses": job.val_losses,
            "heldout_losses": job.heldout_losses, "heldout_name": data.HELDOUT_NAMES[cfg.train.data],
            "seed": cfg.train.seed, "samples": {"english": list(cfg.train.samples), "by_step": job.samples},
            "summary": {k: v for k, v in job.summary.items() if k != "last_tokens_per_s"},
            "quality": job.quality, "memory": job.memory, "error": job.error,
            "checkpoint_every": cfg.train.checkpoint_every, "checkpoint_steps": job.checkpoint_steps(),
            "resumes": job.resumes, "notices": job.notices[-3:], "data": cfg.train.data,
            "val_name": data.LESSONS[cfg.train.data].knew_name, "params": job.params,
            "adapter_bytes": (job.adapter_files or {}).get("bytes"),
            "finished_s": job.finished - job.created if job.finished else None}


def prune_checkpoints(jobs: list[Job], job: Job) -> None:
    """Keep the checkpoints of ``jobs`` (oldest run first) under LORA_LAB_MAX_CHECKPOINT_MB: the oldest
    (oldest run first, then lowest step) are removed, never ``job``'s newest, and every run that lost
    one says so in its record."""
    limit = limits().max_checkpoint_mb * 2**20
    found = [(c, j) for j in jobs for c in checkpoints.listed(j.dir)]
    total, newest = sum(c.bytes for c, _ in found), checkpoints.latest(job.dir)
    removed: dict[str, list] = {}
    for ckpt, owner in found:
        if total <= limit:
            break
        if newest is not None and ckpt.meta == newest.meta:
            continue
        total -= ckpt.bytes
        checkpoints.remove(ckpt)
        removed.setdefault(owner.id, [owner]).append(ckpt.step)
    for run_id, (owner, *steps) in removed.items():
        where = "" if owner is job else f" (to make room for run {job.id})"
        note = (f"checkpoint{'s' if len(steps) > 1 else ''} of step {', '.join(map(str, steps))} removed{where}: "
                f"at most {limits().max_checkpoint_mb} MB of checkpoints are kept per session (per run on the "
                "command line; LORA_LAB_MAX_CHECKPOINT_MB), the oldest go first")
        owner.notices.append(note)
        if owner is not job:
            owner.version += 1
            owner.save()
            job.notices.append(f"run {run_id}: {note}")
    if removed:
        job.save()   # (called between steps of job's own thread) the notice survives a killed server
