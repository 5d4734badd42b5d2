"""train(): LoRA fine-tuning of a TF T5 as an iterator of typed events. No gradio here.

Reads top to bottom: optimiser, loss, compiled step, then the loop.

Time to the first loss point. Tracing the step as a graph takes ~10 s on this
2-core CPU for flan-t5-small with autograph off (about a minute with it on:
the step has no data-dependent Python control flow, so autograph buys
nothing). The first step therefore runs eagerly and its loss is reported at
once; the trace starts right after it, in a thread. The loop waits for that
trace rather than running more eager steps beside it, because both are bound
by the GIL and an eager step slows to ~4x its time while a trace runs. The
forward-only eval function is traced next in the same thread, while compiled
steps run (they release the GIL). Eager and compiled steps run the same ops
on the same variables, so the loss curve is one curve.

A second run on the same model with the same shapes (same adapted layers, rank, optimiser and
batch shapes; seed, alpha, learning rate and steps may differ) traces nothing: the traced step
captured the adapter's variables and the optimiser's, so the run resets those (A from its seed,
B = 0, AdamW state zeroed) and calls the same concrete functions from step 1. Dropout masks are
keyed on (seed, step, layer) (lora.StepDropout), so such a run equals one that traced its own.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import tensorflow as tf

from . import data
from .config import ConfigError, RunConfig, TrainConfig
from .distribute import make_strategy, topology  # noqa: F401  (make_strategy: re-exported)
from .events import EvalLogged, Event, RunFailed, RunFinished, RunStarted, StepLogged
from .inject import apply_lora, dense_sites, reattach, select_paths, set_scale
from .lora import DropoutClock, LoraDense, step_dropout
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


def make_optimizer(cfg: TrainConfig):
    if cfg.optimizer not in available_optimizers():
        raise ConfigError(f"optimizer {cfg.optimizer!r} needs tensorflow-addons, which is not installed here; "
                          f"available: {', '.join(available_optimizers())}")
    lr = WarmupConstant(cfg.lr, cfg.warmup_steps)
    if cfg.optimizer == "adamw":
        opt = tf.keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "radam":
        opt = tfa.optimizers.RectifiedAdam(lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "lamb":
        opt = tfa.optimizers.LAMB(lr, weight_decay=cfg.weight_decay)
    else:
        opt = tfa.optimizers.Lookahead(tfa.optimizers.AdamW(weight_decay=cfg.weight_decay, learning_rate=lr))
    object.__setattr__(opt, "lora_lab_schedule", lr)   # the rate of step i is schedule(i - 1), exactly
    return opt


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
    """(sum of token cross-entropies, number of target tokens) over non-pad targets, in float32."""
    labels = batch["labels"]                                              # (B, T) with -100 padding
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                decoder_input_ids=model._shift_right(labels), training=training)
    mask = tf.cast(labels != -100, tf.float32)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.maximum(labels, 0), tf.cast(out.logits, tf.float32))
    return tf.reduce_sum(ce * mask), tf.reduce_sum(mask)


def seq2seq_loss(model, batch, training: bool):
    """Mean token cross-entropy of one batch: the training objective."""
    total, count = token_losses(model, batch, training)
    return total / tf.maximum(count, 1.0)


def make_step(model, opt, variables, clip_norm: float, clock: DropoutClock | None = None):
    def step(batch):
        if clock is not None:   # the dropout masks of this step are keyed on the step number
            clock.step.assign_add(1)
        with tf.GradientTape() as tape:
            loss = seq2seq_loss(model, batch, training=True)
        grads = tape.gradient(loss, variables)
        if clip_norm > 0:
            grads, _ = tf.clip_by_global_norm(grads, clip_norm)
        opt.apply_gradients(zip(grads, variables))
        return loss
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
        with tf.GradientTape() as tape:
            total, _ = token_losses(model, batch, training=True)
            loss = total / global_tokens
        grads = tape.gradient(loss, variables)
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
        if clip_norm > 0:
            grads, _ = tf.clip_by_global_norm(grads, clip_norm)
        opt.apply_gradients(zip(grads, variables), skip_gradients_aggregation=True)
        return loss

    def step(per_replica, global_tokens):
        if clock is not None:
            clock.step.assign_add(1)
        losses = strategy.run(replica_step, args=(per_replica, global_tokens))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

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


class BackgroundTrace:
    """Trace ``fns`` (a list of (tf.function, input spec)) in a thread; ``get(i)`` once ready."""

    def __init__(self, fns):
        self.concrete: list = [None] * len(fns)
        self.error: BaseException | None = None
        self.seconds: list[float] = []
        self.thread = threading.Thread(target=self._run, args=(fns,), daemon=True, name="lora-trace")
        self.thread.start()

    def _run(self, fns):
        try:
            for i, (fn, spec) in enumerate(fns):
                if fn is None:   # a slot the caller fills itself (the distributed step)
                    continue
                t = time.perf_counter()
                self.concrete[i] = fn.get_concrete_function(spec)
                self.seconds.append(time.perf_counter() - t)
        except BaseException as exc:  # surfaced by the loop, never swallowed
            self.error = exc

    @classmethod
    def ready(cls, concrete: list) -> "BackgroundTrace":
        """Functions traced by an earlier run: nothing to wait for."""
        self = cls.__new__(cls)
        self.concrete, self.error, self.seconds, self.thread = list(concrete), None, [], None
        return self

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def get(self, i: int):
        """The concrete function if it is ready, else None."""
        if self.error is not None:
            raise self.error
        return self.concrete[i]

    def wait(self, i: int, stop: threading.Event | None = None):
        """Block until function ``i`` is traced (or the run is stopped, then None)."""
        while self.get(i) is None and self.thread is not None and self.thread.is_alive() and not (stop is not None and stop.is_set()):
            self.thread.join(0.1)
        return self.get(i)


# ---------------------------------------------------------------------------
# Compiled steps kept across runs
# ---------------------------------------------------------------------------

@dataclass
class Compiled:
    """What a traced step captured: the adapter layers, their variables and the optimiser, and the
    concrete step and eval functions. A later run with the same key resets these and reuses them."""

    layers: list[LoraDense]
    variables: list
    opt: object
    concrete: list


COMPILED_KEPT = 4   # per model; each keeps an adapter's variables, AdamW state and two graphs


def _compiled(model) -> OrderedDict:
    cache = getattr(model, "_lora_lab_compiled", None)
    if cache is None:
        cache = OrderedDict()
        object.__setattr__(model, "_lora_lab_compiled", cache)
    return cache


def _compiled_key(model, run: RunConfig, train_spec: dict, eval_spec: dict) -> tuple | None:
    """What a traced step bakes in: adapted layers, rank, dropout, optimiser, weight decay,
    clipping, batch shapes and precision. Seed, alpha, learning rate, warm-up and steps are
    variables or data, so they may differ. None when the step is not reusable (the
    tensorflow-addons optimisers keep state that a reset could not restore, e.g. Lookahead's slow
    weights)."""
    lora, cfg = run.lora, run.train
    if cfg.optimizer != "adamw":
        return None
    shapes = tuple((k, tuple(v.shape), v.dtype.name) for spec in (train_spec, eval_spec) for k, v in spec.items())
    paths = tuple(select_paths([s.path for s in dense_sites(model)], lora))
    return (paths, lora.rank, lora.dropout, cfg.optimizer, cfg.weight_decay, cfg.clip_norm, shapes,
            model_precision(model))


def reset_optimizer(opt, cfg: TrainConfig) -> None:
    """Back to a freshly built AdamW: iteration 0, zero moments, this run's rate and warm-up."""
    for v in opt.variables:
        v.assign(tf.zeros(v.shape, v.dtype))
    opt.lora_lab_schedule.set(cfg.lr, cfg.warmup_steps)


