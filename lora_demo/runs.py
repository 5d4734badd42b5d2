"""The lab: one shared base model, a queue of training jobs, translations with any run's adapter.

Training runs in one worker thread, one job at a time, on its own copy of the
base model; other jobs wait in a FIFO queue and know their position. Closing a
browser tab does not touch the job. Translation uses a second copy under a
lock and activates the chosen run's adapter for the duration of a request, so
it keeps working while a job trains and one session's adapter never leaks into
another's translations. Neither copy's base weights are ever modified.

Each run writes ``RUNS_DIR/<run_id>/``: config.json, events.jsonl (appended as
events arrive), and at the end metrics.json plus the PEFT-format adapter.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import adapters, data
from .config import ConfigError, LoraConfig, RunConfig
from .evaluate import translate_both
from .events import RunFailed, RunFinished, StepLogged, to_dict
from .inject import apply_lora, lora_layers, remove_lora
from .models import LoadedModel
from .params import keras_name_to_path
from .train import train

log = logging.getLogger(__name__)
FINAL = ("completed", "stopped", "failed")


@dataclass
class Job:
    id: str
    config: RunConfig
    session: str
    dir: Path
    status: str = "queued"                  # queued -> running -> completed | stopped | failed
    events: list = field(default_factory=list)
    adapter: dict | None = None             # PEFT-keyed numpy arrays once the run has ended
    error: str = ""
    created: float = field(default_factory=time.time)
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def summary(self) -> dict:
        ends = [e for e in self.events if isinstance(e, RunFinished)]
        return ends[-1].summary if ends else {}

    def losses(self) -> list[tuple[int, float]]:
        return [(e.step, e.loss) for e in self.events if isinstance(e, StepLogged)]


def clone_model(loaded: LoadedModel):
    """A second model with the same weights (no disk I/O): translation's own copy."""
    if lora_layers(loaded.model):
        raise ValueError("clone the base model before any adapter is added to it")
    model = type(loaded.model)(loaded.model.config)
    model(model.dummy_inputs)
    source = {keras_name_to_path(v.name): v for v in loaded.model.weights}
    for dst in model.weights:
        dst.assign(source[keras_name_to_path(dst.name)])
    return model


class Lab:
    def __init__(self, loaded: LoadedModel, runs_dir: Path | str = "runs", data_source: str = "auto",
                 eval_size: int = 32):
        self.loaded = loaded
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.data_source = data_source
        self.trainer = loaded.model                     # the worker's model; LoRA is injected per run
        self.translator = clone_model(loaded)           # requests activate adapters on this one
        self.translate_lock = threading.Lock()
        self.active_adapter: tuple | None = None        # (run_id, structure) on the translator
        self.jobs: dict[str, Job] = {}
        self.pending: queue.Queue[Job] = queue.Queue()
        self.waiting: list[str] = []                    # job ids in queue order
        self.lock = threading.Lock()                    # guards jobs / waiting
        self._pairs: dict[tuple, data.Pairs] = {}
        self.worker = threading.Thread(target=self._work, daemon=True, name="lora-train-worker")
        self.worker.start()

    # -- data --------------------------------------------------------------
    def pairs(self, split: str, n: int) -> data.Pairs:
        key = (split, n)
        if key not in self._pairs:
            self._pairs[key] = data.load_pairs(split, n, source=self.data_source)
        return self._pairs[key]

    # -- jobs --------------------------------------------------------------
    def submit(self, config: RunConfig, session: str = "") -> Job:
        run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        job = Job(run_id, config, session, self.runs_dir / run_id)
        job.dir.mkdir(parents=True)
        (job.dir / "config.json").write_text(json.dumps({"run_id": run_id, "session": session, **config.to_dict()},
                                                        indent=2) + "\n")
        with self.lock:
            self.jobs[run_id] = job
            self.waiting.append(run_id)
        self.pending.put(job)
        return job

    def position(self, job: Job) -> int:
        """1 = next to run; 0 = not waiting."""
        with self.lock:
            return self.waiting.index(job.id) + 1 if job.id in self.waiting else 0

    def stop(self, run_id: str) -> Job | None:
        job = self.jobs.get(run_id)
        if job is not None:
            job.stop.set()
        return job

    def session_jobs(self, session: str) -> list[Job]:
        return [j for j in self.jobs.values() if j.session == session]

    def _record(self, job: Job, event) -> None:
        job.events.append(event)
        with open(job.dir / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(to_dict(event), default=float) + "\n")

    def _work(self) -> None:
        while True:
            job = self.pending.get()
            with self.lock:
                self.waiting.remove(job.id)
            try:
                self._run(job)
            except Exception as exc:  # never let one job kill the worker
                log.exception("job %s crashed", job.id)
                job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
            finally:
                job.done.set()

    def _run(self, job: Job) -> None:
        if job.stop.is_set():
            job.status = "stopped"
            self._record(job, RunFinished("stopped", {"steps_done": 0, "note": "stopped while queued"}))
            return
        job.status = "running"
        cfg = job.config.train
        train_pairs = self.pairs("train", cfg.train_size)
        val_pairs = self.pairs("validation", cfg.eval_size)
        for event in train(job.config, self.trainer, self.loaded.tokenizer, train_pairs, val_pairs,
                           stop=job.stop, data_origin=train_pairs.origin):
            self._record(job, event)
        end = job.events[-1]
        job.status = end.status if isinstance(end, RunFinished) else "failed"
        job.error = f"{end.reason}. {end.hint}." if isinstance(end, RunFailed) else ""
        if lora_layers(self.trainer) and any(isinstance(e, StepLogged) for e in job.events):
            # Kept on disk whatever the outcome; offered for translation only if the run did not fail.
            adapters.save_adapter(self.trainer, job.config.lora, self.loaded.name, job.dir)
            if job.status != "failed":
                job.adapter = adapters.adapter_state(self.trainer)
        remove_lora(self.trainer)
        metrics = {"run_id": job.id, "status": job.status, "error": job.error, "summary": job.summary,
                   "losses": job.losses()}
        (job.dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")

    # -- translation ---------------------------------------------------------
    def _activate(self, job: Job | None) -> None:
        """Put ``job``'s adapter on the translator (or none), re-wrapping only when the structure changes."""
        if job is None or job.adapter is None:
            if lora_layers(self.translator):
                remove_lora(self.translator)
            self.active_adapter = None
            return
        structure = (job.config.lora.rank, job.config.lora.targets, job.config.lora.side, job.config.lora.layers)
        if self.active_adapter is None or self.active_adapter[1] != structure:
            apply_lora(self.translator, job.config.lora)
        if self.active_adapter != (job.id, structure):
            adapters.assign_state(self.translator, job.adapter)
        self.active_adapter = (job.id, structure)

    def translate(self, sentences: list[str], run_id: str | None = None, scale: float = 1.0,
                  session: str | None = None) -> tuple[list[str], list[str]]:
        """(base, LoRA) German for each sentence, with run ``run_id``'s adapter at ``scale``."""
        job = self.jobs.get(run_id) if run_id else None
        if run_id and job is None:
            raise ConfigError(f"no run {run_id!r} on this server")
        if job is not None and session is not None and job.session != session:
            raise ConfigError(f"run {run_id!r} belongs to another session")
        if job is not None and job.adapter is None:
            raise ConfigError(f"run {run_id!r} has no adapter yet (status: {job.status})")
        with self.translate_lock:
            self._activate(job)
            return translate_both(self.translator, self.loaded.tokenizer, sentences, scale=scale)

