"""PyTorch + PEFT on the same shapes and pairs: the reference LoRA implementation the bench compares
ours with, when both are installed (the interop extras; else its figures are null)."""

from __future__ import annotations

import time

from benchmarks import BATCH, RANK
from benchmarks.machine import median_s


def _peft(name: str):
    """(torch, a PEFT LoRA model r=8 on q,v with random weights in training mode, its AdamW step(batch)),
    or None when torch or peft is missing."""
    try:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import T5ForConditionalGeneration
    except Exception:
        return None
    from lora_demo.core.models import model_config

    torch.manual_seed(0)
    model = get_peft_model(T5ForConditionalGeneration(model_config(name)),
                           LoraConfig(r=RANK, lora_alpha=16, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(batch):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return torch, model, step


def peft_step(name: str, batch: dict, steps: int = 3) -> float | None:
    """Median step time on ``batch`` (numpy-convertible tensors), after one warm-up step."""
    made = _peft(name)
    if made is None:
        return None
    torch, _, step = made
    b = {k: torch.tensor(v.numpy(), dtype=torch.long) for k, v in batch.items()}
    step(b)
    return median_s(lambda: step(b), steps)


def peft_real_throughput(tokenizer, arrays: dict, pairs_n: int, name: str) -> dict | None:
    """The same pairs, token for token, through PyTorch + PEFT with its natural practice:
    ``DataCollatorForSeq2Seq`` (dynamic padding to the longest row) and length grouping
    (``LengthGroupedSampler``, what ``group_by_length=True`` uses), batch 8, one epoch, after a
    warm-up of 3 batches; PyTorch's own thread count (all usable CPUs)."""
    made = _peft(name)
    if made is None:
        return None
    torch, _, step = made
    from transformers import DataCollatorForSeq2Seq
    from transformers.trainer_pt_utils import LengthGroupedSampler

    src, tgt = arrays["attention_mask"].sum(1), (arrays["labels"] != -100).sum(1)
    features = [{"input_ids": arrays["input_ids"][i, :src[i]].tolist(), "attention_mask": [1] * int(src[i]),
                 "labels": arrays["labels"][i, :tgt[i]].tolist()} for i in range(pairs_n)]
    collate = DataCollatorForSeq2Seq(tokenizer, padding="longest")
    order = list(LengthGroupedSampler(BATCH, lengths=[len(f["input_ids"]) for f in features],
                                      generator=torch.Generator().manual_seed(0)))
    batches = [collate([features[i] for i in order[s:s + BATCH]]) for s in range(0, pairs_n - BATCH + 1, BATCH)]
    for b in batches[:3]:
        step(b)
    t = time.perf_counter()
    for b in batches:
        step(b)
    seconds = time.perf_counter() - t
    tokens = int(sum(int(b["attention_mask"].sum()) + int((b["labels"] != -100).sum()) for b in batches))
    slots = sum(b["input_ids"].numel() + b["labels"].numel() for b in batches)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "threads": torch.get_num_threads(),
            "padding_pct": 100.0 * (1 - tokens / slots)}
