"""The Train tab: one screen to learn on. On the left the knobs a learner moves (the lesson, the rank, the
target modules), Train and Stop, and what the setup trains; every other setting folded under "More
settings", whose label shows their values. On the right the run as it goes: one progress line (the result
card once it has ended), the live loss chart and the sample sentences' German; the expert statistics under
"Details"."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import gradio as gr

from lora_demo import data
from lora_demo.app import guard, sharing
from lora_demo.app.breakdown import ui_budget, ui_params
from lora_demo.app.common import (DEFAULT_RANKS, PRIVATE, READY, SAMPLE_WIDTHS, Form, Shared, about, browser_key, depth, live,
                                   loss_of, modules, refused, run_label, samples_frame)
from lora_demo.core import settings
from lora_demo.core.config import (MAX_SAMPLES, METHOD_LABELS, METHOD_LR, METHODS, SIDES, LoraConfig, defaults_for,
                                   expand_sweep, parse_methods, parse_ranks)
from lora_demo.core.models import is_gpu
from lora_demo.lab import Lab
from lora_demo.present import plots
from lora_demo.training.optimisers import OPTIMIZER_LABELS, available_optimizers

# elem_id -> settings key of every numeric control: the page's guard (guard.py) refuses what is out of range
NUMERIC = {"rank": "rank", "alpha": "alpha", "loraplus-ratio": "ratio", "steps": "steps", "batch": "batch",
           "lr": "lr", "pairs": "pairs", "seed": "seed", "seeds": "seeds", "bleu-size": "bleu", "eval-every": "eval",
           "patience": "patience", "ckpt-every": "ckpt"}
GUARDED = ["train-btn", "sweep-btn", "methods-btn", "resume-btn"]


@dataclass
class Configure:
    """What the app chains on: the form, the live views and the events other sections follow."""

    form: Form
    status: gr.HTML
    loss_plot: gr.Plot
    views: list                     # card area, loss plot, samples table, details, optimiser plot: a run's live view
    smoothing: gr.Slider
    run_pick: gr.Dropdown
    breakdown: dict                 # event specs (fn, inputs, outputs): demo.load runs them too
    budget: dict
    from_url: dict
    sharing: dict
    address: dict
    more: dict                      # the "More settings" label, which shows the folded values
    trained: object                 # the Train, Sweep, Compare and Resume click events
    swept: object
    compared: object
    resumed: object


def _slider(key: str, value, elem_id: str | None = None, **more) -> gr.Slider:
    """The page control of a numeric setting: its limits and label from the settings table."""
    st = settings.BY_KEY[key]
    return guard.Slider(st.lo, st.top, value=value, step=st.step, label=st.label, elem_id=elem_id or key, **more)


def _number(key: str, value, elem_id: str | None = None, **more) -> gr.Number:
    st = settings.BY_KEY[key]
    return guard.Number(value=value, label=st.label, minimum=st.lo, maximum=st.top, elem_id=elem_id or key, **more)


def _label(key: str) -> str:
    return settings.BY_KEY[key].label


def _knobs(lab: Lab) -> dict:
    """The knobs on the first screen: the lesson, the rank and the target modules."""
    dflt, d, found = defaults_for(is_gpu()), LoraConfig(), modules(lab)
    lesson = gr.Dropdown([(x.label, x.name) for x in data.LESSONS.values()], value=dflt.data, label=_label("data"),
                         elem_id="data")
    rank = _slider("rank", d.rank)
    targets = gr.CheckboxGroup(found, value=[m for m in d.targets if m in found], label=_label("targets"),
                               elem_id="targets")
    return dict(data=lesson, rank=rank, targets=targets)


def _lora_fields(lab: Lab) -> dict:
    blocks, d = depth(lab), LoraConfig()
    with gr.Row():
        method = gr.Dropdown([(METHOD_LABELS[m], m) for m in METHODS], value=d.method, label=_label("method"),
                             elem_id="method", scale=3)
        ratio = _number("ratio", d.loraplus_ratio, "loraplus-ratio", visible=False, scale=1)
    with gr.Row():
        alpha = _slider("alpha", d.alpha)
        side = gr.Radio(list(SIDES), value=d.side, label=_label("stacks"), elem_id="stacks")
    with gr.Row():
        first = gr.Slider(0, blocks - 1, value=0, step=1, label="first block", elem_id="first-block")
        last = gr.Slider(0, blocks - 1, value=blocks - 1, step=1, label="last block", elem_id="last-block")
    return dict(method=method, ratio=ratio, alpha=alpha, side=side, first=first, last=last)


def _training_fields() -> dict:
    dflt = defaults_for(is_gpu())
    with gr.Row():
        steps = _slider("steps", dflt.steps)
        batch = _slider("batch", dflt.batch_size)
    with gr.Row():
        lr = _number("lr", dflt.lr)
        train_size = _slider("pairs", dflt.train_size)
    with gr.Row():
        optimizer = gr.Dropdown([(OPTIMIZER_LABELS[o], o) for o in available_optimizers()],
                                value=dflt.optimizer, label=_label("optimizer"), elem_id="optimizer")
        seed = _number("seed", dflt.seed, precision=0)
        seeds = _slider("seeds", settings.BY_KEY["seeds"].default)
    with gr.Row():
        bleu_size = _slider("bleu", dflt.bleu_size, "bleu-size")
        eval_every = _slider("eval", dflt.eval_every, "eval-every")
    with gr.Row():
        early_stop = _slider("patience", dflt.early_stop)
        checkpoint = _slider("ckpt", dflt.checkpoint_every, "ckpt-every")
    samples = gr.Textbox("\n".join(dflt.samples), lines=3, max_lines=MAX_SAMPLES, elem_id="samples",
                         label=f"{settings.BY_FIELD['train.samples'].label} (up to {MAX_SAMPLES})")
    return dict(steps=steps, batch=batch, lr=lr, train_size=train_size, optimizer=optimizer, seed=seed,
                bleu_size=bleu_size, seeds=seeds, eval_every=eval_every, early_stop=early_stop,
                checkpoint=checkpoint, samples=samples)


def _more_actions() -> SimpleNamespace:
    """Sweeps, method comparisons, resume and duplicate, the shared link: inside "More settings"."""
    with gr.Row(equal_height=True):
        ranks = gr.Textbox(DEFAULT_RANKS, label=_label("ranks"), scale=3, elem_id="ranks")
        sweep_btn = gr.Button("Sweep ranks", scale=1, elem_id="sweep-btn")
    with gr.Row(equal_height=True):
        methods = gr.Textbox(settings.BY_KEY["methods"].default, label=f"{_label('methods')} (LoRA+ and full "
                             f"fine-tuning at their own learning rates: "
                             f"{', '.join(f'{m} {r:g}' for m, r in METHOD_LR.items())})", scale=3, elem_id="methods")
        methods_btn = gr.Button("Compare methods", scale=1, elem_id="methods-btn")
    with gr.Row(equal_height=True):
        run_pick = gr.Dropdown([], label="a run of this browser", elem_id="run-pick", scale=3)
        dup_btn = gr.Button("⧉ Duplicate settings", elem_id="duplicate-btn", scale=1, size="sm")
    with gr.Row(equal_height=True):
        resume_steps = guard.Number(0, precision=0, minimum=0, label="resume to step (0 = as planned)",
                                    elem_id="resume-steps", scale=2)
        resume_btn = gr.Button("⏯ Resume", elem_id="resume-btn", scale=1, size="sm")
    with gr.Accordion("🔗 Share this setup, or run it from a terminal", open=False, elem_id="share"):
        gr.Markdown("The page's address holds every control: opening the link restores them (nothing "
                    "starts). For a class, add `&hide=optimizer,seed` (any controls) to hide them.")
        with gr.Row(equal_height=True):
            link = gr.Textbox(label="link to this setup", elem_id="share-link", interactive=False, scale=4,
                              buttons=["copy"])
            copy_btn = gr.Button("🔗 Copy link", elem_id="copy-link", scale=1, size="sm")
        cli = gr.Textbox(label="the same runs from a terminal (python -m lora_demo; the same seed gives the "
                               "same losses)", lines=6, interactive=False, elem_id="cli-command", buttons=["copy"])
    return SimpleNamespace(**{k: v for k, v in locals().items()})


def _view() -> SimpleNamespace:
    """The right-hand column: the card area, the loss chart and the sample table (hidden until a run has
    data: no empty chart), and the details."""
    status = gr.HTML(READY, elem_id="status")
    loss_plot = gr.Plot(label="loss", show_label=False, elem_id="loss-plot", visible=False)
    samples_tbl = gr.Dataframe(samples_frame(None), interactive=False, wrap=True, elem_id="samples-table",
                               column_widths=SAMPLE_WIDTHS, visible=False, label="Watch the German change",
                               show_label=True)
    with gr.Accordion("Details: every figure of the run", open=False, elem_id="details-box"):
        details = gr.Markdown(elem_id="details")
        with gr.Row():
            smoothing = gr.Slider(0, 0.99, value=plots.DEFAULT_SMOOTHING, step=0.01, elem_id="smoothing",
                                  label="train-loss smoothing (EMA, as in TensorBoard; 0 = off)")
            show_optim = gr.Checkbox(False, label="show learning rate and gradient norm", elem_id="show-optim")
        optim_plot = gr.Plot(show_label=False, visible=False, elem_id="optim-plot")
    return SimpleNamespace(**{k: v for k, v in locals().items()})


def build(lab: Lab, shared: Shared) -> Configure:
    """Build the Train tab (the knobs, the live view, everything else folded) and wire it."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=4, min_width=300, elem_id="knobs"):
            fields_ = _knobs(lab)
            why = gr.Markdown(_why(fields_["data"].value), elem_id="lesson-why", elem_classes=["why"])
            with gr.Row():
                train_btn = gr.Button("▶ Train", variant="primary", elem_id="train-btn", scale=2)
                stop_btn = gr.Button("⏹ Stop", variant="stop", elem_id="stop-btn", scale=1)
            summary = gr.Markdown(elem_id="breakdown")
            with gr.Accordion("More settings", open=False, elem_id="more-settings") as more:
                fields_.update(_lora_fields(lab))
                fields_.update(_training_fields())
                act = _more_actions()
            with gr.Accordion("Parameter breakdown and predicted budget", open=False, elem_id="breakdown-box"):
                params_plot = gr.Plot(show_label=False)
                table = gr.Dataframe(headers=["component", "params", "trainable", "% of total"], interactive=False,
                                     wrap=True, column_widths=["34%", "24%", "22%", "20%"])
                budget_md = gr.Markdown(elem_id="budget")
            share_note = gr.Markdown(elem_id="share-note")   # what a shared link restored, hid or could not use
        with gr.Column(scale=7, min_width=480, elem_id="live"):
            view = _view()
    act.train_btn, act.stop_btn, act.share_note = train_btn, stop_btn, share_note
    view.summary, view.params_plot, view.table, view.budget_md = summary, params_plot, table, budget_md
    form = Form(**fields_)
    breakdown, budget, filled, folded = _wire_form(lab, form, view, more, why)
    from_url, sharing_, address = sharing.wire(lab, form, act)
    *clicked, duplicated = _wire_runs(lab, form, shared, act, view)
    for programmatic in (filled, duplicated):   # controls set by code: the link follows once
        programmatic.then(**sharing_).then(**address)
    return Configure(form, view.status, view.loss_plot,
                     [view.status, view.loss_plot, view.samples_tbl, view.details, view.optim_plot],
                     view.smoothing, act.run_pick, breakdown, budget, from_url, sharing_, address, folded, *clicked)


