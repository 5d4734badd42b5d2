"""Section 6: inside the adapter. Where ΔW is large, how much of the rank was used, how large the update
is next to W, whether two ranks learned the same directions (φ), and the predicted vs measured budget."""

from __future__ import annotations

import html
from dataclasses import dataclass
from functools import partial

import gradio as gr

from lora_demo.present import plots
from lora_demo.core.config import ConfigError
from lora_demo.lab import Lab
from lora_demo.app.common import PRIVATE, Shared

INTRO = ("For each adapted layer, the update ΔW = (alpha/r)·A·B, computed exactly. The heatmap shows "
         "‖ΔW‖_F per block and module: *where* the model changed. The spectra show how much of the "
         "rank you paid for was used (effective rank: singular values holding 90% of ‖ΔW‖²). φ compares "
         "two runs' top directions per layer (Hu et al. 2021, section 7): does r=8 learn what r=64 "
         "learns? For rsLoRA the update is scaled by alpha/√r; for PiSSA it is the change from W, "
         "c·(A·B − A0·B0), of rank up to 2r; for DoRA these views show the low-rank part c·A·B, and its "
         "learned magnitudes rescale the columns on top (see ΔM and ΔD below).")


@dataclass
class Inspect:
    """What the page chains on from this section."""

    pick: gr.Dropdown                # the run to look inside
    compare_pick: gr.Dropdown        # a second run, for the subspace similarity


def build(lab: Lab, shared: Shared) -> Inspect:
    gr.Markdown(INTRO)
    with gr.Row():
        pick = gr.Dropdown([], label="run", allow_custom_value=False, elem_id="inspect-pick")
        compare_pick = gr.Dropdown([], label="compare with (another rank)", allow_custom_value=False)
        inspect_btn = gr.Button("Inspect", variant="primary", elem_id="inspect-btn")
    summary = gr.Markdown(elem_id="inspect-summary")
    with gr.Row(equal_height=False):
        heatmap = gr.Plot(show_label=False, elem_id="delta-heatmap", visible=False)
        spectra = gr.Plot(show_label=False, elem_id="spectra", visible=False)
    layers = gr.Dataframe(headers=["layer", "‖ΔW‖_F", "‖ΔW‖ / ‖W‖", "effective rank / r"], visible=False,
                          interactive=False, max_height=260, column_widths=["52%", "16%", "16%", "16%"])
    sim_md = gr.Markdown()
    sim_plot = gr.Plot(show_label=False, elem_id="similarity", visible=False)
    outputs = [heatmap, spectra, layers, summary, sim_plot, sim_md]
    # pick.change, not .input: when a new run replaces the pick, its figures replace the old run's
    for trigger in (inspect_btn.click, pick.change, compare_pick.input):
        trigger(partial(ui_inspect, lab), [pick, compare_pick, shared.session], outputs, **PRIVATE)
    gr.Markdown(LEARNED)
    measure_btn = gr.Button("Measure what the picked run learned and forgot", elem_id="measure-btn")
    measured = gr.Markdown(elem_id="measured")
    with gr.Row(equal_height=False):
        trunc_plot = gr.Plot(show_label=False, elem_id="truncation", visible=False)
        intruder_plot = gr.Plot(show_label=False, elem_id="intruders", visible=False)
    measured_for = gr.State("")   # the run the figures below were measured on
    measure_btn.click(partial(ui_measure, lab), [pick, shared.session],
                      [measured, trunc_plot, intruder_plot, measured_for], **PRIVATE)
    pick.change(_unmeasured, [pick, measured_for], [measured], **PRIVATE)
    return Inspect(pick, compare_pick)


LEARNED = ("#### What it learned and what it forgot\n"
           "Measured from the run's weights on its held-out slice and on what the base already knew (the "
           "lesson's second curve: for captions, held-out Europarl), which no run trains on: the **scale curve** "
           "moves the update from 0 (the base model, exactly) to 1 (as trained) and is drawn on *Compare runs* → "
           "Learning vs forgetting; **rank truncation** keeps only the top-k singular directions of each "
           "layer's update; **magnitude and direction change** (ΔM, ΔD, as in the DoRA paper) and **intruder "
           "dimensions** (top-10 singular vectors of W + ΔW with no match of |cos| ≥ 0.5 among W's; "
           "Shuttleworth et al. 2024) beside a random update of the same norm and rank, because random "
           "directions count as intruders too. Full fine-tuning runs have no factors to truncate.")


def _hidden() -> tuple:
    return gr.update(visible=False), gr.update(visible=False)


def _unmeasured(run_id, measured_for):
    """A new pick says that the figures below were measured on another run (hiding them here would keep
    the next measurement's figures hidden too, in Gradio 6.17); the same run's stay as they are."""
    if not measured_for or run_id == measured_for:
        return gr.skip()
    return (f"The figures below were measured on run `{measured_for}`. Press *Measure* for the picked run"
            + (f" (`{run_id}`)." if run_id else "."))


