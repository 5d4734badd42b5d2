"""A report to hand in: one self-contained HTML file of one or more runs, viewable with no network.

It holds the comparison table and the seed-noise groups with their verdicts, the overlaid loss curves
and the quality chart (interactive plotly figures, plotly.js written into the file once), each run's
parameter breakdown and its budget (predicted beside measured), its sample translations, and the
seeds, devices and software versions. ``write(run_dirs, out)`` is what the CLI's ``report`` command
and the app's report button call.
"""

from __future__ import annotations

import html
import json
import platform
import time
from importlib import metadata
from pathlib import Path

from lora_demo import adapters
from lora_demo.core.events import quality_lines
from lora_demo.analysis import budget
from lora_demo.analysis import compare
from lora_demo.present import plots

PACKAGES = ("tensorflow", "transformers", "tensorflow-addons", "numpy", "gradio", "plotly", "sacrebleu", "datasets")
STYLE = """
body {font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #0f172a; padding: 0 1em;}
h1 {margin-bottom: 0.2em;} h2 {border-bottom: 2px solid #e2e8f0; padding-bottom: 4px; margin-top: 2em;}
table {border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em;}
td, th {border: 1px solid #cbd5e1; padding: 4px 8px; text-align: left; vertical-align: top;}
th {background: #f1f5f9;} .note {color: #475569; font-size: 0.9em;} .figure {margin: 1em 0;}
.wide {overflow-x: auto;} .run {border: 1px solid #e2e8f0; border-radius: 8px; padding: 0.5em 1em; margin: 1em 0;}
"""


def versions() -> dict[str, str]:
    """The software this report was written with (installed package versions) and the Python."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def read_runs(run_dirs) -> list[tuple[Path, dict]]:
    """(directory, record) of each run directory given (a sweep's directory gives each of its runs)."""
    found: list[tuple[Path, dict]] = []
    for d in map(Path, run_dirs):
        if (d / "metrics.json").is_file():
            found.append((d, json.loads((d / "metrics.json").read_text())))
        elif d.is_dir() and any((sub / "metrics.json").is_file() for sub in d.iterdir()):
            found += read_runs(sorted(sub for sub in d.iterdir() if (sub / "metrics.json").is_file()))
        else:
            raise ValueError(f"{d} is not a run directory (no metrics.json in it or in its subdirectories)")
    return found


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            v = f"{v:,.4g}"
        elif isinstance(v, int) and not isinstance(v, bool):
            v = f"{v:,}"
        return html.escape("–" if v is None or v == "" else str(v))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _figure(fig, div_id: str) -> str:
    return ("<div class='figure'>" + fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                                                 config={"displaylogo": False}) + "</div>")


