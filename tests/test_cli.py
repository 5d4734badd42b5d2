"""The CLI end to end, as a user runs it (subprocesses, real files)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from safetensors.numpy import load_file


def cli(*args, input=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lora_demo", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, input=input)


def cli_here(capsys, *args):
    """The same entry point in this process (no interpreter start-up): for the quick, offline commands."""
    from lora_demo.cli import main

    with pytest.raises(SystemExit) as ended:
        main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, ended.value.code, out.out, out.err)


def test_params_prints_the_exact_flan_t5_small_numbers(capsys):
    out = cli_here(capsys, "params", "--model", "google/flan-t5-small", "--rank", "8", "--targets", "q,v")
    assert out.returncode == 0, out.stderr
    assert "344,064" in out.stdout and "77,305,216" in out.stdout and "0.445%" in out.stdout


def test_params_json_and_full_fine_tuning(capsys):
    out = json.loads(cli_here(capsys, "params", "--model", "google/flan-t5-base", "--full", "--json").stdout)
    assert out["trainable"] == out["total"] == 247_577_856


@pytest.mark.parametrize("args,message", [
    (["--rank", "0"], "rank must be between 1 and"),
    (["--targets", "q,x"], "unknown target module(s) x"),
    (["--layers", "3-1"], "is empty"),
    (["--layers", "0-99"], "outside the encoder"),
])
def test_bad_params_input_exits_2_with_a_message(capsys, args, message):
    out = cli_here(capsys, "params", "--model", "google/flan-t5-small", *args)
    assert out.returncode == 2 and message in out.stderr


@pytest.mark.slow
def test_train_then_translate_with_the_adapter(tmp_path):
    out_dir = tmp_path / "run"
    out = cli("train", "--model", "tiny", "--rank", "4", "--targets", "q,v", "--steps", "30", "--bleu-size", "8",
              "--out", str(out_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "training" in out.stderr  # the progress bar
    metrics = json.loads((out_dir / "metrics.json").read_text())
    s = metrics["summary"]
    assert metrics["status"] == "completed" and s["steps_done"] == 30
    assert s["probe_loss_final"] < s["probe_loss_base"]  # same 32 training pairs, base vs LoRA
    assert "train loss on 32 fixed training pairs: base" in out.stdout
    assert len(metrics["losses"]) == 30 and metrics["params"]["trainable"] > 0
    tensors = load_file(str(out_dir / "adapter_model.safetensors"))
    assert sum(v.size for v in tensors.values()) == metrics["params"]["trainable"]
    assert json.loads((out_dir / "adapter_config.json").read_text())["target_modules"] == ["q", "v"]

    # two independent commands: run side by side
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    translate = [sys.executable, "-m", "lora_demo", "translate", "--model", "tiny", "--adapter", str(out_dir), "--json"]
    procs = [subprocess.Popen(translate + extra + ["The session is resumed."], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for extra in ([], ["--scale", "0"])]
    (tr, tr_err), (base0, _) = (p.communicate(timeout=600) for p in procs)
    assert procs[0].returncode == procs[1].returncode == 0, tr_err[-2000:]
    row = json.loads(tr.strip().splitlines()[-1])
    assert row["en"] == "The session is resumed." and row["base"] and row["lora"]
    row0 = json.loads(base0.strip().splitlines()[-1])
    assert row0["lora"] == row0["base"] == row["base"]


def test_train_json_lines_and_unloadable_model(tmp_path, capsys):
    out = cli("train", "--model", "tiny", "--steps", "2", "--train-size", "16", "--eval-size", "8", "--json",
              "--bleu-size", "0", "--out", str(tmp_path))
    events = [json.loads(line)["event"] for line in out.stdout.splitlines()]
    assert events[0] == "RunStarted" and events[-1] == "RunFinished" and events.count("StepLogged") == 2
    bad = cli_here(capsys, "train", "--model", str(tmp_path / "nope"), "--steps", "2", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "no model directory" in bad.stderr


def test_sweep_writes_one_record_per_rank_and_a_summary(cli_sweep):
    stdout, tmp_path = cli_sweep      # conftest: ranks 8,2 on tiny, 8 BLEU sentences
    records = [json.loads(p.read_text()) for p in tmp_path.glob("*/metrics.json")]
    records = sorted(records, key=lambda r: r["config"]["lora"]["rank"])
    assert [r["config"]["lora"]["rank"] for r in records] == [2, 8]
    assert all(r["status"] == "completed" and r["quality"]["n"] == 8 for r in records)
    assert records[0]["quality"]["base"] == records[1]["quality"]["base"]  # same base, same slice
    assert records[0]["sweep"] == records[1]["sweep"] != ""
    # same seed and data order: the first step sees the same batch, and an untrained adapter is the base
    assert records[0]["losses"][0][1] == pytest.approx(records[1]["losses"][0][1], rel=1e-6)
    assert (tmp_path / "summary.csv").read_text().count("\n") == 3
    assert "| run |" in (tmp_path / "summary.md").read_text() and "| run |" in stdout
