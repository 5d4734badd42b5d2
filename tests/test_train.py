"""Real training steps on the bundled tiny model: the loss falls, Stop stops, NaN fails cleanly."""

import threading

import numpy as np
import pytest
import tensorflow as tf

from lora_demo import data
from lora_demo.core.config import LoraConfig, RunConfig, TrainConfig
from lora_demo.analysis.evaluate import translate_both
from lora_demo.core.events import EvalLogged, RunFailed, RunFinished, RunStarted, SamplesLogged, StepLogged
from lora_demo.core.inject import remove_lora, set_scale
from lora_demo.lab import clone_model
from lora_demo.training.optimisers import available_optimizers
from lora_demo.training.samples import SAMPLE_TOKENS
from lora_demo.training.steps import seq2seq_loss
from lora_demo.training.train import train

TRAIN = data.load_pairs("train", 48, source="bundled")
VAL = data.load_pairs("validation", 16, source="bundled")
HELD = data.heldout_pairs("news", 16)


def run_config(**train_kw) -> RunConfig:
    kw = dict(steps=12, batch_size=8, lr=5e-3, train_size=48, eval_every=6, eval_size=16, warmup_steps=0, samples=(),
              batching="padded")   # one shape: the first and last batches' losses compare like for like
    kw.update(train_kw)
    return RunConfig(model="micro", lora=LoraConfig(rank=4, targets=("q", "v")), train=TrainConfig(**kw))


@pytest.fixture
def model(bundled_tiny):
    """The bundled tiny model, left without an adapter afterwards for the next test."""
    yield bundled_tiny.model
    remove_lora(bundled_tiny.model)


def full_loss(model, arrays) -> float:
    return float(np.mean([float(seq2seq_loss(model, {k: v[i:i + 16] for k, v in arrays.items()}, False))
                          for i in range(0, len(arrays["input_ids"]), 16)]))


@pytest.mark.slow
def test_training_lowers_the_loss_on_the_training_pairs(model, bundled_tiny):
    samples = ("The session is resumed.", "I thank the Commissioner.")
    events = list(train(run_config(steps=40, samples=samples), model, bundled_tiny.tokenizer, TRAIN, VAL, HELD))
    assert isinstance(events[0], RunStarted) and isinstance(events[-1], RunFinished)
    assert events[-1].status == "completed" and events[-1].summary["steps_done"] == 40
    arrays = data.encode(bundled_tiny.tokenizer, TRAIN, 64, 64)
    after = full_loss(model, arrays)
    set_scale(model, 0.0)  # scale 0 is the base model exactly
    before = full_loss(model, arrays)
    set_scale(model, 1.0)
    assert after < before - 0.1, (before, after)
    steps = [e for e in events if isinstance(e, StepLogged)]
    assert [e.step for e in steps] == list(range(1, 41))
    assert steps[-1].compiled, "the compiled step should have taken over within 40 steps"
    assert all(e.tokens_per_s > 0 and e.lr > 0 for e in steps)
    # an eager step 1's loss comes from a forward pass (steps.make_preview), with no gradient norm (a step
    # traced by an earlier run on this model is compiled from step 1); every other step has one
    assert (steps[0].grad_norm is None) == (not steps[0].compiled)
    assert all(0 < e.grad_norm < 1e4 for e in steps[1:])
    evals = [e for e in events if isinstance(e, EvalLogged)]
    assert [e.step for e in evals] == [0, 6, 12, 18, 24, 30, 36, 40]
    s = events[-1].summary
    assert s["base_val_loss"] == evals[0].val_loss and s["stop_reason"] == "all 40 steps"
    # the held-out curve: newstest2014 pairs, base at step 0, scored at every evaluation
    assert s["heldout_name"] == "newstest2014" and s["heldout_pairs"] == 16
    assert s["base_heldout_loss"] == evals[0].heldout_loss and s["final_heldout_loss"] == evals[-1].heldout_loss
    assert all(e.heldout_loss > 0 for e in evals) and evals[-1].heldout_loss != evals[0].heldout_loss
    # the sample translations at each evaluation point: step 0 is the base model exactly
    shown = [e for e in events if isinstance(e, SamplesLogged)]
    assert [e.step for e in shown] == [0, 6, 12, 18, 24, 30, 36, 40]
    assert all(len(e.translations) == 2 and all(e.translations) for e in shown)
    base, lora = translate_both(model, bundled_tiny.tokenizer, list(samples), max_new_tokens=SAMPLE_TOKENS)
    assert shown[0].translations == base and shown[-1].translations == lora


