"""Every setting of a run, declared once: the one table the page's form, its link (URL keys), the CLI's
flags, the printed command lines and the API's parameters are read from.

A ``Setting`` names where its value lives in a ``RunConfig`` (``field``: "lora.rank"), its kind, the
URL key of the page control that sets it (``key``; "" when the page has no control for it), the form
attribute(s) behind that control, its CLI flag, its API parameter and its label. Its default is the
config's own (``default``), never a second copy. Three page-only settings have no config field: ``seeds``
(how many seeds Train repeats with), ``ranks`` and ``methods`` (the Sweep and Compare lists).

``config_of(values, model, depth)`` builds the run's config from the values under URL keys (as the page's
link or the form give them; ``lora_of`` its LoRA part); ``values_of(config, depth)`` is its inverse. ``tests/test_settings.py`` walks
every setting through URL -> config -> CLI line -> config.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

from lora_demo.core.config import (BATCHING, DATASETS, FIRST_STEP, METHODS, SCHEDULES, SIDES, LoraConfig, RunConfig,
                                   TrainConfig, limits)


@dataclass(frozen=True)
class Setting:
    field: str                   # "lora.rank", "train.steps"; "" for the page-only lists
    kind: str                    # int, float, choice, list (targets), range (blocks), text
    key: str = ""                # the page control's URL key ("" = no page control)
    form: tuple[str, ...] = ()   # the Form attribute(s) behind the control (blocks: first, last)
    cli: str = ""                # the train command's flag
    api: tuple[str, ...] = ()    # the /train parameter(s) (blocks: first_layer, last_layer)
    label: str = ""
    lo: float | None = None      # the page control's limits; ``hi`` may name a ``Limits`` field
    hi: float | str | None = None
    step: float | None = None
    choices: tuple = ()          # the values a choice may take ("" for the optimiser: checked by the config)
    help: str = ""               # the CLI's help, where it says more than the label

    @property
    def part(self) -> str:
        return self.field.partition(".")[0]

    @property
    def name(self) -> str:
        """The config attribute."""
        return self.field.partition(".")[2]

    @property
    def default(self):
        """The config's own default (page-only settings: their page default)."""
        if not self.field:
            return PAGE_DEFAULTS[self.key]
        cls = LoraConfig if self.part == "lora" else TrainConfig
        f = next(f for f in fields(cls) if f.name == self.name)
        return f.default if f.default is not MISSING else f.default_factory()

    @property
    def top(self) -> float | None:
        """The upper limit, with a deployment limit (LORA_LAB_MAX_*) read now."""
        return getattr(limits(), self.hi) if isinstance(self.hi, str) else self.hi

    @property
    def dest(self) -> str:
        """argparse's attribute for the CLI flag."""
        return self.cli.lstrip("-").replace("-", "_")


