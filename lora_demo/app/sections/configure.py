"""Sections 1 and 2: the LoRA config and training controls, Train / Stop / Sweep, the live status and
loss curve, the exact parameter breakdown and the predicted budget."""

from __future__ import annotations

import html
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import gradio as gr

from lora_demo.app.common import (DEFAULT_RANKS, PRIVATE, READY, Form, Shared, browser_key, depth, errors, live, loss_of,
                                   modules, run_label, SAMPLE_WIDTHS, samples_frame)
from lora_demo.core.config import (MAX_SAMPLES, METHOD_LABELS, METHOD_LR, METHODS, SIDES, ConfigError, LoraConfig,
                                   defaults_for, expand_sweep, parse_methods, parse_ranks)
from lora_demo.core import settings
from lora_demo.core.models import is_gpu
from lora_demo.core.params import preview
from lora_demo.lab import Lab
from lora_demo.present import plots, share
from lora_demo.training.optimisers import OPTIMIZER_LABELS, available_optimizers


@dataclass
class Configure:
    """What the app chains on: the form, the live views and the events other sections follow."""

    form: Form
    status: gr.Markdown
    loss_plot: gr.Plot
    views: list                     # status, loss plot, samples table, optimiser plot: a run's live view
    smoothing: gr.Slider
    run_pick: gr.Dropdown
    breakdown: dict                 # event specs (fn, inputs, outputs): demo.load runs them too
    budget: dict
    from_url: dict
    sharing: dict
    address: dict
    trained: object                 # the Train, Sweep, Compare and Resume click events
    swept: object
    compared: object
    resumed: object


def _slider(key: str, value, elem_id: str | None = None, **more) -> gr.Slider:
    """The page control of a numeric setting: its limits and label from the settings table."""
    st = settings.BY_KEY[key]
    return gr.Slider(st.lo, st.top, value=value, step=st.step, label=st.label, elem_id=elem_id or key, **more)


def _number(key: str, value, elem_id: str | None = None, **more) -> gr.Number:
    st = settings.BY_KEY[key]
    return gr.Number(value=value, label=st.label, minimum=st.lo, maximum=st.top, elem_id=elem_id or key, **more)


def _label(key: str) -> str:
    return settings.BY_KEY[key].label


def _lora_fields(lab: Lab) -> dict:
    blocks, found, d = depth(lab), modules(lab), LoraConfig()
    with gr.Row():
        method = gr.Dropdown([(METHOD_LABELS[m], m) for m in METHODS], value=d.method, label=_label("method"),
                             elem_id="method", scale=3)
        ratio = _number("ratio", d.loraplus_ratio, "loraplus-ratio", visible=False, scale=1)
    rank = _slider("rank", d.rank)
    alpha = _slider("alpha", d.alpha)
    targets = gr.CheckboxGroup(found, value=[m for m in d.targets if m in found], label=_label("targets"),
                               elem_id="targets")
    side = gr.Radio(list(SIDES), value=d.side, label=_label("stacks"), elem_id="stacks")
    with gr.Row():
        first = gr.Slider(0, blocks - 1, value=0, step=1, label="first block", elem_id="first-block")
        last = gr.Slider(0, blocks - 1, value=blocks - 1, step=1, label="last block", elem_id="last-block")
    return dict(method=method, ratio=ratio, rank=rank, alpha=alpha, targets=targets, side=side, first=first, last=last)


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
    bleu_size = _slider("bleu", dflt.bleu_size, "bleu-size")
    with gr.Row():
        data = gr.Dropdown([("news (newstest2008–2010; held-out: newstest2014)", "news"),
                            ("Europarl (WMT16 train; held-out: rows 19,500+)", "europarl")],
                           value=dflt.data, label=_label("data"), elem_id="data")
        seeds = _slider("seeds", settings.BY_KEY["seeds"].default)
    with gr.Accordion("Evaluation, early stopping and sample sentences", open=False, elem_id="eval-options"):
        with gr.Row():
            eval_every = _slider("eval", dflt.eval_every, "eval-every")
            early_stop = _slider("patience", dflt.early_stop)
            checkpoint = _slider("ckpt", dflt.checkpoint_every, "ckpt-every")
        samples = gr.Textbox("\n".join(dflt.samples), lines=3, max_lines=MAX_SAMPLES,
                             label=f"{settings.BY_FIELD['train.samples'].label} (up to {MAX_SAMPLES})")
    return dict(steps=steps, batch=batch, lr=lr, train_size=train_size, optimizer=optimizer, seed=seed,
                bleu_size=bleu_size, data=data, seeds=seeds, eval_every=eval_every, early_stop=early_stop,
                checkpoint=checkpoint, samples=samples)