def test_params_in_run_started_match_the_model(model, bundled_tiny):
    started = next(iter(train(run_config(steps=1), model, bundled_tiny.tokenizer, TRAIN, VAL)))
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert started.params["trainable"] == trainable
    assert started.params["total"] == sum(int(np.prod(v.shape)) for v in model.weights)


def test_same_seed_same_losses(model, bundled_tiny):
    def losses(seed):
        return [e.loss for e in train(run_config(seed=seed), model, bundled_tiny.tokenizer, TRAIN, VAL)
                if isinstance(e, StepLogged)]

    a, b, c = losses(1), losses(1), losses(2)
    # Eager and compiled steps run the same kernels; where the hand-over happens can move the last
    # bits of a float32, so "the same" is to 1e-5 relative.
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert not np.allclose(a, c, rtol=1e-3)


def test_stop_takes_effect_within_one_step(model, bundled_tiny):
    stop = threading.Event()
    seen = []
    for ev in train(run_config(steps=50), model, bundled_tiny.tokenizer, TRAIN, VAL, stop=stop):
        seen.append(ev)
        if isinstance(ev, StepLogged) and ev.step == 3:
            stop.set()
    assert isinstance(seen[-1], RunFinished) and seen[-1].status == "stopped"
    assert max(e.step for e in seen if isinstance(e, StepLogged)) == 3
    assert seen[-1].summary["steps_done"] == 3


def test_a_stop_after_the_first_loss_still_applies_the_first_update(bundled_tiny):
    """Step 1's loss comes from a forward pass and its update runs once the step is traced; a stop in
    between applies that update eagerly, so the run that reports one step has taken one."""
    from lora_demo.core.inject import lora_layers

    stop = threading.Event()
    seen = []
    model = clone_model(bundled_tiny)   # its own copy: no compiled step kept from another run (or a repeat) to reuse
    for ev in train(run_config(steps=5), model, bundled_tiny.tokenizer, TRAIN, VAL, stop=stop):
        seen.append(ev)
        if isinstance(ev, StepLogged):
            assert ev.step == 1 and ev.grad_norm is None and not ev.compiled
            stop.set()
    assert isinstance(seen[-1], RunFinished) and seen[-1].summary["steps_done"] == 1
    assert all(float(tf.reduce_max(tf.abs(layer.lora_B))) > 0 for layer in lora_layers(model))


def test_nan_loss_ends_the_run_as_failed_with_advice(bundled_tiny):
    broken = clone_model(bundled_tiny)
    broken.lm_head.kernel.assign(tf.fill(broken.lm_head.kernel.shape, float("nan")))
    events = list(train(run_config(steps=5), broken, bundled_tiny.tokenizer, TRAIN, VAL))
    assert isinstance(events[-1], RunFailed)
    assert "NaN" in events[-1].reason and "learning rate" in events[-1].hint
    assert not any(isinstance(e, StepLogged) for e in events)


def test_bad_config_is_a_failed_event_not_a_crash(model, bundled_tiny):
    cfg = RunConfig(model="micro", lora=LoraConfig(targets=("wi",)), train=TrainConfig(steps=2))
    events = list(train(cfg, model, bundled_tiny.tokenizer, TRAIN, VAL))
    assert isinstance(events[-1], RunFailed) and "wi not found" in events[-1].reason


