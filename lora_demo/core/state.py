"""What LoRA Lab keeps per Keras model, in one object beside the model (never a Keras weight)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelState:
    generation: int = 0              # bumped when adapters are added or removed (inject.py)
    clock: Any = None                # the dropout clock of training steps (lora.DropoutClock)
    compiled: OrderedDict = field(default_factory=OrderedDict)   # traced train/eval steps (compiled.py)
    generate: dict = field(default_factory=dict)                 # compiled generate functions (evaluate.py)


def state_of(model) -> ModelState:
    """The model's state, created on first use. Kept in the instance dict directly: Keras' attribute
    tracking would otherwise walk it for weights."""
    state = model.__dict__.get("_lora_lab")
    if state is None:
        state = model.__dict__["_lora_lab"] = ModelState()
    return state
