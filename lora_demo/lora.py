"""LoRA for a Keras 2 ``Dense``: y = W·x + (alpha/r)·s·(x·A)·B.

The wrapped Dense is never edited except by ``merge()``, which keeps the
original kernel so ``unmerge()`` restores it bit for bit. B starts at zero, so
before the first step the output equals the base layer's exactly.
"""

from __future__ import annotations

import zlib

import tensorflow as tf

from .state import state_of


def _init_a(seed: int | None):
    # PEFT's kaiming_uniform_(a=sqrt(5)) on (r, in) is U(±1/sqrt(in)); this is the same.
    return tf.keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform", seed=seed)


class DropoutClock:
    """What a dropout mask is a function of: the run's seed and the training step.

    The training step advances ``step`` itself, in eager and compiled code alike; a run sets
    ``seed`` and puts ``step`` back to 0, so a run that reuses a compiled step draws the same masks
    as one that traced its own. Held as a plain object, not tracked by Keras: these are not weights.
    """

    def __init__(self):
        self.seed = tf.Variable(0, trainable=False, dtype=tf.int64, name="dropout_seed")
        self.step = tf.Variable(0, trainable=False, dtype=tf.int64, name="dropout_step")

    def key(self, salt: int) -> tf.Tensor:
        return tf.stack([self.seed * 1_000_003 + salt, tf.cast(self.step, tf.int64)])


class StepDropout(tf.keras.layers.Layer):
    """Dropout with stateless masks keyed on (seed, step, layer).

    Keras' own Dropout draws from per-kernel random state, so a compiled step reused by a later run
    would continue the earlier run's random stream, and an eager step and a traced one draw
    different masks. Here the mask depends only on the clock, so a run is reproducible from its
    seed however its steps are executed.
    """

    def __init__(self, rate: float, clock: DropoutClock, salt: int, **kwargs):
        kwargs.setdefault("autocast", False)   # keep the input's dtype (bf16 stays bf16)
        super().__init__(**kwargs)
        self.rate, self.salt = float(rate), int(salt)
        self.clock = clock   # a plain object: Keras does not track it

    def call(self, x, training=None):
        if not training or self.rate == 0:
            return x
        return tf.nn.experimental.stateless_dropout(x, self.rate, seed=self.clock.key(self.salt))


class _Knobs:
    """Scalars that ``call()`` reads as variables, so changing them never retraces a compiled step.
    A plain object: Keras does not track it, so they never count as weights or reach a checkpoint."""

    def __init__(self, scaling: float):
        self.scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="lora_scale")
        self.scaling = tf.Variable(scaling, trainable=False, dtype=tf.float32, name="lora_scaling")