@pytest.mark.parametrize("optimizer", available_optimizers())
def test_every_offered_optimizer_trains(model, bundled_tiny, optimizer):
    events = list(train(run_config(steps=3, optimizer=optimizer), model, bundled_tiny.tokenizer, TRAIN, VAL))
    assert isinstance(events[-1], RunFinished), events[-1]
    assert all(np.isfinite(e.loss) for e in events if isinstance(e, StepLogged))


@pytest.mark.slow
def test_bf16_training_tracks_fp32_over_50_steps(bundled_tiny):
    """bf16 (frozen weights stored in bf16, once; LoRA factors, optimiser and loss in float32) follows
    the float32 loss curve: every step within 2% relative, and the mean of the last 10 steps within 1%."""
    from lora_demo.core.models import model_precision

    bf16 = clone_model(bundled_tiny, "bf16")
    assert model_precision(bf16) == "bf16" and model_precision(bundled_tiny.model) == "fp32"
    assert {v.dtype for v in bf16.weights} == {tf.bfloat16}   # no float32 copy to cast from in every step
    run = RunConfig(model="micro", lora=LoraConfig(rank=8, targets=("q", "v")),
                    train=TrainConfig(steps=50, batch_size=8, train_size=48, eval_every=50, eval_size=16))
    curves = {}
    for name, model in (("fp32", bundled_tiny.model), ("bf16", bf16)):
        try:
            events = list(train(run, model, bundled_tiny.tokenizer, TRAIN, VAL))
        finally:
            remove_lora(model)
        assert events[-1].status == "completed" and events[0].device.endswith(name)
        curves[name] = np.array([e.loss for e in events if isinstance(e, StepLogged)])
    assert len(curves["bf16"]) == 50 and not np.array_equal(curves["bf16"], curves["fp32"])  # really bf16
    rel = np.abs(curves["bf16"] - curves["fp32"]) / curves["fp32"]
    assert rel.max() < 0.02, rel.max()
    assert abs(curves["bf16"][-10:].mean() - curves["fp32"][-10:].mean()) / curves["fp32"][-10:].mean() < 0.01
    assert curves["bf16"][-10:].mean() < curves["bf16"][:10].mean()   # and it learns


def test_bf16_weights_stored_once_compute_what_keras_mixed_policy_computes(bundled_tiny):
    """Rounding each frozen weight to bf16 once (the "bfloat16" policy) gives the same loss as Keras'
    mixed policy, which keeps float32 weights and rounds them in every call."""
    from lora_demo.core.models import copy_model

    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = type(bundled_tiny.model)(bundled_tiny.model.config)
        mixed(mixed.dummy_inputs)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    once = copy_model(bundled_tiny.model, "bf16")
    from lora_demo.core.params import keras_name_to_path

    source = {keras_name_to_path(v.name): v for v in bundled_tiny.model.weights}
    for dst in mixed.weights:
        dst.assign(source[keras_name_to_path(dst.name)])
    batch = data.encode(bundled_tiny.tokenizer, TRAIN.items[:8], 64, 64)
    assert {v.dtype for v in mixed.weights} == {tf.float32} and {v.dtype for v in once.weights} == {tf.bfloat16}
    np.testing.assert_allclose(float(seq2seq_loss(once, batch, False)), float(seq2seq_loss(mixed, batch, False)),
                               rtol=1e-6)


def test_the_loss_gathers_the_real_targets_and_equals_the_masked_loss_over_full_logits(bundled_tiny):
    """token_losses runs the LM head only on non-pad targets; in float32 it equals the textbook loss
    (full logits, padding masked), and trimming a batch's padding columns changes nothing."""
    from lora_demo.training.steps import token_losses

    model = bundled_tiny.model
    short = [p for p in TRAIN.items if len(p.en) < 120 and len(p.de) < 120][:8]
    batch = data.encode(bundled_tiny.tokenizer, short, 64, 64)
    batch = data.pad_to(batch, 64, 64, bundled_tiny.tokenizer.pad_token_id)   # padding the trim will drop
    labels = batch["labels"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                decoder_input_ids=model._shift_right(labels), training=False)
    mask = labels != -100
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(np.maximum(labels, 0), out.logits).numpy()
    total, count = (float(x) for x in token_losses(model, batch, False))
    assert count == mask.sum()
    np.testing.assert_allclose(total, ce[mask].sum(), rtol=1e-5)
    trimmed = data.trim(batch)
    assert trimmed["input_ids"].shape[1] < 64 and trimmed["labels"].shape[1] < 64
    np.testing.assert_allclose(float(token_losses(model, trimmed, False)[0]), total, rtol=1e-5)


