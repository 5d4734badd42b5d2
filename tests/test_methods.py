"""The LoRA family and full fine-tuning: each method's maths on a real layer, and real training runs."""

from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf
from test_train import HELD, TRAIN, VAL, run_config

from lora_demo import adapters
from lora_demo.core.config import ConfigError, LoraConfig, RunConfig, TrainConfig, parse_methods
from lora_demo.core.events import RunFinished, RunStarted
from lora_demo.core.inject import lora_layers, remove_lora
from lora_demo.core.lora import LoraDense
from lora_demo.core.models import copy_model
from lora_demo.training.optimisers import build_optimizer_state, make_optimizer
from lora_demo.training.train import train


def _dense(d_in=12, d_out=10, seed=0):
    dense = tf.keras.layers.Dense(d_out, use_bias=False)
    dense.build((None, d_in))
    dense.kernel.assign(tf.random.stateless_normal((d_in, d_out), seed=(seed, 1)))
    return dense


def test_rslora_scales_by_alpha_over_root_r():
    assert LoraConfig(rank=16, alpha=8, method="rslora").scaling == 2.0
    assert LoraConfig(rank=16, alpha=8).scaling == 0.5
    layer = LoraDense(_dense(), rank=4, alpha=8.0, method="rslora")
    assert layer.scaling == 4.0


def test_pissa_starts_from_the_top_singular_directions_and_keeps_the_residual_frozen():
    dense = _dense()
    w = dense.kernel.numpy().astype(np.float64)
    layer = LoraDense(dense, rank=3, alpha=6.0, method="pissa")
    c = layer.scaling
    start = c * layer.start.a0.numpy().astype(np.float64) @ layer.start.b0.numpy()
    u, s, vt = np.linalg.svd(w)
    np.testing.assert_allclose(start, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-5)   # the best rank-3 part of W
    np.testing.assert_allclose(np.linalg.svd(w - start, compute_uv=False)[:7], s[3:], atol=1e-5)   # the rest
    np.testing.assert_array_equal(layer.lora_A.numpy(), layer.start.a0.numpy())
    x = tf.random.stateless_normal((2, 5, 12), seed=(3, 3))
    np.testing.assert_allclose(layer(x).numpy(), dense(x).numpy(), atol=1e-5)   # step 0 is the base
    assert layer.trained == [layer.lora_A, layer.lora_B]                          # A0, B0 are not trained
    assert not any("pissa" in v.name for v in layer.weights)                      # nor Keras weights
    with pytest.raises(ValueError, match="at most 10"):
        LoraDense(_dense(), rank=11, alpha=1.0, method="pissa")


def test_dora_magnitude_starts_at_the_column_norms_and_its_norm_is_not_differentiated():
    dense = _dense()
    layer = LoraDense(dense, rank=2, alpha=4.0, method="dora")
    np.testing.assert_allclose(layer.magnitude.numpy(), np.linalg.norm(dense.kernel.numpy(), axis=0), rtol=1e-6)
    layer.lora_B.assign(tf.random.stateless_normal((2, 10), seed=(5, 5)))
    layer.magnitude.assign(layer.magnitude * 1.3)
    x = tf.random.stateless_normal((4, 12), seed=(6, 6))
    w = dense.kernel.numpy().astype(np.float64)
    adapted = w + layer.scaling * layer.lora_A.numpy() @ layer.lora_B.numpy()
    want = x.numpy() @ (layer.magnitude.numpy() * adapted / np.linalg.norm(adapted, axis=0))
    np.testing.assert_allclose(layer(x).numpy(), want, rtol=1e-4, atol=1e-5)
    # the gradient for A treats ‖W + c·A·B‖ as a constant (DoRA paper, section 4.3; PEFT's detach)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) ** 2)
    ga = tape.gradient(loss, layer.lora_A).numpy()
    y = want
    g = layer.magnitude.numpy() / np.linalg.norm(adapted, axis=0)
    want_ga = layer.scaling * x.numpy().T @ (2 * y * g) @ layer.lora_B.numpy().T
    np.testing.assert_allclose(ga, want_ga, rtol=1e-3, atol=1e-4)
    layer.knobs.scale.assign(0.0)
    np.testing.assert_allclose(layer(x).numpy(), dense(x).numpy(), atol=1e-6)   # scale 0: the base exactly


