"""What the sections share: the per-browser states, the LoRA/training form, owner keys, one error
decorator, and the live status of a run (its status line and loss figure)."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields

import gradio as gr

from lora_demo.lab import owners
from lora_demo.present import plots
from lora_demo.core import settings
from lora_demo.core.config import MODULES, ConfigError, LoraConfig, RunConfig, parse_seeds
from lora_demo.core.inject import MODULE_PATH, dense_sites, select_paths
from lora_demo.core.events import loops_text, quality_lines, summary_text
from lora_demo.lab import Lab
from lora_demo.lab.records import Job
from pathlib import Path

DEFAULT_RANKS = settings.PAGE_DEFAULTS["ranks"]
READY = "Ready. Press **Train** to start a run."


def errors(fn):
    """ConfigError (bad input, not yours, not found) becomes gr.Error, whose message the user sees."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except ConfigError as exc:
                raise gr.Error(str(exc)) from None
        return gen

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            raise gr.Error(str(exc)) from None
    return call


def key_of(lab: Lab, request: gr.Request | None, presented: str | None = "") -> str:
    """The key an API call acts with: the one it presents, else its connection's own."""
    if presented:
        return owners.check(presented)
    return lab.connection_key(getattr(request, "session_hash", None) or "anonymous")


def browser_key(key: str | None) -> str:
    """The browser's owner key (kept in its local storage); a new one on its first visit."""
    return key or owners.new_key()


def file_paths(files) -> list[str]:
    """gr.File (type "filepath") gives a path, a list of paths, or None."""
    return [] if not files else [str(f) for f in (files if isinstance(files, list) else [files])]


def import_files(lab: Lab, files, session: str) -> Job:
    paths = file_paths(files)
    if not paths:
        raise ConfigError("choose an adapter zip, or its adapter_config.json and adapter_model.safetensors")
    return lab.import_adapter(paths, session, name=", ".join(Path(p).name for p in paths))


# ---------------------------------------------------------------------------
# Form values -> configs, against the served model
# ---------------------------------------------------------------------------

def depth(lab: Lab) -> int:
    """Blocks in the shallower stack: the block range a config may name."""
    cfg = lab.loaded.model.config
    return min(cfg.num_layers, cfg.num_decoder_layers or cfg.num_layers)


def modules(lab: Lab) -> list[str]:
    """The target modules this model has, in canonical order."""
    found = {MODULE_PATH.match(s.path)["module"] for s in dense_sites(lab.loaded.model)}
    return [m for m in MODULES if m in found]


def adapted_layers(lab: Lab, lora: LoraConfig) -> int:
    return len(select_paths([site.path for site in dense_sites(lab.loaded.model)], lora))


@dataclass
class Shared:
    """Per-browser states that several sections read or write."""

    session: gr.BrowserState     # the browser's owner key
    run_id: gr.State             # the run (or sweep id) that Stop stops and the live plot follows
    seen: gr.State               # what the run list last showed, to skip unchanged refreshes

    @classmethod
    def create(cls) -> "Shared":
        return cls(gr.BrowserState("", storage_key="lora_lab_session"), gr.State(""), gr.State(""))


