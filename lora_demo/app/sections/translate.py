"""Section 4: English in, base and LoRA German side by side, with the words that differ highlighted,
per-sentence chrF against reference German, the LoRA scale, and parts of the adapter switched off."""

from __future__ import annotations

import html
from dataclasses import dataclass
from functools import partial

import gradio as gr
import pandas as pd

from lora_demo.analysis import anatomy
from lora_demo.analysis.evaluate import word_diff
from lora_demo.lab import Lab
from lora_demo.lab.serving import SIDE_BY_SIDE
from lora_demo.app.common import PRIVATE, Shared, refused, run_label, run_what

FLAN_NOTE = ("FLAN-T5 was instruction-tuned on a mixture that includes WMT16 translation, so the base model's "
             "German (and its BLEU) is **not** a zero-shot result.")
EXAMPLES = ["A little girl in a pink dress is running on the beach.", "Two dogs are playing in the snow.",
            "I would like to thank the Commissioner for her answer.", "The European Parliament adopted the resolution."]


@dataclass
class Translate:
    """What the page chains on from this section."""

    run_pick: gr.Dropdown            # the run whose adapter translates (the runs refresh fills it)
    beside_pick: gr.Dropdown         # more runs shown beside it, in the same decode


def build(lab: Lab, shared: Shared) -> Translate:
    gr.Markdown("Type English: the base model and your LoRA model answer side by side, the words that differ "
                "highlighted." + (" " + FLAN_NOTE if "flan" in lab.loaded.name.lower() else ""))
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            run_pick = gr.Dropdown([], label="LoRA run (this browser's runs)", allow_custom_value=False,
                                   elem_id="translate-pick")
            picked_note = gr.Markdown(elem_id="translate-pick-note")
            beside_pick = gr.Dropdown([], value=[], multiselect=True, max_choices=SIDE_BY_SIDE - 1,
                                      label=f"…and beside it, up to {SIDE_BY_SIDE - 1} more runs (e.g. r=1, 4, 16): "
                                            "every column comes from one batched decode", elem_id="beside-pick")
            text = gr.Textbox(lines=4, label="English, one sentence per line", value=EXAMPLES[0], elem_id="en-text")
            reference = gr.Textbox(lines=2, label="reference German, one line per sentence (optional: "
                                                  "per-sentence chrF)")
            scale = gr.Slider(0, 2, value=1, step=0.05, label="LoRA scale (0 = base model, 1 = as trained)")
            with gr.Accordion("Switch parts of the adapter off (no retraining)", open=False):
                sides = gr.CheckboxGroup(["encoder", "decoder"], value=["encoder", "decoder"],
                                         label="keep LoRA on in these stacks", elem_id="keep-sides")
                blocks = gr.Textbox("all", label="…in these blocks (e.g. 0-3, or all)")
                modules = gr.CheckboxGroup(anatomy.COLUMNS, value=anatomy.COLUMNS,
                                           label="…for these module types (self-/cross-attention, FFN)")
            translate_btn = gr.Button("Translate", variant="primary", elem_id="translate-btn")
            gr.Examples([[e] for e in EXAMPLES], inputs=[text], label="examples")
        with gr.Column(scale=3):
            out_table = gr.Dataframe(headers=["English", "Base", "LoRA"], interactive=False, wrap=True,
                                     column_widths=["30%", "35%", "35%"], elem_id="translations", max_height=900)
            diff = gr.HTML()
            note = gr.Markdown()
    c = dict(text=text, scale=scale, run=run_pick, beside=beside_pick, reference=reference, session=shared.session,
             sides=sides, blocks=blocks, modules=modules)
    run_pick.change(partial(ui_picked, lab), [run_pick], [picked_note], show_progress="hidden", **PRIVATE)
    for trigger in (translate_btn.click, text.submit):
        trigger(partial(ui_translate, lab, c), set(c.values()), [out_table, diff, note], concurrency_limit=None,
                **PRIVATE)
    return Translate(run_pick, beside_pick)


def ui_picked(lab: Lab, run_id: str) -> str:
    """Say which run the LoRA column now uses, whether the user picked it or a new run took its place."""
    job = lab.jobs.get(run_id or "")
    if job is None:
        return "No run yet: the LoRA column equals the base model until you train one."
    newest = [j for j in lab.runs(None) if j.owner == job.owner and lab.usable(j)]
    latest = " (the newest run)" if newest and newest[-1].id == job.id else ""
    return f"The LoRA column uses run **{job.id}**{latest}: {run_label(job)}."


@refused
def ui_translate(lab: Lab, c: dict, v: dict):
    """``c`` names the controls; ``v`` holds their values."""
    def value(name):
        return v[c[name]]
    scale = value("scale")
    out = lab.translate_request(value("text"), value("run") or "", scale, value("session") or "", value("reference"),
                                anatomy.keep_spec(value("sides"), value("blocks"), value("modules")),
                                beside=value("beside") or [])
    runs = out["runs"] or [{"run_id": "", "german": out["lora"], "chrf": out["chrf_lora"]}]
    names = [column_name(lab, r["run_id"]) for r in runs] if len(runs) > 1 else ["LoRA"]
    german = [out["base"]] + [r["german"] for r in runs]
    headers = ["English", "Base", *names]
    if out["chrf_base"] is not None:
        german += [out["chrf_base"]] + [r["chrf"] for r in runs]
        headers += ["chrF base"] + [f"chrF {n}" for n in names]
    table = pd.DataFrame(dict(zip(headers, [out["english"], *german])))   # a frame: its columns may change
    text_share = 100 // (2 + len(runs)) if out["chrf_base"] is None else 70 // (2 + len(runs))
    widths = [f"{text_share}%"] * (2 + len(runs)) + [f"{30 // (1 + len(runs))}%"] * (len(headers) - 2 - len(runs))
    if not out["run_id"]:
        label = "no adapter yet"
    elif len(runs) == 1:
        label = f"LoRA = adapter of run {out['run_id']} at scale {float(scale):g}"
    else:
        label = f"{len(runs)} runs at scale {float(scale):g}, decoded in one batch with the base model"
    return (gr.update(value=table, column_widths=widths),
            diff_html(out["english"], out["base"], [r["german"] for r in runs], names),
            label + "".join(f"  \n⚠️ {n}" for n in out["notices"]))


def column_name(lab: Lab, run_id: str) -> str:
    """A short column header for a run: what it trained and the end of its id."""
    return f"{run_what(lab.jobs[run_id].config.lora, targets=False)} · {run_id[-6:]}"


def diff_html(english, base, columns: list[list[str]], labels: list[str]) -> str:
    """Each sentence's base German and every run's, the words each run changed from the base highlighted
    (and in the base, the words some run changed)."""
    def words(pairs):
        return " ".join(f"<mark class='changed'>{html.escape(w)}</mark>" if changed else html.escape(w)
                        for w, changed in pairs)
    rows = []
    for i, (en, b) in enumerate(zip(english, base)):
        diffs = [word_diff(b, column[i]) for column in columns]
        base_flags = [any(d[0][k][1] for d in diffs) for k in range(len(b.split()))]
        cells = [words(zip(b.split(), base_flags))] + [words(lw) for _, lw in diffs]
        rows.append(f"<tr><td>{html.escape(en)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    heads = "".join(f"<th>{html.escape(name)}</th>" for name in ["English", "Base", *labels])
    return (f"<div class='diff'><b>Where each run's German differs from the base</b> (highlighted words)"
            f"<table><tr>{heads}</tr>" + "".join(rows) + "</table></div>")
