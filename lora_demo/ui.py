"""The Gradio app: layout, handlers and the public API. The only module that imports gradio.

Handlers are thin: they validate through config.py, call the Lab (runs.py) and
turn run records into component updates through compare.py and plots.py. The
public endpoints (``params``, ``train``, ``sweep``, ``stop``, ``runs``,
``translate``) take and return plain values so that ``gradio_client`` scripts
can do everything the UI does.
"""

from __future__ import annotations

import functools
import html
import inspect
import tempfile
from pathlib import Path
from typing import Iterator

import gradio as gr

from . import anatomy, compare, owners, plots
from .config import (MODULES, ConfigError, LoraConfig, RunConfig, TrainConfig, clean_sentences, defaults_for,
                     limits, parse_layers, parse_ranks)
from .evaluate import sentence_chrf, word_diff
from .events import summary_text
from .inject import MODULE_PATH, dense_sites, select_paths
from .models import device_info, is_gpu
from .params import preview
from .runs import Job, Lab, summary_row
from .train import OPTIMIZER_LABELS, available_optimizers

LAB: Lab | None = None    # set by build_demo(); shared by every user, guarded inside Lab
_T = TrainConfig()        # API defaults are the config's defaults
POLL_S = 0.4              # how often a streaming handler looks at its job
DEFAULT_RANKS = "1,2,4,8,16"
AUTO_PLOT = 8             # at most this many newly seen runs are added to the charts by themselves

FLAN_NOTE = ("FLAN-T5 was instruction-tuned on a mixture that includes WMT16 translation, so the base model's "
             "German (and its BLEU) is **not** a zero-shot result.")
EXAMPLES = ["The weather is nice today.", "I would like to thank the Commissioner for her answer.",
            "Obama receives Netanyahu.", "The European Parliament adopted the resolution."]
CSS = """
.notice {border-left: 4px solid #f59e0b; background: #fffbeb; padding: 8px 12px; border-radius: 6px;}
.status {font-family: ui-monospace, monospace; font-size: 0.95em;}
.diff mark.changed {background: #fde68a; padding: 0 2px; border-radius: 3px;}
.diff table {width: 100%; border-collapse: collapse;} .diff td {padding: 4px 8px; vertical-align: top;}
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
    found = {MODULE_PATH.match(s.path)["module"] for s in dense_sites(_lab().loaded.model)}
    return [m for m in MODULES if m in found]


def lora_config(rank, alpha, targets, side, first_layer, last_layer) -> LoraConfig:
    depth = _depth()
    last = depth - 1 if last_layer is None or last_layer == -1 else last_layer
    first = 0 if first_layer is None else first_layer
    layers = None if (first, last) == (0, depth - 1) else (first, last)
    return LoraConfig(rank=rank, alpha=alpha, targets=targets if targets is not None else (), side=side,
                      layers=layers)


def run_config(lora: LoraConfig, steps, batch_size, lr, train_size, seed, optimizer, bleu_size=_T.bleu_size):
    return RunConfig(model=_lab().loaded.name, lora=lora,
                     train=TrainConfig(steps=steps, batch_size=batch_size, lr=lr, train_size=train_size, seed=seed,
                                       optimizer=optimizer, bleu_size=bleu_size))


def _status(job: Job, lab: Lab) -> dict:
    """Everything a client needs about a job, as plain values."""
    total = job.config.train.steps
    last = job.losses[-1] if job.losses else None
    out = {"run_id": job.id, "sweep": job.sweep, "rank": job.config.lora.rank, "status": job.status,
           "phase": job.phase, "queue_position": lab.position(job), "total_steps": total,
           "step": last[0] if last else 0, "loss": last[1] if last else None,
           "tokens_per_s": job.summary.get("last_tokens_per_s"), "elapsed_s": job.summary.get("elapsed_s", 0.0),
           "eta_s": job.eta_s(), "losses": [[s, v] for s, v, _ in job.losses], "val_losses": job.val_losses,
           "summary": {k: v for k, v in job.summary.items() if k != "last_tokens_per_s"},
           "quality": job.quality, "memory": job.memory, "error": job.error}
    return out


def _status_line(s: dict) -> str:
    if s["status"] == "queued":
        slots = _lab().slots
        return (f"⏳ queued: position {s['queue_position']} in line ("
                + ("one training job runs at a time)" if slots == 1 else f"{slots} training jobs run at a time)"))
    if s["status"] == "running" and s["step"] == 0:
        return "⚙️ preparing: adding the adapter, tokenising the data, first step…"
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
    icon = {"running": "🏃", "completed": "✅", "stopped": "⏹️", "failed": "❌", "interrupted": "⚠️"}
    line = f"{icon.get(s['status'], '')} {s['status']} · r={s['rank']} · " + " · ".join(parts)
    if s["phase"] == "evaluating":
        line += "  \n📏 scoring BLEU/chrF on the newstest2016 slice…"
    if s["status"] in ("completed", "stopped") and s["summary"].get("first_loss_s") is not None:
        line += "  \n" + summary_text(s["status"], s["summary"]).replace("\n", "  \n").replace("->", "→")
    q = s.get("quality")
    if q:
        line += (f"  \nBLEU base {q['base']['bleu']:.2f} → LoRA {q['lora']['bleu']:.2f} · chrF base "
                 f"{q['base']['chrf']:.2f} → LoRA {q['lora']['chrf']:.2f} ({q['n']} newstest2016 sentences)")
    if s["error"]:
        line += f"  \n**{s['error']}**"
    return line


def _stream(job: Job) -> Iterator[dict]:
    """Poll a job until it ends, yielding its status whenever something changed."""
    lab, seen = _lab(), None
    while True:
        done = job.done.is_set()
        key = (job.version, job.status, lab.position(job))
        if key != seen:
            seen = key
            yield _status(job, lab)
        if done:
            return
        job.done.wait(POLL_S)


def _session_of(request: gr.Request | None, owner_key: str = "") -> str:
    """The owner key an API call acts with: the one it presents, else its connection's own."""
    if owner_key:
        return owners.check(owner_key)
    return _lab().connection_key(getattr(request, "session_hash", None) or "anonymous")


