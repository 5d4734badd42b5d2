"""Pure functions from run records (dicts, as in metrics.json) and breakdowns to plotly figures.

The only module that imports plotly. Nothing here reads files or touches models.
"""

from __future__ import annotations

import math

import plotly.colors as pc
import plotly.graph_objects as go

TRAIN_COLOR, VAL_COLOR, HELDOUT_COLOR = "#2563eb", "#f97316", "#16a34a"
RAW_COLOR = "rgba(37, 99, 235, 0.28)"
DEFAULT_SMOOTHING = 0.9


def plotly_js() -> str:
    """plotly.js itself, for a page that must work offline (report.py inlines it)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def ema(values: list[float], smoothing: float = DEFAULT_SMOOTHING) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points are not
    pulled towards 0. ``smoothing`` 0 returns the values; 0.99 is very smooth."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    out, last, weight = [], 0.0, 0.0
    for v in values:
        last = last * smoothing + (1 - smoothing) * v
        weight = weight * smoothing + (1 - smoothing)
        out.append(last / weight)
    return out
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
                 x: str = "step", total_steps: int | None = None, title: str = "Loss", show_heldout: bool = True,
                 smoothing: float = DEFAULT_SMOOTHING) -> go.Figure:
    """Smoothed train loss (thin lines), held-out loss (thick, circles) and validation loss (dotted,
    diamonds) of several runs, coloured by rank.

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
            ys = [v for _, v, _ in losses]
            fig.add_trace(go.Scatter(x=xs, y=ema(ys, smoothing) if smoothing > 0 else ys, mode="lines",
                                     name=f"{name} train" + (f" (EMA {smoothing:g})" if smoothing > 0 else ""),
                                     legendgroup=rec["run_id"], line=dict(color=color, width=1.5)))
        held = rec.get("heldout_losses") or []
        if show_heldout and held:
            xs = [s for s, _ in held] if x == "step" else [tokens_at.get(s) for s, _ in held]
            fig.add_trace(go.Scatter(x=xs, y=[v for _, v in held], mode="lines+markers", name=f"{name} held-out",
                                     legendgroup=rec["run_id"], line=dict(color=color, width=3),
                                     marker=dict(size=8, symbol="circle")))
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


def heldout_name_of(record: dict) -> str:
    """The held-out slice's name from a run's config (a record or status before its summary exists)."""
    from lora_demo.data import HELDOUT_NAMES

    dataset = ((record.get("config") or {}).get("train") or {}).get("data")
    return HELDOUT_NAMES.get(dataset, "training distribution")


def loss_figure(record: dict | None, total_steps: int | None = None, title: str = "Training loss",
                smoothing: float = DEFAULT_SMOOTHING, height: int = 400) -> go.Figure:
    """The live single-run view. Four curves, each named in the legend: the raw per-batch train loss
    (faint), its EMA, the held-out loss of the training distribution and the loss on what the base already
    knew (the lesson's second curve: a rise is forgetting).
    Held-out and validation points at step 0 are the base model's."""
    fig = go.Figure()
    rec = record or {}
    losses = rec.get("losses") or []
    if losses:
        steps, values = [s for s, _, _ in losses], [v for _, v, _ in losses]
        fig.add_trace(go.Scatter(x=steps, y=values, mode="lines", name="train, each batch",
                                 line=dict(color=RAW_COLOR, width=1)))
        if smoothing > 0:
            fig.add_trace(go.Scatter(x=steps, y=ema(values, smoothing), mode="lines",
                                     name=f"train, smoothed (EMA {smoothing:g})",
                                     line=dict(color=TRAIN_COLOR, width=3)))
    held = rec.get("heldout_losses") or []
    name = rec.get("heldout_name") or (rec.get("summary") or {}).get("heldout_name") or heldout_name_of(rec)
    if held:
        fig.add_trace(go.Scatter(x=[s for s, _ in held], y=[v for _, v in held], mode="lines+markers",
                                 name=f"held-out: {name}<br>(never trained on)",
                                 line=dict(color=HELDOUT_COLOR, width=3), marker=dict(size=9, symbol="circle")))
    vals = rec.get("val_losses") or []
    if vals:
        knew = rec.get("val_name") or _knew_name(rec) or "validation"
        fig.add_trace(go.Scatter(x=[s for s, _ in vals], y=[v for _, v in vals], mode="lines+markers",
                                 name=f"what the base knew:<br>{knew} (forgetting)",
                                 line=dict(color=VAL_COLOR, width=2, dash="dot"), marker=dict(size=8, symbol="diamond")))
    if (held or vals) and height >= 400:   # (the live chart's title says it)
        fig.add_annotation(text="step 0 = base model", x=0, y=1.0, xref="x", yref="paper", showarrow=False,
                           xanchor="left", font=dict(size=11, color="#64748b"))
    for r in rec.get("resumes") or []:   # where a stopped or interrupted run continued from its checkpoint
        fig.add_vline(x=r["from_step"], line=dict(color="#64748b", width=1, dash="dash"))
        fig.add_annotation(text=f"resumed at step {r['from_step']}", x=r["from_step"], y=0.92, xref="x", yref="paper",
                           showarrow=False, xanchor="left", font=dict(size=11, color="#64748b"))
    if total_steps:
        fig.update_xaxes(range=[0, total_steps + 0.5])
    if not fig.data:
        _empty(fig, "Press Train: the curves draw here as steps finish")
    fig = _layout(fig, title, "step", "cross-entropy loss", height=height)
    if height < 400:   # the live chart on the first screen: the legend beside the plot, the margins tight
        fig.update_layout(legend=dict(orientation="v", yanchor="top", y=1.0, xanchor="left", x=1.01, font=dict(size=11)),
                          margin=dict(l=50, r=10, t=36, b=40), title=dict(font=dict(size=13)))
    else:
        fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0.0),
                          margin=dict(b=110))
    return fig


