"""Load the base model: a hub id, a local checkpoint directory, or a bundled model (``tiny``, ``micro``).

If the chosen model cannot be loaded (offline and not cached, a typo, a broken
directory), ``load_model(..., fallback=True)`` returns ``tiny`` with a notice
that says why, so the app always starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf
from transformers import AutoTokenizer, T5Config, TFT5ForConditionalGeneration

from lora_demo import ASSETS
from lora_demo.core.hub import hub_reachable

log = logging.getLogger(__name__)

TINY_DIR = ASSETS / "tiny"
# Bundled models (scripts/build_tiny.py): tiny is the offline app's weak but real translator;
# micro is the test suite's fast 2.5M-parameter model, not a translator.
BUNDLED = {"tiny": TINY_DIR, "micro": ASSETS / "micro"}
DEFAULT_MODEL = "google/flan-t5-small"
SHIPPED_CONFIGS = {"google/flan-t5-small": "flan-t5-small.json", "google/flan-t5-base": "flan-t5-base.json"}
TINY_LABEL = ("tiny (bundled offline model: a 10M-parameter T5 pre-trained from scratch on Multi30k captions, "
              "Europarl and newstest2011-2013 news; see assets/tiny/build_info.json)")
MICRO_LABEL = "micro (bundled test model: a 2.5M-parameter T5, not a translator)"


@dataclass
class LoadedModel:
    model: TFT5ForConditionalGeneration
    tokenizer: object
    name: str            # what was asked for, or "tiny"
    kind: str            # "hub", "local", "tiny" or "micro"
    notice: str = ""     # non-empty when we fell back; shown in the UI and the log

    @property
    def label(self) -> str:
        return {"tiny": TINY_LABEL, "micro": MICRO_LABEL}.get(self.kind, self.name)


def base_scores(kind: str) -> str:
    """The bundled model's own scores, as its build measured them (build_info.json), in one line; "" if none."""
    import json

    path = BUNDLED.get(kind, Path("/nonexistent")) / "build_info.json"
    try:
        scored = json.loads(path.read_text())["scores_greedy_64_tokens"]
    except (OSError, ValueError, KeyError):
        return ""
    parts = [f"{name.split(' (')[0]} BLEU {s['bleu']:.1f} / chrF {s['chrf']:.1f}" for name, s in scored.items() if s]
    return "the base, greedy: " + " · ".join(parts) if parts else ""


def base_saw(kind: str) -> str:
    """What a bundled model was pre-trained on, as its build recorded it (build_info.json); "" if unknown."""
    import json

    try:
        return json.loads((BUNDLED[kind] / "build_info.json").read_text())["what_the_base_saw"]
    except (KeyError, OSError, ValueError):
        return ""


def shipped_config(name: str) -> T5Config | None:
    """The bundled config of flan-t5-small/base (no weights), or None."""
    key = SHIPPED_CONFIGS.get(name) or SHIPPED_CONFIGS.get(f"google/{name}")
    return T5Config.from_json_file(ASSETS / "configs" / key) if key else None


def model_config(name: str) -> T5Config:
    """A model's config without loading weights: tiny, shipped, local dir, or (online) the hub."""
    if name in BUNDLED:
        return T5Config.from_json_file(BUNDLED[name] / "config.json")
    cfg = shipped_config(name)
    if cfg is not None:
        return cfg
    if Path(name).is_dir():
        return T5Config.from_pretrained(name)
    return T5Config.from_pretrained(name, local_files_only=not hub_reachable())


def build_random(name: str, seed: int = 0) -> TFT5ForConditionalGeneration:
    """The exact architecture of ``name`` with random weights (benchmarks, tests; no download)."""
    tf.keras.utils.set_random_seed(seed)
    model = TFT5ForConditionalGeneration(model_config(name))
    model(model.dummy_inputs)
    return model


