"""Executing one run to the end: train it, keep its weights, score it, and leave a complete record.
Shared by the app's training workers and the command line, so both write the same record."""

from __future__ import annotations

import threading
import time

from lora_demo import adapters, data
from lora_demo.analysis.evaluate import (paired_change, paired_share_change, repetition_loop, scores, translate,
                                         word_shift)
from lora_demo.core.events import CheckpointSaved
from lora_demo.core.inject import at_scale, lora_layers, remove_lora
from lora_demo.core.models import copy_model, peak_gpu_mb, reset_gpu_peak
from lora_demo.lab.records import Job, prune_checkpoints
from lora_demo.training.samples import translating
from lora_demo.training.steps import best_temperature, first_choice, heldout_logits
from lora_demo.training.train import train

EVAL_BATCH = 16          # sentences per generate() call when scoring BLEU/chrF
EVAL_MAX_NEW_TOKENS = 128
CONFIDENCE_BATCH = 64    # held-out pairs per forward pass when measuring temperature and first choices


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


def translations(model, tokenizer, pairs: data.Pairs, stop: threading.Event | None = None) -> list[str] | None:
    """The model's greedy German for every pair of ``pairs``, as scoring decodes it; None if stopped part-way."""
    hyps: list[str] = []
    items = pairs.items
    for i in range(0, len(items), EVAL_BATCH):
        if stop is not None and stop.is_set():
            return None
        hyps += translate(model, tokenizer, [p.en for p in items[i:i + EVAL_BATCH]],
                          max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=EVAL_BATCH)
    return hyps


def cached(base_cache: dict, key: tuple, fn):
    """The base's figure under ``key``, computed by ``fn`` if nobody has (basecache.BaseCache: once, whoever
    asks first; a plain dict: here)."""
    if hasattr(base_cache, "compute"):
        return base_cache.compute(key, fn)
    if key not in base_cache:
        base_cache[key] = fn()
    return base_cache[key]


def quality_of(hyps: list[str], pairs: data.Pairs) -> dict:
    """BLEU and chrF of ``hyps`` against ``pairs``, and ``loops``: how many fell into a repetition loop
    (evaluate.repetition_loop)."""
    return {**scores(hyps, [p.de for p in pairs.items]), "loops": sum(bool(repetition_loop(h)) for h in hyps)}


def execute(job: Job, model, tokenizer, pairs_of, base_cache: dict, on_change=None, strategy=None,
            translator=None, on_checkpoint=None) -> None:
    """Run ``job`` to the end on ``model`` and leave a complete record in ``job.dir``.

    ``pairs_of(split, n, dataset)`` supplies data (data.pairs_for); ``base_cache`` (lab.basecache.BaseCache, or a
    dict) maps ("test", dataset, n) to the base model's German for the first n test pairs of that lesson, and
    each held-out slice's key to the base's temperature, first choices and losses (_confidence), filled on first need (the base never changes, so one cache
    serves every run on the same model). ``on_change(event)`` is called with each train() event, and with
    None when the phase changes. With a ``translator`` (lab.serving.Serving: the app's) the sample
    sentences and BLEU/chrF are translated by it, with the update merged in; without one, by the training
    model (training/samples.translating). A job with ``resume_from`` (Lab.resume) continues
    from that checkpoint; ``on_checkpoint(job)`` is called after each checkpoint is saved (by default the
    run's own checkpoints are kept under LORA_LAB_MAX_CHECKPOINT_MB)."""
    def notify(event=None):
        if on_change is not None:
            on_change(event)
    cfg = job.config.train
    job.status, job.phase = "running", "training"
    job.save()
    notify()
    full = not job.config.lora.adapter
    base_model = model   # (full fine-tuning trains a copy; an adapter run's base is this model at scale 0)
    with MemoryMonitor() as mem:
        if full:
            model = _full_copy(model, tokenizer, pairs_of, base_cache, cfg, translator)
        _train(job, model, tokenizer, pairs_of, strategy, translator, on_checkpoint, notify)
        outcome = job.outcome or "failed"
        _keep_weights(job, model, outcome, full)
        if outcome == "completed" and cfg.bleu_size > 0:
            job.phase = "evaluating"
            job.version += 1
            notify()
            _score(job, model, tokenizer, pairs_of("test", cfg.bleu_size, cfg.data), base_cache, translator)
            if job.quality is not None:
                job.quality.update(_confidence(job, base_model, model, tokenizer, pairs_of, base_cache))
    job.memory = mem.figures()
    job.status, job.phase, job.finished = outcome, "", time.time()
    job.version += 1
    job.save()
    notify()


def _full_copy(model, tokenizer, pairs_of, base_cache: dict, cfg, translator):
    """Full fine-tuning trains a float32 copy of the base (bf16 weights would round small updates away),
    so ``model`` and the translator stay the base for every later run. Without a translator the base is
    scored first: the copy is no longer the base once it trains."""
    remove_lora(model)
    if translator is not None:
        with translator.use() as base_model:
            return copy_model(base_model, "fp32")
    if cfg.bleu_size > 0:
        cached(base_cache, ("test", cfg.data, cfg.bleu_size),
               lambda: translations(model, tokenizer, pairs_of("test", cfg.bleu_size, cfg.data)))
    return copy_model(model, "fp32")


