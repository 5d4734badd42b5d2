"""Parameter counts equal the arithmetic, whether from a config or from a built model."""

import numpy as np
import pytest
from conftest import build, tiny_config

from lora_demo.core.config import LoraConfig
from lora_demo.core.inject import apply_lora
from lora_demo.core.models import build_random, shipped_config
from lora_demo.core.params import COMPONENTS, breakdown, preview, specs_from_config, specs_from_model, with_lora


@pytest.mark.parametrize("overrides", [{}, {"feed_forward_proj": "relu"}, {"tie_word_embeddings": True},
                                       {"num_decoder_layers": 1}])
def test_config_enumeration_matches_the_built_model(overrides):
    cfg = tiny_config(**overrides)
    model = build(cfg)
    from_model = sorted((s.path, s.shape) for s in specs_from_model(model))
    from_config = sorted((s.path, s.shape) for s in specs_from_config(cfg))
    assert from_model == from_config


def test_predicted_lora_equals_the_injected_model():
    cfg = tiny_config()
    model = build(cfg)
    lcfg = LoraConfig(rank=3, targets=("q", "k", "wi_1"), side="both", layers=(1, 1))
    apply_lora(model, lcfg)
    measured = breakdown(specs_from_model(model))
    predicted = breakdown(with_lora(specs_from_config(cfg), lcfg))
    assert measured == predicted
    assert measured.trainable == sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert measured.total == sum(int(np.prod(v.shape)) for v in model.weights)


def _expected_qv_lora(cfg, r):
    inner = cfg.num_heads * cfg.d_kv
    per_module = cfg.d_model * r + r * inner
    modules = 2 * (cfg.num_layers + 2 * cfg.num_decoder_layers)  # q,v: enc self; dec self + cross
    return modules * per_module


@pytest.mark.parametrize("name,total,trainable,pct", [
    ("google/flan-t5-small", 77_305_216, 344_064, 0.445),
    ("google/flan-t5-base", 248_462_592, 884_736, 0.356),
])
def test_flan_t5_counts_are_exact(name, total, trainable, pct):
    b = preview(name, LoraConfig(rank=8, targets=("q", "v")))
    assert (b.total, b.trainable) == (total, trainable)
    assert trainable == _expected_qv_lora(shipped_config(name), 8)
    assert round(b.pct_trainable, 3) == pct
    assert b.frozen == total - trainable
    assert b.adapter_mb == trainable * 4 / 1e6
    assert sum(r[1] for r in b.rows()) == total and [r[0] for r in b.rows()] == list(COMPONENTS)


def test_demo_bug_shared_embedding_left_trainable_is_visible():
    """Leaving the 24.7M shared embedding trainable is what turned 0.356% into the demo's ~9-10%."""
    b = preview("google/flan-t5-base", None)
    emb = b.by_component["embeddings"]["params"]
    assert emb == 32128 * 768 == 24_674_304
    assert 9.0 < 100 * (emb + 884_736) / (b.total + 884_736) < 11.0


@pytest.mark.parametrize("name", ["google/flan-t5-small", "google/flan-t5-base"])
def test_shipped_architectures_build_with_the_counted_shapes(name):
    model = build_random(name)
    b = breakdown(specs_from_model(model))
    assert b.total == preview(name, None).total == model.count_params()
    apply_lora(model, LoraConfig(rank=8, targets=("q", "v")))
    assert breakdown(specs_from_model(model)) == preview(name, LoraConfig(rank=8, targets=("q", "v")))