def _why(lesson: str) -> str:
    return data.LESSONS[lesson].short


def _lesson_picked(lesson: str, pairs) -> tuple:
    """The lesson's note, and its training pairs: the slider's top is what the lesson offers, and a value
    above it comes down to it, said in the note."""
    top = data.LESSONS[lesson].train_pairs
    if isinstance(pairs, (int, float)) and pairs > top:
        return (f"{_why(lesson)}  \n⚠️ training pairs set to {top:,}: this lesson has no more.",
                gr.update(maximum=top, value=top))
    return _why(lesson), gr.update(maximum=top)


def more_label(lab: Lab, form: Form, v: dict) -> dict:
    """The folded settings' values, in the accordion's label (so they show while it is closed)."""
    named = form.named(v)
    seeds = int(named.get("seeds") or 1)
    method = named.get("method", "lora")
    parts = [("LoRA" if method == "lora" else method), f"alpha {named.get('alpha'):g}" if named.get("alpha") else "",
             f"{named.get('steps')} steps", f"batch {named.get('batch')}", f"lr {named.get('lr'):g}"
             if isinstance(named.get("lr"), (int, float)) else "lr ?",
             OPTIMIZER_LABELS.get(named.get("optimizer"), named.get("optimizer") or ""),
             f"{int(named.get('pairs')):,} pairs" if isinstance(named.get("pairs"), (int, float)) else "",
             f"seed {named.get('seed')}" + (f" (+{seeds - 1} more)" if seeds > 1 else ""),
             f"scored on {named.get('bleu')}" if named.get("bleu") else "not scored",
             f"eval every {named.get('eval')}"]
    return gr.update(label="More settings: " + " · ".join(p for p in parts if p))