class LoraDense(tf.keras.layers.Layer):
    """A frozen Keras ``Dense`` plus a trainable low-rank update (Hu et al. 2021, arXiv:2106.09685):

        y = x·W + (alpha / r) · s · dropout(x)·A·B

    with W (in, out) the wrapped kernel, A (in, r) drawn kaiming-uniform as PEFT draws it, B (r, out)
    zeros, so the layer equals the base exactly until the first step. ``s`` is the inference-time
    scale (1 as trained, 0 = the base). The factors, their gradients and the optimiser state are
    float32 even when the base computes in bf16.

    Args:
        base: the built, bias-free Dense to wrap (never edited, except by ``merge()``).
        rank: r, the width of the A·B bottleneck.
        alpha: the update is scaled by alpha / r.
        dropout: dropout rate on the LoRA path only (the input to A).
        path: the PEFT module path (``encoder.block.0.layer.0.SelfAttention.q``): names, salts.
        seed: seed of A's initialiser.
        clock: with one (training), dropout masks are keyed on (seed, step, path); see StepDropout.
    """

    def __init__(self, base: tf.keras.layers.Dense, rank: int, alpha: float, dropout: float = 0.0,
                 path: str = "", seed: int | None = None, clock: DropoutClock | None = None, **kwargs):
        if isinstance(base, LoraDense):
            raise ValueError(f"{path or base.name} already has a LoRA adapter; remove it before adding another")
        if base.use_bias or not base.built:
            raise ValueError(f"{path or base.name}: LoRA expects a built, bias-free Dense as in T5")
        # float32 always: under a bf16 policy the frozen base computes in bf16 while the LoRA
        # factors, their gradients and the optimiser state stay float32.
        super().__init__(name=f"{base.name}_lora", dtype="float32", **kwargs)
        self.base, self.rank, self.alpha, self.path = base, int(rank), float(alpha), path
        d_in, d_out = base.kernel.shape
        self.lora_A = self.add_weight(name="lora_A", shape=(d_in, rank), initializer=_init_a(seed), dtype=tf.float32)
        self.lora_B = self.add_weight(name="lora_B", shape=(rank, d_out), initializer="zeros", dtype=tf.float32)
        self.knobs = _Knobs(self.alpha / self.rank)   # s and alpha/r
        if dropout <= 0:
            self.dropout = None
        elif clock is not None:   # training: masks keyed on (seed, step, this layer's path)
            self.dropout = StepDropout(dropout, clock, salt=zlib.crc32(path.encode()))
        else:
            self.dropout = tf.keras.layers.Dropout(dropout, seed=seed)
        self.merged_kernel_backup: tf.Tensor | None = None
        self.built = True

    @property
    def scale(self) -> tf.Variable:
        """s: 1 as trained, 0 = the base layer exactly."""
        return self.knobs.scale

    @property
    def scaling(self) -> float:
        """alpha / r, as the variable that ``call()`` multiplies by."""
        return float(self.knobs.scaling.numpy())

    @property
    def merged(self) -> bool:
        return self.merged_kernel_backup is not None

    def reset(self, alpha: float, seed: int | None) -> None:
        """Start again as a fresh adapter would: A drawn as at construction from ``seed``, B = 0."""
        self.lora_A.assign(_init_a(seed)(self.lora_A.shape, tf.float32))
        self.lora_B.assign(tf.zeros_like(self.lora_B))
        self.alpha = float(alpha)
        self.knobs.scaling.assign(self.alpha / self.rank)
        self.scale.assign(1.0)

    def delta(self) -> tf.Tensor:
        """The full update ΔW = (alpha/r)·s·A·B, shape (in, out) like the Keras kernel."""
        return tf.matmul(self.lora_A, self.lora_B) * (self.knobs.scaling * self.knobs.scale)  # (in, r) @ (r, out)

    def call(self, x, training=None):
        y = self.base(x)                                                  # (B, T, out)
        if self.merged:
            return y
        h = self.dropout(x, training=training) if self.dropout is not None else x
        h = tf.einsum("...i,ir->...r", tf.cast(h, self.lora_A.dtype), self.lora_A)   # (B, T, in) @ (in, r)
        h = tf.einsum("...r,ro->...o", h, self.lora_B) * (self.knobs.scaling * self.knobs.scale)  # (B, T, r) @ (r, out)
        return y + tf.cast(h, y.dtype)

    def merge(self) -> None:
        if self.merged:
            raise ValueError(f"{self.path}: the adapter is already merged")
        self.merged_kernel_backup = tf.identity(self.base.kernel)
        self.base.kernel.assign_add(tf.cast(self.delta(), self.base.kernel.dtype))

    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError(f"{self.path}: the adapter is not merged")
        self.base.kernel.assign(self.merged_kernel_backup)
        self.merged_kernel_backup = None


def clock_of(model) -> DropoutClock:
    """The model's dropout clock, created on first use (on the host: it only feeds RNG seeds)."""
    state = state_of(model)
    if state.clock is None:
        with tf.device("/CPU:0"):
            state.clock = DropoutClock()
    return state.clock


def step_dropout(model) -> DropoutClock:
    """Swap the base model's Keras Dropouts for StepDropouts on the model's clock (once).

    Each owner's salt is its index among the model's dropout owners, which adapters do not change.
    Rate-0 dropouts are left alone: they do nothing.
    """
    clock = clock_of(model)
    owners = [layer for layer in list(model._flatten_layers(include_self=True))
              if not isinstance(layer, LoraDense)
              and isinstance(getattr(layer, "dropout", None), (tf.keras.layers.Dropout, StepDropout))]
    for salt, layer in enumerate(owners):
        old = layer.dropout
        if isinstance(old, tf.keras.layers.Dropout) and old.rate > 0:
            layer.dropout = StepDropout(old.rate, clock, salt=salt, name=old.name, dtype=old.dtype_policy)
    return clock