def test_one_softmax_temperature_lowers_the_loss_without_changing_a_word_of_the_german(bundled_tiny):
    """best_temperature's loss at T = 1 is the eval loss; with the LM head divided by its best T the best
    moves to T = 1 at the same loss, and the greedy German and every first choice are what they were."""
    from lora_demo.analysis.evaluate import translate
    from lora_demo.training.steps import (T_RANGE, best_temperature, eval_loss, first_choice, heldout_logits,
                                          make_eval)

    model, tokenizer = bundled_tiny.model, bundled_tiny.tokenizer
    held = data.heldout_pairs("news", 16)
    arrays = data.encode(tokenizer, held, 64, 64)
    batches = [{k: v[i:i + 8] for k, v in arrays.items()} for i in (0, 8)]
    kept = heldout_logits(model, batches)   # one forward pass, read twice, as a run reads it
    found, first = best_temperature(kept), first_choice(kept, batches)
    assert found["loss"] == pytest.approx(eval_loss(make_eval(model), batches), rel=1e-5)
    assert T_RANGE[0] <= found["temperature"] <= T_RANGE[1] and found["temperature"] != 1.0   # else nothing to show
    assert found["best_loss"] < found["loss"]
    english = [p.en for p in held.items[:4]]
    before = translate(model, tokenizer, english)
    kernel = model.lm_head.kernel
    saved = tf.identity(kernel)
    try:
        kernel.assign(saved / found["temperature"])
        kept = heldout_logits(model, batches)
        again = best_temperature(kept)
        assert again["temperature"] == pytest.approx(1.0, abs=0.015)
        assert again["best_loss"] == pytest.approx(found["best_loss"], rel=1e-4)
        assert translate(model, tokenizer, english) == before
        again_first = first_choice(kept, batches)   # the same first choices (the loss per row moves with T)
        assert (again_first["right"], again_first["targets"]) == (first["right"], first["targets"])
    finally:
        kernel.assign(saved)


def test_first_choice_counts_each_rows_targets_the_model_ranks_first(bundled_tiny):
    """first_choice per row equals the argmax of the model's full teacher-forced logits compared with the
    labels, row by row, padding left out; its token counts are the labels' real tokens."""
    from lora_demo.training.steps import first_choice, heldout_logits

    model, tokenizer = bundled_tiny.model, bundled_tiny.tokenizer
    arrays = data.encode(tokenizer, data.heldout_pairs("news", 12), 64, 64)
    batches = [{k: v[i:i + 5] for k, v in arrays.items()} for i in (0, 5, 10)]   # 5, 5 and 2 rows
    got = first_choice(heldout_logits(model, batches), batches)
    labels = arrays["labels"]
    logits = model(input_ids=arrays["input_ids"], attention_mask=arrays["attention_mask"],
                   labels=tf.constant(labels), training=False).logits.numpy()
    real = labels != -100
    assert got["targets"] == real.sum(1).tolist()
    assert got["right"] == ((logits.argmax(-1) == labels) & real).sum(1).tolist()
    assert 0 < sum(got["right"]) < sum(got["targets"])   # a translator gets some right, not all


