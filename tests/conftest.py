"""Shared fixtures. Every test runs offline, on tiny T5 configs or the bundled tiny model."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Under pytest-xdist each worker (and every process it starts: the app, CLI runs) gets its share of the
# usable CPUs for TensorFlow's op threads. Two workers of two threads each on 2 cores oversubscribe them:
# measured on the 2-core AVX512-BF16 EPYC (test_train, test_methods, test_resume, -n 2, two runs each),
# 107.7 s and 111.2 s with one thread per worker against 121.1 s and 123.7 s with TensorFlow's default.
if os.environ.get("PYTEST_XDIST_WORKER") and "TF_NUM_INTRAOP_THREADS" not in os.environ:
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _workers))
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import threading  # noqa: E402

import lora_demo  # noqa: E402,F401  (pins Keras before TensorFlow loads)
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from gradio_client import Client  # noqa: E402
from transformers import T5Config, TFT5ForConditionalGeneration  # noqa: E402


def tiny_config(**overrides) -> T5Config:
    """A T5 small enough to build in well under a second, FLAN-T5 layout by default."""
    kw = dict(vocab_size=64, d_model=16, d_kv=4, num_heads=2, d_ff=24, num_layers=2, num_decoder_layers=3,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=8,
              dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    kw.update(overrides)
    return T5Config(**kw)


def build(config: T5Config, seed: int = 0) -> TFT5ForConditionalGeneration:
    tf.keras.utils.set_random_seed(seed)
    model = TFT5ForConditionalGeneration(config)
    model(model.dummy_inputs)
    return model


@pytest.fixture
def tiny_model():
    return build(tiny_config())


@pytest.fixture(scope="session")
def bundled_tiny():
    """The bundled assets/micro model and tokenizer (loaded once; tests must not leave adapters on it)."""
    from lora_demo.core.models import load_model

    return load_model("micro", fallback=False)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, *args, env: dict | None = None):
    """``python app.py`` on a free local port with ``--runs-dir tmp_path/runs``; (process, url) once it answers."""
    import subprocess
    import time
    import urllib.request

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    log = open(tmp_path / f"app-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs-dir", str(tmp_path / "runs"),
                             *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited: {(tmp_path / f'app-{port}.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("app did not start")


class LabClient(Client):
    """``gradio_client.Client`` with its one stream race closed (gradio_client 2.5, with Gradio 6.17's sse_v3).

    The server ends a session's event stream right after the last pending event completes
    (``close_stream``). A client's ``predict`` returns on ``process_completed``, a moment before its stream
    thread has read ``close_stream`` and finished. If the next request is posted in that moment, the client
    either sees the stream still open and opens none, or finds the old stream's future not yet done; either
    way the old stream's done-callback then appends ``None`` to every pending event, the new one included,
    and that request fails with an empty ``CancelledError`` (seen once in CI, on the twelfth of the
    bad-input test's back-to-back requests). This client waits, before posting, for a stream with nothing
    pending to finish and for its callbacks to run; with a request in flight on the same client (never done
    in these tests) it posts at once, as the library does."""

    def send_data(self, data, hash_data, protocol, request_headers):
        future = self.streaming_future
        if future is not None and not self.pending_event_ids:
            finished = threading.Event()
            future.add_done_callback(lambda _: finished.set())   # runs after the library's own callback
            if not finished.wait(30):
                raise TimeoutError("the previous event stream did not close within 30 s")
        return super().send_data(data, hash_data, protocol, request_headers)


def lab_client(url: str) -> LabClient:
    """A gradio client for one test's requests, one at a time (see ``LabClient``)."""
    return LabClient(url, verbose=False)


def final_row(url: str, run_id: str, timeout: float = 300) -> dict:
    """The run's /runs row once it has ended, read by a fresh client (any session: all_runs): what the
    server recorded, beside what a client's stream said."""
    import time

    watcher, deadline = lab_client(url), time.time() + timeout
    while time.time() < deadline:
        row = next((r for r in watcher.predict(all_runs=True, api_name="/runs") if r["run_id"] == run_id), None)
        if row is not None and row["status"] not in ("queued", "running"):
            return row
        time.sleep(0.5)
    raise TimeoutError(f"run {run_id} did not end within {timeout} s")


# One launched app serves every test that needs a server: the API tests of test_app.py and test_trust.py and
# the browser test (each test uses its own clients, so its own owner keys and runs). It runs micro, whose steps
# are fast, in float32 (as on a CPU without fast bf16). Faults are injected only into runs with seeds 101-103.
# Checkpoints are kept under 1 MB per session, so the kill test sees the oldest pruned. The kill test (the last
# of test_trust.py) kills it mid-run with SIGKILL and starts it again on the same runs directory: the app is
# launched twice in the whole suite.
FAULTS = "oom@2/101,nan@2/102,error@2/103"
APP_ARGS = ("--model", "micro", "--precision", "fp32")
APP_ENV = {"LORA_LAB_FAULT": FAULTS, "LORA_LAB_MAX_RUNS_PER_SESSION": "4", "LORA_LAB_MAX_CHECKPOINT_MB": "1"}


class App:
    """The shared app: ``app[0]`` its URL, ``app[1]`` the folder whose runs/ it keeps; ``restart()`` starts it
    again there (after a kill), and every later test reaches the new process through the same object."""

    def __init__(self, tmp):
        self.dir = tmp
        self.proc, self.url = launch(tmp, *APP_ARGS, env=APP_ENV)

    def __getitem__(self, i):
        return (self.url, self.dir)[i]

    def restart(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.proc, self.url = launch(self.dir, *APP_ARGS, env=APP_ENV)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture(scope="session")
def shared_app(tmp_path_factory):
    app = App(tmp_path_factory.mktemp("app"))
    yield app
    app.close()


@pytest.fixture(scope="session")
def cli_sweep(tmp_path_factory):
    """``python -m lora_demo sweep`` over ranks 8 and 2, seeds 0 and 1, on micro, run once: (its stdout, the
    output directory)."""
    import subprocess

    out = tmp_path_factory.mktemp("cli-sweep")
    proc = subprocess.run([sys.executable, "-m", "lora_demo", "sweep", "--model", "micro", "--ranks", "8,2", "--seeds", "0,1",
                           "--targets", "q,v", "--steps", "4", "--train-size", "16", "--eval-size", "8",
                           "--bleu-size", "8", "--samples", "", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, out


GROUPED = ("shared_app", "cli_sweep", "pt_dir", "hub_home", "recorded")


def pytest_itemcollected(item):
    """With pytest-xdist (``-n 2 --dist loadgroup``), the tests that share a costly session or module fixture
    run in one worker, so the shared app is still launched once (and restarted once), the CLI sweep runs
    once, and so do the PyTorch copy of tiny, the stand-in hub and the recorded run. Marked as each test is
    collected, before xdist reads the marks into the node ids."""
    for fixture in GROUPED:
        if fixture in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group(fixture))
            break


def pytest_collection_modifyitems(items):
    """The longest tests first. Over two workers each worker takes the next test as it finishes one, so a
    long test collected last (the bench, the default tiny run) ran alone at the end while the other worker
    idled. Tests in an xdist group keep their order (the group runs as one unit in one worker)."""
    def long_and_alone(item) -> bool:
        return bool(item.get_closest_marker("slow")) and not item.get_closest_marker("xdist_group")

    items.sort(key=lambda item: 0 if long_and_alone(item) else 1)   # stable: the rest keep their order
