"""Adapters coming in: uploaded files parsed from bytes (never unpickled, never unpacked to disk) with a
size cap, checked against PEFT's LoRA config and against the chosen base model's every shape."""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
import re
import zipfile
from pathlib import Path


from lora_demo.core.config import MODULES, ConfigError, LoraConfig, limits
from lora_demo.core.inject import MODULE_PATH, base_dense, dense_sites, select_paths
from lora_demo.adapters.files import Adapter, AdapterError, CONFIG_FILE, KEY, MAGNITUDE, PREFIX, WEIGHTS_FILE
from lora_demo.adapters.files import parse_safetensors

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
IGNORED_FILES = ("README.md",)                         # PEFT writes a model card beside the adapter
MAX_ZIP_RATIO = 200                                    # float tensors compress ~1.1x; 200x is a bomb


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


def check_fits(adapter: Adapter, model, model_name: str = "") -> LoraConfig:
    """Check every key and shape against ``model``; return the config normalised to this model.

    Raises AdapterError naming the first thing that does not fit, and what the model has instead.
    """
    sites = {s.path: base_dense(getattr(s.owner, s.attr)) for s in dense_sites(model)}
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
