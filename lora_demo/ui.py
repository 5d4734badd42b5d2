"""The Gradio app: layout, handlers and the public API. The only module that imports gradio.

Handlers are thin: they validate through config.py, call the Lab (runs.py) and
turn its events into component updates through plots.py. The four public
endpoints ``params``, ``train``, ``stop`` and ``translate`` take and return
plain values so that ``gradio_client`` scripts can do everything the UI does.
"""

from __future__ import annotations

import time
import uuid
from typing import Iterator

import gradio as gr

from . import plots
from .config import (MODULES, ConfigError, LoraConfig, RunConfig, TrainConfig, clean_sentences, defaults_for,
                     limits)
from .events import EvalLogged, RunFailed, StepLogged, summary_text
from .inject import MODULE_PATH
from .models import device_info, is_gpu
from .params import preview
from .runs import Job, Lab
from .train import OPTIMIZER_LABELS, available_optimizers

LAB: Lab | None = None   # set by build_demo(); shared by every user, guarded inside Lab
_T = TrainConfig()        # API defaults are the config's defaults
POLL_S = 0.4             # how often a streaming handler looks at its job's events

FLAN_NOTE = ("FLAN-T5 was instruction-tuned on a mixture that includes WMT16 translation, so the base model's "
             "German is **not** a zero-shot result.")
EXAMPLES = ["The weather is nice today.", "I would like to thank the Commissioner for her answer.",
            "Obama receives Netanyahu.", "The European Parliament adopted the resolution."]
CSS = """
.notice {border-left: 4px solid #f59e0b; background: #fffbeb; padding: 8px 12px; border-radius: 6px;}
.status {font-family: ui-monospace, monospace; font-size: 0.95em;}
"""


# ---------------------------------------------------------------------------
# Helpers shared by the UI handlers and the API
# ---------------------------------------------------------------------------

def _lab() -> Lab:
    if LAB is None:
        raise RuntimeError("build_demo(lab) has not been called")
    return LAB


def _depth() -> int:
    cfg = _lab().loaded.model.config
    return min(cfg.num_layers, cfg.num_decoder_layers or cfg.num_layers)


def _model_modules() -> list[str]:
    from .inject import dense_sites

    found = {MODULE_PATH.match(s.path)["module"] for s in dense_sites(_lab().loaded.model)}
    return [m for m in MODULES if m in found]


def lora_config(rank, alpha, targets, side, first_layer, last_layer) -> LoraConfig:
    depth = _depth()
    last = depth - 1 if last_layer is None or last_layer == -1 else last_layer
    first = 0 if first_layer is None else first_layer
    layers = None if (first, last) == (0, depth - 1) else (first, last)
    return LoraConfig(rank=rank, alpha=alpha, targets=targets if targets is not None else (), side=side,
                      layers=layers)


def run_config(lora: LoraConfig, steps, batch_size, lr, train_size, seed, optimizer) -> RunConfig:
    return RunConfig(model=_lab().loaded.name, lora=lora,
                     train=TrainConfig(steps=steps, batch_size=batch_size, lr=lr, train_size=train_size, seed=seed,
                                       optimizer=optimizer))


def _status(job: Job, lab: Lab) -> dict:
    """Everything a client needs about a job, as plain values."""
    steps = [e for e in job.events if isinstance(e, StepLogged)]
    evals = [e for e in job.events if isinstance(e, EvalLogged)]
    failed = next((e for e in job.events if isinstance(e, RunFailed)), None)
    total = job.config.train.steps
    out = {"run_id": job.id, "status": job.status, "queue_position": lab.position(job), "total_steps": total,
           "step": steps[-1].step if steps else 0, "loss": steps[-1].loss if steps else None,
           "tokens_per_s": steps[-1].tokens_per_s if steps else None,
           "elapsed_s": steps[-1].elapsed_s if steps else 0.0, "eta_s": None,
           "losses": [[e.step, e.loss] for e in steps], "val_losses": [[e.step, e.val_loss] for e in evals],
           "summary": job.summary, "error": job.error or (f"{failed.reason}. {failed.hint}." if failed else "")}
    recent = [e for e in steps if e.compiled][-10:] or steps[-3:]
    if len(recent) >= 2 and job.status == "running":
        per_step = (recent[-1].elapsed_s - recent[0].elapsed_s) / (recent[-1].step - recent[0].step)
        out["eta_s"] = per_step * (total - out["step"])
    return out