def _wire_form(lab: Lab, form: Form, view, more, why) -> tuple[dict, dict, object, dict]:
    """The parameter breakdown and the predicted budget follow the form; so do the lesson's note and the
    folded settings' label."""
    shows = dict(summary=view.summary, table=view.table, params_plot=view.params_plot)
    breakdown = dict(fn=partial(ui_params, lab, form, shows), inputs=form.lora_components,
                     outputs=[view.summary, view.table, view.params_plot], **PRIVATE)
    for c in form.lora_components:
        c.change(show_progress="hidden", **breakdown)
    budgeted = dict(fn=partial(ui_budget, lab, form), inputs=form.components, outputs=[view.budget_md], **PRIVATE)
    folded = dict(fn=partial(more_label, lab, form), inputs=form.components, outputs=[more], **PRIVATE)
    for c in form.components:
        c.change(show_progress="hidden", **budgeted)
        c.change(show_progress="hidden", **folded)
    form.data.input(_lesson_picked, [form.data, form.train_size], [why, form.train_size], show_progress="hidden",
                    **PRIVATE)
    # each method's measured learning rate fills in (LoRA+ and full fine-tuning want smaller ones); editable
    form_lr = defaults_for(is_gpu()).lr
    filled = form.method.input(lambda m: (gr.update(visible=m == "loraplus"), METHOD_LR.get(m, form_lr)),
                               [form.method], [form.ratio, form.lr], show_progress="hidden", **PRIVATE)
    view.show_optim.change(lambda on: gr.update(visible=bool(on)), [view.show_optim], [view.optim_plot],
                           show_progress="hidden", **PRIVATE)
    return breakdown, budgeted, filled, folded