def _gr_errors(fn):
    """ConfigError (bad input, not yours, not found) -> gr.Error, whose message the client sees."""
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


def _usable(job: Job) -> bool:
    return bool(job.adapter_files) and job.status != "failed" and job.config.model == _lab().loaded.name


def _keep(sides, blocks, modules) -> dict | None:
    """The part of the adapter left on in Translate; None when all of it is (the default)."""
    sides = list(sides) if sides is not None else ["encoder", "decoder"]
    bad = sorted(set(sides) - {"encoder", "decoder"})
    if bad:
        raise ConfigError(f"stacks to keep must be encoder and/or decoder, got {', '.join(map(str, bad))}")
    layers = parse_layers(blocks)
    if modules is not None:
        unknown = sorted(set(modules) - set(anatomy.COLUMNS))
        if unknown:
            raise ConfigError(f"unknown module type(s) {', '.join(map(str, unknown))}; they are "
                              f"{', '.join(anatomy.COLUMNS)}")
    if len(sides) == 2 and layers is None and (modules is None or set(anatomy.COLUMNS) <= set(modules)):
        return None
    return {"sides": tuple(sides), "blocks": layers, "modules": None if modules is None else tuple(modules)}


def _translate(text, run_id: str, scale, session: str, reference: str = "", keep: dict | None = None) -> dict:
    sentences, notices = clean_sentences(text)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= float(scale) <= 2.0:
        raise ConfigError(f"LoRA scale must be between 0 and 2, got {scale!r}")
    lab = _lab()
    if run_id:
        job = lab.jobs.get(run_id)
        if job is None:
            raise ConfigError(f"no run {run_id!r}")
    else:
        usable = [j for j in lab.runs(session) if _usable(j)]
        job = usable[-1] if usable else None
        if job is None:
            notices.append("no trained adapter in this session yet: an untrained LoRA equals the base model exactly")
    base, lora = lab.translate(sentences, job.id if job else None, float(scale), session=session, keep=keep)
    if keep and job is not None:
        notices.append(f"partly switched off: LoRA kept on {'+'.join(keep['sides']) or 'no stack'}"
                       + (f", blocks {keep['blocks'][0]}-{keep['blocks'][1]}" if keep["blocks"] else "")
                       + (f", modules {', '.join(keep['modules']) or 'none'}" if keep["modules"] is not None else ""))
    out = {"english": sentences, "base": base, "lora": lora, "run_id": job.id if job else "", "notices": notices,
           "chrf_base": None, "chrf_lora": None}
    refs = [" ".join(r.split()) for r in (reference or "").splitlines() if r.strip()]
    if refs:
        if len(refs) != len(sentences):
            notices.append(f"{len(refs)} reference lines for {len(sentences)} sentences: chrF needs one per line")
        else:
            out["chrf_base"] = [round(sentence_chrf(h, r), 2) for h, r in zip(base, refs)]
            out["chrf_lora"] = [round(sentence_chrf(h, r), 2) for h, r in zip(lora, refs)]
    return out


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


@_gr_errors
def api_train(rank: int = 8, alpha: float = 16.0, targets: list[str] | None = None, side: str = "both",
              first_layer: int = 0, last_layer: int = -1, steps: int = _T.steps, batch_size: int = _T.batch_size,
              lr: float = _T.lr, train_size: int = _T.train_size, seed: int = _T.seed, optimizer: str = _T.optimizer,
              bleu_size: int = _T.bleu_size, owner_key: str = "", request: gr.Request = None) -> Iterator[dict]:
    """Queue a training run and stream its progress; the last message carries the summary and BLEU/chrF.
    Every message carries ``owner_key``: with it, any client may stop, use or delete the run."""
    key = _session_of(request, owner_key)
    cfg = run_config(lora_config(rank, alpha, ["q", "v"] if targets is None else targets, side, first_layer,
                                 last_layer), steps, batch_size, lr, train_size, seed, optimizer, bleu_size)
    job = _lab().submit(cfg, key)
    for status in _stream(job):
        yield {**status, "owner_key": key}


@_gr_errors
def api_sweep(ranks: str = DEFAULT_RANKS, alpha: float = 16.0, targets: list[str] | None = None,
              side: str = "both", first_layer: int = 0, last_layer: int = -1, steps: int = _T.steps,
              batch_size: int = _T.batch_size, lr: float = _T.lr, train_size: int = _T.train_size,
              seed: int = _T.seed, optimizer: str = _T.optimizer, bleu_size: int = _T.bleu_size,
              owner_key: str = "", request: gr.Request = None) -> Iterator[dict]:
    """Train the same config at each rank (same seed and data order); stream every run's status."""
    key = _session_of(request, owner_key)
    ranks_list = parse_ranks(ranks)
    cfg = run_config(lora_config(ranks_list[0], alpha, ["q", "v"] if targets is None else targets, side,
                                 first_layer, last_layer), steps, batch_size, lr, train_size, seed, optimizer,
                     bleu_size)
    jobs = _lab().submit_sweep(cfg, ranks_list, key)
    for job in jobs:
        for _ in _stream(job):
            yield {"sweep": job.sweep, "runs": [_status(j, _lab()) for j in jobs], "owner_key": key}


@_gr_errors
def api_stop(run_id: str = "", owner_key: str = "", request: gr.Request = None) -> dict:
    """Stop a run or a whole sweep (default: this session's newest unfinished run). Within one step."""
    session = _session_of(request, owner_key)
    mine = [j for j in _lab().runs(session) if not j.done.is_set()]
    if run_id:
        owned = [j for j in _lab().runs(session) if run_id in (j.id, j.sweep)]
        if not owned:
            raise ConfigError(f"no run or sweep {run_id!r} in this session")
        target = run_id
    elif mine:
        target = mine[-1].sweep or mine[-1].id
    else:
        raise ConfigError("no run to stop in this session")
    job = _lab().stop(target)
    # the step the run had logged when the request arrived: it ends after at most one more
    return {"stopped": target, "stop_requested": True, "step_at_request": job.losses[-1][0] if job.losses else 0}