def _status_line(s: dict) -> str:
    if s["status"] == "queued":
        return f"⏳ queued — position {s['queue_position']} in line (one training job runs at a time)"
    if s["status"] == "running" and s["step"] == 0:
        return "⚙️ preparing: adding the adapter, tokenising the data…"
    parts = [f"step {s['step']}/{s['total_steps']}"]
    if s["loss"] is not None:
        parts.append(f"loss {s['loss']:.3f}")
    if s["val_losses"]:
        parts.append(f"val {s['val_losses'][-1][1]:.3f}")
    if s["tokens_per_s"]:
        parts.append(f"{s['tokens_per_s']:,.0f} tok/s")
    parts.append(f"elapsed {s['elapsed_s']:.0f} s")
    if s["eta_s"] is not None:
        parts.append(f"ETA {s['eta_s']:.0f} s")
    icon = {"running": "🏃", "completed": "✅", "stopped": "⏹️", "failed": "❌"}.get(s["status"], "")
    line = f"{icon} {s['status']} · " + " · ".join(parts)
    if s["status"] in ("completed", "stopped") and s["summary"].get("first_loss_s") is not None:
        line += "  \n" + summary_text(s["status"], s["summary"]).replace("\n", "  \n").replace("->", "→")
    if s["error"]:
        line += f"  \n**{s['error']}**"
    return line


def _stream(job: Job) -> Iterator[dict]:
    """Poll a job until it ends, yielding its status whenever something new arrived."""
    lab, seen = _lab(), -1
    while True:
        done = job.done.is_set()
        key = (len(job.events), job.status, lab.position(job))
        if key != seen:
            seen = key
            yield _status(job, lab)
        if done:
            return
        job.done.wait(POLL_S)


