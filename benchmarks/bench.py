"""``python -m lora_demo bench``: measure the training step, first loss, memory and translation.

Everything is measured in one run on this machine, against baselines measured in the same run:
flan-t5-small (and, without ``--quick``, flan-t5-base) built from the shipped configs with random
weights (no download), batch 8, 64 source + 64 target tokens, LoRA r=8 on q,v.

- ``lora_step_s``: our training step (the one ``train()`` compiles: autograph off), median of
  several steps, at the chosen precision (``auto`` = bf16 where the CPU or GPU does it fast).
- ``plain_step_s``: the plain baseline: ``tf.function`` with autograph on, float32, through our layers.
- ``naive_step_s``: an independent baseline written from scratch (benchmarks/naive.py: a 15-line LoRA
  layer on q and v, Hugging Face's model as built, autograph on, Adam, float32, dropout on);
  ``naive_ratio`` = naive / ours at the chosen precision, ``naive_ratio_fp32`` the same for our fp32 step.
- ``first_loss_s`` / ``plain_first_loss_s``: from "Train pressed" (model loaded) to the first loss.
- ``second_run_first_loss_s``: the same, for a second ``train()`` run with the same shapes on the
  same model (bundled WMT16 pairs, tokenised by the bundled tokenizer), which reuses the first run's
  compiled step; ``second_run_traced`` says whether it traced anything.
- ``real_tokens_per_s``: training tokens (real source + target tokens) per second on 256 bundled
  WMT16 news pairs, one epoch, batched as ``train()`` batches them by default (every batch padded to
  the longest pair: one shape); ``grouped_tokens_per_s`` the same with ``batching="grouped"``
  (length-grouped batches, each trimmed to its longest row, one trace for every length);
  ``peft_real_tokens_per_s`` PyTorch + PEFT on the same pairs, token for token, with dynamic
  padding and length grouping. Details (tokens, seconds, padding) under ``real_*``.
- ``full_step_s``: full fine-tuning (every weight trainable, AdamW), float32.
- ``peak_rss_lora_mb`` / ``peak_rss_full_mb``: each in its own process (flan-t5-base, or
  flan-t5-small with ``--quick``), so one measurement never inflates the other.
- ``translate_1_s`` / ``translate_16_s``: base and LoRA columns together, as the app does it (one
  compiled decode of the sentences twice over, the second copy on W + ΔW), 64 new tokens, compile
  excluded; ``translate_*_two_decodes_s`` the way it was done before (a base decode, then one with the
  adapter merged), on the same weights and inputs in the same run. ``translate_16_x4_s``: the base
  beside three runs, one decode of four copies; ``translate_16_x4_separate_s`` four decodes.
- ``peft_step_s``: PyTorch + PEFT, same shapes, when both are installed (else null).
- ``profile``: the op types that take the most time in our step and in the naive one (TensorFlow's
  profiler over two steps; ms per step and share of op time), so the two can be compared by op.
- ``default_run_s``: the default run's training time (steps and evaluation points), run as a user runs
  it (``python -m lora_demo train``, every default) in its own process; details (steps, mean step,
  evaluation points, the whole command's time) under ``default_run``. On a test model (micro, tiny) it
  is cut to 20 steps, a smoke run.
- ``click``: Train pressed to the verdict shown, for the default run in the app (benchmarks/click.py):
  the bundled tiny's real default run on a flan-t5 bench (a short run on a test model); ``click_ratio`` =
  that time over the run's training time (the goal: at most 1.25).
- ``mfu``: model FLOPs of our LoRA step / step time / the matmul peak measured here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from benchmarks import BATCH, RANK, SOURCE, TARGET
from benchmarks.machine import median_s, machine, machine_lines, matmul_peak, peak_rss_kb
from benchmarks.click import click_to_finished
from benchmarks.default_run import default_run
from benchmarks.naive import naive_step
from benchmarks.profile import lines as profile_lines, op_table
from benchmarks.peft_baseline import peft_real_throughput, peft_step
from benchmarks.translate import translate_latency

SMALL, BASE = "google/flan-t5-small", "google/flan-t5-base"
CLICK_SMOKE = {"steps": 10, "bleu_size": 20, "eval_every": 5}   # a test model's click figure: a short run


def step_flops(config) -> float:
    """Matmul FLOPs of one LoRA training step (frozen base): forward, plus the backward pass for
    activations (about the forward again); LoRA's own weight gradients are negligible."""
    d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
    gated = 3 if config.is_gated_act else 2
    enc_tok, dec_tok = BATCH * SOURCE, BATCH * TARGET
    per_layer_enc = 4 * d * inner + gated * d * ff
    enc = config.num_layers * (enc_tok * per_layer_enc + 2 * BATCH * SOURCE * SOURCE * inner)
    dec_layers = config.num_decoder_layers or config.num_layers
    dec = dec_layers * (dec_tok * (4 * d * inner + 2 * d * inner + gated * d * ff) + enc_tok * 2 * d * inner
                        + 2 * BATCH * TARGET * TARGET * inner + 2 * BATCH * TARGET * SOURCE * inner)
    head = dec_tok * d * config.vocab_size
    forward = 2 * (enc + dec + head)
    return 2 * forward


