"""An adapter merged into a base model: ΔW per layer (computed here once for every user), the merge
for the length of a block, and a merged checkpoint for export."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from lora_demo.core.config import LoraConfig
from lora_demo.core.inject import dense_sites, lora_layers
from lora_demo.adapters.files import AdapterError, KEY, MERGE_NOTE, PREFIX, peft_config


def assign_state(model, state: dict[str, np.ndarray]) -> None:
    """Copy PEFT tensors into the model's LoRA layers; shapes and keys must match exactly."""
    layers = {layer.path: layer for layer in lora_layers(model)}
    expected = {f"{PREFIX}{p}.lora_{ab}.weight" for p in layers for ab in "AB"}
    expected |= {f"{PREFIX}{p}.lora_magnitude_vector" for p, layer in layers.items() if layer.magnitude is not None}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise AdapterError(f"adapter keys do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for path, layer in layers.items():
        for ab, var in (("A", layer.lora_A), ("B", layer.lora_B)):
            value = state[f"{PREFIX}{path}.lora_{ab}.weight"].T
            if tuple(value.shape) != tuple(var.shape):
                raise AdapterError(f"{path}.lora_{ab}: shape {tuple(value.shape)} does not fit {tuple(var.shape)}")
            var.assign(value)
        if layer.magnitude is not None:
            layer.magnitude.assign(state[f"{PREFIX}{path}.lora_magnitude_vector"])


def delta(cfg: LoraConfig, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ΔW = c·A·B (c = alpha/r, or alpha/√r for rsLoRA), (in, out), float64; ``a`` (in, r), ``b`` (r, out).
    The one place the update of a pair of factors is formed."""
    return cfg.scaling * (np.asarray(a, np.float64) @ np.asarray(b, np.float64))


def delta_svd(cfg: LoraConfig, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ΔW = c·A·B as (U, s, Vᵀ), (in, r), (r,), (r, out), singular values descending: exact, through
    thin QRs of A and Bᵀ (an r × r SVD instead of an in × out one)."""
    qa, ra = np.linalg.qr(np.asarray(a, np.float64))
    qb, rb = np.linalg.qr(np.asarray(b, np.float64).T)
    u, s, vt = np.linalg.svd(cfg.scaling * ra @ rb.T)
    return qa @ u, s, vt @ qb.T


def deltas(cfg: LoraConfig, state: dict[str, np.ndarray], scale: float = 1.0,
           kernels: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """ΔW at ``scale`` per adapted layer, in the Keras kernel layout (in, out), float32: c·scale·A·B
    (a PiSSA state is stored converted, so the same formula), or for DoRA scale·(W' - W) with
    W' = m ⊙ (W + c·A·B) / ‖W + c·A·B‖ per output column, which needs the base ``kernels``."""
    if cfg.method == "dora" and kernels is None:
        raise ValueError("a DoRA update depends on the base weights: pass kernels")
    out = {}
    for key, a_t in state.items():
        if key.endswith(".lora_A.weight"):
            path = key[len(PREFIX):-len(".lora_A.weight")]
            b_t = state[f"{PREFIX}{path}.lora_B.weight"]
            ab = delta(cfg, a_t.T, b_t.T)
            if cfg.method == "dora":
                w = np.asarray(kernels[path], np.float64)
                adapted = w + ab
                m = state[f"{PREFIX}{path}.lora_magnitude_vector"].astype(np.float64)
                ab = m / np.linalg.norm(adapted, axis=0) * adapted - w
            out[path] = (ab * scale).astype(np.float32)
    return out


def kernel_updates(model, cfg: LoraConfig, state: dict[str, np.ndarray], scale: float = 1.0) -> dict:
    """{path: (the Dense's kernel variable, ΔW at ``scale``)} for an adapter's layers: what merging adds,
    computed once for ``merged_into`` and for the split decode of the served model (lab.serving)."""
    kernels = {s.path: getattr(s.owner, s.attr).kernel for s in dense_sites(model)}
    base = {p: kernels[p].numpy() for p in _state_paths(state)} if cfg.method == "dora" else None
    return {p: (kernels[p], d) for p, d in deltas(cfg, state, scale, base).items()}


def merged_kernels(model, cfg: LoraConfig, state: dict[str, np.ndarray], scale: float = 1.0) -> dict:
    """{path: W + ΔW} for an adapter's layers, the same float32 sum ``merged_into`` leaves in the kernels."""
    import tensorflow as tf

    return {p: var + tf.cast(d, var.dtype) for p, (var, d) in kernel_updates(model, cfg, state, scale).items()}


@contextlib.contextmanager
def merged_into(model, cfg: LoraConfig, state: dict[str, np.ndarray], scale: float = 1.0):
    """Inside the block, ``model``'s kernels carry the adapter (W + ΔW); afterwards they are restored
    bit for bit. ``model`` must be a plain base model (no LoRA layers); the caller serialises access."""
    import tensorflow as tf

    if lora_layers(model):
        raise ValueError("merge into a model without LoRA layers")
    backups = {}
    try:
        if cfg.adapter:
            updates = list(kernel_updates(model, cfg, state, scale).values())
        else:   # full fine-tuning: W + scale·(W_trained - W) for every weight
            from lora_demo.core.params import keras_name_to_path

            weights = {keras_name_to_path(v.name): v for v in model.weights}
            missing = sorted(set(weights) - set(state))
            if missing:
                raise AdapterError(f"the fine-tuned weights do not fit this model: no {missing[0]}")
            updates = [(v, state[p] - v.numpy().astype(np.float32)) for p, v in weights.items()]
            updates = [(v, d * scale) for v, d in updates if d.any()]
        for var, delta in updates:
            backups[var.ref()] = (var, tf.identity(var))
            var.assign_add(tf.cast(delta, var.dtype))
        yield model
    finally:
        for var, value in backups.values():
            var.assign(value)


def _state_paths(state: dict) -> list[str]:
    return [KEY.match(k)["path"] for k in state if KEY.match(k) and k.endswith(".lora_A.weight")]


def export_merged(model, tokenizer, cfg: LoraConfig, state: dict[str, np.ndarray], out_dir,
                  source: dict | None = None) -> Path:
    """A full TF checkpoint (``save_pretrained``) with the adapter merged in, plus the tokenizer.

    ``TFAutoModelForSeq2SeqLM.from_pretrained(out_dir)`` loads it; at inference it costs exactly
    what the base costs. ``model`` is left as it was.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with merged_into(model, cfg, state):
        model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    note = {"merged_adapter": peft_config(cfg, getattr(model.config, "_name_or_path", "") or ""), **(source or {})}
    (out / MERGE_NOTE).write_text(json.dumps(note, indent=2) + "\n")
    return out
