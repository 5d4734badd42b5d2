"""Pure functions from events / breakdowns to plotly figures. The only module that imports plotly."""

from __future__ import annotations

import plotly.graph_objects as go

TRAIN_COLOR, VAL_COLOR = "#2563eb", "#f97316"
FROZEN_COLOR, TRAINABLE_COLOR = "#cbd5e1", "#16a34a"


def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.02, font=dict(size=15)), xaxis_title=x, yaxis_title=y,
                      template="plotly_white", height=340, margin=dict(l=60, r=20, t=50, b=50),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    return fig


def loss_figure(train: list[tuple[int, float]], val: list[tuple[int, float]] | None = None,
                total_steps: int | None = None, title: str = "Training loss") -> go.Figure:
    """Train loss per step, validation loss as markers; the x-axis spans the whole run from the start."""
    fig = go.Figure()
    if train:
        fig.add_trace(go.Scatter(x=[s for s, _ in train], y=[v for _, v in train], mode="lines+markers",
                                 name="train loss", line=dict(color=TRAIN_COLOR, width=2), marker=dict(size=4)))
    if val:
        fig.add_trace(go.Scatter(x=[s for s, _ in val], y=[v for _, v in val], mode="lines+markers",
                                 name="validation loss", line=dict(color=VAL_COLOR, width=2, dash="dot"),
                                 marker=dict(size=8, symbol="diamond")))
    if total_steps:
        fig.update_xaxes(range=[0, total_steps + 0.5])
    if not train:
        fig.add_annotation(text="Press Train: the curve draws here as steps finish", showarrow=False,
                           x=0.5, y=0.5, xref="paper", yref="paper", font=dict(color="#64748b", size=14))
    return _layout(fig, title, "step", "cross-entropy loss")


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
    fig.update_layout(barmode="stack", yaxis=dict(autorange="reversed"), height=300)
    fig.update_xaxes(type="log")
    fig = _layout(fig, "Parameters by component (log scale)", "parameters", "")
    fig.update_layout(height=300, margin=dict(l=150))
    return fig
