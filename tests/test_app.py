"""The app launched for real on a local port (`python app.py --model tiny`), driven by gradio_client."""

import os
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT, free_port
from gradio_client import Client

from lora_demo.config import LoraConfig
from lora_demo.params import preview


def launch(tmp_path, *args):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
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


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    proc, url = launch(tmp, "--model", "tiny")
    yield url, tmp
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def client(app):
    return Client(app[0], verbose=False)


def test_params_endpoint_matches_the_arithmetic(client):
    out = client.predict(rank=4, alpha=8, targets=["q", "k", "v"], side="decoder", first_layer=1, last_layer=2,
                         api_name="/params")
    want = preview("tiny", LoraConfig(rank=4, alpha=8, targets=("q", "k", "v"), side="decoder", layers=(1, 2)))
    assert (out["total"], out["trainable"], out["frozen"]) == (want.total, want.trainable, want.frozen)
    assert [r[0] for r in out["rows"]][-1] == "LoRA"


def test_train_streams_updates_then_translate_gives_two_columns(client, app):
    job = client.submit(rank=4, targets=["q", "v"], steps=12, train_size=32, api_name="/train")
    updates = list(job)
    final = job.result()
    assert final["status"] == "completed", final
    steps_seen = [u["step"] for u in updates]
    assert len(updates) >= 3 and steps_seen == sorted(steps_seen) and steps_seen[-1] == 12
    assert any(0 < u["step"] < 12 for u in updates), "no update arrived while training"
    assert [s for s, _ in final["losses"]] == list(range(1, 13))
    assert final["summary"]["probe_loss_base"] is not None
    run_dir = app[1] / "runs" / final["run_id"]
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "metrics.json").is_file()

    out = client.predict(text="The session is resumed.\n\nI thank the Commissioner.", api_name="/translate")
    assert out["english"] == ["The session is resumed.", "I thank the Commissioner."]
    assert len(out["base"]) == len(out["lora"]) == 2 and all(out["base"]) and all(out["lora"])
    assert out["run_id"] == final["run_id"]
    zero = client.predict(text="The session is resumed.", run_id=final["run_id"], scale=0.0, api_name="/translate")
    assert zero["lora"] == zero["base"] == out["base"][:1]


def test_stop_ends_the_run_as_stopped(client):
    job = client.submit(steps=400, train_size=32, api_name="/train")
    for update in job:
        if update["step"] >= 2:
            stopped = client.predict(run_id=update["run_id"], api_name="/stop")
            assert stopped["stop_requested"]
            break
    final = job.result()
    assert final["status"] == "stopped" and final["step"] < 400
    # the next run starts cleanly
    nxt = client.submit(steps=2, train_size=16, api_name="/train")
    assert nxt.result()["status"] == "completed"


def test_bad_input_gets_a_clear_message_and_the_app_keeps_working(client):
    with pytest.raises(Exception, match="rank must be between 1 and"):
        client.predict(rank=0, api_name="/params")
    with pytest.raises(Exception, match="unknown target module"):
        client.predict(targets=["q", "attn"], api_name="/train")
    with pytest.raises(Exception, match="at least one English sentence"):
        client.predict(text="  \n ", api_name="/translate")
    assert client.predict(rank=8, api_name="/params")["trainable"] > 0


def test_unloadable_default_model_falls_back_to_tiny_with_a_notice(tmp_path):
    proc, url = launch(tmp_path)  # default google/flan-t5-small: not reachable offline, not cached
    try:
        page = urllib.request.urlopen(url + "config", timeout=10).read().decode()
        assert "Could not load" in page and "--model" in page and "tiny" in page
        c = Client(url, verbose=False)
        assert c.predict(text="Hello.", api_name="/translate")["base"]
    finally:
        proc.terminate()
        proc.wait(30)
