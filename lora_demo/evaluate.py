"""Batched translation with the adapter on, off or scaled; sacreBLEU and chrF.

sacrebleu is used directly: ``evaluate.load`` fetches metric scripts from the
hub, which is not reachable offline.
"""

from __future__ import annotations

import sacrebleu

from .data import PROMPT, Pairs
from .inject import lora_layers, set_scale


def translate(model, tokenizer, sentences: list[str], max_new_tokens: int = 64, batch_size: int = 16,
              num_beams: int = 1) -> list[str]:
    """English sentences -> German, greedy by default. Empty input gives an empty list."""
    out: list[str] = []
    for i in range(0, len(sentences), batch_size):
        chunk = [PROMPT + s for s in sentences[i:i + batch_size]]
        enc = tokenizer(chunk, return_tensors="tf", padding=True, truncation=True, max_length=256)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        out += [t.strip() for t in tokenizer.batch_decode(gen, skip_special_tokens=True)]
    return out


def translate_both(model, tokenizer, sentences: list[str], scale: float = 1.0, **kw) -> tuple[list[str], list[str]]:
    """(base, LoRA) translations. Base is the adapter at scale 0, which is the base model exactly."""
    if not lora_layers(model):
        base = translate(model, tokenizer, sentences, **kw)
        return base, list(base)
    try:
        set_scale(model, 0.0)
        base = translate(model, tokenizer, sentences, **kw)
        set_scale(model, scale)
        lora = translate(model, tokenizer, sentences, **kw)
    finally:
        set_scale(model, 1.0)
    return base, lora


def scores(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus sacreBLEU and chrF with their signatures (default 13a tokenisation)."""
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature()), "n": len(hypotheses)}


def evaluate_pairs(model, tokenizer, pairs: Pairs, scale: float = 1.0, **kw) -> dict:
    """BLEU and chrF of base and LoRA on ``pairs`` (e.g. the fixed newstest2016 slice)."""
    en = [p.en for p in pairs.items]
    refs = [p.de for p in pairs.items]
    base, lora = translate_both(model, tokenizer, en, scale=scale, **kw)
    return {"base": scores(base, refs), "lora": scores(lora, refs)}


def sentence_chrf(hypothesis: str, reference: str) -> float:
    return sacrebleu.metrics.CHRF().sentence_score(hypothesis, [reference]).score
