"""The lab: one shared base model, a queue of training runs, and translation with any run.

A thin façade over five parts, each with one job:

- ``store.RunStore``: the records (``records.Job``, on disk under ``RUNS_DIR/<run_id>/``), owners and quotas;
- ``runqueue.RunQueue``: the training slots, their workers, queue positions, expected waits and stop;
- ``serving.Serving``: the float32 base model that translates for every run, and its lock;
- ``insight``: what a run's weights show (anatomy, learned and forgot, similarity, budget);
- ``exports``: files made for download.

Training runs on its own copy of the base model (one per slot), so translation keeps working while
a run trains; the base weights are never modified. ``execute.execute`` runs one job, for the app's
workers and the command line alike.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

from lora_demo import adapters, data
from lora_demo.analysis import anatomy, budget
from lora_demo.core.config import ConfigError, RunConfig, TrainConfig, limits
from lora_demo.core.events import RunResumed
from lora_demo.core.inject import dense_sites, lora_layers, select_paths
from lora_demo.core.models import LoadedModel, copy_model, model_precision, resolve_precision
from lora_demo.core.params import preview
from lora_demo.lab import exports, insight, requests
from lora_demo.lab.basecache import BaseCache, fingerprint
from lora_demo.lab.execute import EVAL_MAX_NEW_TOKENS, cached, execute, translations
from lora_demo.lab.records import Job
from lora_demo.lab.runqueue import RunQueue
from lora_demo.lab.serving import Serving
from lora_demo.lab.store import RunStore
from lora_demo.training import checkpoints


def clone_model(loaded: LoadedModel, precision: str = "fp32"):
    """A second model with the loaded model's weights, in ``precision``; no disk I/O."""
    if lora_layers(loaded.model):
        raise ValueError("clone the base model before any adapter is added to it")
    return copy_model(loaded.model, precision)


