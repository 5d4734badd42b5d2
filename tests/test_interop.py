"""Adapters cross frameworks: ours load in PyTorch PEFT, PEFT's load in ours, with the same logits.

The PyTorch side is the bundled tiny model converted with ``from_tf=True``, so both frameworks hold
the same base weights. Needs torch and peft; `.ci/run` installs both (CPU torch), so CI always runs
these. Elsewhere they are skipped with the reason.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT

torch = pytest.importorskip("torch", reason="torch is not installed (CI installs it: see .ci/run)")
peft = pytest.importorskip("peft", reason="peft is not installed (CI installs it: see .ci/run)")

from transformers import T5ForConditionalGeneration  # noqa: E402

from lora_demo import adapters  # noqa: E402
from lora_demo.core.config import LoraConfig  # noqa: E402
from lora_demo.analysis.evaluate import translate  # noqa: E402
from lora_demo.core.inject import apply_lora, lora_layers, remove_lora  # noqa: E402
from lora_demo.core.models import BUNDLED, load_model  # noqa: E402

SENTENCES = ["The weather is nice today.", "I would like to thank the Commissioner for her answer.",
             "The European Parliament adopted the resolution."]
ATOL = 1e-4   # float32 logits from two frameworks differ by ~1e-5 here; the logits span about ±20


@pytest.fixture(scope="module")
def tf_tiny():
    loaded = load_model("micro", fallback=False)
    yield loaded
    remove_lora(loaded.model)


@pytest.fixture(scope="module")
def pt_dir(tmp_path_factory):
    """The bundled tiny saved in PyTorch format, converted weight by weight from the TF model.

    (``from_pretrained(..., from_tf=True)`` in transformers 4.57 builds the model on the meta device
    and the TF weights never land, so the conversion is done on a materialised model.)
    """
    from transformers import T5Config
    from transformers.modeling_tf_pytorch_utils import load_tf2_model_in_pytorch_model

    out = tmp_path_factory.mktemp("tiny-pt")
    model = T5ForConditionalGeneration(T5Config.from_pretrained(str(BUNDLED["micro"])))
    load_tf2_model_in_pytorch_model(model, load_model("micro", fallback=False).model)
    model.save_pretrained(str(out))
    return out


def pt_tiny(pt_dir):
    """A fresh PyTorch tiny (PEFT wraps the model it is given, so each test gets its own)."""
    return T5ForConditionalGeneration.from_pretrained(str(pt_dir)).eval()


def batch(tok):
    enc = tok(["translate English to German: " + s for s in SENTENCES], padding=True, return_tensors="np")
    dec = np.array([[0, 71, 12, 5, 230, 9]] * len(SENTENCES), dtype=np.int64)
    return enc["input_ids"], enc["attention_mask"], dec


def tf_logits(model, tok):
    ids, mask, dec = batch(tok)
    return model(input_ids=tf.constant(ids, tf.int32), attention_mask=tf.constant(mask, tf.int32),
                 decoder_input_ids=tf.constant(dec, tf.int32)).logits.numpy()


def pt_logits(model, tok):
    ids, mask, dec = batch(tok)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(dec)).logits.numpy()


def pt_translate(model, tok, max_new_tokens=24):
    enc = tok(["translate English to German: " + s for s in SENTENCES], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    return tok.batch_decode(out, skip_special_tokens=True)


def load_into_tf(loaded, adapter_dir):
    adapter = adapters.read_adapter(adapter_dir)
    cfg = adapters.check_fits(adapter, loaded.model, "micro")
    apply_lora(loaded.model, cfg)
    adapters.assign_state(loaded.model, adapter.state)
    return cfg


def peft_paths(model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_base_models_agree(tf_tiny, pt_dir):
    """The premise of everything below: the converted PyTorch tiny is the TF tiny."""
    remove_lora(tf_tiny.model)
    np.testing.assert_allclose(pt_logits(pt_tiny(pt_dir), tf_tiny.tokenizer), tf_logits(tf_tiny.model,
                               tf_tiny.tokenizer), atol=ATOL)


@pytest.mark.slow
def test_cli_trained_adapter_runs_in_peft_with_the_same_logits_and_translations(tf_tiny, pt_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lora_demo", "train", "--model", "micro", "--rank", "4",
                           "--alpha", "8", "--targets", "q,v,wo", "--steps", "6", "--train-size", "48",
                           "--bleu-size", "0", "--eval-every", "6", "--eval-size", "8", "--out", str(out), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["target_modules"] == ["q", "v", "wo"] and conf["r"] == 4

    remove_lora(tf_tiny.model)
    base_logits = tf_logits(tf_tiny.model, tf_tiny.tokenizer)
    load_into_tf(tf_tiny, out)
    ours = tf_logits(tf_tiny.model, tf_tiny.tokenizer)
    model = peft.PeftModel.from_pretrained(pt_tiny(pt_dir), str(out)).eval()
    assert peft_paths(model) == {layer.path for layer in lora_layers(tf_tiny.model)}
    theirs = pt_logits(model, tf_tiny.tokenizer)
    np.testing.assert_allclose(theirs, ours, atol=ATOL)
    assert np.abs(ours - base_logits).max() > 100 * ATOL  # the adapter is not a no-op: the match means something

    ours_text = translate(tf_tiny.model, tf_tiny.tokenizer, SENTENCES, max_new_tokens=24)
    assert ours_text == pt_translate(model, tf_tiny.tokenizer)


def test_one_stack_block_range_adapter_covers_the_same_layers_in_peft(tf_tiny, pt_dir, tmp_path):
    cfg = LoraConfig(rank=3, alpha=5, targets=("k", "o", "wi_0"), side="decoder", layers=(1, 2))
    apply_lora(tf_tiny.model, cfg, seed=3)
    for i, layer in enumerate(lora_layers(tf_tiny.model)):
        layer.lora_B.assign(tf.random.stateless_normal(layer.lora_B.shape, seed=(i, 1)) * 0.2)
    adapters.save_adapter(tf_tiny.model, cfg, "micro", tmp_path)
    ours = tf_logits(tf_tiny.model, tf_tiny.tokenizer)

    model = peft.PeftModel.from_pretrained(pt_tiny(pt_dir), str(tmp_path)).eval()
    paths = peft_paths(model)
    assert paths == {layer.path for layer in lora_layers(tf_tiny.model)}
    assert all(p.startswith(("decoder.block.1.", "decoder.block.2.")) for p in paths)
    np.testing.assert_allclose(pt_logits(model, tf_tiny.tokenizer), ours, atol=ATOL)


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_made_by_peft_imports_with_the_same_logits(tf_tiny, pt_dir, tmp_path, rslora):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "wi_1"], layers_to_transform=[0, 1],
                             layers_pattern="block", task_type="SEQ_2_SEQ_LM", use_rslora=rslora)
    model = peft.get_peft_model(pt_tiny(pt_dir), config)
    with torch.no_grad():  # PEFT starts B at zero; give it values so the adapter changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file()
    theirs = pt_logits(model.eval(), tf_tiny.tokenizer)

    cfg = load_into_tf(tf_tiny, tmp_path)
    assert (cfg.rank, cfg.targets, cfg.side, cfg.layers) == (4, ("q", "v", "wi_1"), "both", (0, 1))
    np.testing.assert_allclose(tf_logits(tf_tiny.model, tf_tiny.tokenizer), theirs, atol=ATOL)


# ---------------------------------------------------------------------------
# The LoRA family: every adapter kind out to PEFT and back in, with the same logits
# ---------------------------------------------------------------------------

def _train_like(model, seed=0):
    """Give every trained variable of the adapter values, as training would, so the match means something."""
    for i, layer in enumerate(lora_layers(model)):
        for j, var in enumerate(layer.trained):
            var.assign_add(tf.random.stateless_normal(var.shape, seed=(seed, 10 * i + j)) * 0.2)


@pytest.mark.parametrize("method", ["rslora", "dora", "pissa", "loraplus"])
def test_each_adapter_kind_runs_in_peft_with_the_same_logits(tf_tiny, pt_dir, tmp_path, method):
    cfg = LoraConfig(rank=4, alpha=8, targets=("q", "v", "wo"), method=method)
    remove_lora(tf_tiny.model)
    base = tf_logits(tf_tiny.model, tf_tiny.tokenizer)
    apply_lora(tf_tiny.model, cfg, seed=2)
    np.testing.assert_array_equal(tf_logits(tf_tiny.model, tf_tiny.tokenizer), base)   # step 0 is the base
    _train_like(tf_tiny.model)
    ours = tf_logits(tf_tiny.model, tf_tiny.tokenizer)
    assert np.abs(ours - base).max() > 100 * ATOL
    adapters.save_adapter(tf_tiny.model, cfg, "micro", tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["use_rslora"] == (method == "rslora") and conf["use_dora"] == (method == "dora")
    assert conf["r"] == (8 if method == "pissa" else 4)   # PiSSA leaves converted: rank 2r on the original base
    model = peft.PeftModel.from_pretrained(pt_tiny(pt_dir), str(tmp_path)).eval()
    np.testing.assert_allclose(pt_logits(model, tf_tiny.tokenizer), ours, atol=ATOL)
    # and back: our import of our own file gives the same logits (DoRA through its magnitude vector)
    remove_lora(tf_tiny.model)
    back = load_into_tf(tf_tiny, tmp_path)
    assert back.method == {"rslora": "rslora", "dora": "dora"}.get(method, "lora")
    np.testing.assert_allclose(tf_logits(tf_tiny.model, tf_tiny.tokenizer), ours, atol=ATOL)


def test_peft_dora_and_converted_pissa_adapters_import_with_the_same_logits(tf_tiny, pt_dir, tmp_path):
    torch.manual_seed(1)
    model = peft.get_peft_model(pt_tiny(pt_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "wi_0"],
                                                                  use_dora=True, task_type="SEQ_2_SEQ_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(tmp_path / "dora"))
    theirs = pt_logits(model.eval(), tf_tiny.tokenizer)
    remove_lora(tf_tiny.model)
    cfg = load_into_tf(tf_tiny, tmp_path / "dora")
    assert cfg.method == "dora" and all(layer.magnitude is not None for layer in lora_layers(tf_tiny.model))
    np.testing.assert_allclose(tf_logits(tf_tiny.model, tf_tiny.tokenizer), theirs, atol=ATOL)

    # PiSSA in PEFT: initialised from W's singular vectors, W replaced by the residual; saved converted
    # (against the untouched base) it is a plain rank-2r LoRA, which imports; saved unconverted it is refused.
    init_dir = tmp_path / "pissa-init"
    model = peft.get_peft_model(pt_tiny(pt_dir), peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q", "v"],
                                                                  init_lora_weights="pissa", task_type="SEQ_2_SEQ_LM"))
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(str(init_dir))
    model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    theirs = pt_logits(model.eval(), tf_tiny.tokenizer)
    model.save_pretrained(str(tmp_path / "pissa-raw"))
    with pytest.raises(adapters.AdapterError, match="unconverted"):
        adapters.read_adapter(tmp_path / "pissa-raw")
    model.save_pretrained(str(tmp_path / "pissa"), path_initial_model_for_weight_conversion=str(init_dir))
    remove_lora(tf_tiny.model)
    cfg = load_into_tf(tf_tiny, tmp_path / "pissa")
    assert (cfg.rank, cfg.method) == (8, "lora")
    np.testing.assert_allclose(tf_logits(tf_tiny.model, tf_tiny.tokenizer), theirs, atol=ATOL)
