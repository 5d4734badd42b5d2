"""train(): LoRA fine-tuning of a TF T5 as an iterator of typed events. No gradio here.

It reads like the run it performs: prepare the data, attach the adapter and its compiled steps,
loop over steps (stop, faults, evaluation), then summarise. The compiled steps, their background
tracing and their reuse by later runs with the same shapes are in compiled.py; the strategies for
more than one device in distribute.py.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import tensorflow as tf

from . import checkpoints, compiled, data
from .config import ConfigError, RunConfig, TrainConfig
from .distribute import make_strategy, topology  # noqa: F401  (make_strategy: re-exported)
from .events import (CheckpointSaved, EvalLogged, Event, RunFailed, RunFinished, RunStarted, SamplesLogged,
                     StepLogged)
from .inject import apply_lora, lora_layers, reattach, set_scale
from .lora import DropoutClock, step_dropout
from .models import device_info, model_precision, variable_device
from .params import breakdown, specs_from_model

# ---------------------------------------------------------------------------
# Optimisers: AdamW from Keras, the rest from tensorflow-addons when it imports
# ---------------------------------------------------------------------------

try:  # tensorflow-addons is end-of-life and has no wheels for Python 3.12+
    import tensorflow_addons as tfa
except Exception:  # pragma: no cover - depends on the interpreter
    tfa = None

OPTIMIZER_LABELS = {
    "adamw": "AdamW",
    "radam": "RectifiedAdam (tensorflow-addons)",
    "lamb": "LAMB (tensorflow-addons)",
    "lookahead_adamw": "Lookahead(AdamW) (tensorflow-addons)",
}


def available_optimizers() -> list[str]:
    return ["adamw"] + (["radam", "lamb", "lookahead_adamw"] if tfa is not None else [])


class WarmupConstant(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up over ``warmup`` steps, then constant: short runs want the full rate soon.

    Both are variables, so a compiled step reused by a run with another rate needs no retrace."""

    def __init__(self, lr: float, warmup: int):
        self.lr = tf.Variable(float(lr), trainable=False, dtype=tf.float32, name="lr")
        self.warmup = tf.Variable(float(warmup), trainable=False, dtype=tf.float32, name="warmup_steps")

    def set(self, lr: float, warmup: int) -> None:
        self.lr.assign(float(lr))
        self.warmup.assign(float(warmup))

    def __call__(self, step):
        step = tf.cast(step, tf.float32) + 1.0
        return self.lr * tf.minimum(1.0, step / tf.maximum(1.0, self.warmup))

    def get_config(self):
        return {"lr": float(self.lr.numpy()), "warmup": int(self.warmup.numpy())}


class ScaledSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Another schedule times a fixed ratio (LoRA+'s rate for B)."""

    def __init__(self, schedule, ratio: float):
        self.schedule, self.ratio = schedule, float(ratio)

    def __call__(self, step):
        return self.schedule(step) * self.ratio

    def get_config(self):
        return {"ratio": self.ratio, **self.schedule.get_config()}


class LoraPlus:
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B learns ``ratio`` times faster than A.

    Two optimisers of the same kind, one per group, so each variable gets its own learning rate with
    its own moments: PEFT's ``create_loraplus_optimizer`` does the same with two parameter groups.
    (Scaling B's gradients instead would do nothing under Adam, which divides the scale out.)"""

    def __init__(self, make, schedule, ratio: float, fast: list):
        self.slow, self.fast = make(schedule), make(ScaledSchedule(schedule, ratio))
        self.fast_ids = {id(v) for v in fast}

    def _split(self, pairs):
        pairs = list(pairs)
        return ([(g, v) for g, v in pairs if id(v) not in self.fast_ids],
                [(g, v) for g, v in pairs if id(v) in self.fast_ids])

    def build(self, variables) -> None:
        slow, fast = self._split((None, v) for v in variables)
        self.slow.build([v for _, v in slow])
        self.fast.build([v for _, v in fast])

    def apply_gradients(self, grads_and_vars, **kwargs):
        slow, fast = self._split(grads_and_vars)
        self.slow.apply_gradients(slow, **kwargs)
        return self.fast.apply_gradients(fast, **kwargs)

    @property
    def variables(self) -> list:
        return list(self.slow.variables) + list(self.fast.variables)


def make_optimizer(cfg: TrainConfig, lora=None, fast: list | None = None):
    """(optimiser, its learning-rate schedule). With ``lora.method == "loraplus"`` the variables in
    ``fast`` (the B factors) get ``lora.loraplus_ratio`` times the rate."""
    if cfg.optimizer not in available_optimizers():
        raise ConfigError(f"optimizer {cfg.optimizer!r} needs tensorflow-addons, which is not installed here; "
                          f"available: {', '.join(available_optimizers())}")
    lr = WarmupConstant(cfg.lr, cfg.warmup_steps)
    if lora is not None and lora.method == "loraplus":
        if cfg.optimizer != "adamw":
            raise ConfigError("LoRA+ is built on AdamW here (as PEFT's loraplus optimiser usually is); "
                              "choose the adamw optimizer")
        return LoraPlus(lambda rate: tf.keras.optimizers.AdamW(rate, weight_decay=cfg.weight_decay), lr,
                        lora.loraplus_ratio, fast or []), lr
    if cfg.optimizer == "adamw":
        opt = tf.keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "radam":
        opt = tfa.optimizers.RectifiedAdam(lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "lamb":
        opt = tfa.optimizers.LAMB(lr, weight_decay=cfg.weight_decay)
    else:
        opt = tfa.optimizers.Lookahead(tfa.optimizers.AdamW(weight_decay=cfg.weight_decay, learning_rate=lr))
    return opt, lr   # the rate of step i is lr(i - 1), exactly


def build_optimizer_state(opt, variables) -> None:
    """Create slots before any step, so no variable is created inside a trace or by two threads."""
    if hasattr(opt, "build") and not hasattr(opt, "_create_all_weights"):
        opt.build(variables)
    else:  # legacy (tensorflow-addons) optimisers
        opt._create_all_weights(variables)


# ---------------------------------------------------------------------------
# Loss and step
# ---------------------------------------------------------------------------

def token_losses(model, batch, training: bool):
    """(sum of token cross-entropies, number of target tokens) over non-pad targets, in float32.

    The LM head and the softmax over the vocabulary run only on the target positions that count:
    the decoder's states at non-pad labels are gathered first, so padding costs no head FLOPs and
    no (positions x vocabulary) logits are kept for the backward pass. The result equals the loss
    over full logits with the padding masked out."""
    labels = batch["labels"]                                              # (B, T) with -100 padding
    mask = batch["attention_mask"]
    encoded = model.encoder(batch["input_ids"], attention_mask=mask, training=training)[0]
    states = model.decoder(model._shift_right(labels), encoder_hidden_states=encoded, encoder_attention_mask=mask,
                           use_cache=False, training=training)[0]       # (B, T, d)
    where = tf.where(labels != -100)                                      # (N, 2): the real targets
    states = tf.gather_nd(states, where)                                  # (N, d)
    if model.config.tie_word_embeddings:   # as TFT5ForConditionalGeneration.call does it
        logits = tf.matmul(states * (model.model_dim ** -0.5), tf.cast(model.shared.embeddings, states.dtype),
                           transpose_b=True)
    else:
        logits = model.lm_head(states)                                    # (N, vocab)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.gather_nd(labels, where), tf.cast(logits, tf.float32))
    return tf.reduce_sum(ce), tf.cast(tf.shape(where)[0], tf.float32)


def seq2seq_loss(model, batch, training: bool):
    """Mean token cross-entropy of one batch: the training objective."""
    total, count = token_losses(model, batch, training)
    return total / tf.maximum(count, 1.0)


@contextlib.contextmanager
def _tape(variables):
    """A tape that watches only the weights being trained. By default a tape watches every trainable
    variable it reads, and the frozen base weights are still tf.Variables marked trainable; an eager
    step would then record and differentiate toward all of them (gradients nobody uses, held until
    the backward pass ends). Compiled steps prune that work either way."""
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(variables)
        yield tape


def make_step(model, opt, variables, clip_norm: float, clock: DropoutClock | None = None):
    def step(batch):
        if clock is not None:   # the dropout masks of this step are keyed on the step number
            clock.step.assign_add(1)
        with _tape(variables) as tape:
            loss = seq2seq_loss(model, batch, training=True)
        grads = tape.gradient(loss, variables)
        if clip_norm > 0:
            grads, norm = tf.clip_by_global_norm(grads, clip_norm)   # norm: before clipping
        else:
            norm = tf.linalg.global_norm(grads)
        opt.apply_gradients(zip(grads, variables))
        return tf.stack([loss, tf.cast(norm, loss.dtype)])   # (loss, gradient norm)
    return step


def make_eval(model):
    def evaluate(batch):
        return token_losses(model, batch, training=False)
    return evaluate


# ---------------------------------------------------------------------------
# Scale-out: the same step under a tf.distribute strategy
# ---------------------------------------------------------------------------

def make_distributed_step(strategy, model, opt, variables, clip_norm: float, clock: DropoutClock | None = None):
    """One step of the global batch, split across replicas. Each replica's loss is its token
    cross-entropy sum over the *global* token count, so the summed loss and gradients equal the
    one-device step's; gradients are all-reduced before clipping, as on one device."""
    def replica_step(batch, global_tokens):
        with _tape(variables) as tape:
            total, _ = token_losses(model, batch, training=True)
            loss = total / global_tokens
        grads = tape.gradient(loss, variables)
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
        if clip_norm > 0:
            grads, norm = tf.clip_by_global_norm(grads, clip_norm)
        else:
            norm = tf.linalg.global_norm(grads)
        opt.apply_gradients(zip(grads, variables), skip_gradients_aggregation=True)
        return loss, norm

    def step(per_replica, global_tokens):
        if clock is not None:
            clock.step.assign_add(1)
        losses, norms = strategy.run(replica_step, args=(per_replica, global_tokens))
        # every replica holds the same all-reduced gradients, so the mean of the norms is the norm
        return tf.stack([strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None),
                         strategy.reduce(tf.distribute.ReduceOp.MEAN, norms, axis=None)])

    fn = tf.function(step, autograph=False)

    def run(batch):
        n = strategy.num_replicas_in_sync
        size = len(batch["input_ids"])
        if size % n:
            raise ConfigError(f"batch size {size} does not split evenly over {n} replicas; use a multiple of {n}")
        part = size // n
        per_replica = strategy.experimental_distribute_values_from_function(
            lambda ctx: {k: tf.constant(v[ctx.replica_id_in_sync_group * part:
                                           (ctx.replica_id_in_sync_group + 1) * part]) for k, v in batch.items()})
        tokens = tf.constant(max(float((batch["labels"] != -100).sum()), 1.0), tf.float32)
        return fn(per_replica, tokens)
    return run


def reset_optimizer(opt, schedule: WarmupConstant, cfg: TrainConfig) -> None:
    """Back to a freshly built AdamW: iteration 0, zero moments, this run's rate and warm-up."""
    for v in opt.variables:
        v.assign(tf.zeros(v.shape, v.dtype))
    schedule.set(cfg.lr, cfg.warmup_steps)


def optimizer_state_bytes(opt) -> int:
    """Bytes of the optimiser's per-weight state (moments, slow weights); scalar counters excluded."""
    return int(sum(v.shape.num_elements() * v.dtype.size for v in checkpoints.optimizer_variables(opt)
                   if v.shape.rank))


def _tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())


# ---------------------------------------------------------------------------
# Faults and evaluation
# ---------------------------------------------------------------------------

def _failure(step: int, exc: BaseException) -> RunFailed:
    if isinstance(exc, (tf.errors.ResourceExhaustedError, MemoryError)):
        return RunFailed(step, f"out of memory at step {step}",
                         "lower the batch size or the rank, shorten max lengths, or use a smaller model")
    if isinstance(exc, ConfigError):
        return RunFailed(step, str(exc), "fix the setting named above and train again")
    if isinstance(exc, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)):
        return RunFailed(step, f"another worker of the cluster stopped answering at step {step} (it ended, or the "
                               f"network between the workers failed)",
                         "start the same command again on every worker; the steps logged so far are kept")
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return RunFailed(step, f"training stopped by an error at step {step}: {type(exc).__name__}: {first}",
                     "this is a bug or an unsupported setting; try the defaults, and report it if it persists")


