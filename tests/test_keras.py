"""One Keras: tf.keras, transformers and tensorflow-addons must all use Keras 2.15."""

import os
import subprocess
import sys

from conftest import ROOT

PROBE = """
import os, sys
assert "TF_USE_LEGACY_KERAS" not in os.environ, "the probe must start without the variable"
import lora_demo
import tensorflow as tf
import keras
from transformers import TFT5ForConditionalGeneration
from transformers import modeling_tf_utils
import tensorflow_addons as tfa
from tensorflow_addons.utils import types  # noqa: F401
print(os.environ["TF_USE_LEGACY_KERAS"], keras.__version__, tf.__version__)
assert modeling_tf_utils.keras is keras, modeling_tf_utils.keras
assert tf.keras.layers.Dense is keras.layers.Dense
assert issubclass(tfa.layers.GroupNormalization, keras.layers.Layer)
try:
    import tf_keras
    raise SystemExit("tf_keras is installed; it must not be")
except ImportError:
    pass
"""


def test_one_keras_in_a_fresh_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    legacy, keras_version, tf_version = out.stdout.split()
    assert legacy == "0"
    assert keras_version.startswith("2.15") and tf_version.startswith("2.15")


def test_this_process_uses_keras_2():
    import keras
    import tensorflow as tf

    assert os.environ["TF_USE_LEGACY_KERAS"] == "0"
    assert keras.__version__.startswith("2.")
    assert tf.keras.Model is keras.Model
