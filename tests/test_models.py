"""Model loading: tiny, a local checkpoint directory, and a clean fallback when a model cannot load."""

import numpy as np
import pytest
import tensorflow as tf

from lora_demo.models import TINY_DIR, load_model, model_config, shipped_config


def test_local_checkpoint_directory_loads_like_tiny(bundled_tiny):
    local = load_model(str(TINY_DIR), fallback=False)
    assert local.kind == "local" and local.notice == ""
    ids = tf.constant([[5, 9, 13, 1]], tf.int32)
    dec = tf.constant([[0, 4]], tf.int32)
    np.testing.assert_array_equal(local.model(input_ids=ids, decoder_input_ids=dec).logits.numpy(),
                                  bundled_tiny.model(input_ids=ids, decoder_input_ids=dec).logits.numpy())


def test_unreachable_hub_model_falls_back_with_a_notice():
    loaded = load_model("google/flan-t5-small")  # HF_HUB_OFFLINE=1 and not cached
    assert loaded.kind == "tiny" and "Could not load 'google/flan-t5-small'" in loaded.notice
    assert "--model" in loaded.notice and "offline" in loaded.notice
    assert loaded.label.startswith("tiny (bundled offline test model")
    with pytest.raises(Exception):
        load_model("google/flan-t5-small", fallback=False)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory"):
        load_model(str(tmp_path / "nope"), fallback=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tf_model.h5"):
        load_model(str(empty), fallback=False)


def test_configs_without_weights():
    assert shipped_config("google/flan-t5-base").d_model == 768
    assert shipped_config("flan-t5-small").num_layers == 8
    assert model_config("tiny").vocab_size == 4000
