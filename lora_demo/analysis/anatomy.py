"""What an adapter learned and where: exact figures from a run's A and B. No TensorFlow, no gradio.

For each adapted layer, ΔW = (alpha/r)·A·B in the Keras kernel layout (in, out), computed in float64:

- ‖ΔW‖_F, and ‖ΔW‖_F / ‖W‖_F against the frozen kernel it is added to;
- its singular values. ΔW has rank at most r, so with A = Qa·Ra and Bᵀ = Qb·Rb (thin QR),
  ΔW = (alpha/r)·Qa·(Ra·Rbᵀ)·Qbᵀ, and the singular values of ΔW are exactly those of the r×r matrix
  (alpha/r)·Ra·Rbᵀ. No (in × out) SVD is needed;
- the effective rank: how many singular values hold ``ENERGY`` (90%) of Σσ², i.e. of ‖ΔW‖_F²;
- the subspace similarity φ of Hu et al. (2021, section 7, eq. 4) between two runs' top input-side
  singular directions, φ(i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖_F² / min(i, j), in [0, 1]. The input-side
  directions of ΔW = s·A·B lie in the span of A, which is what the paper compares.
"""

from __future__ import annotations

import numpy as np

from lora_demo.adapters import KEY, PREFIX, delta_svd
from lora_demo.core.config import ConfigError, LoraConfig, parse_layers
from lora_demo.core.inject import MODULE_PATH

ENERGY = 0.90
KIND = {"SelfAttention": "self", "EncDecAttention": "cross", "DenseReluDense": "ffn"}
COLUMNS = ["self q", "self k", "self v", "self o", "cross q", "cross k", "cross v", "cross o",
           "ffn wi", "ffn wi_0", "ffn wi_1", "ffn wo"]


def column(path: str) -> str:
    m = MODULE_PATH.match(path)
    return f"{KIND[m['kind']]} {m['module']}"


def row(path: str) -> str:
    m = MODULE_PATH.match(path)
    return f"{m['side']} {m['block']}"


def factors(state: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """path -> (A (in, r), B (r, out)) in float64, from PEFT-layout tensors (A (r, in), B (out, r))."""
    paths = sorted({KEY.match(k)["path"] for k in state if KEY.match(k)})
    return {p: (state[f"{PREFIX}{p}.lora_A.weight"].T.astype(np.float64),
                state[f"{PREFIX}{p}.lora_B.weight"].T.astype(np.float64)) for p in paths}


def singular_values(cfg: LoraConfig, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The r singular values of ΔW (descending; at most r are non-zero)."""
    return delta_svd(cfg, a, b)[1]


def input_directions(cfg: LoraConfig, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Left singular vectors of ΔW (in × r, columns by descending singular value)."""
    return delta_svd(cfg, a, b)[0]


def effective_rank(sv: np.ndarray, energy: float = ENERGY) -> int:
    """The fewest singular values whose squares hold ``energy`` of the total; 0 for ΔW = 0."""
    power = np.asarray(sv, np.float64) ** 2
    total = power.sum()
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(power) / total, energy - 1e-12) + 1)


def phi(u1: np.ndarray, u2: np.ndarray, i: int, j: int) -> float:
    """Subspace similarity of the top-i columns of u1 and the top-j columns of u2 (orthonormal)."""
    return float(np.linalg.norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j))


def inspect(cfg: LoraConfig, state: dict[str, np.ndarray], base_norms: dict[str, float] | None = None) -> dict:
    """Per-layer figures, the ‖ΔW‖_F heatmap grid (blocks × modules) and a summary. Layers are named
    by their module path under "layer" (not "path": Gradio clients read a "path" key as a file)."""
    layers = []
    for path, (a, b) in factors(state).items():
        sv = singular_values(cfg, a, b)
        fro = float(np.sqrt((sv ** 2).sum()))
        w = (base_norms or {}).get(path)
        layers.append({"layer": path, "row": row(path), "column": column(path), "shape": [a.shape[0], b.shape[1]],
                       "rank": int(a.shape[1]), "fro": fro, "base_fro": w, "relative": fro / w if w else None,
                       "singular_values": [float(x) for x in sv], "effective_rank": effective_rank(sv)})
    rows = sorted({x["row"] for x in layers}, key=lambda r: (r.split()[0] != "encoder", int(r.split()[1])))
    cols = [c for c in COLUMNS if any(x["column"] == c for x in layers)]
    grid = [[None] * len(cols) for _ in rows]
    for x in layers:
        grid[rows.index(x["row"])][cols.index(x["column"])] = x["fro"]
    eff = [x["effective_rank"] for x in layers]
    rel = [x["relative"] for x in layers if x["relative"] is not None]
    return {"rank": cfg.rank, "alpha": cfg.alpha, "energy": ENERGY, "layers": layers,
            "heatmap": {"rows": rows, "columns": cols, "fro": grid},
            "summary": {"layers": len(layers), "mean_effective_rank": float(np.mean(eff)) if eff else None,
                        "max_effective_rank": max(eff) if eff else None,
                        "total_fro": float(np.sqrt(sum(x["fro"] ** 2 for x in layers))),
                        "max_relative": max(rel) if rel else None,
                        "largest": max(layers, key=lambda x: x["fro"])["layer"] if layers else None}}