def _actions() -> SimpleNamespace:
    with gr.Row():
        train_btn = gr.Button("▶ Train", variant="primary", elem_id="train-btn")
        stop_btn = gr.Button("⏹ Stop", variant="stop", elem_id="stop-btn")
    with gr.Row(equal_height=True):
        run_pick = gr.Dropdown([], label="a run of this browser", elem_id="run-pick", scale=3)
        dup_btn = gr.Button("⧉ Duplicate settings", elem_id="duplicate-btn", scale=1, size="sm")
        resume_steps = gr.Number(0, precision=0, minimum=0, label="resume to step (0 = as planned)",
                                 elem_id="resume-steps", scale=1)
        resume_btn = gr.Button("⏯ Resume", elem_id="resume-btn", scale=1, size="sm")
    with gr.Row(equal_height=True):
        ranks = gr.Textbox(DEFAULT_RANKS, label=_label("ranks"), scale=2)
        sweep_btn = gr.Button("Sweep ranks", scale=1)
    with gr.Row(equal_height=True):
        methods = gr.Textbox(settings.BY_KEY["methods"].default, label=f"{_label('methods')} (each repeated with the N seeds; "
                             "LoRA+ and full fine-tuning at their own measured learning rates: "
                             f"{', '.join(f'{m} {r:g}' for m, r in METHOD_LR.items())})", scale=2, elem_id="methods")
        methods_btn = gr.Button("Compare methods", scale=1, elem_id="methods-btn")
    with gr.Accordion("🔗 Share this setup, or run it from a terminal", open=False, elem_id="share"):
        gr.Markdown("The page's address holds every control: opening the link restores them (nothing "
                    "starts). For a class, add `&hide=optimizer,seed` (any controls) to hide them.")
        with gr.Row(equal_height=True):
            link = gr.Textbox(label="link to this setup", elem_id="share-link", interactive=False, scale=4,
                              buttons=["copy"])
            copy_btn = gr.Button("🔗 Copy link", elem_id="copy-link", scale=1, size="sm")
        cli = gr.Textbox(label="the same runs from a terminal (python -m lora_demo; the same seed gives the "
                               "same losses)", lines=6, interactive=False, elem_id="cli-command", buttons=["copy"])
    share_note = gr.Markdown(elem_id="share-note")   # what a shared link restored, hid or could not use
    return SimpleNamespace(**{k: v for k, v in locals().items()})


