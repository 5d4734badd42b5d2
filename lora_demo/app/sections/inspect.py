"""Section 6: inside the adapter. Where ΔW is large, how much of the rank was used, how large the update
is next to W, whether two ranks learned the same directions (φ), and the predicted vs measured budget."""

from __future__ import annotations

import html
from functools import partial

import gradio as gr

from ... import plots
from ...config import ConfigError
from ...runs import Lab
from ..common import PRIVATE, Shared

INTRO = ("### 6 · Inside the adapter: what it learned, where, and what it cost\n"
         "For each adapted layer, the update ΔW = (alpha/r)·A·B, computed exactly. The heatmap shows "
         "‖ΔW‖_F per block and module: *where* the model changed. The spectra show how much of the "
         "rank you paid for was used (effective rank: singular values holding 90% of ‖ΔW‖²). φ compares "
         "two runs' top directions per layer (Hu et al. 2021, section 7): does r=8 learn what r=64 "
         "learns?")


def build(lab: Lab, shared: Shared) -> dict:
    gr.Markdown(INTRO)
    with gr.Row():
        pick = gr.Dropdown([], label="run", allow_custom_value=False, elem_id="inspect-pick")
        compare_pick = gr.Dropdown([], label="compare with (another rank)", allow_custom_value=False)
        inspect_btn = gr.Button("Inspect", variant="primary", elem_id="inspect-btn")
    summary = gr.Markdown(elem_id="inspect-summary")
    with gr.Row(equal_height=False):
        heatmap = gr.Plot(show_label=False, elem_id="delta-heatmap")
        spectra = gr.Plot(show_label=False, elem_id="spectra")
    layers = gr.Dataframe(headers=["layer", "‖ΔW‖_F", "‖ΔW‖ / ‖W‖", "effective rank / r"],
                          interactive=False, max_height=260, column_widths=["52%", "16%", "16%", "16%"])
    sim_md = gr.Markdown()
    sim_plot = gr.Plot(show_label=False, elem_id="similarity")
    outputs = [heatmap, spectra, layers, summary, sim_plot, sim_md]
    for trigger in (inspect_btn.click, pick.input, compare_pick.input):
        trigger(partial(ui_inspect, lab), [pick, compare_pick, shared.session], outputs, **PRIVATE)
    return dict(pick=pick, compare_pick=compare_pick)


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
    return (plots.delta_heatmap(None), plots.spectra_figure(None), [], message, plots.similarity_figure(None), "")


def ui_inspect(lab: Lab, run_a, run_b, session):
    """Heatmap, spectra, per-layer table and budget of run A; φ between A and B."""
    session = session or ""
    if not run_a:
        return _empty("Train a run (or import an adapter) and pick it here.")
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
    return (plots.delta_heatmap(info), plots.spectra_figure(info), _layer_rows(info), text, sim_fig, sim_text)


def _similarity(lab: Lab, run_a, run_b, session) -> tuple:
    if not run_b or run_b == run_a:
        return plots.similarity_figure(None), "Pick a second run to compare subspaces."
    try:
        sim = lab.similarity(run_a, run_b, session)
    except ConfigError as exc:
        return plots.similarity_figure(None), f"⚠️ {html.escape(str(exc))}"
    if sim["mean_phi_k"] is None:
        return plots.similarity_figure(sim), "Both adapters are zero: no directions to compare."
    return plots.similarity_figure(sim), (
        f"Mean φ over {len(sim['layers'])} shared layers: **{sim['mean_phi_k']:.3f}** for the top {sim['k']} "
        f"directions, **{sim['mean_phi_1']:.3f}** for the top one (chance: {sim['chance_phi_k']:.3f}). 1 means "
        f"r={sim['ranks'][0]} and r={sim['ranks'][1]} found the same directions.")
