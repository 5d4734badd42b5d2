"""Pure functions from run records (dicts, as in metrics.json) to comparison tables, CSV and Markdown.

Runs that differ only in their seed form one *config*; ``groups`` gives each config's mean and spread
over seeds, and ``verdict`` says whether two configs differ by more than seed noise, with its rule.
"""

from __future__ import annotations

import csv
import io
import math
import statistics

from lora_demo.core.config import METHODS

COLUMNS = ["run", "status", "method", "rank", "alpha", "targets", "stacks", "blocks", "seed", "data", "trainable",
           "% trainable", "adapter MB", "steps", "train loss", "held-out base", "held-out loss", "val loss",
           "de→en base", "de→en loss", "BLEU base", "BLEU LoRA", "chrF base", "chrF LoRA", "chrF change",
           "first choice Δ pts", "s/step", "first loss s", "peak RSS MB"]
# Display widths for the UI table (it scrolls sideways rather than squashing 29 columns).
WIDTHS = ["200px", "100px", "84px", "60px", "64px", "80px", "76px", "70px", "60px", "80px", "100px", "100px", "96px",
          "64px", "90px", "96px", "96px", "84px", "90px", "90px", "90px", "90px", "90px", "90px", "110px", "120px",
          "70px", "96px", "104px"]
LORA_DEFAULTS = {"method": "lora", "loraplus_ratio": 16.0}   # records from before the methods were added


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
    full = lora.get("method") == "full"   # no adapter: rank, alpha, targets and blocks do not apply
    return [
        rec["run_id"], rec["status"], lora.get("method", "lora"), None if full else lora["rank"],
        None if full else lora["alpha"], "all weights" if full else "+".join(lora["targets"]),
        "both" if full else lora["side"], "all" if full or not layers else f"{layers[0]}-{layers[1]}",
        rec["config"]["train"]["seed"], rec["config"]["train"].get("data", "europarl"),
        _get(rec, "params", "trainable"), _round(_get(rec, "params", "pct_trainable"), 3),
        _round(adapter_bytes / 1e6 if adapter_bytes else _get(rec, "params", "adapter_mb"), 3),
        len(rec.get("losses") or []) if rec.get("losses") is not None else _get(rec, "steps_done"),
        _round(_get(rec, "summary", "final_loss"), 3), _round(_get(rec, "summary", "base_heldout_loss"), 4),
        _round(_get(rec, "summary", "final_heldout_loss"), 4), _round(_get(rec, "summary", "final_val_loss"), 3),
        _round(_get(rec, "summary", "base_forget_loss"), 4), _round(_get(rec, "summary", "final_forget_loss"), 4),
        _round(_get(q, "base", "bleu"), 2), _round(_get(q, "lora", "bleu"), 2),
        _round(_get(q, "base", "chrf"), 2), _round(_get(q, "lora", "chrf"), 2), change_verdict(q),
        _round(100 * f, 2) if (f := _get(q, "first_choice", "change")) is not None else None,
        _round(_get(rec, "summary", "mean_step_s"), 3), _round(_get(rec, "summary", "first_loss_s"), 1),
        _get(rec, "memory", "peak_rss_mb"),
    ]


def change_verdict(quality: dict | None) -> str | None:
    """"real rise", "real fall" or "noise": whether the run's chrF change is more than the luck of which
    sentences were scored (the paired bootstrap of evaluate.paired_change); None for runs without it."""
    c = _get(quality, "change", "chrf")
    if c is None:
        return None
    return ("real rise" if c["change"] > 0 else "real fall") if c["real"] else "noise"


def table(records: list[dict]) -> list[list]:
    return [row(r) for r in records]


def to_csv(records: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    w.writerows(["" if v is None else v for v in r] for r in table(records))
    return buf.getvalue()


def _cell(v):
    return "–" if v is None else (f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))


def _md_table(columns: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(_cell(v) for v in r) + " |" for r in rows])


