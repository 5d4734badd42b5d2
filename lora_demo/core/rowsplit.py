"""Both columns in one batched decode: the base rows and the adapted rows of one batch.

The translate box shows each sentence twice, by the base model and with a run's update. Merged
inference decodes the batch twice (kernels W, then W + ΔW). Here the served model's Dense layers take a
second kernel: the batch is the sentences twice over, rows before ``split`` use W and rows from it on
use W' = W + ΔW, formed exactly as ``adapters.merged_into`` forms it (the same float32 sum), and applied
by the same ``tensordot`` Keras' Dense uses. So each row sees what it would see alone and one greedy
decode gives both columns, at the matmul cost of the two decodes but with one decoding loop, one set of
kernel launches per token, and the encoder and lm_head run once on the doubled batch.

Layers are converted in place (``__class__`` becomes ``SplitDense``): the same objects, the same
kernel variables and paths, so merging, exporting and reading kernels work as before. The second
kernel and the switches are plain attributes Keras does not track, so they are never weights or saved.
"""

from __future__ import annotations

import tensorflow as tf

from lora_demo.core.inject import dense_sites

NO_ROW = 2 ** 30   # split at a row no batch reaches: every row uses W


class _Split:
    """The batch row from which converted layers use their second kernel, one per model."""

    def __init__(self):
        with tf.device("/CPU:0"):
            self.row = tf.Variable(NO_ROW, dtype=tf.int32, trainable=False, name="split_row")


def _empty() -> tf.Tensor:
    return tf.zeros((0, 0))


class SplitDense(tf.keras.layers.Dense):
    """A bias-free Dense whose rows from ``split.row`` on use its second kernel, when it holds one (an
    empty 0 x 0 kernel is none)."""

    def call(self, inputs):
        dense = tf.keras.layers.Dense.call

        def split():
            k = tf.minimum(self._split.row, tf.shape(inputs)[0])
            rank = inputs.shape.rank
            second = tf.tensordot(inputs[k:], tf.cast(self._second, self.compute_dtype), [[rank - 1], [0]])
            return tf.concat([dense(self, inputs[:k]), second], axis=0)

        out = tf.cond(tf.size(self._second) > 0, split, lambda: dense(self, inputs))
        out.set_shape(inputs.shape[:-1].concatenate([self.units]))
        return out


def convert(model) -> dict[str, SplitDense]:
    """Give every q/k/v/o/wi*/wo Dense of a plain TF T5 a second kernel slot (once; its compiled
    functions must be traced after this). Returns the layers by path."""
    split = getattr(model, "_lora_lab_split", None)
    if split is None:
        split = _Split()
        object.__setattr__(model, "_lora_lab_split", split)   # untracked: not a weight
    layers = {}
    for site in dense_sites(model):
        layer = getattr(site.owner, site.attr)
        if type(layer) is tf.keras.layers.Dense:
            if layer.use_bias or layer.activation is not tf.keras.activations.linear:
                raise ValueError(f"{site.path}: expected a bias-free linear Dense as in T5")
            layer.__class__ = SplitDense
            object.__setattr__(layer, "_split", split)
            object.__setattr__(layer, "_second", tf.Variable(   # W' (its shape follows what is assigned)
                _empty(), shape=tf.TensorShape([None, None]), trainable=False, name="second_kernel"))
        if not isinstance(layer, SplitDense):
            raise ValueError(f"{site.path}: {type(layer).__name__} cannot take a second kernel")
        layers[site.path] = layer
    return layers


def split_of(model) -> _Split:
    return model._lora_lab_split


def holds(layer: SplitDense) -> bool:
    """Whether the layer holds a second kernel now."""
    return int(tf.size(layer._second)) > 0


def load(layers: dict[str, SplitDense], kernels: dict[str, tf.Tensor]) -> None:
    """Second kernels for the paths in ``kernels``; every other layer gives its memory back and uses W
    for all rows."""
    for path, layer in layers.items():
        if path in kernels:
            layer._second.assign(kernels[path])
        elif holds(layer):
            layer._second.assign(_empty())


def clear(layers: dict[str, SplitDense]) -> None:
    load(layers, {})