@_gr_errors
def api_delete_run(run_id: str, owner_key: str = "", request: gr.Request = None) -> dict:
    """Delete one of this session's finished runs and its files (to make room under the run limit)."""
    return {"deleted": _lab().delete(run_id, _session_of(request, owner_key)).id}


@_gr_errors
def api_runs(all_runs: bool = False, owner_key: str = "", request: gr.Request = None) -> list[dict]:
    """Recorded runs of this session (or of the whole server with all_runs), oldest first."""
    session = _session_of(request, owner_key)
    return [summary_row(j, session) for j in _lab().runs(None if all_runs else session)]


@_gr_errors
def api_translate(text: str, run_id: str = "", scale: float = 1.0, reference: str = "",
                  sides: list[str] | None = None, blocks: str = "all", modules: list[str] | None = None,
                  owner_key: str = "", request: gr.Request = None) -> dict:
    """English lines -> base and LoRA German side by side (default run: this session's newest).
    With reference German (one line per sentence), per-sentence chrF for both. ``sides``, ``blocks``
    and ``modules`` keep only part of the adapter on (e.g. sides=["decoder"], modules=["self q"])."""
    return _translate(text, run_id, scale, _session_of(request, owner_key), reference,
                      _keep(sides, blocks, modules))


# ---------------------------------------------------------------------------
# UI handlers
# ---------------------------------------------------------------------------

def ui_params(rank, alpha, targets, side, first_layer, last_layer):
    try:
        b = preview(_lab().loaded.model.config, lora_config(rank, alpha, targets, side, first_layer, last_layer))
    except ConfigError as exc:
        return f"<div class='notice'>⚠️ {html.escape(str(exc))}</div>", gr.skip(), gr.skip()
    summary = (f"**{b.trainable:,} trainable** of {b.total:,} parameters (**{b.pct_trainable:.3f}%**) · "
               f"frozen {b.frozen:,} · adapter **{b.adapter_mb:.3f} MB** (fp32)")
    rows = [[n, f"{p:,}", f"{t:,}", f"{pct:.3f}%"] for n, p, t, pct in b.rows()]
    return summary, rows, plots.params_figure(b.rows())


def _live(job: Job, s: dict):
    lora = job.config.lora
    # x-axis: while running, up to twice the current step (capped at the run's length), so early
    # points of a long run are not squeezed against the y-axis; once it has ended, the steps it did.
    span = min(s["total_steps"], max(2 * s["step"], 20)) if s["status"] in ("queued", "running") \
        else max(s["step"], 1)
    fig = plots.loss_figure(job.record(), span,
                            title=f"Loss · r={lora.rank}, {'+'.join(lora.targets)} · run {job.id}")
    return _status_line(s), fig


def ui_train(rank, alpha, targets, side, first_layer, last_layer, steps, batch_size, lr, train_size, seed,
             optimizer, bleu_size, session):
    session = session or owners.new_key()
    try:
        cfg = run_config(lora_config(rank, alpha, targets, side, first_layer, last_layer), steps, batch_size, lr,
                         train_size, seed, optimizer, bleu_size)
        job = _lab().submit(cfg, session)
    except ConfigError as exc:
        raise gr.Error(str(exc)) from None
    for s in _stream(job):
        yield *_live(job, s), job.id, session


def ui_sweep(ranks, alpha, targets, side, first_layer, last_layer, steps, batch_size, lr, train_size, seed,
             optimizer, bleu_size, session):
    session = session or owners.new_key()
    try:
        ranks_list = parse_ranks(ranks)
        cfg = run_config(lora_config(ranks_list[0], alpha, targets, side, first_layer, last_layer), steps,
                         batch_size, lr, train_size, seed, optimizer, bleu_size)
        jobs = _lab().submit_sweep(cfg, ranks_list, session)
    except ConfigError as exc:
        raise gr.Error(str(exc)) from None
    for i, job in enumerate(jobs):
        for s in _stream(job):
            status, fig = _live(job, s)
            yield f"**Rank sweep {i + 1}/{len(jobs)}** (ranks {', '.join(map(str, ranks_list))})  \n{status}", \
                fig, job.sweep, session


def ui_stop(run_id):
    if not run_id:
        return "No run to stop."
    job = _lab().stop(run_id)
    what = "the sweep's remaining runs are cancelled and the current one ends" if run_id.startswith("sweep-") \
        else "the run ends"
    return f"⏹️ stop requested: {what} after the current step" if job else f"no run {run_id}"


def _visible(session, show_all) -> list[Job]:
    return _lab().runs(None if show_all else (session or ""))


def _run_label(job: Job) -> str:
    lora = job.config.lora
    q = f", BLEU {job.quality['lora']['bleu']:.1f}" if job.quality else ""
    return f"r={lora.rank} {'+'.join(lora.targets)} · {job.status}{q} · {job.id}"


