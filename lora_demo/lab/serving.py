"""Serving: the one float32 base model that translates for every run, and its lock.

A request merges the chosen run's update into the model's kernels (W + ΔW) for its own length and
restores them bit for bit afterwards, so one session's adapter never leaks into another's
translations and merged inference costs what the base costs. The translate box's columns (base
and one or more adapters) come from one batched decode instead: each Dense carries kernel slots
(core.rowsplit), filled with W + ΔW of each run for the request, and each copy of the batch uses one. Its layers
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


SIDE_BY_SIDE = rowsplit.SLOTS   # runs one translate request shows beside the base model


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
        """(base, with the update at ``scale``) German for each sentence; both the base when no ``state``."""
        if state is None:
            with self.use() as model:
                base = translate(model, self.tokenizer, sentences)
            return base, list(base)
        base, (column,) = self.translate_many(sentences, [(cfg, state, scale)])
        return base, column

    def translate_many(self, sentences: list[str], updates: list[tuple[LoraConfig, dict, float]],
                       max_new_tokens: int = 64) -> tuple[list[str], list[list[str]]]:
        """The base German and one column per (cfg, state, scale). Every adapter's column comes from one
        decode with the base's (see the module); full fine-tuning changed every weight, not only the
        Dense kernels, so its column is decoded on its own with the weights merged."""
        slotted = [i for i, (cfg, _, _) in enumerate(updates) if cfg.adapter]
        if len(updates) > SIDE_BY_SIDE:
            raise ValueError(f"at most {SIDE_BY_SIDE} runs side by side, got {len(updates)}")
        columns: list[list[str] | None] = [None] * len(updates)
        with self.lock:
            rowsplit.load(self.split_layers, [adapters.merged_kernels(self.model, *updates[i]) for i in slotted])
            try:
                base, *decoded = translate_split(self.model, self.tokenizer, sentences, max_new_tokens,
                                                 copies=1 + len(slotted))
            finally:
                rowsplit.clear(self.split_layers)
        for i, column in zip(slotted, decoded):
            columns[i] = column
        for i, (cfg, state, scale) in enumerate(updates):
            if columns[i] is None:
                with self.use(cfg, state, scale) as model:
                    columns[i] = translate(model, self.tokenizer, sentences, max_new_tokens)
        return base, columns

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
