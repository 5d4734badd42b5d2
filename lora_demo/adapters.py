"""Adapters that travel: PEFT-format files out, validated PEFT-format files in, and merged export.

An adapter directory is what PyTorch PEFT writes and reads for T5:

- ``adapter_config.json``: ``peft_type`` LORA, ``r``, ``lora_alpha``, ``target_modules``, ...
- ``adapter_model.safetensors``: keys such as
  ``base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight`` in PyTorch layouts,
  ``lora_A`` (r, in) and ``lora_B`` (out, r): the transposes of the Keras (in, r) and (r, out).

Import trusts nothing it reads. Files are parsed from bytes (never unpickled, never unpacked to
disk), with a size cap; the config must describe plain LoRA; every key must name a T5 projection
with both halves present; and ``check_fits`` compares every shape with the chosen base model. Each
failure raises ``AdapterError`` with a message that says what is wrong and what would fit.

What the adapter covers is read from its keys, not from ``target_modules``: PEFT accepts module
names, suffixes and regular expressions there, while the keys say exactly which layers were
adapted. LoRA Lab describes that set as targets x stacks x block range and refuses a set that
cannot be described so, rather than silently adapting a different set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import posixpath
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .config import MODULES, ConfigError, LoraConfig, limits
from .inject import MODULE_PATH, dense_sites, lora_layers, select_paths
from .lora import LoraDense

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MERGE_NOTE = "lora_lab_merge.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
IGNORED_FILES = ("README.md",)                         # PEFT writes a model card beside the adapter
KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])\.weight$")
MAGNITUDE = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_magnitude_vector$")   # DoRA's m, (out,)
FULL_FILE = "full_weights.safetensors"   # a full fine-tuning run's weights (no adapter)
MAX_ZIP_RATIO = 200                                    # float tensors compress ~1.1x; 200x is a bomb
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None}


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
    from .params import keras_name_to_path

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


def _number(conf: dict, key: str, kind=float):
    value = conf.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(f"{CONFIG_FILE}: {key} must be a number, got {value!r}")
    if kind is int and float(value) != int(value):
        raise AdapterError(f"{CONFIG_FILE}: {key} must be a whole number, got {value!r}")
    return kind(value)


def _check_peft_config(conf) -> None:
    """Refuse what LoRA Lab cannot reproduce exactly, saying what to change."""
    if not isinstance(conf, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object")
    if conf.get("peft_type") != "LORA":
        raise AdapterError(f"{CONFIG_FILE}: peft_type is {conf.get('peft_type')!r}; only LORA adapters can be "
                           f"imported (not AdaLoRA, IA3, prefix tuning, ...)")
    refused = {"modules_to_save": "adapters that also train whole modules "
               "(modules_to_save)", "rank_pattern": "per-layer ranks (rank_pattern)",
               "alpha_pattern": "per-layer alphas (alpha_pattern)", "target_parameters": "LoRA on raw parameters"}
    for key, what in refused.items():
        if conf.get(key):
            raise AdapterError(f"{CONFIG_FILE}: {what} are not supported; export plain LoRA")
    if conf.get("bias", "none") != "none":
        raise AdapterError(f"{CONFIG_FILE}: bias={conf['bias']!r} trains the T5 biases too (T5 has none); "
                           f"use bias='none'")
    if conf.get("fan_in_fan_out"):
        raise AdapterError(f"{CONFIG_FILE}: fan_in_fan_out=true is for GPT-2-style Conv1D layers, not T5")
    init = conf.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "eva", "loftq")):
        raise AdapterError(f"{CONFIG_FILE}: init_lora_weights={init!r}: this adapter was saved unconverted, so it "
                           f"only works on the residual base model its initialisation made. Save it converted "
                           f"(PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...)); that is "
                           f"a plain LoRA on the original base")
    if conf.get("task_type") not in (None, "SEQ_2_SEQ_LM"):
        raise AdapterError(f"{CONFIG_FILE}: task_type is {conf['task_type']!r}; a FLAN-T5 adapter is SEQ_2_SEQ_LM")


def parse_adapter(config_bytes: bytes, weights_bytes: bytes) -> Adapter:
    """Validate an adapter given as the bytes of its two files (no model needed yet)."""
    try:
        conf = json.loads(config_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON ({exc})") from None
    _check_peft_config(conf)
    notices = []
    r, alpha = _number(conf, "r", int), _number(conf, "lora_alpha")
    method = "dora" if conf.get("use_dora") else "rslora" if conf.get("use_rslora") else "lora"
    if conf.get("use_dora") and conf.get("use_rslora"):
        raise AdapterError(f"{CONFIG_FILE}: DoRA with rsLoRA scaling is not supported; use one of them")
    dropout = conf.get("lora_dropout") or 0.0   # checked by LoraConfig below

    state = parse_safetensors(weights_bytes)
    if not state:
        raise AdapterError(f"{WEIGHTS_FILE} holds no tensors")
    halves: dict[str, set] = {}
    magnitudes = {}
    for key, value in state.items():
        mag = MAGNITUDE.match(key)
        if mag is not None and MODULE_PATH.match(mag["path"]):
            if method != "dora":
                raise AdapterError(f"{WEIGHTS_FILE}: {key} is a DoRA magnitude, but {CONFIG_FILE} has no use_dora")
            if value.ndim != 1:
                raise AdapterError(f"{WEIGHTS_FILE}: {key} has shape {value.shape}; a magnitude is a vector")
            magnitudes[mag["path"]] = value
            continue
        m = KEY.match(key)
        if m is None or not MODULE_PATH.match(m["path"]):
            raise AdapterError(f"{WEIGHTS_FILE}: {key!r} is not a LoRA weight of a T5 projection; keys look like "
                               f"{PREFIX}encoder.block.0.layer.0.SelfAttention.q.lora_A.weight")
        if value.ndim != 2:
            raise AdapterError(f"{WEIGHTS_FILE}: {key} has shape {value.shape}; LoRA weights are matrices")
        want = 0 if m["ab"] == "A" else 1
        if value.shape[want] != r:
            where = "rows (r, in)" if m["ab"] == "A" else "columns (out, r)"
            raise AdapterError(f"{WEIGHTS_FILE}: {key} has shape {tuple(value.shape)}, but r={r} in {CONFIG_FILE} "
                               f"means {r} {where}")
        halves.setdefault(m["path"], set()).add(m["ab"])
    lonely = sorted(p for p, ab in halves.items() if ab != {"A", "B"})
    if lonely:
        raise AdapterError(f"{WEIGHTS_FILE}: {lonely[0]} has only lora_{''.join(halves[lonely[0]])}; "
                           f"every adapted layer needs lora_A and lora_B")
    if method == "dora" and set(magnitudes) != set(halves):
        gap = sorted(set(halves) ^ set(magnitudes))
        raise AdapterError(f"{WEIGHTS_FILE}: a DoRA adapter needs lora_A, lora_B and lora_magnitude_vector for "
                           f"every layer; {gap[0]} lacks one")
    matches = [MODULE_PATH.match(p) for p in halves]
    sides = {m["side"] for m in matches}
    blocks = sorted({int(m["block"]) for m in matches})
    try:
        cfg = LoraConfig(rank=r, alpha=alpha, targets=tuple(m for m in MODULES if m in {x["module"] for x in matches}),
                         side=sides.pop() if len(sides) == 1 else "both", layers=(blocks[0], blocks[-1]),
                         dropout=dropout, method=method)
    except ConfigError as exc:
        raise AdapterError(f"{CONFIG_FILE}: {exc}") from None
    base = conf.get("base_model_name_or_path") or ""
    return Adapter(cfg, state, base if isinstance(base, str) else "", notices)


def _read_capped(path: Path, budget: int) -> bytes:
    size = path.stat().st_size
    if size > budget:
        raise AdapterError(f"{path.name} is {size / 2**20:.1f} MB; the limit is {limits().max_upload_mb} MB "
                           f"(LORA_LAB_MAX_UPLOAD_MB)")
    return path.read_bytes()


def _refuse_pickle(name: str) -> None:
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise AdapterError(f"{name}: pickle-based weight files are refused, because loading one can run code. "
                           f"Save the adapter as {WEIGHTS_FILE} (PEFT's default: save_pretrained(..., "
                           f"safe_serialization=True))")


def _from_zip(path: Path, budget: int) -> dict[str, bytes]:
    """The adapter files inside a zip, read into memory with every entry checked first."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise AdapterError(f"{path.name} is not a readable zip file") from None
    found: dict[str, bytes] = {}
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        folders = set()
        for info in infos:
            name = info.filename
            parts = name.replace("\\", "/").split("/")
            if name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name):
                raise AdapterError(f"{path.name}: entry {name!r} points outside the archive; refused")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise AdapterError(f"{path.name}: entry {name!r} is a symbolic link; refused")
            base = posixpath.basename(name.replace("\\", "/"))
            _refuse_pickle(base)
            if base in IGNORED_FILES or base.startswith(".") or "__MACOSX" in parts:
                continue
            if base not in (CONFIG_FILE, WEIGHTS_FILE):
                raise AdapterError(f"{path.name}: unexpected file {name!r}; an adapter zip holds {CONFIG_FILE} "
                                   f"and {WEIGHTS_FILE}")
            folders.add(posixpath.dirname(name))
            if info.file_size > budget or info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1) + 2**16:
                raise AdapterError(f"{path.name}: {name} would unpack to {info.file_size / 2**20:.1f} MB; refused "
                                   f"(limit {limits().max_upload_mb} MB, LORA_LAB_MAX_UPLOAD_MB)")
            with zf.open(info) as fh:
                blob = fh.read(budget + 1)   # never trust the declared size alone
            if len(blob) > budget:
                raise AdapterError(f"{path.name}: {name} unpacks past the {limits().max_upload_mb} MB limit; refused")
            budget -= len(blob)
            if base in found:
                raise AdapterError(f"{path.name} holds more than one {base}; zip one adapter at a time")
            found[base] = blob
        if len(folders) > 1:
            raise AdapterError(f"{path.name} holds files from several folders; zip one adapter at a time")
    return found