def _wire_runs(lab: Lab, form: Form, shared: Shared, act, view) -> tuple:
    """Train, Sweep, Compare, Stop, Resume and Duplicate; the smoothing redraws the followed run."""
    outputs = [view.status, view.loss_plot, view.samples_tbl, view.details, view.optim_plot, shared.run_id,
               shared.session]
    run = dict(concurrency_limit=None, **PRIVATE)
    trained = act.train_btn.click(partial(ui_train, lab, form, shared, view.smoothing),
                                  form.components | {shared.session, view.smoothing}, outputs, **run)
    swept = act.sweep_btn.click(partial(ui_sweep, lab, form, shared, act.ranks, view.smoothing),
                                form.components | {shared.session, act.ranks, view.smoothing}, outputs, **run)
    compared = act.methods_btn.click(partial(ui_methods, lab, form, shared, act.methods, view.smoothing),
                                     form.components | {shared.session, act.methods, view.smoothing}, outputs, **run)
    act.stop_btn.click(partial(ui_stop, lab), [shared.run_id, view.status], [view.status], **run)
    resumed = act.resume_btn.click(partial(ui_resume, lab, shared, view.smoothing, act.run_pick, act.resume_steps),
                                   {shared.session, view.smoothing, act.run_pick, act.resume_steps}, outputs, **run)
    duplicated = act.dup_btn.click(partial(ui_duplicate, lab, form, shared, act.run_pick, view.status),
                                   {shared.session, act.run_pick}, [*form.components, view.status], **PRIVATE)
    view.smoothing.change(partial(ui_redraw, lab), [shared.run_id, view.smoothing], [view.loss_plot],
                          show_progress="hidden", **PRIVATE)
    return trained, swept, compared, resumed, duplicated


# ---------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------

@refused
def ui_train(lab: Lab, form: Form, shared: Shared, smoothing, v: dict):
    session = browser_key(v[shared.session])
    seeds = form.seed_list(v)
    if len(seeds) > 1:   # the same run once per seed: a one-rank sweep
        yield from _stream(lab, lab.submit_sweep(expand_sweep(form.run(lab, v), [v[form.rank]], seeds), session), session,
                           v[smoothing], f"Repeat with {len(seeds)} seeds ({', '.join(map(str, seeds))})")
        return
    job = lab.submit(form.run(lab, v), session)
    for s in lab.watch(job):
        yield *live(lab, job, s, v[smoothing]), job.id, session


