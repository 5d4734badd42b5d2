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
from lora_demo.core.config import LoraConfig, RunConfig, TrainConfig
from lora_demo.core.events import RunFinished, StepLogged
from lora_demo.core.inject import remove_lora
from lora_demo.core.models import load_model
from lora_demo.training.distribute import make_strategy
from lora_demo.training.train import train

loaded = load_model("micro", fallback=False)
pairs = data.load_pairs("train", 64, source="bundled"), data.load_pairs("validation", 8, source="bundled")
run = RunConfig(model="micro", lora=LoraConfig(rank=4, targets=("q", "v", "wo")),
                train=TrainConfig(steps=8, batch_size=8, train_size=64, eval_every=8, eval_size=8, samples=(),
                                   batching="padded"))   # a strategy pads every batch: the same batches alone
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


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus_and_multiworker_give_the_one_device_losses():
    out = run_case("mirrored", "multiworker")   # one interpreter: TF starts once
    assert out["default"]["replicas"] == 1 and out["mirrored"]["replicas"] == 2
    one, two = np.array(out["default"]["losses"]), np.array(out["mirrored"]["losses"])
    assert len(one) == len(two) == 8 and one[-1] != one[0]
    np.testing.assert_allclose(two, one, rtol=1e-5)   # same global batch, split in two halves
    assert out["mirrored"]["val"] == pytest.approx(out["default"]["val"], rel=1e-5)
    # MultiWorkerMirroredStrategy without TF_CONFIG: this machine alone, the same losses
    np.testing.assert_allclose(out["multiworker"]["losses"], one, rtol=1e-5)


# -- a real cluster: two worker processes over loopback ---------------------------------------------

TRAIN = ["-m", "lora_demo", "train", "--model", "micro", "--rank", "4", "--targets", "q,v,wo", "--steps", "6",
         "--batch-size", "8", "--train-size", "64", "--eval-every", "6", "--eval-size", "8", "--bleu-size", "0",
         "--precision", "fp32", "--samples", "", "--batching", "padded", "--json"]
# fp32: bf16 rounding depends on the per-replica shapes; padded: a strategy pads every batch, so alone too


def _worker(i: int, ports: list[int], out, timeout_s: int = 60, steps: str = "6"):
    """``python -m lora_demo train --strategy multiworker`` as worker ``i`` of a loopback cluster."""
    import os

    tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": i}}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TF_CONFIG": json.dumps(tf_config),
           "LORA_LAB_WORKER_TIMEOUT": str(timeout_s)}
    args = [a if a != "6" else steps for a in TRAIN]
    return subprocess.Popen([sys.executable, *args, "--strategy", "multiworker", "--out", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(run_dir) -> list[float]:
    return [loss for _, loss, _ in json.loads((run_dir / "metrics.json").read_text())["losses"]]


@pytest.mark.slow
def test_two_worker_processes_over_loopback_train_with_the_one_process_losses(tmp_path):
    from conftest import free_port

    ports = [free_port(), free_port()]
    workers = [_worker(i, ports, tmp_path / f"worker{i}") for i in range(2)]
    alone = subprocess.run([sys.executable, *TRAIN, "--out", str(tmp_path / "alone")], cwd=ROOT,
                           env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                           timeout=600)
    outs = [w.communicate(timeout=600) for w in workers]
    assert alone.returncode == 0, alone.stderr[-2000:]
    for w, (_, err) in zip(workers, outs):
        assert w.returncode == 0, err[-3000:]
    # only the chief wrote a run directory; the other worker trained and said so
    assert (tmp_path / "worker0" / "metrics.json").is_file() and not (tmp_path / "worker1").exists()
    assert "worker (not chief): completed, 6 steps with 2 workers / 2 replicas" in outs[1][1]
    record = json.loads((tmp_path / "worker0" / "metrics.json").read_text())
    assert record["status"] == "completed"
    assert {k: record["summary"][k] for k in ("strategy", "workers", "replicas")} == \
        {"strategy": "multiworker", "workers": 2, "replicas": 2}
    one, two = np.array(_losses(tmp_path / "alone")), np.array(_losses(tmp_path / "worker0"))
    assert len(one) == len(two) == 6 and one[-1] != one[0]
    np.testing.assert_allclose(two, one, atol=1e-4)   # the same global batch, half on each worker
    # the non-chief worker streamed the same (all-reduced) losses
    theirs = [json.loads(line)["loss"] for line in outs[1][0].splitlines() if '"StepLogged"' in line]
    np.testing.assert_allclose(theirs, two, atol=1e-6)


@pytest.mark.slow
def test_a_worker_that_never_joins_or_dies_gives_a_clear_error_in_bounded_time(tmp_path):
    import time

    from conftest import free_port

    # worker 1 never starts: worker 0 gives up after LORA_LAB_WORKER_TIMEOUT seconds and says who is missing.
    # Beside it (other ports), a pair whose worker 1 dies mid-run.
    lonely_ports, ports = [free_port(), free_port()], [free_port(), free_port()]
    t0 = time.monotonic()
    lonely = _worker(0, lonely_ports, tmp_path / "lonely", timeout_s=5)
    workers = [_worker(i, ports, tmp_path / f"w{i}", timeout_s=30, steps="2000") for i in range(2)]

    # worker 1 dies mid-run: worker 0's run fails with what happened, keeping the steps it logged
    for line in workers[1].stdout:
        if '"step": 3,' in line:
            workers[1].kill()
            killed = time.monotonic()
            break
    workers[0].communicate(timeout=120)
    assert workers[0].returncode == 1 and time.monotonic() - killed < 60
    record = json.loads((tmp_path / "w0" / "metrics.json").read_text())
    assert record["status"] == "failed" and "another worker of the cluster stopped answering" in record["error"]
    assert len(record["losses"]) >= 3
    workers[1].wait(30)

    _, err = lonely.communicate(timeout=120)
    assert lonely.returncode != 0 and time.monotonic() - t0 < 90
    assert "did not come up within 5 s" in err and f"127.0.0.1:{lonely_ports[1]}" in err, err[-2000:]
    assert not (tmp_path / "lonely").exists()