def _batch(seed: int = 0):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    return {"input_ids": tf.constant(rng.integers(2, 4000, (BATCH, SOURCE)), tf.int32),
            "attention_mask": tf.ones((BATCH, SOURCE), tf.int32),
            "labels": tf.constant(rng.integers(2, 4000, (BATCH, TARGET)), tf.int32)}


def _model(name: str, precision: str):
    from lora_demo.core.models import build_random, precision_policy

    with precision_policy(precision):
        return build_random(name)


def lora_steps(name: str, precision: str, autograph: bool, steps: int = 5, eager_first: bool = True,
               profile=None) -> dict:
    """First-loss time (from adding the adapter) and median step time of one step flavour; ``profile(fn)``,
    if given, is called on the warm step (benchmarks.profile.op_table) and its result returned as ``profile``."""
    import tensorflow as tf

    from lora_demo.training.compiled import spec
    from lora_demo.core.config import LoraConfig, TrainConfig
    from lora_demo.core.inject import apply_lora
    from lora_demo.core.lora import step_dropout
    from lora_demo.training.optimisers import build_optimizer_state, make_optimizer
    from lora_demo.training.steps import make_preview, make_step

    model = _model(name, precision)
    batch = _batch()
    t0 = time.perf_counter()
    clock = step_dropout(model)   # T5's dropouts keyed on the step, as train() runs them
    layers = apply_lora(model, LoraConfig(rank=RANK, targets=("q", "v")))
    variables = [v for layer in layers for v in (layer.lora_A, layer.lora_B)]
    opt, _ = make_optimizer(TrainConfig())
    build_optimizer_state(opt, variables)
    step = make_step(model, opt, variables, 1.0, clock)
    if autograph:   # the plain baseline: trace first, then run
        fn = tf.function(step)
        first_loss = float(fn(batch)[0])
        first_s = time.perf_counter() - t0
    elif eager_first:   # ours, as train() does it: step 1's loss by an eager forward pass (reported at once),
        first_loss = make_preview(model, clock)(batch)   # then the trace, and step 1's update compiled
        first_s = time.perf_counter() - t0
        fn = tf.function(step, autograph=False).get_concrete_function(spec(batch))
    else:               # ours with first_step="compiled": trace, then step 1 compiled
        fn = tf.function(step, autograph=False).get_concrete_function(spec(batch))
        first_loss = float(fn(batch)[0])
        first_s = time.perf_counter() - t0
    fn(batch)
    out = {"first_loss_s": first_s, "step_s": median_s(lambda: float(fn(batch)[0]), steps), "loss": first_loss}
    if profile is not None:
        out["profile"] = profile(lambda: float(fn(batch)[0]))
    return out


