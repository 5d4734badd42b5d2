"""train(): LoRA fine-tuning of a TF T5 as an iterator of typed events. No gradio here.

It reads like the run it performs: prepare the data (prepare.py), attach the adapter and its
compiled steps, loop over steps (stop, faults, evaluation, samples.py), then summarise. The loss and
steps are in steps.py, the optimisers in optimisers.py; the compiled steps, their background tracing
and their reuse by later runs with the same shapes in compiled.py; more than one device in
distribute.py.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import tensorflow as tf

from lora_demo.core.config import ConfigError, RunConfig, TrainConfig
from lora_demo.core.events import CheckpointSaved, EvalLogged, Event, RunFailed, RunFinished, RunStarted, StepLogged
from lora_demo.core.inject import apply_lora, lora_layers, reattach
from lora_demo.core.lora import DropoutClock, step_dropout
from lora_demo.core.models import device_info, model_precision, variable_device
from lora_demo.core.params import breakdown, specs_from_model
from lora_demo.training import checkpoints, compiled
from lora_demo.training.distribute import make_distributed_step, topology
from lora_demo.training.faults import failure, inject_fault, injected_fault
from lora_demo.training.optimisers import (WarmupConstant, build_optimizer_state, make_optimizer,
                                           optimizer_state_bytes, reset_optimizer)
from lora_demo.training.prepare import Prepared, prepare
from lora_demo.training.samples import Samples
from lora_demo.training.steps import base_and_lora, count_tokens, eval_loss, make_eval, make_preview, make_step


@dataclass
class Attached:
    """The adapter on the model and everything that steps it: optimiser, eager and traced functions."""

    layers: list
    variables: list
    opt: object
    schedule: WarmupConstant
    step: object                   # the eager (or, under a strategy, distributed) step
    eval: object                   # the eager eval function
    to_trace: dict                 # name -> (tf.function, spec), traced after the first step
    key: tuple | None              # compile-cache key; None when not reusable
    reused: bool                   # the compiled functions came from an earlier run
    preview: object = None         # the first step's loss by an eager forward pass (one device: steps.make_preview)
    tracer: compiled.BackgroundTrace | None = None

    def compiled_step(self, strategy, stop):
        """The traced step once ready (waits for the trace), or None for the eager one."""
        return self.tracer.wait("step", stop) if self.tracer is not None and strategy is None else None

    def eval_fn(self):
        return (self.tracer.get("eval") if self.tracer is not None else None) or self.eval

    def start_trace(self, strategy) -> None:
        # only after the first step: tracing beside the first eager step slows it badly
        if self.tracer is None:
            self.tracer = compiled.BackgroundTrace(self.to_trace if strategy is None else
                                                   {"eval": self.to_trace["eval"]})

    def finish(self, model) -> None:
        """Never leave a trace running against layers the next run replaces; keep a complete trace."""
        if self.tracer is None:
            return
        self.tracer.join()
        if self.key is not None and not self.reused and self.tracer.complete:
            compiled.store(model, self.key, compiled.Compiled(self.layers, self.variables, self.opt, self.schedule,
                                                              self.tracer.concrete))


def attach(model, run: RunConfig, clock: DropoutClock, prepared: Prepared, strategy) -> Attached:
    """A fresh adapter (or a reset one from an earlier run with the same shapes) and its steps.

    Everything random follows the seed explicitly (A's initialiser, the data order, the dropout
    clock). tf.random.set_seed is not called: it clears TensorFlow's function caches, and the first
    call of a reused step would pay to instantiate it again."""
    cfg = run.train
    specs = {"step": compiled.spec(prepared.first, prepared.dynamic),
             "eval": compiled.spec(prepared.val[0], prepared.dynamic)}
    key = compiled.cache_key(model, run, specs["step"], specs["eval"]) if strategy is None else None
    cached = compiled.lookup(model, key)
    # adapter and optimiser state beside the base weights, or mirrored under a strategy
    with strategy.scope() if strategy is not None else tf.device(variable_device(model)):
        if cached is not None:
            layers, variables = reattach(model, cached.layers, run.lora.alpha, cfg.seed), cached.variables
            opt, schedule = cached.opt, cached.schedule
            reset_optimizer(opt, schedule, cfg)
        else:
            if run.lora.adapter:
                layers = apply_lora(model, run.lora, seed=cfg.seed, clock=clock)
                variables = [v for layer in layers for v in layer.trained]
            else:   # full fine-tuning: every weight of the model (a copy made for the run: lab/execute.py)
                if lora_layers(model):
                    raise ConfigError("full fine-tuning needs a model without LoRA layers")
                layers, variables = [], list(model.trainable_weights)
                if len(variables) < len(model.weights):
                    raise ConfigError("full fine-tuning needs a model whose weights are all trainable (a fresh copy)")
            opt, schedule = make_optimizer(cfg, run.lora, [layer.lora_B for layer in layers])
            build_optimizer_state(opt, variables)
    step = (make_step(model, opt, variables, cfg.clip_norm, clock) if strategy is None else   # traced on first call
            make_distributed_step(strategy, model, opt, variables, cfg.clip_norm, clock))
    evaluate = make_eval(model)
    attached = Attached(layers, variables, opt, schedule, step, evaluate,
                        {"step": (tf.function(step, autograph=False), specs["step"]),
                         "eval": (tf.function(evaluate, autograph=False), specs["eval"])},
                        key, cached is not None, make_preview(model, clock) if strategy is None else None)
    if cached is not None:
        attached.tracer = compiled.BackgroundTrace.ready(cached.concrete)
    return attached


@dataclass
class Progress:
    """What the loop has measured so far."""

    step: int = 0
    losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)     # (step, loss); step 0 is the base model
    heldout_losses: list = field(default_factory=list)  # (step, loss); step 0 is the base model
    stop_reason: str = ""
    step_times: list = field(default_factory=list)     # compiled steps only
    tokens: int = 0                # real (non-pad) source and target tokens trained on
    slots: int = 0                 # token positions computed, padding included
    eager_steps: int = 0
    first_loss_s: float | None = None
    stopped: bool = False
    base: dict = field(default_factory=dict)   # full fine-tuning: the base model's losses, before step 1
    start: int = 0                 # the checkpoint step a resumed run continues from (0: from the start)
    saved: int = 0                 # the step of the newest checkpoint

    KEPT = ("losses", "val_losses", "heldout_losses", "step_times", "tokens", "slots", "eager_steps", "base")

    def state(self, elapsed_s: float) -> dict:
        """What a checkpoint keeps of the loop's measurements."""
        return {**{k: getattr(self, k) for k in self.KEPT}, "elapsed_s": elapsed_s}

    @classmethod
    def resumed(cls, state: dict) -> "Progress":
        p = cls(**{k: state[k] for k in cls.KEPT})
        p.val_losses = [tuple(x) for x in p.val_losses]
        p.heldout_losses = [tuple(x) for x in p.heldout_losses]
        p.start = p.saved = p.step = state["step"]
        return p