S = Setting
SETTINGS: tuple[Setting, ...] = (
    S("lora.method", "choice", "method", ("method",), "--method", ("method",), "method", choices=METHODS,
      help="lora; rslora (alpha/sqrt(r)); dora (learned magnitude); pissa (SVD start); loraplus (B learns "
           "--loraplus-ratio times faster); full (every weight, no adapter)"),
    S("lora.loraplus_ratio", "float", "ratio", ("ratio",), "--loraplus-ratio", ("loraplus_ratio",),
      "LoRA+ ratio (B's rate / A's)", 1, 1024, help="LoRA+: B's learning rate over A's (PEFT's loraplus_lr_ratio)"),
    S("lora.rank", "int", "rank", ("rank",), "--rank", ("rank",), "rank r", 1, 64, 1, help="LoRA rank r"),
    S("lora.alpha", "float", "alpha", ("alpha",), "--alpha", ("alpha",), "alpha (update scaled by alpha / r)",
      1, 128, 1),
    S("lora.targets", "list", "targets", ("targets",), "--targets", ("targets",),
      "target modules (attention q/k/v/o, FFN wi*/wo)", help="comma-separated T5 modules: q,k,v,o,wi,wi_0,wi_1,wo"),
    S("lora.side", "choice", "stacks", ("side",), "--side", ("side",), "stacks", choices=SIDES),
    S("lora.layers", "range", "blocks", ("first", "last"), "--layers", ("first_layer", "last_layer"),
      "blocks (first, last)", help="inclusive block range such as 0-7, or 'all'"),
    S("lora.dropout", "float", cli="--lora-dropout", label="dropout on the LoRA path (the input to A)"),
    S("train.steps", "int", "steps", ("steps",), "--steps", ("steps",), "steps", 1, "max_steps", 1),
    S("train.batch_size", "int", "batch", ("batch",), "--batch-size", ("batch_size",), "batch size",
      1, "max_batch_size", 1),
    S("train.lr", "float", "lr", ("lr",), "--lr", ("lr",), "learning rate", 1e-6, 1.0),
    S("train.train_size", "int", "pairs", ("train_size",), "--train-size", ("train_size",), "training pairs",
      8, "max_train_size", 8, help="pairs from the start of the training data"),
    S("train.optimizer", "choice", "optimizer", ("optimizer",), "--optimizer", ("optimizer",), "optimizer"),
    S("train.seed", "int", "seed", ("seed",), "--seed", ("seed",), "seed", 0, 2**31 - 1),
    S("", "int", "seeds", ("seeds",), "--seeds", ("seeds",), "repeat with N seeds (seed, seed+1, …)", 1, 5, 1),
    S("train.data", "choice", "data", ("data",), "--dataset", ("data",), "lesson", choices=tuple(DATASETS),
      help="the lesson: captions (the default: Multi30k, WMT16's multimodal task 1; held-out curve on Multi30k "
           "validation, BLEU/chrF on test_2016_flickr), news (newstest2008-2010; held-out curve on newstest2014) or "
           "europarl (the WMT16 train split; held-out curve on Europarl rows 19,500+)"),
    S("train.bleu_size", "int", "bleu", ("bleu_size",), "--bleu-size", ("bleu_size",),
      "BLEU/chrF sentences after the run (the lesson's test set; 0 = skip)", 0, 500, 10),
    S("train.eval_every", "int", "eval", ("eval_every",), "--eval-every", ("eval_every",),
      "evaluate every N steps (held-out loss, samples)", 1, 200, 1),
    S("train.early_stop", "int", "patience", ("early_stop",), "--early-stop", ("early_stop",),
      "early stopping patience (evaluations; 0 = off)", 0, 20, 1,
      help="stop when the held-out loss has not improved for PATIENCE evaluations (0 = off)"),
    S("train.checkpoint_every", "int", "ckpt", ("checkpoint",), "--checkpoint-every", ("checkpoint_every",),
      "checkpoint every N steps, and at the end (resume from it; 0 = off)", 0, 200, 1,
      help="save a checkpoint (adapter, optimiser state, data position, dropout clock) every N steps and at "
           "the end, in the run's checkpoints/ directory (0 = off)"),
    S("train.samples", "text", "", ("samples",), "--samples", ("samples",),
      "sample sentences translated at every evaluation",
      help="sentences translated at every evaluation point, separated by '|' or newlines ('' = none)"),
    S("train.eval_size", "int", cli="--eval-size",
      label="pairs of the second curve: what the base knew (captions and news: held-out Europarl; Europarl: newstest2015)"),
    S("train.heldout_size", "int", cli="--heldout-size",
      label="held-out pairs of the training distribution for the held-out curve"),
    S("train.schedule", "choice", cli="--schedule", label="learning rate after the warm-up", choices=SCHEDULES,
      help="constant, or linear: down to 0 at the last step"),
    S("train.batching", "choice", cli="--batching", label="how batches are formed", choices=BATCHING,
      help="grouped: batches of similar-length pairs, each trimmed to its longest pair (one trace serves every "
           "length); padded: every batch padded to the longest pair of the training data (one shape)"),
    S("train.first_step", "choice", cli="--first-step", label="how the first step runs", choices=FIRST_STEP,
      help="eager: step 1's loss from an eager forward pass while the step is traced, so the first loss comes "
           "soon, and its update compiled; compiled: wait for the trace and report step 1 from it"),
    S("", "text", "ranks", (), "--ranks", ("ranks",), "rank sweep: ranks (each repeated with the N seeds)"),
    S("", "text", "methods", (), "--methods", ("methods",), "compare methods at this rank"),
)
del S

PAGE_DEFAULTS = {"seeds": 1, "ranks": "1,2,4,8,16", "methods": ",".join(METHODS)}
BY_KEY = {s.key: s for s in SETTINGS if s.key}     # the page's controls, in link order
BY_FIELD = {s.field: s for s in SETTINGS if s.field}
KINDS = {key: s.kind for key, s in BY_KEY.items()}


