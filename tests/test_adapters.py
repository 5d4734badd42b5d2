"""Adapter files: PEFT names and layouts out; validated import in; merged export equals the adapter."""

import json
import pickle
import struct
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from conftest import build, tiny_config
from safetensors.numpy import load_file, save_file

from lora_demo import adapters
from lora_demo.adapters import AdapterError
from lora_demo.core.config import LoraConfig
from lora_demo.core.inject import apply_lora, dense_sites, lora_layers, remove_lora

IDS = tf.constant([[5, 9, 13, 1]], tf.int32)
CFG = LoraConfig(rank=3, alpha=6, targets=("q", "v", "wo"), side="decoder", layers=(1, 2))


def _logits(m):
    return m(input_ids=IDS, decoder_input_ids=tf.constant([[0, 4, 6]], tf.int32)).logits.numpy()


def _trained(cfg=CFG, seed=1):
    """A model with an adapter whose B is non-zero (so the adapter changes the output)."""
    model = build(tiny_config(), seed=seed)
    apply_lora(model, cfg)
    for i, layer in enumerate(lora_layers(model)):
        layer.lora_B.assign(tf.random.stateless_normal(layer.lora_B.shape, seed=(7, i)))
    return model


@pytest.fixture
def good(tmp_path):
    """A valid adapter directory for tiny_config(), and the model that made it."""
    model = _trained()
    return adapters.save_adapter(model, CFG, "micro", tmp_path / "good"), model


def test_round_trip_gives_identical_logits(good):
    path, a = good
    conf = json.loads((path / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "SEQ_2_SEQ_LM" and conf["r"] == 3
    assert conf["lora_alpha"] == 6 and "layers_to_transform" not in conf  # PEFT refuses it beside a regex
    assert conf["target_modules"].startswith(r"decoder\.block\.(1|2)\.")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = "base_model.model.decoder.block.1.layer.1.EncDecAttention.q.lora_A.weight"
    assert tensors[key].shape == (3, 16)  # PyTorch layout (r, in)
    assert tensors[key.replace("lora_A", "lora_B")].shape == (8, 3)  # (out, r)

    b = build(tiny_config(), seed=1)
    adapter = adapters.read_adapter(path)
    assert adapters.check_fits(adapter, b) == CFG
    apply_lora(b, adapter.config)
    adapters.assign_state(b, adapter.state)
    np.testing.assert_array_equal(_logits(a), _logits(b))


def test_both_stacks_with_a_block_range_uses_layers_to_transform(tmp_path):
    cfg = LoraConfig(rank=2, targets=("k",), layers=(0, 0))
    conf = json.loads((adapters.save_adapter(_trained(cfg), cfg, "micro", tmp_path) / "adapter_config.json")
                      .read_text())
    assert conf["target_modules"] == ["k"] and conf["layers_to_transform"] == [0]
    assert conf["layers_pattern"] == "block"
    assert adapters.check_fits(adapters.read_adapter(tmp_path), build(tiny_config())) == cfg


def test_a_range_spanning_every_block_reads_back_as_all_blocks(tmp_path):
    cfg = LoraConfig(rank=2, targets=("q", "v"))
    adapters.save_adapter(_trained(cfg), cfg, "micro", tmp_path)
    assert adapters.check_fits(adapters.read_adapter(tmp_path), build(tiny_config())) == cfg


def test_zip_download_imports_back(good, tmp_path):
    path, _ = good
    zipped = adapters.zip_dir(path, tmp_path / "run-1.zip", only=("adapter_config.json", "adapter_model.safetensors"))
    with zipfile.ZipFile(zipped) as zf:
        assert sorted(zf.namelist()) == ["run-1/adapter_config.json", "run-1/adapter_model.safetensors"]
    adapter = adapters.read_adapter(zipped)
    assert adapter.config == CFG and set(adapter.state) == set(adapters.read_adapter(path).state)


def test_bf16_and_fp16_weights_are_read_as_float32(tmp_path):
    value = np.array([[1.5, -2.25], [0.0078125, 3.0]], np.float32)   # exact in bf16 and fp16
    bf16 = (value.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]}}).encode()
    blob = struct.pack("<Q", len(header)) + header + bf16 + value.astype("<f2").tobytes()
    out = adapters.parse_safetensors(blob)
    assert out["a"].dtype == np.float32 and np.array_equal(out["a"], value) and np.array_equal(out["b"], value)


# -- everything that must be refused, with a message that says why -------------------------------

