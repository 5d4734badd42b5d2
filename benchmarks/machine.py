"""The machine the figures rest on: its CPU and instruction-set level, threads, TensorFlow build, measured
matmul peaks and memory high-water mark. Printed beside every figure, since machines differ."""

from __future__ import annotations

import os
import resource
import time

import numpy as np


def median_s(fn, n: int) -> float:
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
    best = min(median_s(lambda: [f(a).numpy() for _ in range(reps)], 1) for _ in range(4))
    return 2 * n ** 3 * reps / best / 1e9


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

    from lora_demo.core.models import _cpu_flags, cpu_isa

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
