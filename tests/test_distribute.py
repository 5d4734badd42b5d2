"""Scale-out: the training step under tf.distribute gives the one-device losses for the same global batch.

Each case runs in a fresh interpreter, because a CPU can only be split into logical devices before
TensorFlow initialises its runtime.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

SCRIPT = r"""
import json, sys
import lora_demo
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from lora_demo import data
from lora_demo.config import LoraConfig, RunConfig, TrainConfig
from lora_demo.events import RunFinished, StepLogged
from lora_demo.inject import remove_lora
from lora_demo.models import load_model
from lora_demo.train import make_strategy, train

loaded = load_model("tiny", fallback=False)
pairs = data.load_pairs("train", 64, source="bundled"), data.load_pairs("validation", 8, source="bundled")
run = RunConfig(model="tiny", lora=LoraConfig(rank=4, targets=("q", "v", "wo")),
                train=TrainConfig(steps=8, batch_size=8, train_size=64, eval_every=8, eval_size=8))
out = {}
for name in ["default", *sys.argv[1:]]:
    strategy = make_strategy(name)
    events = list(train(run, loaded.model, loaded.tokenizer, *pairs, strategy=strategy))
    assert isinstance(events[-1], RunFinished), events[-1]
    out[name] = {"losses": [e.loss for e in events if isinstance(e, StepLogged)],
                 "replicas": strategy.num_replicas_in_sync if strategy else 1,
                 "val": events[-1].summary["final_val_loss"]}
    remove_lora(loaded.model)
print(json.dumps(out))
"""


def run_case(*strategies: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *strategies], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mirrored_over_two_logical_cpus_and_multiworker_give_the_one_device_losses():
    out = run_case("mirrored", "multiworker")   # one interpreter: TF starts once
    assert out["default"]["replicas"] == 1 and out["mirrored"]["replicas"] == 2
    one, two = np.array(out["default"]["losses"]), np.array(out["mirrored"]["losses"])
    assert len(one) == len(two) == 8 and one[-1] != one[0]
    np.testing.assert_allclose(two, one, rtol=1e-5)   # same global batch, split in two halves
    assert out["mirrored"]["val"] == pytest.approx(out["default"]["val"], rel=1e-5)
    # MultiWorkerMirroredStrategy without TF_CONFIG: this machine alone, the same losses
    np.testing.assert_allclose(out["multiworker"]["losses"], one, rtol=1e-5)