def _corrupt(path, tmp_path, how):
    """A broken copy of the good adapter; returns what to import."""
    conf = json.loads((path / "adapter_config.json").read_text())
    state = load_file(str(path / "adapter_model.safetensors"))
    out = tmp_path / f"bad-{how}"
    out.mkdir()
    weights = out / "adapter_model.safetensors"
    key_a = next(k for k in state if k.endswith("lora_A.weight"))
    if how == "garbage":
        weights.write_bytes(b"\x00\x01 definitely not safetensors")
    elif how == "truncated":
        weights.write_bytes((path / "adapter_model.safetensors").read_bytes()[:-40])
    elif how == "pickle":
        (out / "adapter_model.bin").write_bytes(pickle.dumps({"lora_A": [1.0]}))
    elif how == "ints":
        save_file({k: v.astype(np.int32) for k, v in state.items()}, str(weights))
    elif how == "foreign_key":
        save_file({**state, "base_model.model.lm_head.lora_A.weight": state[key_a]}, str(weights))
    elif how == "half_pair":
        save_file({k: v for k, v in state.items() if k != key_a}, str(weights))
    elif how == "rank_mismatch":
        conf["r"] = 5
    elif how == "not_lora":
        conf["peft_type"] = "IA3"
    elif how == "dora":
        conf["use_dora"] = True
    elif how == "bad_json":
        (out / "adapter_config.json").write_text("{not json")
    if how not in ("garbage", "truncated", "pickle", "ints", "foreign_key", "half_pair"):
        save_file(state, str(weights))
    if not (out / "adapter_config.json").exists():
        (out / "adapter_config.json").write_text(json.dumps(conf))
    return out


@pytest.mark.parametrize("how, message", [
    ("garbage", "not a safetensors file"),
    ("truncated", "truncated or corrupt"),
    ("pickle", "pickle-based weight files are refused"),
    ("ints", "must be floating point"),
    ("foreign_key", "is not a LoRA weight of a T5 projection"),
    ("half_pair", "needs lora_A and lora_B"),
    ("rank_mismatch", "r=5"),
    ("not_lora", "only LORA adapters"),
    ("dora", "DoRA"),
    ("bad_json", "not valid JSON"),
])
def test_broken_adapters_are_refused_with_a_reason(good, tmp_path, how, message):
    with pytest.raises(AdapterError, match=message):
        adapters.read_adapter(_corrupt(good[0], tmp_path, how))


