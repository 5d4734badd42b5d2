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
    """The Compare runs tab: the runs, each config over its seeds with the noise verdict, and the charts
    (each hidden until it has something to draw)."""
    gr.Markdown("Every run of this browser, newest first. Runs that differ only in their seed form one config: "
                "repeat a config with several seeds (*More settings* on the Train tab) to see whether two configs "
                "differ by more than seed noise.")
    with gr.Row():
        show_all = gr.Checkbox(False, label="show all runs on this server (not only this browser's)")
        refresh_btn = gr.Button("↻ Refresh", size="sm")
        export_btn = gr.Button("Export CSV (every column)", size="sm")
        report_btn = gr.Button("📄 Report to hand in (HTML)", size="sm", elem_id="report-btn")
    export_file = gr.File(label="comparison CSV", visible=False)
    report_file = gr.File(label="report: one HTML file (the runs in the charts), opens offline in any browser",
                          visible=False, elem_id="report-file")
    table = gr.Dataframe(headers=compare.BRIEF_COLUMNS, interactive=False, wrap=True, max_height=300,
                         column_widths=compare.BRIEF_WIDTHS, elem_id="runs-table")
    gr.Markdown("#### Seed noise: each config over its seeds\n" + compare.HELDOUT_NOTE + " A seed run again "
                "replaces its older run: the same seed gives the same run, so it is no new evidence.")
    groups = gr.Dataframe(headers=compare.BRIEF_GROUP_COLUMNS, interactive=False, wrap=True, elem_id="groups-table",
                          column_widths=compare.BRIEF_GROUP_WIDTHS)
    with gr.Row():
        config_a = gr.Dropdown([], label="config A", elem_id="config-a")
        config_b = gr.Dropdown([], label="config B", elem_id="config-b")
    verdict = gr.Markdown(elem_id="verdict")
    with gr.Accordion("The rule", open=False):
        gr.Markdown(compare.RULE)
    seeds_plot = gr.Plot(show_label=False, elem_id="seeds-plot", visible=False)
    picked = gr.CheckboxGroup([], label="runs in the charts")
    with gr.Row():
        curves = gr.CheckboxGroup(["train (smoothed)", "held-out", "validation"],
                                  value=["train (smoothed)", "held-out", "validation"], label="curves")
        log_y = gr.Checkbox(False, label="log-scale loss")
        x_axis = gr.Radio(["step", "training tokens"], value="step", label="x-axis")
        metric = gr.Radio(["BLEU", "chrF"], value="chrF", label="quality metric")
    with gr.Row(equal_height=False):
        overlay = gr.Plot(show_label=False, visible=False, elem_id="overlay-plot")
        quality = gr.Plot(show_label=False, visible=False, elem_id="quality-plot")
    gr.Markdown("#### Learning vs forgetting\nEach finished run: right = it learned more (its held-out loss "
                "fell), up = it forgot more (the loss on what the base already translated rose: for the captions "
                "lesson, held-out Europarl). The base model is the origin. A run measured under *Look inside* also "
                "shows its path as its LoRA scale goes from 0 to 1.")
    forgetting = gr.Plot(show_label=False, elem_id="forgetting-plot", visible=False)
    export_btn.click(partial(ui_export, lab), [shared.session, show_all], [export_file], **PRIVATE)
    report_btn.click(partial(ui_report, lab), [shared.session, show_all, picked], [report_file], **PRIVATE)
    return Runs(show_all, table, picked, curves, log_y, x_axis, metric, overlay, quality, refresh_btn, groups,
                seeds_plot, config_a, config_b, verdict, forgetting)