def _view() -> SimpleNamespace:
    status = gr.Markdown(READY, elem_classes=["status"], elem_id="status")
    loss_plot = gr.Plot(plots.loss_figure(None), label="loss", show_label=False, elem_id="loss-plot")
    with gr.Row():
        smoothing = gr.Slider(0, 0.99, value=plots.DEFAULT_SMOOTHING, step=0.01, elem_id="smoothing",
                              label="train-loss smoothing (EMA, as in TensorBoard; 0 = off)")
        show_optim = gr.Checkbox(False, label="show learning rate and gradient norm", elem_id="show-optim")
    optim_plot = gr.Plot(plots.optim_figure(None), show_label=False, visible=False, elem_id="optim-plot")
    gr.Markdown("#### Watch the German change: the sample sentences at each evaluation")
    samples_tbl = gr.Dataframe(samples_frame(None), interactive=False, wrap=True, elem_id="samples-table",
                               column_widths=SAMPLE_WIDTHS)
    gr.Markdown("### Parameter breakdown")
    summary = gr.Markdown(elem_id="breakdown")
    params_plot = gr.Plot(show_label=False)
    table = gr.Dataframe(headers=["component", "params", "trainable", "% of total"],
                         interactive=False, wrap=True, column_widths=["34%", "24%", "22%", "20%"])
    gr.Markdown("### Predicted budget: this config vs full fine-tuning")
    budget_md = gr.Markdown(elem_id="budget")
    return SimpleNamespace(**{k: v for k, v in locals().items()})