def test_adapters_that_do_not_fit_the_model_are_refused(good, tmp_path):
    path, _ = good
    bigger = tiny_config(d_model=32)
    with pytest.raises(AdapterError, match=r"this model's layer is 32 -> 8"):
        adapters.check_fits(adapters.read_adapter(path), build(bigger))
    with pytest.raises(AdapterError, match="has no layer decoder.block.2"):
        adapters.check_fits(adapters.read_adapter(path), build(tiny_config(num_decoder_layers=2)))
    # q in self-attention only, not in cross-attention: not "targets x stacks x blocks", so refused
    state = load_file(str(path / "adapter_model.safetensors"))
    odd = tmp_path / "odd"
    odd.mkdir()
    save_file({k: v for k, v in state.items() if "EncDecAttention.q" not in k}, str(odd / "adapter_model.safetensors"))
    (odd / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    with pytest.raises(AdapterError, match="adapts 8 layers, .* covers 10, e.g. also decoder.block.1.layer.1.EncDecAttention.q"):
        adapters.check_fits(adapters.read_adapter(odd), build(tiny_config()))


def _zip(tmp_path, entries, name="x.zip", method=zipfile.ZIP_DEFLATED):
    out = tmp_path / name
    with zipfile.ZipFile(out, "w", method) as zf:
        for arcname, blob in entries.items():
            zf.writestr(arcname, blob)
    return out


def test_hostile_zips_are_refused_and_nothing_is_unpacked(good, tmp_path, monkeypatch):
    path, _ = good
    files = {n: (path / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    cases = {
        "traversal": ({"../../evil/adapter_config.json": files["adapter_config.json"],
                       "adapter_model.safetensors": files["adapter_model.safetensors"]}, "points outside the archive"),
        "absolute": ({"/tmp/adapter_config.json": b"{}"}, "points outside the archive"),
        "pickle": ({"adapter_config.json": files["adapter_config.json"], "adapter_model.bin": b"\x80\x04."},
                   "pickle-based"),
        "stranger": ({**files, "run.sh": b"rm -rf /"}, "unexpected file 'run.sh'"),
        "two_adapters": ({f"a/{k}": v for k, v in files.items()} | {f"b/{k}": v for k, v in files.items()},
                         "more than one|several folders"),
        "bomb": ({"adapter_model.safetensors": b"\x00" * (40 * 2**20), "adapter_config.json": b"{}"},
                 "would unpack to 40.0 MB"),
    }
    before = set(tmp_path.parent.rglob("*"))
    for name, (entries, message) in cases.items():
        with pytest.raises(AdapterError, match=message):
            adapters.read_adapter(_zip(tmp_path, entries, f"{name}.zip"))
    assert {p for p in tmp_path.parent.rglob("*") if p.suffix != ".zip"} - before == set()
    monkeypatch.setenv("LORA_LAB_MAX_UPLOAD_MB", "1")
    with pytest.raises(AdapterError, match="LORA_LAB_MAX_UPLOAD_MB"):
        adapters.read_adapter(_zip(tmp_path, {"adapter_model.safetensors": np.random.default_rng(0).bytes(2**21),
                                              "adapter_config.json": b"{}"}, "big.zip"))
    with pytest.raises(AdapterError, match="not a readable zip"):
        adapters.read_adapter((tmp_path / "fake.zip", (tmp_path / "fake.zip").write_bytes(b"PK no"))[0])


def test_assign_state_refuses_mismatches_with_a_reason():
    a = build(tiny_config())
    apply_lora(a, LoraConfig(rank=2, targets=("q",)))
    state = adapters.adapter_state(a)
    apply_lora(a, LoraConfig(rank=4, targets=("q",)))
    with pytest.raises(AdapterError, match="does not fit"):
        adapters.assign_state(a, state)
    with pytest.raises(AdapterError, match="missing"):
        adapters.assign_state(a, {k: v for k, v in list(state.items())[1:]})


# -- merged export -------------------------------------------------------------------------------

def test_merged_export_loads_with_tfauto_and_matches_the_adapter(bundled_tiny, tmp_path):
    from transformers import TFAutoModelForSeq2SeqLM

    from lora_demo.analysis.evaluate import translate
    from lora_demo.lab import clone_model

    cfg = LoraConfig(rank=4, alpha=8, targets=("q", "v", "wi_0", "wo"))
    base = clone_model(bundled_tiny)
    kernels = {s.path: getattr(s.owner, s.attr).kernel.numpy().copy() for s in dense_sites(base)}
    sentences = ["The weather is nice today.", "I would like to thank the Commissioner for her answer."]
    lora_model = clone_model(bundled_tiny)
    apply_lora(lora_model, cfg)
    for i, layer in enumerate(lora_layers(lora_model)):
        layer.lora_B.assign(tf.random.stateless_normal(layer.lora_B.shape, seed=(3, i)) * 0.05)
    state = adapters.adapter_state(lora_model)

    out = adapters.export_merged(base, bundled_tiny.tokenizer, cfg, state, tmp_path / "merged")
    assert (out / "tf_model.h5").is_file() and (out / "config.json").is_file()
    assert json.loads((out / "lora_lab_merge.json").read_text())["merged_adapter"]["r"] == 4
    for s in dense_sites(base):   # the model it was merged from is left exactly as it was
        np.testing.assert_array_equal(getattr(s.owner, s.attr).kernel.numpy(), kernels[s.path])

    merged = TFAutoModelForSeq2SeqLM.from_pretrained(str(out))
    assert not lora_layers(merged)
    unmerged = _logits(lora_model)
    np.testing.assert_allclose(_logits(merged), unmerged, atol=1e-4)
    remove_lora(lora_model)
    assert np.abs(_logits(lora_model) - unmerged).max() > 1e-2   # the adapter mattered
    apply_lora(lora_model, cfg)
    adapters.assign_state(lora_model, state)
    assert translate(merged, bundled_tiny.tokenizer, sentences, compiled=False) == \
        translate(lora_model, bundled_tiny.tokenizer, sentences, compiled=False)


def test_two_adapters_given_together_are_refused(good, tmp_path):
    path, _ = good
    zipped = adapters.zip_dir(path, tmp_path / "a.zip", only=("adapter_config.json", "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="given twice"):
        adapters.read_adapter([path / "adapter_model.safetensors", zipped])
    assert adapters.read_adapter([path / "adapter_config.json", path / "adapter_model.safetensors"]).config == CFG