def _run_section(run_dir: Path, rec: dict) -> str:
    lora, train = rec["config"]["lora"], rec["config"]["train"]
    parts = [f"<div class='run'><h3>Run {html.escape(rec['run_id'])} · {html.escape(rec.get('status', ''))}</h3>"]
    parts.append(_table(["method", "rank", "alpha", "targets", "stacks", "blocks", "steps", "batch", "lr", "optimizer",
                         "seed", "data", "device"],
                        [[lora.get("method", "lora"), lora["rank"], lora["alpha"], "+".join(lora["targets"]), lora["side"],
                          "all" if not lora.get("layers") else "–".join(map(str, lora["layers"])), train["steps"],
                          train["batch_size"], train["lr"], train["optimizer"], train["seed"], train.get("data"),
                          rec.get("device", "")]]))
    for r in rec.get("resumes") or []:
        parts.append(f"<p class='note'>Resumed from its checkpoint at step {r['from_step']} (it was {r['was']}), "
                     f"to {r['steps']} steps.</p>")
    params = rec.get("params") or {}
    if params:
        comp = params.get("by_component") or {}
        parts.append(f"<h4>Parameter breakdown</h4><p>{params['trainable']:,} trainable of {params['total']:,} "
                     f"({params['pct_trainable']:.3f}%), frozen {params['frozen']:,}, adapter "
                     f"{params['adapter_mb']:.3f} MB (fp32)</p>")
        parts.append(_table(["component", "params", "trainable"],
                            [[name, c["params"], c["trainable"]] for name, c in comp.items()]))
    if rec.get("prediction"):
        try:
            size = adapters.tensor_bytes(run_dir)
        except OSError:
            size = None
        rows = budget.side_by_side(rec["prediction"], budget.measured(rec, size))
        parts.append("<h4>Budget: predicted when queued, beside measured</h4>"
                     + _table(["figure", "predicted", "measured", "off by (%)", "how"], rows))
    english = train.get("samples") or []
    if english and rec.get("samples"):
        by_step = dict((s, t) for s, t in rec["samples"])
        steps = sorted(by_step)
        parts.append("<h4>Sample translations (step 0 = the base model)</h4>"
                     + _table(["English", *[f"step {s}" for s in steps]],
                              [[en, *[by_step[s][i] if i < len(by_step[s]) else "" for s in steps]]
                               for i, en in enumerate(english)]))
    q = rec.get("quality")
    if q:
        parts.append(f"<p>BLEU base {q['base']['bleu']:.2f} → LoRA {q['lora']['bleu']:.2f}; chrF base "
                     f"{q['base']['chrf']:.2f} → LoRA {q['lora']['chrf']:.2f} on {q['n']} {q['split']} sentences "
                     f"(sacreBLEU {html.escape(q['lora'].get('bleu_signature', ''))}).</p>")
        for line in quality_lines(q, rec.get("summary") or {}):
            parts.append(f"<p>{html.escape(line)}.</p>")
    if rec.get("error"):
        parts.append(f"<p class='note'>{html.escape(rec['error'])}</p>")
    parts.append("</div>")
    return "".join(parts)


def build(runs: list[tuple[Path, dict]], title: str = "LoRA Lab report") -> str:
    """The report's HTML text."""
    if not runs:
        raise ValueError("a report needs at least one run")
    records = [rec for _, rec in runs]
    gs = compare.groups(records)
    verdicts = [compare.verdict(a, b) for a, b in zip(gs, gs[1:])]
    seeds = sorted({rec["config"]["train"]["seed"] for rec in records})
    models = sorted({rec.get("model") or rec["config"]["model"] for rec in records})
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{STYLE}</style><script type='text/javascript'>{plots.plotly_js()}</script></head><body>",
           f"<h1>{html.escape(title)}</h1><p class='note'>{len(records)} run(s) on {html.escape(', '.join(models))}; "
           f"written {time.strftime('%Y-%m-%d %H:%M %Z')} by LoRA Lab. Every figure below was measured during the "
           "runs and read from their records.</p>",
           "<h2>Comparison</h2>", _table(compare.COLUMNS, compare.table(records)),
           "<h3>Seed noise: each config's mean and spread over seeds</h3>",
           f"<p class='note'>{html.escape(compare.HELDOUT_NOTE)}</p>",
           _table(compare.GROUP_COLUMNS, compare.group_table(gs)),
           *[f"<p>{'✅ Resolved' if v['resolved'] else '➖ Not resolved'}: {html.escape(v['text'])}</p>" for v in verdicts],
           f"<p class='note'>{html.escape(compare.RULE)}</p>",
           "<h2>Loss curves</h2>",
           _figure(plots.loss_overlay(records, True, True, False, "step", title="Loss by run (colour = rank)"),
                   "report-curves"),
           "<h2>Quality</h2><p class='note'>FLAN-T5 was instruction-tuned on WMT16, so the base model's BLEU is not "
           "a zero-shot figure.</p>",
           _figure(plots.quality_figure(records, "bleu"), "report-quality"),
           "<h2>Runs: parameters, budget, sample translations</h2>",
           *[_run_section(d, rec) for d, rec in runs],
           "<h2>Seeds and software</h2>",
           f"<p>Seeds: {', '.join(map(str, seeds))}. Devices: "
           f"{html.escape('; '.join(sorted({rec.get('device') or '–' for rec in records})))}.</p>",
           _table(["software", "version"], [[k, v] for k, v in versions().items()]),
           "</body></html>"]
    return "\n".join(out)


def write(run_dirs, out, title: str = "LoRA Lab report") -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build(read_runs(run_dirs), title), encoding="utf-8")
    return out
