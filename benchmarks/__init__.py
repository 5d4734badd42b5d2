"""Benchmarks of LoRA Lab (``python -m lora_demo bench``), outside the package the app ships: the bench shape
is flan-t5-small with random weights, batch 8, 64 source + 64 target tokens, LoRA r=8 on q,v."""

BATCH, SOURCE, TARGET, RANK = 8, 64, 64, 8
