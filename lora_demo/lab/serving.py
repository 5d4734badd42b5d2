"""Serving: the one float32 base model that translates for every run, and its lock.

A request merges the chosen run's update into the model's kernels (W + ΔW) for its own length and
restores them bit for bit afterwards, so one session's adapter never leaks into another's
translations and merged inference costs what the base costs. The translate box's two columns (base
and an adapter) come from one batched decode instead: each Dense carries a second kernel slot
(core.rowsplit), filled with W + ΔW for the request, and the batch's second half uses it. Its layers
never change after that, so its compiled generate functions are traced once per shape for the life of
the process: runs add no compiled programs. Translate, export, the run's samples and BLEU, inspection
and analysis all come through here, one at a time.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np

from lora_demo import adapters
from lora_demo.analysis import anatomy
from lora_demo.analysis.evaluate import translate, translate_split
from lora_demo.core import rowsplit
from lora_demo.core.config import LoraConfig
from lora_demo.core.inject import base_kernels, lora_layers


class Serving:
    def __init__(self, model, tokenizer):
        if lora_layers(model):
            raise ValueError("serve a plain base model (no LoRA layers)")
        self.model, self.tokenizer = model, tokenizer
        self.split_layers = rowsplit.convert(model)    # before any compiled function is traced
        self.lock = threading.Lock()                   # one request at a time merges into the model
        self._kernels: dict[str, np.ndarray] | None = None
        self._norms: dict[str, float] | None = None

    @contextlib.contextmanager
    def use(self, cfg: LoraConfig | None = None, state: dict[str, np.ndarray] | None = None, scale: float = 1.0):
        """The model, carrying ``state`` at ``scale`` for the block (the base model when ``state`` is None)."""
        with self.lock:
            if state is None:
                yield self.model
            else:
                with adapters.merged_into(self.model, cfg, state, scale):
                    yield self.model

    def translate(self, sentences: list[str], cfg: LoraConfig | None = None, state: dict | None = None,
                  scale: float = 1.0) -> tuple[list[str], list[str]]:
        """(base, with the update at ``scale``) German for each sentence; both the base when no ``state``.
        An adapter's two columns come from one decode (see the module); full fine-tuning changed every
        weight, not only the Dense kernels, so its column is decoded on its own with the weights merged."""
        if state is not None and cfg.adapter:
            with self.lock:
                rowsplit.load(self.split_layers, adapters.merged_kernels(self.model, cfg, state, scale))
                try:
                    return translate_split(self.model, self.tokenizer, sentences)
                finally:
                    rowsplit.clear(self.split_layers)
        with self.use() as model:
            base = translate(model, self.tokenizer, sentences)
        if state is None:
            return base, list(base)
        with self.use(cfg, state, scale) as model:
            return base, translate(model, self.tokenizer, sentences)

    def export_merged(self, cfg: LoraConfig, state: dict, out: Path, source: dict) -> Path:
        """A full TF checkpoint with the update merged in (adapters.export_merged)."""
        with self.lock:
            return adapters.export_merged(self.model, self.tokenizer, cfg, state, out, source=source)

    def kernels(self) -> dict[str, np.ndarray]:
        """The base kernels W (float64), read once: inspection's ‖W‖ and analysis use the same."""
        with self.lock:   # (read while no request has an update merged in)
            if self._kernels is None:
                self._kernels = base_kernels(self.model)
        return self._kernels

    def norms(self) -> dict[str, float]:
        """‖W‖_F of each base kernel, computed once."""
        if self._norms is None:
            self._norms = anatomy.norms(self.kernels())
        return self._norms
