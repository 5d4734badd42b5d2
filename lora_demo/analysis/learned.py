"""What a method learned and what it forgot, from a run's stored weights: learning against forgetting,
the scale curve, rank truncation, DoRA's magnitude and direction change, and intruder dimensions.

Every figure here is measured: losses are token-weighted cross-entropies of the model with the run's
update merged in (adapters.merged_into), on fixed held-out batches; the matrix figures are exact
float64 linear algebra on W and ΔW in the Keras kernel layout (in, out).

- **Learning vs forgetting** (the picture of Biderman et al. 2024, "LoRA Learns Less and Forgets
  Less"): the gain on the lesson's held-out slice against the change of the loss on what the base
  already translated (for the captions lesson held-out Europarl), which no run trains on. The base
  model is the origin; the LoRA scale s traces one run's path from it (s = 0 is the base exactly).
- **Rank truncation**: keep the top-k singular directions of each layer's low-rank update, k = 1..r,
  and measure the held-out loss. It shows how much of the rank the run needed, from the weights.
- **Magnitude and direction change** (Liu et al. 2024, DoRA, section 2.2): per output column j of
  W' = W + ΔW, ΔM = mean |‖W'_j‖ - ‖W_j‖| and ΔD = mean (1 - cos(W'_j, W_j)).
- **Intruder dimensions** (Shuttleworth et al. 2024): among the top ``k`` left singular vectors of
  W + ΔW, those whose largest |cosine| with any left singular vector of W is below ``eps``. A random
  update of the same Frobenius norm and the same rank, per layer, is the control: random directions
  also count as intruders under this test.
"""

from __future__ import annotations

import dataclasses
import weakref

import numpy as np
import tensorflow as tf

from lora_demo import data
from lora_demo.adapters import KEY, PREFIX, delta_svd, deltas, merged_into, stored_rank
from lora_demo.core.config import LoraConfig, TrainConfig
from lora_demo.core.inject import base_kernels

INTRUDER_K, INTRUDER_EPS = 10, 0.5


# ---------------------------------------------------------------------------
# The update of each layer, for every method
# ---------------------------------------------------------------------------

def updates(cfg: LoraConfig, state: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ΔW per layer (in, out), float64: the adapter's (DoRA's from its magnitude and W), or for full
    fine-tuning the trained kernel minus W for every projection."""
    if not cfg.adapter:
        return {p: state[f"{p}.weight"].astype(np.float64) - w for p, w in base.items() if f"{p}.weight" in state}
    return {p: d.astype(np.float64) for p, d in deltas(cfg, state, 1.0, base).items()}


def magnitude_direction(w: np.ndarray, delta: np.ndarray) -> tuple[float, float]:
    """(ΔM, ΔD) between W and W + ΔW over output columns (DoRA, section 2.2)."""
    new = w + delta
    nw, nn = np.linalg.norm(w, axis=0), np.linalg.norm(new, axis=0)
    cos = (w * new).sum(axis=0) / np.maximum(nw * nn, 1e-30)
    return float(np.mean(np.abs(nn - nw))), float(np.mean(1.0 - cos))


def numerical_rank(m: np.ndarray, rel: float = 1e-6) -> int:
    sv = np.linalg.svd(m, compute_uv=False)
    return int((sv > rel * sv[0]).sum()) if sv.size and sv[0] > 0 else 0


def intruders(w: np.ndarray, new: np.ndarray, k: int = INTRUDER_K, eps: float = INTRUDER_EPS) -> int:
    """How many of the top-k left singular vectors of ``new`` have no left singular vector of ``w``
    with |cosine| ≥ eps."""
    u0 = np.linalg.svd(w, full_matrices=False)[0]
    u1 = np.linalg.svd(new, full_matrices=False)[0][:, :k]
    return int((np.abs(u1.T @ u0).max(axis=1) < eps).sum())


def random_like(delta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random update with ΔW's Frobenius norm and numerical rank: Gaussian factors of that rank."""
    r = max(numerical_rank(delta), 1)
    rand = rng.standard_normal((delta.shape[0], r)) @ rng.standard_normal((r, delta.shape[1]))
    return rand * (np.linalg.norm(delta) / np.linalg.norm(rand))


