"""Compiled train and eval steps: traced in the background while training goes on, and kept per model
so that a later run with the same shapes reuses them instead of tracing again.

Why in the background: the first step's loss comes from an eager forward pass (steps.make_preview),
so it is reported at once, and the trace (autograph off: the step has no data-dependent Python
control flow) starts right after it in a thread. The loop waits for that trace, whose first call
applies step 1's update, rather than running eager steps beside it, because both are bound by the GIL
and an eager step slows badly while a trace runs. The eval function is traced next in the same thread,
while compiled steps run (they release the GIL). The forward pass and the compiled step run the same
ops on the same variables with the same dropout masks, so the loss curve is one curve. BENCHMARKS.md
has the measured times.

Why reuse: a traced step captures the adapter's variables and the optimiser's. A run with the same
adapted layers, rank, dropout, optimiser and batch shapes (seed, alpha, learning rate and steps may
differ: they are variables or data) resets those variables and calls the same concrete functions.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import tensorflow as tf

from lora_demo.core.config import RunConfig
from lora_demo.core.inject import dense_sites, select_paths
from lora_demo.core.lora import LoraDense
from lora_demo.core.models import model_precision
from lora_demo.core.state import state_of

KEPT = 4   # compiled steps kept per model; each holds an adapter's variables, AdamW state and two graphs


class BackgroundTrace:
    """Trace named functions (name -> (tf.function, input spec)) in a thread; ``get(name)`` once ready."""

    def __init__(self, fns: dict):
        self.concrete: dict = dict.fromkeys(fns)
        self.error: BaseException | None = None
        self.seconds: list[float] = []
        self.thread = threading.Thread(target=self._run, args=(fns,), daemon=True, name="lora-trace")
        self.thread.start()

    def _run(self, fns: dict):
        try:
            for name, (fn, spec) in fns.items():
                t = time.perf_counter()
                self.concrete[name] = fn.get_concrete_function(spec)
                self.seconds.append(time.perf_counter() - t)
        except BaseException as exc:  # surfaced by the loop, never swallowed
            self.error = exc

    @classmethod
    def ready(cls, concrete: dict) -> "BackgroundTrace":
        """Functions traced by an earlier run: nothing to wait for."""
        self = cls.__new__(cls)
        self.concrete, self.error, self.seconds, self.thread = dict(concrete), None, [], None
        return self

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def get(self, name: str):
        """The concrete function if it is ready, else None."""
        if self.error is not None:
            raise self.error
        return self.concrete.get(name)

    def wait(self, name: str, stop: threading.Event | None = None):
        """Block until function ``name`` is traced (or the run is stopped, then None)."""
        while (self.get(name) is None and self.thread is not None and self.thread.is_alive()
               and not (stop is not None and stop.is_set())):
            self.thread.join(0.1)
        return self.get(name)

    @property
    def complete(self) -> bool:
        return self.error is None and all(f is not None for f in self.concrete.values())


@dataclass
class Compiled:
    """What a traced step captured: the adapter layers, their variables, the optimiser and its
    schedule, and the concrete functions by name ("step", "eval")."""

    layers: list[LoraDense]
    variables: list
    opt: object
    schedule: object
    concrete: dict


def spec(batch: dict, dynamic: bool = False) -> dict:
    """The input signature of a batch; ``dynamic``: any sequence length (one trace for every batch)."""
    return {k: tf.TensorSpec((v.shape[0], None) if dynamic else v.shape, tf.as_dtype(v.dtype), name=k)
            for k, v in batch.items()}


def cache_key(model, run: RunConfig, train_spec: dict, eval_spec: dict) -> tuple | None:
    """What a traced step bakes in: adapted layers, rank, dropout, optimiser, weight decay,
    clipping, batch shapes and precision. None when the step is not reusable (the
    tensorflow-addons optimisers keep state that a reset could not restore, e.g. Lookahead's slow
    weights)."""
    lora, cfg = run.lora, run.train
    if cfg.optimizer != "adamw" or not lora.adapter:   # full fine-tuning trains a fresh copy each run
        return None
    shapes = tuple((k, tuple(v.shape), v.dtype.name) for s in (train_spec, eval_spec) for k, v in s.items())
    paths = tuple(select_paths([s.path for s in dense_sites(model)], lora))
    return (paths, lora.rank, lora.dropout, lora.method, lora.loraplus_ratio, cfg.optimizer, cfg.weight_decay, cfg.clip_norm, shapes,
            model_precision(model))


def lookup(model, key: tuple | None) -> Compiled | None:
    cache = state_of(model).compiled
    if key is None or key not in cache:
        return None
    cache.move_to_end(key)
    return cache[key]


def store(model, key: tuple, compiled: Compiled) -> None:
    cache = state_of(model).compiled
    cache[key] = compiled
    while len(cache) > KEPT:
        cache.popitem(last=False)
