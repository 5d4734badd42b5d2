"""Inside the adapter: ΔW, its spectrum and effective rank, φ, partial switch-off, and the budget.

Every figure is checked against an independent computation (numpy on the full matrices), on
constructed matrices of known rank, and on real adapters of the bundled tiny model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT

from lora_demo import adapters
from lora_demo.analysis import anatomy
from lora_demo.analysis import budget
from lora_demo.core.config import LoraConfig, RunConfig, TrainConfig
from lora_demo.core.inject import apply_lora, lora_layers, remove_lora
from lora_demo.core.params import preview

CFG = LoraConfig(rank=4, alpha=12.0, targets=("q", "v", "wo"))


def _state(model, cfg=CFG, seed=0, scale=0.3):
    """A real adapter on ``model`` with non-zero B (so ΔW ≠ 0), as PEFT tensors."""
    layers = apply_lora(model, cfg, seed=seed)
    for i, layer in enumerate(layers):
        layer.lora_B.assign(tf.random.stateless_normal(layer.lora_B.shape, seed=(seed, i)) * scale)
    return adapters.adapter_state(model)


def _logits(model, tokenizer):
    enc = tokenizer(["translate English to German: The session is resumed."], return_tensors="tf")
    return model(**enc, decoder_input_ids=tf.constant([[0, 5, 9, 3]])).logits.numpy()


def test_delta_equals_the_layer_and_the_independent_product(bundled_tiny):
    model = bundled_tiny.model
    try:
        state = _state(model)
        layer = lora_layers(model)[0]
        a, b = layer.lora_A.numpy().astype(np.float64), layer.lora_B.numpy().astype(np.float64)
        mine = adapters.delta(CFG, *anatomy.factors(state)[layer.path])
        np.testing.assert_allclose(mine, (12.0 / 4) * a @ b, rtol=1e-12)
        np.testing.assert_allclose(mine, layer.delta().numpy(), rtol=1e-5, atol=1e-7)
        x = tf.random.stateless_normal((2, 3, a.shape[0]), seed=(4, 2))
        effect = (layer(x) - layer.base(x)).numpy()                    # what the layer adds to its output
        np.testing.assert_allclose(effect, x.numpy() @ mine, rtol=1e-4, atol=1e-5)
    finally:
        remove_lora(model)


def test_the_spectrum_has_at_most_r_values_and_matches_the_full_svd(bundled_tiny):
    try:
        state = _state(bundled_tiny.model)
    finally:
        remove_lora(bundled_tiny.model)
    info = anatomy.inspect(CFG, state)
    for (path, (a, b)), layer in zip(anatomy.factors(state).items(), info["layers"]):
        full = np.linalg.svd(adapters.delta(CFG, a, b), compute_uv=False)
        assert len(layer["singular_values"]) == CFG.rank
        np.testing.assert_allclose(layer["singular_values"], full[:CFG.rank], rtol=1e-9)
        assert np.all(full[CFG.rank:] < 1e-9 * full[0])                  # ΔW has rank ≤ r
        np.testing.assert_allclose(layer["fro"], np.linalg.norm(adapters.delta(CFG, a, b)), rtol=1e-9)


@pytest.mark.parametrize("sv, want", [([10, 1, 0.1, 0], 1), ([1, 1, 1, 1], 4), ([3, 2, 1, 0], 2),
                                      ([5, 5, 0, 0], 2), ([0, 0, 0, 0], 0)])
def test_effective_rank_on_matrices_of_known_spectrum(sv, want):
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(40, 4)))
    v, _ = np.linalg.qr(rng.normal(size=(30, 4)))
    cfg = LoraConfig(rank=4, alpha=4.0)                                   # alpha/r = 1
    a, b = u * np.array(sv, float), v.T                                    # ΔW = U·diag(σ)·Vᵀ
    got = anatomy.singular_values(cfg, a, b)
    np.testing.assert_allclose(got, sv, atol=1e-12)
    assert anatomy.effective_rank(got) == want
    assert int(np.sum(got > 1e-9)) == np.count_nonzero(sv)                # exact rank, from the r×r core


def test_phi_of_a_run_with_itself_is_one_and_of_unrelated_runs_near_chance(bundled_tiny):
    try:
        one = _state(bundled_tiny.model, seed=1)
        remove_lora(bundled_tiny.model)
        other = _state(bundled_tiny.model, LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "wo")), seed=7)
    finally:
        remove_lora(bundled_tiny.model)
    same = anatomy.similarity(CFG, one, CFG, one)
    assert same["k"] == 4 and len(same["layers"]) == len(anatomy.factors(one))
    np.testing.assert_allclose([x["phi_k"] for x in same["layers"]], 1.0, atol=1e-9)
    np.testing.assert_allclose([x["phi_1"] for x in same["layers"]], 1.0, atol=1e-9)
    diff = anatomy.similarity(CFG, one, LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "wo")), other)
    assert diff["k"] == 2 and diff["mean_phi_k"] < 0.2 and 0 < diff["chance_phi_k"] < 0.2


def test_switching_the_adapter_off_everywhere_is_the_base_exactly_and_partly_changes_the_output(bundled_tiny):
    model, tok = bundled_tiny.model, bundled_tiny.tokenizer
    try:
        state = _state(model, scale=2.0)
    finally:
        remove_lora(model)
    base = _logits(model, tok)
    kernels = [w.numpy() for w in model.weights]
    with adapters.merged_into(model, CFG, anatomy.switch_off(state, sides=())):
        off = _logits(model, tok)
    with adapters.merged_into(model, CFG, anatomy.switch_off(state, modules=())):
        none_kept = _logits(model, tok)
    with adapters.merged_into(model, CFG, state):
        full = _logits(model, tok)
    with adapters.merged_into(model, CFG, anatomy.switch_off(state, sides=("decoder",))):
        decoder_only = _logits(model, tok)
    with adapters.merged_into(model, CFG, anatomy.switch_off(state, blocks=(0, 0), modules=("self q",))):
        one_kind = _logits(model, tok)
    assert np.array_equal(off, base) and np.array_equal(none_kept, base)       # bit for bit
    assert all(np.array_equal(w.numpy(), k) for w, k in zip(model.weights, kernels))
    for partial in (decoder_only, one_kind):
        assert not np.allclose(partial, base, atol=1e-3) and not np.allclose(partial, full, atol=1e-3)
    kept = anatomy.switch_off(state, sides=("encoder",), blocks=(1, 2), modules=("self v", "ffn wo"))
    paths = {adapters.KEY.match(k)["path"] for k in kept}
    assert paths and all(p.startswith("encoder.block.") and int(p.split(".")[2]) in (1, 2)
                         and (p.endswith("SelfAttention.v") or p.endswith("DenseReluDense.wo")) for p in paths)


def test_predicted_parameters_adapter_and_optimiser_bytes_equal_the_measured(bundled_tiny, tmp_path):
    from lora_demo import data
    from lora_demo.lab.execute import execute
    from lora_demo.lab.records import Job

    cfg = RunConfig(model="micro", lora=LoraConfig(rank=3, targets=("q", "k", "wi_1"), side="decoder", layers=(1, 2)),
                    train=TrainConfig(steps=3, batch_size=4, train_size=16, eval_every=3, eval_size=8, bleu_size=0))
    job = Job.new(cfg, "s", tmp_path)
    job.prediction = budget.predict(bundled_tiny.model.config, cfg.lora, cfg.train)
    execute(job, bundled_tiny.model, bundled_tiny.tokenizer, lambda s, n, d="europarl": data.pairs_for(s, n, d, source="bundled"), {})
    remove_lora(bundled_tiny.model)
    meas = budget.measured(job.record(), adapters.tensor_bytes(job.dir))
    pred = job.prediction["lora"]
    want = preview("micro", cfg.lora)
    assert pred["trainable"] == meas["trainable"] == want.trainable
    assert pred["adapter_bytes"] == meas["adapter_bytes"] == 4 * want.trainable
    assert pred["optimizer_bytes"] == meas["optimizer_bytes"] == 2 * 4 * want.trainable
    assert pred["adapter_bytes"] / 1e6 == pytest.approx(want.adapter_mb, rel=1e-12)
    rows = {r[0]: r for r in budget.side_by_side(job.prediction, meas)}
    assert rows["trainable parameters"][3] == 0.0 and rows["adapter tensors (MB)"][3] == 0.0
    assert meas["step_s"] > 0 and pred["step_s_est"] is None          # no earlier run: no made-up estimate
    # the next prediction extrapolates from this run's measured step time
    again = budget.predict(bundled_tiny.model.config, cfg.lora, cfg.train, [job.record()])
    assert again["lora"]["step_s_est"] == pytest.approx(meas["step_s"]) and job.id in again["step_basis"]


def test_the_teaching_point_flan_t5_base():
    """Correct LoRA, r=8 on q,v: 0.356% of flan-t5-base; with the shared embedding left trainable, as in
    the course demo, over 10%."""
    from lora_demo.core.models import model_config

    pred = budget.predict(model_config("google/flan-t5-base"), LoraConfig(rank=8, targets=("q", "v")), TrainConfig())
    assert pred["lora"]["trainable"] == 884_736 and round(pred["lora"]["pct_trainable"], 3) == 0.356
    assert pred["lora_plus_shared_embedding"]["trainable"] == 884_736 + 32128 * 768
    assert pred["lora_plus_shared_embedding"]["pct_trainable"] > 10
    assert pred["total_params"] == 248_462_592 and pred["full"]["trainable"] == 248_462_592 - 884_736
    assert pred["full"]["pct_trainable"] == 100.0


@pytest.mark.slow
def test_cli_inspect_prints_the_figures_as_json(cli_sweep):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "lora_demo"]
    tmp_path = cli_sweep[1]     # conftest: `sweep --ranks 8,2 --seeds 0,1 --targets q,v` on micro
    seed0 = [p for p in tmp_path.iterdir() if (p / "metrics.json").is_file()
             and json.loads((p / "metrics.json").read_text())["config"]["train"]["seed"] == 0]
    r8, r2 = sorted(seed0, key=lambda p: json.loads((p / "metrics.json").read_text())["created"])
    proc = subprocess.run(run + ["inspect", str(r8), "--compare", str(r2)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["rank"] == 8 and len(out["layers"]) == 18     # q, v: 3 encoder blocks × 2 + 3 decoder blocks × 4
    assert out["heatmap"]["columns"] == ["self q", "self v", "cross q", "cross v"]
    assert all(len(x["singular_values"]) == 8 and 0 < x["effective_rank"] <= 8 and x["relative"] > 0
               for x in out["layers"])
    assert out["similarity"]["ranks"] == [8, 2] and out["similarity"]["k"] == 2
    assert all(0 <= x["phi_k"] <= 1 for x in out["similarity"]["layers"])
    rows = {r[0]: r for r in out["budget"]["rows"]}
    assert rows["trainable parameters"][1] == rows["trainable parameters"][2]
    assert rows["optimiser state (MB)"][3] == 0.0