FAULT_ENV = "LORA_LAB_FAULT"


def injected_fault(seed: int) -> tuple[str, int] | None:
    """A fault to inject into runs with this seed, from ``LORA_LAB_FAULT`` (testing aid).

    The variable is a comma-separated list of ``KIND@STEP/SEED`` with KIND one of ``oom``, ``nan``
    or ``error``, e.g. ``oom@2/101,nan@3/102``: a run whose seed is SEED meets that fault at step
    STEP. It is read from the server's environment only, so no client can trigger it.
    """
    for spec in filter(None, (p.strip() for p in os.environ.get(FAULT_ENV, "").split(","))):
        try:
            kind, rest = spec.split("@")
            at, only = rest.split("/")
            if kind in ("oom", "nan", "error") and int(only) == seed:
                return kind, int(at)
        except ValueError:
            raise ConfigError(f"{FAULT_ENV} entry {spec!r} must look like oom@2/101 (kind@step/seed)") from None
    return None


def _inject(fault: tuple[str, int] | None, step: int, loss: float) -> float:
    if fault is None or fault[1] != step:
        return loss
    if fault[0] == "oom":
        raise tf.errors.ResourceExhaustedError(None, None, f"OOM when allocating tensor (injected at step {step})")
    if fault[0] == "error":
        raise RuntimeError(f"injected failure at step {step}")
    return float("nan")


