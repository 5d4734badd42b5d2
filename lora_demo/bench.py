"""``python -m lora_demo bench``: measure the training step, first loss, memory and translation.

Everything is measured in one run on this machine, against baselines measured in the same run:
flan-t5-small (and, without ``--quick``, flan-t5-base) built from the shipped configs with random
weights (no download), batch 8, 64 source + 64 target tokens, LoRA r=8 on q,v.

- ``lora_step_s``: our training step (the one ``train()`` compiles: autograph off), median of
  several steps, at the chosen precision (``auto`` = bf16 where the CPU or GPU does it fast).
- ``plain_step_s``: the plain baseline: ``tf.function`` with autograph on, float32.
- ``first_loss_s`` / ``plain_first_loss_s``: from "Train pressed" (model loaded) to the first loss.
- ``second_run_first_loss_s``: the same, for a second ``train()`` run with the same shapes on the
  same model (bundled WMT16 pairs, tokenised by the bundled tokenizer), which reuses the first run's
  compiled step; ``second_run_traced`` says whether it traced anything.
- ``full_step_s``: full fine-tuning (every weight trainable, AdamW), float32.
- ``peak_rss_lora_mb`` / ``peak_rss_full_mb``: each in its own process (flan-t5-base, or
  flan-t5-small with ``--quick``), so one measurement never inflates the other.
- ``translate_1_s`` / ``translate_16_s``: base and LoRA columns together, as the app does it
  (compiled generate, adapter merged for the LoRA column), 64 new tokens, compile excluded.
- ``peft_step_s``: PyTorch + PEFT, same shapes, when both are installed (else null).
- ``mfu``: model FLOPs of our LoRA step / step time / the matmul peak measured here.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

BATCH, SOURCE, TARGET, RANK = 8, 64, 64, 8
SMALL, BASE = "google/flan-t5-small", "google/flan-t5-base"


def _median(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def matmul_peak(dtype: str, n: int = 2048, reps: int = 5) -> float:
    """Measured matmul throughput in GFLOP/s (best of 4 timings of ``reps`` products)."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=tf.float32)
    a = tf.cast(a, tf.bfloat16) if dtype == "bf16" else a
    f = tf.function(lambda x: tf.reduce_sum(tf.cast(tf.matmul(x, x), tf.float32)))
    f(a).numpy()
    best = min(_median(lambda: [f(a).numpy() for _ in range(reps)], 1) for _ in range(4))
    return 2 * n ** 3 * reps / best / 1e9


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
    from .models import build_random, precision_policy

    with precision_policy(precision):
        return build_random(name)


def lora_steps(name: str, precision: str, autograph: bool, steps: int = 5) -> dict:
    """First-loss time (from adding the adapter) and median step time of one step flavour."""
    import tensorflow as tf

    from .compiled import spec
    from .config import LoraConfig, TrainConfig
    from .inject import apply_lora
    from .train import build_optimizer_state, make_optimizer, make_step

    model = _model(name, precision)
    batch = _batch()
    t0 = time.perf_counter()
    layers = apply_lora(model, LoraConfig(rank=RANK, targets=("q", "v")))
    variables = [v for layer in layers for v in (layer.lora_A, layer.lora_B)]
    opt, _ = make_optimizer(TrainConfig())
    build_optimizer_state(opt, variables)
    step = make_step(model, opt, variables, 1.0)
    if autograph:   # the plain baseline: trace first, then run
        fn = tf.function(step)
        first_loss = float(fn(batch)[0])
        first_s = time.perf_counter() - t0
    else:           # ours, as train() does it: step 1 eagerly (reported at once), then the trace
        first_loss = float(step(batch)[0])
        first_s = time.perf_counter() - t0
        fn = tf.function(step, autograph=False).get_concrete_function(spec(batch))
    fn(batch)
    return {"first_loss_s": first_s, "step_s": _median(lambda: float(fn(batch)[0]), steps), "loss": first_loss}


def second_run(name: str, precision: str) -> dict:
    """Two short train() runs with the same shapes on one model: first-loss time of each, and
    whether the second traced (it should reuse the first run's compiled step)."""
    from . import data
    from .config import LoraConfig, RunConfig, TrainConfig
    from .inject import remove_lora
    from .models import BUNDLED, load_model
    from .train import train

    # the model's own tokenizer when it is bundled; else tiny's (its ids are valid ids of any larger vocabulary)
    model = _model(name, precision)
    tokenizer = load_model(name if name in BUNDLED else "tiny", fallback=False).tokenizer
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


