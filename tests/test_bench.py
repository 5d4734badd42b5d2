"""The benchmark runs and reports every figure. Not a timing test: figures are checked for being
measured (finite, positive), never against goals. The architecture is the bundled tiny so the whole
path (both step flavours, full fine-tuning, memory children, translation, PyTorch+PEFT) runs in about
a minute; BENCHMARKS.md has the flan-t5 figures."""

import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT

from lora_demo.core.config import LoraConfig
from lora_demo.core.params import preview

KEYS = ["lora_step_s", "plain_step_s", "first_loss_s", "plain_first_loss_s", "full_step_s", "peak_rss_lora_mb",
        "peak_rss_full_mb", "translate_1_s", "translate_16_s", "translate_16_two_decodes_s", "translate_16_x4_s",
        "translate_16_x4_separate_s", "peft_step_s", "mfu", "real_tokens_per_s", "grouped_tokens_per_s", "peak_rss_lora_compiled_first_mb",
        "peft_real_tokens_per_s", "naive_step_s", "naive_first_loss_s", "naive_ratio", "naive_ratio_fp32",
        "default_run_s", "click_ratio"]


@pytest.mark.slow
def test_bench_quick_json_emits_every_figure():
    proc = subprocess.run([sys.executable, "-m", "lora_demo", "bench", "--quick", "--json", "--model", "micro",
                           "--precision", "fp32"],   # fp32 also skips the fp32 reference step
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(KEYS) <= set(fig), set(KEYS) - set(fig)
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        have_peft = True
    except ImportError:
        have_peft = False
    for key in KEYS:
        if key.startswith("peft_") and not have_peft:
            assert fig[key] is None
            continue
        assert isinstance(fig[key], float) and math.isfinite(fig[key]) and fig[key] > 0, (key, fig[key])
    assert fig["memory_model"] == "micro" and 0 < fig["mfu"] < 1
    assert fig["translate_outputs_equal"] is True   # one decode of every column = one decode each, token for token
    assert fig["precision"] == "fp32" and "lora_step_fp32_s" not in fig
    assert fig["second_run_traced"] is False and 0 < fig["second_run_first_loss_s"]
    # the naive baseline trains what ours trains (r=8 on q and v), so the two steps are comparable
    assert fig["naive_trained"] == preview("micro", LoraConfig(rank=8, targets=("q", "v"))).trainable
    assert fig["naive_ratio"] == pytest.approx(fig["naive_step_s"] / fig["lora_step_s"])
    # Train to verdict in a launched app: the run completed, and the ratio is the record's own two times
    click = fig["click"]
    assert click["status"] == "completed" and click["steps"] == 10 and click["model"] == "micro"
    assert click["ratio"] == pytest.approx(click["click_s"] / click["training_s"]) and click["click_s"] > click["training_s"]
    assert "naive LoRA step written from scratch" in proc.stderr
    # the profile of both steps: op types with their time per step and share, matmuls among them
    for side in ("ours", "naive"):
        table_rows = fig["profile"][side]
        assert table_rows and all(ms > 0 and 0 < pct <= 100 for _, ms, pct in table_rows), table_rows
        assert sum(pct for _, _, pct in table_rows) <= 100.001
        assert any("MatMul" in op for op, _, _ in table_rows), table_rows
    # the default run as `train` runs it, in its own process, cut to 20 steps on a test model: one evaluation
    # interval, so the base point and one more on the held-out curve
    run = fig["default_run"]
    assert (run["steps"], run["default"], run["eval_points"]) == (20, False, 2), run
    assert 0 < run["mean_step_s"] * run["steps"] < run["training_s"] < run["command_s"]
    from benchmarks.bench import table   # the human-readable table prints the ratio and its goal
    text = table(fig)
    assert "naive step from scratch (fp32)" in text and "our step vs the naive step" in text
    assert "naive (fp32), top op types:" in text and "default run cut to 20 steps" in text
    # real data: one epoch of the same pairs for every flavour, so the same real tokens; ours all compiled,
    # and length grouping leaves less padding than one shape for all
    grouped, padded = fig["real_grouped"], fig["real_padded"]
    epoch = fig["throughput_pairs"] // fig["batch"]   # one epoch of the smoke run's pairs
    assert fig["throughput_pairs"] == 64 and grouped["tokens"] == padded["tokens"]
    assert grouped["compiled_steps"] == grouped["steps"] == epoch
    assert grouped["padding_pct"] < padded["padding_pct"] and grouped["batching"].startswith("length-grouped")
    assert fig["real_tokens_per_s"] == padded["tokens_per_s"] and padded["batching"].startswith("every batch padded")
    if have_peft:
        assert fig["real_peft"]["tokens"] == grouped["tokens"]
    # what the figures rest on: the CPU's instruction-set level, threads, the TensorFlow build
    m = fig["machine"]
    assert m["cpu_isa"] in ("AMX", "AVX512-BF16", "AVX-512", "AVX2", "unknown") and m["tensorflow"].startswith("2.15")
    assert 1 <= m["cpus_usable"] <= m["cpu_count"] and m["onednn"] in (True, False, None)
    assert f"instruction-set level {m['cpu_isa']}" in proc.stderr
