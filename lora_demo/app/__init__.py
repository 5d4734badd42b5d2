"""The Gradio app: the only package that imports gradio.

``build_demo(lab)`` composes the page from its sections (each in ``sections/`` builds and wires its
own controls), connects what crosses sections (the run list refreshes after a run is trained,
imported or deleted), and declares the public API (``api.py``). Handlers get the ``Lab`` bound in;
there is no module-level state.
"""

from __future__ import annotations

from functools import partial

import gradio as gr

from lora_demo.core.config import LoraConfig, RunConfig, TrainConfig, limits
from lora_demo.core.models import base_scores, device_info
from lora_demo.lab import Lab
from lora_demo.app import api
from lora_demo.app import guard
from lora_demo.app.common import PRIVATE, Shared
from lora_demo.app.sections import adapters, configure, inspect, runs, translate

CSS = """
.notice {border-left: 4px solid #f59e0b; background: #fffbeb; padding: 4px 10px; border-radius: 6px; font-size: 0.9em;}
.status {font-family: ui-monospace, monospace; font-size: 0.9em;}
.diff mark.changed {background: #fde68a; padding: 0 2px; border-radius: 3px;}
.diff table {width: 100%; border-collapse: collapse;} .diff td {padding: 4px 8px; vertical-align: top;}
#header h1 {margin: 0; font-size: 1.5em;} #header p {margin: 2px 0;}
.why {font-size: 0.9em; color: #475569;}
.progress {padding: 8px 12px; border-radius: 8px; background: #f1f5f9; margin-bottom: 4px;}
.progress.ready {background: #eff6ff; border-left: 4px solid #2563eb;}
.card {border: 1px solid #e2e8f0; border-radius: 10px; padding: 8px 12px; background: #fff;}
.card .headline {font-size: 1.1em; font-weight: 600; padding: 4px 6px 8px; border-radius: 6px;}
.card .q {display: flex; gap: 8px; padding: 4px 6px; border-top: 1px solid #f1f5f9; font-size: 0.95em;}
.card .q .icon {font-size: 1.1em;} .card .fig {color: #475569; font-size: 0.88em;}
.card .ok {background: #f0fdf4;} .card .bad {background: #fef2f2;} .card .meh {background: #f8fafc;}
.card .info {background: #fff;}
#samples-table td, #samples-table th {font-size: 0.85em; padding: 2px 6px; font-family: inherit;}
#samples-table .cell-wrap {display: -webkit-box; -webkit-line-clamp: 3; -webkit-box-orient: vertical; overflow: hidden;
  font-family: inherit;}
#cost-note p {margin: 0;}
.guard-bad input[type=number] {outline: 2px solid #dc2626;}
.guard-msg {color: #b91c1c; font-size: 0.85em; margin-top: 2px;}
"""


# Gradio 6.17's Dataframe draws its rows through a virtual window that it re-reads only when the row
# count goes from 0 to N (gradio-app/gradio#13611, fixed upstream by #13744 in a release past our pin). A
# table that grows from 1 to 3 rows then keeps showing 1 until the page is reloaded. A scroll event on its
# viewport makes the window re-read, so each Dataframe sends one after its value changes.
ROWS_JS = ("() => { setTimeout(() => document.querySelectorAll('.virtual-table-viewport')"
           ".forEach(e => e.dispatchEvent(new Event('scroll'))), 30); }")


def show_every_row(demo: gr.Blocks) -> None:
    """Keep every Dataframe on the page showing all of its rows as its row count changes (see ROWS_JS)."""
    for block in list(demo.blocks.values()):
        if isinstance(block, gr.Dataframe):
            block.change(None, None, None, js=ROWS_JS, show_progress="hidden", **PRIVATE)


