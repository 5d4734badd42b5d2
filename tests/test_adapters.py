"""Adapter files: PEFT key names and PyTorch layouts; a save/load round trip is exact."""

import json

import numpy as np
import pytest
import tensorflow as tf
from conftest import build, tiny_config
from safetensors.numpy import load_file

from lora_demo import adapters
from lora_demo.config import ConfigError, LoraConfig
from lora_demo.inject import apply_lora, lora_layers

IDS = tf.constant([[5, 9, 13, 1]], tf.int32)


def _logits(m):
    return m(input_ids=IDS, decoder_input_ids=tf.constant([[0, 4, 6]], tf.int32)).logits.numpy()


def test_round_trip_gives_identical_logits(tmp_path):
    cfg = LoraConfig(rank=3, alpha=6, targets=("q", "v", "wo"), side="decoder", layers=(1, 2))
    a = build(tiny_config(), seed=1)
    apply_lora(a, cfg)
    for layer in lora_layers(a):
        layer.lora_B.assign(tf.random.stateless_normal(layer.lora_B.shape, seed=(7, 7)))
    adapters.save_adapter(a, cfg, "tiny", tmp_path)

    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "SEQ_2_SEQ_LM" and conf["r"] == 3
    assert conf["lora_alpha"] == 6 and conf["layers_to_transform"] == [1, 2]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.decoder.block.1.layer.1.EncDecAttention.q.lora_A.weight"
    assert tensors[key].shape == (3, 16)  # PyTorch layout (r, in)
    assert tensors[key.replace("lora_A", "lora_B")].shape == (8, 3)  # (out, r)

    b = build(tiny_config(), seed=1)
    read_cfg, state = adapters.read_adapter(tmp_path)
    assert read_cfg == cfg
    apply_lora(b, read_cfg)
    adapters.assign_state(b, state)
    np.testing.assert_array_equal(_logits(a), _logits(b))


def test_mismatched_adapter_is_refused_with_a_reason(tmp_path):
    a = build(tiny_config())
    apply_lora(a, LoraConfig(rank=2, targets=("q",)))
    state = adapters.adapter_state(a)
    apply_lora(a, LoraConfig(rank=4, targets=("q",)))
    with pytest.raises(ValueError, match="does not fit"):
        adapters.assign_state(a, state)
    with pytest.raises(ValueError, match="missing"):
        adapters.assign_state(a, {k: v for k, v in list(state.items())[1:]})
    with pytest.raises(ConfigError, match="must contain"):
        adapters.read_adapter(tmp_path)