def build(lab: Lab, shared: Shared) -> Configure:
    """Build the two columns (the form and its actions; the run's live view) and wire them."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            gr.Markdown("### 1 · LoRA config")
            fields_ = _lora_fields(lab)
            gr.Markdown("### 2 · Training")
            fields_.update(_training_fields())
            act = _actions()
        with gr.Column(scale=3, min_width=420):
            view = _view()
    form = Form(**fields_)
    breakdown, budget, filled = _wire_form(lab, form, view)
    from_url, sharing, address = _wire_share(lab, form, act)
    *clicked, duplicated = _wire_runs(lab, form, shared, act, view)
    for programmatic in (filled, duplicated):   # controls set by code: the link follows once
        programmatic.then(**sharing).then(**address)
    return Configure(form, view.status, view.loss_plot, [view.status, view.loss_plot, view.samples_tbl, view.optim_plot],
                     view.smoothing, act.run_pick, breakdown, budget, from_url, sharing, address, *clicked)


def _wire_form(lab: Lab, form: Form, view) -> tuple[dict, dict, object]:
    """The parameter breakdown and the predicted budget follow the form."""
    shows = dict(status=view.status, loss_plot=view.loss_plot, summary=view.summary, table=view.table,
                 params_plot=view.params_plot, budget_md=view.budget_md)
    breakdown = dict(fn=partial(ui_params, lab, form, shows), inputs=form.lora_components,
                     outputs=[view.summary, view.table, view.params_plot], **PRIVATE)
    for c in form.lora_components:
        c.change(show_progress="hidden", **breakdown)
    budgeted = dict(fn=partial(ui_budget, lab, form), inputs=form.components, outputs=[view.budget_md], **PRIVATE)
    for c in form.components:
        c.change(show_progress="hidden", **budgeted)
    # each method's measured learning rate fills in (LoRA+ and full fine-tuning want smaller ones); editable
    form_lr = defaults_for(is_gpu()).lr
    filled = form.method.input(lambda m: (gr.update(visible=m == "loraplus"), METHOD_LR.get(m, form_lr)),
                               [form.method], [form.ratio, form.lr], show_progress="hidden", **PRIVATE)
    view.show_optim.change(lambda on: gr.update(visible=bool(on)), [view.show_optim], [view.optim_plot],
                           show_progress="hidden", **PRIVATE)
    return breakdown, budgeted, filled


def _wire_share(lab: Lab, form: Form, act) -> tuple[dict, dict, dict]:
    """The link and the command lines follow every control; the page's address follows the link; a link
    opened restores the controls."""
    controls = {**form.shared(), "ranks": (act.ranks,), "methods": (act.methods,)}   # share.NAMES -> components
    buttons = {"ranks": (act.sweep_btn,), "methods": (act.methods_btn,)}             # hidden with their lists
    sharing = dict(fn=partial(ui_share, lab, form, act.ranks, act.methods),
                   inputs=form.components | {act.ranks, act.methods}, outputs=[act.link, act.cli],
                   show_progress="hidden", **PRIVATE)
    address = dict(fn=None, inputs=[act.link], outputs=[act.link], js=ADDRESS_JS, show_progress="hidden", **PRIVATE)
    # .input, not .change: a user's edit updates the link once. The programmatic updates (a link restored,
    # a run duplicated, a method's learning rate filled in) run the pair once after them, not once per control.
    # The method's own edit is followed by its learning-rate fill (build() chains the link after that), so it
    # is not wired here: the link would be made twice, the first time with the old learning rate.
    for c in (form.components - {form.method}) | {act.ranks, act.methods}:
        c.input(**sharing).then(**address)
    act.copy_btn.click(None, [act.link], None, js=COPY_JS, **PRIVATE)
    from_url = dict(fn=partial(ui_from_url, lab, controls, buttons, form.ratio, act.share_note), inputs=[act.link],
                    outputs=[c for cs in (*controls.values(), *buttons.values()) for c in cs] + [act.share_note],
                    js="(link) => [window.location.search]", **PRIVATE)
    return from_url, sharing, address


def _wire_runs(lab: Lab, form: Form, shared: Shared, act, view) -> tuple:
    """Train, Sweep, Compare, Stop, Resume and Duplicate; the smoothing redraws the followed run."""
    outputs = [view.status, view.loss_plot, view.samples_tbl, view.optim_plot, shared.run_id, shared.session]
    run = dict(concurrency_limit=None, **PRIVATE)
    trained = act.train_btn.click(partial(ui_train, lab, form, shared, view.smoothing),
                                  form.components | {shared.session, view.smoothing}, outputs, **run)
    swept = act.sweep_btn.click(partial(ui_sweep, lab, form, shared, act.ranks, view.smoothing),
                                form.components | {shared.session, act.ranks, view.smoothing}, outputs, **run)
    compared = act.methods_btn.click(partial(ui_methods, lab, form, shared, act.methods, view.smoothing),
                                     form.components | {shared.session, act.methods, view.smoothing}, outputs, **run)
    act.stop_btn.click(partial(ui_stop, lab), [shared.run_id], [view.status], **run)
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

def ui_params(lab: Lab, form: Form, shows: dict, v: dict) -> dict:
    try:
        b = preview(lab.loaded.model.config, form.lora(lab, v))
    except ConfigError as exc:
        return {shows["summary"]: f"<div class='notice'>⚠️ {html.escape(str(exc))}</div>"}
    return {shows["summary"]: f"**{b.trainable:,} trainable** of {b.total:,} parameters (**{b.pct_trainable:.3f}%**)"
                              f" · frozen {b.frozen:,} · adapter **{b.adapter_mb:.3f} MB** (fp32)",
            shows["table"]: [[n, f"{p:,}", f"{t:,}", f"{pct:.3f}%"] for n, p, t, pct in b.rows()],
            shows["params_plot"]: plots.params_figure(b.rows())}


def ui_budget(lab: Lab, form: Form, v: dict) -> str:
    try:
        return budget_markdown(lab.predict(form.run(lab, v)))
    except ConfigError as exc:
        return f"⚠️ {html.escape(str(exc))}"


@errors
def ui_train(lab: Lab, form: Form, shared: Shared, smoothing, v: dict):
    session = browser_key(v[shared.session])
    seeds = form.seed_list(v)
    if len(seeds) > 1:   # the same run once per seed: a one-rank sweep
        yield from _stream(lab, lab.submit_sweep(expand_sweep(form.run(lab, v), [v[form.rank]], seeds), session), session,
                           v[smoothing], f"**Repeat with {len(seeds)} seeds** ({', '.join(map(str, seeds))})")
        return
    job = lab.submit(form.run(lab, v), session)
    for s in lab.watch(job):
        yield *live(lab, job, s, v[smoothing]), job.id, session


@errors
def ui_sweep(lab: Lab, form: Form, shared: Shared, ranks, smoothing, v: dict):
    session = browser_key(v[shared.session])
    ranks_list, seeds = parse_ranks(v[ranks]), form.seed_list(v)
    jobs = lab.submit_sweep(expand_sweep(form.run(lab, v, rank=ranks_list[0]), ranks_list, seeds), session)
    yield from _stream(lab, jobs, session, v[smoothing],
                       f"**Rank sweep** (ranks {', '.join(map(str, ranks_list))}"
                       + (f"; seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "") + ")")


@errors
def ui_methods(lab: Lab, form: Form, shared: Shared, methods, smoothing, v: dict):
    """The form's config with each listed method, once per seed: one click for the comparison."""
    session = browser_key(v[shared.session])
    method_list, seeds = parse_methods(v[methods]), form.seed_list(v)
    jobs = lab.submit_sweep(expand_sweep(form.run(lab, v, method=method_list[0]), [v[form.rank]], seeds, method_list,
                                         lrs=METHOD_LR), session)
    rates = "; ".join(f"{m} at lr {METHOD_LR[m]:g}" for m in method_list if m in METHOD_LR)
    yield from _stream(lab, jobs, session, v[smoothing],
                       f"**Method comparison** ({', '.join(method_list)} at r={int(v[form.rank])}"
                       + (f"; seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "")
                       + (f"; {rates}, the rest at the form's" if rates else "") + ")")


def _stream(lab: Lab, jobs, session: str, smoothing: float, title: str):
    for i, job in enumerate(jobs):
        for s in lab.watch(job):
            status, *views = live(lab, job, s, smoothing)
            yield f"{title}, run {i + 1}/{len(jobs)}  \n{status}", *views, job.sweep, session


def ui_redraw(lab: Lab, run_id: str, smoothing: float):
    """The loss chart of the followed run (the newest of a sweep) with another smoothing."""
    jobs = sorted((j for j in lab.jobs.values() if run_id and run_id in (j.id, j.sweep)), key=lambda j: j.created)
    started = [j for j in jobs if j.losses] or jobs
    if not started:
        return plots.loss_figure(None, smoothing=smoothing)
    return loss_of(started[-1], lab.status(started[-1]), smoothing)


# The page's address becomes the link (keeping an instructor's hide=), and the link the full address.
ADDRESS_JS = """(link) => {
    const here = new URL(window.location.href);
    const hide = here.searchParams.get('hide');
    const params = new URLSearchParams(link.includes('?') ? link.slice(link.indexOf('?') + 1) : link);
    if (hide) params.set('hide', hide);
    const query = params.toString().replace(/%2C/g, ',');
    window.history.replaceState(null, '', here.pathname + (query ? '?' + query : ''));
    return window.location.href;
}"""
COPY_JS = """(link) => {
    navigator.clipboard.writeText(link).catch(() => {});
}"""


def _limit(comp) -> share.Limit:
    choices = tuple(c[1] if isinstance(c, (tuple, list)) else c for c in (getattr(comp, "choices", None) or ()))
    return share.Limit(getattr(comp, "minimum", None), getattr(comp, "maximum", None),
                       comp.step if isinstance(comp, gr.Slider) else None, choices)


def ui_share(lab: Lab, form: Form, ranks, methods, v: dict) -> tuple[str, str]:
    """(the link's query, the command lines) of the controls as they stand."""
    named = {**form.named(v), "ranks": v[ranks], "methods": v[methods]}
    query = "?" + share.to_query(named)
    try:
        samples = form.run(lab, v).train.samples
        lines = share.cli_lines(named, lab.loaded.name, lab.precision, lab.data_source, depth(lab), samples)
    except (ConfigError, ValueError, TypeError) as exc:
        return query, f"# fix the setup first: {exc}"
    return query, "\n".join(f"# {title}\n{lines[key]}" for key, title in (
        ("train", "Train (this setup)"), ("sweep", "Sweep ranks"), ("methods", "Compare methods")))


def ui_from_url(lab: Lab, controls: dict, buttons: dict, ratio, note, search: str) -> dict:
    """On page load: the controls the address names (checked against each control's limits), and an
    instructor's hide= list. Nothing starts."""
    limits_ = {name: _limit(comps[0]) for name, comps in controls.items()}
    values, notes = share.from_query(search or "", limits_)
    hide, more = share.hidden(search or "")
    out: dict = {}
    for name, comps in controls.items():
        if name in values:
            parts = values[name] if len(comps) == 2 else (values[name],)
            for comp, value in zip(comps, parts):
                out[comp] = gr.update(value=value)
        if name in hide:
            for comp in comps + buttons.get(name, ()):
                out[comp] = gr.update(**{**(out[comp] if comp in out else {}), "visible": False})
    if values.get("method") == "loraplus" and "ratio" not in hide:
        out[ratio] = gr.update(**{**(out[ratio] if ratio in out else {}), "visible": True})
    said = [f"🔗 Restored {len(values)} setting(s) from the link (nothing started)."] if values else []
    said += [f"Hidden by this link: {', '.join(sorted(hide))}."] if hide else []
    said += [f"⚠️ {n}" for n in notes + more]
    out[note] = "  \n".join(said)
    return out


@errors
def ui_duplicate(lab: Lab, form: Form, shared: Shared, run_pick, status, v: dict) -> dict:
    """A run's settings into the controls (edit them, then Train): nothing starts."""
    job = lab.session_job(v[run_pick], browser_key(v[shared.session]))
    values = settings.values_of(job.config, depth(lab))
    out: dict = {comp: (values[name][i] if len(comps) == 2 else values[name])
                 for name, comps in form.shared().items() for i, comp in enumerate(comps)}
    out[form.samples] = "\n".join(job.config.train.samples)
    out[form.ratio] = gr.update(value=values["ratio"], visible=values["method"] == "loraplus")
    out[status] = (f"⧉ The settings of run {job.id} ({run_label(job)}) are in the controls: edit them, then "
                   "press **Train**.")
    return out


@errors
def ui_resume(lab: Lab, shared: Shared, smoothing, run_pick, resume_steps, v: dict):
    """Continue the chosen run from its newest checkpoint, and follow it."""
    session = browser_key(v[shared.session])
    steps = int(v[resume_steps] or 0)
    job = lab.resume(v[run_pick], session, steps or None)
    for s in lab.watch(job):
        yield *live(lab, job, s, v[smoothing]), job.id, session


def ui_stop(lab: Lab, run_id: str) -> str:
    if not run_id:
        return "No run to stop."
    job = lab.stop(run_id)
    what = "the sweep's remaining runs are cancelled and the current one ends" if run_id.startswith("sweep-") \
        else "the run ends"
    return f"⏹️ stop requested: {what} after the current step" if job else f"no run {run_id}"


def ui_restore(lab: Lab, session: str):
    """On page load: the browser's owner key, and its newest run (a reload loses nothing)."""
    session = browser_key(session)
    jobs = lab.runs(session)
    if not jobs:
        return session, "", READY, plots.loss_figure(None), samples_frame(None), plots.optim_figure(None)
    job = jobs[-1]
    return (session, job.sweep or job.id, *live(lab, job, lab.status(job)))


def ui_follow(lab: Lab, run_id: str):
    """After a reload: keep streaming a run (or the current run of a sweep) that is still going."""
    jobs = [j for j in lab.jobs.values() if run_id and run_id in (j.id, j.sweep) and not j.done.is_set()]
    if not jobs:
        # Nothing to follow: say so with one skip. A generator that yields nothing ends with None for every
        # output, which would blank the status, the loss chart and the sample table ui_restore just filled.
        yield gr.skip()
        return
    for job in sorted(jobs, key=lambda j: j.created):
        for s in lab.watch(job):
            yield live(lab, job, s)


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