def values_of(config: RunConfig, depth: int) -> dict:
    """A run's config as the page's control values under URL keys (Train would make the same config)."""
    out = {}
    for key, s in BY_KEY.items():
        if not s.field:
            continue
        value = getattr(getattr(config, s.part), s.name)
        if s.kind == "range":
            value = tuple(value) if value else (0, depth - 1)
        elif s.kind == "list":
            value = list(value)
        out[key] = value
    out["seeds"] = 1
    return out


def _cli_text(s: Setting, value) -> str:
    """A config value as its CLI flag takes it: a block range as "0-7" or "all", the sample sentences one per
    line, a list comma-separated, a whole float without its ".0"."""
    if s.kind == "range":
        return "all" if value is None else f"{value[0]}-{value[1]}"
    return "\n".join(value) if s.name == "samples" else fmt(value)


def cli_args(parser, part: str) -> None:
    """The train command's flags of one part ("lora" or "train") of the config, with the config's defaults."""
    for s in SETTINGS:
        if s.part != part or not s.cli:
            continue
        default = s.default if s.kind in ("int", "float") else _cli_text(s, s.default)
        parser.add_argument(s.cli, default=default, help=s.help or s.label, choices=s.choices or None,
                            type={"int": int, "float": float}.get(s.kind, str))


def from_args(args, part: str) -> dict:
    """The config fields of one part from parsed CLI flags (samples may be separated by '|')."""
    out = {}
    for s in SETTINGS:
        if s.part == part and s.cli:
            value = getattr(args, s.dest)
            out[s.name] = value.replace("|", "\n") if s.name == "samples" else value
    return out


def from_api(params: dict) -> dict:
    """An API call's parameters (named as the table's ``api``) -> control values under URL keys. Left out:
    parameters the call does not have, and ``targets`` None (the default targets). A block range's
    ``last_layer`` -1 means the last block (``_split`` reads it so)."""
    values = {}
    for key, s in BY_KEY.items():
        if not s.field or s.api[0] not in params:
            continue
        if s.kind == "range":
            values[key] = tuple(params.get(n) for n in s.api)
        elif not (s.kind == "list" and params[s.api[0]] is None):
            values[key] = params[s.api[0]]
    return values


def _split(values: dict, depth: int) -> tuple[dict, dict]:
    """Control values under URL keys -> (LoraConfig fields, TrainConfig fields). A block range covering
    every block means all blocks (None). A None value (an emptied box) is passed on, for the config to
    refuse with its message, never replaced by a default."""
    lora, train = {}, {}
    for key, value in values.items():
        s = BY_KEY.get(key)
        if s is None or not s.field:
            continue
        if s.kind == "range":   # first None: block 0; last None or -1: the last block (the API's default)
            first, last = value
            first, last = int(first or 0), depth - 1 if last is None or last == -1 else int(last)
            value = None if (first, last) == (0, depth - 1) else (first, last)
        (lora if s.part == "lora" else train)[s.name] = value
    return lora, train


def lora_of(values: dict, depth: int) -> LoraConfig:
    """The LoRA config from control values under URL keys (missing ones: the defaults)."""
    return LoraConfig(**_split(values, depth)[0])


def config_of(values: dict, model: str, depth: int, **train_more) -> RunConfig:
    """The run's config from control values under URL keys (missing ones: the defaults); ``train_more``:
    TrainConfig fields the page has no URL key for (the sample sentences)."""
    lora, train = _split(values, depth)
    return RunConfig(model=model, lora=LoraConfig(**lora), train=TrainConfig(**train, **train_more))


def fmt(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) >= 1 else f"{value:g}"
    return str(value)


def cli_flags(config: RunConfig, skip: tuple[str, ...] = ()) -> list[str]:
    """The train command's flags that give ``config`` (every page setting, in the table's order; the
    LoRA+ ratio only when it is not the default, the samples only when they are not)."""
    out = []
    for s in SETTINGS:
        if not s.field or not s.key or s.field in skip:
            continue
        value = getattr(getattr(config, s.part), s.name)
        if s.name == "loraplus_ratio" and value == s.default:
            continue
        out += [s.cli, _cli_text(s, value)]
    if config.train.samples != BY_FIELD["train.samples"].default:
        out += ["--samples", "|".join(config.train.samples)]
    return out
