"""What the base model gives on a run's fixed slices, computed once per model: it never changes.

A run compares its adapter with the base on the lesson's test slice (the base's German) and on its held-out
slices (the base's temperature, first choices and per-sentence losses). Every run of the same model needs
the same base figures, so each is computed once, by whichever run (or the app's warm-up) asks first; a
second asker waits for it rather than computing it again. The base's German is also kept on disk, under the
fingerprint of the weights that made it (a SHA-256 of every weight), so a restarted app on the same model
reads it back instead of decoding the slice again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def fingerprint(model) -> str:
    """SHA-256 of the model's weights (names, shapes and float32 values, in name order): the same weights
    give the same German from the same code, whatever file or hub they came from."""
    digest = hashlib.sha256()
    for w in sorted(model.weights, key=lambda w: w.name):
        digest.update(w.name.encode())
        digest.update(np.asarray(w.numpy(), np.float32).tobytes())
    return digest.hexdigest()[:16]


class BaseCache(dict):
    """key -> the base's figure. ``compute(key, fn)`` returns it, running ``fn`` only if no one has; keys
    starting with "test" (lists of German sentences) are kept in ``folder`` when it is given."""

    def __init__(self, folder: Path | None = None, tag: str = ""):
        super().__init__()
        self._locks: dict = {}
        self._guard = threading.Lock()
        self.path = Path(folder) / f"base-german-{tag}.json" if folder is not None and tag else None
        if self.path is not None and self.path.is_file():
            try:
                saved = json.loads(self.path.read_text(encoding="utf-8"))
                self.update({tuple(json.loads(k)): v for k, v in saved.items()})
            except (OSError, ValueError) as exc:   # a damaged cache is recomputed, not trusted
                log.warning("ignoring the base cache %s: %s", self.path, exc)

    def compute(self, key: tuple, fn):
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self:
                value = fn()
                if value is None:   # (stopped part-way: nothing to keep)
                    return None
                self[key] = value
                self._save()
        return self[key]

    def _save(self) -> None:
        if self.path is None:
            return
        kept = {json.dumps(list(k)): v for k, v in self.items() if k and k[0] == "test"}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(kept, ensure_ascii=False), encoding="utf-8")
        tmp.replace(self.path)