def layer_report(cfg: LoraConfig, state: dict, base: dict[str, np.ndarray], seed: int = 0,
                 k: int = INTRUDER_K, eps: float = INTRUDER_EPS) -> dict:
    """Per adapted layer: ‖ΔW‖/‖W‖, ΔM, ΔD, intruder dimensions and the random control's; totals."""
    rng = np.random.default_rng(seed)
    rows = []
    for path, d in sorted(updates(cfg, state, base).items()):
        w = base[path]
        dm, dd = magnitude_direction(w, d)
        rows.append({"layer": path, "relative": float(np.linalg.norm(d) / np.linalg.norm(w)),
                     "magnitude_change": dm, "direction_change": dd,
                     "intruders": intruders(w, w + d, k, eps),
                     "intruders_random": intruders(w, w + random_like(d, rng), k, eps)})
    return {"k": k, "eps": eps, "layers": rows,
            "intruders": sum(r["intruders"] for r in rows),
            "intruders_random": sum(r["intruders_random"] for r in rows),
            "magnitude_change": float(np.mean([r["magnitude_change"] for r in rows])) if rows else None,
            "direction_change": float(np.mean([r["direction_change"] for r in rows])) if rows else None}


# ---------------------------------------------------------------------------
# Rank truncation of a low-rank update
# ---------------------------------------------------------------------------

def truncate(cfg: LoraConfig, state: dict[str, np.ndarray], k: int) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """The adapter with each layer's c·A·B cut to its top-k singular directions (exact SVD through
    thin QRs), as a rank-k adapter with the same scaling c. DoRA keeps its magnitude vector."""
    c = cfg.scaling
    out = {}
    for key, a_t in state.items():
        if not key.endswith(".lora_A.weight"):
            if "magnitude" in key:
                out[key] = state[key]
            continue
        path = KEY.match(key)["path"]
        u, s, vt = delta_svd(cfg, a_t.T, state[f"{PREFIX}{path}.lora_B.weight"].T)
        a_k = u[:, :k] * s[:k] / c                              # (in, k); c·a_k·b_k = top-k part of c·A·B
        b_k = vt[:k]                                            # (k, out)
        out[key] = a_k.T.astype(np.float32)
        out[f"{PREFIX}{path}.lora_B.weight"] = b_k.T.astype(np.float32)
    method = "dora" if cfg.method == "dora" else "lora"
    return dataclasses.replace(cfg, rank=k, alpha=c * k, method=method), out


# ---------------------------------------------------------------------------
# Losses of a run's weights: held-out and the forgetting probe (what the base knew)
# ---------------------------------------------------------------------------

def probe_batches(tokenizer, train: TrainConfig) -> dict[str, list]:
    """The run's held-out slice and what the base already knew (the lesson's second curve: for captions
    held-out Europarl), fixed batches."""
    held = data.heldout_pairs(train.data, train.heldout_size)
    knew = data.pairs_for("validation", train.eval_size, train.data)
    out = {}
    for name, pairs in (("heldout", held), ("forget", knew)):
        arrays = data.encode(tokenizer, pairs, train.max_source_len, train.max_target_len)
        out[name] = arrays
    # one shape for both sets (the eval step is traced once), padded to the longer of each side
    lens = [max(a[k].shape[1] for a in out.values()) for k in ("input_ids", "labels")]
    out = {name: data.pad_to(a, *lens, tokenizer.pad_token_id) for name, a in out.items()}
    out = {name: data.fixed_batches(a, train.batch_size, tokenizer.pad_token_id) for name, a in out.items()}
    return out


