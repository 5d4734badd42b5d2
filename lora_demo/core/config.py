"""Frozen, validated configs. Every check here says what to change.

Validation lives here, not in UI widgets, because the Gradio API and the CLI
skip the widgets' own limits. Deployment limits come from environment
variables so a public Space can tighten them without code changes.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace

from lora_demo.data import DEFAULT_LESSON, LESSONS, TRAIN_PAIRS

MODULES = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")
SIDES = ("both", "encoder", "decoder")
OPTIMIZERS = ("adamw", "radam", "lamb", "lookahead_adamw")
# Run kinds. The adapters (lora.py) differ in scaling, initialisation or parametrisation; LoRA+ only in
# its optimiser (B learns loraplus_ratio times faster than A); "full" trains every weight, no adapter.
METHODS = ("lora", "rslora", "dora", "pissa", "loraplus", "full")
# Learning rates the method comparison uses instead of the default (``python -m lora_demo methods``),
# the best held-out loss of a grid on seed 0 on the bundled tiny model at the default budget
# (docs/lora.md): LoRA+ moves B 16x faster and full fine-tuning moves every weight, and at LoRA's
# 1e-3 both overshoot (held-out loss +0.18 and +0.50).
METHOD_LR = {"loraplus": 3e-5, "full": 3e-5}
METHOD_LABELS = {
    "lora": "LoRA (Hu et al. 2021): ΔW = (alpha/r)·A·B, B starts at 0",
    "rslora": "rsLoRA (Kalajdzievski 2023): scaled by alpha/√r instead of alpha/r",
    "dora": "DoRA (Liu et al. 2024): a learned magnitude per output column over the direction of W + ΔW",
    "pissa": "PiSSA (Meng et al. 2024): A and B start from the top-r singular vectors of W; W keeps the rest",
    "loraplus": "LoRA+ (Hayou et al. 2024): B's learning rate is ratio × A's",
    "full": "full fine-tuning: every weight trains, no adapter",
}
# Training data (data.py): pairs available for training in each, after the held-out slices.
DATASETS = TRAIN_PAIRS
# Sentences translated at every evaluation point of a run, base model first: held-out captions (Multi30k
# validation, after the held-out curve's slice), chosen by measurement (scripts/pick_samples.py over the default
# run's seeds 0-2 on the tiny of 2026-12-07, docs/default-run.md): of 376 short candidates, the three whose chrF
# against the reference rose most on every seed.
DEFAULT_SAMPLES = ("Three dogs playing in the snow.",
                   "Three dogs are playing in the water.",
                   "Several girls are playing with flour.")
MAX_SAMPLES, MAX_SAMPLE_CHARS = 5, 200


class ConfigError(ValueError):
    """A setting is out of range; the message says which and what is allowed."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={raw!r} must be a whole number") from exc
    if value < 1:
        raise ConfigError(f"environment variable {name}={raw!r} must be at least 1")
    return value


@dataclass(frozen=True)
class Limits:
    """Deployment limits (env var, default). Read once per call to ``limits()``."""

    max_rank: int = 256          # LORA_LAB_MAX_RANK: r beyond this is not a *low*-rank experiment
    max_steps: int = 2000        # LORA_LAB_MAX_STEPS
    max_batch_size: int = 64     # LORA_LAB_MAX_BATCH_SIZE
    max_train_size: int = max(DATASETS.values())  # LORA_LAB_MAX_TRAIN_SIZE: the most any dataset offers
    max_text_chars: int = 2000   # LORA_LAB_MAX_TEXT_CHARS: longer translate input is cut, with a notice
    max_lines: int = 32          # LORA_LAB_MAX_LINES: sentences per translate request
    max_upload_mb: int = 64      # LORA_LAB_MAX_UPLOAD_MB: an uploaded adapter (zip or files), unpacked size
    max_runs_per_session: int = 50  # LORA_LAB_MAX_RUNS_PER_SESSION: runs (incl. imports) one browser keeps
    max_queued_per_session: int = 20  # LORA_LAB_MAX_QUEUED_PER_SESSION: runs one browser may have queued or
                                      # running at once (a methods comparison is 18); 6 suits a shared Space
    max_queue: int = 64          # LORA_LAB_MAX_QUEUE: requests waiting in Gradio's queue (more are refused)
    train_slots: int = 1         # LORA_LAB_TRAIN_SLOTS: training jobs at once (each holds a model copy)
    max_checkpoint_mb: int = 1024   # LORA_LAB_MAX_CHECKPOINT_MB: checkpoints one session keeps on disk (the
                                    # oldest are pruned, with a notice); a tiny LoRA checkpoint is ~1 MB,
                                    # full fine-tuning of flan-t5-small ~0.9 GB (weights and Adam moments)


