"""LoRA and its family for a Keras 2 ``Dense``: y = x·W + s·ΔW(x), one layer class for all.

The wrapped Dense is never edited except by ``merge()``, which keeps the
original kernel so ``unmerge()`` restores it bit for bit. Every method starts
with an update of zero, so before the first step the output equals the base
layer's exactly, and the scale s = 0 is the base model at any time.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import tensorflow as tf

from lora_demo.core.state import state_of


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
        return _masked(x, keep_mask(tf.shape(x), x.shape, self.rate, self.clock.key(self.salt), x.dtype))


@tf.custom_gradient
def _masked(x, mask):
    """x · mask whose backward pass keeps only the mask (a plain product would also keep x alive for a
    gradient with respect to the mask, which nothing needs)."""
    def grad(upstream):
        return upstream * mask, None
    return x * mask, grad


MASK_LEVELS = 1 << 16   # a keep/drop flag is one 16-bit draw: the rate is exact to 1/65,536


def keep_mask(shape: tf.Tensor, static_shape: tf.TensorShape, rate: float, seed: tf.Tensor,
              dtype: tf.DType) -> tf.Tensor:
    """Inverted dropout's multiplier: 1/(1-rate) where kept, 0 where dropped, with P(drop) = round(rate·2¹⁶)/2¹⁶.

    Each flag is a 16-bit slice of a stateless Philox draw, so one 32-bit draw gives two flags:
    ``tf.nn.experimental.stateless_dropout`` draws a float per element, then scales x and selects, and
    in the backward pass selects and scales again. Drawing half the bits, and scaling x by one
    multiplier (whose gradient is one product), costs less per step; the draw does not depend on
    ``dtype``, so a bf16 step drops the same elements as a float32 one."""
    threshold = round(rate * MASK_LEVELS)
    scale, zero = tf.constant(1.0 / (1.0 - rate), dtype), tf.constant(0.0, dtype)
    last = static_shape[-1] if static_shape.rank else None
    if last is not None and last % 2 == 0:
        draw_shape = tf.concat([shape[:-1], [last // 2]], 0)
        bits = tf.random.stateless_uniform(draw_shape, seed, minval=None, maxval=None, dtype=tf.uint32)
        flags = tf.reshape(tf.bitcast(bits, tf.uint16), shape)           # (..., last/2, 2) -> (..., last)
        keep = flags >= tf.constant(threshold, tf.uint16)
    else:   # an odd last axis: one draw per flag
        flags = tf.random.stateless_uniform(shape, seed, minval=0, maxval=MASK_LEVELS, dtype=tf.int32)
        keep = flags >= threshold
    return tf.where(keep, scale, zero)


class _Knobs:
    """Scalars that ``call()`` reads as variables, so changing them never retraces a compiled step.
    A plain object: Keras does not track it, so they never count as weights or reach a checkpoint."""

    def __init__(self, scaling: float):
        self.scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="lora_scale")
        self.scaling = tf.Variable(scaling, trainable=False, dtype=tf.float32, name="lora_scaling")


class _PissaStart:
    """PiSSA's starting factors A0, B0 (frozen), untracked by Keras like _Knobs.

    PiSSA trains y = x·(W - c·A0·B0) + c·x·A·B from A = A0, B = B0 (c = the scaling). Here the
    frozen residual is carried as the pair rather than written into W: the same function and the
    same gradients, with W left as loaded, so scale 0 and merging off still give the base model, and
    the trained update relative to W is exactly ΔW = c·(A·B - A0·B0). r·(in + out) numbers per layer.
    """

    def __init__(self, d_in: int, d_out: int, rank: int):
        self.a0 = tf.Variable(tf.zeros((d_in, rank)), trainable=False, name="pissa_A0")
        self.b0 = tf.Variable(tf.zeros((rank, d_out)), trainable=False, name="pissa_B0")


def scaling_of(method: str, alpha: float, rank: int) -> float:
    """alpha/r, or alpha/√r for rsLoRA."""
    return alpha / math.sqrt(rank) if method == "rslora" else alpha / rank


def pissa_factors(kernel: np.ndarray, rank: int, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """(A0, B0) with c·A0·B0 the best rank-r approximation of ``kernel`` (in, out): the top-r singular
    triplets, √(σ/c) on each side, as PEFT's ``init_lora_weights="pissa"`` takes them (transposed)."""
    u, sv, vt = np.linalg.svd(np.asarray(kernel, np.float64), full_matrices=False)
    root = np.sqrt(sv[:rank] / scaling)
    return (u[:, :rank] * root).astype(np.float32), (root[:, None] * vt[:rank]).astype(np.float32)


