"""PEFT-format adapter files: what PyTorch PEFT writes and reads for T5 (see the package's notes), the
weights of a full fine-tuning run, and zips of them for download."""

from __future__ import annotations

import json
import math
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from lora_demo.core.config import ConfigError, LoraConfig
from lora_demo.core.inject import lora_layers

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MERGE_NOTE = "lora_lab_merge.json"
KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])\.weight$")
MAGNITUDE = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_magnitude_vector$")   # DoRA's m, (out,)
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None}
FULL_FILE = "full_weights.safetensors"   # a full fine-tuning run's weights (no adapter)


class AdapterError(ConfigError):
    """An adapter file or directory cannot be used; the message says why and what would fit."""


@dataclass
class Adapter:
    config: LoraConfig
    state: dict[str, np.ndarray]            # PEFT keys -> float32 arrays in PyTorch layouts
    base_model: str = ""                    # base_model_name_or_path from the adapter config
    notices: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return sorted({KEY.match(k)["path"] for k in self.state if KEY.match(k)})

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.state.values())


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------

def adapter_state(model) -> dict[str, np.ndarray]:
    """The adapter as PEFT tensors, copied out of the model.

    A PiSSA adapter comes out converted, as PEFT converts one for the original base: ΔW = c·(A·B -
    A0·B0) is the rank-2r LoRA [A, A0]·[B; -B0], so it loads on the untouched base anywhere. DoRA adds
    PEFT's ``lora_magnitude_vector``."""
    state = {}
    for layer in lora_layers(model):
        a, b = layer.lora_A.numpy(), layer.lora_B.numpy()                 # (in, r), (r, out)
        if layer.start is not None:
            a = np.concatenate([a, layer.start.a0.numpy()], axis=1)
            b = np.concatenate([b, -layer.start.b0.numpy()], axis=0)
        state[f"{PREFIX}{layer.path}.lora_A.weight"] = np.ascontiguousarray(a.T)
        state[f"{PREFIX}{layer.path}.lora_B.weight"] = np.ascontiguousarray(b.T)
        if layer.magnitude is not None:
            state[f"{PREFIX}{layer.path}.lora_magnitude_vector"] = layer.magnitude.numpy()
    return state


def full_state(model) -> dict[str, np.ndarray]:
    """Every weight of a fully fine-tuned model, by PyTorch-style path, Keras layouts, float32."""
    from lora_demo.core.params import keras_name_to_path

    return {keras_name_to_path(v.name): np.asarray(v.numpy(), np.float32) for v in model.weights}


def run_state(model, cfg: LoraConfig) -> dict[str, np.ndarray]:
    """What a run keeps: the adapter, or all weights for full fine-tuning."""
    return adapter_state(model) if cfg.adapter else full_state(model)


def stored_rank(cfg: LoraConfig) -> int:
    """The rank of the stored factors: 2r for PiSSA (converted), else r."""
    return 2 * cfg.rank if cfg.method == "pissa" else cfg.rank


def peft_config(cfg: LoraConfig, base_model: str) -> dict:
    """adapter_config.json for ``cfg``, in a form PEFT's LoraConfig accepts.

    PEFT ignores ``layers_to_transform`` (and refuses it) when ``target_modules`` is a regular
    expression, so a config limited to one stack puts its block range into the expression.
    rsLoRA and DoRA are PEFT flags; PiSSA is written converted (rank 2r, alpha 2·alpha: the same
    alpha/r); LoRA+ differs only in training, so its adapter is plain LoRA.
    """
    if not cfg.adapter:
        raise AdapterError("full fine-tuning has no adapter to export; download the merged checkpoint instead")
    rank = stored_rank(cfg)
    out = {
        "peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": cfg.alpha * rank / cfg.rank, "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.targets),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": cfg.method == "rslora", "use_dora": cfg.method == "dora", "modules_to_save": None,
    }
    blocks = list(range(cfg.layers[0], cfg.layers[1] + 1)) if cfg.layers is not None else None
    if cfg.side != "both":
        block = "|".join(map(str, blocks)) if blocks else r"\d+"
        out["target_modules"] = (rf"{cfg.side}\.block\.({block})\.layer\.\d+\."
                                 rf"(SelfAttention|EncDecAttention|DenseReluDense)\.({'|'.join(cfg.targets)})")
    elif blocks is not None:
        out["layers_to_transform"], out["layers_pattern"] = blocks, "block"
    return out


