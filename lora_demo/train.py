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
"""

from __future__ import annotations

import math
import threading
import time
from typing import Iterator

import numpy as np
import tensorflow as tf

from . import data
from .config import ConfigError, RunConfig, TrainConfig
from .events import EvalLogged, Event, RunFailed, RunFinished, RunStarted, StepLogged
from .inject import apply_lora, set_scale
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
    """Linear warm-up over ``warmup`` steps, then constant: short runs want the full rate soon."""

    def __init__(self, lr: float, warmup: int):
        self.lr, self.warmup = lr, warmup

    def __call__(self, step):
        step = tf.cast(step, tf.float32) + 1.0
        return self.lr * tf.minimum(1.0, step / max(1.0, float(self.warmup)))

    def get_config(self):
        return {"lr": self.lr, "warmup": self.warmup}


def make_optimizer(cfg: TrainConfig):
    if cfg.optimizer not in available_optimizers():
        raise ConfigError(f"optimizer {cfg.optimizer!r} needs tensorflow-addons, which is not installed here; "
                          f"available: {', '.join(available_optimizers())}")
    lr = WarmupConstant(cfg.lr, cfg.warmup_steps)
    if cfg.optimizer == "adamw":
        return tf.keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "radam":
        return tfa.optimizers.RectifiedAdam(lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "lamb":
        return tfa.optimizers.LAMB(lr, weight_decay=cfg.weight_decay)
    return tfa.optimizers.Lookahead(tfa.optimizers.AdamW(weight_decay=cfg.weight_decay, learning_rate=lr))


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


def make_step(model, opt, variables, clip_norm: float):
    def step(batch):
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

STRATEGIES = ("default", "mirrored", "multiworker")


def make_strategy(name: str = "default"):
    """None for one device (the default), else a tf.distribute strategy.

    - ``mirrored``: one replica per local GPU, or per logical CPU device when there is no GPU
      (``tf.config.set_logical_device_configuration`` splits a CPU, as the tests do);
    - ``multiworker``: one replica set per worker, workers described by the ``TF_CONFIG``
      environment variable (without it, this machine alone).
    """
    if name not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")
    if name == "default":
        return None
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if gpus:
        return tf.distribute.MirroredStrategy(gpus)
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(cpus, cross_device_ops=tf.distribute.ReductionToOneDevice())


def make_distributed_step(strategy, model, opt, variables, clip_norm: float):
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

    def get(self, i: int):
        """The concrete function if it is ready, else None."""
        if self.error is not None:
            raise self.error
        return self.concrete[i]

    def wait(self, i: int, stop: threading.Event | None = None):
        """Block until function ``i`` is traced (or the run is stopped, then None)."""
        while self.get(i) is None and self.thread.is_alive() and not (stop is not None and stop.is_set()):
            self.thread.join(0.1)
        return self.get(i)


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
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return RunFailed(step, f"training stopped by an error at step {step}: {type(exc).__name__}: {first}",
                     "this is a bug or an unsupported setting; try the defaults, and report it if it persists")


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
    try:
        tf.keras.utils.set_random_seed(cfg.seed)
        # adapter and optimiser state beside the base weights, or mirrored under a strategy
        with strategy.scope() if strategy is not None else tf.device(variable_device(model)):
            layers = apply_lora(model, run.lora, seed=cfg.seed)
            variables = [v for layer in layers for v in (layer.lora_A, layer.lora_B)]
            opt = make_optimizer(cfg)
            build_optimizer_state(opt, variables)
        arrays = data.encode(tokenizer, train_pairs, cfg.max_source_len, cfg.max_target_len)
        val = data.encode(tokenizer, val_pairs, cfg.max_source_len, cfg.max_target_len)
        # One shape for train, validation and probe batches: the eval function is traced once.
        lengths = (max(arrays["input_ids"].shape[1], val["input_ids"].shape[1]),
                   max(arrays["labels"].shape[1], val["labels"].shape[1]))
        arrays, val = (data.pad_to(a, *lengths, tokenizer.pad_token_id) for a in (arrays, val))
        val_batches = data.fixed_batches(val, cfg.batch_size, tokenizer.pad_token_id)
        probe = {k: v[:PROBE_PAIRS] for k, v in arrays.items()}
        probe_batches = data.fixed_batches(probe, cfg.batch_size, tokenizer.pad_token_id)
        stream = data.batches(arrays, cfg.batch_size, cfg.seed)
        eager_step, eager_eval = make_step(model, opt, variables, cfg.clip_norm), make_eval(model)
        if strategy is not None:   # traced on its first call; no eager first step across replicas
            eager_step = make_distributed_step(strategy, model, opt, variables, cfg.clip_norm)
        first = next(stream)
        to_trace = [(tf.function(eager_step, autograph=False), _spec(first)),
                    (tf.function(eager_eval, autograph=False), _spec(val_batches[0]))]
        yield RunStarted(config=run.to_dict(), params=breakdown(specs_from_model(model)).to_dict(),
                         device=f"{device_info()['name']}, {model_precision(model)}", train_pairs=len(arrays["input_ids"]), data_origin=data_origin,
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
            loss = float((fn or eager_step)(batch))
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
                if step < cfg.steps:  # only now: tracing beside the first eager step slows it ~2.5x
                    tracer = BackgroundTrace(to_trace if strategy is None else [(None, None), to_trace[1]])
            lr_now = float(opt.learning_rate(step - 1) if callable(opt.learning_rate) else cfg.lr)
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
                batch = next(stream)
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
            "mean_step_s": float(np.mean(step_times)) if step_times else None,
            "tokens_per_s": tokens / elapsed if elapsed else 0.0, "data_origin": data_origin,
        }
        yield RunFinished("stopped" if stopped else "completed", summary)
    except Exception as exc:
        yield _failure(step, exc)
    finally:
        if tracer is not None:
            tracer.thread.join()  # never leave a trace running against layers the next run replaces
