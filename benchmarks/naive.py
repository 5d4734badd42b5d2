"""A naive TensorFlow LoRA step, written from scratch as a newcomer would: the independent baseline that
our step is measured against (``naive_step_s``).

It shares nothing with the package but the model's config: a small Keras layer wraps each attention's
``q`` and ``v`` Dense (A he-uniform, B zeros, the update scaled by alpha/r), the base layers are left as
Hugging Face builds them, ``tf.function`` traces the step with autograph on, Adam updates only A and B,
in float32, with T5's own dropout on. The bench's older "plain" baseline runs our layers and our model
preparation under autograph, so it carries our overheads and cannot show them; this one can.
"""

from __future__ import annotations

import time

import lora_demo  # noqa: F401  (pins one Keras before TensorFlow loads)
import tensorflow as tf

from benchmarks.machine import median_s


class NaiveLora(tf.keras.layers.Layer):
    def __init__(self, base: tf.keras.layers.Dense, rank: int, alpha: float):
        super().__init__(name=base.name + "_naive_lora")
        self.base, self.scale = base, alpha / rank
        d_in, d_out = base.kernel.shape
        self.A = self.add_weight(name="A", shape=(d_in, rank), initializer="he_uniform")
        self.B = self.add_weight(name="B", shape=(rank, d_out), initializer="zeros")

    def call(self, x):
        return self.base(x) + tf.matmul(tf.matmul(x, self.A), self.B) * self.scale


def _attentions(model):
    for block in model.encoder.block:
        yield block.layer[0].SelfAttention
    for block in model.decoder.block:
        yield block.layer[0].SelfAttention
        yield block.layer[1].EncDecAttention


def naive_step(config, batch: dict, rank: int = 8, alpha: float = 16.0, steps: int = 5, profile=None) -> dict:
    """Random-weight T5 of ``config`` with the naive LoRA on q and v: first-loss time (wrapping, trace and
    step 1) and the median time of ``steps`` further steps on ``batch``; ``profile(fn)``, if given, is
    called on the warm step (benchmarks.profile.op_table) and its result returned as ``profile``."""
    from transformers import TFT5ForConditionalGeneration

    tf.keras.utils.set_random_seed(0)
    model = TFT5ForConditionalGeneration(config)
    model(model.dummy_inputs)   # build the weights
    t0 = time.perf_counter()
    wrapped = []
    for attention in _attentions(model):
        for name in ("q", "v"):
            layer = NaiveLora(getattr(attention, name), rank, alpha)
            setattr(attention, name, layer)
            wrapped.append(layer)
    trained = [v for layer in wrapped for v in (layer.A, layer.B)]
    opt = tf.keras.optimizers.Adam(1e-3)

    @tf.function
    def step(b):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(**b, training=True).loss)
        opt.apply_gradients(zip(tape.gradient(loss, trained), trained))
        return loss

    first = float(step(batch))
    first_s = time.perf_counter() - t0
    step(batch)
    out = {"first_loss_s": first_s, "step_s": median_s(lambda: float(step(batch)), steps), "loss": first,
           "trained": int(sum(v.shape.num_elements() for v in trained))}
    if profile is not None:
        out["profile"] = profile(lambda: float(step(batch)))
    return out