def connect(lab: Lab, shared: Shared, runs: Runs, pickers: dict, after: list, cost: tuple | None = None) -> dict:
    """Wire the refresh of the run list, the charts and every run picker: on its own controls, on a
    timer, and after each event in ``after`` (train, sweep, import, delete, page load).
    ``pickers`` maps a dropdown to "newest" or "second" (the usable run it preselects), "any" (every
    run of the browser, the newest preselected), or "several" (a multiselect of usable runs, none preselected).
    ``cost``: (a Markdown, a function of nothing) that the refresh fills too (the default run's cost here)."""
    inputs = {shared.session, shared.seen, runs.show_all, runs.picked, runs.curves, runs.log_y, runs.x_axis,
              runs.metric, runs.config_a, runs.config_b, *pickers}
    outputs = [runs.table, runs.picked, runs.overlay, runs.quality, shared.seen, runs.groups, runs.seeds_plot,
               runs.config_a, runs.config_b, runs.verdict, runs.forgetting, *pickers] + ([cost[0]] if cost else [])
    refresh = dict(fn=partial(ui_runs, lab, shared, runs, pickers, cost), inputs=inputs, outputs=outputs, **PRIVATE)
    for c in (runs.show_all, runs.curves, runs.log_y, runs.x_axis, runs.metric):
        c.change(show_progress="hidden", **refresh)
    for c in (runs.config_a, runs.config_b):
        c.input(show_progress="hidden", **refresh)
    runs.picked.input(show_progress="hidden", **refresh)
    runs.refresh_btn.click(**refresh)
    gr.Timer(3).tick(show_progress="hidden", **{**refresh, "fn": partial(ui_runs, lab, shared, runs, pickers, cost,
                                                                         force=False)})
    for event in after:
        event.then(**refresh)
    return refresh


def ui_runs(lab: Lab, shared: Shared, runs: Runs, pickers: dict, cost, v: dict, force: bool = True) -> dict:
    """Refresh the run list, comparison table and charts (skipped when nothing changed)."""
    session, seen, show_all = v[shared.session], v[shared.seen], v[runs.show_all]
    jobs = _visible(lab, session, show_all)
    key = ",".join(f"{j.id}:{j.version}" for j in jobs) + f"|{show_all}"
    if not force and seen and key == seen.rsplit("|", 1)[0]:
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
    newest = mine[-1].id if mine else ""
    grown = newest != (seen or "||").split("|")[-1]   # a run became usable since the last refresh
    key += f"|{newest}"
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
    shown_any = bool(shown)
    return {runs.table: compare.brief(records),
            runs.picked: gr.update(choices=[(run_label(j), j.id) for j in jobs], value=chosen),
            runs.overlay: gr.update(visible=shown_any, value=plots.loss_overlay(
                shown, "train (smoothed)" in curves, "validation" in curves, bool(v[runs.log_y]),
                "tokens" if v[runs.x_axis] == "training tokens" else "step", title="Loss by run (colour = rank)",
                show_heldout="held-out" in curves)),
            runs.groups: compare.group_brief(gs),
            runs.seeds_plot: gr.update(visible=bool(gs), value=plots.seeds_figure(gs)),
            runs.config_a: gr.update(choices=labels, value=a),
            runs.config_b: gr.update(choices=labels, value=b),
            runs.verdict: verdict_markdown(gs, a, b),
            runs.quality: gr.update(visible=any(r.get("quality") for r in shown), value=plots.quality_figure(
                shown, "chrf" if v[runs.metric] == "chrF" else "bleu")),
            runs.forgetting: gr.update(visible=any(_done(r) for r in shown), value=plots.forgetting_figure(
                shown, {j.id: a["scale_curve"] for j in jobs if j.id in chosen and (a := insight.analysed(j))})),
            shared.seen: key,
            # one update per dropdown: Gradio may consume an update dict as it applies it. The newest usable run
            # is preselected (ready to translate or inspect); on an "any" picker the user's pick stays until a
            # new run appears
            **{picker: gr.update(choices=choices[which], value=_picked(v[picker], which, fresh, ids, usable,
                                                                       preselect, grown)) for picker, which in pickers.items()},
            **({cost[0]: cost[1]()} if cost else {})}


def _done(rec: dict) -> bool:
    """Has the run what the learning-vs-forgetting chart draws (its held-out and its second curve's losses)?"""
    s = rec.get("summary") or {}
    return s.get("final_heldout_loss") is not None and s.get("final_val_loss") is not None


def _picked(value, which: str, fresh: list, ids: list, usable: set, preselect: dict, grown: bool = True):
    """A picker's value after a refresh: "several" keeps the user's usable picks (none preselected); "any" keeps
    the pick until a new run appears; the others keep the user's pick until a new run becomes usable, then
    preselect it (the Translate tab says what it changed to)."""
    if which == "several":
        return [i for i in (value or []) if i in usable]
    if which == "any" and not fresh and value in ids:
        return value
    if which in ("newest", "second") and not grown and value in usable:
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