def ui_runs(session, show_all, selected, curves, log_y, x_axis, metric, seen, force=True):
    """Refresh the run list, comparison table and charts (skipped when nothing changed)."""
    jobs = _visible(session, show_all)
    key = ",".join(f"{j.id}:{j.version}" for j in jobs) + f"|{show_all}"
    if not force and key == seen:
        return (gr.skip(),) * 9 + (seen,)
    ids = [j.id for j in jobs]
    known = {part.split(":")[0] for part in (seen or "").split("|")[0].split(",") if part}
    kept = [i for i in (selected or []) if i in ids]
    new = [i for i in ids if i not in known and i not in kept][-AUTO_PLOT:]  # new runs join the charts
    chosen = kept + new
    records = [j.record() for j in jobs]
    shown = [r for r in records if r["run_id"] in chosen]
    mine = [j for j in _lab().runs(session or "") if _usable(j)]
    choices = [(_run_label(j), j.id) for j in mine]

    def newest():   # one update per dropdown: Gradio may consume an update dict as it applies it
        return gr.update(choices=choices, value=mine[-1].id if mine else None)

    return (compare.table(records),
            gr.update(choices=[(_run_label(j), j.id) for j in jobs], value=chosen),
            plots.loss_overlay(shown, "train" in (curves or []), "validation" in (curves or []), bool(log_y),
                               "tokens" if x_axis == "training tokens" else "step", title="Loss by run (colour = rank)"),
            plots.quality_figure(shown, "chrf" if metric == "chrF" else "bleu"),
            newest(), newest(), gr.skip(), newest(),
            gr.update(choices=choices, value=mine[-2].id if len(mine) > 1 else None),
            key)


def ui_runs_tick(*args):
    return ui_runs(*args, force=False)


def ui_export(session, show_all):
    records = [j.record() for j in _visible(session, show_all)]
    if not records:
        raise gr.Error("no runs to export yet")
    path = Path(tempfile.mkdtemp(prefix="lora-lab-")) / "lora_lab_runs.csv"
    path.write_text(compare.to_csv(records), encoding="utf-8")
    return gr.update(value=str(path), visible=True)


def _diff_html(english, base, lora) -> str:
    def words(pairs):
        return " ".join(f"<mark class='changed'>{html.escape(w)}</mark>" if changed else html.escape(w)
                        for w, changed in pairs)
    rows = []
    for en, b, l in zip(english, base, lora):
        bw, lw = word_diff(b, l)
        rows.append(f"<tr><td>{html.escape(en)}</td><td>{words(bw)}</td><td>{words(lw)}</td></tr>")
    return ("<div class='diff'><b>Where base and LoRA differ</b> (highlighted words)<table><tr><th>English</th>"
            "<th>Base</th><th>LoRA</th></tr>" + "".join(rows) + "</table></div>")


def ui_translate(text, scale, run_id, reference, session, sides, blocks, modules):
    try:
        out = _translate(text, run_id or "", scale, session or "", reference, _keep(sides, blocks, modules))
    except ConfigError as exc:
        raise gr.Error(str(exc)) from None
    scored = out["chrf_base"] is not None
    rows = [[en, b, l] + ([cb, cl] if scored else []) for en, b, l, cb, cl in
            zip(out["english"], out["base"], out["lora"], out["chrf_base"] or [None] * len(out["english"]),
                out["chrf_lora"] or [None] * len(out["english"]))]
    headers = ["English", "Base", "LoRA"] + (["chrF base", "chrF LoRA"] if scored else [])
    widths = ["24%", "28%", "28%", "10%", "10%"] if scored else ["30%", "35%", "35%"]
    label = f"LoRA = adapter of run {out['run_id']} at scale {float(scale):g}" if out["run_id"] else "no adapter yet"
    note = label + "".join(f"  \n⚠️ {n}" for n in out["notices"])
    return (gr.update(value=rows, headers=headers, column_widths=widths),
            _diff_html(out["english"], out["base"], out["lora"]), note)


def ui_restore(session):
    """On page load: a stable session id, and this session's newest run (a reload loses nothing)."""
    session = session or owners.new_key()
    jobs = _lab().runs(session)
    if not jobs:
        return session, "", "Ready. Press **Train** to start a run.", plots.loss_figure(None)
    job = jobs[-1]
    status, fig = _live(job, _status(job, _lab()))
    return session, job.sweep or job.id, status, fig


def ui_follow(run_id):
    """After a reload: keep streaming a run (or the current run of a sweep) that is still going."""
    lab = _lab()
    jobs = [j for j in lab.jobs.values() if run_id and run_id in (j.id, j.sweep) and not j.done.is_set()]
    for job in sorted(jobs, key=lambda j: j.created):
        for s in _stream(job):
            yield _live(job, s)


def _adapter_info(job: Job) -> str:
    """What a run's adapter is and what it weighs, measured on disk."""
    lora, size = job.config.lora, (job.adapter_files or {}).get("bytes", 0)
    blocks = "all blocks" if lora.layers is None else f"blocks {lora.layers[0]}-{lora.layers[1]}"
    n_layers = len(select_paths([site.path for site in dense_sites(_lab().loaded.model)], lora))
    text = (f"**{job.id}** · r={lora.rank}, alpha={lora.alpha:g} on **{'+'.join(lora.targets)}** "
            f"({lora.side}, {blocks}) · {n_layers} adapted layers × 2 matrices · "
            f"**{job.params.get('trainable', 0):,} parameters** · adapter file **{size / 1e6:.3f} MB** "
            f"({size:,} bytes, fp32 safetensors)")
    origin = job.origin or {}
    if origin.get("kind") == "imported":
        made = f" for {origin['base_model']}" if origin.get("base_model") else ""
        text += f"  \nimported from {origin.get('file') or 'an upload'} (made{made})"
        text += "".join(f"  \n⚠️ {n}" for n in origin.get("notices") or [])
    return text


def _file_paths(files) -> list[str]:
    """gr.File (type "filepath") gives a path, a list of paths, or None."""
    return [] if not files else [str(f) for f in (files if isinstance(files, list) else [files])]


def _zip_of(make, run_id, session: str) -> str:
    """``make`` is Lab.adapter_zip or Lab.export_merged; a refusal becomes a message for the user."""
    try:
        return str(make(run_id, session))
    except ConfigError as exc:
        raise gr.Error(str(exc)) from None


def _import(files, session: str) -> Job:
    paths = _file_paths(files)
    if not paths:
        raise ConfigError("choose an adapter zip, or its adapter_config.json and adapter_model.safetensors")
    name = ", ".join(Path(p).name for p in paths)
    return _lab().import_adapter(paths, session, name=name)


