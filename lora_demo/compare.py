"""Pure functions from run records (dicts, as in metrics.json) to a comparison table, CSV and Markdown."""

from __future__ import annotations

import csv
import io

COLUMNS = ["run", "status", "rank", "alpha", "targets", "stacks", "blocks", "trainable", "% trainable",
           "adapter MB", "steps", "train loss", "val loss", "BLEU base", "BLEU LoRA", "chrF base", "chrF LoRA",
           "s/step", "first loss s", "peak RSS MB"]
# Display widths for the UI table (it scrolls sideways rather than squashing 20 columns).
WIDTHS = ["200px", "100px", "60px", "64px", "80px", "76px", "70px", "100px", "100px", "96px", "64px", "90px",
          "84px", "90px", "90px", "90px", "90px", "70px", "96px", "104px"]


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _round(x, nd):
    return None if x is None else round(float(x), nd)


def row(rec: dict) -> list:
    """One record as a table row; numbers stay numbers so the table sorts numerically."""
    lora, q = rec["config"]["lora"], rec.get("quality")
    layers = lora.get("layers")
    adapter_bytes = _get(rec, "adapter", "bytes")
    return [
        rec["run_id"], rec["status"], lora["rank"], lora["alpha"], "+".join(lora["targets"]), lora["side"],
        "all" if not layers else f"{layers[0]}-{layers[1]}",
        _get(rec, "params", "trainable"), _round(_get(rec, "params", "pct_trainable"), 3),
        _round(adapter_bytes / 1e6 if adapter_bytes else _get(rec, "params", "adapter_mb"), 3),
        len(rec.get("losses") or []) if rec.get("losses") is not None else _get(rec, "steps_done"),
        _round(_get(rec, "summary", "final_loss"), 3), _round(_get(rec, "summary", "final_val_loss"), 3),
        _round(_get(q, "base", "bleu"), 2), _round(_get(q, "lora", "bleu"), 2),
        _round(_get(q, "base", "chrf"), 2), _round(_get(q, "lora", "chrf"), 2),
        _round(_get(rec, "summary", "mean_step_s"), 3), _round(_get(rec, "summary", "first_loss_s"), 1),
        _get(rec, "memory", "peak_rss_mb"),
    ]


def table(records: list[dict]) -> list[list]:
    return [row(r) for r in records]


def to_csv(records: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    w.writerows(["" if v is None else v for v in r] for r in table(records))
    return buf.getvalue()


def to_markdown(records: list[dict]) -> str:
    def cell(v):
        return "–" if v is None else (f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in table(records)]
    sigs = {_get(r, "quality", "lora", "bleu_signature") for r in records} - {None}
    if sigs:
        lines += ["", "sacreBLEU signature: " + "; ".join(sorted(sigs))]
    return "\n".join(lines) + "\n"
