"""Adapter files that PyTorch PEFT can load: adapter_config.json + adapter_model.safetensors.

Keys use PEFT's names and PyTorch layouts: ``lora_A`` is (r, in) and ``lora_B``
is (out, r), the transposes of the Keras (in, r) and (r, out).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

import re

from .config import ConfigError, LoraConfig
from .inject import lora_layers

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def adapter_state(model) -> dict[str, np.ndarray]:
    """The adapter as PEFT tensors, copied out of the model."""
    state = {}
    for layer in lora_layers(model):
        state[f"{PREFIX}{layer.path}.lora_A.weight"] = np.ascontiguousarray(layer.lora_A.numpy().T)
        state[f"{PREFIX}{layer.path}.lora_B.weight"] = np.ascontiguousarray(layer.lora_B.numpy().T)
    return state


def peft_config(cfg: LoraConfig, base_model: str) -> dict:
    out = {
        "peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": list(cfg.targets),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "modules_to_save": None,
    }
    if cfg.layers is not None:
        out["layers_to_transform"] = list(range(cfg.layers[0], cfg.layers[1] + 1))
        out["layers_pattern"] = "block"
    if cfg.side != "both":
        # PEFT matches target_modules as a regex on the full module name when given a string.
        out["target_modules"] = rf".*{cfg.side}.*\.({'|'.join(cfg.targets)})$"
    return out


def save_adapter(model, cfg: LoraConfig, base_model: str, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(peft_config(cfg, base_model), indent=2) + "\n")
    return out


def load_state(adapter_dir) -> dict[str, np.ndarray]:
    return load_file(str(Path(adapter_dir) / WEIGHTS_FILE))


def assign_state(model, state: dict[str, np.ndarray]) -> None:
    """Copy PEFT tensors into the model's LoRA layers; shapes and keys must match exactly."""
    layers = {layer.path: layer for layer in lora_layers(model)}
    expected = {f"{PREFIX}{p}.lora_{ab}.weight" for p in layers for ab in "AB"}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter keys do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for path, layer in layers.items():
        for ab, var in (("A", layer.lora_A), ("B", layer.lora_B)):
            value = state[f"{PREFIX}{path}.lora_{ab}.weight"].T
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"{path}.lora_{ab}: shape {tuple(value.shape)} does not fit {tuple(var.shape)}")
            var.assign(value)


def lora_config_from_peft(d: dict) -> LoraConfig:
    """Read back what ``peft_config`` writes (list targets, or the side-restricted regex)."""
    targets, side = d.get("target_modules"), "both"
    if isinstance(targets, str):
        m = re.fullmatch(r"\.\*(encoder|decoder)\.\*\\\.\(([\w|]+)\)\$", targets)
        if not m:
            raise ConfigError(f"unsupported target_modules pattern {targets!r}")
        side, targets = m[1], m[2].split("|")
    blocks = d.get("layers_to_transform")
    if isinstance(blocks, int):
        blocks = [blocks]
    if blocks and list(blocks) != list(range(min(blocks), max(blocks) + 1)):
        raise ConfigError("only a contiguous layers_to_transform range is supported")
    return LoraConfig(rank=d["r"], alpha=d["lora_alpha"], targets=tuple(targets), side=side,
                      layers=(min(blocks), max(blocks)) if blocks else None, dropout=d.get("lora_dropout", 0.0))


def read_adapter(adapter_dir) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """An adapter directory as (config, PEFT-keyed arrays). Reads safetensors only, never pickle."""
    path = Path(adapter_dir)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{path} must contain {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = lora_config_from_peft(json.loads((path / CONFIG_FILE).read_text()))
    return cfg, load_state(path)
