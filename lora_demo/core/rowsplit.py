"""Several columns in one batched decode: the base rows and the rows of each adapter in one batch.

The translate box shows each sentence by the base model and with one or more runs' updates. Merged
inference decodes the batch once per column (kernels W, then W + ΔW of each run). Here the served model's
Dense layers take up to ``SLOTS`` further kernels: the batch is the sentences G + 1 times over (G runs);
the first copy uses W and copy g uses slot g's W'_g = W + ΔW_g, formed exactly as ``adapters.merged_into``
forms it (the same float32 sum), and applied by the same matrix product Keras' Dense uses (the input
flattened to rows, one ``MatMul``). So each row sees what it would see alone and one greedy decode gives
every column, at the matmul cost of the separate decodes but with one decoding loop, one set of kernel
launches per token, and the encoder and lm_head run once on the larger batch.

Layers are converted in place (``__class__`` becomes ``SplitDense``): the same objects, the same
kernel variables and paths, so merging, exporting and reading kernels work as before. The slots and the
switch are plain attributes Keras does not track, so they are never weights or saved.
"""

from __future__ import annotations

import tensorflow as tf

from lora_demo.core.inject import dense_sites

NO_ROW = 2 ** 30   # copies of NO_ROW rows: no batch reaches the second, so every row uses W
SLOTS = 4          # runs one decode can show beside the base model


class _Split:
    """The rows per copy of the sentences (where copy 1 starts), one per model; and what the next trace
    reads as Python values, so a compiled function holds only what its requests use and is kept per
    ``variant``: how many slots are in use (the base alone: none) and which layers hold kernels (set by
    ``load``). Layers that hold none trace as a plain Dense, with no branch: a ``tf.cond`` in every
    Dense made a translate shape take 6 times as long to compile (8 s against 1.2 s on micro)."""

    def __init__(self):
        with tf.device("/CPU:0"):
            self.row = tf.Variable(NO_ROW, dtype=tf.int32, trainable=False, name="split_row")
        self.slots = 0
        self.held: frozenset[str] = frozenset()
        self.filled = 0    # slots 0 .. filled - 1 of each layer in ``held`` hold a kernel; all others are empty


def _empty(layer) -> tf.Tensor:
    """An empty slot: (in, 0), so the rows it would take (none) still multiply through."""
    return tf.zeros((layer.kernel.shape[0], 0))


class SplitDense(tf.keras.layers.Dense):
    """A bias-free Dense whose batch is copies of ``split.row`` rows: copy 0 uses the kernel W and copy g
    its slot g - 1, when slots are in use and this layer holds kernels (both read when traced)."""

    def call(self, inputs):
        dense = tf.keras.layers.Dense.call
        if not self._split.slots or self._path not in self._split.held:
            return dense(self, inputs)
        rows = tf.shape(inputs)[0]
        n = tf.minimum(self._split.row, rows)
        parts = [dense(self, inputs[:n])]
        for g, kernel in enumerate(self._slots[:self._split.slots], start=1):   # copies past the batch: empty
            part = inputs[tf.minimum(g * n, rows):tf.minimum((g + 1) * n, rows)]
            flat = tf.matmul(tf.reshape(part, [-1, tf.shape(part)[-1]]), tf.cast(kernel, self.compute_dtype))
            parts.append(tf.reshape(flat, tf.concat([tf.shape(part)[:-1], [self.units]], 0)))
        out = tf.concat(parts, axis=0)
        out.set_shape(inputs.shape[:-1].concatenate([self.units]))
        return out


def convert(model) -> dict[str, SplitDense]:
    """Give every q/k/v/o/wi*/wo Dense of a plain TF T5 ``SLOTS`` kernel slots (once; its compiled
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
            object.__setattr__(layer, "_path", site.path)
            object.__setattr__(layer, "_slots", [tf.Variable(   # W'_g (its shape follows what is assigned)
                _empty(layer), shape=tf.TensorShape([None, None]), trainable=False, name=f"slot_{g}")
                for g in range(SLOTS)])
        if not isinstance(layer, SplitDense):
            raise ValueError(f"{site.path}: {type(layer).__name__} cannot take further kernels")
        layers[site.path] = layer
    return layers


def split_of(model) -> _Split:
    return model._lora_lab_split


def variant(model) -> tuple:
    """What a trace of ``model`` reads now (slots in use, layers holding kernels; () for a model without
    slots): part of a compiled function's key."""
    split = getattr(model, "_lora_lab_split", None)
    return (split.slots, split.held) if split is not None and split.slots else ()


def holds(layer: SplitDense) -> bool:
    """Whether the layer holds kernels now."""
    return int(tf.size(layer._slots[0])) > 0


def load(layers: dict[str, SplitDense], kernels: dict[str, tf.Tensor] | list[dict[str, tf.Tensor]]) -> None:
    """Slot g of each layer gets ``kernels[g]``'s W' for its path (one dict: slot 0 alone). A layer that some
    run changes and run g leaves alone gets W itself in slot g; every other slot and layer gives its
    memory back, and a layer that no run changes uses W for all rows."""
    groups = [kernels] if isinstance(kernels, dict) else list(kernels)
    if len(groups) > SLOTS:
        raise ValueError(f"at most {SLOTS} runs in one decode, got {len(groups)}")
    if not layers:
        return
    split = next(iter(layers.values()))._split
    held = frozenset(path for path in layers if any(path in group for group in groups))
    try:
        for path, layer in layers.items():
            filled = split.filled if path in split.held else 0     # what the last load left in this layer
            for g, slot in enumerate(layer._slots):
                if path in held and g < len(groups):
                    slot.assign(groups[g].get(path, layer.kernel))
                elif g < filled:
                    slot.assign(_empty(layer))
    except BaseException:   # stopped part-way: record every slot that may hold a kernel, so the next load empties it
        split.held, split.filled = split.held | held, max(split.filled, len(groups))
        raise
    split.held, split.filled = held, len(groups) if held else 0


def clear(layers: dict[str, SplitDense]) -> None:
    load(layers, [])