def loop(run: RunConfig, model, prepared: Prepared, att: Attached, progress: Progress, t0: float,
         stop: threading.Event | None, strategy, fault: tuple[str, int] | None,
         samples: "Samples | None" = None, batch: dict | None = None, checkpoint=None) -> Iterator[Event]:
    """The steps: stop checks, the step, faults, the loss event, every eval_every the held-out and
    validation losses, the sample translations and the early-stopping rule, and every checkpoint_every
    a checkpoint (``checkpoint(step)``, which yields its event). A resumed run starts after
    ``progress.start`` with ``batch``, the batch of that step."""
    cfg, batch = run.train, prepared.first if batch is None else batch
    pending = None   # a batch whose loss came from the preview: its update runs before anything else
    for step in range(progress.start + 1, cfg.steps + 1):
        progress.step = step
        fn = None if _stopping(stop) else att.compiled_step(strategy, stop)
        if pending is not None:   # compiled once traced; eagerly if the run stopped during the trace
            (fn or att.step)(pending)
            pending = None
        if _stopping(stop):
            progress.stopped = True
            progress.stop_reason = f"stopped by the user after {step - 1} steps"
            return
        evaluating = step % cfg.eval_every == 0 or step == cfg.steps
        saving = checkpoint is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0
        ts = time.perf_counter()
        if fn is None and att.preview is not None and not (evaluating or saving):
            loss, grad_norm, pending = att.preview(batch), None, batch   # the first loss, at once and lean
        else:
            loss, grad_norm = (float(x) for x in np.asarray((fn or att.step)(batch)))
        loss = inject_fault(fault, step, loss)
        dt = time.perf_counter() - ts
        if not math.isfinite(loss):
            yield RunFailed(step, f"the loss became {'NaN' if math.isnan(loss) else 'infinite'} at step {step}",
                            f"lower the learning rate (it is {cfg.lr:g}; try {cfg.lr / 10:g}) "
                            "and keep gradient clipping on")
            return
        is_compiled, n_tok, elapsed = _count(progress, att, batch, loss, dt, t0, fn, strategy, samples,
                                             step < cfg.steps)
        yield StepLogged(step, loss, float(att.schedule(step - 1)), n_tok, n_tok / dt, elapsed, is_compiled,
                         grad_norm)
        if evaluating:
            yield from _evaluate(model, att, prepared, progress, step, t0)
            if samples is not None:
                yield from samples.log(step, t0)
        if saving:
            yield from checkpoint(step)   # after the evaluation: a resumed run does not repeat it
        if evaluating and _no_longer_improving(progress, cfg.early_stop) and step < cfg.steps:
            best_step, best = min((progress.heldout_losses or progress.val_losses)[1:], key=lambda x: x[1])
            progress.stop_reason = (f"early stopping after step {step}: the held-out loss has not improved "
                                    f"for {cfg.early_stop} evaluations (best {best:.4f} at step {best_step}; "
                                    "the adapter is the one of the last step)")
            return
        if step < cfg.steps:
            batch = next(prepared.batches, None)
            if batch is None:   # a finite stream ran out: the run ends here, complete
                if pending is not None:
                    (att.compiled_step(strategy, None) or att.step)(pending)
                progress.stop_reason = f"the training data stream ended after {step} steps"
                return
    progress.stop_reason = f"all {cfg.steps} steps"