def similarity(cfg1: LoraConfig, state1: dict, cfg2: LoraConfig, state2: dict) -> dict:
    """φ between two adapters on the layers both adapted: for the top direction (i = j = 1) and
    for the top k = min(r1, r2) directions. None where either ΔW is zero (no directions)."""
    f1, f2 = factors(state1), factors(state2)
    k = min(cfg1.rank, cfg2.rank)
    layers = []
    for path in sorted(set(f1) & set(f2)):
        (u1, s1, _), (u2, s2, _) = delta_svd(cfg1, *f1[path]), delta_svd(cfg2, *f2[path])
        zero = not s1.any() or not s2.any()
        layers.append({"layer": path, "row": row(path), "column": column(path),
                       "phi_1": None if zero else phi(u1, u2, 1, 1),
                       "phi_k": None if zero else phi(u1, u2, k, k)})
    known = [x["phi_k"] for x in layers if x["phi_k"] is not None]
    return {"ranks": [cfg1.rank, cfg2.rank], "k": k, "layers": layers,
            "mean_phi_k": float(np.mean(known)) if known else None,
            "mean_phi_1": float(np.mean([x["phi_1"] for x in layers if x["phi_1"] is not None])) if known else None,
            # two random k-dimensional subspaces of R^d have E[φ] = k/d: the no-shared-structure level
            "chance_phi_k": k / next(iter(f1.values()))[0].shape[0] if f1 else None}


def norms(kernels: dict[str, np.ndarray]) -> dict[str, float]:
    """‖W‖_F of each base kernel (core.inject.base_kernels)."""
    return {path: float(np.linalg.norm(w)) for path, w in kernels.items()}


def keep_spec(sides, blocks, modules) -> dict | None:
    """The part of an adapter left on at translate time, checked; None when all of it is (the default).
    ``sides``: encoder and/or decoder; ``blocks``: a range such as "0-3" or "all"; ``modules``: COLUMNS."""
    sides = list(sides) if sides is not None else ["encoder", "decoder"]
    bad = sorted(set(sides) - {"encoder", "decoder"})
    if bad:
        raise ConfigError(f"stacks to keep must be encoder and/or decoder, got {', '.join(map(str, bad))}")
    layers = parse_layers(blocks)
    if modules is not None:
        unknown = sorted(set(modules) - set(COLUMNS))
        if unknown:
            raise ConfigError(f"unknown module type(s) {', '.join(map(str, unknown))}; they are {', '.join(COLUMNS)}")
    if len(sides) == 2 and layers is None and (modules is None or set(COLUMNS) <= set(modules)):
        return None
    return {"sides": tuple(sides), "blocks": layers, "modules": None if modules is None else tuple(modules)}


def describe_keep(keep: dict) -> str:
    return (f"partly switched off: LoRA kept on {'+'.join(keep['sides']) or 'no stack'}"
            + (f", blocks {keep['blocks'][0]}-{keep['blocks'][1]}" if keep["blocks"] else "")
            + (f", modules {', '.join(keep['modules']) or 'none'}" if keep["modules"] is not None else ""))


def switch_off(state: dict[str, np.ndarray], sides=("encoder", "decoder"), blocks: tuple[int, int] | None = None,
               modules=None) -> dict[str, np.ndarray]:
    """The part of an adapter that stays on: layers in ``sides``, in the block range, of the module
    types in ``modules`` (``column`` names, e.g. "self q", "ffn wo"; None = all). The rest is off, so
    with nothing kept the model is the base model exactly."""
    keep = {}
    for key, value in state.items():
        path = key[len(PREFIX):].rsplit(".lora_", 1)[0]   # lora_A/B.weight, or DoRA's lora_magnitude_vector
        m = MODULE_PATH.match(path)
        if m["side"] not in sides:
            continue
        if blocks is not None and not blocks[0] <= int(m["block"]) <= blocks[1]:
            continue
        if modules is not None and column(path) not in modules:
            continue
        keep[key] = value
    return keep