@dataclass
class Form:
    """The LoRA and training controls. Handlers take them as one ``{component: value}`` dict."""

    rank: gr.Slider
    alpha: gr.Slider
    targets: gr.CheckboxGroup
    side: gr.Radio
    first: gr.Slider
    last: gr.Slider
    steps: gr.Slider
    batch: gr.Slider
    lr: gr.Number
    train_size: gr.Slider
    optimizer: gr.Dropdown
    seed: gr.Number
    bleu_size: gr.Slider
    data: gr.Dropdown
    eval_every: gr.Slider
    early_stop: gr.Slider
    samples: gr.Textbox
    seeds: gr.Slider          # "repeat with N seeds": not part of a run's config
    method: gr.Dropdown
    ratio: gr.Number          # LoRA+: B's learning rate over A's
    checkpoint: gr.Slider     # checkpoint every N steps (0 = off)

    LORA = ("rank", "alpha", "targets", "side", "first", "last", "method", "ratio")
    # URL key -> the form field(s) behind each (blocks: first and last), from the settings table
    SHARED = {key: s.form for key, s in settings.BY_KEY.items() if s.form}

    def shared(self) -> dict[str, tuple]:
        """URL keys of the form -> its components."""
        return {name: tuple(getattr(self, f) for f in fs) for name, fs in self.SHARED.items()}

    def named(self, v: dict) -> dict:
        """The form's values under URL keys (those of the components in ``v``: a handler may take a few)."""
        return {name: (v[c[0]], v[c[1]]) if len(c) == 2 else v[c[0]] for name, c in self.shared().items()
                if c[0] in v}

    @property
    def components(self) -> set:
        return {getattr(self, f.name) for f in fields(self)}

    @property
    def lora_components(self) -> set:
        return {getattr(self, name) for name in self.LORA}

    def _values(self, v: dict, rank=None, method=None) -> dict:
        return {**self.named(v), **({"rank": rank} if rank is not None else {}), **({"method": method} if method else {})}

    def lora(self, lab: Lab, v: dict, rank=None, method=None) -> LoraConfig:
        return settings.lora_of(self._values(v, rank, method), depth(lab))

    def run(self, lab: Lab, v: dict, rank=None, method=None) -> RunConfig:
        return settings.config_of(self._values(v, rank, method), lab.loaded.name, depth(lab),
                                  samples=v[self.samples] or "")

    def seed_list(self, v: dict) -> list[int]:
        """The seeds to repeat with: N seeds from the form's seed."""
        return parse_seeds(v[self.seeds], first=int(v[self.seed] or 0))


# ---------------------------------------------------------------------------
# A run's live view: status line and loss figure
# ---------------------------------------------------------------------------

ICONS = {"running": "🏃", "completed": "✅", "stopped": "⏹️", "failed": "❌", "interrupted": "⚠️"}


def status_line(lab: Lab, s: dict) -> str:
    if s["status"] == "queued":
        at_once = "one training job runs at a time" if lab.slots == 1 else f"{lab.slots} training jobs run at a time"
        wait = (f"about {s['wait_s'] / 60:.0f} min to wait" if s["wait_s"] >= 90 else f"about {s['wait_s']:.0f} s to "
                "wait") if s.get("wait_s") is not None else "the wait is known once the runs ahead have step times"
        return f"⏳ queued: position {s['queue_position']} in line ({at_once}); {wait}"
    if s["status"] == "running" and s["step"] == 0:
        return "⚙️ preparing: adding the adapter, tokenising the data, first step…"
    parts = [f"step {s['step']}/{s['total_steps']}"]
    if s["loss"] is not None:
        parts.append(f"loss {s['loss']:.3f}")
    if s["heldout_losses"]:
        parts.append(f"held-out {s['heldout_losses'][-1][1]:.3f} (base {s['heldout_losses'][0][1]:.3f})")
    if s["val_losses"]:
        parts.append(f"val {s['val_losses'][-1][1]:.3f}")
    if s["tokens_per_s"]:
        steps_s = s["step"] / s["elapsed_s"] if s["elapsed_s"] else 0
        parts.append(f"{s['tokens_per_s']:,.0f} tok/s ({steps_s:.1f} steps/s overall)")
    parts.append(f"elapsed {s['elapsed_s']:.0f} s")
    if s["eta_s"] is not None:
        parts.append(f"ETA {s['eta_s']:.0f} s")
    line = f"{ICONS.get(s['status'], '')} {s['status']} · r={s['rank']} · seed {s['seed']} · " + " · ".join(parts)
    if s["phase"] == "evaluating":
        line += "  \n📏 scoring BLEU/chrF on the newstest2016 slice…"
    if s["status"] in ("completed", "stopped") and s["summary"].get("first_loss_s") is not None:
        line += "  \n" + summary_text(s["status"], s["summary"]).replace("\n", "  \n").replace("->", "→")
    q = s.get("quality")
    if q:
        line += (f"  \nBLEU base {q['base']['bleu']:.2f} → LoRA {q['lora']['bleu']:.2f} · chrF base "
                 f"{q['base']['chrf']:.2f} → LoRA {q['lora']['chrf']:.2f} ({q['n']} newstest2016 sentences)"
                 + loops_text(q).replace("->", "→")
                 + "".join("  \n" + text.replace("->", "→") for text in quality_lines(q, s["summary"])))
    for r in s.get("resumes") or []:
        line += f"  \n⏯️ resumed from its checkpoint at step {r['from_step']} (it was {r['was']}), to {r['steps']} steps"
    if s.get("checkpoint_every"):
        saved = s.get("checkpoint_steps") or []
        line += (f"  \n💾 checkpoint every {s['checkpoint_every']} steps"
                 + (f"; kept: step {', '.join(map(str, saved[-4:]))}" if saved else "; none yet"))
    for note in s.get("notices") or []:
        line += f"  \n🧹 {note}"
    if s["error"]:
        line += f"  \n**{s['error']}**"
    return line