def _count(progress: Progress, att: Attached, batch: dict, loss: float, dt: float, t0: float, fn, strategy,
           samples, more: bool) -> tuple[bool, int, float]:
    """Record one step's loss, tokens and time; after the first, start tracing (``more``: steps follow).
    Returns (whether the step ran compiled, its tokens, the run's elapsed seconds)."""
    is_compiled = fn is not None or (strategy is not None and progress.step > 1)   # step 1 includes the trace
    progress.eager_steps += fn is None and strategy is None
    if is_compiled:
        progress.step_times.append(dt)
    n_tok = count_tokens(batch)
    progress.tokens += n_tok
    progress.slots += batch["input_ids"].size + batch["labels"].size
    progress.losses.append(loss)
    elapsed = time.perf_counter() - t0
    if progress.first_loss_s is None:
        progress.first_loss_s = elapsed
        if more:
            att.start_trace(strategy)
            if samples is not None:
                samples.warm_up(after=att.tracer)
    return is_compiled, n_tok, elapsed


def _no_longer_improving(progress: Progress, patience: int) -> bool:
    """Early stopping: the last ``patience`` held-out losses of the adapter are all above its best
    earlier one (the base model's point, step 0, does not count). Without a held-out slice, the
    validation loss decides."""
    points = [v for _, v in (progress.heldout_losses or progress.val_losses)[1:]]
    return patience > 0 and len(points) > patience and min(points[-patience:]) >= min(points[:-patience])


def _stopping(stop: threading.Event | None) -> bool:
    return stop is not None and stop.is_set()


def _evaluate(model, att: Attached, prepared: Prepared, progress: Progress, step: int, t0: float):
    """Held-out and validation loss now; the first time also the base model's (step 0)."""
    fn, held = att.eval_fn(), prepared.heldout
    if not progress.val_losses:   # the base model's point: the adapter at scale 0 is the base exactly
        base_val, now_val = base_and_lora(model, fn, prepared.val, progress.base.get("val"))
        base_held, now_held = base_and_lora(model, fn, held, progress.base.get("held")) if held else (None, None)
        progress.val_losses.append((0, base_val))
        if held:
            progress.heldout_losses.append((0, base_held))
        yield EvalLogged(0, base_val, time.perf_counter() - t0, base_held)
    else:
        now_val, now_held = eval_loss(fn, prepared.val), eval_loss(fn, held) if held else None
    progress.val_losses.append((step, now_val))
    if held:
        progress.heldout_losses.append((step, now_held))
    yield EvalLogged(step, now_val, time.perf_counter() - t0, now_held)


