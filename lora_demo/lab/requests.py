"""Requests as the app and the API make them: checked input in, a dict of what the page shows out."""

from __future__ import annotations

from lora_demo.analysis import anatomy
from lora_demo.analysis.evaluate import MAX_SOURCE_TOKENS, sentence_chrf
from lora_demo.data import TOKENIZER_LOCK
from lora_demo.core.config import ConfigError, clean_sentences
from lora_demo.lab.serving import SIDE_BY_SIDE


def translate_request(lab, text, run_id: str, scale, session: str, reference: str = "",
                      keep: dict | None = None, beside: list[str] | None = None) -> dict:
    """A translate request as the app and the API make it: cleaned lines, base and LoRA German (by
    default with this session's newest usable run), notices, and per-sentence chrF when reference
    German is given one line per sentence. ``beside``: more runs whose German joins as columns
    (``runs``), all decoded in one batch with the base."""
    sentences, notices = clean_sentences(text)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= float(scale) <= 2.0:
        raise ConfigError(f"LoRA scale must be between 0 and 2, got {scale!r}")
    beside = list(beside or [])
    if not all(isinstance(r, str) for r in beside):
        raise ConfigError("runs to show beside must be a list of run ids")
    if not run_id and not beside:   # this session's newest usable run
        usable = [j.id for j in lab.runs(session) if lab.usable(j)]
        run_id = usable[-1] if usable else ""
    run_ids = list(dict.fromkeys([r for r in [run_id, *beside] if r]))   # once each, in order
    if len(run_ids) > SIDE_BY_SIDE:
        raise ConfigError(f"at most {SIDE_BY_SIDE} runs side by side, got {len(run_ids)}")
    for rid in run_ids:
        if rid not in lab.jobs:
            raise ConfigError(f"no run {rid!r}")
    if not run_ids:
        notices.append("no trained adapter in this session yet: an untrained LoRA equals the base model exactly")
    limit = output_limit(lab.loaded.tokenizer, sentences)
    base, columns = lab.translate_runs(sentences, run_ids, float(scale), session, keep, limit)
    notices += cut_notices(lab.loaded.tokenizer, sentences, [base, *columns], limit)
    if keep and run_ids:
        notices.append(anatomy.describe_keep(keep))
    refs = [" ".join(r.split()) for r in (reference or "").splitlines() if r.strip()]
    if refs and len(refs) != len(sentences):
        notices.append(f"{len(refs)} reference lines for {len(sentences)} sentences: chrF needs one per line")
        refs = []

    def chrf(german):
        return [round(sentence_chrf(h, r), 2) for h, r in zip(german, refs)] if refs else None
    runs = [{"run_id": rid, "german": german, "chrf": chrf(german)} for rid, german in zip(run_ids, columns)]
    first = runs[0] if runs else {"run_id": "", "german": list(base), "chrf": chrf(base)}
    return {"english": sentences, "base": base, "lora": first["german"], "run_id": first["run_id"],
            "notices": notices, "chrf_base": chrf(base), "chrf_lora": first["chrf"], "runs": runs}


OUTPUT_LIMITS = (64, 128, 256)   # German tokens a translation may have: a few compiled decoders serve every length


def _lengths(tokenizer, texts: list[str], prompt: str = "") -> list[int]:
    with TOKENIZER_LOCK:
        return [len(ids) for ids in tokenizer([prompt + t for t in texts])["input_ids"]]


def output_limit(tokenizer, sentences: list[str]) -> int:
    """The German tokens the decode may write: the smallest of OUTPUT_LIMITS that is at least 1.5 times the
    longest English sentence's tokens (German runs longer), so a long sentence is not cut for want of room."""
    need = 1.5 * max(_lengths(tokenizer, sentences))
    return next((n for n in OUTPUT_LIMITS if n >= need), OUTPUT_LIMITS[-1])


def cut_notices(tokenizer, sentences: list[str], columns: list[list[str]], limit: int) -> list[str]:
    """What was cut at a token limit, said once per sentence: English longer than the encoder reads, and
    German that filled every token the decode allowed (it stopped there, not at its end)."""
    from lora_demo.data import PROMPT

    out = [f"sentence {i + 1} is {n} tokens long: only its first {MAX_SOURCE_TOKENS} were translated"
           for i, n in enumerate(_lengths(tokenizer, sentences, PROMPT)) if n > MAX_SOURCE_TOKENS]
    full = sorted({i for column in columns for i, n in enumerate(_lengths(tokenizer, column)) if n > limit})
    out += [f"sentence {i + 1}: the German reached the {limit}-token limit and was cut there" for i in full]
    return out
