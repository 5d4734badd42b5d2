"""Model loading: tiny, a local checkpoint directory, and a clean fallback when a model cannot load."""

import numpy as np
import pytest
import tensorflow as tf

from lora_demo.core.models import BUNDLED, load_model, model_config, shipped_config


def test_local_checkpoint_directory_loads_like_tiny(bundled_tiny):
    local = load_model(str(BUNDLED["micro"]), fallback=False)
    assert local.kind == "local" and local.notice == ""
    ids = tf.constant([[5, 9, 13, 1]], tf.int32)
    dec = tf.constant([[0, 4]], tf.int32)
    np.testing.assert_array_equal(local.model(input_ids=ids, decoder_input_ids=dec).logits.numpy(),
                                  bundled_tiny.model(input_ids=ids, decoder_input_ids=dec).logits.numpy())


def test_unreachable_hub_model_falls_back_with_a_notice():
    loaded = load_model("google/flan-t5-small")  # HF_HUB_OFFLINE=1 and not cached
    assert loaded.kind == "tiny" and "Could not load 'google/flan-t5-small'" in loaded.notice
    assert "--model" in loaded.notice and "offline" in loaded.notice
    assert loaded.label.startswith("tiny (bundled offline model")
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
    assert model_config("micro").vocab_size == 4000


def test_device_set_up_on_a_cpu_machine():
    from lora_demo.core.models import configure_devices, device_info

    done = configure_devices()
    assert done == {"gpus": 0, "memory_growth": []} and configure_devices() == done   # idempotent
    info = device_info()
    assert info["device"] == "CPU" and info["bf16"] is None and info["tensorflow"] == tf.__version__


@pytest.mark.parametrize("details, fast", [
    ({"device_name": "Tesla T4", "compute_capability": (7, 5)}, False),
    ({"device_name": "NVIDIA A10G", "compute_capability": (8, 6)}, True),
    ({"device_name": "NVIDIA A100-SXM4-40GB", "compute_capability": (8, 0)}, True),
    ({"device_name": "NVIDIA H100", "compute_capability": (9, 0)}, True),
    ({}, False),
])
def test_bf16_is_used_only_where_the_gpu_does_it_fast(details, fast):
    from lora_demo.core.models import gpu_bf16_capable

    assert gpu_bf16_capable(details) is fast


def test_adapter_weights_are_placed_beside_the_base_weights(bundled_tiny):
    from lora_demo import data
    from lora_demo.core.config import LoraConfig, RunConfig, TrainConfig
    from lora_demo.core.inject import lora_layers, remove_lora
    from lora_demo.core.models import variable_device
    from lora_demo.training.train import train

    run = RunConfig(model="micro", lora=LoraConfig(rank=2, targets=("q",)),
                    train=TrainConfig(steps=2, batch_size=4, train_size=8, eval_size=4, eval_every=2))
    try:
        events = list(train(run, bundled_tiny.model, bundled_tiny.tokenizer, data.load_pairs("train", 8, "bundled"),
                            data.load_pairs("validation", 4, "bundled")))
        assert type(events[-1]).__name__ == "RunFinished"
        where = variable_device(bundled_tiny.model)
        assert where.endswith("CPU:0")
        assert {v.device for layer in lora_layers(bundled_tiny.model) for v in (layer.lora_A, layer.lora_B)} == {where}
    finally:
        remove_lora(bundled_tiny.model)


def test_precision_auto_follows_the_hardware():
    from lora_demo.core.models import cpu_has_fast_bf16, resolve_precision

    assert resolve_precision("auto") == ("bf16" if cpu_has_fast_bf16() else "fp32")   # no GPU here
    assert (resolve_precision("fp32"), resolve_precision("bf16")) == ("fp32", "bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16")   # T5 overflows in fp16


def test_precision_policy_stores_bf16_once_or_keeps_float32_weights_when_mixed():
    """bf16 stores the weights in bf16; "mixed" (the tiny base's build) keeps float32 weights and computes in
    bf16, so a model it trains saves float32 weights; the global policy is restored after either."""
    from lora_demo.core.models import precision_policy

    before = tf.keras.mixed_precision.global_policy().name
    for precision, weights, compute in (("bf16", "bfloat16", "bfloat16"), ("mixed", "float32", "bfloat16"),
                                        ("fp32", "float32", "float32")):
        with precision_policy(precision):
            layer = tf.keras.layers.Dense(4)
            out = layer(tf.ones((1, 3)))
        assert (layer.kernel.dtype.name, out.dtype.name) == (weights, compute), precision
        assert tf.keras.mixed_precision.global_policy().name == before
    with pytest.raises(ValueError, match="precision must be one of"):
        with precision_policy("fp16"):
            pass


def test_offline_the_page_says_it_fell_back_to_tiny(tmp_path):
    """The default model offline: the page built on it says at the top that it runs the bundled tiny and how to
    choose a model (built in-process; the suite's launched app runs micro)."""
    from lora_demo.app import build_demo
    from lora_demo.lab import Lab

    demo = build_demo(Lab(load_model("google/flan-t5-small"), runs_dir=tmp_path))
    notices = [b.value for b in demo.blocks.values() if "notice" in (getattr(b, "elem_classes", None) or [])]
    assert len(notices) == 1, notices
    assert "Could not load 'google/flan-t5-small'" in notices[0] and "--model" in notices[0]
    assert "Running on the bundled offline model tiny instead" in notices[0]
