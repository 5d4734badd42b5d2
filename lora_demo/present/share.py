"""A setup as a link and as a command line, as TensorFlow Playground keeps its controls in the URL.

The page's controls are named values (``NAMES``: the URL's keys). ``to_query`` writes them into a query
string, ``from_query`` reads one back, checking each value against the control's own limits (a bad one is
left out with a notice, never half applied), ``hidden`` reads the instructor's ``hide=`` list, and
``cli_lines`` gives the ``python -m lora_demo`` commands that run the same setup from a terminal.
``values_of`` turns a run's config back into the controls (duplicate a run). No gradio here.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode

from lora_demo.core.config import DEFAULT_SAMPLES, METHODS, LoraConfig, RunConfig

# URL key -> the kind of value. "blocks" is first-last; "seeds" is how many seeds the Train button repeats
# with; "ranks" and "methods" are the lists of the Sweep ranks and Compare methods buttons.
KINDS = {"method": "choice", "ratio": "float", "rank": "int", "alpha": "float", "targets": "list", "stacks": "choice",
         "blocks": "range", "steps": "int", "batch": "int", "lr": "float", "pairs": "int", "optimizer": "choice",
         "seed": "int", "seeds": "int", "data": "choice", "bleu": "int", "eval": "int", "patience": "int",
         "ckpt": "int", "ranks": "text", "methods": "text"}
NAMES = tuple(KINDS)


@dataclass(frozen=True)
class Limit:
    """What a control accepts: a number range (and step), or a list of choices."""

    lo: float | None = None
    hi: float | None = None
    step: float | None = None
    choices: tuple = ()


def _fmt(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) >= 1 else f"{value:g}"
    return str(value)


def to_query(values: dict) -> str:
    """The controls as a query string, in ``NAMES`` order ("blocks" takes (first, last))."""
    out = []
    for name in NAMES:
        if name not in values or values[name] is None:
            continue
        v = values[name]
        out.append((name, f"{int(v[0])}-{int(v[1])}" if name == "blocks" else _fmt(v)))
    return urlencode(out, safe=",")


def _check_number(name: str, raw: str, kind: str, lim: Limit):
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if kind == "int":
        if not value.is_integer():
            raise ValueError(f"{name}={raw!r} is not a whole number")
        value = int(value)
    if value != value or abs(value) == float("inf"):
        raise ValueError(f"{name}={raw!r} is not a finite number")
    if (lim.lo is not None and value < lim.lo) or (lim.hi is not None and value > lim.hi):
        raise ValueError(f"{name}={raw!r} is outside {'' if lim.lo is None else f'{lim.lo:g}'}–"
                         f"{'' if lim.hi is None else f'{lim.hi:g}'}")
    if lim.step and kind == "int" and (value - (lim.lo or 0)) % lim.step:
        raise ValueError(f"{name}={raw!r} is not a multiple of {lim.step:g}")
    return value


def _check(name: str, raw: str, lim: Limit):
    kind = KINDS[name]
    if kind in ("int", "float"):
        return _check_number(name, raw, kind, lim)
    if kind == "choice":
        if lim.choices and raw not in lim.choices:
            raise ValueError(f"{name}={raw!r} is not one of {', '.join(map(str, lim.choices))}")
        return raw
    if kind == "list":
        items = [p for p in raw.split(",") if p]
        bad = [p for p in items if lim.choices and p not in lim.choices]
        if not items or bad:
            raise ValueError(f"{name}={raw!r}: choose from {', '.join(map(str, lim.choices))}")
        return [c for c in lim.choices if c in items] if lim.choices else items
    if kind == "range":
        first, sep, last = raw.partition("-")
        pair = (_check_number(name, first, "int", lim), _check_number(name, last or first, "int", lim))
        if pair[0] > pair[1]:
            raise ValueError(f"{name}={raw!r}: the first block comes after the last")
        return pair
    return raw[:500]   # free text (the sweep lists): checked when its button is pressed


def from_query(query: str | dict, limits: dict[str, Limit]) -> tuple[dict, list[str]]:
    """(values, notices) from a query string (or a parsed one). Unknown keys and values outside a
    control's limits are left out, each with a notice; ``hide`` is read by ``hidden``."""
    params = parse_qs(query.lstrip("?"), keep_blank_values=True) if isinstance(query, str) else \
        {k: v if isinstance(v, list) else [v] for k, v in query.items()}
    values, notices = {}, []
    for name, raws in params.items():
        if name == "hide":
            continue
        if name not in KINDS:
            notices.append(f"unknown setting {name!r} ignored (settings: {', '.join(NAMES)})")
            continue
        try:
            values[name] = _check(name, raws[-1].strip(), limits.get(name, Limit()))
        except ValueError as exc:
            notices.append(f"{exc}; kept the default")
    return values, notices