def ui_measure(lab: Lab, run_id, session):
    if not run_id:
        return ("Pick a run above first.", *_hidden(), "")
    try:
        a = lab.analyse(run_id, session or "")
        job = lab.owned(run_id, session or "")
    except ConfigError as exc:
        return (f"⚠️ {html.escape(str(exc))}", *_hidden(), "")
    curve, rep = a["scale_curve"], a["layers"]
    base, end = curve[0], curve[-1]
    text = (f"**{a['method']}**, run `{job.id}`: held-out loss {base['heldout']:.4f} → {end['heldout']:.4f} "
            f"(learned {base['heldout'] - end['heldout']:+.4f}); {a.get('forget_name') or 'what the base knew'} "
            f"{base['forget']:.4f} → {end['forget']:.4f} (forgot {end['forget'] - base['forget']:+.4f}; its path "
            f"as the scale goes 0 → 1 is on *Compare runs*). Over {len(rep['layers'])} layers: ΔM "
            f"{rep['magnitude_change']:.3g}, ΔD {rep['direction_change']:.3g}, intruder dimensions "
            f"**{rep['intruders']}** (a random update of the same norm and rank: {rep['intruders_random']}).")
    if a["truncation"]:
        best = min(a["truncation"], key=lambda p: p["heldout"])
        text += (f" Truncation: the best held-out loss, {best['heldout']:.4f}, keeps k = {best['k']} of "
                 f"{a['truncation'][-1]['k']} directions per layer.")
    label = f"{a['method']} {job.id[-6:]}"
    trunc = plots.truncation_figure({job.id: a["truncation"]}, {job.id: label}) if a["truncation"] else None
    return (text, gr.update(value=trunc, visible=trunc is not None),
            gr.update(value=plots.intruder_figure({label: rep}), visible=True), run_id)


def budget_rows_markdown(b: dict) -> str:
    def fmt(v, name):
        if v is None:
            return "–"
        if name.startswith("trainable"):
            return f"{int(v):,}"
        return f"{v:.3f}" if "time" in name else f"{v:,.3f}"
    lines = ["| figure | predicted | measured | off by | how |", "| --- | --- | --- | --- | --- |"]
    for name, p, m, off, how in b["rows"]:
        lines.append(f"| {name} | {fmt(p, name)} | {fmt(m, name)} | {'–' if off is None else f'{off:+.1f}%'} "
                     f"| {how} |")
    return "\n".join(lines)


def _layer_rows(info: dict) -> list[list]:
    return [[x["layer"], round(x["fro"], 5), None if x["relative"] is None else round(x["relative"], 6),
             f"{x['effective_rank']} / {x['rank']}"] for x in sorted(info["layers"], key=lambda x: -x["fro"])]


def _empty(message: str) -> tuple:
    hide = gr.update(visible=False)
    return (hide, hide, hide, message, hide, "")


def ui_inspect(lab: Lab, run_a, run_b, session):
    """Heatmap, spectra, per-layer table and budget of run A; φ between A and B."""
    session = session or ""
    if not run_a:
        return _empty("Train a run (or import an adapter), pick it here and press Inspect.")
    try:
        info = lab.inspect(run_a, session)
    except ConfigError as exc:
        return _empty(f"⚠️ {html.escape(str(exc))}")
    s = info["summary"]
    text = (f"**{s['layers']} adapted layers** · mean effective rank **{s['mean_effective_rank']:.2f}** of r = "
            f"{info['rank']} (σ's holding {100 * info['energy']:.0f}% of ‖ΔW‖²) · largest update: `{s['largest']}`"
            + (f" · largest ‖ΔW‖/‖W‖: {s['max_relative']:.2e}" if s["max_relative"] is not None else ""))
    try:
        budget = lab.budget(run_a, session)
        text += "\n\n**Budget, predicted when queued vs measured:**\n\n" + budget_rows_markdown(budget)
    except ConfigError as exc:
        text += f"\n\n{html.escape(str(exc))}"
    sim_fig, sim_text = _similarity(lab, run_a, run_b, session)
    return (gr.update(value=plots.delta_heatmap(info), visible=True),
            gr.update(value=plots.spectra_figure(info), visible=True),
            gr.update(value=_layer_rows(info), visible=True), text,
            gr.update(value=sim_fig, visible=sim_fig is not None), sim_text)


def _similarity(lab: Lab, run_a, run_b, session) -> tuple:
    if not run_b or run_b == run_a:
        return None, "Pick a second run to compare subspaces."
    try:
        sim = lab.similarity(run_a, run_b, session)
    except ConfigError as exc:
        return None, f"⚠️ {html.escape(str(exc))}"
    if sim["mean_phi_k"] is None:
        return None, "Both adapters are zero: no directions to compare."
    return plots.similarity_figure(sim), (
        f"Mean φ over {len(sim['layers'])} shared layers: **{sim['mean_phi_k']:.3f}** for the top {sim['k']} "
        f"directions, **{sim['mean_phi_1']:.3f}** for the top one (chance: {sim['chance_phi_k']:.3f}). 1 means "
        f"r={sim['ranks'][0]} and r={sim['ranks'][1]} found the same directions.")
