"""Optimisers and their learning-rate schedules: AdamW from Keras, the rest from tensorflow-addons when
it imports, LoRA+ (a faster rate for B), and the state a compiled step keeps between runs."""

from __future__ import annotations

import tensorflow as tf

from lora_demo.core.config import ConfigError, TrainConfig
from lora_demo.training import checkpoints

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
    """Linear warm-up over ``warmup`` steps, then constant (short runs want the full rate soon), or with
    ``decay`` falling linearly from there to zero at step ``total``.

    All are variables, so a compiled step reused by a run with another rate, length or schedule needs no
    retrace."""

    def __init__(self, lr: float, warmup: int, total: int = 1, decay: bool = False):
        self.lr = tf.Variable(float(lr), trainable=False, dtype=tf.float32, name="lr")
        self.warmup = tf.Variable(float(warmup), trainable=False, dtype=tf.float32, name="warmup_steps")
        self.total = tf.Variable(float(total), trainable=False, dtype=tf.float32, name="total_steps")
        self.decay = tf.Variable(float(decay), trainable=False, dtype=tf.float32, name="decay")

    def set(self, lr: float, warmup: int, total: int = 1, decay: bool = False) -> None:
        self.lr.assign(float(lr))
        self.warmup.assign(float(warmup))
        self.total.assign(float(total))
        self.decay.assign(float(decay))

    def __call__(self, step):
        step = tf.cast(step, tf.float32) + 1.0
        rising = tf.minimum(1.0, step / tf.maximum(1.0, self.warmup))
        left = (self.total + 1.0 - step) / tf.maximum(1.0, self.total + 1.0 - self.warmup)
        falling = 1.0 - self.decay * (1.0 - tf.clip_by_value(left, 0.0, 1.0))
        return self.lr * rising * tf.minimum(1.0, falling)

    def get_config(self):
        return {"lr": float(self.lr.numpy()), "warmup": int(self.warmup.numpy()), "total": int(self.total.numpy()),
                "decay": bool(self.decay.numpy())}


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
    lr = WarmupConstant(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.schedule == "linear")
    if lora is not None and lora.method == "loraplus":   # (on AdamW: RunConfig checks it)
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


def reset_optimizer(opt, schedule: WarmupConstant, cfg: TrainConfig) -> None:
    """Back to a freshly built AdamW: iteration 0, zero moments, this run's rate and warm-up."""
    for v in opt.variables:
        v.assign(tf.zeros(v.shape, v.dtype))
    schedule.set(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.schedule == "linear")


def optimizer_state_bytes(opt) -> int:
    """Bytes of the optimiser's per-weight state (moments, slow weights); scalar counters excluded."""
    return int(sum(v.shape.num_elements() * v.dtype.size for v in checkpoints.optimizer_variables(opt)
                   if v.shape.rank))
