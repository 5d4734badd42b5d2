"""The Gradio app: the only package that imports gradio.

``build_demo(lab)`` composes the page from its sections (each in ``sections/`` builds and wires its
own controls), connects what crosses sections (the run list refreshes after a run is trained,
imported or deleted), and declares the public API (``api.py``). Handlers get the ``Lab`` bound in;
there is no module-level state.
"""

from __future__ import annotations

from functools import partial

import gradio as gr

from lora_demo.core.config import RunConfig, TrainConfig, limits
from lora_demo.core.models import base_scores, device_info
from lora_demo.lab import Lab
from lora_demo.app import api
from lora_demo.app.common import PRIVATE, Shared
from lora_demo.app.sections import adapters, configure, inspect, runs, translate

CSS = """
.notice {border-left: 4px solid #f59e0b; background: #fffbeb; padding: 8px 12px; border-radius: 6px;}
.status {font-family: ui-monospace, monospace; font-size: 0.95em;}
.diff mark.changed {background: #fde68a; padding: 0 2px; border-radius: 3px;}
.diff table {width: 100%; border-collapse: collapse;} .diff td {padding: 4px 8px; vertical-align: top;}
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


def header(lab: Lab) -> None:
    info = device_info()
    gr.Markdown(f"# 🧪 LoRA Lab\nLow-rank adaptation of **FLAN-T5** in TensorFlow, English → German on WMT16. "
                f"Pick a rank and target layers, train a short run, compare runs, and compare base and "
                f"LoRA translations. {default_run_cost(lab)}  \nModel: **{lab.loaded.label}** · "
                f"device: **{info['name']}** · "
                f"training in **{lab.precision}** · TensorFlow {info['tensorflow']}")
    scores = base_scores(lab.loaded.kind)
    if scores:
        gr.Markdown(f"<small>{scores} (sacreBLEU, measured when it was built: assets/{lab.loaded.kind}/"
                    f"build_info.json)</small>", elem_id="base-scores")
    if lab.loaded.notice:
        gr.Markdown(f"⚠️ {lab.loaded.notice}", elem_classes=["notice"])


def default_run_cost(lab: Lab) -> str:
    """What the default run costs here: measured by the newest finished default-sized run on this server's
    model, else predicted from the step time of any finished run (the budget model), else said to be
    unknown. Never a fixed promise: the same run is 40 s on the bundled tiny and minutes on flan-t5-small."""
    dflt = TrainConfig()
    done = [j for j in lab.jobs.values() if j.status == "completed" and (j.summary or {}).get("mean_step_s")]
    same = [j for j in done if j.config.model == lab.loaded.name and j.config.train.steps == dflt.steps
            and j.config.train.batch_size == dflt.batch_size]
    if same:
        j = max(same, key=lambda j: j.created)
        return (f"The default run ({dflt.steps} steps) took **{j.summary['elapsed_s']:.0f} s** here on this model "
                f"(run {j.id}).")
    step = lab.predict(RunConfig(model=lab.loaded.name))["lora"]["step_s_est"] if done else None
    if step:
        return f"The default run ({dflt.steps} steps) should take about **{dflt.steps * step:.0f} s** of training here."
    return (f"The default run is {dflt.steps} steps; after your first run the budget (section 2) predicts "
            "the time of the next on this machine.")


def build_demo(lab: Lab) -> gr.Blocks:
    with gr.Blocks(title="LoRA Lab") as demo:
        shared = Shared.create()
        header(lab)
        config = configure.build(lab, shared)
        listing = runs.build(lab, shared)
        words = translate.build(lab, shared)
        files = adapters.build(lab, shared)
        inside = inspect.build(lab, shared)
        api.Api(lab).register()

        # on load: restore this browser's key and newest run, refresh the lists, follow a run still going
        loaded = demo.load(partial(configure.ui_restore, lab), [shared.session],
                           [shared.session, shared.run_id, *config.views], **PRIVATE)
        refresh = runs.connect(lab, shared, listing, after=[config.trained, config.swept, config.compared,
                                                            config.resumed, files.deleted, files.imported],
                               pickers={words.run_pick: "newest", words.beside_pick: "several", files.pick: "newest",
                                        inside.pick: "newest", inside.compare_pick: "second",
                                        config.run_pick: "any"})
        loaded.then(**refresh).then(partial(configure.ui_follow, lab), [shared.run_id],
                                    config.views, concurrency_limit=None, **PRIVATE)
        # a shared link: its settings into the controls (nothing starts), then the link and command lines
        demo.load(**config.from_url).then(**config.sharing).then(**config.address)
        demo.load(**config.breakdown)
        demo.load(**config.budget)
        show_every_row(demo)
    return demo


def launch(demo: gr.Blocks, **kwargs):
    # Uploads over the limit are refused by the server before any handler sees them.
    kwargs.setdefault("max_file_size", limits().max_upload_mb * 2**20)
    return demo.queue(default_concurrency_limit=None, max_size=limits().max_queue).launch(
        css=CSS, theme=gr.themes.Soft(), **kwargs)