def read_files(sources) -> dict[str, bytes]:
    """Adapter file contents from a directory, a zip, or the two files themselves (e.g. an upload)."""
    cap = limits().max_upload_mb * 2**20
    items = [Path(s) for s in ([sources] if isinstance(sources, (str, Path)) else list(sources))]
    if not items:
        raise AdapterError(f"choose a zip of an adapter, or its {CONFIG_FILE} and {WEIGHTS_FILE}")
    found: dict[str, bytes] = {}

    def remaining() -> int:   # one size budget for everything given together
        return cap - sum(len(b) for b in found.values())

    def add(name: str, blob: bytes, where: Path) -> None:
        if name in found:
            raise AdapterError(f"{name} was given twice (again in {where.name}); give one adapter at a time")
        found[name] = blob

    for item in items:
        if item.is_dir():
            stray = [p.name for p in item.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES)]
            if stray and not (item / WEIGHTS_FILE).is_file():
                _refuse_pickle(stray[0])
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                if (item / name).is_file():
                    add(name, _read_capped(item / name, remaining()), item)
        elif not item.is_file():
            raise AdapterError(f"{item} does not exist")
        elif zipfile.is_zipfile(item) or item.suffix.lower() == ".zip":
            for name, blob in _from_zip(item, remaining()).items():
                add(name, blob, item)
        else:
            _refuse_pickle(item.name)
            name = item.name
            if name.endswith(".json"):
                name = CONFIG_FILE
            elif name.endswith(".safetensors"):
                name = WEIGHTS_FILE
            else:
                raise AdapterError(f"{item.name}: an adapter is {CONFIG_FILE} + {WEIGHTS_FILE}, or a zip of them")
            add(name, _read_capped(item, remaining()), item)
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if n not in found]
    if missing:
        raise AdapterError(f"{' and '.join(missing)} missing; an adapter is {CONFIG_FILE} + {WEIGHTS_FILE} "
                           f"(a directory, a zip of the two, or both files)")
    return found