def _checkpoint(out_dir, step: int, att: Attached, progress: Progress, t0: float) -> Iterator[Event]:
    """Save the run's state at ``step`` (its adapter, optimiser and measurements) and say so."""
    ckpt = checkpoints.save(out_dir, step, att.variables, att.opt, progress.state(time.perf_counter() - t0))
    progress.saved = step
    yield CheckpointSaved(step, ckpt.arrays.name, ckpt.bytes)


def _fresh_clock(model, seed: int) -> DropoutClock:
    """The model's dropout clock, set for a new run: masks are keyed on (seed, step)."""
    clock = step_dropout(model)
    clock.seed.assign(seed)
    clock.step.assign(0)
    return clock


def _base_losses(att: Attached, prepared: Prepared) -> dict[str, float]:
    """Full fine-tuning's base-model losses, before its first step changes the model."""
    return {name: eval_loss(att.eval, batches) for name, batches in
            (("val", prepared.val), ("held", prepared.heldout), ("probe", prepared.probe), ("forget", prepared.forget))
            if batches}


def _restore(resume: "checkpoints.Checkpoint", att: Attached, clock: DropoutClock, prepared: Prepared,
             strategy) -> dict:
    """Put back the adapter, the optimiser, the dropout clock and the data position of ``resume``;
    the batch of its next step."""
    checkpoints.restore(resume, att.variables, att.opt)
    clock.step.assign(resume.step)
    batch = prepared.first
    for _ in range(resume.step):
        batch = next(prepared.batches, None)
        if batch is None:
            raise ConfigError(f"the training data ends before step {resume.step + 1}; it cannot resume")
    att.start_trace(strategy)   # every resumed step compiled, as the uninterrupted run's after step 1
    return batch


def summarise(model, prepared: Prepared, att: Attached, p: Progress, t0: float, cfg: TrainConfig,
              data_origin: str, strategy) -> dict:
    probe_base, probe_final = (base_and_lora(model, att.eval_fn(), prepared.probe, p.base.get("probe"))
                               if p.losses else (None, None))
    forget_base, forget_final = (base_and_lora(model, att.eval_fn(), prepared.forget, p.base.get("forget"))
                                 if p.losses else (None, None))
    elapsed = time.perf_counter() - t0
    return {
        "steps_done": len(p.losses),
        "first_loss": float(np.mean(p.losses[:5])) if p.losses else None,   # mean of the first 5 steps
        "final_loss": float(np.mean(p.losses[-5:])) if p.losses else None,  # mean of the last 5 steps
        # the honest "did it learn": one fixed set of training pairs, base vs LoRA, token-weighted
        "probe_pairs": prepared.probe_pairs, "probe_loss_base": probe_base, "probe_loss_final": probe_final,
        # what it forgot: the held-out sentences translated the other way (de→en), never trained on
        "forget_name": prepared.forget_name, "base_forget_loss": forget_base, "final_forget_loss": forget_final,
        "val_name": prepared.val_name,
        "base_val_loss": p.val_losses[0][1] if p.val_losses else None,
        "final_val_loss": p.val_losses[-1][1] if len(p.val_losses) > 1 else None,
        # the learning signal: a fixed held-out slice of the training distribution, never trained on
        "heldout_name": prepared.heldout_name, "heldout_pairs": prepared.heldout_pairs,
        "base_heldout_loss": p.heldout_losses[0][1] if p.heldout_losses else None,
        "final_heldout_loss": p.heldout_losses[-1][1] if len(p.heldout_losses) > 1 else None,
        "best_heldout": min(p.heldout_losses[1:], key=lambda x: x[1]) if len(p.heldout_losses) > 1 else None,
        "stop_reason": p.stop_reason,
        "elapsed_s": elapsed, "first_loss_s": p.first_loss_s, "eager_steps": p.eager_steps,
        "trace_s": sum(att.tracer.seconds) if att.tracer is not None and att.tracer.seconds else None,
        "reused_trace": att.reused,
        "mean_step_s": float(np.mean(p.step_times)) if p.step_times else None,
        "tokens_per_s": p.tokens / elapsed if elapsed else 0.0, "data_origin": data_origin,
        "padding_pct": 100.0 * (1 - p.tokens / p.slots) if p.slots else None,   # of the positions computed
        "pairs_seen": len(p.losses) * cfg.batch_size,
        "optimizer_state_bytes": optimizer_state_bytes(att.opt),
        "resumed_from": p.start or None, "checkpoint_every": cfg.checkpoint_every,
        **topology(strategy),   # strategy, workers and replicas that took part
    }


