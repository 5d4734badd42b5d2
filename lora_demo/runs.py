"""Run records and the lab: one shared base model, a queue of training jobs, translation with any run.

A run is a ``Job``: its config, its live state (updated from train() events)
and, on disk in ``RUNS_DIR/<run_id>/``:

- ``config.json``, written when the run is queued;
- ``events.jsonl``, one line per event, appended as they arrive;
- ``metrics.json``, the whole record, rewritten when the status changes and at the end;
- ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format) once the run has steps;
- ``checkpoints/step-NNNNNN.npz|json`` every ``checkpoint_every`` steps and at the end (checkpoints.py):
  a stopped, interrupted or finished run continues from its newest one (``Lab.resume``), and each
  session's checkpoints stay under ``LORA_LAB_MAX_CHECKPOINT_MB``, the oldest pruned with a notice.

A record never silently disappears. A server killed mid-run leaves a record whose
status is still queued or running; the next start replays its events.jsonl and
marks it "interrupted", so every step that was logged is still there.

Training runs in one worker thread, one job at a time, on its own copy of the
base model; other jobs wait in a FIFO queue and know their position. Closing a
browser tab does not touch the job. Translation uses a second copy under a
lock: the chosen run's adapter is merged into that copy's kernels for the
duration of one request and the kernels are then restored bit for bit, so it
keeps working while a job trains, one session's adapter never leaks into
another's translations, and merged inference costs no more than the base. The
training copy's base weights are never modified.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from . import adapters, anatomy, budget, checkpoints, data, owners
from .config import MODULES, ConfigError, LoraConfig, RunConfig, TrainConfig, clean_sentences, limits
from .evaluate import scores, sentence_chrf, translate
from .events import (CheckpointSaved, EvalLogged, RunFailed, RunFinished, RunResumed, RunStarted, SamplesLogged,
                     StepLogged, to_dict)
from .inject import MODULE_PATH, dense_sites, lora_layers, remove_lora, select_paths, set_scale
from .models import LoadedModel, copy_model, model_precision, peak_gpu_mb, reset_gpu_peak, resolve_precision
from .params import preview
from .train import train

log = logging.getLogger(__name__)
FINAL = ("completed", "stopped", "failed", "interrupted", "imported")
RECORD = "metrics.json"
EVAL_BATCH = 16          # sentences per generate() call when scoring BLEU/chrF
EVAL_MAX_NEW_TOKENS = 128
CONNECTIONS_KEPT = 100_000   # API connections whose implicit owner key is remembered (oldest forgotten first)


# ---------------------------------------------------------------------------
# A run and its record
# ---------------------------------------------------------------------------

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
               checkpoint_steps=[c.step for c in checkpoints.listed(job.dir)])
    return rec


# ---------------------------------------------------------------------------
# Executing one run: train, save the adapter, score it, record everything
# ---------------------------------------------------------------------------

class MemoryMonitor:
    """Peak resident memory of this process while a run executes (sampled every 0.2 s)."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.start = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True, name="rss-monitor")

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.2)

    def __enter__(self):
        reset_gpu_peak()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    def figures(self) -> dict:
        return {"peak_rss_mb": round(self.peak / 2**20, 1), "gpu_peak_mb": peak_gpu_mb(),
                "start_rss_mb": round(self.start / 2**20, 1),
                "rss_growth_mb": round(max(self.peak - self.start, 0) / 2**20, 1)}


def score_translations(model, tokenizer, pairs: data.Pairs, stop: threading.Event | None = None) -> dict | None:
    """BLEU and chrF of the model as it stands on ``pairs``; None if stopped part-way."""
    hyps: list[str] = []
    items = pairs.items
    for i in range(0, len(items), EVAL_BATCH):
        if stop is not None and stop.is_set():
            return None
        hyps += translate(model, tokenizer, [p.en for p in items[i:i + EVAL_BATCH]],
                          max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=EVAL_BATCH)
    return scores(hyps, [p.de for p in items])


