"""Exact parameter breakdown by component, from a built model or from a config alone.

Both sources reduce to a list of ``WeightSpec`` (path, shape, trainable), and a
single function sums them, so the UI, the CLI and the tests agree to the unit.
The config enumeration is checked against a built model in the tests.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lora_demo.core.config import LoraConfig
from lora_demo.core.inject import select_paths

BYTES_FP32 = 4
COMPONENTS = ("embeddings", "encoder attention", "encoder FFN", "decoder self-attention",
              "cross-attention", "decoder FFN", "layer norms", "lm_head", "LoRA")


@dataclass(frozen=True)
class WeightSpec:
    path: str              # PyTorch-style name, e.g. encoder.block.0.layer.0.SelfAttention.q.weight
    shape: tuple[int, ...]
    trainable: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def component(path: str) -> str:
    if ".lora_" in path:
        return "LoRA"
    if path.startswith("shared"):
        return "embeddings"
    if path.startswith("lm_head"):
        return "lm_head"
    if "layer_norm" in path:
        return "layer norms"
    side = "encoder" if path.startswith("encoder") else "decoder"
    if "EncDecAttention" in path:
        return "cross-attention"
    if "SelfAttention" in path:
        return "encoder attention" if side == "encoder" else "decoder self-attention"
    if "DenseReluDense" in path:
        return f"{side} FFN"
    raise ValueError(f"cannot place weight {path!r} in a component")


# ---------------------------------------------------------------------------
# Specs from a config (no weights needed) ...
# ---------------------------------------------------------------------------

def _stack_specs(cfg, side: str, n_blocks: int) -> list[tuple[str, tuple[int, ...]]]:
    d, inner, ff = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    ffn_in = ("wi_0", "wi_1") if cfg.is_gated_act else ("wi",)
    out = []
    for b in range(n_blocks):
        attn = [("SelfAttention", 0)] + ([("EncDecAttention", 1)] if side == "decoder" else [])
        for kind, li in attn:
            pre = f"{side}.block.{b}.layer.{li}.{kind}"
            out += [(f"{pre}.{m}.weight", (d, inner)) for m in ("q", "k", "v")] + [(f"{pre}.o.weight", (inner, d))]
            if b == 0 and kind == "SelfAttention":
                out.append((f"{pre}.relative_attention_bias.weight", (cfg.relative_attention_num_buckets, cfg.num_heads)))
            out.append((f"{side}.block.{b}.layer.{li}.layer_norm.weight", (d,)))
        li = len(attn)
        pre = f"{side}.block.{b}.layer.{li}.DenseReluDense"
        out += [(f"{pre}.{m}.weight", (d, ff)) for m in ffn_in] + [(f"{pre}.wo.weight", (ff, d))]
        out.append((f"{side}.block.{b}.layer.{li}.layer_norm.weight", (d,)))
    out.append((f"{side}.final_layer_norm.weight", (d,)))
    return out


def specs_from_config(cfg) -> list[WeightSpec]:
    """The base weights a TF T5 built from ``cfg`` has, in Keras kernel layout (in, out)."""
    named = [("shared.weight", (cfg.vocab_size, cfg.d_model))]
    named += _stack_specs(cfg, "encoder", cfg.num_layers)
    named += _stack_specs(cfg, "decoder", cfg.num_decoder_layers)
    if not cfg.tie_word_embeddings:
        named.append(("lm_head.weight", (cfg.d_model, cfg.vocab_size)))
    return [WeightSpec(p, s, True) for p, s in named]


def lora_specs(base: list[WeightSpec], cfg: LoraConfig) -> list[WeightSpec]:
    """The A (in, r) and B (r, out) that ``cfg`` adds to ``base`` (the base becomes frozen)."""
    kernels = {s.path[: -len(".weight")]: s.shape for s in base if s.path.endswith(".weight")}
    out = []
    for path in select_paths(list(kernels), cfg):
        d_in, d_out = kernels[path]
        out += [WeightSpec(f"{path}.lora_A.weight", (d_in, cfg.rank), True),
                WeightSpec(f"{path}.lora_B.weight", (cfg.rank, d_out), True)]
        if cfg.method == "dora":
            out.append(WeightSpec(f"{path}.lora_magnitude_vector.weight", (d_out,), True))
    return out


def with_lora(base: list[WeightSpec], cfg: LoraConfig | None) -> list[WeightSpec]:
    """Base frozen plus the LoRA weights; with no LoRA config or full fine-tuning, the base as given."""
    if cfg is None or not cfg.adapter:
        return list(base)
    return [WeightSpec(s.path, s.shape, False) for s in base] + lora_specs(base, cfg)


# ---------------------------------------------------------------------------
# ... or from a built model
# ---------------------------------------------------------------------------

def keras_name_to_path(name: str) -> str:
    """'tft5_for_conditional_generation/encoder/block_._0/layer_._1/DenseReluDense/wo/kernel:0'
    -> 'encoder.block.0.layer.1.DenseReluDense.wo.weight'."""
    name = re.sub(r":\d+$", "", name)
    parts = [p for p in name.split("/") if p]
    for anchor in ("encoder", "decoder", "lm_head", "shared"):
        if anchor in parts:
            parts = parts[parts.index(anchor):]
            break
    path = ".".join(parts)
    path = re.sub(r"_\._(\d+)", r".\1", path)             # block_._0 -> block.0
    path = re.sub(r"\.(kernel|embeddings)$", ".weight", path)
    return re.sub(r"^shared(\.shared)*\.weight$", "shared.weight", path)


def specs_from_model(model) -> list[WeightSpec]:
    """What the model really holds, with Keras' own trainable flags."""
    from lora_demo.core.inject import lora_layers  # local: keeps this module importable without building a model

    lora_ids = {}
    for layer in lora_layers(model):
        lora_ids[id(layer.lora_A)] = f"{layer.path}.lora_A.weight"
        lora_ids[id(layer.lora_B)] = f"{layer.path}.lora_B.weight"
        if layer.magnitude is not None:
            lora_ids[id(layer.magnitude)] = f"{layer.path}.lora_magnitude_vector.weight"
    trainable = {id(v) for v in model.trainable_weights}
    return [WeightSpec(lora_ids.get(id(v)) or keras_name_to_path(v.name), tuple(v.shape), id(v) in trainable)
            for v in model.weights]