def write_adapter(state: dict[str, np.ndarray], cfg: LoraConfig, base_model: str, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(peft_config(cfg, base_model), indent=2) + "\n")
    return out


def tensor_bytes(adapter_dir) -> int:
    """Bytes of tensor data in a saved adapter (or a full fine-tuning run's weights): the safetensors
    file minus its 8-byte length and header."""
    path = Path(adapter_dir) / WEIGHTS_FILE
    if not path.is_file():
        path = Path(adapter_dir) / FULL_FILE
    with open(path, "rb") as fh:
        return path.stat().st_size - 8 - int.from_bytes(fh.read(8), "little")


def save_adapter(model, cfg: LoraConfig, base_model: str, out_dir) -> Path:
    return write_adapter(adapter_state(model), cfg, base_model, out_dir)


def save_run_state(model, cfg: LoraConfig, base_model: str, out_dir) -> Path:
    """The adapter (PEFT files) or, for full fine-tuning, every weight in one safetensors file."""
    if cfg.adapter:
        save_adapter(model, cfg, base_model, out_dir)
        return Path(out_dir) / WEIGHTS_FILE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(full_state(model), str(out / FULL_FILE), metadata={"format": "keras"})
    return out / FULL_FILE


# ---------------------------------------------------------------------------
# Import: parse and validate
# ---------------------------------------------------------------------------


def load_state(adapter_dir) -> dict[str, np.ndarray]:
    """The weights of an adapter this app wrote itself (a run's directory), or of a full fine-tuning run."""
    full = Path(adapter_dir) / FULL_FILE
    return parse_safetensors((full if full.is_file() else Path(adapter_dir) / WEIGHTS_FILE).read_bytes())


# ---------------------------------------------------------------------------
# Import: fit to a model, apply, merge
# ---------------------------------------------------------------------------


def zip_dir(src, zip_path, only: tuple[str, ...] | None = None, compress: bool = True) -> Path:
    """The files of ``src`` (or just ``only``) in a zip, inside a folder named after the zip, so that
    unzipping gives a directory PEFT or transformers can load. Uploading the zip back imports it."""
    src, zip_path = Path(src), Path(zip_path)
    files = [src / n for n in only] if only else sorted(f for f in src.rglob("*") if f.is_file())
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for f in files:
            zf.write(f, f"{zip_path.stem}/{f.relative_to(src).as_posix()}")
    return zip_path


def describe(adapter: Adapter) -> str:
    cfg = adapter.config
    blocks = "all blocks" if cfg.layers is None else f"blocks {cfg.layers[0]}-{cfg.layers[1]}"
    return (f"r={cfg.rank}, alpha={cfg.alpha:g} on {'+'.join(cfg.targets)} ({cfg.side}, {blocks}): "
            f"{len(adapter.paths)} layers, {adapter.nbytes / 1e6:.3f} MB")


def parse_safetensors(blob: bytes) -> dict[str, np.ndarray]:
    """A safetensors file from bytes, checked entry by entry; float tensors come back as float32.

    Written out rather than delegated so every malformed case gets a message a person can act
    on, and so bf16 (which numpy lacks) can be read.
    """
    if len(blob) < 8:
        raise AdapterError(f"{WEIGHTS_FILE} is not a safetensors file (only {len(blob)} bytes)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8 or n > 100 * 2**20:
        raise AdapterError(f"{WEIGHTS_FILE} is not a safetensors file (bad header length)")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterError(f"{WEIGHTS_FILE} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{WEIGHTS_FILE} is not a safetensors file (its header is not a table)")
    data, out = memoryview(blob)[8 + n:], {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise AdapterError(f"{WEIGHTS_FILE}: entry {key!r} is malformed") from None
        if dtype not in _DTYPES:
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {key!r} has dtype {dtype}; LoRA weights must be "
                               f"floating point ({', '.join(_DTYPES)})")
        width = 2 if dtype == "BF16" else np.dtype(_DTYPES[dtype]).itemsize
        if any(d < 0 for d in shape) or not (0 <= begin <= end <= len(data)) or end - begin != width * math.prod(shape):
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {key!r} does not fit the file (truncated or corrupt)")
        raw = data[begin:end]
        if dtype == "BF16":
            arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, np.dtype(_DTYPES[dtype]).newbyteorder("<")).astype(np.float32)
        out[key] = arr.reshape(shape)
    return out