def hidden(query: str | dict) -> tuple[set[str], list[str]]:
    """The controls an instructor's link hides: ``hide=optimizer,seed`` (any of ``NAMES``)."""
    params = parse_qs(query.lstrip("?")) if isinstance(query, str) else query
    raw = params.get("hide", [""])
    names = {p.strip() for p in (raw[-1] if isinstance(raw, list) else raw).split(",") if p.strip()}
    unknown = sorted(names - set(KINDS))
    return names & set(KINDS), ([f"hide: unknown control(s) {', '.join(unknown)} (controls: {', '.join(NAMES)})"]
                                if unknown else [])


def values_of(config: RunConfig, depth: int) -> dict:
    """A run's config as the controls' values (the Train button would make the same config)."""
    lo, tr = config.lora, config.train
    first, last = lo.layers if lo.layers else (0, depth - 1)
    return {"method": lo.method, "ratio": lo.loraplus_ratio, "rank": lo.rank, "alpha": lo.alpha,
            "targets": list(lo.targets), "stacks": lo.side, "blocks": (first, last), "steps": tr.steps,
            "batch": tr.batch_size, "lr": tr.lr, "pairs": tr.train_size, "optimizer": tr.optimizer, "seed": tr.seed,
            "seeds": 1, "data": tr.data, "bleu": tr.bleu_size, "eval": tr.eval_every, "patience": tr.early_stop,
            "ckpt": tr.checkpoint_every}


def cli_lines(v: dict, model: str, precision: str, source: str = "auto", depth: int | None = None,
              samples: tuple[str, ...] = DEFAULT_SAMPLES, out: str = "runs-cli") -> dict[str, str]:
    """The commands that run the page's Train, Sweep ranks and Compare methods with these controls
    (``v`` as ``from_query`` gives it, every name present). The same seed gives the same losses."""
    first, last = (int(x) for x in v["blocks"])
    layers = "all" if depth is not None and (first, last) == (0, depth - 1) else f"{first}-{last}"
    common = ["--model", model, "--precision", precision, "--alpha", _fmt(float(v["alpha"])),
              "--targets", ",".join(v["targets"]), "--side", v["stacks"], "--layers", layers,
              "--steps", str(int(v["steps"])), "--batch-size", str(int(v["batch"])), "--lr", _fmt(float(v["lr"])),
              "--train-size", str(int(v["pairs"])), "--optimizer", v["optimizer"], "--dataset", v["data"],
              "--eval-every", str(int(v["eval"])), "--early-stop", str(int(v["patience"])),
              "--bleu-size", str(int(v["bleu"])), "--checkpoint-every", str(int(v["ckpt"]))]
    if source != "auto":
        common += ["--data", source]
    if tuple(samples) != tuple(DEFAULT_SAMPLES):
        common += ["--samples", "|".join(samples)]
    seed, n = int(v["seed"]), int(v["seeds"])
    seeds = ",".join(str(seed + i) for i in range(n))
    rank = str(int(v["rank"]))
    if float(v["ratio"]) != LoraConfig().loraplus_ratio:   # (the config keeps it whatever the method)
        common += ["--loraplus-ratio", _fmt(float(v["ratio"]))]
    method = ["--method", v["method"]]
    own_lr = ["--method-lr", ""]   # a sweep at the page's learning rate, whatever the method
    train = (["train", *method, "--rank", rank, "--seed", str(seed), *common, "--out", f"{out}/run"] if n == 1 else
             ["sweep", *method, *own_lr, "--ranks", rank, "--seeds", seeds, *common, "--out", f"{out}/seeds"])
    sweep = ["sweep", *method, *own_lr, "--ranks", str(v.get("ranks") or rank).replace(" ", ""), "--seeds", seeds, *common,
             "--out", f"{out}/sweep"]
    listed = str(v.get("methods") or ",".join(METHODS)).replace(" ", "")
    methods = ["sweep", "--methods", listed, "--ranks", rank, "--seeds", seeds, *common, "--out", f"{out}/methods"]
    return {name: shlex.join(["python", "-m", "lora_demo", *args])
            for name, args in (("train", train), ("sweep", sweep), ("methods", methods))}