def _train(job: Job, model, tokenizer, pairs_of, strategy, translator, on_checkpoint, notify) -> None:
    """Every train() event of the run, logged, folded into the record and passed on."""
    cfg = job.config.train
    resume, job.resume_from = job.resume_from, None
    train_pairs, val_pairs = pairs_of("train", cfg.train_size, cfg.data), pairs_of("validation", cfg.eval_size, cfg.data)
    heldout = pairs_of("heldout", cfg.heldout_size, cfg.data)
    for event in train(job.config, model, tokenizer, train_pairs, val_pairs, heldout, stop=job.stop,
                       data_origin=train_pairs.origin, strategy=strategy, translator=translator,
                       checkpoint_dir=job.dir, resume=resume):
        job.log_event(event)
        job.apply(event)
        if isinstance(event, CheckpointSaved):
            (on_checkpoint or (lambda j: prune_checkpoints([j], j)))(job)
        notify(event)


def _keep_weights(job: Job, model, outcome: str, full: bool) -> None:
    """Kept on disk whatever the outcome; offered for translation only if the run did not fail (full
    fine-tuning's every weight is read from disk when used)."""
    if (lora_layers(model) or full) and job.losses:
        saved = adapters.save_run_state(model, job.config.lora, job.config.model, job.dir)
        job.adapter_files = {"bytes": saved.stat().st_size}
        if outcome != "failed" and not full:
            job.adapter = adapters.adapter_state(model)


def _score(job: Job, model, tokenizer, test: data.Pairs, base_cache: dict, translator) -> None:
    """BLEU and chrF of the run on ``test``, beside the base model's (translated once per size), whether
    the change is more than the luck of which sentences were scored (evaluate.paired_change), and the
    words whose count changed most (evaluate.word_shift)."""
    with translating(model, job.config.lora, translator) as trained:
        lora = translations(trained, tokenizer, test, job.stop)
    if lora is None:
        return
    cfg = job.config.train

    def base_german():   # (full fine-tuning without a translator filled it before training)
        with translating(model, job.config.lora, translator, base=True) as base_model:
            return translations(base_model, tokenizer, test)
    base, refs = cached(base_cache, ("test", cfg.data, cfg.bleu_size), base_german), [p.de for p in test.items]
    job.quality = {"n": len(test), "split": test.split, "base": quality_of(base, test),
                   "lora": quality_of(lora, test), "change": paired_change(base, lora, refs),
                   "words": word_shift(base, lora, refs)}


def _confidence(job: Job, base_model, trained, tokenizer, pairs_of, base_cache: dict) -> dict:
    """Readings of one teacher-forced pass over the held-out pairs, for the base and the trained model
    (the base's kept once per held-out slice). ``confidence``: the held-out loss of each at its best single
    softmax temperature (steps.best_temperature), how much of the run's held-out fall needs no change of
    the German. ``first_choice``: the share of target tokens each ranks first (steps.first_choice), with
    its paired bootstrap over the held-out sentences: the greedy German follows it, not the loss.
    ``heldout_change``: the held-out loss of both from the same pass (per token), with the same bootstrap:
    whether the run's fall is more than the luck of which sentences were held out. ``forget_change``: the
    same for the second curve's pairs (what the base knew), whether the run's rise there is more than it."""
    cfg = job.config.train

    def batches_of(split: str, n: int) -> list[dict]:
        arrays = data.encode(tokenizer, pairs_of(split, n, cfg.data), cfg.max_source_len, cfg.max_target_len)
        rows = len(arrays["labels"])
        return [{k: v[i:i + CONFIDENCE_BATCH] for k, v in arrays.items()} for i in range(0, rows, CONFIDENCE_BATCH)]

    def measure(model):
        kept = heldout_logits(model, held)
        return best_temperature(kept), first_choice(kept, held), first_choice(heldout_logits(model, knew), knew)

    held, knew = batches_of("heldout", cfg.heldout_size), batches_of("validation", cfg.eval_size)
    key = ("confidence", cfg.data, cfg.heldout_size, cfg.eval_size, cfg.max_source_len, cfg.max_target_len)
    def measure_base():
        with at_scale(base_model, 0.0):
            return measure(base_model)
    (base_t, base_first, base_knew), (lora_t, lora_first, lora_knew) = cached(base_cache, key, measure_base), \
        measure(trained)
    return {"confidence": {"base": base_t, "lora": lora_t},
            "first_choice": paired_share_change(base_first["right"], lora_first["right"], base_first["targets"]),
            "heldout_change": paired_share_change(base_first["nll"], lora_first["nll"], base_first["targets"]),
            "forget_change": paired_share_change(base_knew["nll"], lora_knew["nll"], base_knew["targets"])}