def live(lab: Lab, job: Job, s: dict, smoothing: float = plots.DEFAULT_SMOOTHING) -> tuple:
    """(status line, loss figure, sample translations, LR / gradient-norm figure) of a run as it stands."""
    return (status_line(lab, s), loss_of(job, s, smoothing), samples_frame(job), plots.optim_figure(job.record()))


def loss_of(job: Job, s: dict, smoothing: float = plots.DEFAULT_SMOOTHING):
    lora = job.config.lora
    # x-axis: while running, up to twice the current step (capped at the run's length), so early
    # points of a long run are not squeezed against the y-axis; once it has ended, the steps it did.
    span = min(s["total_steps"], max(2 * s["step"], 20)) if s["status"] in ("queued", "running") \
        else max(s["step"], 1)
    return plots.loss_figure(job.record(), span, smoothing=smoothing,
                             title=f"Loss · r={lora.rank}, {'+'.join(lora.targets)} · seed {job.config.train.seed} · "
                                   f"run {job.id}")


SAMPLE_COLUMNS_KEPT = 3   # evaluation points shown beside the base model
# Shares of the table's width: English, the base model, then each kept evaluation point. Without them
# each column is as wide as its longest sentence and the adapter's columns are scrolled out of sight.
SAMPLE_WIDTHS = ["22%", "20%"] + ["{:.0f}%".format(58 / SAMPLE_COLUMNS_KEPT)] * SAMPLE_COLUMNS_KEPT


def samples_frame(job: Job | None):
    """The live sample table: each sample sentence, the base model's German, then the adapter's at the
    last few evaluation points (newest on the right)."""
    import pandas as pd

    english = list(job.config.train.samples) if job is not None else []
    by_step = dict((step, texts) for step, texts in (job.samples if job is not None else []))
    if not english:
        return pd.DataFrame({"English": [], "base model": []})
    cols = {"English": english, "base model (step 0)": by_step.get(0, ["…"] * len(english))}
    for step in [k for k in sorted(by_step) if k > 0][-SAMPLE_COLUMNS_KEPT:]:
        cols[f"LoRA at step {step}"] = by_step[step]
    if len(cols) == 2:
        cols["LoRA"] = ["(at the first evaluation point)"] * len(english)
    return pd.DataFrame(cols)


def run_what(lora, targets: bool = True) -> str:
    """What a run trains: "full fine-tuning" (short: "full") or "[method ]r=R" with its targets ("q+v")."""
    if not lora.adapter:
        return "full fine-tuning" if targets else "full"
    what = ("" if lora.method == "lora" else f"{lora.method} ") + f"r={lora.rank}"
    return f"{what} {'+'.join(lora.targets)}" if targets else what


def run_label(job: Job) -> str:
    q = f", BLEU {job.quality['lora']['bleu']:.1f}" if job.quality else ""
    return f"{run_what(job.config.lora)} · {job.status}{q} · {job.id}"


PRIVATE = dict(api_visibility="private")   # UI events: not part of the public API