@refused
def ui_sweep(lab: Lab, form: Form, shared: Shared, ranks, smoothing, v: dict):
    session = browser_key(v[shared.session])
    ranks_list, seeds = parse_ranks(v[ranks]), form.seed_list(v)
    jobs = lab.submit_sweep(expand_sweep(form.run(lab, v, rank=ranks_list[0]), ranks_list, seeds), session)
    yield from _stream(lab, jobs, session, v[smoothing],
                       f"Rank sweep (ranks {', '.join(map(str, ranks_list))}"
                       + (f"; seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "") + ")")


@refused
def ui_methods(lab: Lab, form: Form, shared: Shared, methods, smoothing, v: dict):
    """The form's config with each listed method, once per seed: one click for the comparison."""
    session = browser_key(v[shared.session])
    method_list, seeds = parse_methods(v[methods]), form.seed_list(v)
    jobs = lab.submit_sweep(expand_sweep(form.run(lab, v, method=method_list[0]), [v[form.rank]], seeds, method_list,
                                         lrs=METHOD_LR), session)
    rates = "; ".join(f"{m} at lr {METHOD_LR[m]:g}" for m in method_list if m in METHOD_LR)
    yield from _stream(lab, jobs, session, v[smoothing],
                       f"Method comparison ({', '.join(method_list)} at r={int(v[form.rank])}"
                       + (f"; seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "")
                       + (f"; {rates}, the rest at the form's" if rates else "") + ")")


def _stream(lab: Lab, jobs, session: str, smoothing: float, title: str):
    for i, job in enumerate(jobs):
        for s in lab.watch(job):
            status, *views = live(lab, job, s, smoothing)
            yield (f"<div class='progress'>{title}, run {i + 1}/{len(jobs)}</div>{status}", *views, job.sweep,
                   session)


def ui_redraw(lab: Lab, run_id: str, smoothing: float):
    """The loss chart of the followed run (the newest of a sweep) with another smoothing."""
    jobs = sorted((j for j in lab.jobs.values() if run_id and run_id in (j.id, j.sweep)), key=lambda j: j.created)
    started = [j for j in jobs if j.losses] or jobs
    if not started:
        return gr.skip()
    return loss_of(started[-1], lab.status(started[-1]), smoothing)


@refused
def ui_duplicate(lab: Lab, form: Form, shared: Shared, run_pick, status, v: dict) -> dict:
    """A run's settings into the controls (edit them, then Train): nothing starts."""
    job = lab.session_job(v[run_pick], browser_key(v[shared.session]))
    values = settings.values_of(job.config, depth(lab))
    out: dict = {comp: (values[name][i] if len(comps) == 2 else values[name])
                 for name, comps in form.shared().items() for i, comp in enumerate(comps)}
    out[form.samples] = "\n".join(job.config.train.samples)
    out[form.ratio] = gr.update(value=values["ratio"], visible=values["method"] == "loraplus")
    out[status] = (f"<div class='progress'>⧉ The settings of run {job.id} ({run_label(job)}) are in the controls: "
                   "edit them, then press Train.</div>")
    return out


@refused
def ui_resume(lab: Lab, shared: Shared, smoothing, run_pick, resume_steps, v: dict):
    """Continue the chosen run from its newest checkpoint, and follow it."""
    session = browser_key(v[shared.session])
    steps = int(v[resume_steps] or 0)
    job = lab.resume(v[run_pick], session, steps or None)
    for s in lab.watch(job):
        yield *live(lab, job, s, v[smoothing]), job.id, session


def ui_stop(lab: Lab, run_id: str, shown: str) -> str:
    """Stop the followed run; the card area says so under what it shows."""
    if not run_id:
        gr.Warning("No run to stop.")
        return gr.skip()
    job = lab.stop(run_id)
    what = "the sweep's remaining runs are cancelled and the current one ends" if run_id.startswith("sweep-") \
        else "the run ends"
    note = f"⏹️ Stop requested: {what} after the current step." if job else f"No run {run_id}."
    return f"{shown or ''}<div class='progress'>{note}</div>"


def ui_restore(lab: Lab, session: str):
    """On page load: the browser's owner key, and its newest run (a reload loses nothing)."""
    session = browser_key(session)
    jobs = lab.runs(session)
    if not jobs:
        return session, "", READY, gr.skip(), gr.skip(), about(lab, data.DEFAULT_LESSON), gr.skip()
    job = jobs[-1]
    return (session, job.sweep or job.id, *live(lab, job, lab.status(job)))


def ui_follow(lab: Lab, run_id: str):
    """After a reload: keep streaming a run (or the current run of a sweep) that is still going."""
    jobs = [j for j in lab.jobs.values() if run_id and run_id in (j.id, j.sweep) and not j.done.is_set()]
    if not jobs:
        # Nothing to follow: say so with one skip. A generator that yields nothing ends with None for every
        # output, which would blank the card, the loss chart and the sample table ui_restore just filled.
        yield gr.skip()
        return
    for job in sorted(jobs, key=lambda j: j.created):
        for s in lab.watch(job):
            yield live(lab, job, s)

