"""Checkpoints and resume on real training steps (the bundled micro model, float32): a run continued from a
checkpoint has the losses of a run that was never interrupted, from the checkpoint on."""

import numpy as np
import pytest

from lora_demo.training import checkpoints
from lora_demo import data
from lora_demo.core.config import ConfigError, LoraConfig, RunConfig, TrainConfig
from lora_demo.core.events import CheckpointSaved, RunFinished, StepLogged
from lora_demo.core.inject import remove_lora
from lora_demo.lab import clone_model
from lora_demo.training.train import train

TRAIN = data.load_pairs("train", 48, source="bundled")
VAL = data.load_pairs("validation", 16, source="bundled")
HELD = data.heldout_pairs("news", 16)


def config(method="lora", **kw) -> RunConfig:
    t = dict(steps=12, batch_size=8, lr=5e-3, train_size=48, eval_every=3, eval_size=16, samples=(), checkpoint_every=4,
             seed=3)
    t.update(kw)
    return RunConfig(model="micro", lora=LoraConfig(rank=4, targets=("q", "v"), dropout=0.1, method=method),
                     train=TrainConfig(**t))


def losses(events) -> dict[int, float]:
    return {e.step: e.loss for e in events if isinstance(e, StepLogged)}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_resumed_run_has_the_losses_of_an_uninterrupted_one(bundled_tiny, tmp_path, method):
    model = clone_model(bundled_tiny)
    tok = bundled_tiny.tokenizer
    whole = tmp_path / "whole"
    events = list(train(config(method), model, tok, TRAIN, VAL, HELD, checkpoint_dir=whole))
    remove_lora(model)
    saved = [e for e in events if isinstance(e, CheckpointSaved)]
    assert [e.step for e in saved] == [4, 8, 12] and all(e.bytes > 0 for e in saved)
    assert [c.step for c in checkpoints.listed(whole)] == [4, 8, 12]
    expected = losses(events)
    # resume from step 4 (dropout on, the optimiser mid warm-up), on a fresh copy of the base
    resumed_dir = tmp_path / "resumed"
    again = clone_model(bundled_tiny)
    events2 = list(train(config(method), again, tok, TRAIN, VAL, HELD, checkpoint_dir=resumed_dir,
                         resume=checkpoints.latest(whole, at_most=4)))
    got = losses(events2)
    assert sorted(got) == list(range(5, 13))
    np.testing.assert_allclose([got[s] for s in range(5, 13)], [expected[s] for s in range(5, 13)], atol=1e-5, rtol=0)
    end = events2[-1]
    assert isinstance(end, RunFinished) and end.summary["steps_done"] == 12 and end.summary["resumed_from"] == 4
    # the summary covers the whole run: the first losses come from the checkpoint
    assert end.summary["first_loss"] == pytest.approx(np.mean([expected[s] for s in range(1, 6)]), abs=1e-5)
    assert end.summary["final_heldout_loss"] == pytest.approx(events[-1].summary["final_heldout_loss"], abs=1e-5)


def test_a_run_can_go_beyond_its_planned_steps_and_a_checkpoint_must_fit(bundled_tiny, tmp_path):
    model, tok = clone_model(bundled_tiny), bundled_tiny.tokenizer
    list(train(config(steps=6), model, tok, TRAIN, VAL, HELD, checkpoint_dir=tmp_path / "a"))
    remove_lora(model)
    ckpt = checkpoints.latest(tmp_path / "a")
    assert ckpt.step == 6   # the end is saved too (6 is not a multiple of 4)
    longer = list(train(config(steps=10), model, tok, TRAIN, VAL, HELD, resume=ckpt))
    remove_lora(model)
    assert sorted(losses(longer)) == [7, 8, 9, 10] and longer[-1].summary["steps_done"] == 10
    # another rank cannot load it: the run fails with a message that says why
    other = RunConfig(model="micro", lora=LoraConfig(rank=2, targets=("q", "v")), train=config().train)
    failed = list(train(other, model, tok, TRAIN, VAL, HELD, resume=ckpt))
    remove_lora(model)
    assert "does not fit" in failed[-1].reason


def test_checkpoint_every_is_validated():
    with pytest.raises(ConfigError, match="checkpoint every"):
        TrainConfig(checkpoint_every=-1)