def full_step(name: str, precision: str, steps: int = 3) -> float:
    import tensorflow as tf

    from .config import TrainConfig
    from .train import build_optimizer_state, make_optimizer, make_step

    model = _model(name, precision)
    variables = model.trainable_variables
    opt, _ = make_optimizer(TrainConfig())
    build_optimizer_state(opt, variables)
    fn = tf.function(make_step(model, opt, variables, 1.0), autograph=False)
    batch = _batch()
    fn(batch)
    return _median(lambda: float(fn(batch)[0]), steps)


def translate_latency(name: str, precision: str) -> dict:
    """Base + LoRA columns, as the app's Lab.translate does it, for 1 and 16 sentences."""
    import tensorflow as tf

    from . import adapters
    from .config import LoraConfig
    from .evaluate import _compiled_generate
    from .inject import apply_lora, lora_layers, remove_lora

    model = _model(name, precision)
    cfg = LoraConfig(rank=RANK, targets=("q", "v"))
    apply_lora(model, cfg)
    for i, layer in enumerate(lora_layers(model)):
        layer.lora_B.assign(tf.random.stateless_normal(layer.lora_B.shape, seed=(i, 0)) * 0.01)
    state = adapters.adapter_state(model)
    remove_lora(model)
    out = {}
    rng = np.random.default_rng(1)
    for n in (1, 16):
        ids = tf.constant(rng.integers(2, 4000, (n, 32)), tf.int32)
        mask = tf.ones_like(ids)
        gen = _compiled_generate(model, n, 32, 64)
        t = time.perf_counter()
        gen(ids, mask).numpy()
        out[f"translate_compile_{n}_s"] = time.perf_counter() - t

        def both():
            gen(ids, mask).numpy()
            with adapters.merged_into(model, cfg, state):
                gen(ids, mask).numpy()
        out[f"translate_{n}_s"] = _median(both, 3)
    return out