def second_run(name: str, precision: str) -> dict:
    """Two short train() runs with the same shapes on one model: first-loss time of each, and
    whether the second traced (it should reuse the first run's compiled step)."""
    from lora_demo import data
    from lora_demo.core.config import LoraConfig, RunConfig, TrainConfig
    from lora_demo.core.inject import remove_lora
    from lora_demo.training.train import train

    model = _model(name, precision)
    tokenizer = _tiny_tokenizer(name)
    pairs, val = data.load_pairs("train", 64, source="bundled"), data.load_pairs("validation", 8, source="bundled")
    out = []
    for seed in (0, 1):
        run = RunConfig(model=name, lora=LoraConfig(rank=RANK, targets=("q", "v")),
                        train=TrainConfig(steps=3, batch_size=BATCH, train_size=64, eval_every=1000, eval_size=8,
                                          bleu_size=0, seed=seed, samples=()))
        try:
            summary = list(train(run, model, tokenizer, pairs, val))[-1].summary
        finally:
            remove_lora(model)
        out.append(summary)
    return {"run1_first_loss_s": out[0]["first_loss_s"], "second_run_first_loss_s": out[1]["first_loss_s"],
            "second_run_traced": bool(out[1]["trace_s"] or out[1]["eager_steps"])}


THROUGHPUT_PAIRS = 256   # bundled news pairs for the real-data figures: one epoch of 32 batches of 8
SMOKE_PAIRS = 64         # the same on a test model (micro, tiny): a smoke run that checks the figures print
DEFAULT_RUN_SMOKE_STEPS = 20   # on a test model: the default run cut to one evaluation interval, no BLEU


def _tiny_tokenizer(name: str):
    """The model's own tokenizer when it is bundled, else tiny's (its ids are valid ids of any larger
    vocabulary): the flan-t5 architectures are benchmarked offline, without their hub tokenizer."""
    from lora_demo.core.models import BUNDLED, load_model

    return load_model(name if name in BUNDLED else "tiny", fallback=False).tokenizer


def real_data(name: str, pairs_n: int = THROUGHPUT_PAIRS):
    """(tokenizer, training pairs, validation pairs, the pairs encoded as train() encodes them)."""
    from lora_demo import data

    tokenizer = _tiny_tokenizer(name)
    pairs = data.training_pairs("news", pairs_n, source="bundled")
    return tokenizer, pairs, data.load_pairs("validation", 8, source="bundled"), data.encode(tokenizer, pairs, 64, 64)