def header(lab: Lab) -> gr.Markdown:
    """Two short lines: what the lab is, then the model, device and precision (with the base's own scores
    for a bundled model); the offline notice, if any, in one line under them. Returns the cost note, which
    follows the runs."""
    info = device_info()
    scores = base_scores(lab.loaded.kind)
    with gr.Column(elem_id="header"):
        gr.Markdown(f"# 🧪 LoRA Lab\nLow-rank adaptation of **FLAN-T5** in TensorFlow, English → German on WMT16 "
                    f"data · model **{lab.loaded.label.split(' (')[0]}** · **{info['name']}** · training in "
                    f"**{lab.precision}** · TensorFlow {info['tensorflow']}"
                    + (f"  \n<small>{scores} ({lab.loaded.kind}'s build measured them: assets/{lab.loaded.kind}/"
                       "build_info.json)</small>" if scores else ""), elem_id="base-scores")
        if lab.loaded.notice:
            gr.Markdown(f"⚠️ {lab.loaded.notice}", elem_classes=["notice"])
        return gr.Markdown(default_run_cost(lab), elem_id="cost-note")


def default_run_cost(lab: Lab) -> str:
    """What the default run costs here: measured by the newest finished default run on this server's model,
    else predicted from the step time of any finished run (the budget model), else said to be unknown. Never
    a fixed promise: the same run is under a minute on the bundled tiny and minutes on flan-t5-small. The
    runs refresh calls it again, so it follows the runs."""
    dflt = TrainConfig()
    done = [j for j in lab.jobs.values() if j.status == "completed" and (j.summary or {}).get("mean_step_s")]
    same = [j for j in done if j.config.model == lab.loaded.name and j.config.train == dflt and
            j.config.lora == LoraConfig()]
    if same:
        j = max(same, key=lambda j: j.created)
        took = f" ({j.finished - j.created:.0f} s from Train to its verdict)" if j.finished else ""
        return f"<small>The default run took {j.summary['elapsed_s']:.0f} s of training here{took}.</small>"
    step = lab.predict(RunConfig(model=lab.loaded.name))["lora"]["step_s_est"] if done else None
    if step:
        return (f"<small>The default run ({dflt.steps} steps) should take about {dflt.steps * step:.0f} s of "
                "training here (predicted from the step time of this machine's last run).</small>")
    return (f"<small>The default run is {dflt.steps} steps; once a run has finished here, this line gives its "
            "time on this machine.</small>")


def build_demo(lab: Lab) -> gr.Blocks:
    with gr.Blocks(title="LoRA Lab") as demo:
        shared = Shared.create()
        cost_note = header(lab)
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Train", id="train"):
                config = configure.build(lab, shared)
            with gr.Tab("Compare runs", id="compare"):
                listing = runs.build(lab, shared)
            with gr.Tab("Translate", id="translate"):
                words = translate.build(lab, shared)
            with gr.Tab("Look inside", id="inside"):
                inside = inspect.build(lab, shared)
            with gr.Tab("Adapters", id="adapters"):
                files = adapters.build(lab, shared)
        api.Api(lab).register()

        # on load: restore this browser's key and newest run, refresh the lists, follow a run still going
        loaded = demo.load(partial(configure.ui_restore, lab), [shared.session],
                           [shared.session, shared.run_id, *config.views], **PRIVATE)
        refresh = runs.connect(lab, shared, listing, after=[config.trained, config.swept, config.compared,
                                                            config.resumed, files.deleted, files.imported],
                               pickers={words.run_pick: "newest", words.beside_pick: "several", files.pick: "newest",
                                        inside.pick: "newest", inside.compare_pick: "second",
                                        config.run_pick: "any"},
                               cost=(cost_note, partial(default_run_cost, lab)))
        loaded.then(**refresh).then(partial(configure.ui_follow, lab), [shared.run_id],
                                    config.views, concurrency_limit=None, **PRIVATE)
        # a shared link: its settings into the controls (nothing starts), then the link and command lines
        demo.load(**config.from_url).then(**config.sharing).then(**config.address)
        demo.load(**config.breakdown)
        demo.load(**config.budget)
        demo.load(**config.more)
        show_every_row(demo)
    return demo


def launch(demo: gr.Blocks, **kwargs):
    # Uploads over the limit are refused by the server before any handler sees them.
    kwargs.setdefault("max_file_size", limits().max_upload_mb * 2**20)
    return demo.queue(default_concurrency_limit=None, max_size=limits().max_queue).launch(
        css=CSS, theme=gr.themes.Soft(), head=guard.script(guard.limits_of(configure.NUMERIC), configure.GUARDED), **kwargs)