def optimizer_state_bytes(opt) -> int:
    """Bytes of the optimiser's per-weight state (moments, slow weights); scalar counters excluded."""
    variables = opt.variables() if callable(opt.variables) else opt.variables
    return int(sum(v.shape.num_elements() * v.dtype.size for v in variables if v.shape.rank))


def _spec(batch: dict) -> dict:
    return {k: tf.TensorSpec(v.shape, tf.as_dtype(v.dtype), name=k) for k, v in batch.items()}


def _tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------

PROBE_PAIRS = 32  # training pairs whose loss is measured before and after, on the same tokens

# ---------------------------------------------------------------------------
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


def _base_and_lora(model, fn, batches) -> tuple[float, float]:
    """The same loss with the adapter at scale 0 (the base model, exactly) and at scale 1."""
    set_scale(model, 0.0)
    try:
        base = _eval_loss(fn, batches)
    finally:
        set_scale(model, 1.0)
    return base, _eval_loss(fn, batches)


def train(run: RunConfig, model, tokenizer, train_pairs, val_pairs, stop: threading.Event | None = None,
          data_origin: str = "bundled", strategy=None) -> Iterator[Event]:
    """Add a fresh adapter to ``model`` as ``run.lora`` says and train it; yield events as it goes.

    Ends with exactly one RunFinished (completed or stopped) or RunFailed. The
    base weights are never changed; the trained adapter stays in ``model``. With a
    ``strategy`` (see make_strategy) the adapter and optimiser state are mirrored and each
    step splits the global batch across the replicas.
    """
    t0 = time.perf_counter()
    cfg = run.train
    step = 0
    tracer = None
    key, cached = None, None
    try:
        fault = injected_fault(cfg.seed)
        # Everything random follows cfg.seed explicitly (A's initialiser, the data order, the dropout
        # clock). tf.random.set_seed is not called: it clears TensorFlow's function caches, and the
        # first call of a reused step would pay ~4 s (flan-t5-small) to instantiate it again.
        clock = step_dropout(model)
        clock.seed.assign(cfg.seed)
        clock.step.assign(0)
        streamed = isinstance(train_pairs, data.Stream)
        if streamed:   # read as needed: the probe is the stream's head, batches are encoded on the fly
            pairs_iter = iter(train_pairs)
            head = list(itertools.islice(pairs_iter, PROBE_PAIRS))
            if len(head) < cfg.batch_size:
                raise ConfigError(f"the training stream ({data_origin}) ended after {len(head)} pairs; "
                                  f"a batch needs {cfg.batch_size}")
            arrays = data.encode(tokenizer, head, cfg.max_source_len, cfg.max_target_len)
        else:
            arrays = data.encode(tokenizer, train_pairs, cfg.max_source_len, cfg.max_target_len)
        val = data.encode(tokenizer, val_pairs, cfg.max_source_len, cfg.max_target_len)
        # One shape for train, validation and probe batches: the eval function is traced once. A
        # stream's longest pair is unknown, so its batches are padded to the maximum lengths.
        lengths = ((cfg.max_source_len, cfg.max_target_len) if streamed else
                   (max(arrays["input_ids"].shape[1], val["input_ids"].shape[1]),
                    max(arrays["labels"].shape[1], val["labels"].shape[1])))
        arrays, val = (data.pad_to(a, *lengths, tokenizer.pad_token_id) for a in (arrays, val))
        val_batches = data.fixed_batches(val, cfg.batch_size, tokenizer.pad_token_id)
        probe = {k: v[:PROBE_PAIRS] for k, v in arrays.items()}
        probe_batches = data.fixed_batches(probe, cfg.batch_size, tokenizer.pad_token_id)
        stream = (data.stream_batches(tokenizer, itertools.chain(head, pairs_iter), cfg.batch_size, *lengths,
                                      cfg.seed) if streamed else data.batches(arrays, cfg.batch_size, cfg.seed))
        first = next(stream)
        specs = (_spec(first), _spec(val_batches[0]))
        if strategy is None:
            key = _compiled_key(model, run, *specs)
            cached = _compiled(model).get(key) if key is not None else None
        # adapter and optimiser state beside the base weights, or mirrored under a strategy
        with strategy.scope() if strategy is not None else tf.device(variable_device(model)):
            if cached is not None:   # the same shapes as an earlier run: reset its layers, reuse its trace
                _compiled(model).move_to_end(key)
                layers, variables, opt = reattach(model, cached.layers, run.lora.alpha, cfg.seed), \
                    cached.variables, cached.opt
                reset_optimizer(opt, cfg)
                tracer = BackgroundTrace.ready(cached.concrete)
            else:
                layers = apply_lora(model, run.lora, seed=cfg.seed, clock=clock)
                variables = [v for layer in layers for v in (layer.lora_A, layer.lora_B)]
                opt = make_optimizer(cfg)
                build_optimizer_state(opt, variables)
        eager_step, eager_eval = make_step(model, opt, variables, cfg.clip_norm, clock), make_eval(model)
        if strategy is not None:   # traced on its first call; no eager first step across replicas
            eager_step = make_distributed_step(strategy, model, opt, variables, cfg.clip_norm, clock)
        to_trace = [(tf.function(eager_step, autograph=False), specs[0]),
                    (tf.function(eager_eval, autograph=False), specs[1])]
        yield RunStarted(config=run.to_dict(), params=breakdown(specs_from_model(model)).to_dict(),
                         device=f"{device_info()['name']}, {model_precision(model)}", data_origin=data_origin,
                         train_pairs=None if streamed else len(arrays["input_ids"]),
                         shapes={"source_len": arrays["input_ids"].shape[1], "target_len": arrays["labels"].shape[1]})

        losses, val_losses, step_times, tokens, eager_steps, first_loss_s = [], [], [], 0, 0, None
        batch, stopped = first, False
        for step in range(1, cfg.steps + 1):
            if stop is not None and stop.is_set():
                stopped = True
                break
            fn = tracer.wait(0, stop) if tracer is not None and strategy is None else None
            if stop is not None and stop.is_set():
                stopped = True
                break
            ts = time.perf_counter()
            loss = _inject(fault, step, float((fn or eager_step)(batch)))
            dt = time.perf_counter() - ts
            if not math.isfinite(loss):
                yield RunFailed(step, f"the loss became {'NaN' if math.isnan(loss) else 'infinite'} at step {step}",
                                f"lower the learning rate (it is {cfg.lr:g}; try {cfg.lr / 10:g}) "
                                "and keep gradient clipping on")
                return
            compiled = fn is not None or (strategy is not None and step > 1)   # step 1 includes the trace
            eager_steps += fn is None and strategy is None
            if compiled:
                step_times.append(dt)
            n_tok = _tokens(batch)
            tokens += n_tok
            losses.append(loss)
            elapsed = time.perf_counter() - t0
            if first_loss_s is None:
                first_loss_s = elapsed
                if step < cfg.steps and tracer is None:  # only now: tracing beside the first eager step slows it ~2.5x
                    tracer = BackgroundTrace(to_trace if strategy is None else [(None, None), to_trace[1]])
            lr_now = float(opt.lora_lab_schedule(step - 1))
            yield StepLogged(step, loss, lr_now, n_tok, n_tok / dt, elapsed, compiled)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                eval_fn = (tracer.get(1) if tracer is not None else None) or eager_eval
                if not val_losses:  # the base model's point: the adapter at scale 0 is the base exactly
                    base, now = _base_and_lora(model, eval_fn, val_batches)
                    val_losses.append((0, base))
                    yield EvalLogged(0, base, time.perf_counter() - t0)
                else:
                    now = _eval_loss(eval_fn, val_batches)
                val_losses.append((step, now))
                yield EvalLogged(step, now, time.perf_counter() - t0)
            if step < cfg.steps:
                batch = next(stream, None)
                if batch is None:   # a finite stream ran out: the run ends here, complete
                    break
        probe_base, probe_final = (_base_and_lora(model, (tracer.get(1) if tracer else None) or eager_eval,
                                                  probe_batches) if losses else (None, None))
        elapsed = time.perf_counter() - t0
        summary = {
            "steps_done": len(losses),
            "first_loss": float(np.mean(losses[:5])) if losses else None,   # mean of the first 5 steps
            "final_loss": float(np.mean(losses[-5:])) if losses else None,  # mean of the last 5 steps
            # the honest "did it learn": one fixed set of training pairs, base vs LoRA, token-weighted
            "probe_pairs": min(PROBE_PAIRS, len(arrays["input_ids"])),
            "probe_loss_base": probe_base, "probe_loss_final": probe_final,
            "base_val_loss": val_losses[0][1] if val_losses else None,
            "final_val_loss": val_losses[-1][1] if len(val_losses) > 1 else None,
            "elapsed_s": elapsed, "first_loss_s": first_loss_s, "eager_steps": eager_steps,
            "trace_s": sum(tracer.seconds) if tracer is not None and tracer.seconds else None,
            "reused_trace": cached is not None,
            "mean_step_s": float(np.mean(step_times)) if step_times else None,
            "tokens_per_s": tokens / elapsed if elapsed else 0.0, "data_origin": data_origin,
            "pairs_seen": len(losses) * cfg.batch_size,
            "optimizer_state_bytes": optimizer_state_bytes(opt),
            **topology(strategy),   # strategy, workers and replicas that took part
        }
        yield RunFinished("stopped" if stopped else "completed", summary)
    except Exception as exc:
        yield _failure(step, exc)
    finally:
        if tracer is not None:
            tracer.join()  # never leave a trace running against layers the next run replaces
            if key is not None and cached is None and tracer.error is None and all(tracer.concrete):
                cache = _compiled(model)
                cache[key] = Compiled(layers, variables, opt, tracer.concrete)
                while len(cache) > COMPILED_KEPT:
                    cache.popitem(last=False)
