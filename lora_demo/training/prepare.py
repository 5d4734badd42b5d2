"""A run's data, encoded: training batches in the seed's order, and the fixed validation, held-out,
probe and forgetting batches."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

from lora_demo import data
from lora_demo.core.config import ConfigError, TrainConfig

PROBE_PAIRS = 32  # training pairs whose loss is measured before and after, on the same tokens


@dataclass
class Prepared:
    """The run's data, encoded. ``dynamic``: batches of similar-length rows, each trimmed to its
    longest row, for functions traced once for any length; else every batch padded to one shape
    (a distributed step is traced per shape)."""

    batches: Iterator[dict]        # training batches, in the seed's order
    first: dict                    # the first of them (it fixes the traced shapes)
    val: list[dict]                # the second curve's slice: what the base knew (data.pairs_for "validation")
    heldout: list[dict]            # the held-out slice of the training distribution
    heldout_name: str
    heldout_pairs: int
    probe: list[dict]              # fixed training pairs, scored before and after
    probe_pairs: int
    forget: list[dict]             # the held-out pairs reversed (de→en): the forgetting probe
    forget_name: str
    train_pairs: int | None        # None for a stream
    shapes: dict
    val_name: str = ""
    dynamic: bool = False


def prepare(cfg: TrainConfig, tokenizer, train_pairs, val_pairs, heldout_pairs, dynamic: bool = True) -> Prepared:
    """Encode the pairs. A stream is read as needed: the probe is its head, batches are encoded on
    the fly and padded to the maximum lengths, since its longest pair is unknown (then trimmed, if
    ``dynamic``)."""
    streamed = isinstance(train_pairs, data.Stream)
    if streamed:
        pairs_iter = iter(train_pairs)
        head = list(itertools.islice(pairs_iter, PROBE_PAIRS))
        if len(head) < cfg.batch_size:
            raise ConfigError(f"the training stream ({train_pairs.origin}) ended after {len(head)} pairs; "
                              f"a batch needs {cfg.batch_size}")
        arrays = data.encode(tokenizer, head, cfg.max_source_len, cfg.max_target_len)
    else:
        arrays = data.encode(tokenizer, train_pairs, cfg.max_source_len, cfg.max_target_len)
    val = data.encode(tokenizer, val_pairs, cfg.max_source_len, cfg.max_target_len)
    held = data.encode(tokenizer, heldout_pairs if heldout_pairs else val_pairs, cfg.max_source_len,
                       cfg.max_target_len)   # (no held-out pairs: no held-out curve; the shapes stay as they were)
    reverse = data.reversed_pairs(heldout_pairs if heldout_pairs else val_pairs)
    back = data.encode(tokenizer, reverse, cfg.max_source_len, cfg.max_target_len)
    # With fixed shapes, one shape for train, validation, held-out and probe batches: each function is
    # traced once. (Trimmed batches are cut from these.)
    lengths = ((cfg.max_source_len, cfg.max_target_len) if streamed else
               (max(a["input_ids"].shape[1] for a in (arrays, val, held, back)),
                max(a["labels"].shape[1] for a in (arrays, val, held, back))))
    arrays, val, held, back = (data.pad_to(a, *lengths, tokenizer.pad_token_id) for a in (arrays, val, held, back))
    probe = {k: v[:PROBE_PAIRS] for k, v in arrays.items()}
    if streamed:
        batches = data.stream_batches(tokenizer, itertools.chain(head, pairs_iter), cfg.batch_size, *lengths, cfg.seed,
                                      trimmed=dynamic)
    else:
        batches = (data.grouped_batches if dynamic else data.batches)(arrays, cfg.batch_size, cfg.seed)

    def fixed(a):
        return data.fixed_batches(a, cfg.batch_size, tokenizer.pad_token_id, trimmed=dynamic)
    return Prepared(batches=batches, first=next(batches), val=fixed(val), heldout=fixed(held) if heldout_pairs else [],
                    heldout_name=getattr(heldout_pairs, "split", "held-out") if heldout_pairs else "",
                    heldout_pairs=len(held["input_ids"]) if heldout_pairs else 0,
                    probe=fixed(probe), probe_pairs=len(probe["input_ids"]),
                    forget=fixed(back), forget_name=reverse.split,
                    train_pairs=None if streamed else len(arrays["input_ids"]),
                    shapes={"source_len": arrays["input_ids"].shape[1], "target_len": arrays["labels"].shape[1],
                            "batching": "length-grouped, each batch trimmed to its longest row" if dynamic else
                                        "every batch padded to the longest row of the data"},
                    dynamic=dynamic, val_name=getattr(val_pairs, "split", ""))
