"""The Gradio app: the only package that imports gradio.

``build_demo(lab)`` composes the page from its sections (each in ``sections/`` builds and wires its
own controls), connects what crosses sections (the run list refreshes after a run is trained,
imported or deleted), and declares the public API (``api.py``). Handlers get the ``Lab`` bound in;
there is no module-level state.
"""

from __future__ import annotations

from functools import partial

import gradio as gr

from ..config import limits
from ..models import base_scores, device_info
from ..runs import Lab
from . import api
from .common import PRIVATE, Shared
from .sections import adapters, configure, inspect, runs, translate

CSS = """
.notice {border-left: 4px solid #f59e0b; background: #fffbeb; padding: 8px 12px; border-radius: 6px;}
.status {font-family: ui-monospace, monospace; font-size: 0.95em;}
.diff mark.changed {background: #fde68a; padding: 0 2px; border-radius: 3px;}
.diff table {width: 100%; border-collapse: collapse;} .diff td {padding: 4px 8px; vertical-align: top;}
"""


def header(lab: Lab) -> None:
    info = device_info()
    gr.Markdown(f"# 🧪 LoRA Lab\nLow-rank adaptation of **FLAN-T5** in TensorFlow, English → German on WMT16. "
                f"Pick a rank and target layers, train for a minute, compare runs, and compare base and "
                f"LoRA translations.  \nModel: **{lab.loaded.label}** · device: **{info['name']}** · "
                f"training in **{lab.precision}** · TensorFlow {info['tensorflow']}")
    scores = base_scores(lab.loaded.kind)
    if scores:
        gr.Markdown(f"<small>{scores} (sacreBLEU, measured when it was built: assets/{lab.loaded.kind}/"
                    f"build_info.json)</small>", elem_id="base-scores")
    if lab.loaded.notice:
        gr.Markdown(f"⚠️ {lab.loaded.notice}", elem_classes=["notice"])


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
                           [shared.session, shared.run_id, *config["views"]], **PRIVATE)
        refresh = runs.connect(lab, shared, listing, after=[config["trained"], config["swept"], config["compared"],
                                                            config["resumed"], files["deleted"], files["imported"]],
                               pickers={words["run_pick"]: "newest", files["pick"]: "newest",
                                        inside["pick"]: "newest", inside["compare_pick"]: "second",
                                        config["run_pick"]: "any"})
        loaded.then(**refresh).then(partial(configure.ui_follow, lab), [shared.run_id],
                                    config["views"], concurrency_limit=None, **PRIVATE)
        # a shared link: its settings into the controls (nothing starts), then the link and command lines
        demo.load(**config["from_url"]).then(**config["sharing"]).then(**config["address"])
        demo.load(**config["breakdown"])
        demo.load(**config["budget"])
    return demo


def launch(demo: gr.Blocks, **kwargs):
    # Uploads over the limit are refused by the server before any handler sees them.
    kwargs.setdefault("max_file_size", limits().max_upload_mb * 2**20)
    return demo.queue(default_concurrency_limit=None, max_size=limits().max_queue).launch(
        css=CSS, theme=gr.themes.Soft(), **kwargs)