def peft_step(name: str, steps: int = 3) -> float | None:
    try:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import T5ForConditionalGeneration
    except Exception:
        return None
    from .models import model_config

    torch.manual_seed(0)
    model = get_peft_model(T5ForConditionalGeneration(model_config(name)),
                           LoraConfig(r=RANK, lora_alpha=16, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    b = {k: torch.tensor(v.numpy(), dtype=torch.long) for k, v in _batch().items()}

    def step():
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    step()
    return _median(step, steps)


def peak_rss_child(kind: str, name: str, precision: str) -> float:
    """Peak RSS of a fresh process that builds ``name`` and runs a few steps of ``kind`` (lora|full)."""
    cmd = [sys.executable, "-m", "lora_demo", "bench", "--child", kind, "--child-model", name,
           "--precision", precision]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {kind} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def child(kind: str, name: str, precision: str) -> None:
    if kind == "lora":
        lora_steps(name, precision, autograph=False, steps=2)
    else:
        full_step(name, precision, steps=2)
    print(json.dumps({"peak_rss_mb": round(peak_rss_kb() / 1024, 1)}))


def peak_rss_kb() -> int:
    """This process's resident-memory high-water mark. VmHWM, not ru_maxrss: on Linux ru_maxrss
    survives exec, so a child started by a big parent would report the parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
THREAD_ENV = ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "TF_ENABLE_ONEDNN_OPTS",
              "TF_XLA_FLAGS")


def machine() -> dict:
    """What the figures rest on, printed with them so figures from different machines can be read
    side by side: the CPU and its instruction-set level, the thread settings, and the TensorFlow
    build (oneDNN on or off, compiler, CUDA build)."""
    import tensorflow as tf

    from .models import _cpu_flags, cpu_isa

    info = _cpu_flags()
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines() if line.startswith("flags")), set())
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    try:
        from tensorflow.python.util import _pywrap_util_port
        onednn = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        onednn = None
    build = dict(tf.sysconfig.get_build_info())
    return {
        "cpu": name or "unknown", "cpu_isa": cpu_isa(), "isa_flags": [f for f in ISA_FLAGS if f in flags],
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),   # 0 = TF's default (all)
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "tensorflow": tf.__version__, "onednn": onednn, "cpu_compiler": build.get("cpu_compiler"),
        "cuda_build": build.get("is_cuda_build"),
    }


def machine_lines(m: dict) -> list[str]:
    threads = ", ".join(f"{k}={m[k] or 'default (all)'}" for k in ("intra_op_threads", "inter_op_threads"))
    env = ", ".join(f"{k}={v}" for k, v in m["env"].items()) or "none set"
    return [f"CPU: {m['cpu']}; instruction-set level {m['cpu_isa']} ({' '.join(m['isa_flags']) or 'none listed'})",
            f"threads: {m['cpus_usable']} of {m['cpu_count']} CPUs usable; {threads}; environment: {env}",
            f"TensorFlow {m['tensorflow']}: oneDNN {'on' if m['onednn'] else 'off' if m['onednn'] is False else '?'}, "
            f"built with {m['cpu_compiler']}, CUDA build {m['cuda_build']}"]


def run(quick: bool = False, precision: str = "auto", log=print, model: str = SMALL) -> dict:
    """All figures in one run. ``model`` other than flan-t5-small (e.g. ``tiny``) is for smoke runs."""
    import tensorflow as tf

    from .models import cpu_has_fast_bf16, model_config, resolve_precision

    prec = resolve_precision(precision)
    fig: dict = {"model": model, "precision": prec, "batch": BATCH, "source_len": SOURCE, "target_len": TARGET,
                 "rank": RANK, "targets": "q,v", "cpu_count": os.cpu_count(), "tensorflow": tf.__version__,
                 "cpu_fast_bf16": cpu_has_fast_bf16(), "machine": machine()}
    for line in machine_lines(fig["machine"]):
        log(line)
    log("measuring the matmul peak...")
    fig["peak_gflops_fp32"] = matmul_peak("fp32")
    fig["peak_gflops_bf16"] = matmul_peak("bf16")
    log("plain baseline step (tf.function, autograph on, fp32)...")
    plain = lora_steps(model, "fp32", autograph=True)
    log(f"our LoRA step ({prec})...")
    ours = lora_steps(model, prec, autograph=False)
    fig.update(lora_step_s=ours["step_s"], plain_step_s=plain["step_s"], first_loss_s=ours["first_loss_s"],
               plain_first_loss_s=plain["first_loss_s"])
    log("a second train() run with the same shapes...")
    fig.update(second_run(model, prec))
    if prec != "fp32":
        log("our LoRA step (fp32, for reference)...")
        fig["lora_step_fp32_s"] = lora_steps(model, "fp32", autograph=False)["step_s"]
    log("full fine-tuning step (fp32)...")
    fig["full_step_s"] = full_step(model, "fp32")
    mem_model = model if quick else BASE
    log(f"peak memory, each in its own process ({mem_model})...")
    fig["memory_model"] = mem_model
    fig["peak_rss_lora_mb"] = peak_rss_child("lora", mem_model, prec)
    fig["peak_rss_full_mb"] = peak_rss_child("full", mem_model, "fp32")
    if not quick:
        log("flan-t5-base steps...")
        fig["base_lora_step_s"] = lora_steps(BASE, prec, autograph=False, steps=3)["step_s"]
        fig["base_full_step_s"] = full_step(BASE, "fp32", steps=2)
    log("translation latency (compiles once per shape first)...")
    fig.update(translate_latency(model, "fp32"))
    log("PyTorch + PEFT step (if installed)...")
    fig["peft_step_s"] = peft_step(model)
    flops = step_flops(model_config(model))
    peak = fig["peak_gflops_bf16"] if prec == "bf16" else fig["peak_gflops_fp32"]
    fig["step_gflop"] = flops / 1e9
    fig["mfu"] = flops / 1e9 / fig["lora_step_s"] / peak
    return fig


GOALS = [  # (label, figure, goal text, passes(fig))
    ("LoRA step, flan-t5-small", "lora_step_s", "<= 0.35 s and >= 2.5x the plain step",
     lambda f: f["lora_step_s"] <= 0.35 and f["plain_step_s"] / f["lora_step_s"] >= 2.5),
    ("first loss point", "first_loss_s", "<= 5 s", lambda f: f["first_loss_s"] <= 5),
    ("second run, same shapes", "second_run_first_loss_s", "no tracing again",
     lambda f: not f["second_run_traced"]),
    ("against PyTorch+PEFT", "peft_step_s", ">= 8x faster per step",
     lambda f: None if f["peft_step_s"] is None else f["peft_step_s"] / f["lora_step_s"] >= 8),
    ("peak memory, LoRA vs full", "peak_rss_lora_mb", "<= 0.5x full fine-tuning (flan-t5-base)",
     lambda f: None if f["memory_model"] != BASE else f["peak_rss_lora_mb"] <= 0.5 * f["peak_rss_full_mb"]),
    ("translate 1 sentence (base + LoRA)", "translate_1_s", "<= 1 s", lambda f: f["translate_1_s"] <= 1),
    ("translate 16 sentences (base + LoRA)", "translate_16_s", "<= 4 s", lambda f: f["translate_16_s"] <= 4),
]


def table(f: dict) -> str:
    def x(a, b):
        return f"{a / b:.2f}x" if a and b else "–"
    rows = [
        ("LoRA step (ours, %s)" % f["precision"], f"{f['lora_step_s']:.3f} s",
         f"{x(f['plain_step_s'], f['lora_step_s'])} faster than plain"),
        ("plain tf.function step (fp32)", f"{f['plain_step_s']:.3f} s", "baseline"),
        ("first loss point (ours)", f"{f['first_loss_s']:.1f} s", f"{x(f['plain_first_loss_s'], f['first_loss_s'])} "
                                                                  "sooner than plain"),
        ("first loss point (plain)", f"{f['plain_first_loss_s']:.1f} s", "trace, then first step"),
        ("first loss, train() run 1 / run 2", f"{f['run1_first_loss_s']:.1f} / {f['second_run_first_loss_s']:.1f} s",
         "run 2 traced again" if f["second_run_traced"] else "run 2 reuses run 1's compiled step"),
        ("full fine-tuning step (fp32)", f"{f['full_step_s']:.3f} s", f"{x(f['full_step_s'], f['lora_step_s'])} our "
                                                                      "LoRA step"),
        (f"peak RSS LoRA ({f['memory_model'].split('/')[-1]})", f"{f['peak_rss_lora_mb']:,.0f} MB",
         f"{f['peak_rss_lora_mb'] / f['peak_rss_full_mb']:.2f}x full fine-tuning"),
        (f"peak RSS full ({f['memory_model'].split('/')[-1]})", f"{f['peak_rss_full_mb']:,.0f} MB", ""),
        ("translate 1 sentence, base + LoRA", f"{f['translate_1_s']:.2f} s",
         f"compile once: {f['translate_compile_1_s']:.0f} s"),
        ("translate 16 sentences, base + LoRA", f"{f['translate_16_s']:.2f} s",
         f"compile once: {f['translate_compile_16_s']:.0f} s"),
        ("PyTorch + PEFT step", "not installed" if f["peft_step_s"] is None else f"{f['peft_step_s']:.3f} s",
         "" if f["peft_step_s"] is None else f"ours is {x(f['peft_step_s'], f['lora_step_s'])} faster"),
        ("MFU of our LoRA step", f"{100 * f['mfu']:.1f}%", f"{f['step_gflop']:.0f} GFLOP/step; peak "
         f"{f['peak_gflops_' + f['precision']]:.0f} GFLOP/s ({f['precision']}, measured)"),
    ]
    if "base_lora_step_s" in f:
        rows.append(("flan-t5-base LoRA / full step", f"{f['base_lora_step_s']:.2f} / {f['base_full_step_s']:.2f} s",
                     ""))
    w = max(len(r[0]) for r in rows)
    lines = machine_lines(f["machine"]) + [""] if "machine" in f else []
    lines += [f"{'figure':<{w}}  {'value':>14}  note", "-" * (w + 40)]
    lines += [f"{a:<{w}}  {b:>14}  {c}" for a, b, c in rows]
    lines += ["", "goals:"]
    for label, _, goal, ok in GOALS:
        try:
            result = ok(f)
        except (TypeError, KeyError, ZeroDivisionError):
            result = None
        met = "not measured in this run" if result is None else ("met" if result else "MISSED")
        lines.append(f"  {label}: {goal} -> {met}")
    return "\n".join(lines)
