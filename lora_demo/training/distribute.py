"""tf.distribute strategies for training: one device, every local device, or a cluster of workers.

A strategy must exist before anything initialises TensorFlow's runtime (loading a model, creating
a variable, listing logical devices): ``MultiWorkerMirroredStrategy`` configures collective ops and
starts a gRPC server, which TensorFlow only allows at program start-up. ``app.py`` and the CLI
therefore call ``make_strategy`` first, before ``load_model``.

In a cluster (``TF_CONFIG`` naming several workers) every worker runs the same command and builds
the same global batch from the same seed; each replica takes its slice. Only the chief (worker 0,
or the task of type ``chief``) writes the run record and the adapter. A worker that never joins, or
one that dies, gives the others an error within ``LORA_LAB_WORKER_TIMEOUT`` seconds instead of a
hang: cluster registration, the coordination service's heartbeat and every collective are bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import tensorflow as tf

from lora_demo.core.config import ConfigError
from lora_demo.core.lora import DropoutClock
from lora_demo.training.steps import token_losses, trained_tape

STRATEGIES = ("default", "mirrored", "multiworker")
TIMEOUT_ENV = "LORA_LAB_WORKER_TIMEOUT"
DEFAULT_TIMEOUT_S = 120


def worker_timeout() -> int:
    """Seconds a worker waits for the others (to join, to answer a heartbeat, inside a collective)."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV} must be a whole number of seconds, got {raw!r}") from None
    if value < 1:
        raise ConfigError(f"{TIMEOUT_ENV} must be at least 1 second, got {value}")
    return value


def cluster_addresses() -> list[str]:
    """The chief and worker addresses that ``TF_CONFIG`` names; none without it."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return []
    try:
        cluster = json.loads(raw).get("cluster", {})
    except (ValueError, AttributeError):
        raise ConfigError("TF_CONFIG is not valid JSON; see docs/scale-out.md") from None
    return [addr for job in ("chief", "worker") for addr in cluster.get(job, [])]


def cluster_workers() -> int:
    """How many worker processes ``TF_CONFIG`` names (chief included); 1 without it."""
    return max(1, len(cluster_addresses()))


def _runtime_started() -> bool:
    from tensorflow.python.eager import context

    return context.context()._context_handle is not None   # noqa: SLF001 (no public accessor in TF 2.15)


def _bounded_coordination(timeout_s: int) -> None:
    """Configure TensorFlow's coordination service as MultiWorkerMirroredStrategy would, but with
    bounded waits: registration of every worker, heartbeats and the shutdown barrier."""
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context
    from tensorflow.tsl.protobuf import coordination_config_pb2

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    spec = multi_worker_util.normalize_cluster_spec(resolver.cluster_spec())
    jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
            for job in ("chief", "worker") if job in spec.jobs]
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=multi_worker_util.coordination_leader(spec),
        cluster_register_timeout_in_ms=timeout_s * 1000, heartbeat_timeout_in_ms=timeout_s * 1000,
        shutdown_barrier_timeout_in_ms=timeout_s * 1000, coordinated_jobs=jobs)


WATCHDOG = r"""
import json, os, signal, socket, sys, time
pid, timeout, peers = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
time.sleep(timeout)

def answers(address):
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
        return True
    except (OSError, ValueError):
        return False

missing = [p for p in peers if not answers(p)]
sys.stderr.write("error: the worker cluster in TF_CONFIG did not come up within %d s (LORA_LAB_WORKER_TIMEOUT); "
                 "not answering: %s. Start the same command on every worker that TF_CONFIG names.\n"
                 % (timeout, ", ".join(missing) or "none (a worker joined too late)"))