class LoraDense(tf.keras.layers.Layer):
    """A frozen Keras ``Dense`` plus a trainable low-rank update (Hu et al. 2021, arXiv:2106.09685):

        y = x·W + c · s · dropout(x)·A·B,   c = alpha / r  (rsLoRA: alpha / √r)

    with W (in, out) the wrapped kernel, A (in, r) drawn kaiming-uniform as PEFT draws it, B (r, out)
    zeros, so the layer equals the base exactly until the first step. ``s`` is the inference-time
    scale (1 as trained, 0 = the base). The factors, their gradients and the optimiser state are
    float32 even when the base computes in bf16. The other methods:

    - ``dora`` (Liu et al. 2024, arXiv:2402.09353): y = x·W + s·(x·W' - x·W) with
      W' = m ⊙ (W + c·A·B) / ‖W + c·A·B‖ per output column; m (out,) is learned and starts at ‖W‖,
      and the norm is not differentiated (as in the paper and PEFT). At s = 1 this is PEFT's DoRA;
      s blends the adapted layer with the base, so 0 is still the base exactly.
    - ``pissa`` (Meng et al. 2024, arXiv:2404.02948): A, B start from the top-r singular vectors of
      W and the residual W - c·A0·B0 is what stays frozen (see _PissaStart).
    - ``rslora`` changes only c; ``loraplus`` only the optimiser (train.py).

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
                 path: str = "", seed: int | None = None, clock: DropoutClock | None = None,
                 method: str = "lora", **kwargs):
        if isinstance(base, LoraDense):
            raise ValueError(f"{path or base.name} already has a LoRA adapter; remove it before adding another")
        if base.use_bias or not base.built:
            raise ValueError(f"{path or base.name}: LoRA expects a built, bias-free Dense as in T5")
        # float32 always: under a bf16 policy the frozen base computes in bf16 while the LoRA
        # factors, their gradients and the optimiser state stay float32.
        super().__init__(name=f"{base.name}_lora", dtype="float32", **kwargs)
        self.base, self.rank, self.alpha, self.path, self.method = base, int(rank), float(alpha), path, method
        d_in, d_out = base.kernel.shape
        if method == "pissa" and rank > min(d_in, d_out):
            raise ValueError(f"{path}: PiSSA takes r singular vectors of a {d_in}x{d_out} weight, so r can be at "
                             f"most {min(d_in, d_out)}, got {rank}")
        self.lora_A = self.add_weight(name="lora_A", shape=(d_in, rank), initializer=_init_a(seed), dtype=tf.float32)
        self.lora_B = self.add_weight(name="lora_B", shape=(rank, d_out), initializer="zeros", dtype=tf.float32)
        self.knobs = _Knobs(scaling_of(method, self.alpha, self.rank))   # s and c
        self.magnitude = (self.add_weight(name="lora_magnitude_vector", shape=(d_out,), initializer="zeros",
                                          dtype=tf.float32) if method == "dora" else None)
        self.start = _PissaStart(d_in, d_out, rank) if method == "pissa" else None
        self._init_method()
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

    @property
    def trained(self) -> list[tf.Variable]:
        """The variables this layer trains: A, B and, for DoRA, the magnitude."""
        return [self.lora_A, self.lora_B] + ([self.magnitude] if self.magnitude is not None else [])

    def _kernel(self) -> tf.Tensor:
        return tf.cast(self.base.kernel, tf.float32)

    def _init_method(self) -> None:
        """What each method starts from beyond A (drawn) and B = 0."""
        if self.magnitude is not None:   # m = ‖W‖ per output column: W' = W at the start
            self.magnitude.assign(tf.norm(self._kernel(), axis=0))
        if self.start is not None:
            a0, b0 = pissa_factors(self._kernel().numpy(), self.rank, float(self.knobs.scaling.numpy()))
            for var, value in ((self.start.a0, a0), (self.start.b0, b0), (self.lora_A, a0), (self.lora_B, b0)):
                var.assign(value)

    def reset(self, alpha: float, seed: int | None) -> None:
        """Start again as a fresh adapter would: A drawn as at construction from ``seed``, B = 0."""
        self.lora_A.assign(_init_a(seed)(self.lora_A.shape, tf.float32))
        self.lora_B.assign(tf.zeros_like(self.lora_B))
        self.alpha = float(alpha)
        self.knobs.scaling.assign(scaling_of(self.method, self.alpha, self.rank))
        self.scale.assign(1.0)
        self._init_method()

    def _dora_gain(self) -> tf.Tensor:
        """m / ‖W + c·A·B‖ per output column (out,), the norm not differentiated."""
        adapted = self._kernel() + self.knobs.scaling * tf.matmul(self.lora_A, self.lora_B)
        return self.magnitude / tf.stop_gradient(tf.norm(adapted, axis=0))

    def delta(self) -> tf.Tensor:
        """The full update ΔW at scale s, shape (in, out) like the Keras kernel: c·s·A·B for LoRA,
        c·s·(A·B - A0·B0) for PiSSA, s·(W' - W) for DoRA."""
        c, s = self.knobs.scaling, self.knobs.scale
        ab = tf.matmul(self.lora_A, self.lora_B)                          # (in, r) @ (r, out)
        if self.magnitude is not None:
            w = self._kernel()
            return s * (self._dora_gain() * (w + c * ab) - w)
        if self.start is not None:
            ab -= tf.matmul(self.start.a0, self.start.b0)
        return ab * (c * s)

    def call(self, x, training=None):
        y = self.base(x)                                                  # (B, T, out)
        if self.merged:
            return y
        c, s = self.knobs.scaling, self.knobs.scale
        h = self.dropout(x, training=training) if self.dropout is not None else x
        # tf.matmul broadcasts the (in, r) factor over (B, T): at the bench shape (flan-t5-small, batch 8,
        # 64+64 tokens, r=8 on q,v, fp32) the step took 0.98 s this way against 1.28 s with tf.einsum
        # ("...i,ir->...r") and two scalar products, on the AVX512-BF16 EPYC (BENCHMARKS.md).
        h = tf.matmul(tf.matmul(tf.cast(h, self.lora_A.dtype), self.lora_A), self.lora_B)   # (B, T, out)
        if self.start is not None:   # minus the frozen start, on the undropped input: x·(W - c·A0·B0)
            h -= tf.matmul(tf.matmul(tf.cast(x, tf.float32), self.start.a0), self.start.b0)
        if self.magnitude is not None:   # W'x = g ⊙ (x·W + c·x·A·B); blend: y + s·(W'x - y)
            g, yf = self._dora_gain(), tf.cast(y, tf.float32)
            return tf.cast(yf + s * ((g - 1.0) * yf + g * (c * h)), y.dtype)
        return y + tf.cast(h * (c * s), y.dtype)

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
