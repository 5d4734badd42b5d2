"""What the sections share: the per-browser states, the LoRA/training form, owner keys, one error
decorator, and the live status of a run (its status line and loss figure)."""

from __future__ import annotations

import functools
import html
import inspect
import logging
from dataclasses import dataclass, fields

import gradio as gr

from lora_demo import data
from lora_demo.app import card
from lora_demo.lab import owners
from lora_demo.present import plots
from lora_demo.core import settings
from lora_demo.core.config import MODULES, ConfigError, LoraConfig, RunConfig, parse_seeds
from lora_demo.core.inject import MODULE_PATH, dense_sites, select_paths
from lora_demo.core.events import loops_text, quality_lines, summary_text
from lora_demo.lab import Lab
from lora_demo.lab.records import Job
from pathlib import Path

log = logging.getLogger("lora_lab")
DEFAULT_RANKS = settings.PAGE_DEFAULTS["ranks"]
READY = ("<div class='progress ready'>Press <b>▶ Train</b>: the loss curve draws here as it trains, and the sample "
         "sentences' German changes from the base model's to the adapter's. A verdict follows the run.</div>")


def errors(fn):
    """For the API: ConfigError (bad input, not yours, not found) becomes gr.Error, whose message the client
    sees; the log gets one line, not a traceback."""
    def refuse(exc):
        log.info("refused: %s", exc)
        return gr.Error(str(exc), print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except ConfigError as exc:
                raise refuse(exc) from None
        return gen

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            raise refuse(exc) from None
    return call


def refused(fn):
    """For the page: ConfigError becomes one warning that says what to fix, and every output stays as it was
    (no error badges over earlier results); the log gets one line."""
    def warn(exc):
        log.info("refused: %s", exc)
        gr.Warning(str(exc))
        return gr.skip()

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except ConfigError as exc:
                yield warn(exc)
        return gen

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            return warn(exc)
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
        line += f"  \n📏 scoring BLEU/chrF on {data.LESSONS[s['data']].test_name}…"
    if s["status"] in ("completed", "stopped") and s["summary"].get("first_loss_s") is not None:
        line += "  \n" + summary_text(s["status"], s["summary"]).replace("\n", "  \n").replace("->", "→")
    q = s.get("quality")
    if q:
        line += (f"  \nBLEU base {q['base']['bleu']:.2f} → LoRA {q['lora']['bleu']:.2f} · chrF base "
                 f"{q['base']['chrf']:.2f} → LoRA {q['lora']['chrf']:.2f} ({q['n']} {q.get('split') or data.LESSONS[s['data']].test_name} sentences)"
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


def progress_html(lab: Lab, s: dict) -> str:
    """The one line above the chart while a run is queued, trains or is scored."""
    if s["status"] == "queued":
        text = status_line(lab, s)
    elif s["step"] == 0:
        text = "⚙️ Preparing: adding the adapter, tokenising the lesson, the first step…"
    elif s["phase"] == "evaluating":
        q = data.LESSONS[s["data"]]
        text = (f"📏 Trained {s['step']} steps in {s['elapsed_s']:.0f} s. Now translating the {q.test_name} "
                f"sentences with LoRA and scoring base and LoRA…")
    else:
        parts = [f"🏃 Training · step {s['step']}/{s['total_steps']}"]
        if s["loss"] is not None:
            parts.append(f"train loss {s['loss']:.3f}")
        if s["heldout_losses"]:
            parts.append(f"held-out {s['heldout_losses'][-1][1]:.3f} (base {s['heldout_losses'][0][1]:.3f})")
        parts.append(f"{s['elapsed_s']:.0f} s" + (f", about {s['eta_s']:.0f} s left" if s["eta_s"] is not None else ""))
        text = " · ".join(parts)
    return f"<div class='progress'>{html.escape(text).replace('**', '')}</div>"


def view_of(lab: Lab, s: dict) -> str:
    """The card area: the progress line while a run goes, the result card once it has ended."""
    if s["status"] in ("completed", "stopped", "failed", "interrupted"):
        return card.result_card(s)
    return progress_html(lab, s)


def about(lab: Lab, lesson: str) -> str:
    """What LoRA trains on and why, and what the base saw (for a bundled base, from its build record)."""
    from lora_demo.core.models import base_saw

    saw = base_saw(lab.loaded.kind)
    return (f"**The lesson** ({data.LESSONS[lesson].label}): {data.LESSONS[lesson].why}"
            + (f"  \n**The base** ({lab.loaded.kind}) saw {saw}" if saw else ""))


def live(lab: Lab, job: Job, s: dict, smoothing: float = plots.DEFAULT_SMOOTHING) -> tuple:
    """(card area, loss figure, sample translations, details, LR / gradient-norm figure) of a run as it
    stands; the chart and the table show from its first update on."""
    return (view_of(lab, s), gr.update(value=loss_of(job, s, smoothing), visible=True),
            gr.update(value=samples_frame(job), visible=bool(job.config.train.samples)),
            f"{status_line(lab, s)}\n\n{about(lab, job.config.train.data)}",
            plots.optim_figure(job.record()))


def loss_of(job: Job, s: dict, smoothing: float = plots.DEFAULT_SMOOTHING):
    lora = job.config.lora
    # x-axis: while running, up to twice the current step (capped at the run's length), so early
    # points of a long run are not squeezed against the y-axis; once it has ended, the steps it did.
    span = min(s["total_steps"], max(2 * s["step"], 20)) if s["status"] in ("queued", "running") \
        else max(s["step"], 1)
    return plots.loss_figure(job.record(), span, smoothing=smoothing, height=LIVE_CHART_PX,
                             title=f"Loss · {run_what(lora)} · seed {job.config.train.seed} · step 0 is the base")


LIVE_CHART_PX = 270   # the live loss chart's height: the chart and the sample table share the first screen
# Shares of the table's width: English, the base model, the adapter's newest German, the reference.
SAMPLE_WIDTHS = ["25%", "25%", "25%", "25%"]


def samples_frame(job: Job | None):
    """The live sample table, four columns whatever the step: each sample sentence, the base model's German,
    the adapter's at its newest evaluation point, and the human reference where the lesson has one."""
    import pandas as pd

    english = list(job.config.train.samples) if job is not None else []
    if not english:
        return pd.DataFrame({"English": [], "base model": []})
    by_step = dict((step, texts) for step, texts in job.samples)
    newest = max((k for k in by_step if k > 0), default=None)
    return pd.DataFrame({"English": english, "base model": by_step.get(0, ["…"] * len(english)),
                         (f"LoRA at step {newest}" if newest else "LoRA"):
                             by_step[newest] if newest else ["(at the first evaluation)"] * len(english),
                         "reference": [data.reference(e) or "–" for e in english]})


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