def test_loraplus_gives_b_ratio_times_the_learning_rate_under_adam():
    """Adam's first step moves each weight by about the learning rate whatever the gradient's size,
    so scaling B's gradient could not do this; two rates can."""
    a, b = tf.Variable(tf.ones((3, 2))), tf.Variable(tf.ones((2, 4)))
    opt, _ = make_optimizer(TrainConfig(lr=1e-3, warmup_steps=0, schedule="constant"), LoraConfig(method="loraplus", loraplus_ratio=16),
                            fast=[b])
    build_optimizer_state(opt, [a, b])
    opt.apply_gradients([(tf.fill(a.shape, 0.5), a), (tf.fill(b.shape, 0.02), b)])
    np.testing.assert_allclose(1 - a.numpy(), 1e-3, rtol=1e-3)
    np.testing.assert_allclose(1 - b.numpy(), 16e-3, rtol=1e-3)
    with pytest.raises(ConfigError, match="adamw"):   # checked once, where every run's config is made
        RunConfig(lora=LoraConfig(method="loraplus"), train=TrainConfig(optimizer="lamb"))


def test_methods_parse_with_clear_errors():
    assert parse_methods("lora, dora,full") == ["lora", "dora", "full"]
    with pytest.raises(ConfigError, match="unknown method 'qlora'"):
        parse_methods("lora,qlora")
    with pytest.raises(ConfigError, match="method must be one of"):
        LoraConfig(method="adalora")


def _run(model, tok, cfg):
    events = list(train(cfg, model, tok, TRAIN, VAL, HELD))
    assert isinstance(events[-1], RunFinished), events[-1]
    return events


@pytest.mark.parametrize("method", ["rslora", "dora", "pissa", "loraplus"])
def test_each_adapter_method_trains_and_scale_zero_is_the_base(bundled_tiny, method):
    model = copy_model(bundled_tiny.model)
    # LoRA+ moves B 16x faster: at the other methods' rate of 5e-3 it overshoots in 6 steps
    base_run = run_config(steps=6, eval_every=6, lr=5e-4 if method == "loraplus" else 5e-3)
    cfg = replace(base_run, lora=replace(base_run.lora, method=method))
    events = _run(model, bundled_tiny.tokenizer, cfg)
    s = events[-1].summary
    assert s["final_loss"] < s["first_loss"] and s["probe_loss_final"] < s["probe_loss_base"]
    assert s["base_forget_loss"] is not None and s["final_forget_loss"] != s["base_forget_loss"]
    started = next(e for e in events if isinstance(e, RunStarted))
    extra = sum(layer.magnitude.shape[0] for layer in lora_layers(model)) if method == "dora" else 0
    assert started.params["trainable"] == sum(4 * sum(layer.base.kernel.shape) for layer in lora_layers(model)) + extra
    state = adapters.adapter_state(model)
    remove_lora(model)
    # the stored adapter, merged into the plain model, gives the trained model's held-out loss
    from lora_demo.training.prepare import prepare
    from lora_demo.training.steps import eval_loss, make_eval

    prepared = prepare(cfg.train, bundled_tiny.tokenizer, TRAIN, VAL, HELD, dynamic=False)
    with adapters.merged_into(model, cfg.lora, state) as merged:
        held = eval_loss(make_eval(merged), prepared.heldout)
    assert held == pytest.approx(s["final_heldout_loss"], abs=2e-3)
    assert eval_loss(make_eval(model), prepared.heldout) == pytest.approx(s["base_heldout_loss"], abs=1e-5)