# ---------------------------------------------------------------------------
# The breakdown
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Breakdown:
    total: int
    trainable: int
    frozen: int
    by_component: dict[str, dict[str, int]]  # component -> {"params": n, "trainable": n}

    @property
    def pct_trainable(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def adapter_mb(self) -> float:
        """Size of the trainable weights in fp32, in MB (10^6 bytes)."""
        return self.trainable * BYTES_FP32 / 1e6

    def rows(self) -> list[list]:
        rows = []
        for name in COMPONENTS:
            c = self.by_component.get(name, {"params": 0, "trainable": 0})
            rows.append([name, c["params"], c["trainable"], 100.0 * c["params"] / self.total if self.total else 0.0])
        return rows

    def to_dict(self) -> dict:
        return {"total": self.total, "trainable": self.trainable, "frozen": self.frozen,
                "pct_trainable": self.pct_trainable, "adapter_mb": self.adapter_mb,
                "by_component": self.by_component}


def breakdown(specs: list[WeightSpec]) -> Breakdown:
    comp: dict[str, dict[str, int]] = {}
    for s in specs:
        c = comp.setdefault(component(s.path), {"params": 0, "trainable": 0})
        c["params"] += s.size
        c["trainable"] += s.size if s.trainable else 0
    total = sum(s.size for s in specs)
    trainable = sum(s.size for s in specs if s.trainable)
    return Breakdown(total, trainable, total - trainable, comp)


def preview(model_name_or_config, cfg: LoraConfig | None) -> Breakdown:
    """The breakdown for ``cfg`` on a model, from its config alone (no weights, works offline)."""
    from lora_demo.core.models import model_config

    config = model_config(model_name_or_config) if isinstance(model_name_or_config, str) else model_name_or_config
    return breakdown(with_lora(specs_from_config(config), cfg))


def format_table(b: Breakdown) -> str:
    """Plain-text table for the CLI."""
    lines = [f"{'component':<24}{'params':>14}{'trainable':>14}{'% of total':>12}"]
    for name, n, t, pct in b.rows():
        lines.append(f"{name:<24}{n:>14,}{t:>14,}{pct:>11.3f}%")
    lines += ["-" * 64,
              f"{'total':<24}{b.total:>14,}{b.trainable:>14,}",
              f"frozen {b.frozen:,} · trainable {b.trainable:,} ({b.pct_trainable:.3f}%) · "
              f"adapter {b.adapter_mb:.3f} MB in fp32"]
    return "\n".join(lines)