def read_adapter(sources) -> Adapter:
    """An adapter from a directory, a zip or its two files, fully validated except against a model."""
    files = read_files(sources)
    return parse_adapter(files[CONFIG_FILE], files[WEIGHTS_FILE])


def load_state(adapter_dir) -> dict[str, np.ndarray]:
    """The weights of an adapter this app wrote itself (a run's directory), or of a full fine-tuning run."""
    full = Path(adapter_dir) / FULL_FILE
    return parse_safetensors((full if full.is_file() else Path(adapter_dir) / WEIGHTS_FILE).read_bytes())


# ---------------------------------------------------------------------------
# Import: fit to a model, apply, merge
# ---------------------------------------------------------------------------

def _dense(layer):
    return layer.base if isinstance(layer, LoraDense) else layer


def check_fits(adapter: Adapter, model, model_name: str = "") -> LoraConfig:
    """Check every key and shape against ``model``; return the config normalised to this model.

    Raises AdapterError naming the first thing that does not fit, and what the model has instead.
    """
    sites = {s.path: _dense(getattr(s.owner, s.attr)) for s in dense_sites(model)}
    cfg, paths = adapter.config, adapter.paths
    for_model = f" (adapter made for {adapter.base_model})" if adapter.base_model else ""
    absent = [p for p in paths if p not in sites]
    if absent:
        cfg_m = model.config
        raise AdapterError(f"this model has no layer {absent[0]}{for_model}: it has {cfg_m.num_layers} encoder and "
                           f"{cfg_m.num_decoder_layers or cfg_m.num_layers} decoder blocks with modules "
                           f"{', '.join(sorted({MODULE_PATH.match(p)['module'] for p in sites}))}")
    for path in paths:
        d_in, d_out = sites[path].kernel.shape
        a = adapter.state[f"{PREFIX}{path}.lora_A.weight"]
        b = adapter.state[f"{PREFIX}{path}.lora_B.weight"]
        if a.shape[1] != d_in or b.shape[0] != d_out:
            raise AdapterError(f"{path}: the adapter has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but "
                               f"this model's layer is {d_in} -> {d_out}, so it needs ({cfg.rank}, {d_in}) and "
                               f"({d_out}, {cfg.rank}){for_model}")
        mag = adapter.state.get(f"{PREFIX}{path}.lora_magnitude_vector")
        if mag is not None and mag.shape != (d_out,):
            raise AdapterError(f"{path}: the DoRA magnitude has {mag.shape[0]} entries, but this layer has {d_out} "
                               f"outputs{for_model}")
    # A block range that spans a whole stack is "all blocks".
    depth = {side: 1 + max(int(MODULE_PATH.match(p)["block"]) for p in sites if p.startswith(side))
             for side in ("encoder", "decoder")}
    sides = ("encoder", "decoder") if cfg.side == "both" else (cfg.side,)
    covered = {s: {int(MODULE_PATH.match(p)["block"]) for p in paths if p.startswith(s)} for s in sides}
    if all(covered[s] == set(range(depth[s])) for s in sides):
        cfg = dataclasses.replace(cfg, layers=None)
    expected = set(select_paths(list(sites), cfg))
    if expected != set(paths):
        gap = sorted(expected - set(paths))
        raise AdapterError(
            f"LoRA Lab describes an adapter as target modules x stacks x one block range; this one adapts "
            f"{len(paths)} layers, but that description ({'+'.join(cfg.targets)}, {cfg.side}, blocks "
            f"{'all' if cfg.layers is None else '%d-%d' % cfg.layers}) covers {len(expected)}, e.g. also {gap[0]}")
    adapter.config = cfg
    if model_name and adapter.base_model and adapter.base_model.rstrip("/").split("/")[-1] != \
            str(model_name).rstrip("/").split("/")[-1]:
        adapter.notices.append(f"made for {adapter.base_model}, applied to {model_name}: the shapes fit, but "
                               f"the base weights may differ")
    return cfg


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
            ab = a_t.T.astype(np.float64) @ b_t.T.astype(np.float64) * cfg.scaling
            if cfg.method == "dora":
                w = np.asarray(kernels[path], np.float64)
                adapted = w + ab
                m = state[f"{PREFIX}{path}.lora_magnitude_vector"].astype(np.float64)
                ab = m / np.linalg.norm(adapted, axis=0) * adapted - w
            out[path] = (ab * scale).astype(np.float32)
    return out


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
            kernels = {s.path: getattr(s.owner, s.attr).kernel for s in dense_sites(model)}
            base = {p: kernels[p].numpy() for p in _state_paths(state)} if cfg.method == "dora" else None
            updates = [(kernels[p], d) for p, d in deltas(cfg, state, scale, base).items()]
        else:   # full fine-tuning: W + scale·(W_trained - W) for every weight
            from .params import keras_name_to_path

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


class MergedTranslator:
    """A plain base model that translates for any adapter by merging it in (W + ΔW) for the length
    of one request, under a lock. Its layers never change, so its compiled generate functions are
    traced once per shape for the life of the process: runs do not add compiled programs (a model that
    gets fresh LoRA layers each run compiles new ones every run, and keeps them)."""

    def __init__(self, model, lock=None):
        import threading

        self.model = model
        self.lock = lock if lock is not None else threading.Lock()

    @contextlib.contextmanager
    def use(self, cfg: LoraConfig | None = None, state: dict[str, np.ndarray] | None = None, scale: float = 1.0):
        """The model, carrying ``state`` at ``scale`` (the base model when ``state`` is None)."""
        with self.lock:
            if state is None:
                yield self.model
            else:
                with merged_into(self.model, cfg, state, scale):
                    yield self.model


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