class Lab:
    def __init__(self, loaded: LoadedModel, runs_dir: Path | str = "runs", data_source: str = "auto",
                 strategy=None, precision: str | None = None, warm: bool = False):
        self.loaded, self.data_source, self.strategy = loaded, data_source, strategy   # strategy: tf.distribute
        # ``warm``: decode the base's German for the default run's test slice now, in the background (the app).
        # Training computes in ``precision`` (app.py: --precision; default: the loaded model's); translation
        # always uses a float32 model, into which requests merge adapters.
        self.precision = resolve_precision(precision) if precision else model_precision(loaded.model)
        if model_precision(loaded.model) != "fp32":
            raise ValueError("load the model in float32 and pass precision= to Lab: the translator needs the "
                             "float32 weights, and a bf16 model holds them rounded")
        # One model per training slot (LORA_LAB_TRAIN_SLOTS). In float32, slot 0 trains the loaded model and a
        # copy translates; in bf16 the loaded model translates and every slot trains a bf16 copy.
        slots = limits().train_slots
        if self.precision == "fp32":
            translator, trainers = clone_model(loaded), [loaded.model] + [clone_model(loaded) for _ in range(slots - 1)]
        else:
            translator, trainers = loaded.model, [clone_model(loaded, self.precision) for _ in range(slots)]
        self.serving = Serving(translator, loaded.tokenizer)
        self.store = RunStore(runs_dir)
        self.exports = exports.Exports()
        self._pairs: dict[tuple, data.Pairs] = {}
        # the base's German per lesson and test size (kept on disk), its temperature and first choices per slice
        self._base_cache = BaseCache(self.store.dir / ".cache", f"{fingerprint(translator)}-{EVAL_MAX_NEW_TOKENS}")
        self.queue = RunQueue(self.store, trainers, self._execute)
        if warm:
            threading.Thread(target=self._warm, daemon=True, name="base-german").start()

    def _warm(self) -> None:
        """The base's German for the default run's test slice, before anyone asks (a default run then
        finishes soon after it trains): read from disk, or decoded once by the translator."""
        cfg = TrainConfig()
        if cfg.bleu_size:
            test = self.pairs("test", cfg.bleu_size, cfg.data)
            with self.serving.use() as model:
                cached(self._base_cache, ("test", cfg.data, cfg.bleu_size),
                       lambda: translations(model, self.loaded.tokenizer, test))

    def _execute(self, job: Job, trainer) -> None:
        execute(job, trainer, self.loaded.tokenizer, self.pairs, self._base_cache, strategy=self.strategy,
                translator=self.serving, on_checkpoint=self.store.prune_checkpoints)

    # -- the parts, as the app and the API reach them ----------------------------
    runs_dir = property(lambda self: self.store.dir)
    jobs = property(lambda self: self.store.jobs)
    translator = property(lambda self: self.serving.model)
    trainers = property(lambda self: self.queue.trainers)
    slots = property(lambda self: self.queue.slots)

    def runs(self, session: str | None = None) -> list[Job]:
        return self.store.runs(session)

    def session_job(self, run_id: str, session: str | None) -> Job:
        return self.store.get(run_id, session)

    def delete(self, run_id: str, session: str | None) -> Job:
        return self.store.delete(run_id, session)

    def connection_key(self, connection: str) -> str:
        return self.store.connection_key(connection)

    def stop(self, run_id: str) -> Job | None:
        return self.queue.stop(run_id)

    def status(self, job: Job) -> dict:
        return self.queue.status(job)

    def pairs(self, split: str, n: int, dataset: str) -> data.Pairs:
        key = (split, n, dataset)
        if key not in self._pairs:
            self._pairs[key] = data.pairs_for(split, n, dataset, source=self.data_source)
        return self._pairs[key]

    # -- queueing runs ------------------------------------------------------------
    def check(self, config: RunConfig) -> None:
        """What only this model can tell about a config, before it is queued (ConfigError says what)."""
        lora = config.lora
        if lora.method != "pissa":
            return
        sites = {s.path: s for s in dense_sites(self.translator)}   # the translator never carries LoRA layers
        small = min(min(getattr(sites[p].owner, sites[p].attr).kernel.shape) for p in select_paths(list(sites), lora))
        if lora.rank > small:
            raise ConfigError(f"PiSSA takes r singular vectors of each weight; the smallest adapted weight here "
                              f"has {small}, so r can be at most {small}, got {lora.rank}")

    def predict(self, config: RunConfig) -> dict:
        """The budget of ``config`` on this server's model, step time from its latest finished run."""
        history = self.store.finished_on(self.loaded.name, self.precision)
        return budget.predict(self.loaded.model.config, config.lora, config.train, history, self.precision)

    def submit(self, config: RunConfig, session: str = "", sweep: str = "") -> Job:
        self.check(config)
        if not sweep:
            self.store.room_for(session, 1)
        job = Job.new(config, session, self.runs_dir, sweep=sweep)
        job.prediction = self.predict(config)
        job.dir.mkdir(parents=True)
        (job.dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        job.save()
        self.store.add(job)
        self.queue.put(job)
        return job

    def submit_sweep(self, configs: list[RunConfig], session: str = "") -> list[Job]:
        """``configs`` (config.expand_sweep) queued back to back as one sweep; each is checked before any
        is queued (e.g. a PiSSA rank too large)."""
        for c in configs:
            self.check(c)
        self.store.room_for(session, len(configs))
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
        with self.store.lock:
            was = job.status
            job.config, job.resume_from = config, ckpt
            job.stop, job.done = threading.Event(), threading.Event()
            job.status, job.phase, job.outcome, job.error, job.quality, job.adapter = "queued", "", "", "", None, None
            event = RunResumed(ckpt.step, was, steps)
            job.log_event(event)
            job.apply(event)
            (job.dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            job.save()
        self.queue.put(job)
        return job

    def watch(self, job: Job, poll_s: float = 0.4):
        return self.queue.watch(job, poll_s)

    # -- using a run's weights ----------------------------------------------------
    def adapter_of(self, job: Job) -> dict | None:
        if job.adapter is None and job.adapter_files and job.status != "failed":
            state = adapters.load_state(job.dir)  # a run recorded before this server started
            if not job.config.lora.adapter:       # a whole model's weights: read from disk when needed
                return state
            job.adapter = state
        return job.adapter

    def usable(self, job: Job) -> bool:
        """Whether translate, download and inspect can use this run's adapter."""
        return bool(job.adapter_files) and job.status != "failed" and job.config.model == self.loaded.name

    def owned(self, run_id: str, session: str | None) -> Job:
        """A run of ``session`` (any session with None) that has an adapter this server can use."""
        job = self.session_job(run_id, session)
        if job.config.model != self.loaded.name:
            raise ConfigError(f"run {run_id!r} was trained on {job.config.model}; this server runs "
                              f"{self.loaded.name}")
        if self.adapter_of(job) is None:
            raise ConfigError(f"run {run_id!r} has no usable adapter (status: {job.status})")
        return job

    def import_adapter(self, sources, session: str = "", name: str = "") -> Job:
        """Validate an uploaded adapter against the base model and keep it as a run of ``session``.

        Everything is checked before anything is written, and what is written is the validated
        arrays (re-serialised), never the uploaded bytes, and only inside the runs directory."""
        self.store.room_for(session, 1)
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
        self.store.add(job)
        return job

    def adapter_zip(self, run_id: str, session: str | None = None) -> Path:
        return exports.adapter_zip(self.owned(run_id, session))

    def export_merged(self, run_id: str, session: str | None = None) -> Path:
        job = self.owned(run_id, session)
        return exports.merged_zip(job, self.adapter_of(job), self.serving, self.loaded.name)

    def export_path(self, name: str) -> Path:
        return self.exports.path(name)

    def report(self, jobs: list[Job]) -> Path:
        return self.exports.report(jobs)

    def translate(self, sentences: list[str], run_id: str | None = None, scale: float = 1.0,
                  session: str | None = None, keep: dict | None = None) -> tuple[list[str], list[str]]:
        """(base, LoRA) German for each sentence, with run ``run_id``'s adapter at ``scale``.
        ``keep`` (anatomy.switch_off's sides / blocks / modules) leaves only part of the adapter on."""
        if not run_id:
            return self.serving.translate(sentences)
        base, (lora,) = self.translate_runs(sentences, [run_id], scale, session, keep)
        return base, lora

    def translate_runs(self, sentences: list[str], run_ids: list[str], scale: float = 1.0,
                       session: str | None = None, keep: dict | None = None,
                       max_new_tokens: int = 64) -> tuple[list[str], list[list[str]]]:
        """The base German and one column per run, each run's adapters in one batched decode with the base."""
        updates = []
        for run_id in run_ids:
            job = self.owned(run_id, session)
            state = self.adapter_of(job)
            if keep:
                if not job.config.lora.adapter:
                    raise ConfigError("switching parts off works on adapters; full fine-tuning changed every weight")
                state = anatomy.switch_off(state, **keep)
            updates.append((job.config.lora, state, scale))
        return self.serving.translate_many(sentences, updates, max_new_tokens)

    def inspect(self, run_id: str, session: str | None = None) -> dict:
        job = self.owned(run_id, session)
        return insight.inspect(job, self.adapter_of(job), self.serving)

    def analyse(self, run_id: str, session: str | None = None) -> dict:
        job = self.owned(run_id, session)
        return insight.analyse(job, self.adapter_of(job), self.serving)

    def similarity(self, run_a: str, run_b: str, session: str | None = None) -> dict:
        a, b = self.owned(run_a, session), self.owned(run_b, session)
        return insight.similarity(a, self.adapter_of(a), b, self.adapter_of(b))

    def budget(self, run_id: str, session: str | None = None) -> dict:
        return insight.budget_of(self.owned(run_id, session))

    def translate_request(self, text, run_id: str, scale, session: str, reference: str = "",
                          keep: dict | None = None, beside: list[str] | None = None) -> dict:
        """A translate request as the app and the API make it (see requests.translate_request)."""
        return requests.translate_request(self, text, run_id, scale, session, reference, keep, beside)