def limits() -> Limits:
    return Limits(**{f.name: _env_int(f"LORA_LAB_{f.name.upper()}", f.default) for f in fields(Limits)})


def _whole(name: str, value, lo: int, hi: int) -> int:
    """Accept ints and integral floats (sliders send 8.0); reject bools, 2.5, NaN, strings."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _real(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        bound = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
        raise ConfigError(f"{name} must be {bound} and at most {hi:g}, got {value:g}")
    return float(value)


def parse_targets(targets) -> tuple[str, ...]:
    """'q,v' or ['q', 'v'] -> ('q', 'v'), in canonical order, checked against MODULES."""
    if isinstance(targets, str):
        targets = [t for t in targets.replace(" ", ",").split(",") if t]
    names = [str(t).strip() for t in (targets or [])]
    if not names:
        raise ConfigError(f"choose at least one target module from {', '.join(MODULES)}")
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        raise ConfigError(f"unknown target module(s) {', '.join(unknown)}; T5 modules are {', '.join(MODULES)}")
    return tuple(m for m in MODULES if m in names)


def parse_layers(layers) -> tuple[int, int] | None:
    """'0-7', '3', (0, 7) or None (all blocks) -> inclusive (first, last) or None."""
    if layers is None or (isinstance(layers, str) and layers.strip().lower() in ("", "all")):
        return None
    if isinstance(layers, str):
        parts = layers.strip().split("-")
        try:
            nums = [int(p) for p in parts]
        except ValueError as exc:
            raise ConfigError(f"layers must look like '0-7' or '3' or 'all', got {layers!r}") from exc
        layers = (nums[0], nums[-1]) if len(nums) in (1, 2) else None
        if layers is None:
            raise ConfigError("layers must look like '0-7' or '3' or 'all'")
    first, last = (_whole("first layer", layers[0], 0, 10_000), _whole("last layer", layers[1], 0, 10_000))
    if first > last:
        raise ConfigError(f"layer range {first}-{last} is empty: the first block must not be after the last")
    return (first, last)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8                               # r: width of the A·B bottleneck
    alpha: float = 16.0                         # the LoRA update is scaled by alpha / r
    targets: tuple[str, ...] = ("q", "v")       # T5 module names; PEFT's default for T5 is q, v
    side: str = "both"                          # which stack gets adapters: both, encoder or decoder
    layers: tuple[int, int] | None = None       # inclusive block range; None = every block
    dropout: float = 0.0                        # dropout on the LoRA path only (input to A)
    method: str = "lora"                        # one of METHODS
    loraplus_ratio: float = 16.0                # LoRA+ only: B's learning rate over A's (PEFT's loraplus_lr_ratio)

    def __post_init__(self):
        lim = limits()
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        object.__setattr__(self, "loraplus_ratio", _real("LoRA+ ratio", self.loraplus_ratio, 0.0, 1024.0, lo_open=True))
        object.__setattr__(self, "rank", _whole("rank", self.rank, 1, lim.max_rank))
        object.__setattr__(self, "alpha", _real("alpha", self.alpha, 0.0, 4096.0, lo_open=True))
        object.__setattr__(self, "targets", parse_targets(self.targets))
        if self.side not in SIDES:
            raise ConfigError(f"side must be one of {', '.join(SIDES)}, got {self.side!r}")
        object.__setattr__(self, "layers", parse_layers(self.layers))
        object.__setattr__(self, "dropout", _real("LoRA dropout", self.dropout, 0.0, 0.9))

    @property
    def scaling(self) -> float:
        """What A·B is multiplied by: alpha/r, or alpha/√r for rsLoRA (the update keeps its size as r grows)."""
        return self.alpha / math.sqrt(self.rank) if self.method == "rslora" else self.alpha / self.rank

    @property
    def adapter(self) -> bool:
        """False for full fine-tuning, which trains the model's own weights."""
        return self.method != "full"


def parse_ranks(text) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8]; each rank is checked like a single run's."""
    if isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        parts = [p for p in str(text or "").replace(" ", ",").split(",") if p]
    if not parts:
        raise ConfigError("give at least one rank, e.g. 1,2,4,8,16")
    if len(parts) > 12:
        raise ConfigError("a sweep takes at most 12 ranks")
    ranks = []
    for p in parts:
        word = str(p).strip()   # int() strips less than str.strip() (not "\x1f"): parse what was checked
        try:
            ranks.append(_whole("rank", int(word) if word.lstrip("-").isdecimal() else p, 1, limits().max_rank))
        except ConfigError as exc:
            raise ConfigError(f"sweep rank {p!r}: {exc}") from None
    return ranks