def _session_of(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def _latest_with_adapter(session: str) -> Job | None:
    jobs = [j for j in _lab().session_jobs(session) if j.adapter is not None]
    return max(jobs, key=lambda j: j.created) if jobs else None


def _translate(text, run_id: str, scale, session: str) -> dict:
    sentences, notices = clean_sentences(text)
    if not isinstance(scale, (int, float)) or not 0.0 <= float(scale) <= 2.0:
        raise ConfigError(f"LoRA scale must be between 0 and 2, got {scale!r}")
    job = _lab().jobs.get(run_id) if run_id else _latest_with_adapter(session)
    if job is None and run_id:
        raise ConfigError(f"no run {run_id!r}")
    if job is not None and job.adapter is None:
        notices.append(f"run {job.id} has no adapter yet ({job.status}); showing the base model in both columns")
        job = None
    if job is None and not run_id:
        notices.append("no trained adapter in this session yet: an untrained LoRA equals the base model exactly")
    base, lora = _lab().translate(sentences, job.id if job else None, float(scale), session=session)
    return {"english": sentences, "base": base, "lora": lora, "run_id": job.id if job else "", "notices": notices}


# ---------------------------------------------------------------------------
# Public API: plain values in and out
# ---------------------------------------------------------------------------

def api_params(rank: int = 8, alpha: float = 16.0, targets: list[str] | None = None, side: str = "both",
               first_layer: int = 0, last_layer: int = -1) -> dict:
    """Exact parameter breakdown for a LoRA config on the loaded model (no training needed)."""
    try:
        cfg = lora_config(rank, alpha, ["q", "v"] if targets is None else targets, side, first_layer, last_layer)
        b = preview(_lab().loaded.model.config, cfg)
    except ConfigError as exc:
        raise gr.Error(str(exc)) from None
    return {**b.to_dict(), "rows": b.rows(), "config": {"rank": cfg.rank, "alpha": cfg.alpha,
                                                       "targets": list(cfg.targets), "side": cfg.side,
                                                       "layers": cfg.layers}}


def api_train(rank: int = 8, alpha: float = 16.0, targets: list[str] | None = None, side: str = "both",
              first_layer: int = 0, last_layer: int = -1, steps: int = _T.steps, batch_size: int = _T.batch_size,
              lr: float = _T.lr, train_size: int = _T.train_size, seed: int = _T.seed, optimizer: str = _T.optimizer,
              request: gr.Request = None) -> Iterator[dict]:
    """Queue a training run and stream its progress; the last message carries the summary."""
    try:
        cfg = run_config(lora_config(rank, alpha, ["q", "v"] if targets is None else targets, side, first_layer,
                                     last_layer), steps, batch_size, lr, train_size, seed, optimizer)
    except ConfigError as exc:
        raise gr.Error(str(exc)) from None
    yield from _stream(_lab().submit(cfg, _session_of(request)))


def api_stop(run_id: str = "", request: gr.Request = None) -> dict:
    """Stop a run (default: this session's newest unfinished run). Takes effect within one step."""
    session = _session_of(request)
    jobs = [j for j in _lab().session_jobs(session) if not j.done.is_set()]
    job = _lab().jobs.get(run_id) if run_id else (max(jobs, key=lambda j: j.created) if jobs else None)
    if job is None or job.session != session:
        raise gr.Error(f"no run {run_id!r} in this session" if run_id else "no run to stop in this session")
    _lab().stop(job.id)
    return {"run_id": job.id, "stop_requested": True, "status": job.status}


def api_translate(text: str, run_id: str = "", scale: float = 1.0, request: gr.Request = None) -> dict:
    """English lines -> base and LoRA German side by side (default run: this session's newest)."""
    try:
        return _translate(text, run_id, scale, _session_of(request))
    except ConfigError as exc:
        raise gr.Error(str(exc)) from None


# ---------------------------------------------------------------------------
# UI handlers
# ---------------------------------------------------------------------------

def ui_params(rank, alpha, targets, side, first_layer, last_layer):
    try:
        b = preview(_lab().loaded.model.config, lora_config(rank, alpha, targets, side, first_layer, last_layer))
    except ConfigError as exc:
        return f"<div class='notice'>⚠️ {exc}</div>", gr.skip(), gr.skip()
    summary = (f"**{b.trainable:,} trainable** of {b.total:,} parameters (**{b.pct_trainable:.3f}%**) · "
               f"frozen {b.frozen:,} · adapter **{b.adapter_mb:.3f} MB** (fp32)")
    rows = [[n, f"{p:,}", f"{t:,}", f"{pct:.3f}%"] for n, p, t, pct in b.rows()]
    return summary, rows, plots.params_figure(b.rows())


def ui_train(rank, alpha, targets, side, first_layer, last_layer, steps, batch_size, lr, train_size, seed,
             optimizer, session):
    session = session or str(uuid.uuid4())
    try:
        cfg = run_config(lora_config(rank, alpha, targets, side, first_layer, last_layer), steps, batch_size, lr,
                         train_size, seed, optimizer)
    except ConfigError as exc:
        raise gr.Error(str(exc)) from None
    job = _lab().submit(cfg, session)
    for s in _stream(job):
        fig = plots.loss_figure(s["losses"], s["val_losses"], s["total_steps"],
                                title=f"Loss · r={cfg.lora.rank}, {'+'.join(cfg.lora.targets)} · run {job.id}")
        yield _status_line(s), fig, job.id, session


def ui_stop(run_id):
    if not run_id:
        return "No run to stop."
    job = _lab().stop(run_id)
    return "⏹️ stop requested: the run ends after the current step" if job else f"no run {run_id}"


def ui_translate(text, scale, run_id, session):
    try:
        out = _translate(text, run_id or "", scale, session or "")
    except ConfigError as exc:
        raise gr.Error(str(exc)) from None
    rows = [list(r) for r in zip(out["english"], out["base"], out["lora"])]
    note = " · ".join(out["notices"])
    label = f"LoRA adapter of run {out['run_id']} at scale {float(scale):g}" if out["run_id"] else "no adapter yet"
    return rows, (f"{label}" + (f"  \n⚠️ {note}" if note else ""))


def ui_restore(session):
    """On page load: a stable session id, and this session's newest run (a reload loses nothing)."""
    session = session or str(uuid.uuid4())
    jobs = sorted(_lab().session_jobs(session), key=lambda j: j.created)
    if not jobs:
        return session, "", "Ready. Press **Train** to start a run.", plots.loss_figure([], [])
    s = _status(jobs[-1], _lab())
    return session, jobs[-1].id, _status_line(s), plots.loss_figure(s["losses"], s["val_losses"], s["total_steps"])


def ui_follow(run_id):
    """After a reload: keep streaming a run that is still going."""
    job = _lab().jobs.get(run_id) if run_id else None
    if job is None or job.done.is_set():
        return
    for s in _stream(job):
        yield _status_line(s), plots.loss_figure(s["losses"], s["val_losses"], s["total_steps"])


# ---------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------

def build_demo(lab: Lab) -> gr.Blocks:
    global LAB
    LAB = lab
    depth, modules, lim = _depth(), _model_modules(), limits()
    dflt = defaults_for(is_gpu())
    info = device_info()
    with gr.Blocks(title="LoRA Lab") as demo:
        session = gr.BrowserState("", storage_key="lora_lab_session")
        run_id = gr.State("")
        gr.Markdown(f"# 🧪 LoRA Lab\nLow-rank adaptation of **FLAN-T5** in TensorFlow, English → German on WMT16. "
                    f"Pick a rank and target layers, train for a minute, and compare base and LoRA translations.  \n"
                    f"Model: **{lab.loaded.label}** · device: **{info['name']}**")
        if lab.loaded.notice:
            gr.Markdown(f"⚠️ {lab.loaded.notice}", elem_classes=["notice"])
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                gr.Markdown("### 1 · LoRA config")
                rank = gr.Slider(1, 64, value=8, step=1, label="rank r")
                alpha = gr.Slider(1, 128, value=16, step=1, label="alpha (update scaled by alpha / r)")
                targets = gr.CheckboxGroup(modules, value=[m for m in ("q", "v") if m in modules],
                                           label="target modules (attention q/k/v/o, FFN wi*/wo)")
                side = gr.Radio(["both", "encoder", "decoder"], value="both", label="stacks")
                with gr.Row():
                    first = gr.Slider(0, depth - 1, value=0, step=1, label="first block")
                    last = gr.Slider(0, depth - 1, value=depth - 1, step=1, label="last block")
                gr.Markdown("### 2 · Training")
                with gr.Row():
                    steps = gr.Slider(1, lim.max_steps, value=dflt.steps, step=1, label="steps")
                    batch = gr.Slider(1, lim.max_batch_size, value=dflt.batch_size, step=1, label="batch size")
                with gr.Row():
                    lr = gr.Number(value=dflt.lr, label="learning rate", minimum=1e-6, maximum=1.0)
                    train_size = gr.Slider(8, lim.max_train_size, value=dflt.train_size, step=8,
                                           label="training pairs (WMT16 subset)")
                with gr.Row():
                    optimizer = gr.Dropdown([(OPTIMIZER_LABELS[o], o) for o in available_optimizers()],
                                            value="adamw", label="optimizer")
                    seed = gr.Number(value=0, precision=0, label="seed")
                with gr.Row():
                    train_btn = gr.Button("▶ Train", variant="primary")
                    stop_btn = gr.Button("⏹ Stop", variant="stop")
            with gr.Column(scale=3, min_width=420):
                status = gr.Markdown("Ready. Press **Train** to start a run.", elem_classes=["status"])
                loss_plot = gr.Plot(plots.loss_figure([], []), label="loss", show_label=False)
                gr.Markdown("### Parameter breakdown")
                summary = gr.Markdown()
                params_plot = gr.Plot(show_label=False)
                table = gr.Dataframe(headers=["component", "params", "trainable", "% of total"],
                                     interactive=False, wrap=True, column_widths=["34%", "24%", "22%", "20%"])
        gr.Markdown("### 3 · Translate: base vs LoRA\n" + FLAN_NOTE)
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                text = gr.Textbox(lines=4, label="English, one sentence per line", value=EXAMPLES[0])
                scale = gr.Slider(0, 2, value=1, step=0.05, label="LoRA scale (0 = base model, 1 = as trained)")
                translate_btn = gr.Button("Translate", variant="primary")
                gr.Examples([[e] for e in EXAMPLES], inputs=[text], label="examples")
            with gr.Column(scale=3):
                out_table = gr.Dataframe(headers=["English", "Base", "LoRA"], interactive=False, wrap=True,
                                         column_widths=["30%", "35%", "35%"])
                out_note = gr.Markdown()

        lora_inputs = [rank, alpha, targets, side, first, last]
        for c in lora_inputs:
            c.change(ui_params, lora_inputs, [summary, table, params_plot], api_visibility="private",
                     show_progress="hidden")
        demo.load(ui_params, lora_inputs, [summary, table, params_plot], api_visibility="private")
        demo.load(ui_restore, [session], [session, run_id, status, loss_plot], api_visibility="private").then(
            ui_follow, [run_id], [status, loss_plot], api_visibility="private", concurrency_limit=None)
        train_btn.click(ui_train, lora_inputs + [steps, batch, lr, train_size, seed, optimizer, session],
                        [status, loss_plot, run_id, session], api_visibility="private", concurrency_limit=None)
        stop_btn.click(ui_stop, [run_id], [status], api_visibility="private", concurrency_limit=None)
        for trigger in (translate_btn.click, text.submit):
            trigger(ui_translate, [text, scale, run_id, session], [out_table, out_note], api_visibility="private",
                    concurrency_limit=None)

        gr.api(api_params, api_name="params", concurrency_limit=None)
        gr.api(api_train, api_name="train", concurrency_limit=None)
        gr.api(api_stop, api_name="stop", concurrency_limit=None)
        gr.api(api_translate, api_name="translate", concurrency_limit=None)
    return demo


def launch(demo: gr.Blocks, **kwargs):
    return demo.queue(default_concurrency_limit=None).launch(css=CSS, theme=gr.themes.Soft(), **kwargs)