def test_grouped_batches_of_many_widths_run_one_traced_step(model, bundled_tiny):
    """Length-grouped batches change width from step to step; the step is traced once for any length
    (the first step runs eagerly, every later one is compiled), and the run records its batching."""
    pairs = data.training_pairs("news", 96, source="bundled")
    from dataclasses import replace

    cfg = run_config(steps=12, train_size=96)
    cfg = replace(cfg, lora=replace(cfg.lora, rank=5),   # a rank no other test trains: nothing kept to reuse
                  train=replace(cfg.train, batching="grouped"))
    events = list(train(cfg, model, bundled_tiny.tokenizer, pairs, VAL, HELD))
    assert isinstance(events[-1], RunFinished), events[-1]
    steps = [e for e in events if isinstance(e, StepLogged)]
    summary = events[-1].summary
    assert summary["eager_steps"] == 1 and all(e.compiled for e in steps[1:])
    assert events[0].shapes["batching"].startswith("length-grouped") and 0 <= summary["padding_pct"] < 25
    from lora_demo.core.inject import lora_layers
    from lora_demo.core.state import state_of

    key = next(reversed(state_of(model).compiled))   # the compiled step kept for reuse: any length
    assert any(("input_ids", (8, None), "int32") in part for part in key if isinstance(part, tuple))
    assert lora_layers(model)


@pytest.mark.slow
def test_first_step_compiled_waits_for_the_trace_and_trains_the_same(model, bundled_tiny):
    """first_step="compiled" (less peak memory on large models) skips the eager step: every step is
    compiled, and in float32 the losses equal those of the default eager first step."""
    from dataclasses import replace

    runs = {}
    for first, on in (("compiled", model), ("eager", clone_model(bundled_tiny))):   # neither has a kept step
        cfg = run_config(steps=6, eval_every=6)
        cfg = replace(cfg, lora=replace(cfg.lora, rank=3), train=replace(cfg.train, first_step=first))
        try:
            events = list(train(cfg, on, bundled_tiny.tokenizer, TRAIN, VAL))
        finally:
            remove_lora(on)
        assert isinstance(events[-1], RunFinished), events[-1]
        runs[first] = ([e for e in events if isinstance(e, StepLogged)], events[-1].summary)
    steps, summary = runs["compiled"]
    assert not summary["reused_trace"] and summary["trace_s"] > 0
    assert summary["eager_steps"] == 0 and all(e.compiled for e in steps)
    assert runs["eager"][1]["eager_steps"] == 1 and not runs["eager"][0][0].compiled
    np.testing.assert_allclose([e.loss for e in steps], [e.loss for e in runs["eager"][0]], rtol=1e-5)


def _with_dropout(loaded, rate: float):
    """The bundled tiny weights in a model whose own dropout is on (the bundled config has 0)."""
    config = type(loaded.model.config).from_dict({**loaded.model.config.to_dict(), "dropout_rate": rate})
    model = type(loaded.model)(config)
    model(model.dummy_inputs)
    from lora_demo.core.params import keras_name_to_path

    source = {keras_name_to_path(v.name): v for v in loaded.model.weights}   # by name: adapters reorder weights
    for dst in model.weights:
        dst.assign(source[keras_name_to_path(dst.name)])
    return model