def optim_figure(record: dict | None) -> go.Figure:
    """Learning rate and gradient norm (before clipping) per step, on two axes."""
    fig = go.Figure()
    optim = (record or {}).get("optim") or []
    if optim:
        steps = [s for s, _, _ in optim]
        fig.add_trace(go.Scatter(x=steps, y=[lr for _, lr, _ in optim], mode="lines", name="learning rate",
                                 line=dict(color=TRAIN_COLOR, width=2)))
        norms = [(s, g) for s, _, g in optim if g is not None]
        if norms:
            fig.add_trace(go.Scatter(x=[s for s, _ in norms], y=[g for _, g in norms], mode="lines+markers",
                                     name="gradient norm (before clipping)", yaxis="y2",
                                     line=dict(color=VAL_COLOR, width=1.5), marker=dict(size=3)))
            clip = ((record or {}).get("config") or {}).get("train", {}).get("clip_norm")
            if clip:
                fig.add_trace(go.Scatter(x=[steps[0], steps[-1]], y=[clip, clip], mode="lines", yaxis="y2",
                                         name=f"clip at {clip:g}", line=dict(color="#64748b", dash="dash")))
    else:
        _empty(fig, "Learning rate and gradient norm draw here as steps finish")
    fig = _layout(fig, "Learning rate and gradient norm", "step", "learning rate", height=300)
    fig.update_layout(yaxis2=dict(title="gradient norm", overlaying="y", side="right", rangemode="tozero"),
                      margin=dict(r=70))
    return fig