_EVALS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def losses(model, batches: dict[str, list]) -> dict[str, float]:
    """Token-weighted losses with the model's weights as they are now. The eval step is traced once per
    model and batch shape and reads the weights as variables, so every scale and every k reuses it."""
    from lora_demo.training.steps import eval_loss, make_eval

    fn = _EVALS.get(model)
    if fn is None:
        fn = _EVALS[model] = tf.function(make_eval(model), autograph=False, reduce_retracing=True)
    return {name: eval_loss(fn, b) for name, b in batches.items()}


def scale_curve(model, cfg: LoraConfig, state: dict, batches: dict, scales=(0.0, 0.25, 0.5, 0.75, 1.0)) -> list[dict]:
    """Held-out and forgetting losses with the update at each scale (0 = the base model exactly)."""
    out = []
    for s in scales:
        with merged_into(model, cfg, state, s) as m:
            out.append({"scale": float(s), **losses(m, batches)})
    return out


def truncation_curve(model, cfg: LoraConfig, state: dict, batches: dict, ks=None) -> list[dict]:
    """Held-out loss of the adapter truncated to k = 1..r directions per layer."""
    r = stored_rank(cfg)
    out = []
    for k in ks or range(1, r + 1):
        cfg_k, state_k = truncate(cfg, state, k)
        with merged_into(model, cfg_k, state_k) as m:
            out.append({"k": k, **losses(m, {"heldout": batches["heldout"]})})
    return out


# ---------------------------------------------------------------------------
# The method comparison's write-up (python -m lora_demo methods)
# ---------------------------------------------------------------------------

def measure(model, cfg: LoraConfig, state: dict, batches: dict, kernels: dict, seed: int,
            truncation: bool = True) -> dict:
    """One run's weights measured: its scale curve, its per-layer report beside a random control, and (with
    ``truncation``) its rank-truncation curve (adapters only). ``model`` is a plain base model, held by the
    caller for the length of the call (the update is merged into it for each point)."""
    out = {"scale_curve": scale_curve(model, cfg, state, batches),
           "layers": layer_report(cfg, state, kernels, seed=seed)}
    if truncation:
        out["truncation"] = truncation_curve(model, cfg, state, batches) if cfg.adapter else []
    return out


def analyse_runs(records: list[dict], jobs: list, loaded, out, log=None) -> dict:
    """For every finished run: the scale curve and the layer report; for the first seed of each
    adapter config also the truncation curve. Writes analysis.json, methods.md and figures.html
    (plotly, self-contained) to ``out``; returns what analysis.json holds."""
    import json
    from pathlib import Path

    from lora_demo.analysis import compare
    from lora_demo.adapters import load_state
    from lora_demo.core.config import RunConfig
    from lora_demo.core.inject import remove_lora
    from lora_demo.core.models import copy_model

    say = log or (lambda m: None)
    remove_lora(loaded.model)
    model = copy_model(loaded.model, "fp32")   # measured in float32 on the loaded weights
    base = base_kernels(model)
    done = [(r, j) for r, j in zip(records, jobs) if r["status"] in ("completed", "stopped") and j.adapter_files]
    batches = probe_batches(loaded.tokenizer, RunConfig.from_dict(done[0][0]["config"]).train) if done else {}
    result: dict = {"runs": {}, "truncation": {}}
    seen = set()
    for rec, job in done:
        cfg = RunConfig.from_dict(rec["config"])
        state = job.adapter if job.adapter is not None else load_state(job.dir)
        say(f"analysing {rec['run_id']} ({cfg.lora.method}, seed {cfg.train.seed})")
        entry = {"method": cfg.lora.method, "seed": cfg.train.seed,
                 **measure(model, cfg.lora, state, batches, base, cfg.train.seed, truncation=False)}
        result["runs"][rec["run_id"]] = entry
        key = compare.config_key(rec)
        if cfg.lora.adapter and key not in seen:
            seen.add(key)
            result["truncation"][rec["run_id"]] = truncation_curve(model, cfg.lora, state, batches)
    out = Path(out)
    (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "methods.md").write_text(methods_markdown(records, result), encoding="utf-8")
    write_figures(records, result, out)
    say(f"wrote analysis.json, methods.md and figures.html to {out}")
    return result