def parse_samples(value) -> tuple[str, ...]:
    """Sample sentences for the live translation table: one per line (or a list), at most 5."""
    lines = value.splitlines() if isinstance(value, str) else list(value or ())
    if not all(isinstance(x, str) for x in lines):
        raise ConfigError("sample sentences must be text, one per line")
    lines = [" ".join(x.split()) for x in lines]
    lines = [x for x in lines if x]
    if len(lines) > MAX_SAMPLES:
        raise ConfigError(f"give at most {MAX_SAMPLES} sample sentences, got {len(lines)}")
    long = [x for x in lines if len(x) > MAX_SAMPLE_CHARS]
    if long:
        raise ConfigError(f"a sample sentence may have at most {MAX_SAMPLE_CHARS} characters; "
                          f"{long[0][:40]!r}... has {len(long[0])}")
    return tuple(lines)


BATCHING = ("grouped", "padded")
SCHEDULES = ("constant", "linear")
FIRST_STEP = ("eager", "compiled")


@dataclass(frozen=True)
class TrainConfig:
    # Defaults for the captions lesson, measured on the bundled tiny of 2026-12-07 (docs/default-run.md): r=8 on
    # q,v, 250 steps of 32 captions from 5e-3 falling linearly to 0 train in 49 s on 2 cores (AVX512-BF16) and
    # lower the held-out caption loss by 18% on seeds 0-2; 300 steps at a constant 3e-3 learned as much in
    # 57-65 s but looped more than the base on seed 2.
    steps: int = 250
    batch_size: int = 32
    lr: float = 5e-3
    train_size: int = 7000          # pairs from the start of the lesson's training data (at most 7,065, the news
                                    # lesson's, so every lesson takes the default)
    seed: int = 0                   # weights of A, dropout and data order all follow it
    optimizer: str = "adamw"
    weight_decay: float = 0.0       # on LoRA weights only (they are the only trainable ones)
    warmup_steps: int = 5           # linear warm-up, then the schedule
    schedule: str = "linear"        # after the warm-up: "linear" (down to 0 at the last step), or "constant"
    clip_norm: float = 1.0          # global gradient-norm clip; 0 turns it off
    eval_every: int = 50            # held-out and second-curve loss (and the sample translations) every N steps
    eval_size: int = 32             # pairs of the second curve: what the base knew (for captions, held-out Europarl)
    max_source_len: int = 64
    max_target_len: int = 64
    bleu_size: int = 200            # test sentences of the lesson scored with BLEU/chrF after the run; 0 = skip
    data: str = DEFAULT_LESSON      # the lesson (data.LESSONS): "captions" (Multi30k), "news" or "europarl"
    heldout_size: int = 64          # fixed held-out pairs of the training distribution, never trained on
    early_stop: int = 0             # stop when the held-out loss has not improved for N evaluations; 0 = off
    samples: tuple[str, ...] = DEFAULT_SAMPLES   # translated at every evaluation point
    batching: str = "grouped"       # "padded": every batch padded to the longest row of the data (one shape);
                                    # "grouped": rows of similar length, each batch trimmed to its longest row:
                                    # faster, but a noisier training curve (docs/cli.md, "Training speed")
    first_step: str = "eager"       # "eager": step 1's loss from an eager forward pass (first loss soon), its
                                    # update compiled once traced; "compiled": wait for the trace
    checkpoint_every: int = 50      # save adapter, optimiser state, data position and dropout clock every N
                                    # steps (and at the end), so the run can be resumed; 0 = off

    def __post_init__(self):
        lim = limits()
        if self.data not in DATASETS:
            raise ConfigError(f"data must be one of {', '.join(DATASETS)}, got {self.data!r}")
        for name, lo, hi in (("steps", 1, lim.max_steps), ("batch_size", 1, lim.max_batch_size),
                             ("train_size", 1, min(lim.max_train_size, DATASETS[self.data])),
                             ("seed", 0, 2**31 - 1),
                             ("warmup_steps", 0, lim.max_steps), ("eval_every", 1, 100_000),
                             ("eval_size", 1, LESSONS[self.data].knew_max), ("max_source_len", 8, 512),
                             ("max_target_len", 8, 512), ("bleu_size", 0, LESSONS[self.data].test_max),
                             ("heldout_size", 1, 500), ("early_stop", 0, 1000),
                             ("checkpoint_every", 0, lim.max_steps)):
            object.__setattr__(self, name, _whole(name.replace("_", " "), getattr(self, name), lo, hi))
        object.__setattr__(self, "lr", _real("learning rate", self.lr, 0.0, 1.0, lo_open=True))
        object.__setattr__(self, "weight_decay", _real("weight decay", self.weight_decay, 0.0, 1.0))
        object.__setattr__(self, "clip_norm", _real("clip norm", self.clip_norm, 0.0, 1e6))
        if self.first_step not in FIRST_STEP:
            raise ConfigError(f"first step must be one of {', '.join(FIRST_STEP)}, got {self.first_step!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.batching not in BATCHING:
            raise ConfigError(f"batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        object.__setattr__(self, "samples", parse_samples(self.samples))


def parse_methods(text) -> list[str]:
    """'lora,dora,full' -> ['lora', 'dora', 'full'], each checked against METHODS, no repeats."""
    parts = list(text) if isinstance(text, (list, tuple)) else [p for p in str(text or "").replace(" ", ",").split(",") if p]
    if not parts:
        raise ConfigError(f"give at least one method: {', '.join(METHODS)}")
    unknown = [p for p in parts if p not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; methods are {', '.join(METHODS)}")
    if len(set(parts)) != len(parts):
        raise ConfigError(f"each method once, got {text!r}")
    return parts


def parse_seeds(text, first: int = 0) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; a bare count N (an int) -> N seeds from ``first``. At most 8."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        n = _whole("number of seeds", text, 1, 8)
        return [first + i for i in range(n)]
    parts = [p for p in str(text or "").replace(" ", ",").split(",") if p]
    if not parts:
        raise ConfigError("give at least one seed, e.g. 0,1,2")
    if len(parts) > 8:
        raise ConfigError("repeat with at most 8 seeds")
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"seeds must be whole numbers separated by commas, got {text!r}") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"seeds must be different and not negative, got {text!r}")
    return seeds


@dataclass(frozen=True)
class RunConfig:
    model: str = "google/flan-t5-small"
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.lora.method == "loraplus" and self.train.optimizer != "adamw":
            raise ConfigError("LoRA+ is built on AdamW here (as PEFT's loraplus optimiser usually is); "
                              "choose the adamw optimizer")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora"]["targets"] = list(self.lora.targets)
        d["lora"]["layers"] = list(self.lora.layers) if self.lora.layers else None
        d["train"]["samples"] = list(self.train.samples)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        train = dict(d["train"])
        train.setdefault("data", "europarl")   # records from before the news data trained on Europarl
        train.setdefault("batching", "padded")  # and from before the batching option, on padded batches
        return cls(model=d["model"], lora=LoraConfig(**d["lora"]), train=TrainConfig(**train))


def expand_sweep(config: RunConfig, ranks: list[int], seeds: list[int] | None = None,
                 methods: list[str] | None = None, lrs: dict[str, float] | None = None) -> list[RunConfig]:
    """``config`` at each rank (and with each of ``methods``: full fine-tuning once, having no rank), once
    per seed (default: its own seed), method by method, rank by rank. ``lrs``: learning rates per method
    instead of the config's. Runs with the same seed share the data order and A's initialisation."""
    seeds, methods, lrs = seeds or [config.train.seed], methods or [config.lora.method], lrs or {}
    return [replace(config, lora=replace(config.lora, rank=r, method=m),
                    train=replace(config.train, seed=sd, lr=lrs.get(m, config.train.lr)))
            for m in methods for r in (ranks[:1] if m == "full" else ranks) for sd in seeds]


def defaults_for(gpu: bool) -> TrainConfig:
    """Defaults per device: the measured CPU default (docs/default-run.md); longer, larger batches on a GPU."""
    return TrainConfig(steps=600, batch_size=64, train_size=TRAIN_PAIRS[DEFAULT_LESSON]) if gpu else TrainConfig()


_CONTROL = dict.fromkeys(c for c in range(32) if c not in (9, 10))  # keep tab and newline


def clean_sentences(text) -> tuple[list[str], list[str]]:
    """Translate input -> (sentences, notices). One sentence per line.

    Control characters are dropped, blank lines skipped, and input over the
    deployment limits is cut with a notice rather than refused, so a long paste
    still gets an answer. Any script and emoji pass through untouched.
    """
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ConfigError(f"text must be a string, got {type(text).__name__}")
    lim, notices = limits(), []
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    cleaned = text.translate(_CONTROL).replace("\x7f", "")
    if cleaned != text:
        notices.append("control characters were removed")
    if len(cleaned) > lim.max_text_chars:
        cleaned = cleaned[: lim.max_text_chars]
        notices.append(f"text was cut to {lim.max_text_chars} characters (LORA_LAB_MAX_TEXT_CHARS)")
    lines = [" ".join(line.split()) for line in cleaned.split("\n")]
    lines = [line for line in lines if line]
    if not lines:
        raise ConfigError("type at least one English sentence (one per line)")
    if len(lines) > lim.max_lines:
        notices.append(f"only the first {lim.max_lines} lines were translated (LORA_LAB_MAX_LINES)")
        lines = lines[: lim.max_lines]
    return lines, notices