def _eval_loss(fn, batches) -> float:
    """Token-weighted mean loss over a fixed set of batches (exact, unlike a mean of batch means)."""
    sums = np.array([[float(x) for x in fn(b)] for b in batches])
    return float(sums[:, 0].sum() / max(sums[:, 1].sum(), 1.0))


def _base_and_lora(model, fn, batches, base: float | None = None) -> tuple[float, float]:
    """The same loss with the adapter at scale 0 (the base model, exactly) and at scale 1. With
    ``base`` (full fine-tuning: measured before the first step) only the second is measured."""
    if base is not None:
        return base, _eval_loss(fn, batches)
    set_scale(model, 0.0)
    try:
        base = _eval_loss(fn, batches)
    finally:
        set_scale(model, 1.0)
    return base, _eval_loss(fn, batches)


# ---------------------------------------------------------------------------
# The run: prepare, attach, loop, summarise
# ---------------------------------------------------------------------------

PROBE_PAIRS = 32  # training pairs whose loss is measured before and after, on the same tokens


@dataclass
class Prepared:
    """The run's data, encoded. ``dynamic``: batches of similar-length rows, each trimmed to its
    longest row, for functions traced once for any length; else every batch padded to one shape
    (a distributed step is traced per shape)."""

    batches: Iterator[dict]        # training batches, in the seed's order
    first: dict                    # the first of them (it fixes the traced shapes)
    val: list[dict]                # the validation slice (newstest2015)
    heldout: list[dict]            # the held-out slice of the training distribution
    heldout_name: str
    heldout_pairs: int
    probe: list[dict]              # fixed training pairs, scored before and after
    probe_pairs: int
    forget: list[dict]             # the held-out pairs reversed (de→en): the forgetting probe
    forget_name: str
    train_pairs: int | None        # None for a stream
    shapes: dict
    dynamic: bool = False