def real_throughput(name: str, precision: str, batching: str, pairs_n: int = THROUGHPUT_PAIRS) -> dict:
    """Training tokens per second on real bundled WMT16 news pairs, batched as ``train()`` batches
    them. A short run traces the step first; the timed run (same model) reuses it, so all of its
    steps are compiled, and covers exactly one epoch of the pairs: every real source and target
    token once. Seconds are the steps' own wall times (evaluation excluded)."""
    from lora_demo.core.config import LoraConfig, RunConfig, TrainConfig
    from lora_demo.core.events import RunStarted, StepLogged
    from lora_demo.core.inject import remove_lora
    from lora_demo.training.train import train

    model = _model(name, precision)
    tokenizer, pairs, val, _ = real_data(name, pairs_n)
    out = {}
    for steps in (3, pairs_n // BATCH):   # trace, then the timed epoch
        run = RunConfig(model=name, lora=LoraConfig(rank=RANK, targets=("q", "v")),
                        train=TrainConfig(steps=steps, batch_size=BATCH, train_size=pairs_n, eval_every=10 ** 5,
                                          eval_size=8, bleu_size=0, samples=(), batching=batching))
        try:
            events = list(train(run, model, tokenizer, pairs, val))
        finally:
            remove_lora(model)
        logged = [e for e in events if isinstance(e, StepLogged)]
        if len(logged) != steps:
            raise RuntimeError(f"the throughput run ended early: {events[-1]}")
        shapes = next(e.shapes for e in events if isinstance(e, RunStarted))
    tokens = sum(e.tokens for e in logged)
    seconds = sum(e.tokens / e.tokens_per_s for e in logged)
    out.update(tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds, compiled_steps=sum(e.compiled for e in logged),
               steps=len(logged), padding_pct=events[-1].summary["padding_pct"], batching=shapes["batching"])
    return out


def full_step(name: str, precision: str, steps: int = 3) -> float:
    import tensorflow as tf

    from lora_demo.core.config import TrainConfig
    from lora_demo.training.optimisers import build_optimizer_state, make_optimizer
    from lora_demo.training.steps import make_step

    model = _model(name, precision)
    variables = model.trainable_variables
    opt, _ = make_optimizer(TrainConfig())
    build_optimizer_state(opt, variables)
    fn = tf.function(make_step(model, opt, variables, 1.0), autograph=False)
    batch = _batch()
    fn(batch)
    return median_s(lambda: float(fn(batch)[0]), steps)


def peak_rss_children(jobs: dict[str, tuple[str, str, str]]) -> dict[str, float]:
    """Peak RSS of fresh processes, one per ``{figure: (kind, model, precision)}``, each building the model and
    running a few steps of ``kind`` (lora|lora-compiled|full). They run side by side: each process's own
    high-water mark is what is read, so they do not inflate each other, and the wait is the longest one's."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = {fig: subprocess.Popen([sys.executable, "-m", "lora_demo", "bench", "--child", kind, "--child-model", name,
                                    "--precision", precision], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=env)
             for fig, (kind, name, precision) in jobs.items()}
    out = {}
    for fig, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {jobs[fig][0]} failed: {stderr[-2000:]}")
        out[fig] = json.loads(stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return out


def child(kind: str, name: str, precision: str) -> None:
    if kind == "lora":              # as train() runs by default: step 1's loss by an eager forward, then compiled steps
        lora_steps(name, precision, autograph=False, steps=2)
    elif kind == "lora-compiled":   # train()'s first_step="compiled": no eager step
        lora_steps(name, precision, autograph=False, steps=2, eager_first=False)
    else:
        full_step(name, precision, steps=2)
    print(json.dumps({"peak_rss_mb": round(peak_rss_kb() / 1024, 1)}))


def _steps(model: str, prec: str, log) -> dict:
    """Our step against the two baselines: the plain one (our layers, autograph on) and the naive one."""
    from lora_demo.core.models import model_config

    log("plain baseline step (tf.function, autograph on, fp32)...")
    plain = lora_steps(model, "fp32", autograph=True)
    log(f"our LoRA step ({prec}), then profiled...")
    ours = lora_steps(model, prec, autograph=False, profile=op_table)
    log("the naive LoRA step written from scratch (autograph on, Adam, fp32, dropout on), then profiled...")
    naive = naive_step(model_config(model), _batch(), rank=RANK, profile=op_table)
    return dict(lora_step_s=ours["step_s"], plain_step_s=plain["step_s"], first_loss_s=ours["first_loss_s"],
                plain_first_loss_s=plain["first_loss_s"], naive_step_s=naive["step_s"],
                naive_first_loss_s=naive["first_loss_s"], naive_trained=naive["trained"],
                naive_ratio=naive["step_s"] / ours["step_s"],
                profile={"ours": ours["profile"], "naive": naive["profile"]})


def _default_runs(model: str, prec: str, tokenizer, log) -> dict:
    """The default run as the CLI runs it, then Train pressed to verdict in the app (for a flan-t5 bench the
    click figure is the bundled tiny's real default run; for a smoke model, a short one)."""
    short = None if model in (SMALL, BASE) else DEFAULT_RUN_SMOKE_STEPS
    log(f"the default run, as `python -m lora_demo train` runs it ({short or 'all'} steps, its own process)...")
    fig = {"default_run": default_run(model, prec, tokenizer, short)}
    fig["default_run_s"] = fig["default_run"]["training_s"]
    real = model in (SMALL, BASE)
    log(f"Train pressed to verdict, the default run in the app ({'tiny' if real else model}"
        f"{'' if real else ', a smoke run'})...")
    fig["click"] = click_to_finished("tiny" if real else model, None if real else CLICK_SMOKE)
    fig["click_ratio"] = fig["click"]["ratio"]
    return fig


def run(quick: bool = False, precision: str = "auto", log=print, model: str = SMALL) -> dict:
    """All figures in one run. ``model`` other than flan-t5-small (e.g. ``tiny``) is for smoke runs."""
    import tensorflow as tf

    from lora_demo.core.models import cpu_has_fast_bf16, model_config, resolve_precision

    prec = resolve_precision(precision)
    fig: dict = {"model": model, "precision": prec, "precision_requested": precision, "batch": BATCH, "source_len": SOURCE, "target_len": TARGET,
                 "rank": RANK, "targets": "q,v", "cpu_count": os.cpu_count(), "tensorflow": tf.__version__,
                 "cpu_fast_bf16": cpu_has_fast_bf16(), "machine": machine()}
    for line in machine_lines(fig["machine"]):
        log(line)
    log("measuring the matmul peak...")
    fig["peak_gflops_fp32"] = matmul_peak("fp32")
    fig["peak_gflops_bf16"] = matmul_peak("bf16")
    fig.update(_steps(model, prec, log))
    log("a second train() run with the same shapes...")
    fig.update(second_run(model, prec))
    pairs_n = fig["throughput_pairs"] = THROUGHPUT_PAIRS if model in (SMALL, BASE) else SMOKE_PAIRS
    log(f"real-data throughput: {pairs_n} bundled news pairs, one epoch, as train() batches them "
        "(padded to one shape)...")
    fig["real_padded"] = real_throughput(model, prec, "padded", pairs_n)
    log("real-data throughput with --batching grouped (length-grouped, trimmed batches)...")
    fig["real_grouped"] = real_throughput(model, prec, "grouped", pairs_n)
    log("real-data throughput of PyTorch + PEFT (dynamic padding, length grouping), if installed...")
    tokenizer, _, _, arrays = real_data(model, pairs_n)
    fig["real_peft"] = peft_real_throughput(tokenizer, arrays, pairs_n, model)
    fig.update(real_tokens_per_s=fig["real_padded"]["tokens_per_s"], grouped_tokens_per_s=fig["real_grouped"]["tokens_per_s"],
               peft_real_tokens_per_s=fig["real_peft"]["tokens_per_s"] if fig["real_peft"] else None)
    if prec != "fp32":
        log("our LoRA step (fp32, for reference)...")
        fig["lora_step_fp32_s"] = lora_steps(model, "fp32", autograph=False)["step_s"]
    fig["naive_ratio_fp32"] = fig["naive_step_s"] / fig.get("lora_step_fp32_s", fig["lora_step_s"])
    log("full fine-tuning step (fp32)...")
    fig["full_step_s"] = full_step(model, "fp32")
    mem_model = model if quick else BASE
    log(f"peak memory, each in its own process ({mem_model})...")
    fig["memory_model"] = mem_model
    fig.update(peak_rss_children({"peak_rss_lora_mb": ("lora", mem_model, prec),
                                  "peak_rss_lora_compiled_first_mb": ("lora-compiled", mem_model, prec),
                                  "peak_rss_full_mb": ("full", mem_model, "fp32")}))
    if not quick:
        log("flan-t5-base steps...")
        fig["base_lora_step_s"] = lora_steps(BASE, prec, autograph=False, steps=3)["step_s"]
        fig["base_full_step_s"] = full_step(BASE, "fp32", steps=2)
    log("translation latency (compiles once per shape first)...")
    fig.update(translate_latency(_model(model, "fp32"), _model(model, "fp32"), reps=3 if model in (SMALL, BASE) else 1))
    log("PyTorch + PEFT step (if installed)...")
    fig["peft_step_s"] = peft_step(model, _batch())
    fig.update(_default_runs(model, prec, tokenizer, log))
    flops = step_flops(model_config(model))
    peak = fig["peak_gflops_bf16"] if prec == "bf16" else fig["peak_gflops_fp32"]
    fig["step_gflop"] = flops / 1e9
    fig["mfu"] = flops / 1e9 / fig["lora_step_s"] / peak
    return fig


def _bf16_fast(f: dict) -> bool:
    return f["machine"]["cpu_isa"] in ("AMX", "AVX512-BF16")


GOALS = [  # (label, goal text, passes(fig)): issues 15's and 28's goals, each a ratio within one run
    ("our step vs the naive step", ">= 1.0x the naive step's speed, in fp32 and in the chosen precision",
     lambda f: f["naive_ratio"] >= 1.0 and f["naive_ratio_fp32"] >= 1.0),
    ("real-data throughput vs PyTorch+PEFT", ">= 2x PEFT's tokens/s (train()'s default batching)",
     lambda f: None if f["peft_real_tokens_per_s"] is None else f["real_tokens_per_s"] >= 2 * f["peft_real_tokens_per_s"]),
    ("real-data throughput, --batching grouped, vs PyTorch+PEFT", ">= 2x PEFT's tokens/s",
     lambda f: None if f["peft_real_tokens_per_s"] is None else f["grouped_tokens_per_s"] >= 2 * f["peft_real_tokens_per_s"]),
    ("--precision auto step vs plain", ">= 2x plain where bf16 is fast (AMX, AVX512-BF16), else >= 1x",
     lambda f: None if f.get("precision_requested", "auto") != "auto" else
     f["plain_step_s"] / f["lora_step_s"] >= (2.0 if _bf16_fast(f) else 1.0)),
    ("peak memory, LoRA vs full", "<= 0.6x full fine-tuning (flan-t5-base)",
     lambda f: None if f["memory_model"] != BASE else f["peak_rss_lora_mb"] <= 0.6 * f["peak_rss_full_mb"]),
    ("peak memory, LoRA with --first-step compiled vs full", "<= 0.6x full fine-tuning (flan-t5-base)",
     lambda f: None if f["memory_model"] != BASE else f["peak_rss_lora_compiled_first_mb"] <= 0.6 * f["peak_rss_full_mb"]),
    ("translate 16 sentences (base + LoRA)", "<= 3 s (the goal is set for AVX2)",
     lambda f: f["translate_16_s"] <= 3),
    ("second run, same shapes", "no tracing again", lambda f: not f["second_run_traced"]),
    ("Train pressed to verdict, the default run on the bundled tiny", "<= 1.25x its training time",
     lambda f: None if not f["click"]["default"] else f["click"]["ratio"] <= 1.25),
    ("the default run on flan-t5-small", "about a minute of training (<= 75 s) on 2 cores",
     lambda f: None if not (f["default_run"]["default"] and f["model"] == SMALL) else f["default_run_s"] <= 75),
]


def _run_rows(f: dict) -> list[tuple[str, str, str]]:
    """The table's rows for the default run, the click to verdict and flan-t5-base, where measured."""
    rows = []
    d = f.get("default_run")
    if d:
        rows.append(("default run (`train`, every default)" if d["default"] else f"default run cut to {d['steps']} steps",
                     f"{d['training_s']:.1f} s", f"training: {d['steps']} steps of {d['mean_step_s']:.3f} s and "
                     f"{d['eval_points']} evaluation points; the whole command {d['command_s']:.0f} s"))
    c = f.get("click")
    if c:
        rows.append((f"Train to verdict in the app ({c['model']}{'' if c['default'] else ', smoke'})",
                     f"{c['click_s']:.1f} s", f"{c['ratio']:.2f}x its {c['training_s']:.1f} s of training "
                     f"({c['steps']} steps, {c['bleu_size']} sentences scored; warm-up {c['warm_up_s']:.0f} s)"))
    if "base_lora_step_s" in f:
        rows.append(("flan-t5-base LoRA / full step", f"{f['base_lora_step_s']:.2f} / {f['base_full_step_s']:.2f} s",
                     ""))
    return rows


def table(f: dict) -> str:
    def x(a, b):
        return f"{a / b:.2f}x" if a and b else "–"
    rows = [
        ("LoRA step (ours, %s)" % f["precision"], f"{f['lora_step_s']:.3f} s",
         f"{x(f['plain_step_s'], f['lora_step_s'])} faster than plain"),
        ("plain tf.function step (fp32)", f"{f['plain_step_s']:.3f} s", "baseline (our layers, autograph on)"),
        ("naive step from scratch (fp32)", f"{f['naive_step_s']:.3f} s",
         f"ours runs at {f['naive_ratio']:.2f}x its speed ({f['precision']}), {f['naive_ratio_fp32']:.2f}x in fp32"),
        ("first loss point (ours)", f"{f['first_loss_s']:.1f} s", f"{x(f['plain_first_loss_s'], f['first_loss_s'])} "
                                                                  "sooner than plain"),
        ("first loss point (plain)", f"{f['plain_first_loss_s']:.1f} s", "trace, then first step"),
        ("first loss, train() run 1 / run 2", f"{f['run1_first_loss_s']:.1f} / {f['second_run_first_loss_s']:.1f} s",
         "run 2 traced again" if f["second_run_traced"] else "run 2 reuses run 1's compiled step"),
        ("full fine-tuning step (fp32)", f"{f['full_step_s']:.3f} s", f"{x(f['full_step_s'], f['lora_step_s'])} our "
                                                                      "LoRA step"),
        (f"peak RSS LoRA ({f['memory_model'].split('/')[-1]})", f"{f['peak_rss_lora_mb']:,.0f} MB",
         f"{f['peak_rss_lora_mb'] / f['peak_rss_full_mb']:.2f}x full fine-tuning"),
        ("peak RSS LoRA, no eager step 1", f"{f['peak_rss_lora_compiled_first_mb']:,.0f} MB",
         f"{f['peak_rss_lora_compiled_first_mb'] / f['peak_rss_full_mb']:.2f}x full (train --first-step compiled)"),
        (f"peak RSS full ({f['memory_model'].split('/')[-1]})", f"{f['peak_rss_full_mb']:,.0f} MB", ""),
        ("translate 1 sentence, base + LoRA", f"{f['translate_1_s']:.2f} s",
         f"compile once: {f['translate_compile_1_s']:.0f} s"),
        ("translate 16 sentences, base + LoRA", f"{f['translate_16_s']:.2f} s",
         f"compile once: {f['translate_compile_16_s']:.0f} s"),
        ("translate 16, as two decodes (before)", f"{f['translate_16_two_decodes_s']:.2f} s",
         f"one decode is {x(f['translate_16_two_decodes_s'], f['translate_16_s'])} faster; same tokens: "
         f"{'yes' if f['translate_outputs_equal'] else 'NO'}"),
        ("translate 16, base beside three runs: one decode / four", f"{f['translate_16_x4_s']:.2f} s / {f['translate_16_x4_separate_s']:.2f} s", f"{x(f['translate_16_x4_separate_s'], f['translate_16_x4_s'])} faster in one decode"),
        ("PyTorch + PEFT step", "not installed" if f["peft_step_s"] is None else f"{f['peft_step_s']:.3f} s",
         "" if f["peft_step_s"] is None else f"ours is {x(f['peft_step_s'], f['lora_step_s'])} faster"),
        (f"real data: ours, tokens/s ({f['precision']})", f"{f['real_tokens_per_s']:,.0f}",
         f"padded to one shape (the default): {f['real_padded']['padding_pct']:.0f}% padding"),
        ("real data: ours, --batching grouped", f"{f['grouped_tokens_per_s']:,.0f}",
         f"{x(f['grouped_tokens_per_s'], f['real_tokens_per_s'])} the default; "
         f"{f['real_grouped']['padding_pct']:.0f}% padding"),
        ("real data: PyTorch + PEFT, tokens/s", "not installed" if f["peft_real_tokens_per_s"] is None else
         f"{f['peft_real_tokens_per_s']:,.0f}", "" if f["peft_real_tokens_per_s"] is None else
         f"ours is {x(f['real_tokens_per_s'], f['peft_real_tokens_per_s'])} (grouped: "
         f"{x(f['grouped_tokens_per_s'], f['peft_real_tokens_per_s'])}); {f['real_peft']['padding_pct']:.0f}% "
         f"padding, {f['real_peft']['threads']} threads"),
        ("MFU of our LoRA step", f"{100 * f['mfu']:.1f}%", f"{f['step_gflop']:.0f} GFLOP/step; peak "
         f"{f['peak_gflops_' + f['precision']]:.0f} GFLOP/s ({f['precision']}, measured)"),
    ]
    rows += _run_rows(f)
    w = max(len(r[0]) for r in rows)
    lines = machine_lines(f["machine"]) + [""] if "machine" in f else []
    lines += [f"{'figure':<{w}}  {'value':>14}  note", "-" * (w + 40)]
    lines += [f"{a:<{w}}  {b:>14}  {c}" for a, b, c in rows]
    if "profile" in f:   # where each step's op time goes, by op type
        lines += [""] + profile_lines(f"ours ({f['precision']}), top op types", f["profile"]["ours"])
        lines += profile_lines("naive (fp32), top op types", f["profile"]["naive"])
    return "\n".join(lines + ["", "goals:"] + goal_lines(f))


def goal_lines(f: dict) -> list[str]:
    """Each goal of GOALS, met, MISSED or not measured in this run."""
    out = []
    for label, goal, ok in GOALS:
        try:
            result = ok(f)
        except (TypeError, KeyError, ZeroDivisionError):
            result = None
        met = "not measured in this run" if result is None else ("met" if result else "MISSED")
        out.append(f"  {label}: {goal} -> {met}")
    return out