def seeds_figure(groups: list[dict]) -> go.Figure:
    """Final held-out loss of every seed (dots) and each config's mean (bar) with its min–max range."""
    fig = go.Figure()
    if not groups:
        _empty(fig, "Finished runs show here, one column per config and one dot per seed")
        return _layout(fig, "Held-out loss per config, every seed", "config", "held-out loss")
    labels = [g["label"] for g in groups]
    means = [sum(g["heldout"]) / len(g["heldout"]) for g in groups]
    fig.add_trace(go.Bar(x=labels, y=means, name="mean over seeds", marker_color=[rank_color(g["rank"]) for g in groups],
                         opacity=0.45, error_y=dict(type="data", symmetric=False,
                                                    array=[max(g["heldout"]) - m for g, m in zip(groups, means)],
                                                    arrayminus=[m - min(g["heldout"]) for g, m in zip(groups, means)],
                                                    color="#334155", thickness=1.5, width=8)))
    xs, ys, text = [], [], []
    for g in groups:
        for seed, v in zip(g["seeds"], g["heldout"]):
            xs.append(g["label"])
            ys.append(v)
            text.append(f"seed {seed}")
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="one seed", text=text,
                             marker=dict(size=10, color="#0f172a", symbol="circle-open", line=dict(width=2)),
                             hovertemplate="%{x}<br>%{text}: %{y:.4f}<extra></extra>"))
    lo, hi = min(min(g["heldout"]) for g in groups), max(max(g["heldout"]) for g in groups)
    pad = max((hi - lo) * 0.3, 1e-3)
    fig.update_yaxes(range=[lo - pad, hi + pad])
    return _layout(fig, "Held-out loss at the end, per config: bar = mean, whisker = min–max over seeds, "
                        "dot = one seed", "config", "held-out loss (lower is better)", height=380)


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
    splits = {(r.get("quality") or {}).get("split") for r in scored} - {None}
    return _layout(fig, f"{label} ({', '.join(sorted(splits)) or 'test slice'}) vs trainable parameters",
                   "trainable parameters (log)",
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


# ---------------------------------------------------------------------------
# The LoRA family: learning against forgetting, rank truncation, intruder dimensions
# ---------------------------------------------------------------------------

METHOD_COLORS = {"lora": "#2563eb", "rslora": "#7c3aed", "dora": "#db2777", "pissa": "#ea580c",
                 "loraplus": "#0891b2", "full": "#111827"}


def method_of(rec: dict) -> str:
    return rec["config"]["lora"].get("method", "lora")


def _knew_name(record: dict) -> str | None:
    from lora_demo.data import LESSONS

    lesson = LESSONS.get(((record.get("config") or {}).get("train") or {}).get("data"))
    return lesson.knew_name if lesson else None


def forgetting_figure(records: list[dict], curves: dict[str, list[dict]] | None = None) -> go.Figure:
    """Each finished run as a point: x = what it learned (held-out loss of its lesson, base minus final), y =
    what it forgot (the loss on what the base already translated, its second curve, final minus base). The
    base model is the origin. ``curves`` (run id -> analysis.scale_curve) draws a run's path as its LoRA scale
    goes 0 → 1."""
    fig = go.Figure()
    done = [r for r in records if (r.get("summary") or {}).get("final_val_loss") is not None
            and (r.get("summary") or {}).get("final_heldout_loss") is not None]
    for method in dict.fromkeys(method_of(r) for r in done):
        rs = [r for r in done if method_of(r) == method]
        s = [r["summary"] for r in rs]
        fig.add_trace(go.Scatter(
            x=[x["base_heldout_loss"] - x["final_heldout_loss"] for x in s],
            y=[x["final_val_loss"] - x["base_val_loss"] for x in s], mode="markers", name=method,
            text=[f"{r['run_id']} · seed {r['config']['train']['seed']}" for r in rs],
            marker=dict(size=11, color=METHOD_COLORS.get(method, "#64748b"))))
    for run_id, curve in (curves or {}).items():
        rec = next((r for r in done if r["run_id"] == run_id), None)
        if rec is None or not curve:
            continue
        base = curve[0]
        fig.add_trace(go.Scatter(x=[base["heldout"] - p["heldout"] for p in curve],
                                 y=[p["forget"] - base["forget"] for p in curve], mode="lines+markers",
                                 name=f"{method_of(rec)} scale 0→1", text=[f"scale {p['scale']:g}" for p in curve],
                                 line=dict(dash="dot", color=METHOD_COLORS.get(method_of(rec), "#64748b")),
                                 marker=dict(size=5)))
    fig.add_trace(go.Scatter(x=[0], y=[0], mode="markers+text", name="base model", text=["base"],
                             textposition="bottom right", marker=dict(size=12, symbol="x", color="#64748b")))
    fig.add_hline(y=0, line=dict(color="#cbd5e1"))
    fig.add_vline(x=0, line=dict(color="#cbd5e1"))
    if not done:
        _empty(fig, "finished runs appear here: right = learned more, up = forgot more")
    names = {_knew_name(r) for r in done} - {None}
    _layout(fig, "Learning vs forgetting (base model at the origin)", "learned: held-out loss, base − final",
            "forgot: loss on what the base knew, final − base" + (f"<br>({', '.join(sorted(names))})" if names else ""),
            height=440)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0),
                      margin=dict(l=70, r=20, t=50, b=40))
    return fig


def truncation_figure(curves: dict[str, list[dict]], labels: dict[str, str] | None = None) -> go.Figure:
    """Held-out loss with each layer's update cut to its top-k singular directions, per run."""
    fig = go.Figure()
    for run_id, curve in curves.items():
        label = (labels or {}).get(run_id, run_id)
        fig.add_trace(go.Scatter(x=[p["k"] for p in curve], y=[p["heldout"] for p in curve], mode="lines+markers",
                                 name=label, line=dict(color=METHOD_COLORS.get(label.split()[0], None))))
    if not curves:
        _empty(fig, "pick a run with an adapter and measure its truncation curve")
    return _layout(fig, "Rank truncation: held-out loss keeping the top-k directions per layer",
                   "k (singular directions kept per layer)", "held-out loss")


def intruder_figure(reports: dict[str, dict]) -> go.Figure:
    """Intruder dimensions per run, beside a random update of the same norm and rank (the control)."""
    labels = list(reports)
    fig = go.Figure([
        go.Bar(x=labels, y=[reports[k]["intruders"] for k in labels], name="the run's update",
               marker_color="#db2777"),
        go.Bar(x=labels, y=[reports[k]["intruders_random"] for k in labels], name="random update, same norm and rank",
               marker_color="#cbd5e1")])
    if not labels:
        _empty(fig, "no run measured yet")
    k, eps = (next(iter(reports.values()))["k"], next(iter(reports.values()))["eps"]) if labels else (10, 0.5)
    fig.update_layout(barmode="group")
    return _layout(fig, f"Intruder dimensions (top {k} singular vectors with no match ≥ {eps} in W), all layers",
                   "", "count")