def prepare(cfg: TrainConfig, tokenizer, train_pairs, val_pairs, heldout_pairs, dynamic: bool = True) -> Prepared:
    """Encode the pairs. A stream is read as needed: the probe is its head, batches are encoded on
    the fly and padded to the maximum lengths, since its longest pair is unknown (then trimmed, if
    ``dynamic``)."""
    streamed = isinstance(train_pairs, data.Stream)
    if streamed:
        pairs_iter = iter(train_pairs)
        head = list(itertools.islice(pairs_iter, PROBE_PAIRS))
        if len(head) < cfg.batch_size:
            raise ConfigError(f"the training stream ({train_pairs.origin}) ended after {len(head)} pairs; "
                              f"a batch needs {cfg.batch_size}")
        arrays = data.encode(tokenizer, head, cfg.max_source_len, cfg.max_target_len)
    else:
        arrays = data.encode(tokenizer, train_pairs, cfg.max_source_len, cfg.max_target_len)
    val = data.encode(tokenizer, val_pairs, cfg.max_source_len, cfg.max_target_len)
    held = data.encode(tokenizer, heldout_pairs if heldout_pairs else val_pairs, cfg.max_source_len,
                       cfg.max_target_len)   # (no held-out pairs: no held-out curve; the shapes stay as they were)
    reverse = data.reversed_pairs(heldout_pairs if heldout_pairs else val_pairs)
    back = data.encode(tokenizer, reverse, cfg.max_source_len, cfg.max_target_len)
    # With fixed shapes, one shape for train, validation, held-out and probe batches: each function is
    # traced once. (Trimmed batches are cut from these.)
    lengths = ((cfg.max_source_len, cfg.max_target_len) if streamed else
               (max(a["input_ids"].shape[1] for a in (arrays, val, held, back)),
                max(a["labels"].shape[1] for a in (arrays, val, held, back))))
    arrays, val, held, back = (data.pad_to(a, *lengths, tokenizer.pad_token_id) for a in (arrays, val, held, back))
    probe = {k: v[:PROBE_PAIRS] for k, v in arrays.items()}
    if streamed:
        batches = data.stream_batches(tokenizer, itertools.chain(head, pairs_iter), cfg.batch_size, *lengths, cfg.seed,
                                      trimmed=dynamic)
    else:
        batches = (data.grouped_batches if dynamic else data.batches)(arrays, cfg.batch_size, cfg.seed)

    def fixed(a):
        return data.fixed_batches(a, cfg.batch_size, tokenizer.pad_token_id, trimmed=dynamic)
    return Prepared(batches=batches, first=next(batches), val=fixed(val), heldout=fixed(held) if heldout_pairs else [],
                    heldout_name=getattr(heldout_pairs, "split", "held-out") if heldout_pairs else "",
                    heldout_pairs=len(held["input_ids"]) if heldout_pairs else 0,
                    probe=fixed(probe), probe_pairs=len(probe["input_ids"]),
                    forget=fixed(back), forget_name=reverse.split,
                    train_pairs=None if streamed else len(arrays["input_ids"]),
                    shapes={"source_len": arrays["input_ids"].shape[1], "target_len": arrays["labels"].shape[1],
                            "batching": "length-grouped, each batch trimmed to its longest row" if dynamic else
                                        "every batch padded to the longest row of the data"},
                    dynamic=dynamic)


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
            else:   # full fine-tuning: every weight of the model (a copy made for the run: see runs.execute)
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
                        key, cached is not None)
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
    for step in range(progress.start + 1, cfg.steps + 1):
        progress.step = step
        fn = None if _stopping(stop) else att.compiled_step(strategy, stop)
        if _stopping(stop):
            progress.stopped = True
            progress.stop_reason = f"stopped by the user after {step - 1} steps"
            return
        ts = time.perf_counter()
        loss, grad_norm = (float(x) for x in np.asarray((fn or att.step)(batch)))
        loss = _inject(fault, step, loss)
        dt = time.perf_counter() - ts
        if not math.isfinite(loss):
            yield RunFailed(step, f"the loss became {'NaN' if math.isnan(loss) else 'infinite'} at step {step}",
                            f"lower the learning rate (it is {cfg.lr:g}; try {cfg.lr / 10:g}) "
                            "and keep gradient clipping on")
            return
        is_compiled = fn is not None or (strategy is not None and step > 1)   # step 1 includes the trace
        progress.eager_steps += fn is None and strategy is None
        if is_compiled:
            progress.step_times.append(dt)
        n_tok = _tokens(batch)
        progress.tokens += n_tok
        progress.slots += batch["input_ids"].size + batch["labels"].size
        progress.losses.append(loss)
        elapsed = time.perf_counter() - t0
        if progress.first_loss_s is None:
            progress.first_loss_s = elapsed
            if step < cfg.steps:
                att.start_trace(strategy)
                if samples is not None:
                    samples.warm_up()
        yield StepLogged(step, loss, float(att.schedule(step - 1)), n_tok, n_tok / dt, elapsed, is_compiled,
                         grad_norm)
        evaluating = step % cfg.eval_every == 0 or step == cfg.steps
        if evaluating:
            yield from _evaluate(model, att, prepared, progress, step, t0)
            if samples is not None:
                yield from samples.log(step, t0)
        if checkpoint is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
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
                progress.stop_reason = f"the training data stream ended after {step} steps"
                return
    progress.stop_reason = f"all {cfg.steps} steps"


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
        base_val, now_val = _base_and_lora(model, fn, prepared.val, progress.base.get("val"))
        base_held, now_held = _base_and_lora(model, fn, held, progress.base.get("held")) if held else (None, None)
        progress.val_losses.append((0, base_val))
        if held:
            progress.heldout_losses.append((0, base_held))
        yield EvalLogged(0, base_val, time.perf_counter() - t0, base_held)
    else:
        now_val, now_held = _eval_loss(fn, prepared.val), _eval_loss(fn, held) if held else None
    progress.val_losses.append((step, now_val))
    if held:
        progress.heldout_losses.append((step, now_held))
    yield EvalLogged(step, now_val, time.perf_counter() - t0, now_held)