@pytest.mark.slow
def test_full_fine_tuning_trains_every_weight_of_a_copy_and_keeps_the_base_point(bundled_tiny, tmp_path):
    from lora_demo.lab.execute import execute
    from lora_demo.lab.records import Job

    cfg = replace(run_config(steps=6, eval_every=6, lr=1e-3, bleu_size=0), lora=LoraConfig(method="full"))
    lora_cfg = run_config(steps=6, eval_every=6, bleu_size=0)
    model = copy_model(bundled_tiny.model)
    before = {v.name: v.numpy().copy() for v in model.weights}
    pairs = {"train": TRAIN, "validation": VAL, "heldout": HELD}
    jobs = []
    for run in (cfg, lora_cfg):
        job = Job.new(run, "t", tmp_path)
        execute(job, model, bundled_tiny.tokenizer, lambda split, n, dataset="news": pairs[split], {})
        remove_lora(model)
        jobs.append(job)
    full, lora = jobs
    assert full.status == "completed" and lora.status == "completed", (full.error, lora.error)
    assert full.params["trainable"] == full.params["total"] > 100 * lora.params["trainable"]
    # the model it was given is untouched: full fine-tuning trained a copy
    assert all(np.array_equal(before[v.name], v.numpy()) for v in model.weights)
    # its step-0 point is the base model's, measured before training (a LoRA run measures it at scale 0)
    assert full.summary["base_heldout_loss"] == pytest.approx(lora.summary["base_heldout_loss"], abs=1e-5)
    assert full.summary["final_heldout_loss"] != full.summary["base_heldout_loss"]
    assert (full.dir / adapters.FULL_FILE).is_file() and not (full.dir / adapters.WEIGHTS_FILE).exists()
    with pytest.raises(adapters.AdapterError, match="merged checkpoint"):
        adapters.peft_config(cfg.lora, "micro")
    # the saved weights, merged into the base at scale 1, are the trained model; at 0.5 halfway
    state = adapters.load_state(full.dir)
    from lora_demo.training.prepare import prepare
    from lora_demo.training.steps import eval_loss, make_eval

    prepared = prepare(cfg.train, bundled_tiny.tokenizer, TRAIN, VAL, HELD, dynamic=False)
    with adapters.merged_into(model, cfg.lora, state) as merged:
        assert eval_loss(make_eval(merged), prepared.heldout) == pytest.approx(full.summary["final_heldout_loss"],
                                                                               abs=1e-4)
        name = model.shared.weights[0].name
        w_ft = next(v for v in merged.weights if v.name == name).numpy().copy()
    assert not np.array_equal(w_ft, before[name])
    with adapters.merged_into(model, cfg.lora, state, 0.5) as merged:
        half = next(v for v in merged.weights if v.name == name).numpy()
        np.testing.assert_allclose(half, (before[name] + w_ft) / 2, atol=1e-6)
    assert all(np.array_equal(before[v.name], v.numpy()) for v in model.weights)


# ---------------------------------------------------------------------------
# analysis.py: the figures of what a method learned, on matrices whose answer is known
# ---------------------------------------------------------------------------

def _lora_state(rng, paths, d_in, d_out, r):
    from lora_demo.adapters import PREFIX

    return {f"{PREFIX}{p}.lora_{ab}.weight": rng.standard_normal(shape).astype(np.float32)
            for p in paths for ab, shape in (("A", (r, d_in)), ("B", (d_out, r)))}


def test_truncation_keeps_the_top_singular_directions_exactly():
    from lora_demo.analysis import learned as analysis

    rng = np.random.default_rng(0)
    path = "encoder.block.0.layer.0.SelfAttention.q"
    cfg = LoraConfig(rank=4, alpha=8, method="rslora")
    state = _lora_state(rng, [path], 12, 10, 4)
    full = adapters.deltas(cfg, state)[path].astype(np.float64)
    u, s, vt = np.linalg.svd(full)
    for k in (1, 2, 4):
        cfg_k, state_k = analysis.truncate(cfg, state, k)
        assert cfg_k.scaling == pytest.approx(cfg.scaling) and cfg_k.rank == k
        np.testing.assert_allclose(adapters.deltas(cfg_k, state_k)[path], (u[:, :k] * s[:k]) @ vt[:k], atol=1e-4)


def test_magnitude_direction_and_intruders_on_known_updates():
    from lora_demo.analysis import learned as analysis

    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 30))
    assert analysis.magnitude_direction(w, np.zeros_like(w)) == pytest.approx((0.0, 0.0), abs=1e-12)
    dm, dd = analysis.magnitude_direction(w, w)          # every column doubled: magnitude only
    assert dm == pytest.approx(np.linalg.norm(w, axis=0).mean()) and dd == pytest.approx(0.0, abs=1e-12)
    assert analysis.intruders(w, w) == 0 and analysis.intruders(w, w * 3) == 0   # same singular vectors
    # a rank-1 update much larger than W, along a direction W does not use, is the top singular vector
    off = np.linalg.svd(w)[0][:, -1]                      # outside W's column space: |cos| 0 with all of W's
    spike = 50 * np.outer(off, rng.standard_normal(30))
    assert analysis.intruders(w, w + spike, k=1) == 1
    rand = analysis.random_like(spike, rng)
    assert analysis.numerical_rank(rand) == 1 and np.linalg.norm(rand) == pytest.approx(np.linalg.norm(spike))
