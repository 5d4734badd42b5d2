"""Train pressed to the verdict shown, for the default run, as a first-time user meets it: ``python app.py``
on the bundled model (its own process, a fresh runs directory), the page's Train path (``/train`` with every
default: the same Lab.submit and execute the button calls), timed from the request to the run's complete
record (trained, scored, its verdict ready). The app has had the time a user spends reading the page: it is
ready and its warm-up (the base model's German for the default test slice, decoded once) has finished.

``click_s`` is the longer of the server's own figure (record created -> record complete) and ``client_s``, the
client's wall time for the same; ``training_s`` the run's training time (train(): preparation, steps, evaluation points);
``ratio`` = click_s / training_s."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(proc, url: str, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the app did not start")


def _wait_for_warm_up(runs: Path, timeout: float = 300) -> float:
    """Seconds until the base's German for the default test slice is on disk (the app's warm-up)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if list((runs / ".cache").glob("base-german-*.json")):
            return time.time() - t0
        time.sleep(0.5)
    raise TimeoutError("the app's warm-up did not finish")


def click_to_finished(model: str = "tiny", overrides: dict | None = None) -> dict:
    """The default run (``overrides``: /train parameters that shorten it, for a smoke run) from Train to
    verdict on a freshly started app."""
    from gradio_client import Client

    from lora_demo.core.config import DEFAULT_SAMPLES

    with tempfile.TemporaryDirectory() as tmp:
        runs, port = Path(tmp) / "runs", _port()
        log = Path(tmp) / "app.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "app.py", "--model", model, "--port", str(port), "--runs-dir",
                                     str(runs)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/"
            _wait_until_up(proc, url, log)
            warm_s = _wait_for_warm_up(runs)
            client = Client(url, verbose=False)
            t0 = time.perf_counter()
            # the page's default run: every default, and the page's sample sentences (the API's default is none)
            *_, last = client.submit(samples=list(DEFAULT_SAMPLES), **(overrides or {}), api_name="/train")
            client_s = time.perf_counter() - t0
            run_id = last["run_id"]
            rec = json.loads((runs / run_id / "metrics.json").read_text())
        finally:
            proc.terminate()
            proc.wait(30)
    training = rec["summary"]["elapsed_s"]
    click = max(rec["finished"] - rec["created"], client_s)   # the longer of the server's and the client's clocks
    return {"model": model, "default": not overrides, "status": rec["status"], "steps": rec["summary"]["steps_done"],
            "training_s": training, "click_s": click, "client_s": client_s, "ratio": click / training,
            "warm_up_s": warm_s, "bleu_size": rec["config"]["train"]["bleu_size"]}
