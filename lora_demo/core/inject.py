"""Find T5's Dense layers by module name and block range, wrap them in LoRA, freeze the rest.

Paths use the PyTorch/PEFT module names (``encoder.block.0.layer.0.SelfAttention.q``)
so that selection, the parameter breakdown and adapter files all speak one language.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import numpy as np

import tensorflow as tf

from lora_demo.core.config import MODULES, ConfigError, LoraConfig
from lora_demo.core.lora import DropoutClock, LoraDense
from lora_demo.core.state import state_of

MODULE_PATH = re.compile(
    r"^(?P<side>encoder|decoder)\.block\.(?P<block>\d+)\.layer\.\d+\."
    r"(?P<kind>SelfAttention|EncDecAttention|DenseReluDense)\.(?P<module>q|k|v|o|wi|wi_0|wi_1|wo)$"
)


@dataclass(frozen=True)
class Site:
    """One Dense that LoRA can wrap: its path, the layer that owns it, and the attribute name."""

    path: str
    owner: tf.keras.layers.Layer
    attr: str


def dense_sites(model) -> list[Site]:
    """Every q/k/v/o/wi*/wo Dense of a TF T5, in model order."""
    sites = []
    for side in ("encoder", "decoder"):
        for b, block in enumerate(getattr(model, side).block):
            for li, sub in enumerate(block.layer):
                for kind in ("SelfAttention", "EncDecAttention", "DenseReluDense"):
                    owner = getattr(sub, kind, None)
                    if owner is None:
                        continue
                    for attr in ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"):
                        if hasattr(owner, attr):
                            sites.append(Site(f"{side}.block.{b}.layer.{li}.{kind}.{attr}", owner, attr))
    return sites


def select_paths(paths: list[str], cfg: LoraConfig) -> list[str]:
    """The module paths ``cfg`` targets. Raises ConfigError naming what exists when nothing matches.

    Pure (paths in, paths out): the parameter preview uses it on a config's
    paths before any model is built, and injection uses it on the real model.
    """
    parsed = [(p, MODULE_PATH.match(p)) for p in paths]
    parsed = [(p, m) for p, m in parsed if m]
    present = [t for t in MODULES if any(m["module"] == t for _, m in parsed)]   # canonical order
    missing = [t for t in cfg.targets if t not in present]
    if missing:
        raise ConfigError(f"target module(s) {', '.join(missing)} not found in this model; "
                          f"it has {', '.join(present)}")
    depth = {side: 1 + max((int(m["block"]) for _, m in parsed if m["side"] == side), default=-1)
             for side in ("encoder", "decoder")}
    sides = ("encoder", "decoder") if cfg.side == "both" else (cfg.side,)
    if cfg.layers is not None:
        first, last = cfg.layers
        for side in sides:
            if last >= depth[side]:
                raise ConfigError(f"layer range {first}-{last} is outside the {side}, which has blocks "
                                  f"0-{depth[side] - 1}")
    return [p for p, m in parsed
            if m["side"] in sides and m["module"] in cfg.targets
            and (cfg.layers is None or cfg.layers[0] <= int(m["block"]) <= cfg.layers[1])]


def lora_layers(model) -> list[LoraDense]:
    return [getattr(s.owner, s.attr) for s in dense_sites(model) if isinstance(getattr(s.owner, s.attr), LoraDense)]


def generation(model) -> int:
    """A counter bumped whenever adapters are added or removed: compiled functions key on it,
    because a tf.function traced before the change would still run the old layers."""
    return state_of(model).generation


def _bump(model) -> None:
    state_of(model).generation += 1


def remove_lora(model) -> None:
    """Put the original Dense layers back (an unmerged adapter leaves no trace in the base)."""
    _bump(model)
    for site in dense_sites(model):
        layer = getattr(site.owner, site.attr)
        if isinstance(layer, LoraDense):
            if layer.merged:
                layer.unmerge()
            setattr(site.owner, site.attr, layer.base)


def freeze_base(model) -> None:
    """Make every non-LoRA weight non-trainable, including embeddings and lm_head.

    Keras 2 hides *all* children's weights when a parent layer has
    ``trainable=False``, and T5's attention layers own both a weight
    (relative_attention_bias) and the Dense children that carry LoRA. So instead
    of flipping flags on parents, each layer's own trainable weights are moved
    to its non-trainable list; LoRA layers keep theirs.
    """
    for layer in model._flatten_layers(include_self=True):
        if isinstance(layer, LoraDense):
            continue
        if layer._trainable_weights:
            layer._non_trainable_weights.extend(layer._trainable_weights)
            layer._trainable_weights = []


def _layer_seed(seed: int, i: int) -> int:
    """The seed of the i-th adapted layer's A in a run seeded ``seed``."""
    return seed * 100_003 + i