def from_pytorch_safetensors(config: T5Config, weights_file) -> TFT5ForConditionalGeneration:
    """A TF T5 from a PyTorch-format ``model.safetensors`` (what the hub ships for FLAN-T5 today), no torch.

    transformers 4.57's own TF path for such a file iterates a ``safe_open`` handle, which safetensors does
    not support ("'builtins.safe_open' object is not iterable", transformers issue 40028), so a plain
    ``from_pretrained`` of ``google/flan-t5-small`` fails when it picks that file. Here the tensors are read
    as numpy and handed to the same converter, and every TF weight must be found (PyTorch's tied
    ``embed_tokens`` copies of ``shared`` are the only keys the TF model does not use)."""
    from safetensors.numpy import load_file
    from transformers.modeling_tf_pytorch_utils import load_pytorch_state_dict_in_tf2_model

    model = TFT5ForConditionalGeneration(config)
    model(model.dummy_inputs)
    state = load_file(str(weights_file))
    _, info = load_pytorch_state_dict_in_tf2_model(model, state, allow_missing_keys=True, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(f"{weights_file} does not fit {config.name_or_path or 'the config'}: missing "
                         f"{info['missing_keys'][:3]}, mismatched {info['mismatched_keys'][:3]}")
    return model


def _load_dir(path: Path):
    has_tf = (path / "tf_model.h5").exists()
    has_safe = (path / "model.safetensors").exists()
    if not (has_tf or has_safe or (path / "pytorch_model.bin").exists()):
        raise FileNotFoundError(f"{path} has no tf_model.h5, model.safetensors or pytorch_model.bin")
    if has_tf:
        model = TFT5ForConditionalGeneration.from_pretrained(str(path), use_safetensors=False)
    elif has_safe:
        model = from_pytorch_safetensors(T5Config.from_pretrained(str(path)), path / "model.safetensors")
    else:   # pytorch_model.bin: transformers converts it (needs torch installed)
        model = TFT5ForConditionalGeneration.from_pretrained(str(path), from_pt=True)
    return model, AutoTokenizer.from_pretrained(str(path))


def _load_hub(name: str):
    """A hub model, from the local cache when the hub is offline: its tf_model.h5 where the repo has one,
    else its PyTorch-format model.safetensors (read without torch), else pytorch_model.bin (with torch)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    local_only = not hub_reachable()  # offline: use the cache if it has the model, fail fast if not
    try:
        model = TFT5ForConditionalGeneration.from_pretrained(name, local_files_only=local_only, use_safetensors=False)
    except OSError as exc:
        if "tf_model.h5" not in str(exc):
            raise
        try:
            weights = hf_hub_download(name, "model.safetensors", local_files_only=local_only)
        except (EntryNotFoundError, LocalEntryNotFoundError):
            model = TFT5ForConditionalGeneration.from_pretrained(name, local_files_only=local_only, from_pt=True)
        else:
            model = from_pytorch_safetensors(T5Config.from_pretrained(name, local_files_only=local_only), weights)
    return model, AutoTokenizer.from_pretrained(name, local_files_only=local_only)


def load_model(name: str = DEFAULT_MODEL, fallback: bool = True, precision: str = "fp32") -> LoadedModel:
    """Load ``name``; on failure return ``tiny`` with a notice (or raise if ``fallback`` is off).

    The model computes in ``precision`` (``auto`` resolves by hardware; see resolve_precision). In
    bf16 its weights are held in bf16 (see precision_policy); it is loaded in float32 and copied.
    """
    loaded = _load_any(name, fallback)
    if resolve_precision(precision) == "bf16":
        loaded.model = copy_model(loaded.model, "bf16")
    return loaded


def copy_model(model, precision: str = "fp32"):
    """A second model with ``model``'s weights, in ``precision`` (bf16: each weight rounded once);
    no disk I/O. The source must carry no adapter."""
    from lora_demo.core.params import keras_name_to_path

    with precision_policy(precision):
        copy = type(model)(model.config)
        copy(copy.dummy_inputs)
    source = {keras_name_to_path(v.name): v for v in model.weights}
    for dst in copy.weights:
        src = source[keras_name_to_path(dst.name)]
        dst.assign(tf.cast(src, dst.dtype) if src.dtype != dst.dtype else src)
    return copy


def _load_any(name: str, fallback: bool) -> LoadedModel:
    try:
        if name in BUNDLED:
            model, tok = _load_dir(BUNDLED[name])
            return LoadedModel(model, tok, name, name)
        path = Path(os.path.expanduser(name))
        if path.is_dir():
            model, tok = _load_dir(path)
            return LoadedModel(model, tok, str(path), "local")
        if path.suffix or name.startswith((".", "/", "~")):
            raise FileNotFoundError(f"no model directory at {path}")
        model, tok = _load_hub(name)
        return LoadedModel(model, tok, name, "hub")
    except Exception as exc:
        if not fallback or name in BUNDLED:
            raise
        why = _why(name, exc)
        notice = (f"Could not load {name!r}: {why}. Running on the bundled offline model tiny instead. "
                  f"To use FLAN-T5 offline, download it once (e.g. `huggingface-cli download {DEFAULT_MODEL}`) "
                  f"or point `--model` at a local checkpoint directory: `python app.py --model /path/to/flan-t5-small`.")
        log.warning(notice)
        loaded = _load_any("tiny", fallback=False)
        loaded.notice = notice
        return loaded


def _why(name: str, exc: Exception) -> str:
    if not Path(name).exists() and not hub_reachable():
        return "the Hugging Face hub is not reachable (offline) and the model is not in the local cache"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def configure_devices() -> dict:
    """Let TensorFlow grow GPU memory on demand instead of taking all of it at start-up, so the
    training worker and the translation copy share a GPU with other processes. Must run before
    TensorFlow touches a GPU (app.py calls it first). Returns what it did, for the start-up log."""
    done = {"gpus": 0, "memory_growth": []}
    for gpu in tf.config.list_physical_devices("GPU"):
        done["gpus"] += 1
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
            done["memory_growth"].append(gpu.name)
        except RuntimeError as exc:  # already initialised: too late to change, and harmless
            log.warning("could not enable memory growth on %s: %s", gpu.name, exc)
    return done


def gpu_bf16_capable(details: dict) -> bool:
    """bf16 matmuls are fast from compute capability 8.0 (Ampere: A10G, A100, L4, ...), not on a T4 (7.5).
    ``details`` is what ``tf.config.experimental.get_device_details(gpu)`` returns."""
    cc = details.get("compute_capability")
    return bool(cc) and tuple(cc) >= (8, 0)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return fh.read()
    except OSError:
        return ""


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bf16 matrices natively (Linux /proc/cpuinfo flags)."""
    flags = _cpu_flags()
    return " amx_bf16" in flags or " avx512_bf16" in flags


def cpu_isa() -> str:
    """The highest matrix instruction-set level the CPU reports, named next to every timing figure."""
    flags = _cpu_flags()
    for flag, name in ((" amx_bf16", "AMX"), (" avx512_bf16", "AVX512-BF16"), (" avx512f", "AVX-512"),
                       (" avx2", "AVX2")):
        if flag in flags:
            return name
    return "unknown"


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(requested: str = "auto") -> str:
    """``auto`` -> bf16 where the hardware does bf16 matmuls fast (every GPU of compute capability
    8.0+, or a CPU with AVX512-BF16/AMX), else fp32. ``fp32`` and ``bf16`` are taken as given."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        return requested
    info = device_info()
    fast = info["bf16"] if info["device"] == "GPU" else cpu_has_fast_bf16()
    return "bf16" if fast else "fp32"


KERAS_POLICIES = {"bf16": "bfloat16", "fp32": "float32", "mixed": "mixed_bfloat16"}   # precision -> Keras policy


@contextlib.contextmanager
def precision_policy(precision: str):
    """Models built inside compute in ``precision``. In bf16 the frozen weights are *stored* in bf16
    (Keras' "bfloat16" policy), once: Keras' mixed policy would keep float32 weights and cast every
    one to bf16 in every step, which costs the casts' time and holds their copies for the backward
    pass. The computation is the same either way, since a frozen weight rounded once equals one
    rounded per step. LoRA factors, their gradients, the optimiser state and the loss stay float32
    (LoraDense is float32 whatever the policy).

    "mixed" is Keras' mixed_bfloat16 (float32 weights, bf16 compute): what trains every weight, as the
    tiny base's build does, since bf16-stored weights would lose its small updates."""
    if precision not in KERAS_POLICIES:
        raise ValueError(f"precision must be one of {', '.join(KERAS_POLICIES)}, got {precision!r}")
    before = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(KERAS_POLICIES[precision])
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(before)


def model_precision(model) -> str:
    return "bf16" if model.compute_dtype == "bfloat16" else "fp32"


def variable_device(model) -> str:
    """Where the model's weights live; new variables (LoRA A/B, optimiser slots) go beside them."""
    weights = model.weights
    return weights[0].device if weights else ""


def reset_gpu_peak() -> None:
    if tf.config.list_physical_devices("GPU"):
        tf.config.experimental.reset_memory_stats("GPU:0")


def peak_gpu_mb() -> float | None:
    """Peak GPU memory TensorFlow allocated since the last reset, in MiB; None without a GPU."""
    if not tf.config.list_physical_devices("GPU"):
        return None
    return round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20, 1)


def device_info() -> dict:
    """Which device TensorFlow trains on, for the start-up log and the UI."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = [tf.config.experimental.get_device_details(g) for g in gpus]
        names = [d.get("device_name", g.name) for d, g in zip(details, gpus)]
        return {"device": "GPU", "name": ", ".join(names), "count": len(gpus),
                "bf16": all(gpu_bf16_capable(d) for d in details), "tensorflow": tf.__version__}
    return {"device": "CPU", "name": f"CPU ({os.cpu_count()} cores)", "count": 1, "bf16": None,
            "tensorflow": tf.__version__}


def is_gpu() -> bool:
    return device_info()["device"] == "GPU"


def describe(loaded: LoadedModel) -> str:
    info = device_info()
    extra = f", bf16 {'yes' if info['bf16'] else 'no'}" if info["device"] == "GPU" else ""
    return (f"model: {loaded.label} · device: {info['name']}{extra} · TensorFlow {info['tensorflow']} · "
            f"weights on {variable_device(loaded.model) or 'default device'}")