SAMPLE_TOKENS = 48


class Samples:
    """The run's sample sentences, translated at every evaluation point (base model first) with the
    compiled generation path. With a ``translator`` (adapters.MergedTranslator, as the app has) the
    current adapter is merged into that fixed model, whose compiled functions serve every run;
    without one (the CLI) the training model translates, the adapter at scale 0 for the base. The
    generate function is compiled in a background thread after the first step, so the first evaluation
    point does not wait for it. The tokenizer is used only on the training thread (the fast
    tokenizer must not be used by two threads at once)."""

    def __init__(self, model, tokenizer, sentences, lora=None, translator=None):
        from .evaluate import encode_chunk

        self.model, self.tokenizer, self.lora, self.translator = model, tokenizer, lora, translator
        self.ids, self.mask, self.n = encode_chunk(tokenizer, [data.PROMPT + s for s in sentences])
        self.thread: threading.Thread | None = None
        self.logged_base = False

    def _generate(self, base: bool):
        from .adapters import run_state
        from .evaluate import generate_ids

        if self.translator is not None:
            with self.translator.use(self.lora, None if base else run_state(self.model, self.lora)) as model:
                return generate_ids(model, self.ids, self.mask, SAMPLE_TOKENS)
        if not base:
            return generate_ids(self.model, self.ids, self.mask, SAMPLE_TOKENS)
        set_scale(self.model, 0.0)
        try:
            return generate_ids(self.model, self.ids, self.mask, SAMPLE_TOKENS)
        finally:
            set_scale(self.model, 1.0)

    def _translate(self, base: bool = False) -> list[str]:
        gen = self._generate(base)
        return [t.strip() for t in self.tokenizer.batch_decode(gen[:self.n], skip_special_tokens=True)]

    def warm_up(self) -> None:
        from .evaluate import generate_ids

        def run():
            try:   # compiles (once per process with a translator); the output is thrown away
                if self.translator is not None:
                    with self.translator.use() as model:
                        generate_ids(model, self.ids, self.mask, SAMPLE_TOKENS)
                else:
                    generate_ids(self.model, self.ids, self.mask, SAMPLE_TOKENS)
            except Exception:  # the evaluation point translates (and reports) itself
                pass
        self.thread = threading.Thread(target=run, daemon=True, name="samples-compile")
        self.thread.start()

    def log_base(self, t0: float):
        """The base model's German (step 0). Full fine-tuning without a translator logs it before the
        first step: later the training model is no longer the base."""
        if not self.logged_base:
            base = self._translate(base=True)
            self.logged_base = True
            yield SamplesLogged(0, base, time.perf_counter() - t0)

    def log(self, step: int, t0: float):
        self.finish()
        yield from self.log_base(t0)
        yield SamplesLogged(step, self._translate(), time.perf_counter() - t0)

    def finish(self) -> None:
        if self.thread is not None:
            self.thread.join()