def execute(job: Job, model, tokenizer, pairs_of, base_cache: dict, on_change=None, strategy=None,
            translator=None, on_checkpoint=None) -> None:
    """Run ``job`` to the end on ``model`` and leave a complete record in ``job.dir``.

    ``pairs_of(split, n, dataset)`` supplies data (data.pairs_for); ``base_cache`` maps n to the base model's
    BLEU/chrF on the first n test pairs and is filled here on first need (the base
    never changes, so one cache serves every run on the same model). ``on_change(event)`` is called
    with each train() event, and with None when the phase changes. Shared by the
    app's worker and the CLI, so both write the same record. With a ``translator``
    (adapters.MergedTranslator: the app's) the sample sentences and BLEU/chrF are translated by it,
    with the adapter merged in; without one, by the training model. A job with ``resume_from`` (Lab.resume)
    continues from that checkpoint; ``on_checkpoint(job)`` is called after each checkpoint is saved (by
    default the run's own checkpoints are kept under LORA_LAB_MAX_CHECKPOINT_MB).
    """
    def notify(event=None):
        if on_change is not None:
            on_change(event)
    cfg = job.config.train
    resume, job.resume_from = job.resume_from, None
    job.status, job.phase = "running", "training"
    job.save()
    notify()
    full = not job.config.lora.adapter
    with MemoryMonitor() as mem:
        if full:
            # Full fine-tuning trains a float32 copy of the base (bf16 weights would round small
            # updates away), so ``model`` and the translator stay the base for every later run.
            remove_lora(model)
            if translator is not None:
                with translator.use() as base_model:
                    model = copy_model(base_model, "fp32")
            else:
                if cfg.bleu_size > 0 and cfg.bleu_size not in base_cache:   # the base, before it changes
                    base_cache[cfg.bleu_size] = score_translations(model, tokenizer, pairs_of("test", cfg.bleu_size))
                model = copy_model(model, "fp32")
        train_pairs, val_pairs = pairs_of("train", cfg.train_size, cfg.data), pairs_of("validation", cfg.eval_size)
        heldout = pairs_of("heldout", cfg.heldout_size, cfg.data)
        for event in train(job.config, model, tokenizer, train_pairs, val_pairs, heldout, stop=job.stop,
                           data_origin=train_pairs.origin, strategy=strategy, translator=translator,
                           checkpoint_dir=job.dir, resume=resume):
            job.log_event(event)
            job.apply(event)
            if isinstance(event, CheckpointSaved):
                (on_checkpoint or (lambda j: prune_checkpoints([j], j)))(job)
            notify(event)
        outcome = job.outcome or "failed"
        if (lora_layers(model) or full) and job.losses:
            # Kept on disk whatever the outcome; offered for translation only if the run did not fail.
            saved = adapters.save_run_state(model, job.config.lora, job.config.model, job.dir)
            job.adapter_files = {"bytes": saved.stat().st_size}
            if outcome != "failed" and not full:   # (full fine-tuning: every weight, read from disk when used)
                job.adapter = adapters.adapter_state(model)
        if outcome == "completed" and cfg.bleu_size > 0:
            job.phase = "evaluating"
            job.version += 1
            notify()
            test = pairs_of("test", cfg.bleu_size)
            if translator is not None:
                with translator.use(job.config.lora, adapters.run_state(model, job.config.lora)) as merged:
                    lora = score_translations(merged, tokenizer, test, job.stop)
                if lora is not None and cfg.bleu_size not in base_cache:
                    with translator.use() as base_model:
                        base_cache[cfg.bleu_size] = score_translations(base_model, tokenizer, test)
            else:
                lora = score_translations(model, tokenizer, test, job.stop)
                if lora is not None and cfg.bleu_size not in base_cache:   # (full fine-tuning filled it before)
                    set_scale(model, 0.0)
                    try:
                        base_cache[cfg.bleu_size] = score_translations(model, tokenizer, test)
                    finally:
                        set_scale(model, 1.0)
            if lora is not None:
                job.quality = {"n": len(test), "split": "newstest2016", "base": base_cache[cfg.bleu_size],
                               "lora": lora}
    job.memory = mem.figures()
    job.status, job.phase = outcome, ""
    job.version += 1
    job.save()
    notify()


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


# ---------------------------------------------------------------------------
# The lab
# ---------------------------------------------------------------------------

def clone_model(loaded: LoadedModel, precision: str = "fp32"):
    """A second model with the loaded model's weights, in ``precision``; no disk I/O."""
    if lora_layers(loaded.model):
        raise ValueError("clone the base model before any adapter is added to it")
    return copy_model(loaded.model, precision)


