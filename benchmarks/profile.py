"""Where a step's time goes: TensorFlow's profiler around a few calls, read back as a table of op types.

The trace (``*.xplane.pb``) is parsed with the XPlane protobuf that ships inside TensorFlow, so no
TensorBoard plugin is needed. Op events on the executor threads are named ``name:Type``; their durations
are summed by type and divided by the number of calls. With inter-op parallelism, op time can exceed
wall time, so shares are of the summed op time.
"""

from __future__ import annotations

import collections
import glob
import tempfile


def op_table(fn, calls: int = 2, top: int = 8) -> list[list]:
    """[[op type, ms per call, % of op time], ...], the ``top`` types by time, for ``calls`` calls of
    ``fn`` (already warm: traced and run once)."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            for _ in range(calls):
                fn()
        finally:
            tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))[-1], "rb") as fh:
            space.ParseFromString(fh.read())
    ps = collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_"):   # the executor threads, not the Python thread
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name and "::" not in name:
                    ps[name.rsplit(":", 1)[1]] += event.duration_ps
    total = sum(ps.values()) or 1
    return [[op, t / 1e9 / calls, 100.0 * t / total] for op, t in ps.most_common(top)]


def lines(title: str, table: list[list]) -> list[str]:
    return [f"{title}:"] + [f"  {op:<36} {ms:8.1f} ms/step  {pct:5.1f}%" for op, ms, pct in table]