def summarise(model, prepared: Prepared, att: Attached, p: Progress, t0: float, cfg: TrainConfig,
              data_origin: str, strategy) -> dict:
    probe_base, probe_final = (_base_and_lora(model, att.eval_fn(), prepared.probe, p.base.get("probe"))
                               if p.losses else (None, None))
    forget_base, forget_final = (_base_and_lora(model, att.eval_fn(), prepared.forget, p.base.get("forget"))
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
    ``translator`` (adapters.MergedTranslator) translates the sample sentences, if given.
    With ``checkpoint_dir``, a checkpoint is saved there every ``checkpoint_every`` steps and at the end;
    with ``resume`` (one of them), the run continues after its step with the same losses as a run that
    was never interrupted (the adapter, optimiser, data position and dropout clock are restored).
    """
    t0, progress, att, samples = time.perf_counter(), Progress(), None, None

    def checkpoint(step: int):
        ckpt = checkpoints.save(checkpoint_dir, step, att.variables, att.opt,
                                progress.state(time.perf_counter() - t0))
        progress.saved = step
        yield CheckpointSaved(step, ckpt.arrays.name, ckpt.bytes)
    try:
        if resume is not None:   # what the loop had measured (its losses, evaluations, the time it took)
            state = resume.state()
            progress = Progress.resumed(state)
            t0 -= state["elapsed_s"]
        fault = injected_fault(run.train.seed)
        clock = step_dropout(model)   # dropout masks keyed on (seed, step): a fresh clock per run
        clock.seed.assign(run.train.seed)
        clock.step.assign(0)
        # a distributed step is traced per input shape, so it gets one shape; one device gets any
        prepared = prepare(run.train, tokenizer, train_pairs, val_pairs, heldout_pairs,
                           dynamic=strategy is None and run.train.batching == "grouped")
        att = attach(model, run, clock, prepared, strategy)
        batch = None
        if resume is not None:   # the adapter, the optimiser, the data position and the dropout clock
            checkpoints.restore(resume, att.variables, att.opt)
            clock.step.assign(resume.step)
            batch = prepared.first
            for _ in range(resume.step):
                batch = next(prepared.batches, None)
                if batch is None:
                    raise ConfigError(f"the training data ends before step {resume.step + 1}; it cannot resume")
            att.start_trace(strategy)   # every resumed step compiled, as the uninterrupted run's after step 1
        elif not run.lora.adapter:   # no scale 0 to switch to later: the base model's losses now
            progress.base = {name: _eval_loss(att.eval, batches) for name, batches in
                             (("val", prepared.val), ("held", prepared.heldout), ("probe", prepared.probe),
                              ("forget", prepared.forget)) if batches}
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
        saving = checkpoint if checkpoint_dir is not None else None
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
        yield _failure(progress.step, exc)
    finally:
        if samples is not None:
            samples.finish()
        if att is not None:
            att.finish(model)
