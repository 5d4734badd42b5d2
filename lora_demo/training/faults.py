"""How a run fails: an exception turned into a RunFailed event that says what to do, and faults
injected on purpose (``LORA_LAB_FAULT``) so that tests exercise the real failure paths."""

from __future__ import annotations

import os

import tensorflow as tf

from lora_demo.core.config import ConfigError
from lora_demo.core.events import RunFailed


def failure(step: int, exc: BaseException) -> RunFailed:
    if isinstance(exc, (tf.errors.ResourceExhaustedError, MemoryError)):
        return RunFailed(step, f"out of memory at step {step}",
                         "lower the batch size or the rank, shorten max lengths, or use a smaller model")
    if isinstance(exc, ConfigError):
        return RunFailed(step, str(exc), "fix the setting named above and train again")
    if isinstance(exc, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)):
        return RunFailed(step, f"another worker of the cluster stopped answering at step {step} (it ended, or the "
                               f"network between the workers failed)",
                         "start the same command again on every worker; the steps logged so far are kept")
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return RunFailed(step, f"training stopped by an error at step {step}: {type(exc).__name__}: {first}",
                     "this is a bug or an unsupported setting; try the defaults, and report it if it persists")


FAULT_ENV = "LORA_LAB_FAULT"


def injected_fault(seed: int) -> tuple[str, int] | None:
    """A fault to inject into runs with this seed, from ``LORA_LAB_FAULT`` (testing aid).

    The variable is a comma-separated list of ``KIND@STEP/SEED`` with KIND one of ``oom``, ``nan``
    or ``error``, e.g. ``oom@2/101,nan@3/102``: a run whose seed is SEED meets that fault at step
    STEP. It is read from the server's environment only, so no client can trigger it.
    """
    for spec in filter(None, (p.strip() for p in os.environ.get(FAULT_ENV, "").split(","))):
        try:
            kind, rest = spec.split("@")
            at, only = rest.split("/")
            if kind in ("oom", "nan", "error") and int(only) == seed:
                return kind, int(at)
        except ValueError:
            raise ConfigError(f"{FAULT_ENV} entry {spec!r} must look like oom@2/101 (kind@step/seed)") from None
    return None


def inject_fault(fault: tuple[str, int] | None, step: int, loss: float) -> float:
    if fault is None or fault[1] != step:
        return loss
    if fault[0] == "oom":
        raise tf.errors.ResourceExhaustedError(None, None, f"OOM when allocating tensor (injected at step {step})")
    if fault[0] == "error":
        raise RuntimeError(f"injected failure at step {step}")
    return float("nan")