sys.stderr.flush()
os.kill(pid, signal.SIGKILL)
"""


def _multi_worker(timeout: int):
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
    if cluster_workers() == 1:   # no cluster: this machine alone, nothing to wait for
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if _runtime_started():
        raise ConfigError("--strategy multiworker must be set up before TensorFlow starts (before a model is "
                          "loaded); this is a bug in the caller")
    _bounded_coordination(timeout)
    # TensorFlow waits inside C++ for every worker to join, holding the GIL and with no limit that
    # reaches Python; a watchdog process ends this one with a clear message if the cluster is not up
    # in time.
    watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), str(timeout),
                                 json.dumps(cluster_addresses())], stdin=subprocess.DEVNULL)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except (RuntimeError, tf.errors.OpError) as exc:
        raise ConfigError(f"the worker cluster in TF_CONFIG did not come up: "
                          f"{str(exc).strip().splitlines()[0][:300]}") from None
    finally:
        watchdog.kill()
        watchdog.wait()


def make_strategy(name: str = "default"):
    """None for one device (the default), else a tf.distribute strategy.

    - ``mirrored``: one replica per local GPU, or per logical CPU device when there is no GPU
      (``tf.config.set_logical_device_configuration`` splits a CPU, as the tests do);
    - ``multiworker``: the workers in ``TF_CONFIG`` (without it, this machine alone). Call it
      before TensorFlow's runtime starts.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")
    if name == "default":
        return None
    if name == "multiworker":
        return _multi_worker(worker_timeout())
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if gpus:
        return tf.distribute.MirroredStrategy(gpus)
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(cpus, cross_device_ops=tf.distribute.ReductionToOneDevice())


def is_chief(strategy) -> bool:
    """Whether this process writes records and adapters (always, except on non-chief workers)."""
    return strategy is None or bool(strategy.extended.should_checkpoint)


def topology(strategy) -> dict:
    """How many workers and replicas take part, for the run record."""
    if strategy is None:
        return {"strategy": "default", "workers": 1, "replicas": 1}
    multi = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    return {"strategy": "multiworker" if multi else "mirrored", "workers": cluster_workers() if multi else 1,
            "replicas": int(strategy.num_replicas_in_sync)}


def make_distributed_step(strategy, model, opt, variables, clip_norm: float, clock: DropoutClock | None = None):
    """One step of the global batch, split across replicas. Each replica's loss is its token
    cross-entropy sum over the *global* token count, so the summed loss and gradients equal the
    one-device step's; gradients are all-reduced before clipping, as on one device."""
    def replica_step(batch, global_tokens):
        with trained_tape(variables) as tape:
            total, _ = token_losses(model, batch, training=True)
            loss = total / global_tokens
        grads = tape.gradient(loss, variables)
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
        if clip_norm > 0:
            grads, norm = tf.clip_by_global_norm(grads, clip_norm)
        else:
            norm = tf.linalg.global_norm(grads)
        opt.apply_gradients(zip(grads, variables), skip_gradients_aggregation=True)
        return loss, norm

    def step(per_replica, global_tokens):
        if clock is not None:
            clock.step.assign_add(1)
        losses, norms = strategy.run(replica_step, args=(per_replica, global_tokens))
        # every replica holds the same all-reduced gradients, so the mean of the norms is the norm
        return tf.stack([strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None),
                         strategy.reduce(tf.distribute.ReduceOp.MEAN, norms, axis=None)])

    fn = tf.function(step, autograph=False)

    def run(batch):
        n = strategy.num_replicas_in_sync
        size = len(batch["input_ids"])
        if size % n:
            raise ConfigError(f"batch size {size} does not split evenly over {n} replicas; use a multiple of {n}")
        part = size // n
        per_replica = strategy.experimental_distribute_values_from_function(
            lambda ctx: {k: tf.constant(v[ctx.replica_id_in_sync_group * part:
                                           (ctx.replica_id_in_sync_group + 1) * part]) for k, v in batch.items()})
        tokens = tf.constant(max(float((batch["labels"] != -100).sum()), 1.0), tf.float32)
        return fn(per_replica, tokens)
    return run
