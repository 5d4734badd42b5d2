"""Translation latency of the translate box: every column from one batched decode (core.rowsplit), against
one decode per column, on the same weights and inputs in the same run."""

from __future__ import annotations

import time

import numpy as np

from benchmarks import RANK
from benchmarks.machine import median_s

RUNS_BESIDE = 3   # the four-column figure: the base and three runs (e.g. r=1, 4 and 16 of a sweep)


def _rows(tokens: np.ndarray) -> list[list[int]]:
    """Generated ids per row without the trailing padding (id 0) that a longer row in the batch adds."""
    return [np.trim_zeros(row, "b").tolist() for row in tokens]


def _states(model, cfg, count: int) -> list[dict]:
    """``count`` adapters of ``cfg`` with random non-zero B (so each column differs), as adapter states."""
    import tensorflow as tf

    from lora_demo import adapters
    from lora_demo.core.inject import apply_lora, lora_layers, remove_lora

    states = []
    for k in range(count):
        apply_lora(model, cfg)
        for i, layer in enumerate(lora_layers(model)):
            layer.lora_B.assign(tf.random.stateless_normal(layer.lora_B.shape, seed=(i, k)) * 0.01)
        states.append(adapters.adapter_state(model))
        remove_lora(model)
    return states


def translate_latency(model, served, reps: int = 3) -> dict:
    """``model``: a plain model; ``served``: one of the same architecture, given its weights and kernel slots. Base + LoRA columns
    for 1 and 16 sentences, as the app's translate box does it (one decode of the sentences twice over,
    the second copy on W + ΔW) and as two decodes (a base decode, then one with the adapter merged); and
    for 16 sentences the base beside three runs, one decode of four copies against four decodes.
    ``translate_outputs_equal`` says whether each way gave the same tokens. Times are medians of ``reps``
    calls (1 for a smoke run on a test model)."""
    import tensorflow as tf

    from lora_demo import adapters
    from lora_demo.analysis.evaluate import _compiled_generate
    from lora_demo.core import rowsplit
    from lora_demo.core.config import LoraConfig

    served.set_weights(model.get_weights())   # the same weights, copied before any adapter reorders them
    cfg = LoraConfig(rank=RANK, targets=("q", "v"))
    states = _states(model, cfg, 1 + RUNS_BESIDE)   # the LoRA column's, then the three beside the base
    layers = rowsplit.convert(served)
    out, same = {}, True
    rng = np.random.default_rng(1)
    for n, columns in ((1, 1), (16, 1), (16, RUNS_BESIDE)):
        ids = tf.constant(rng.integers(2, 4000, (n, 32)), tf.int32)
        mask = tf.ones_like(ids)
        chosen = states[:1] if columns == 1 else states[1:]
        rowsplit.load(layers, [adapters.merged_kernels(served, cfg, s) for s in chosen])
        copies = 1 + columns
        rowsplit.split_of(served).slots = columns   # what the served model's trace reads (rowsplit.variant)
        gen, together = _compiled_generate(model, n, 32, 64), _compiled_generate(served, copies * n, 32, 64)
        ids_all, mask_all = tf.concat([ids] * copies, 0), tf.concat([mask] * copies, 0)
        rowsplit.split_of(served).row.assign(n)
        t = time.perf_counter()
        gen(ids, mask).numpy()
        compile_s = time.perf_counter() - t
        together(ids_all, mask_all).numpy()

        def separately():
            decoded = _rows(gen(ids, mask).numpy())
            for s in chosen:
                with adapters.merged_into(model, cfg, s):
                    decoded += _rows(gen(ids, mask).numpy())
            return decoded

        def at_once():
            return together(ids_all, mask_all).numpy()
        results = {}
        key = f"translate_{n}" if columns == 1 else f"translate_{n}_x{copies}"
        if columns == 1:
            out[f"translate_compile_{n}_s"] = compile_s
        out[f"{key}_two_decodes_s" if columns == 1 else f"{key}_separate_s"] = median_s(
            lambda: results.__setitem__("separately", separately()), reps)
        out[f"{key}_s"] = median_s(lambda: results.__setitem__("at_once", _rows(at_once())), reps)
        same = same and results["at_once"] == results["separately"]
    rowsplit.clear(layers)
    rowsplit.split_of(served).slots = 0
    out["translate_outputs_equal"] = bool(same)
    return out