class Lab:
    def __init__(self, loaded: LoadedModel, runs_dir: Path | str = "runs", data_source: str = "auto",
                 strategy=None, precision: str | None = None):
        self.loaded = loaded
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.data_source = data_source
        self.strategy = strategy                        # a tf.distribute strategy, or None for one device
        # Training computes in ``precision`` (app.py: --precision; default: the loaded model's);
        # translation always uses a float32 model, into which requests merge adapters.
        self.precision = resolve_precision(precision) if precision else model_precision(loaded.model)
        if model_precision(loaded.model) != "fp32":
            raise ValueError("load the model in float32 and pass precision= to Lab: the translator needs the "
                             "float32 weights, and a bf16 model holds them rounded")
        # One model per training slot (LORA_LAB_TRAIN_SLOTS, default 1); LoRA is injected per run.
        # In float32, slot 0 trains the loaded model and a copy translates; in bf16 the loaded model
        # translates and every slot trains a bf16 copy (1.5x the float32 weights in all, not 2x).
        self.slots = limits().train_slots
        if self.precision == "fp32":
            self.translator = clone_model(loaded)
            self.trainers = [loaded.model] + [clone_model(loaded) for _ in range(self.slots - 1)]
        else:
            self.translator = loaded.model
            self.trainers = [clone_model(loaded, self.precision) for _ in range(self.slots)]
        self.trainer = self.trainers[0]
        self.translate_lock = threading.Lock()          # one request at a time merges into the translator
        # runs translate their samples and BLEU sentences through the same translator and lock
        self.merged = adapters.MergedTranslator(self.translator, self.translate_lock)
        self.jobs: dict[str, Job] = {}
        self.pending: queue.Queue[Job] = queue.Queue()
        self.waiting: list[str] = []                    # job ids in queue order
        self.lock = threading.Lock()                    # guards jobs / waiting
        self._pairs: dict[tuple, data.Pairs] = {}
        self._exports: Path | None = None               # downloads made on request (CSV, reports): export_path
        self._base_scores: dict[int, dict] = {}
        self._base_norms: dict[str, float] | None = None   # ‖W‖_F per kernel, for anatomy
        self._kernels: dict | None = None                    # W per kernel (float64), for analysis
        self._connection_keys: OrderedDict[str, str] = OrderedDict()   # API connection -> its owner key
        self._load_records()
        self.workers = [threading.Thread(target=self._work, args=(model,), daemon=True, name=f"lora-train-{i}")
                        for i, model in enumerate(self.trainers)]
        for worker in self.workers:
            worker.start()

    def _load_records(self) -> None:
        for run_dir in sorted(p for p in self.runs_dir.iterdir() if (p / RECORD).is_file()):
            try:
                job = Job.load(run_dir)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("skipping unreadable run record %s: %s", run_dir, exc)
                continue
            self.jobs[job.id] = job  # listed even if trained on another base model; see translate()
        log.info("loaded %d run records from %s", len(self.jobs), self.runs_dir)

    def connection_key(self, connection: str) -> str:
        """The owner key of an API connection that did not present one (kept in memory only)."""
        with self.lock:
            key = self._connection_keys.pop(connection, None) or owners.new_key()
            self._connection_keys[connection] = key
            while len(self._connection_keys) > CONNECTIONS_KEPT:
                self._connection_keys.popitem(last=False)
            return key

    # -- data ----------------------------------------------------------------
    def pairs(self, split: str, n: int, dataset: str = "europarl") -> data.Pairs:
        key = (split, n, dataset)
        if key not in self._pairs:
            self._pairs[key] = data.pairs_for(split, n, dataset, source=self.data_source)
        return self._pairs[key]

    # -- downloads made on request ---------------------------------------------
    EXPORT_TTL_S = 3600   # a CSV or report file is kept this long (Gradio serves its own copy of it)

    def export_path(self, name: str) -> Path:
        """A fresh path for a file the user asked for, in this server's export folder; files older than
        EXPORT_TTL_S are removed first, and the folder goes when the process exits."""
        if self._exports is None:
            self._exports = Path(tempfile.mkdtemp(prefix="lora-lab-exports-"))
            import atexit

            atexit.register(shutil.rmtree, self._exports, True)
        now = time.time()
        for old in self._exports.iterdir():
            if now - old.stat().st_mtime > self.EXPORT_TTL_S:
                shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=self._exports)) / name

    def report(self, jobs: list["Job"]) -> Path:
        """The self-contained HTML report of ``jobs`` (report.py), as a file to download."""
        from . import report

        if not jobs:
            raise ConfigError("no runs to report yet: train one first")
        return report.write([j.dir for j in jobs], self.export_path("lora_lab_report.html"))

    # -- jobs ----------------------------------------------------------------
    def _room_for(self, session: str, n: int) -> None:
        """Refuse (with what to do) when ``session`` would keep more runs than the deployment allows, or
        have more queued or running at once (on a shared Space one visitor's 50 runs would hold it for hours)."""
        lim = limits()
        mine = self.runs(session)
        if len(mine) + n > lim.max_runs_per_session:
            raise ConfigError(f"this session keeps at most {lim.max_runs_per_session} runs "
                              f"(LORA_LAB_MAX_RUNS_PER_SESSION) and has {len(mine)}; delete runs you no longer need "
                              f"(section 5, after downloading what you want to keep) to make room for {n} more")
        active = sum(j.status in ("queued", "running") for j in mine)
        if active + n > lim.max_queued_per_session:
            raise ConfigError(f"this session may have at most {lim.max_queued_per_session} runs queued or running "
                              f"at once (LORA_LAB_MAX_QUEUED_PER_SESSION) and has {active}; {n} more would pass "
                              "it: wait for some to finish, or stop them")

    def check(self, config: RunConfig) -> None:
        """What only this model can tell about a config, before it is queued (ConfigError says what)."""
        lora = config.lora
        if lora.method == "loraplus" and config.train.optimizer != "adamw":
            raise ConfigError("LoRA+ is built on AdamW here (as PEFT's loraplus optimiser usually is); choose adamw")
        if not lora.adapter:
            return
        sites = {s.path: s for s in dense_sites(self.translator)}   # the translator never carries LoRA layers
        chosen = select_paths(list(sites), lora)
        if lora.method == "pissa":
            small = min(min(getattr(sites[p].owner, sites[p].attr).kernel.shape) for p in chosen)
            if lora.rank > small:
                raise ConfigError(f"PiSSA takes r singular vectors of each weight; the smallest adapted weight here "
                                  f"has {small}, so r can be at most {small}, got {lora.rank}")

    def submit(self, config: RunConfig, session: str = "", sweep: str = "") -> Job:
        self.check(config)
        if not sweep:
            self._room_for(session, 1)
        job = Job.new(config, session, self.runs_dir, sweep=sweep)
        job.prediction = self.predict(config)
        job.dir.mkdir(parents=True)
        (job.dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        job.save()
        with self.lock:
            self.jobs[job.id] = job
            self.waiting.append(job.id)
        self.pending.put(job)
        return job

    def submit_sweep(self, config: RunConfig, ranks: list[int], session: str = "",
                     seeds: list[int] | None = None, methods: list[str] | None = None,
                     lrs: dict[str, float] | None = None) -> list[Job]:
        """The same config at each rank (and with each of ``methods``: full fine-tuning once, having no
        rank), once per seed (default: the config's own seed); queued back to back, method by method,
        rank by rank. ``lrs``: learning rates per method instead of the config's. Runs with the same
        seed share the data order and A's initialisation."""
        seeds, methods, lrs = seeds or [config.train.seed], methods or [config.lora.method], lrs or {}
        configs = [replace(config, lora=replace(config.lora, rank=r, method=m),
                           train=replace(config.train, seed=sd, lr=lrs.get(m, config.train.lr)))
                   for m in methods for r in (ranks[:1] if m == "full" else ranks) for sd in seeds]
        for c in configs:   # each config checked before any is queued (e.g. a PiSSA rank too large)
            self.check(c)
        self._room_for(session, len(configs))
        sweep = "sweep-" + time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
        return [self.submit(c, session, sweep=sweep) for c in configs]

    def resume(self, run_id: str, session: str | None, steps: int | None = None) -> Job:
        """Queue a stopped, interrupted or ended run of ``session`` again, from its newest checkpoint to
        ``steps`` (default: its planned steps; more goes beyond them). The record keeps every step up to
        the checkpoint and notes where it resumed; the steps after it are trained again."""
        job = self.session_job(run_id, session)
        if job.status not in ("stopped", "interrupted", "completed", "failed") or not job.done.is_set():
            raise ConfigError(f"run {job.id} is {job.status}: only a stopped, interrupted or ended run can be resumed")
        if job.config.model != self.loaded.name:
            raise ConfigError(f"run {job.id} was trained on {job.config.model}; this server runs {self.loaded.name}")
        ckpt = checkpoints.latest(job.dir)
        if ckpt is None:
            every = job.config.train.checkpoint_every
            raise ConfigError(f"run {job.id} has no checkpoint to resume from ("
                              + (f"it saves one every {every} steps and ended before its first, or they were pruned"
                                 if every else "it was trained with checkpoints off") + "); train it again instead")
        planned = job.config.train.steps
        steps = planned if steps is None or steps == 0 else steps
        if steps <= ckpt.step:
            raise ConfigError(f"run {job.id}'s newest checkpoint is at step {ckpt.step}: resume to more steps than "
                              f"that (it planned {planned})")
        config = replace(job.config, train=replace(job.config.train, steps=steps))   # checks the step limit
        with self.lock:
            was = job.status
            job.config, job.resume_from = config, ckpt
            job.stop, job.done = threading.Event(), threading.Event()
            job.status, job.phase, job.outcome, job.error, job.quality, job.adapter = "queued", "", "", "", None, None
            event = RunResumed(ckpt.step, was, steps)
            job.log_event(event)
            job.apply(event)
            (job.dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            job.save()
            self.waiting.append(job.id)
        self.pending.put(job)
        return job

    def prune_checkpoints(self, job: Job) -> None:
        """Keep the checkpoints of ``job``'s session under LORA_LAB_MAX_CHECKPOINT_MB (prune_checkpoints)."""
        with self.lock:
            owned = sorted((j for j in self.jobs.values() if j.owner == job.owner), key=lambda j: j.created)
        prune_checkpoints(owned, job)

    def predict(self, config: RunConfig) -> dict:
        """The budget of ``config`` on this server's model, step time from its latest finished run."""
        with self.lock:
            history = [j.record() for j in self.jobs.values() if j.config.model == self.loaded.name
                       and j.status in ("completed", "stopped") and j.device.endswith(self.precision)]
        return budget.predict(self.loaded.model.config, config.lora, config.train, history, self.precision)

    def position(self, job: Job) -> int:
        """1 = next to run; 0 = not waiting."""
        with self.lock:
            return self.waiting.index(job.id) + 1 if job.id in self.waiting else 0

    def expected_wait(self, job: Job) -> float | None:
        """Seconds until ``job`` starts, if every run before it has an estimate: the running runs' ETAs (at
        the pace of their last steps) and, for the runs ahead in line, the budget's predicted step time times
        their steps. Shared by the training slots. None while any of them has none (nothing is guessed)."""
        with self.lock:
            if job.id not in self.waiting:
                return None
            ahead = [self.jobs[i] for i in self.waiting[:self.waiting.index(job.id)]]
            running = [j for j in self.jobs.values() if j.status == "running"]
        total = 0.0
        for j in running:
            eta = j.eta_s()
            if eta is None:
                return None
            total += eta
        for j in ahead:
            step = ((j.prediction or {}).get("lora") or {}).get("step_s_est")
            if not step:
                return None
            total += step * j.config.train.steps
        return total / self.slots

    def stop(self, run_id: str) -> Job | None:
        """Stop one run, or every unfinished run of a sweep when given a sweep id."""
        job = self.jobs.get(run_id)
        targets = [job] if job else [j for j in self.jobs.values() if j.sweep and j.sweep == run_id]
        for j in targets:
            j.stop.set()
        return job or (targets[0] if targets else None)

    def runs(self, session: str | None = None) -> list[Job]:
        """Runs of one session (or all, with None), oldest first."""
        jobs = [j for j in self.jobs.values() if session is None or j.owned_by(session)]
        return sorted(jobs, key=lambda j: j.created)

    def delete(self, run_id: str, session: str | None) -> Job:
        """Remove a finished run of ``session`` and its directory (an explicit user action)."""
        import shutil

        job = self.session_job(run_id, session)
        if not job.done.is_set() and job.status in ("queued", "running"):
            raise ConfigError(f"run {run_id!r} is still {job.status}; stop it first")
        with self.lock:
            self.jobs.pop(job.id, None)
        if job.dir.resolve().parent == self.runs_dir.resolve():   # never anything outside the runs dir
            shutil.rmtree(job.dir, ignore_errors=True)
        return job

    def _work(self, trainer) -> None:
        while True:
            job = self.pending.get()
            with self.lock:
                self.waiting.remove(job.id)
            try:
                if job.stop.is_set():
                    job.status, job.error = "stopped", "stopped while waiting in the queue"
                    job.save()
                else:
                    execute(job, trainer, self.loaded.tokenizer, self.pairs, self._base_scores,
                            strategy=self.strategy, translator=self.merged, on_checkpoint=self.prune_checkpoints)
            except Exception as exc:  # never let one job kill the worker; the record says what happened
                log.exception("job %s crashed", job.id)
                job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
                job.save()
            finally:
                remove_lora(trainer)
                job.version += 1
                job.done.set()

    # -- translation ---------------------------------------------------------
    def adapter_of(self, job: Job) -> dict | None:
        if job.adapter is None and job.adapter_files and job.status != "failed":
            state = adapters.load_state(job.dir)  # a run recorded before this server started
            if not job.config.lora.adapter:       # a whole model's weights: read from disk when needed
                return state
            job.adapter = state
        return job.adapter

    def session_job(self, run_id: str, session: str | None) -> Job:
        """Run ``run_id`` if it exists and belongs to ``session`` (any session with None)."""
        job = self.jobs.get(run_id or "")
        if job is None:
            raise ConfigError(f"no run {run_id!r} on this server" if run_id else "choose a run first")
        if session is not None and not job.owned_by(session):
            raise ConfigError(f"run {run_id!r} belongs to another session")
        return job

    def owned(self, run_id: str, session: str | None) -> Job:
        """A run of ``session`` (any session with None) that has an adapter this server can use."""
        job = self.session_job(run_id, session)
        if job.config.model != self.loaded.name:
            raise ConfigError(f"run {run_id!r} was trained on {job.config.model}; this server runs "
                              f"{self.loaded.name}")
        if self.adapter_of(job) is None:
            raise ConfigError(f"run {run_id!r} has no usable adapter (status: {job.status})")
        return job

    # -- adapters in and out ---------------------------------------------------
    def import_adapter(self, sources, session: str = "", name: str = "") -> Job:
        """Validate an uploaded adapter against the base model and keep it as a run of ``session``.

        Everything is checked before anything is written, and what is written is the validated
        arrays (re-serialised), never the uploaded bytes, and only inside the runs directory.
        """
        self._room_for(session, 1)
        adapter = adapters.read_adapter(sources)
        cfg = adapters.check_fits(adapter, self.translator, self.loaded.name)
        job = Job.new(RunConfig(model=self.loaded.name, lora=cfg), session, self.runs_dir)
        job.status, job.params = "imported", preview(self.loaded.model.config, cfg).to_dict()
        job.origin = {"kind": "imported", "file": name, "base_model": adapter.base_model,
                      "notices": adapter.notices, "described": adapters.describe(adapter)}
        adapters.write_adapter(adapter.state, cfg, adapter.base_model or self.loaded.name, job.dir)
        job.adapter_files = {"bytes": (job.dir / adapters.WEIGHTS_FILE).stat().st_size}
        job.adapter = adapter.state
        job.save()
        job.done.set()
        with self.lock:
            self.jobs[job.id] = job
        return job

    def _export_dir(self, job: Job) -> Path:
        """Downloads are built inside the run's own directory, so nothing is written outside the runs
        directory and a deleted run takes its exports with it."""
        out = job.dir / "exports"
        out.mkdir(exist_ok=True)
        return out

    def adapter_zip(self, run_id: str, session: str | None = None) -> Path:
        """A zip of the run's PEFT adapter directory (for download; upload it back to import it)."""
        job = self.owned(run_id, session)
        if not job.config.lora.adapter:
            raise ConfigError(f"run {job.id} is full fine-tuning: there is no adapter, only the whole model. "
                              "Download the merged checkpoint instead")
        return adapters.zip_dir(job.dir, self._export_dir(job) / f"lora-lab-adapter-{job.id}.zip",
                                only=(adapters.CONFIG_FILE, adapters.WEIGHTS_FILE))

    def export_merged(self, run_id: str, session: str | None = None) -> Path:
        """A zip of a full TF checkpoint with the run's adapter merged in (``save_pretrained``)."""
        import shutil

        job = self.owned(run_id, session)
        out = self._export_dir(job) / f"lora-lab-merged-{job.id}"
        shutil.rmtree(out, ignore_errors=True)
        with self.translate_lock:   # the translator's kernels carry the adapter only inside this block
            adapters.export_merged(self.translator, self.loaded.tokenizer, job.config.lora, self.adapter_of(job),
                                   out, source={"run_id": job.id, "base_model": self.loaded.name})
        try:
            return adapters.zip_dir(out, out.with_suffix(".zip"), compress=False)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def translate(self, sentences: list[str], run_id: str | None = None, scale: float = 1.0,
                  session: str | None = None, keep: dict | None = None) -> tuple[list[str], list[str]]:
        """(base, LoRA) German for each sentence, with run ``run_id``'s adapter at ``scale``.
        ``keep`` (anatomy.switch_off's sides / blocks / modules) leaves only part of the adapter on."""
        job = self.owned(run_id, session) if run_id else None
        with self.translate_lock:
            base = translate(self.translator, self.loaded.tokenizer, sentences)
            if job is None:
                return base, list(base)
            state = self.adapter_of(job)
            if keep:
                if not job.config.lora.adapter:
                    raise ConfigError("switching parts off works on adapters; full fine-tuning changed every weight")
                state = anatomy.switch_off(state, **keep)
            with adapters.merged_into(self.translator, job.config.lora, state, scale):
                return base, translate(self.translator, self.loaded.tokenizer, sentences)

    # -- inside the adapter ----------------------------------------------------
    def inspect(self, run_id: str, session: str | None = None) -> dict:
        """anatomy.inspect of a run's adapter, with ‖W‖ from this server's base model."""
        job = self.owned(run_id, session)
        if not job.config.lora.adapter:
            raise ConfigError(f"run {job.id} is full fine-tuning: it has no low-rank factors to take apart. "
                              "Measure what it learned and forgot (below) for its magnitude, direction and "
                              "intruder figures")
        if self._base_norms is None:
            self._base_norms = anatomy.base_norms(self.translator)
        return {"run_id": job.id, **anatomy.inspect(job.config.lora, self.adapter_of(job), self._base_norms)}

    def analyse(self, run_id: str, session: str | None = None) -> dict:
        """What the run learned and forgot, from its weights (analysis.py): the held-out and de→en losses
        as its scale goes 0 → 1, the truncation curve (adapters), and per layer ‖ΔW‖/‖W‖, magnitude and
        direction change and intruder dimensions beside a random control. Measured once per run and
        kept in its directory (analysis.json)."""
        from . import analysis

        job = self.owned(run_id, session)
        path = job.dir / "analysis.json"
        if path.is_file():
            with contextlib.suppress(ValueError, OSError):
                return json.loads(path.read_text())
        cfg = job.config
        with self.translate_lock:   # the translator carries the update only inside each measurement
            if self._kernels is None:
                self._kernels = analysis.kernels(self.translator)
            batches = analysis.probe_batches(self.loaded.tokenizer, cfg.train)
            state = self.adapter_of(job)
            result = {"run_id": job.id, "method": cfg.lora.method,
                      "forget_name": f"{data.HELDOUT_NAMES[cfg.train.data]}, de→en",
                      "scale_curve": analysis.scale_curve(self.translator, cfg.lora, state, batches),
                      "truncation": (analysis.truncation_curve(self.translator, cfg.lora, state, batches)
                                     if cfg.lora.adapter else []),
                      "layers": analysis.layer_report(cfg.lora, state, self._kernels, seed=cfg.train.seed)}
        path.write_text(json.dumps(result) + "\n")
        return result

    def analysed(self, job: Job) -> dict | None:
        """The run's analysis if it has been measured."""
        path = job.dir / "analysis.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (ValueError, OSError):
            return None

    def similarity(self, run_a: str, run_b: str, session: str | None = None) -> dict:
        a, b = self.owned(run_a, session), self.owned(run_b, session)
        sim = anatomy.similarity(a.config.lora, self.adapter_of(a), b.config.lora, self.adapter_of(b))
        if not sim["layers"]:
            raise ConfigError(f"runs {a.id} and {b.id} adapt no layer in common")
        return {"runs": [a.id, b.id], **sim}

    def budget(self, run_id: str, session: str | None = None) -> dict:
        """The run's predicted budget (made when it was queued) beside what it measured."""
        job = self.owned(run_id, session)
        if not job.prediction:
            raise ConfigError(f"run {job.id} has no prediction (it was imported or recorded before predictions)")
        meas = budget.measured(job.record(), adapters.tensor_bytes(job.dir))
        return {"run_id": job.id, "predicted": job.prediction, "measured": meas,
                "rows": budget.side_by_side(job.prediction, meas)}

    # -- what the app and the API ask of the lab -------------------------------
    @property
    def depth(self) -> int:
        """Blocks in the shallower stack: the block range a config may name."""
        cfg = self.loaded.model.config
        return min(cfg.num_layers, cfg.num_decoder_layers or cfg.num_layers)

    def modules(self) -> list[str]:
        """The target modules this model has, in canonical order."""
        found = {MODULE_PATH.match(s.path)["module"] for s in dense_sites(self.loaded.model)}
        return [m for m in MODULES if m in found]

    def adapted_layers(self, lora: LoraConfig) -> int:
        return len(select_paths([site.path for site in dense_sites(self.loaded.model)], lora))

    def lora_config(self, rank, alpha, targets, side, first_layer, last_layer, method: str = "lora",
                    loraplus_ratio: float = 16.0) -> LoraConfig:
        """A config from form values; a block range covering every block means all of them (None)."""
        last = self.depth - 1 if last_layer is None or last_layer == -1 else last_layer
        first = 0 if first_layer is None else first_layer
        layers = None if (first, last) == (0, self.depth - 1) else (first, last)
        return LoraConfig(rank=rank, alpha=alpha, targets=targets if targets is not None else (), side=side,
                          layers=layers, method=method or "lora",
                          loraplus_ratio=16.0 if loraplus_ratio is None else loraplus_ratio)

    def run_config(self, lora: LoraConfig, steps, batch_size, lr, train_size, seed, optimizer, bleu_size,
                   **more) -> RunConfig:
        """``more``: further TrainConfig fields (data, eval_every, early_stop, samples, ...); None = default."""
        more = {k: v for k, v in more.items() if v is not None}
        return RunConfig(model=self.loaded.name, lora=lora,
                         train=TrainConfig(steps=steps, batch_size=batch_size, lr=lr, train_size=train_size,
                                           seed=seed, optimizer=optimizer, bleu_size=bleu_size, **more))

    def usable(self, job: Job) -> bool:
        """Whether translate, download and inspect can use this run's adapter."""
        return bool(job.adapter_files) and job.status != "failed" and job.config.model == self.loaded.name

    def status(self, job: Job) -> dict:
        """Everything a client needs about a job, as plain values."""
        last = job.losses[-1] if job.losses else None
        return {"run_id": job.id, "sweep": job.sweep, "method": job.config.lora.method, "rank": job.config.lora.rank,
                "status": job.status,
                "phase": job.phase, "queue_position": self.position(job), "wait_s": self.expected_wait(job),
                "total_steps": job.config.train.steps,
                "step": last[0] if last else 0, "loss": last[1] if last else None,
                "tokens_per_s": job.summary.get("last_tokens_per_s"), "elapsed_s": job.summary.get("elapsed_s", 0.0),
                "eta_s": job.eta_s(), "losses": [[s, v] for s, v, _ in job.losses], "val_losses": job.val_losses,
                "heldout_losses": job.heldout_losses, "heldout_name": data.HELDOUT_NAMES[job.config.train.data],
                "seed": job.config.train.seed,
                "samples": {"english": list(job.config.train.samples), "by_step": job.samples},
                "summary": {k: v for k, v in job.summary.items() if k != "last_tokens_per_s"},
                "quality": job.quality, "memory": job.memory, "error": job.error,
                "checkpoint_every": job.config.train.checkpoint_every,
                "checkpoint_steps": [c.step for c in checkpoints.listed(job.dir)],
                "resumes": job.resumes, "notices": job.notices[-3:]}

    def watch(self, job: Job, poll_s: float = 0.4):
        """Poll a job until it ends, yielding its status whenever something changed."""
        seen = None
        while True:
            done = job.done.is_set()
            key = (job.version, job.status, self.position(job))
            if key != seen:
                seen = key
                yield self.status(job)
            if done:
                return
            job.done.wait(poll_s)

    def translate_request(self, text, run_id: str, scale, session: str, reference: str = "",
                          keep: dict | None = None) -> dict:
        """A translate request as the app and the API make it: cleaned lines, base and LoRA German (by
        default with this session's newest usable run), notices, and per-sentence chrF when reference
        German is given one line per sentence."""
        sentences, notices = clean_sentences(text)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= float(scale) <= 2.0:
            raise ConfigError(f"LoRA scale must be between 0 and 2, got {scale!r}")
        if run_id:
            job = self.jobs.get(run_id)
            if job is None:
                raise ConfigError(f"no run {run_id!r}")
        else:
            usable = [j for j in self.runs(session) if self.usable(j)]
            job = usable[-1] if usable else None
            if job is None:
                notices.append("no trained adapter in this session yet: an untrained LoRA equals the base model "
                               "exactly")
        base, lora = self.translate(sentences, job.id if job else None, float(scale), session=session, keep=keep)
        if keep and job is not None:
            notices.append(anatomy.describe_keep(keep))
        out = {"english": sentences, "base": base, "lora": lora, "run_id": job.id if job else "",
               "notices": notices, "chrf_base": None, "chrf_lora": None}
        refs = [" ".join(r.split()) for r in (reference or "").splitlines() if r.strip()]
        if refs and len(refs) != len(sentences):
            notices.append(f"{len(refs)} reference lines for {len(sentences)} sentences: chrF needs one per line")
        elif refs:
            out["chrf_base"] = [round(sentence_chrf(h, r), 2) for h, r in zip(base, refs)]
            out["chrf_lora"] = [round(sentence_chrf(h, r), 2) for h, r in zip(lora, refs)]
        return out
