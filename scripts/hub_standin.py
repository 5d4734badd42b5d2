"""Lay out a local Hugging Face cache that stands in for the hub: the real names through the unmodified code.

    python scripts/hub_standin.py DIR
    HF_HUB_OFFLINE=1 HF_HOME=DIR python -m lora_demo train --model google/flan-t5-small --dataset europarl \
        --data hub --steps 3 --out RUN
    HF_HUB_OFFLINE=1 HF_HOME=DIR python app.py

The hub cannot be reached from this project's machines, so nothing tests what a user with the hub runs.
This cache holds what such a user's machine holds after a first online run:

* ``hub/models--google--flan-t5-small``: a snapshot as the hub ships flan-t5-small today, a PyTorch-format
  ``model.safetensors`` (PyTorch names, (out, in) matrices, ``format: pt``) with ``config.json``,
  ``generation_config.json`` and the tokenizer files, and no ``tf_model.h5``. The weights are the bundled
  ``tiny`` model's (flan-t5-small's own are 308 MB and not bundled), so the architecture is tiny's.
* ``hub/datasets--wmt--wmt16``: ``de-en/{train,validation,test}-00000-of-00001.parquet``, the hub's parquet
  layout for wmt/wmt16, made from the bundled pairs (Europarl rows, newstest2015, newstest2016).
* ``datasets/wmt___wmt16/de-en/0.0.0/<revision>``: those parquet files prepared by ``datasets``' own
  Parquet builder. Offline, ``datasets.load_dataset("wmt/wmt16", "de-en")`` reads only this prepared
  copy (it never looks at the hub snapshot), as it does on a user's machine after an online load.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL_ID, DATASET_ID, CONFIG = "google/flan-t5-small", "wmt/wmt16", "de-en"
REVISION = "0" * 39 + "1"   # a fixed stand-in commit hash: the cache's snapshot folder and refs/main
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPLITS = {"train": "train.jsonl.gz", "validation": "validation.jsonl.gz", "test": "test.jsonl.gz"}


def _snapshot(cache: Path, kind: str, repo_id: str) -> Path:
    repo = cache / "hub" / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    snap = repo / "snapshots" / REVISION
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def pytorch_state(model_dir: Path) -> dict:
    """The TF checkpoint's weights under PyTorch names, matrices transposed to PyTorch's (out, in)."""
    import lora_demo  # noqa: F401  (pins Keras before TensorFlow loads)
    from transformers import TFT5ForConditionalGeneration
    from transformers.modeling_tf_pytorch_utils import TransposeType, convert_tf_weight_name_to_pt_weight_name

    model = TFT5ForConditionalGeneration.from_pretrained(str(model_dir))
    prefix = model.name + "/"
    state = {}
    for w in model.weights:
        name, transpose = convert_tf_weight_name_to_pt_weight_name(w.name, start_prefix_to_remove=prefix,
                                                                   tf_weight_shape=w.shape)
        value = w.numpy()
        state[name] = (value.T if transpose is TransposeType.SIMPLE else value).copy()
    # PyTorch's T5 ties both stacks' embed_tokens to shared; the hub file stores them too
    for stack in ("encoder", "decoder"):
        state.setdefault(f"{stack}.embed_tokens.weight", state["shared.weight"])
    return state


def write_model(cache: Path, model_dir: Path) -> Path:
    from safetensors.numpy import save_file

    snap = _snapshot(cache, "model", MODEL_ID)
    save_file(pytorch_state(model_dir), str(snap / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config.update(_name_or_path=MODEL_ID, architectures=["T5ForConditionalGeneration"])
    (snap / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("generation_config.json", *TOKENIZER_FILES):
        shutil.copyfile(model_dir / name, snap / name)
    return snap


def write_dataset(cache: Path, bundled: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    snap = _snapshot(cache, "dataset", DATASET_ID) / CONFIG
    snap.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, name in SPLITS.items():
        with gzip.open(bundled / name, "rt", encoding="utf-8") as fh:
            rows = [json.loads(line)["translation"] for line in fh]
        files[split] = snap / f"{split}-00000-of-00001.parquet"
        pq.write_table(pa.table({"translation": [{"de": r["de"], "en": r["en"]} for r in rows]}), files[split])
    # Prepare them as datasets does on a first online load, then move the result to where the offline
    # loader looks for "wmt/wmt16" (its cache names the folder <namespace>___<name>/<config>/<version>/<hash>).
    with tempfile.TemporaryDirectory() as tmp:
        builder = Parquet(cache_dir=tmp, dataset_name=DATASET_ID.split("/")[1], config_name=CONFIG,
                          data_files={k: [str(v)] for k, v in files.items()}, hash=REVISION)
        builder.download_and_prepare()
        prepared = Path(builder.cache_dir)
        target = cache / "datasets" / DATASET_ID.replace("/", "___") / CONFIG / prepared.parent.name / REVISION
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(prepared, target)
    return target


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="the folder to use as HF_HOME")
    ap.add_argument("--model-dir", default=str(ROOT / "assets" / "tiny"), help="the weights to ship as flan-t5-small")
    args = ap.parse_args(argv)
    cache = Path(args.dir).resolve()
    model = write_model(cache, Path(args.model_dir))
    data = write_dataset(cache, ROOT / "assets" / "wmt16_de_en")
    print(f"HF_HOME={cache}\n  {MODEL_ID}: {model}\n  {DATASET_ID} {CONFIG}: {data}")


if __name__ == "__main__":
    main()
