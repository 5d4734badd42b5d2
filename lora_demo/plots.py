"""Pure functions from run records (dicts, as in metrics.json) and breakdowns to plotly figures.

The only module that imports plotly. Nothing here reads files or touches models.
"""

from __future__ import annotations

import math

import plotly.colors as pc
import plotly.graph_objects as go

TRAIN_COLOR, VAL_COLOR = "#2563eb", "#f97316"
FROZEN_COLOR, TRAINABLE_COLOR = "#cbd5e1", "#16a34a"
RANK_SCALE = "Plasma"


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 340) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.02, font=dict(size=15)), xaxis_title=x, yaxis_title=y,
                      template="plotly_white", height=height, margin=dict(l=60, r=20, t=50, b=50),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    return fig


def _empty(fig: go.Figure, text: str) -> None:
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(color="#64748b", size=14))


def rank_color(rank: int, max_rank: int = 64) -> str:
    """Colour by log2(rank) on one scale, so r=1 and r=64 are the two ends in every chart."""
    t = math.log2(max(rank, 1)) / math.log2(max_rank)
    return pc.sample_colorscale(RANK_SCALE, [min(max(t, 0.0), 1.0) * 0.9])[0]


def _label(rec: dict) -> str:
    lora = rec["config"]["lora"]
    return f"r={lora['rank']} {'+'.join(lora['targets'])} · {rec['run_id'][-6:]}"


def loss_overlay(records: list[dict], show_train: bool = True, show_val: bool = True, log_y: bool = False,
                 x: str = "step", total_steps: int | None = None, title: str = "Loss") -> go.Figure:
    """Train loss per step (lines) and validation loss (dotted, diamonds) of several runs, coloured by rank.

    ``x`` is "step" or "tokens" (real training tokens seen so far). Validation points are placed at
    the token count of their step; the base model's point (step 0) sits at 0.
    """
    fig = go.Figure()
    for rec in records:
        color, name = rank_color(rec["config"]["lora"]["rank"]), _label(rec)
        losses = rec.get("losses") or []
        tokens_at = {0: 0, **{s: t for s, _, t in losses}}
        if show_train and losses:
            xs = [s for s, _, _ in losses] if x == "step" else [t for _, _, t in losses]
            fig.add_trace(go.Scatter(x=xs, y=[v for _, v, _ in losses], mode="lines+markers", name=f"{name} train",
                                     legendgroup=rec["run_id"], line=dict(color=color, width=2),
                                     marker=dict(size=3)))
        vals = rec.get("val_losses") or []
        if show_val and vals:
            xs = [s for s, _ in vals] if x == "step" else [tokens_at.get(s) for s, _ in vals]
            fig.add_trace(go.Scatter(x=xs, y=[v for _, v in vals], mode="lines+markers", name=f"{name} val",
                                     legendgroup=rec["run_id"], line=dict(color=color, width=2, dash="dot"),
                                     marker=dict(size=8, symbol="diamond")))
    if total_steps and x == "step":
        fig.update_xaxes(range=[0, total_steps + 0.5])
    if log_y:
        fig.update_yaxes(type="log")
    if not fig.data:
        _empty(fig, "Press Train: the curve draws here as steps finish" if not records else "nothing to show")
    fig = _layout(fig, title, "step" if x == "step" else "training tokens", "cross-entropy loss")
    if len(records) > 1:  # many entries: the legend goes under the chart, clear of the title
        fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.22, xanchor="left", x=0.0),
                          height=420, margin=dict(b=110))
    return fig


def loss_figure(record: dict | None, total_steps: int | None = None, title: str = "Training loss") -> go.Figure:
    """The live single-run view: the same chart with one run, train in blue and validation in orange."""
    fig = loss_overlay([record] if record else [], total_steps=total_steps, title=title)
    for trace in fig.data:
        trace.line.color = VAL_COLOR if trace.name.endswith(" val") else TRAIN_COLOR
        trace.name = "validation loss (step 0 = base model)" if trace.name.endswith(" val") else "train loss"
    return fig


def quality_figure(records: list[dict], metric: str = "bleu") -> go.Figure:
    """LoRA BLEU or chrF against trainable parameters, with each run's base score as a hollow marker."""
    label = {"bleu": "BLEU", "chrf": "chrF"}[metric]
    fig = go.Figure()
    scored = [r for r in records if (r.get("quality") or {}).get("lora")]
    for rec in scored:
        q, n = rec["quality"], (rec.get("params") or {}).get("trainable")
        color = rank_color(rec["config"]["lora"]["rank"])
        fig.add_trace(go.Scatter(x=[n], y=[q["lora"][metric]], mode="markers+text", name=_label(rec),
                                 text=[f"r={rec['config']['lora']['rank']}"], textposition="top center",
                                 marker=dict(size=12, color=color)))
    bases = {(r["quality"]["n"], round(r["quality"]["base"][metric], 4)) for r in scored}
    for n, value in sorted(bases):
        fig.add_hline(y=value, line=dict(color="#64748b", dash="dash"),
                      annotation_text=f"base model, {n} sentences: {value:.2f}", annotation_position="bottom right")
    fig.update_xaxes(type="log")
    if not scored:
        _empty(fig, f"{label} appears here when a completed run has been scored")
    fig.update_layout(showlegend=False)
    return _layout(fig, f"{label} (newstest2016 slice) vs trainable parameters", "trainable parameters (log)",
                   label)