def train(run: RunConfig, model, tokenizer, train_pairs, val_pairs, heldout_pairs=None,
          stop: threading.Event | None = None, data_origin: str = "bundled", strategy=None,
          translator=None, checkpoint_dir=None, resume: "checkpoints.Checkpoint | None" = None) -> Iterator[Event]:
    """Add a fresh adapter to ``model`` as ``run.lora`` says and train it; yield events as it goes.

    Ends with exactly one RunFinished (completed or stopped) or RunFailed. The base weights are
    never changed; the trained adapter stays in ``model``. With a ``strategy`` (distribute.py) the
    adapter and optimiser state are mirrored and each step splits the global batch across replicas.
    ``translator`` (lab.serving.Serving) translates the sample sentences, if given.
    With ``checkpoint_dir``, a checkpoint is saved there every ``checkpoint_every`` steps and at the end;
    with ``resume`` (one of them), the run continues after its step with the same losses as a run that
    was never interrupted (the adapter, optimiser, data position and dropout clock are restored).
    """
    t0, progress, att, samples = time.perf_counter(), Progress(), None, None
    try:
        if resume is not None:   # what the loop had measured (its losses, evaluations, the time it took)
            state = resume.state()
            progress = Progress.resumed(state)
            t0 -= state["elapsed_s"]
        fault = injected_fault(run.train.seed)
        clock = _fresh_clock(model, run.train.seed)
        # a distributed step is traced per input shape, so it gets one shape; one device gets any
        prepared = prepare(run.train, tokenizer, train_pairs, val_pairs, heldout_pairs,
                           dynamic=strategy is None and run.train.batching == "grouped")
        att = attach(model, run, clock, prepared, strategy)
        batch = _restore(resume, att, clock, prepared, strategy) if resume is not None else None
        if resume is None and not run.lora.adapter:   # no scale 0 to switch to later: the base model's losses now
            progress.base = _base_losses(att, prepared)
        if run.train.first_step == "compiled":   # no eager step: wait for the trace (less memory, later first loss)
            att.start_trace(strategy)
        if run.train.samples and strategy is None:
            samples = Samples(model, tokenizer, run.train.samples, run.lora, translator)
        yield RunStarted(config=run.to_dict(), params=breakdown(specs_from_model(model)).to_dict(),
                         device=f"{device_info()['name']}, {model_precision(model)}", data_origin=data_origin,
                         train_pairs=prepared.train_pairs, shapes=prepared.shapes)
        if samples is not None and resume is not None:
            samples.logged_base = True   # the record has the base model's German from the first start
        if samples is not None and not run.lora.adapter and translator is None and resume is None:
            yield from samples.log_base(t0)
        saving = None if checkpoint_dir is None else (
            lambda step: _checkpoint(checkpoint_dir, step, att, progress, t0))
        for event in loop(run, model, prepared, att, progress, t0, stop, strategy, fault, samples, batch, saving):
            yield event
            if isinstance(event, RunFailed):
                return
        if saving is not None and run.train.checkpoint_every and progress.losses \
                and progress.saved != len(progress.losses):   # the end too: a finished run can go on
            yield from saving(len(progress.losses))
        if samples is not None:
            samples.finish()
        yield RunFinished("stopped" if progress.stopped else "completed",
                          summarise(model, prepared, att, progress, t0, run.train, data_origin, strategy))
    except Exception as exc:
        yield failure(progress.step, exc)
    finally:
        if samples is not None:
            samples.finish()
        if att is not None:
            att.finish(model)
