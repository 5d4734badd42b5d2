"""LoRA invariants on tiny T5 configs: exact zero delta at init, frozen base, merge, no stacking."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import build, tiny_config

from lora_demo.core.config import ConfigError, LoraConfig
from lora_demo.core.inject import apply_lora, lora_layers, remove_lora, set_scale
from lora_demo.core.lora import LoraDense
from lora_demo.training.optimisers import build_optimizer_state, make_optimizer
from lora_demo.training.steps import make_step
from lora_demo.core.config import TrainConfig

IDS = tf.constant([[5, 9, 13, 21, 1, 0], [7, 7, 30, 1, 0, 0]], tf.int32)
DEC = tf.constant([[0, 11, 12, 40], [0, 3, 4, 5]], tf.int32)


def logits(model):
    return model(input_ids=IDS, attention_mask=tf.cast(IDS != 0, tf.int32), decoder_input_ids=DEC).logits.numpy()


def base_weights(model):
    lora = {id(v) for layer in lora_layers(model) for v in (layer.lora_A, layer.lora_B)}
    return {v.name: v.numpy().copy() for v in model.weights if id(v) not in lora}


def test_layer_math_matches_definition():
    # every value seeded: float32 sums of random terms near zero need the absolute tolerance below
    dense = tf.keras.layers.Dense(6, use_bias=False, kernel_initializer=tf.keras.initializers.GlorotUniform(seed=5))
    x = tf.random.stateless_normal((2, 3, 5), seed=(1, 2))
    dense(x)
    layer = LoraDense(dense, rank=2, alpha=8.0, seed=3)
    assert layer.lora_A.shape == (5, 2) and layer.lora_B.shape == (2, 6)
    assert np.all(layer.lora_B.numpy() == 0)
    bound = 1 / np.sqrt(5)  # PEFT's kaiming_uniform(a=sqrt(5)) bound on fan_in=5
    assert np.abs(layer.lora_A.numpy()).max() <= bound
    layer.lora_B.assign(tf.random.stateless_normal((2, 6), seed=(3, 4)))
    want = x.numpy() @ dense.kernel.numpy() + 4.0 * (x.numpy() @ layer.lora_A.numpy() @ layer.lora_B.numpy())
    np.testing.assert_allclose(layer(x).numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.delta().numpy(), 4.0 * layer.lora_A.numpy() @ layer.lora_B.numpy(), rtol=1e-6)


def test_step_zero_equals_base_exactly(tiny_model):
    before = logits(tiny_model)
    apply_lora(tiny_model, LoraConfig(rank=4, targets=("q", "k", "v", "o", "wi_0", "wi_1", "wo")))
    assert np.array_equal(logits(tiny_model), before)


def test_only_lora_is_trainable(tiny_model):
    layers = apply_lora(tiny_model, LoraConfig(rank=2, targets=("q", "v")))
    trainable = {id(v) for v in tiny_model.trainable_weights}
    assert trainable == {id(v) for layer in layers for v in (layer.lora_A, layer.lora_B)}
    names = [v.name for v in tiny_model.non_trainable_weights]
    assert any("shared" in n for n in names) and any("lm_head" in n for n in names)
    assert any("relative_attention_bias" in n for n in names)


def _train_steps(model, n=3, lr=0.05):
    layers = lora_layers(model)
    variables = [v for layer in layers for v in (layer.lora_A, layer.lora_B)]
    opt, _ = make_optimizer(TrainConfig(lr=lr, warmup_steps=0, schedule="constant"))
    build_optimizer_state(opt, variables)
    step = make_step(model, opt, variables, clip_norm=0.0)
    batch = {"input_ids": IDS, "attention_mask": tf.cast(IDS != 0, tf.int32),
             "labels": tf.constant([[11, 12, 40, 1], [3, 4, 1, -100]], tf.int32)}
    return [float(step(batch)[0]) for _ in range(n)]   # the step returns (loss, gradient norm)


def test_base_weights_unchanged_after_training(tiny_model):
    apply_lora(tiny_model, LoraConfig(rank=4, targets=("q", "v", "wo")))
    before = base_weights(tiny_model)
    losses = _train_steps(tiny_model)
    assert losses[-1] < losses[0]
    after = base_weights(tiny_model)
    assert before.keys() == after.keys()
    for name in before:
        assert np.array_equal(before[name], after[name]), name
    assert any(np.any(layer.lora_B.numpy() != 0) for layer in lora_layers(tiny_model))


def test_merge_equals_unmerged_and_unmerge_restores(tiny_model):
    apply_lora(tiny_model, LoraConfig(rank=4, alpha=8, targets=("q", "v", "o")))
    _train_steps(tiny_model)
    kernels = {layer.path: layer.base.kernel.numpy().copy() for layer in lora_layers(tiny_model)}
    unmerged = logits(tiny_model)
    for layer in lora_layers(tiny_model):
        layer.merge()
    np.testing.assert_allclose(logits(tiny_model), unmerged, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        lora_layers(tiny_model)[0].merge()
    for layer in lora_layers(tiny_model):
        layer.unmerge()
        assert np.array_equal(layer.base.kernel.numpy(), kernels[layer.path])
    np.testing.assert_array_equal(logits(tiny_model), unmerged)


def test_scale_zero_is_base_and_scale_is_linear(tiny_model):
    base = logits(tiny_model)
    apply_lora(tiny_model, LoraConfig(rank=2, targets=("q", "v")))
    _train_steps(tiny_model)
    set_scale(tiny_model, 0.0)
    assert np.array_equal(logits(tiny_model), base)
    set_scale(tiny_model, 1.0)
    assert not np.allclose(logits(tiny_model), base)


def test_reapplying_replaces_instead_of_stacking(tiny_model):
    before = logits(tiny_model)
    apply_lora(tiny_model, LoraConfig(rank=8, targets=("q", "v")))
    layers = apply_lora(tiny_model, LoraConfig(rank=2, targets=("q",)))
    assert len(lora_layers(tiny_model)) == len(layers) == 2 + 2 * 3  # enc self; dec self + cross
    assert all(isinstance(layer.base, tf.keras.layers.Dense) and not isinstance(layer.base, LoraDense)
               for layer in layers)
    assert {layer.rank for layer in lora_layers(tiny_model)} == {2}
    n_lora = sum(int(np.prod(v.shape)) for v in tiny_model.trainable_weights)
    assert n_lora == len(layers) * (16 * 2 + 2 * 8)
    remove_lora(tiny_model)
    assert not lora_layers(tiny_model)
    np.testing.assert_array_equal(logits(tiny_model), before)


def test_side_and_block_range_select_the_right_layers(tiny_model):
    layers = apply_lora(tiny_model, LoraConfig(rank=2, targets=("q", "wo"), side="decoder", layers=(1, 2)))
    paths = sorted(layer.path for layer in layers)
    assert paths == sorted(f"decoder.block.{b}.layer.{li}.{kind}.{m}" for b in (1, 2)
                           for li, kind, m in ((0, "SelfAttention", "q"), (1, "EncDecAttention", "q"),
                                               (2, "DenseReluDense", "wo")))


def test_missing_target_names_what_exists(tiny_model):
    with pytest.raises(ConfigError, match=r"wi not found.*q, k, v, o, wi_0, wi_1, wo"):
        apply_lora(tiny_model, LoraConfig(targets=("wi",)))
    relu = build(tiny_config(feed_forward_proj="relu"))
    assert len(apply_lora(relu, LoraConfig(rank=2, targets=("wi",)))) == 2 + 3


def test_layer_range_outside_the_model(tiny_model):
    with pytest.raises(ConfigError, match="outside the encoder, which has blocks 0-1"):
        apply_lora(tiny_model, LoraConfig(layers=(0, 2)))
    assert len(apply_lora(tiny_model, LoraConfig(side="decoder", layers=(0, 2)))) == 12


def test_dropout_only_on_the_lora_path_and_only_in_training(tiny_model):
    apply_lora(tiny_model, LoraConfig(rank=2, targets=("q",), dropout=0.5))
    _train_steps(tiny_model, n=1)
    a = logits(tiny_model)
    np.testing.assert_array_equal(a, logits(tiny_model))  # inference: deterministic


def test_step_dropout_masks_follow_seed_and_step_in_eager_and_compiled_code():
    from lora_demo.core.lora import DropoutClock, StepDropout

    clock = DropoutClock()
    drop = StepDropout(0.5, clock, salt=7)
    x = tf.ones((4, 64))
    compiled = tf.function(lambda t: drop(t, training=True), autograph=False)
    clock.seed.assign(3)
    clock.step.assign(1)
    a, b = drop(x, training=True).numpy(), compiled(x).numpy()
    np.testing.assert_array_equal(a, b)                          # eager and compiled draw the same mask
    assert set(np.unique(a)) == {0.0, 2.0} and 0.3 < (a == 0).mean() < 0.7
    clock.step.assign(2)
    assert not np.array_equal(compiled(x).numpy(), a)           # a new step, a new mask
    clock.seed.assign(4)
    clock.step.assign(1)
    assert not np.array_equal(compiled(x).numpy(), a)           # a new seed, a new mask
    clock.seed.assign(3)
    np.testing.assert_array_equal(compiled(x).numpy(), a)       # and back: a pure function of both
    np.testing.assert_array_equal(drop(x, training=False).numpy(), x.numpy())


@pytest.mark.parametrize("shape", [(8, 64, 512), (31, 5, 77)])   # even last axis: two flags per draw; odd: one
def test_step_dropout_drops_at_its_rate_and_the_same_elements_in_bf16_and_fp32(shape):
    from lora_demo.core.lora import DropoutClock, StepDropout

    clock = DropoutClock()
    clock.seed.assign(5)
    drop = StepDropout(0.1, clock, salt=3)
    x = tf.random.stateless_uniform(shape, (1, 2), 1.0, 2.0)
    fp32 = drop(x, training=True).numpy()
    bf16 = drop(tf.cast(x, tf.bfloat16), training=True).numpy().astype(np.float32)
    dropped = fp32 == 0
    np.testing.assert_array_equal(bf16 == 0, dropped)
    sd = (0.1 * 0.9 / dropped.size) ** 0.5
    assert abs(dropped.mean() - 0.1) < 5 * sd                     # P(drop) = 6,554 / 65,536 = 0.10001
    np.testing.assert_allclose(fp32[~dropped], x.numpy()[~dropped] / 0.9, rtol=1e-6)   # kept: scaled by 1/(1-rate)
    assert len(set(map(tuple, dropped.reshape(-1, shape[-1])[:64]))) == 64            # rows differ: no repeated draw
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = drop(x, training=True)
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), np.where(dropped, 0.0, 1 / 0.9), rtol=1e-6)   # d/dx = mask