def to_markdown(records: list[dict]) -> str:
    """Every run; then, per config, the mean and spread over seeds and the verdicts between ranks."""
    lines = ["## Runs", ""] + _md_table(COLUMNS, table(records))
    sigs = {_get(r, "quality", "lora", "bleu_signature") for r in records} - {None}
    if sigs:
        lines += ["", "sacreBLEU signature: " + "; ".join(sorted(sigs))]
    gs = groups(records)
    if gs:
        lines += ["", "## Per config, over seeds", "", HELDOUT_NOTE, ""]
        lines += _md_table(GROUP_COLUMNS, group_table(gs))
        pairs = list(zip(gs, gs[1:]))
        if pairs:
            lines += ["", "## Above seed noise?", "", RULE, ""]
            lines += [f"- {v['text']}" for v in (verdict(a, b) for a, b in pairs)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Seeds: a config's mean and spread, and whether two configs differ by more than seed noise
# ---------------------------------------------------------------------------

HELDOUT_NOTE = ("Held-out loss: token cross-entropy on a fixed held-out slice of the training data's distribution "
                "(never trained on), at the end of the run; lower is better. Spread = min–max over seeds.")
RULE = ("Rule: config A is better than config B *above seed noise* when every seed of A ends with a lower "
        "held-out loss than every seed of B (their seed ranges do not overlap). If A and B were equally good, "
        "all their seeds would fall in that order by chance with probability 1 / C(nA + nB, nA): 1 in 20 for "
        "3 seeds each, 1 in 6 for 2 each, 1 in 2 for one each. A difference counts as resolved only when that "
        "chance is at most 1 in 20.")
GROUP_COLUMNS = ["config", "seeds", "held-out mean", "held-out sd", "held-out min", "held-out max",
                 "Δ vs base (mean)", "de→en Δ (mean)", "val loss mean", "BLEU LoRA mean", "BLEU LoRA sd", "chrF LoRA mean",
                 "chrF change per seed", "first choice Δ pts (mean)", "trainable"]
_IGNORED = {"seed", "samples", "bleu_size", "eval_size"}   # settings that do not make another config


def config_key(rec: dict) -> str:
    cfg = rec["config"]
    train = {k: v for k, v in cfg["train"].items() if k not in _IGNORED}
    lora = {**LORA_DEFAULTS, **cfg["lora"]}
    if lora["method"] != "loraplus":
        lora.pop("loraplus_ratio")
    if lora["method"] == "full":   # nothing of the adapter's shape applies
        lora = {"method": "full"}
    return repr((cfg.get("model"), sorted(lora.items()), sorted(train.items())))


def _label(rec: dict, varying: set[str]) -> str:
    lora, train = {**LORA_DEFAULTS, **rec["config"]["lora"]}, rec["config"]["train"]
    if lora["method"] == "full":
        parts = ["full fine-tuning"]
    else:   # plain LoRA is named only when methods differ
        named = lora["method"] != "lora" or "method" in varying
        parts = ([lora["method"]] if named else []) + [f"r={lora['rank']}", "+".join(lora["targets"])]
    for key in sorted(varying - {"rank", "targets", "method", "loraplus_ratio"}):
        value = lora.get(key, train.get(key))
        parts.append(f"{key}={value}")
    return " · ".join(parts)


def groups(records: list[dict]) -> list[dict]:
    """Finished runs with a held-out loss, grouped by config (everything but the seed); sorted by
    rank. Each group has its runs' held-out, validation and BLEU/chrF values and their summaries.

    A group counts distinct seeds: a seed run again replaces its older run (the newest is kept), and
    ``repeats`` says how many were replaced. The same seed gives the same losses, so a repeat is no new
    evidence: the noise verdict (``verdict``) reads one run per seed."""
    done = [r for r in records if r.get("status") in ("completed", "stopped")
            and _get(r, "summary", "final_heldout_loss") is not None]
    by_key: dict[str, dict[int, dict]] = {}
    repeats: dict[str, int] = {}
    for r in sorted(done, key=lambda r: r.get("created") or 0):   # a rerun of a seed replaces its older run
        seeds = by_key.setdefault(config_key(r), {})
        seed = r["config"]["train"]["seed"]
        repeats[config_key(r)] = repeats.get(config_key(r), 0) + (seed in seeds)
        seeds[seed] = r
    if not by_key:
        return []
    firsts = [next(iter(rs.values()))["config"] for rs in by_key.values()]
    varying = {k for part in ("lora", "train") for k in firsts[0][part]
               if k not in _IGNORED and len({repr(c[part].get(k)) for c in firsts}) > 1}
    out = []
    for key, by_seed in by_key.items():
        rs = [by_seed[seed] for seed in sorted(by_seed)]
        held = [r["summary"]["final_heldout_loss"] for r in rs]
        base = [r["summary"]["base_heldout_loss"] for r in rs]
        out.append({
            "label": _label(rs[0], varying), "rank": rs[0]["config"]["lora"]["rank"],
            "seeds": sorted(by_seed), "runs": [r["run_id"] for r in rs], "repeats": repeats[key],
            "heldout": held, "delta": [h - b for h, b in zip(held, base)],
            "val": [v for r in rs if (v := _get(r, "summary", "final_val_loss")) is not None],
            "val_delta": [v - b for r in rs if (v := _get(r, "summary", "final_val_loss")) is not None
                          and (b := _get(r, "summary", "base_val_loss")) is not None],
            "bleu": [v for r in rs if (v := _get(r, "quality", "lora", "bleu")) is not None],
            "chrf": [v for r in rs if (v := _get(r, "quality", "lora", "chrf")) is not None],
            "chrf_verdicts": [v for r in rs if (v := change_verdict(r.get("quality"))) is not None],
            "first_choice": [100 * v for r in rs
                             if (v := _get(r, "quality", "first_choice", "change")) is not None],
            "trainable": _get(rs[0], "params", "trainable"),
            "method": rs[0]["config"]["lora"].get("method", "lora"),
            "forget": [f - b for r in rs if (f := _get(r, "summary", "final_forget_loss")) is not None
                       and (b := _get(r, "summary", "base_forget_loss")) is not None],
        })
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(out, key=lambda g: (order.get(g["method"], 0), g["rank"], g["label"]))


def _mean(xs):
    return statistics.fmean(xs) if xs else None


def _sd(xs):
    return statistics.stdev(xs) if len(xs) > 1 else None


def group_table(gs: list[dict]) -> list[list]:
    return [[g["label"], len(g["seeds"]), _round(_mean(g["heldout"]), 4), _round(_sd(g["heldout"]), 4),
             _round(min(g["heldout"]), 4), _round(max(g["heldout"]), 4), _round(_mean(g["delta"]), 4),
             _round(_mean(g["forget"]), 4),
             _round(_mean(g["val"]), 4), _round(_mean(g["bleu"]), 2), _round(_sd(g["bleu"]), 2),
             _round(_mean(g["chrf"]), 2), verdict_counts(g["chrf_verdicts"]), _round(_mean(g["first_choice"]), 2),
             g["trainable"]] for g in gs]


def verdict_counts(verdicts: list[str]) -> str | None:
    """How many seeds' chrF changes were real rises, real falls and noise, e.g. "2 real falls · 1 noise"."""
    if not verdicts:
        return None
    names = {"real rise": ("real rise", "real rises"), "real fall": ("real fall", "real falls"),
             "noise": ("noise", "noise")}
    return " · ".join(f"{n} {names[v][n != 1]}" for v in names if (n := verdicts.count(v)))


def verdict(a: dict, b: dict) -> dict:
    """Whether configs ``a`` and ``b`` (from ``groups``) differ in held-out loss above seed noise (RULE)."""
    na, nb = len(a["heldout"]), len(b["heldout"])
    chance = 1 / math.comb(na + nb, na)
    diff = _mean(a["heldout"]) - _mean(b["heldout"])
    a_better, b_better = max(a["heldout"]) < min(b["heldout"]), max(b["heldout"]) < min(a["heldout"])
    separated = a_better or b_better
    resolved = separated and chance <= 1 / 20
    better, worse = (a, b) if diff < 0 else (b, a)
    if resolved:
        text = (f"{better['label']} is better than {worse['label']} above seed noise: held-out "
                f"{_mean(better['heldout']):.4f} vs {_mean(worse['heldout']):.4f} (Δ {abs(diff):.4f}); every seed "
                f"of one beats every seed of the other (chance if equal: 1 in {round(1 / chance)}).")
    elif separated:
        text = (f"{better['label']} vs {worse['label']}: the seeds do not overlap (Δ {abs(diff):.4f}), but with "
                f"{na} and {nb} seeds that happens by chance 1 in {round(1 / chance)} times: not resolved; "
                "repeat with more seeds.")
    else:
        text = (f"{a['label']} vs {b['label']}: not resolved; the difference of the means ({abs(diff):.4f}) is "
                f"within seed noise (the seed ranges overlap: {min(a['heldout']):.4f}–{max(a['heldout']):.4f} "
                f"and {min(b['heldout']):.4f}–{max(b['heldout']):.4f}).")
    return {"a": a["label"], "b": b["label"], "diff": diff, "chance": chance, "separated": separated,
            "resolved": resolved, "text": text}


def groups_csv(gs: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(GROUP_COLUMNS + ["seed list", "runs"])
    for g, r in zip(gs, group_table(gs)):
        w.writerow(["" if v is None else v for v in r] + [" ".join(map(str, g["seeds"])), " ".join(g["runs"])])
    return buf.getvalue()


# ---------------------------------------------------------------------------
# The page's tables: the columns a reader compares first (the full rows stay in the CSV and the report)
# ---------------------------------------------------------------------------

BRIEF_COLUMNS = ["run", "what it trained", "seed", "status", "held-out loss", "Δ held-out", "Δ what the base knew",
                 "chrF base → LoRA", "chrF change", "BLEU base → LoRA", "trainable"]
BRIEF_WIDTHS = ["120px", "150px", "56px", "96px", "120px", "96px", "110px", "130px", "104px", "130px", "100px"]


def _change(before, after) -> str | None:
    return None if before is None or after is None or not before else f"{100 * (after - before) / before:+.1f}%"


def _arrow(q, key: str) -> str | None:
    return None if not q else f"{q['base'][key]:.1f} → {q['lora'][key]:.1f}"


def brief(records: list[dict]) -> list[list]:
    """One short row per run, newest first: what it trained, and how its losses and German moved."""
    out = []
    for rec in sorted(records, key=lambda r: r.get("created") or 0, reverse=True):
        summ, q, lora = rec.get("summary") or {}, rec.get("quality"), rec["config"]["lora"]
        what = "full fine-tuning" if lora.get("method") == "full" else (
            ("" if lora.get("method", "lora") == "lora" else lora["method"] + " ") + f"r={lora['rank']} "
            + "+".join(lora["targets"]))
        held = summ.get("final_heldout_loss")
        out.append([rec["run_id"][-13:], what, rec["config"]["train"]["seed"], rec["status"],
                    None if held is None else f"{summ['base_heldout_loss']:.3f} → {held:.3f}",
                    _change(summ.get("base_heldout_loss"), held),
                    _change(summ.get("base_val_loss"), summ.get("final_val_loss")),
                    _arrow(q, "chrf"), change_verdict(q), _arrow(q, "bleu"), _get(rec, "params", "trainable")])
    return out


BRIEF_GROUP_COLUMNS = ["config", "seeds", "held-out mean", "held-out min–max", "Δ vs base", "Δ what the base knew",
                       "chrF LoRA", "chrF change per seed", "BLEU LoRA", "trainable"]
BRIEF_GROUP_WIDTHS = ["180px", "110px", "110px", "140px", "100px", "120px", "90px", "170px", "90px", "100px"]


def group_brief(gs: list[dict]) -> list[list]:
    """One short row per config: its distinct seeds (and how many reruns of a seed were replaced), the held-out
    loss over them, and the chrF verdicts."""
    rows = []
    for g in gs:
        seeds = f"{len(g['seeds'])}" + (f" ({g['repeats']} rerun{'s' * (g['repeats'] > 1)} replaced)"
                                        if g["repeats"] else "")
        rows.append([g["label"], seeds, _round(_mean(g["heldout"]), 4),
                     f"{min(g['heldout']):.4f}–{max(g['heldout']):.4f}", _round(_mean(g["delta"]), 4),
                     _round(_mean(g["val_delta"]), 4) if g.get("val_delta") else None,
                     _round(_mean(g["chrf"]), 2), verdict_counts(g["chrf_verdicts"]), _round(_mean(g["bleu"]), 2),
                     g["trainable"]])
    return rows