def write_figures(records: list[dict], result: dict, out) -> None:
    """figures.html: learning vs forgetting (with each method's first scale curve), the truncation
    curves and the intruder counts, as plotly figures in one self-contained page."""
    from pathlib import Path

    from lora_demo.present import plots

    labels = {rid: f"{result['runs'][rid]['method']} seed {result['runs'][rid]['seed']}" for rid in result["truncation"]}
    first = {}
    for rid, e in result["runs"].items():
        first.setdefault(e["method"], rid)
    figs = [plots.forgetting_figure(records, {rid: result["runs"][rid]["scale_curve"] for rid in first.values()}),
            plots.truncation_figure(result["truncation"], labels),
            plots.intruder_figure({f"{e['method']} seed {e['seed']}": e["layers"] for e in result["runs"].values()})]
    html = "".join(f.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False)
                   for i, f in enumerate(figs))
    (Path(out) / "figures.html").write_text(f"<!doctype html><meta charset='utf-8'><title>LoRA Lab: methods</title>"
                                            f"<body style='font-family:sans-serif'>{html}</body>", encoding="utf-8")


def _fmt(x, nd=4):
    return "–" if x is None else f"{x:.{nd}f}"


def methods_markdown(records: list[dict], result: dict) -> str:
    """Per method (means over seeds): cost, learning, forgetting, quality and the weight figures; the
    verdicts against LoRA; the truncation curves."""
    import statistics

    from lora_demo.analysis import compare

    gs = compare.groups(records)
    runs = result["runs"]
    lines = ["| method | seeds | trainable | % trainable | s/step | peak RSS MB | held-out Δ (mean, sd) | "
             "de→en Δ (mean) | BLEU | chrF | intruders (random) | ΔM | ΔD |", "|" + "---|" * 13]
    for g in gs:
        recs = [r for r in records if r["run_id"] in g["runs"]]
        an = [runs[r] for r in g["runs"] if r in runs]

        def mean(xs):
            xs = [x for x in xs if x is not None]
            return statistics.fmean(xs) if xs else None
        sd = statistics.stdev(g["delta"]) if len(g["delta"]) > 1 else None
        lines.append("| " + " | ".join([
            g["label"], str(len(g["seeds"])), f"{g['trainable']:,}" if g["trainable"] else "–",
            _fmt(mean([(r.get("params") or {}).get("pct_trainable") for r in recs]), 3),
            _fmt(mean([(r.get("summary") or {}).get("mean_step_s") for r in recs]), 3),
            _fmt(mean([(r.get("memory") or {}).get("peak_rss_mb") for r in recs]), 0),
            f"{_fmt(mean(g['delta']))} ({_fmt(sd)})", _fmt(mean(g["forget"])),
            _fmt(mean(g["bleu"]), 2), _fmt(mean(g["chrf"]), 2),
            f"{_fmt(mean([a['layers']['intruders'] for a in an]), 1)} "
            f"({_fmt(mean([a['layers']['intruders_random'] for a in an]), 1)})",
            _fmt(mean([a["layers"]["magnitude_change"] for a in an])),
            _fmt(mean([a["layers"]["direction_change"] for a in an]), 5)]) + " |")
    ref = next((g for g in gs if g["method"] == "lora"), None)
    if ref is not None:
        lines += ["", "Against plain LoRA (held-out loss, the rule of *Above seed noise?*):", ""]
        lines += [f"- {compare.verdict(g, ref)['text']}" for g in gs if g is not ref]
    if result["truncation"]:
        lines += ["", "Rank truncation (held-out loss keeping the top-k directions per layer; first seed):", ""]
        for rid, curve in result["truncation"].items():
            lines.append(f"- {runs[rid]['method']} ({rid}): " + ", ".join(f"k={p['k']}: {p['heldout']:.4f}"
                                                                           for p in curve))
    return "\n".join(lines) + "\n"