def params_figure(rows: list[list]) -> go.Figure:
    """Per-component bars (log scale, since LoRA is thousands of times smaller than the embeddings)."""
    names = [r[0] for r in rows if r[1] > 0]
    frozen = [r[1] - r[2] for r in rows if r[1] > 0]
    trainable = [r[2] for r in rows if r[1] > 0]
    fig = go.Figure([
        go.Bar(y=names, x=[f or None for f in frozen], orientation="h", name="frozen", marker_color=FROZEN_COLOR),
        go.Bar(y=names, x=[t or None for t in trainable], orientation="h", name="trainable",
               marker_color=TRAINABLE_COLOR),
    ])
    fig.update_layout(barmode="stack", yaxis=dict(autorange="reversed"))
    fig.update_xaxes(type="log")
    fig = _layout(fig, "Parameters by component (log scale)", "parameters", "", height=300)
    fig.update_layout(margin=dict(l=150))
    return fig


# ---------------------------------------------------------------------------
# Inside the adapter (data from anatomy.inspect / anatomy.similarity)
# ---------------------------------------------------------------------------

def delta_heatmap(info: dict | None) -> go.Figure:
    """‖ΔW‖_F per adapted layer, blocks × modules: where the model changed."""
    fig = go.Figure()
    if not info or not info["layers"]:
        _empty(fig, "Pick a run with an adapter: its ‖ΔW‖ per layer shows here")
        return _layout(fig, "Where the model changed: ‖ΔW‖_F per layer", "", "")
    h = info["heatmap"]
    text = [[("" if v is None else f"{v:.3g}") for v in row] for row in h["fro"]]
    fig.add_trace(go.Heatmap(z=h["fro"], x=h["columns"], y=h["rows"], colorscale="Viridis", text=text,
                             texttemplate="%{text}", hoverongaps=False, colorbar=dict(title="‖ΔW‖_F"),
                             hovertemplate="%{y} · %{x}<br>‖ΔW‖_F = %{z:.4g}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, f"Where the model changed: ‖ΔW‖_F per layer (r={info['rank']})", "module", "block",
                   height=max(300, 60 + 28 * len(h["rows"])))


def spectra_figure(info: dict | None, top: int = 8) -> go.Figure:
    """Singular values of ΔW for the ``top`` layers with the largest update, and their effective rank."""
    fig = go.Figure()
    if not info or not info["layers"]:
        _empty(fig, "Singular values of each layer's ΔW show here")
        return _layout(fig, "Singular values of ΔW", "index", "σ")
    layers = sorted(info["layers"], key=lambda x: -x["fro"])[:top]
    for x in layers:
        sv = x["singular_values"]
        fig.add_trace(go.Scatter(x=list(range(1, len(sv) + 1)), y=sv, mode="lines+markers",
                                 name=f"{x['row']} {x['column']} (eff. rank {x['effective_rank']})"))
    fig.update_yaxes(type="log")
    fig = _layout(fig, f"Singular values of ΔW, {len(layers)} largest layers (r={info['rank']}; effective rank "
                       f"= σ's holding {100 * info['energy']:.0f}% of ‖ΔW‖²)", "singular value index", "σ (log)",
                  height=380)
    fig.update_layout(legend=dict(orientation="v", yanchor="top", y=1.0, xanchor="left", x=1.02),
                      margin=dict(r=260))
    return fig


def similarity_figure(sim: dict | None) -> go.Figure:
    """φ per layer between two runs' top input directions (paper: Hu et al. 2021, section 7)."""
    fig = go.Figure()
    if not sim or not sim["layers"]:
        _empty(fig, "Pick two runs that adapt the same layers to compare their subspaces")
        return _layout(fig, "Subspace similarity φ between two runs", "layer", "φ")
    names = [f"{x['row']} {x['column']}" for x in sim["layers"]]
    fig.add_trace(go.Bar(x=names, y=[x["phi_k"] for x in sim["layers"]], name=f"φ, top {sim['k']} directions",
                         marker_color=TRAIN_COLOR))
    fig.add_trace(go.Bar(x=names, y=[x["phi_1"] for x in sim["layers"]], name="φ, top direction",
                         marker_color=VAL_COLOR))
    if sim["chance_phi_k"] is not None:
        fig.add_hline(y=sim["chance_phi_k"], line=dict(color="#64748b", dash="dash"),
                      annotation_text=f"chance level for {sim['k']} random directions",
                      annotation_position="top left")
    fig.update_yaxes(range=[0, 1.05])
    return _layout(fig, f"Subspace similarity φ, r={sim['ranks'][0]} vs r={sim['ranks'][1]} (1 = same directions)",
                   "layer", "φ", height=360)
