"""LoRA for a Keras 2 ``Dense``: y = W·x + (alpha/r)·s·(x·A)·B.

The wrapped Dense is never edited except by ``merge()``, which keeps the
original kernel so ``unmerge()`` restores it bit for bit. B starts at zero, so
before the first step the output equals the base layer's exactly.
"""

from __future__ import annotations

import tensorflow as tf


class LoraDense(tf.keras.layers.Layer):
    def __init__(self, base: tf.keras.layers.Dense, rank: int, alpha: float, dropout: float = 0.0,
                 path: str = "", seed: int | None = None, **kwargs):
        if isinstance(base, LoraDense):
            raise ValueError(f"{path or base.name} already has a LoRA adapter; remove it before adding another")
        if base.use_bias or not base.built:
            raise ValueError(f"{path or base.name}: LoRA expects a built, bias-free Dense as in T5")
        # float32 always: under a mixed bf16 policy the frozen base computes in bf16 while the LoRA
        # factors, their gradients and the optimiser state stay float32.
        super().__init__(name=f"{base.name}_lora", dtype="float32", **kwargs)
        self.base, self.rank, self.alpha, self.path = base, int(rank), float(alpha), path
        d_in, d_out = base.kernel.shape
        # PEFT's kaiming_uniform_(a=sqrt(5)) on (r, in) is U(±1/sqrt(in)); this is the same.
        init_a = tf.keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform", seed=seed)
        self.lora_A = self.add_weight(name="lora_A", shape=(d_in, rank), initializer=init_a, dtype=tf.float32)
        self.lora_B = self.add_weight(name="lora_B", shape=(rank, d_out), initializer="zeros", dtype=tf.float32)
        # s: a variable (not a Python float) so changing it at inference does not retrace. Set
        # without Keras attribute tracking: it is a knob, not a weight, and must not show up in
        # model.weights, parameter counts or checkpoints.
        object.__setattr__(self, "scale", tf.Variable(1.0, trainable=False, dtype=tf.float32, name="lora_scale"))
        self.dropout = tf.keras.layers.Dropout(dropout, seed=seed) if dropout > 0 else None
        self.merged_kernel_backup: tf.Tensor | None = None
        self.built = True

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def merged(self) -> bool:
        return self.merged_kernel_backup is not None

    def delta(self) -> tf.Tensor:
        """The full update ΔW = (alpha/r)·s·A·B, shape (in, out) like the Keras kernel."""
        return tf.matmul(self.lora_A, self.lora_B) * (self.scaling * self.scale)  # (in, r) @ (r, out)

    def call(self, x, training=None):
        y = self.base(x)                                                  # (B, T, out)
        if self.merged:
            return y
        h = self.dropout(x, training=training) if self.dropout is not None else x
        h = tf.einsum("...i,ir->...r", tf.cast(h, self.lora_A.dtype), self.lora_A)   # (B, T, in) @ (in, r)
        h = tf.einsum("...r,ro->...o", h, self.lora_B) * (self.scaling * self.scale)  # (B, T, r) @ (r, out)
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
