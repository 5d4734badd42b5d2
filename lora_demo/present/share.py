"""A setup as a link and as a command line, as TensorFlow Playground keeps its controls in the URL.

The page's controls are named values (``NAMES``: the URL's keys). ``to_query`` writes them into a query
string, ``from_query`` reads one back, checking each value against the control's own limits (a bad one is
left out with a notice, never half applied), ``hidden`` reads the instructor's ``hide=`` list, and
``cli_lines`` gives the ``python -m lora_demo`` commands that run the same setup from a terminal.
The kinds and the run's config <-> controls mapping (``settings.values_of``) come from the settings table.
No gradio here.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode

from lora_demo.core.config import DEFAULT_SAMPLES, METHODS
from lora_demo.core.settings import KINDS, cli_flags, config_of, fmt

# URL key -> the kind of value, from the settings table. "blocks" is first-last; "seeds" is how many seeds
# the Train button repeats with; "ranks" and "methods" are the lists of the Sweep and Compare buttons.
NAMES = tuple(KINDS)


@dataclass(frozen=True)
class Limit:
    """What a control accepts: a number range (and step), or a list of choices."""

    lo: float | None = None
    hi: float | None = None
    step: float | None = None
    choices: tuple = ()



def to_query(values: dict) -> str:
    """The controls as a query string, in ``NAMES`` order ("blocks" takes (first, last))."""
    out = []
    for name in NAMES:
        if name not in values or values[name] is None:
            continue
        v = values[name]
        out.append((name, f"{int(v[0])}-{int(v[1])}" if name == "blocks" else fmt(v)))
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


def cli_lines(v: dict, model: str, precision: str, source: str, depth: int,
              samples: tuple[str, ...] = DEFAULT_SAMPLES, out: str = "runs-cli") -> dict[str, str]:
    """The commands that run the page's Train, Sweep ranks and Compare methods with these controls
    (``v`` under URL keys, as ``from_query`` gives it). The flags come from the settings table, so each
    line gives the config the page's button makes; the same seed gives the same losses."""
    config = config_of(v, model, depth, samples=tuple(samples))
    common = ["--model", model, "--precision", precision, *cli_flags(config, skip=_OWN)]
    if source != "auto":
        common += ["--data", source]
    seed, n = config.train.seed, int(v.get("seeds") or 1)
    seeds = ",".join(str(seed + i) for i in range(n))
    rank = str(config.lora.rank)
    method = ["--method", config.lora.method]
    own_lr = ["--method-lr", ""]   # a sweep at the page's learning rate, whatever the method
    train = (["train", *method, "--rank", rank, "--seed", str(seed), *common, "--out", f"{out}/run"] if n == 1 else
             ["sweep", *method, *own_lr, "--ranks", rank, "--seeds", seeds, *common, "--out", f"{out}/seeds"])
    sweep = ["sweep", *method, *own_lr, "--ranks", str(v.get("ranks") or rank).replace(" ", ""), "--seeds", seeds,
             *common, "--out", f"{out}/sweep"]
    listed = str(v.get("methods") or ",".join(METHODS)).replace(" ", "")
    methods = ["sweep", "--methods", listed, "--ranks", rank, "--seeds", seeds, *common, "--out", f"{out}/methods"]
    return {name: shlex.join(["python", "-m", "lora_demo", *args])
            for name, args in (("train", train), ("sweep", sweep), ("methods", methods))}


_OWN = ("lora.method", "lora.rank", "train.seed")   # placed first, or as lists in a sweep