def ui_adapter_pick(run_id, session):
    if not run_id:
        return "Train a run or import an adapter; its files and size show here."
    try:
        return _adapter_info(_lab().owned(run_id, session or ""))
    except ConfigError as exc:
        return f"⚠️ {html.escape(str(exc))}"


def ui_delete(run_id, session):
    try:
        job = _lab().delete(run_id, session or "")
    except ConfigError as exc:
        return f"⚠️ {html.escape(str(exc))}"
    return f"🗑 run **{job.id}** and its files were deleted."


def ui_download_adapter(run_id, session):
    return gr.update(value=_zip_of(_lab().adapter_zip, run_id, session or ""), visible=True)


def ui_download_merged(run_id, session, progress=gr.Progress()):
    progress(0.1, desc="merging the adapter into a copy of the base model and saving it")
    return gr.update(value=_zip_of(_lab().export_merged, run_id, session or ""), visible=True)


def ui_import(files, session):
    """Upload -> validated run of this session; errors stay on screen and change nothing."""
    session = session or owners.new_key()
    try:
        job = _import(files, session)
    except ConfigError as exc:
        names = ", ".join(Path(p).name for p in _file_paths(files))
        return (f"❌ **Not imported** ({html.escape(names) or 'no file'}): {html.escape(str(exc))}",
                gr.update(value=None), session)
    return (f"✅ imported as run **{job.id}**; pick it under *Translate*.  \n{_adapter_info(job)}",
            gr.update(value=None), session)


@_gr_errors
def api_import_adapter(files, owner_key: str | None = None, request: gr.Request = None):
    """Import an adapter (a zip, or adapter_config.json + adapter_model.safetensors) into this session."""
    key = _session_of(request, owner_key or "")
    job = _import(files, key)
    return {"run_id": job.id, "owner_key": key, "status": job.status, "rank": job.config.lora.rank, "alpha": job.config.lora.alpha,
            "targets": list(job.config.lora.targets), "side": job.config.lora.side,
            "layers": list(job.config.lora.layers) if job.config.lora.layers else None,
            "adapter_bytes": job.adapter_files["bytes"], "trainable": job.params.get("trainable"),
            "notices": job.origin.get("notices", [])}


@_gr_errors
def api_download_adapter(run_id, owner_key: str | None = None, request: gr.Request = None):
    """This session's run ``run_id`` as a zip of its PEFT adapter directory."""
    return str(_lab().adapter_zip(run_id, _session_of(request, owner_key or "")))


@_gr_errors
def api_download_merged(run_id, owner_key: str | None = None, request: gr.Request = None):
    """This session's run ``run_id`` merged into the base model: a zip of a TF save_pretrained checkpoint."""
    return str(_lab().export_merged(run_id, _session_of(request, owner_key or "")))


# ---------------------------------------------------------------------------
# Inside the adapter, and the budget
# ---------------------------------------------------------------------------

def _mb(n) -> str:
    return "–" if n is None else f"{n / 1e6:,.3f} MB"


def budget_markdown(pred: dict) -> str:
    """Predicted budget: this LoRA config, full fine-tuning, and the course demo's setup."""
    lo, fu, emb = pred["lora"], pred["full"], pred["lora_plus_shared_embedding"]
    step = f"{lo['step_s_est']:.2f} s (est.)" if lo["step_s_est"] else "–"
    rows = [
        ("trainable parameters", f"{lo['trainable']:,}", f"{fu['trainable']:,}", f"{emb['trainable']:,}"),
        ("% of all weights", f"**{lo['pct_trainable']:.3f}%**", f"{fu['pct_trainable']:.1f}%",
         f"**{emb['pct_trainable']:.2f}%**"),
        ("trained weights to save", _mb(lo["adapter_bytes"]), _mb(fu["adapter_bytes"]), _mb(emb["adapter_bytes"])),
        (f"optimiser state ({pred['optimizer']}, {pred['optimizer_slots']} slots)", _mb(lo["optimizer_bytes"]),
         _mb(fu["optimizer_bytes"]), _mb(emb["optimizer_bytes"])),
        ("activations per step (estimate)", _mb(lo["activation_bytes_est"]), _mb(fu["activation_bytes_est"]), "–"),
        ("step time", step, "–", "–"),
    ]
    out = ["| predicted | LoRA (this config) | full fine-tuning | LoRA + shared embedding trainable |",
           "| --- | --- | --- | --- |"] + [f"| {' | '.join(r)} |" for r in rows]
    out.append(f"\nThe last column is the course demo this app grew from: it left the shared embedding trainable, "
               f"which is where its \"9% trainable\" came from. Step time: {pred['step_basis']}.")
    return "\n".join(out)


def ui_budget(rank, alpha, targets, side, first_layer, last_layer, steps, batch_size, lr, train_size, seed,
              optimizer, bleu_size):
    try:
        cfg = run_config(lora_config(rank, alpha, targets, side, first_layer, last_layer), steps, batch_size, lr,
                         train_size, seed, optimizer, bleu_size)
    except ConfigError as exc:
        return f"⚠️ {html.escape(str(exc))}"
    return budget_markdown(_lab().predict(cfg))


def budget_rows_markdown(b: dict) -> str:
    def fmt(v, name):
        if v is None:
            return "–"
        if name.startswith("trainable"):
            return f"{int(v):,}"
        return f"{v:.3f}" if "time" in name else f"{v:,.3f}"
    lines = ["| figure | predicted | measured | off by | how |", "| --- | --- | --- | --- | --- |"]
    for name, p, m, off, how in b["rows"]:
        lines.append(f"| {name} | {fmt(p, name)} | {fmt(m, name)} | {'–' if off is None else f'{off:+.1f}%'} "
                     f"| {how} |")
    return "\n".join(lines)


def _layer_rows(info: dict) -> list[list]:
    return [[x["layer"], round(x["fro"], 5), None if x["relative"] is None else round(x["relative"], 6),
             f"{x['effective_rank']} / {x['rank']}"] for x in sorted(info["layers"], key=lambda x: -x["fro"])]