def apply_lora(model, cfg: LoraConfig, seed: int = 0, clock: DropoutClock | None = None) -> list[LoraDense]:
    """Wrap the targeted Dense layers (replacing any earlier adapter) and freeze the base.
    With a ``clock`` (training), LoRA dropout masks are keyed on it (see lora.StepDropout)."""
    remove_lora(model)
    sites = {s.path: s for s in dense_sites(model)}
    chosen = select_paths(list(sites), cfg)
    # Every A is drawn from its own explicit seed. No global tf.random.set_seed here: it clears
    # TensorFlow's function caches, so compiled translate and train functions would be rebuilt.
    if not cfg.adapter:
        raise ConfigError("full fine-tuning adds no adapter; train the model's own weights instead")
    wrapped = []
    for i, path in enumerate(chosen):
        site = sites[path]
        try:
            layer = LoraDense(getattr(site.owner, site.attr), cfg.rank, cfg.alpha, cfg.dropout, path=path,
                              seed=_layer_seed(seed, i), clock=clock, method=cfg.method)
        except ValueError as exc:   # e.g. a PiSSA rank above the layer's smaller side
            for done in wrapped:
                setattr(sites[done.path].owner, sites[done.path].attr, done.base)
            raise ConfigError(str(exc)) from None
        setattr(site.owner, site.attr, layer)
        wrapped.append(layer)
    freeze_base(model)
    _bump(model)
    return wrapped


def reattach(model, layers: list[LoraDense], alpha: float, seed: int) -> list[LoraDense]:
    """Put LoRA layers from an earlier run back in their places, reset as apply_lora would make them
    (A from ``seed``, B = 0). A compiled step that captured these layers' variables then serves
    the new run without tracing again."""
    remove_lora(model)
    sites = {s.path: s for s in dense_sites(model)}
    for i, layer in enumerate(layers):
        site = sites[layer.path]
        if getattr(site.owner, site.attr) is not layer.base:
            raise ValueError(f"{layer.path}: the cached adapter layer wraps a different Dense")
        layer.reset(alpha, _layer_seed(seed, i))
        setattr(site.owner, site.attr, layer)
    freeze_base(model)
    _bump(model)
    return layers


def set_scale(model, scale: float) -> None:
    """Adapter strength at inference: 0 is the base model exactly, 1 as trained."""
    for layer in lora_layers(model):
        layer.scale.assign(float(scale))


@contextlib.contextmanager
def at_scale(model, scale: float):
    """Inside the block the adapters act at ``scale`` (0: the base model, exactly); afterwards at 1,
    whatever happened inside. The one place a scale is set for a while and put back."""
    set_scale(model, scale)
    try:
        yield model
    finally:
        set_scale(model, 1.0)


def base_dense(layer):
    """The frozen Dense under a LoRA layer, or the layer itself."""
    return layer.base if isinstance(layer, LoraDense) else layer


def base_kernels(model) -> dict[str, np.ndarray]:
    """The frozen base kernel W (in, out) of every LoRA-able layer, float64, whether or not it carries
    an adapter: read once per model by whoever needs ‖W‖ or W itself (anatomy, analysis)."""
    return {s.path: base_dense(getattr(s.owner, s.attr)).kernel.numpy().astype(np.float64) for s in dense_sites(model)}