@pytest.mark.slow
def test_a_second_run_with_the_same_shapes_reuses_the_trace_and_equals_a_fresh_run(bundled_tiny):
    """Seed, alpha and learning rate are variables of the compiled step, so a later run with the
    same shapes skips tracing; its losses equal those of a model that never saw the first run,
    with the model's dropout and LoRA dropout on (masks keyed on seed and step)."""
    from dataclasses import replace

    def go(model, cfg):
        try:
            events = list(train(cfg, model, bundled_tiny.tokenizer, TRAIN, VAL))
        finally:
            remove_lora(model)
        assert isinstance(events[-1], RunFinished), events[-1]
        return [e for e in events if isinstance(e, StepLogged)], events[-1].summary

    base = run_config(steps=8, eval_every=8, warmup_steps=3)
    cfg = replace(base, lora=replace(base.lora, dropout=0.1))
    other = replace(cfg, lora=replace(cfg.lora, alpha=4.0), train=replace(cfg.train, lr=1e-3, seed=2))
    model = _with_dropout(bundled_tiny, 0.1)
    steps1, first = go(model, cfg)
    steps2, second = go(model, cfg)
    steps3, third = go(model, other)
    assert not first["reused_trace"] and first["trace_s"] > 0 and first["eager_steps"] == 1
    assert second["reused_trace"] and second["trace_s"] is None and second["eager_steps"] == 0
    assert all(e.compiled for e in steps2)
    np.testing.assert_allclose([e.loss for e in steps2], [e.loss for e in steps1], rtol=1e-5)
    assert [e.lr for e in steps2] == [e.lr for e in steps1] and steps1[0].lr < steps1[3].lr  # warm-up, exact
    # the reused step really runs the new seed, alpha and rate: a model that never trained agrees
    assert third["reused_trace"]
    fresh_steps, fresh = go(_with_dropout(bundled_tiny, 0.1), other)
    assert not fresh["reused_trace"]
    np.testing.assert_allclose([e.loss for e in steps3], [e.loss for e in fresh_steps], rtol=1e-5)
    assert not np.allclose([e.loss for e in steps3], [e.loss for e in steps1], rtol=1e-3)
    # a new shape (another rank) traces again
    _, fourth = go(model, replace(cfg, lora=replace(cfg.lora, rank=2)))
    assert not fourth["reused_trace"] and fourth["trace_s"] > 0


def test_training_from_an_endless_stream_never_materialises_it(model, bundled_tiny):
    """data.Stream is read as training goes (the CLI's --data hub-stream is the full 4.5M-pair hub
    split); an endless one works, so nothing tries to hold it all. Batches take the maximum lengths,
    since the stream's longest pair is unknown."""
    import itertools

    pulled = []

    def endless():
        for pair in itertools.cycle(TRAIN.items):
            pulled.append(1)
            yield pair

    cfg = run_config(steps=6, eval_every=6, max_source_len=48, max_target_len=40)
    events = list(train(cfg, model, bundled_tiny.tokenizer, data.Stream(endless, "endless test stream"), VAL,
                        data_origin="endless test stream"))
    assert isinstance(events[-1], RunFinished) and events[-1].status == "completed", events[-1]
    started = events[0]
    assert started.train_pairs is None and (started.shapes["source_len"], started.shapes["target_len"]) == (48, 40)
    assert started.shapes["batching"].startswith("every batch padded")   # the default batching
    assert events[-1].summary["pairs_seen"] == 6 * 8 and events[-1].summary["probe_loss_final"] is not None
    assert len(pulled) < 4096 + 32 + 6 * 8 + 8     # the shuffle buffer, the probe head and the batches


def test_a_short_stream_ends_the_run_early_and_completes(model, bundled_tiny):
    short = data.Stream(lambda: iter(TRAIN.items[:20]), "short stream")
    events = list(train(run_config(steps=10), model, bundled_tiny.tokenizer, short, VAL))
    assert getattr(events[-1], "status", events[-1]) == "completed" and events[-1].summary["steps_done"] == 2   # 20 pairs, batch 8


def test_early_stopping_ends_the_run_and_the_record_says_why(model, bundled_tiny):
    # a rate far too high: the held-out loss stops improving within a few evaluations
    events = list(train(run_config(steps=60, lr=0.3, eval_every=2, early_stop=2), model, bundled_tiny.tokenizer,
                        TRAIN, VAL, HELD))
    end = events[-1]
    assert isinstance(end, RunFinished) and end.status == "completed", end
    held = [e.heldout_loss for e in events if isinstance(e, EvalLogged)][1:]   # the adapter's points
    assert end.summary["steps_done"] == 2 * len(held) < 60
    assert min(held[-2:]) >= min(held[:-2])          # the last 2 evaluations did not beat the best before
    assert all(min(held[k - 2:k]) < min(held[:k - 2]) for k in range(3, len(held)))   # and it stopped at once
    assert end.summary["stop_reason"].startswith(f"early stopping after step {2 * len(held)}: the held-out loss "
                                                 "has not improved for 2 evaluations")