def ui_inspect(run_a, run_b, session):
    """Heatmap, spectra, per-layer table and budget of run A; φ between A and B."""
    lab, session = _lab(), session or ""
    if not run_a:
        msg = "Train a run (or import an adapter) and pick it here."
        return (plots.delta_heatmap(None), plots.spectra_figure(None), [], msg, plots.similarity_figure(None), "")
    try:
        info = lab.inspect(run_a, session)
    except ConfigError as exc:
        return (plots.delta_heatmap(None), plots.spectra_figure(None), [], f"⚠️ {html.escape(str(exc))}",
                plots.similarity_figure(None), "")
    s = info["summary"]
    text = (f"**{s['layers']} adapted layers** · mean effective rank **{s['mean_effective_rank']:.2f}** of r = "
            f"{info['rank']} (σ's holding {100 * info['energy']:.0f}% of ‖ΔW‖²) · largest update: `{s['largest']}`"
            + (f" · largest ‖ΔW‖/‖W‖: {s['max_relative']:.2e}" if s["max_relative"] is not None else ""))
    try:
        text += "\n\n**Budget, predicted when queued vs measured:**\n\n" + budget_rows_markdown(lab.budget(run_a, session))
    except ConfigError as exc:
        text += f"\n\n{html.escape(str(exc))}"
    sim_fig, sim_text = plots.similarity_figure(None), "Pick a second run to compare subspaces."
    if run_b and run_b != run_a:
        try:
            sim = lab.similarity(run_a, run_b, session)
            sim_fig = plots.similarity_figure(sim)
            sim_text = (f"Mean φ over {len(sim['layers'])} shared layers: **{sim['mean_phi_k']:.3f}** for the top "
                        f"{sim['k']} directions, **{sim['mean_phi_1']:.3f}** for the top one (chance: "
                        f"{sim['chance_phi_k']:.3f}). 1 means r={sim['ranks'][0]} and r={sim['ranks'][1]} found the "
                        f"same directions." if sim["mean_phi_k"] is not None else "Both adapters are zero: no "
                        "directions to compare.")
        except ConfigError as exc:
            sim_text = f"⚠️ {html.escape(str(exc))}"
    return (plots.delta_heatmap(info), plots.spectra_figure(info), _layer_rows(info), text, sim_fig, sim_text)


@_gr_errors
def api_inspect(run_id: str, owner_key: str = "", request: gr.Request = None) -> dict:
    """ΔW of each adapted layer: ‖ΔW‖_F, ‖ΔW‖/‖W‖, singular values, effective rank; the heatmap grid."""
    return _lab().inspect(run_id, _session_of(request, owner_key))


@_gr_errors
def api_similarity(run_a: str, run_b: str, owner_key: str = "", request: gr.Request = None) -> dict:
    """Subspace similarity φ (Hu et al. 2021, sec. 7) per shared layer between two of this session's runs."""
    return _lab().similarity(run_a, run_b, _session_of(request, owner_key))


