"""The path a user with the hub takes, through a stand-in hub (scripts/hub_standin.py): ``google/flan-t5-small``
as a PyTorch-format model.safetensors and ``wmt/wmt16`` de-en as the hub's parquet, prepared by ``datasets``,
loaded by their hub names with the hub offline (HF_HUB_OFFLINE=1, HF_HOME=the stand-in)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

STANDIN = ROOT / "scripts" / "hub_standin.py"


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    # micro's weights stand in for flan-t5-small's (the script's default is tiny's; micro is faster to train)
    done = subprocess.run([sys.executable, str(STANDIN), str(home), "--model-dir", str(ROOT / "assets" / "micro")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return home


def _env(home) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}


def test_the_standin_ships_pytorch_weights_only_and_they_load_into_tf_with_the_same_logits(hub_home, bundled_tiny):
    from safetensors import safe_open

    snap = next((hub_home / "hub" / "models--google--flan-t5-small" / "snapshots").iterdir())
    assert (snap / "model.safetensors").exists() and not (snap / "tf_model.h5").exists()
    with safe_open(str(snap / "model.safetensors"), framework="np") as f:
        assert f.metadata()["format"] == "pt"
        assert "encoder.block.0.layer.0.SelfAttention.q.weight" in f.keys()
    code = ("import lora_demo, json, numpy as np\n"
            "from lora_demo.core.models import load_model\n"
            "m = load_model('google/flan-t5-small', fallback=False)\n"
            "ids = np.array([[13, 7, 99, 1]], np.int32)\n"
            "print(json.dumps({'kind': m.kind, 'notice': m.notice, 'logits': m.model(input_ids=ids, "
            "decoder_input_ids=ids).logits.numpy()[0, :, :5].tolist()}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=_env(hub_home))
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["kind"] == "hub" and got["notice"] == ""
    ids = np.array([[13, 7, 99, 1]], np.int32)
    want = bundled_tiny.model(input_ids=ids, decoder_input_ids=ids).logits.numpy()[0, :, :5]
    np.testing.assert_allclose(np.array(got["logits"]), want, atol=1e-5)


@pytest.mark.slow
def test_a_cli_run_by_hub_names_reads_the_model_and_wmt16_from_the_hub_cache(hub_home, tmp_path):
    out = subprocess.run([sys.executable, "-m", "lora_demo", "train", "--model", "google/flan-t5-small", "--dataset",
                          "europarl", "--data", "hub", "--steps", "3", "--bleu-size", "4", "--samples", "",
                          "--checkpoint-every", "0", "--out", str(tmp_path / "run")],
                         cwd=ROOT, capture_output=True, text=True, timeout=900, env=_env(hub_home))
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert rec["status"] == "completed" and rec["config"]["model"] == "google/flan-t5-small"
    assert rec["data"]["origin"] == "hub" and rec["summary"]["data_origin"] == "hub"
    assert rec["quality"]["n"] == 4


@pytest.mark.slow
def test_the_app_builds_on_the_hub_model_with_no_fallback(hub_home, tmp_path):
    """app.py's default model, loaded and built into the page as app.py does (not served: the suite launches
    the app twice, conftest.shared_app): the page names google/flan-t5-small and has no fallback notice."""
    code = ("import lora_demo, json\n"
            "from lora_demo.app import build_demo\n"
            "from lora_demo.core.models import DEFAULT_MODEL, describe, load_model\n"
            "from lora_demo.lab import Lab\n"
            "loaded = load_model(DEFAULT_MODEL)\n"
            f"demo = build_demo(Lab(loaded, runs_dir={str(tmp_path / 'runs')!r}))\n"
            "page = [b.value for b in demo.blocks.values() if type(b).__name__ == 'Markdown']\n"
            "print(json.dumps({'described': describe(loaded), 'page': '\\n'.join(map(str, page))}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(hub_home), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "google/flan-t5-small" in got["page"] and "Could not load" not in got["page"], got["page"][:2000]
    assert "model: google/flan-t5-small" in got["described"] and "tiny instead" not in got["described"]
