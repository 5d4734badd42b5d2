"""LoRA Lab: `python app.py [--model google/flan-t5-small|tiny|DIR] [--port 7860] [--runs-dir runs]`."""

import argparse
import logging
import os
import warnings

import lora_demo  # noqa: F401  (pins Keras before TensorFlow loads)
from lora_demo.app import build_demo, launch
from lora_demo.core.config import ConfigError
from lora_demo.training.distribute import cluster_workers, make_strategy
from lora_demo.core.models import DEFAULT_MODEL, configure_devices, describe, load_model
from lora_demo.lab import Lab


def _once(show):
    """``warnings.showwarning`` that shows each (category, message) once, whatever the filters say."""
    seen = set()

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if (category, str(message)) not in seen:
            seen.add((category, str(message)))
            show(message, category, filename, lineno, file, line)
    return showwarning


def main() -> None:
    ap = argparse.ArgumentParser(description="LoRA Lab: LoRA fine-tuning of FLAN-T5 in TensorFlow")
    ap.add_argument("--model", default=os.environ.get("LORA_LAB_MODEL", DEFAULT_MODEL),
                    help="hub id, local checkpoint directory, or 'tiny' (bundled offline model)")
    ap.add_argument("--runs-dir", default=os.environ.get("LORA_LAB_RUNS_DIR", "runs"))
    ap.add_argument("--data", default="auto", choices=("auto", "hub", "bundled"), help="where WMT16 comes from")
    ap.add_argument("--precision", default=os.environ.get("LORA_LAB_PRECISION", "auto"),
                    choices=("auto", "fp32", "bf16"),
                    help="training compute precision (auto: bf16 where the hardware does it fast); "
                         "translation stays float32")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    ap.add_argument("--strategy", default=os.environ.get("LORA_LAB_STRATEGY", "default"),
                    choices=("default", "mirrored", "multiworker"),
                    help="tf.distribute strategy for training: one device, all local GPUs, or TF_CONFIG workers")
    args = ap.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Gradio 6.17 reads a status constant that Starlette 1.x deprecates on every queued event, and the
    # warnings registry is reset between events, so the same line filled the log (282 times in one session):
    # each warning is shown once.
    warnings.showwarning = _once(warnings.showwarning)
    devices = configure_devices()   # before anything touches a GPU
    log = logging.getLogger("lora_lab")
    if devices["gpus"]:
        log.info("GPUs: %d, memory growth on %s", devices["gpus"], ", ".join(devices["memory_growth"]) or "none")
    # The strategy comes before the model: a multi-worker strategy must set up collective ops before
    # TensorFlow's runtime starts, and loading a model starts it.
    if args.strategy == "multiworker" and cluster_workers() > 1:
        raise SystemExit("error: the app trains on this machine only; TF_CONFIG names several workers. Train "
                         "across workers with `python -m lora_demo train --strategy multiworker` on each of them "
                         "(README: Scale-out), or unset TF_CONFIG.")
    try:
        strategy = make_strategy(args.strategy)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    loaded = load_model(args.model)   # float32: it translates; the Lab trains a copy in --precision
    log.info(describe(loaded))
    lab = Lab(loaded, runs_dir=args.runs_dir, data_source=args.data, strategy=strategy, precision=args.precision,
              warm=True)
    log.info("training precision: %s (asked for %s)", lab.precision, args.precision)
    demo = build_demo(lab)
    launch(demo, server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