@_gr_errors
def api_budget(run_id: str, owner_key: str = "", request: gr.Request = None) -> dict:
    """A run's budget predicted when it was queued, beside what it measured."""
    return _lab().budget(run_id, _session_of(request, owner_key))


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
        run_id = gr.State("")        # the run (or sweep id) that Stop stops
        seen = gr.State("")          # what the run list last showed, to skip unchanged refreshes
        gr.Markdown(f"# 🧪 LoRA Lab\nLow-rank adaptation of **FLAN-T5** in TensorFlow, English → German on WMT16. "
                    f"Pick a rank and target layers, train for a minute, compare runs, and compare base and "
                    f"LoRA translations.  \nModel: **{lab.loaded.label}** · device: **{info['name']}** · "
                    f"training in **{lab.precision}** · TensorFlow {info['tensorflow']}")
        if lab.loaded.notice:
            gr.Markdown(f"⚠️ {lab.loaded.notice}", elem_classes=["notice"])
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                gr.Markdown("### 1 · LoRA config")
                rank = gr.Slider(1, 64, value=8, step=1, label="rank r", elem_id="rank")
                alpha = gr.Slider(1, 128, value=16, step=1, label="alpha (update scaled by alpha / r)")
                targets = gr.CheckboxGroup(modules, value=[m for m in ("q", "v") if m in modules],
                                           label="target modules (attention q/k/v/o, FFN wi*/wo)")
                side = gr.Radio(["both", "encoder", "decoder"], value="both", label="stacks")
                with gr.Row():
                    first = gr.Slider(0, depth - 1, value=0, step=1, label="first block")
                    last = gr.Slider(0, depth - 1, value=depth - 1, step=1, label="last block")
                gr.Markdown("### 2 · Training")
                with gr.Row():
                    steps = gr.Slider(1, lim.max_steps, value=dflt.steps, step=1, label="steps", elem_id="steps")
                    batch = gr.Slider(1, lim.max_batch_size, value=dflt.batch_size, step=1, label="batch size")
                with gr.Row():
                    lr = gr.Number(value=dflt.lr, label="learning rate", minimum=1e-6, maximum=1.0)
                    train_size = gr.Slider(8, lim.max_train_size, value=dflt.train_size, step=8,
                                           label="training pairs (WMT16)")
                with gr.Row():
                    optimizer = gr.Dropdown([(OPTIMIZER_LABELS[o], o) for o in available_optimizers()],
                                            value="adamw", label="optimizer")
                    seed = gr.Number(value=0, precision=0, label="seed")
                bleu_size = gr.Slider(0, 500, value=dflt.bleu_size, step=10,
                                      label="BLEU/chrF sentences after the run (newstest2016; 0 = skip)")
                with gr.Row():
                    train_btn = gr.Button("▶ Train", variant="primary", elem_id="train-btn")
                    stop_btn = gr.Button("⏹ Stop", variant="stop", elem_id="stop-btn")
                with gr.Row(equal_height=True):
                    ranks = gr.Textbox(DEFAULT_RANKS, label="rank sweep: ranks", scale=2)
                    sweep_btn = gr.Button("Sweep ranks", scale=1)
            with gr.Column(scale=3, min_width=420):
                status = gr.Markdown("Ready. Press **Train** to start a run.", elem_classes=["status"], elem_id="status")
                loss_plot = gr.Plot(plots.loss_figure(None), label="loss", show_label=False, elem_id="loss-plot")
                gr.Markdown("### Parameter breakdown")
                summary = gr.Markdown(elem_id="breakdown")
                params_plot = gr.Plot(show_label=False)
                table = gr.Dataframe(headers=["component", "params", "trainable", "% of total"],
                                     interactive=False, wrap=True, column_widths=["34%", "24%", "22%", "20%"])
                gr.Markdown("### Predicted budget: this config vs full fine-tuning")
                budget_md = gr.Markdown(elem_id="budget")

        gr.Markdown("### 3 · Runs: compare ranks")
        with gr.Row():
            show_all = gr.Checkbox(False, label="show all runs on this server (not only this browser's)")
            refresh_btn = gr.Button("↻ Refresh", size="sm")
            export_btn = gr.Button("Export CSV", size="sm")
        export_file = gr.File(label="comparison CSV", visible=False)
        runs_table = gr.Dataframe(headers=compare.COLUMNS, interactive=False, wrap=True, max_height=320,
                                  column_widths=compare.WIDTHS)
        picked = gr.CheckboxGroup([], label="runs in the charts")
        with gr.Row():
            curves = gr.CheckboxGroup(["train", "validation"], value=["train", "validation"], label="curves")
            log_y = gr.Checkbox(False, label="log-scale loss")
            x_axis = gr.Radio(["step", "training tokens"], value="step", label="x-axis")
            metric = gr.Radio(["BLEU", "chrF"], value="BLEU", label="quality metric")
        with gr.Row(equal_height=False):
            overlay_plot = gr.Plot(show_label=False)
            quality_plot = gr.Plot(show_label=False)

        gr.Markdown("### 4 · Translate: base vs LoRA\n" + FLAN_NOTE)
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                run_pick = gr.Dropdown([], label="LoRA run (this browser's runs)", allow_custom_value=False)
                text = gr.Textbox(lines=4, label="English, one sentence per line", value=EXAMPLES[0], elem_id="en-text")
                reference = gr.Textbox(lines=2, label="reference German, one line per sentence (optional: "
                                                      "per-sentence chrF)")
                scale = gr.Slider(0, 2, value=1, step=0.05, label="LoRA scale (0 = base model, 1 = as trained)")
                with gr.Accordion("Switch parts of the adapter off (no retraining)", open=False):
                    keep_sides = gr.CheckboxGroup(["encoder", "decoder"], value=["encoder", "decoder"],
                                                  label="keep LoRA on in these stacks", elem_id="keep-sides")
                    keep_blocks = gr.Textbox("all", label="…in these blocks (e.g. 0-3, or all)")
                    keep_modules = gr.CheckboxGroup(anatomy.COLUMNS, value=anatomy.COLUMNS,
                                                    label="…for these module types (self-/cross-attention, FFN)")
                translate_btn = gr.Button("Translate", variant="primary", elem_id="translate-btn")
                gr.Examples([[e] for e in EXAMPLES], inputs=[text], label="examples")
            with gr.Column(scale=3):
                out_table = gr.Dataframe(headers=["English", "Base", "LoRA"], interactive=False, wrap=True,
                                         column_widths=["30%", "35%", "35%"], elem_id="translations")
                diff = gr.HTML()
                out_note = gr.Markdown()

        gr.Markdown("### 5 · Adapters: download, import, merged export\n"
                    "Adapters are saved in PyTorch **PEFT** format (`adapter_config.json` + "
                    "`adapter_model.safetensors`): `PeftModel.from_pretrained(base, folder)` loads one as-is. "
                    "Adapters made by PEFT for the same base model import here. The merged export is a full "
                    "TensorFlow checkpoint (`TFAutoModelForSeq2SeqLM.from_pretrained`) with the adapter folded in.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                adapter_pick = gr.Dropdown([], label="run (this browser's runs)", allow_custom_value=False)
                adapter_info = gr.Markdown("Train a run or import an adapter; its files and size show here.")
                with gr.Row():
                    adapter_btn = gr.Button("⬇ Adapter (.zip, PEFT format)", size="sm")
                    merged_btn = gr.Button("⬇ Merged model (.zip, TF checkpoint)", size="sm")
                    delete_btn = gr.Button("🗑 Delete run", size="sm", variant="stop")
                download_file = gr.File(label="download", visible=False, interactive=False)
            with gr.Column(scale=2):
                upload = gr.File(file_count="multiple", file_types=[".zip", ".json", ".safetensors"],
                                 label=f"import: an adapter zip, or adapter_config.json + adapter_model.safetensors "
                                       f"(safetensors only; up to {lim.max_upload_mb} MB)")
                import_btn = gr.Button("Import adapter", variant="secondary")
                import_note = gr.Markdown()
        gr.Markdown("### 6 · Inside the adapter: what it learned, where, and what it cost\n"
                    "For each adapted layer, the update ΔW = (alpha/r)·A·B, computed exactly. The heatmap shows "
                    "‖ΔW‖_F per block and module: *where* the model changed. The spectra show how much of the "
                    "rank you paid for was used (effective rank: singular values holding 90% of ‖ΔW‖²). φ compares "
                    "two runs' top directions per layer (Hu et al. 2021, section 7): does r=8 learn what r=64 "
                    "learns?")
        with gr.Row():
            inspect_pick = gr.Dropdown([], label="run", allow_custom_value=False, elem_id="inspect-pick")
            compare_pick = gr.Dropdown([], label="compare with (another rank)", allow_custom_value=False)
            inspect_btn = gr.Button("Inspect", variant="primary", elem_id="inspect-btn")
        inspect_md = gr.Markdown(elem_id="inspect-summary")
        with gr.Row(equal_height=False):
            heatmap_plot = gr.Plot(show_label=False, elem_id="delta-heatmap")
            spectra_plot = gr.Plot(show_label=False, elem_id="spectra")
        layer_table = gr.Dataframe(headers=["layer", "‖ΔW‖_F", "‖ΔW‖ / ‖W‖", "effective rank / r"],
                                   interactive=False, max_height=260, column_widths=["52%", "16%", "16%", "16%"])
        sim_md = gr.Markdown()
        sim_plot = gr.Plot(show_label=False, elem_id="similarity")

        # Public, session-bound endpoints for API clients (their session is the connection's).
        api_btn = gr.Button(visible=False)
        api_run, api_file, api_json = gr.Textbox(visible=False), gr.File(visible=False), gr.JSON(visible=False)
        api_key = gr.Textbox(visible=False)

        # -- events ------------------------------------------------------------
        private = dict(api_visibility="private")
        lora_inputs = [rank, alpha, targets, side, first, last]
        train_inputs = [steps, batch, lr, train_size, seed, optimizer, bleu_size, session]
        runs_inputs = [session, show_all, picked, curves, log_y, x_axis, metric, seen]
        runs_outputs = [runs_table, picked, overlay_plot, quality_plot, run_pick, adapter_pick, export_file,
                        inspect_pick, compare_pick, seen]
        for c in lora_inputs:
            c.change(ui_params, lora_inputs, [summary, table, params_plot], show_progress="hidden", **private)
        demo.load(ui_params, lora_inputs, [summary, table, params_plot], **private)
        budget_inputs = lora_inputs + train_inputs[:-1]
        for c in budget_inputs:
            c.change(ui_budget, budget_inputs, [budget_md], show_progress="hidden", **private)
        demo.load(ui_budget, budget_inputs, [budget_md], **private)
        inspect_outputs = [heatmap_plot, spectra_plot, layer_table, inspect_md, sim_plot, sim_md]
        for trigger in (inspect_btn.click, inspect_pick.input, compare_pick.input):
            trigger(ui_inspect, [inspect_pick, compare_pick, session], inspect_outputs, **private)
        demo.load(ui_restore, [session], [session, run_id, status, loss_plot], **private).then(
            ui_runs, runs_inputs, runs_outputs, **private).then(
            ui_follow, [run_id], [status, loss_plot], concurrency_limit=None, **private)
        train_btn.click(ui_train, lora_inputs + train_inputs, [status, loss_plot, run_id, session],
                        concurrency_limit=None, **private).then(ui_runs, runs_inputs, runs_outputs, **private)
        sweep_btn.click(ui_sweep, [ranks] + lora_inputs[1:] + train_inputs, [status, loss_plot, run_id, session],
                        concurrency_limit=None, **private).then(ui_runs, runs_inputs, runs_outputs, **private)
        stop_btn.click(ui_stop, [run_id], [status], concurrency_limit=None, **private)
        for c in (show_all, curves, log_y, x_axis, metric):
            c.change(ui_runs, runs_inputs, runs_outputs, show_progress="hidden", **private)
        picked.input(ui_runs, runs_inputs, runs_outputs, show_progress="hidden", **private)
        refresh_btn.click(ui_runs, runs_inputs, runs_outputs, **private)
        gr.Timer(3).tick(ui_runs_tick, runs_inputs, runs_outputs, show_progress="hidden", **private)
        export_btn.click(ui_export, [session, show_all], [export_file], **private)
        for trigger in (translate_btn.click, text.submit):
            trigger(ui_translate, [text, scale, run_pick, reference, session, keep_sides, keep_blocks, keep_modules],
                    [out_table, diff, out_note],
                    concurrency_limit=None, **private)

        adapter_pick.change(ui_adapter_pick, [adapter_pick, session], [adapter_info], show_progress="hidden",
                            **private)
        adapter_btn.click(ui_download_adapter, [adapter_pick, session], [download_file], **private)
        merged_btn.click(ui_download_merged, [adapter_pick, session], [download_file], **private)
        delete_btn.click(ui_delete, [adapter_pick, session], [adapter_info], **private).then(
            ui_runs, runs_inputs, runs_outputs, **private)
        import_btn.click(ui_import, [upload, session], [import_note, upload, session], **private).then(
            ui_runs, runs_inputs, runs_outputs, **private)
        api_btn.click(api_import_adapter, [upload, api_key], [api_json], api_name="import_adapter")
        api_btn.click(api_download_adapter, [api_run, api_key], [api_file], api_name="download_adapter")
        api_btn.click(api_download_merged, [api_run, api_key], [api_file], api_name="download_merged")

        gr.api(api_params, api_name="params", concurrency_limit=None)
        gr.api(api_train, api_name="train", concurrency_limit=None)
        gr.api(api_sweep, api_name="sweep", concurrency_limit=None)
        gr.api(api_stop, api_name="stop", concurrency_limit=None)
        gr.api(api_runs, api_name="runs", concurrency_limit=None)
        gr.api(api_translate, api_name="translate", concurrency_limit=None)
        gr.api(api_delete_run, api_name="delete_run", concurrency_limit=None)
        gr.api(api_inspect, api_name="inspect", concurrency_limit=None)
        gr.api(api_similarity, api_name="similarity", concurrency_limit=None)
        gr.api(api_budget, api_name="budget", concurrency_limit=None)
    return demo


def launch(demo: gr.Blocks, **kwargs):
    # Uploads over the limit are refused by the server before any handler sees them.
    kwargs.setdefault("max_file_size", limits().max_upload_mb * 2**20)
    return demo.queue(default_concurrency_limit=None).launch(css=CSS, theme=gr.themes.Soft(), **kwargs)
