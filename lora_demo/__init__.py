"""LoRA Lab: LoRA fine-tuning of FLAN-T5 in TensorFlow, with a Gradio front end.

Importing this package pins the Keras that TensorFlow uses. transformers' TF
models set ``TF_USE_LEGACY_KERAS=1`` when the variable is unset, after which
``tf.keras`` in TF 2.15 tries to import the separate ``tf_keras`` package and
fails. Forcing ``0`` before TensorFlow is imported makes tf.keras, transformers
and tensorflow-addons share the one Keras 2.15 that TensorFlow ships.
"""

import os
from pathlib import Path

os.environ["TF_USE_LEGACY_KERAS"] = "0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF C++ start-up noise (cuDNN factories etc.)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "1.0.0"
ASSETS = Path(__file__).resolve().parent.parent / "assets"   # bundled models and data


def _quiet_known_noise() -> None:
    """Drop three start-up warnings that do not apply to this pinned stack.

    - transformers warns that TF_USE_LEGACY_KERAS=0 may mean Keras 3; here it
      means the Keras 2.15 bundled with TF 2.15 (tests/test_keras.py checks it).
    - transformers warns that its TF classes go away in v5; we pin 4.x.
    - tensorflow-addons announces its end of life; it is optional here.
    """
    import logging
    import warnings

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            msg = record.getMessage()
            return not ("explicitly set `TF_USE_LEGACY_KERAS` to `0`" in msg
                        or "TensorFlow and JAX classes are deprecated" in msg)

    for name in ("transformers.modeling_tf_utils", "transformers.feature_extraction_utils"):
        logging.getLogger(name).addFilter(_Drop())
    warnings.filterwarnings("ignore", message=r"\s*TensorFlow Addons \(TFA\) has ended development")


_quiet_known_noise()
