"""Section 3: every run of this browser (or of the server) in a table, the loss curves overlaid and
BLEU/chrF against trainable parameters. Its refresh also keeps every run picker of the page current."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr

from lora_demo.analysis import compare
from lora_demo.present import plots
from lora_demo.lab import Lab
from lora_demo.lab.records import Job
from lora_demo.app.common import PRIVATE, Shared, run_label
from lora_demo.lab import insight

AUTO_PLOT = 8   # at most this many newly seen runs are added to the charts by themselves


@dataclass
class Runs:
    show_all: gr.Checkbox
    table: gr.Dataframe
    picked: gr.CheckboxGroup
    curves: gr.CheckboxGroup
    log_y: gr.Checkbox
    x_axis: gr.Radio
    metric: gr.Radio
    overlay: gr.Plot
    quality: gr.Plot
    refresh_btn: gr.Button
    groups: gr.Dataframe
    seeds_plot: gr.Plot
    config_a: gr.Dropdown
    config_b: gr.Dropdown
    verdict: gr.Markdown
    forgetting: gr.Plot


def build(lab: Lab, shared: Shared) -> Runs:
    gr.Markdown("### 3 · Runs: compare ranks")
    with gr.Row():
        show_all = gr.Checkbox(False, label="show all runs on this server (not only this browser's)")
        refresh_btn = gr.Button("↻ Refresh", size="sm")
        export_btn = gr.Button("Export CSV", size="sm")
        report_btn = gr.Button("📄 Report to hand in (HTML)", size="sm", elem_id="report-btn")
    export_file = gr.File(label="comparison CSV", visible=False)
    report_file = gr.File(label="report: one HTML file (the runs in the charts), opens offline in any browser",
                          visible=False, elem_id="report-file")
    table = gr.Dataframe(headers=compare.COLUMNS, interactive=False, wrap=True, max_height=320,
                         column_widths=compare.WIDTHS)
    picked = gr.CheckboxGroup([], label="runs in the charts")
    with gr.Row():
        curves = gr.CheckboxGroup(["train (smoothed)", "held-out", "validation"],
                                  value=["train (smoothed)", "held-out", "validation"], label="curves")
        log_y = gr.Checkbox(False, label="log-scale loss")
        x_axis = gr.Radio(["step", "training tokens"], value="step", label="x-axis")
        metric = gr.Radio(["BLEU", "chrF"], value="BLEU", label="quality metric")
    with gr.Row(equal_height=False):
        overlay = gr.Plot(show_label=False)
        quality = gr.Plot(show_label=False)
    gr.Markdown("#### Seed noise: each config's mean and spread over seeds")
    gr.Markdown(compare.HELDOUT_NOTE + " Runs that differ only in their seed form one config; use *repeat with N "
                "seeds* (section 2) to get several.")
    groups = gr.Dataframe(headers=compare.GROUP_COLUMNS, interactive=False, wrap=True, elem_id="groups-table")
    seeds_plot = gr.Plot(plots.seeds_figure([]), show_label=False, elem_id="seeds-plot")
    with gr.Row():
        config_a = gr.Dropdown([], label="config A", elem_id="config-a")
        config_b = gr.Dropdown([], label="config B", elem_id="config-b")
    verdict = gr.Markdown(elem_id="verdict")
    gr.Markdown(compare.RULE)
    gr.Markdown("#### Learning vs forgetting\nEach finished run: right = it learned more en→de (held-out loss "
                "fell), up = it forgot more (de→en loss on the same sentences rose). The base model is the origin. "
                "A run measured in section 6 also shows its path as its LoRA scale goes from 0 to 1. Compare "
                "methods in one click with *Compare methods* (section 2).")
    forgetting = gr.Plot(plots.forgetting_figure([]), show_label=False, elem_id="forgetting-plot")
    export_btn.click(partial(ui_export, lab), [shared.session, show_all], [export_file], **PRIVATE)
    report_btn.click(partial(ui_report, lab), [shared.session, show_all, picked], [report_file], **PRIVATE)
    return Runs(show_all, table, picked, curves, log_y, x_axis, metric, overlay, quality, refresh_btn, groups,
                seeds_plot, config_a, config_b, verdict, forgetting)


def connect(lab: Lab, shared: Shared, runs: Runs, pickers: dict, after: list) -> dict:
    """Wire the refresh of the run list, the charts and every run picker: on its own controls, on a
    timer, and after each event in ``after`` (train, sweep, import, delete, page load).
    ``pickers`` maps a dropdown to "newest" or "second" (the usable run it preselects), "any" (every
    run of the browser, the newest preselected), or "several" (a multiselect of usable runs, none preselected)."""
    inputs = {shared.session, shared.seen, runs.show_all, runs.picked, runs.curves, runs.log_y, runs.x_axis,
              runs.metric, runs.config_a, runs.config_b, *pickers}
    outputs = [runs.table, runs.picked, runs.overlay, runs.quality, shared.seen, runs.groups, runs.seeds_plot,
               runs.config_a, runs.config_b, runs.verdict, runs.forgetting, *pickers]
    refresh = dict(fn=partial(ui_runs, lab, shared, runs, pickers), inputs=inputs, outputs=outputs, **PRIVATE)
    for c in (runs.show_all, runs.curves, runs.log_y, runs.x_axis, runs.metric):
        c.change(show_progress="hidden", **refresh)
    for c in (runs.config_a, runs.config_b):
        c.input(show_progress="hidden", **refresh)
    runs.picked.input(show_progress="hidden", **refresh)
    runs.refresh_btn.click(**refresh)
    gr.Timer(3).tick(show_progress="hidden", **{**refresh, "fn": partial(ui_runs, lab, shared, runs, pickers,
                                                                         force=False)})
    for event in after:
        event.then(**refresh)
    return refresh


def ui_runs(lab: Lab, shared: Shared, runs: Runs, pickers: dict, v: dict, force: bool = True) -> dict:
    """Refresh the run list, comparison table and charts (skipped when nothing changed)."""
    session, seen, show_all = v[shared.session], v[shared.seen], v[runs.show_all]
    jobs = _visible(lab, session, show_all)
    key = ",".join(f"{j.id}:{j.version}" for j in jobs) + f"|{show_all}"
    if not force and key == seen:
        return gr.skip()   # one skip leaves every output as it is (an empty dict is an error in Gradio 6)
    ids = [j.id for j in jobs]
    known = {part.split(":")[0] for part in (seen or "").split("|")[0].split(",") if part}
    kept = [i for i in (v[runs.picked] or []) if i in ids]
    fresh = [i for i in ids if i not in known]
    chosen = kept + [i for i in fresh if i not in kept][-AUTO_PLOT:]   # new runs join the charts
    records = [j.record() for j in jobs]
    shown = [r for r in records if r["run_id"] in chosen]
    every = lab.runs(session or "")
    mine = [j for j in every if lab.usable(j)]
    choices = {"newest": [(run_label(j), j.id) for j in mine], "any": [(run_label(j), j.id) for j in every]}
    choices["second"] = choices["several"] = choices["newest"]
    usable = {j.id for j in mine}
    preselect = {"newest": mine[-1].id if mine else None, "second": mine[-2].id if len(mine) > 1 else None,
                 "any": every[-1].id if every else None}
    curves = v[runs.curves] or []
    gs = compare.groups(records)
    labels = [g["label"] for g in gs]
    a = v[runs.config_a] if v[runs.config_a] in labels else (labels[0] if labels else None)
    b = v[runs.config_b] if v[runs.config_b] in labels else (labels[-1] if len(labels) > 1 else None)
    return {runs.table: compare.table(records),
            runs.picked: gr.update(choices=[(run_label(j), j.id) for j in jobs], value=chosen),
            runs.overlay: plots.loss_overlay(shown, "train (smoothed)" in curves, "validation" in curves,
                                             bool(v[runs.log_y]),
                                             "tokens" if v[runs.x_axis] == "training tokens" else "step",
                                             title="Loss by run (colour = rank)", show_heldout="held-out" in curves),
            runs.groups: compare.group_table(gs),
            runs.seeds_plot: plots.seeds_figure(gs),
            runs.config_a: gr.update(choices=labels, value=a),
            runs.config_b: gr.update(choices=labels, value=b),
            runs.verdict: verdict_markdown(gs, a, b),
            runs.quality: plots.quality_figure(shown, "chrf" if v[runs.metric] == "chrF" else "bleu"),
            runs.forgetting: plots.forgetting_figure(shown, {j.id: a["scale_curve"] for j in jobs if j.id in chosen
                                                             and (a := insight.analysed(j))}),
            shared.seen: key,
            # one update per dropdown: Gradio may consume an update dict as it applies it. The newest usable run
            # is preselected (ready to translate or inspect); on an "any" picker the user's pick stays until a
            # new run appears
            **{picker: gr.update(choices=choices[which], value=_picked(v[picker], which, fresh, ids, usable,
                                                                       preselect)) for picker, which in pickers.items()}}


def _picked(value, which: str, fresh: list, ids: list, usable: set, preselect: dict):
    """A picker's value after a refresh: "several" keeps the user's usable picks (none preselected); "any" keeps
    the pick until a new run appears; the others preselect their usable run."""
    if which == "several":
        return [i for i in (value or []) if i in usable]
    if which == "any" and not fresh and value in ids:
        return value
    return preselect[which]


def verdict_markdown(gs: list[dict], a: str | None, b: str | None) -> str:
    """Whether configs A and B differ above seed noise (compare.RULE, stated under it)."""
    by_label = {g["label"]: g for g in gs}
    if a not in by_label or b not in by_label:
        return "Finish runs of two configs (ideally 3 seeds each) to compare them here."
    if a == b:
        return "Pick two different configs."
    v = compare.verdict(by_label[a], by_label[b])
    return ("✅ **Resolved.** " if v["resolved"] else "➖ **Not resolved.** ") + v["text"]


def _visible(lab: Lab, session, show_all) -> list[Job]:
    return lab.runs(None if show_all else (session or ""))


def ui_export(lab: Lab, session, show_all):
    records = [j.record() for j in _visible(lab, session, show_all)]
    if not records:
        raise gr.Error("no runs to export yet")
    path = lab.export_path("lora_lab_runs.csv")
    path.write_text(compare.to_csv(records), encoding="utf-8")
    return gr.update(value=str(path), visible=True)


def ui_report(lab: Lab, session, show_all, picked):
    """The report of the runs in the charts (all shown runs if none is picked), as a download."""
    jobs = [j for j in _visible(lab, session, show_all) if not picked or j.id in picked]
    if not jobs:
        raise gr.Error("no runs to report yet: train one first")
    return gr.update(value=str(lab.report(jobs)), visible=True)
