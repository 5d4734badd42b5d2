"""Section 5: a run's adapter (PEFT format) or merged checkpoint as a download, adapter import with
every check done before anything is written, and deleting a run."""

from __future__ import annotations

import html
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr

from lora_demo.core.config import ConfigError, limits
from lora_demo.lab import Lab
from lora_demo.lab.records import Job
from lora_demo.app.common import PRIVATE, Shared, browser_key, refused
from lora_demo.app.common import adapted_layers
from lora_demo.app.common import file_paths, import_files

PICK_HINT = "Train a run or import an adapter; its files and size show here."


@dataclass
class Adapters:
    """What the page chains on from this section."""

    pick: gr.Dropdown                # the run to download, export or delete
    deleted: object                  # the Delete and Import events: the runs refresh follows them
    imported: object


def build(lab: Lab, shared: Shared) -> Adapters:
    gr.Markdown("Adapters are saved in PyTorch **PEFT** format (`adapter_config.json` + "
                "`adapter_model.safetensors`): `PeftModel.from_pretrained(base, folder)` loads one as-is. "
                "Adapters made by PEFT for the same base model import here. The merged export is a full "
                "TensorFlow checkpoint (`TFAutoModelForSeq2SeqLM.from_pretrained`) with the adapter folded in.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            pick = gr.Dropdown([], label="run (this browser's runs)", allow_custom_value=False, elem_id="adapters-pick")
            info = gr.Markdown(PICK_HINT, elem_id="adapter-info")
            with gr.Row():
                adapter_btn = gr.Button("⬇ Adapter (.zip, PEFT format)", size="sm")
                merged_btn = gr.Button("⬇ Merged model (.zip, TF checkpoint)", size="sm")
                delete_btn = gr.Button("🗑 Delete run", size="sm", variant="stop", elem_id="delete-btn")
            download = gr.File(label="download", visible=False, interactive=False)
        with gr.Column(scale=2):
            upload = gr.File(file_count="multiple", file_types=[".zip", ".json", ".safetensors"],
                             label=f"import: an adapter zip, or adapter_config.json + adapter_model.safetensors "
                                   f"(safetensors only; up to {limits().max_upload_mb} MB)")
            import_btn = gr.Button("Import adapter", variant="secondary")
            import_note = gr.Markdown()
    owned = [pick, shared.session]
    pick.change(partial(ui_pick, lab), owned, [info], show_progress="hidden", **PRIVATE)
    adapter_btn.click(partial(ui_download, lab, lab.adapter_zip, ""), owned, [download], **PRIVATE)
    merged_btn.click(partial(ui_download, lab, lab.export_merged,
                             "merging the adapter into a copy of the base model and saving it"), owned, [download],
                     **PRIVATE)
    deleted = delete_btn.click(partial(ui_delete, lab), owned, [info], **PRIVATE)
    imported = import_btn.click(partial(ui_import, lab), [upload, shared.session],
                                [import_note, upload, shared.session], **PRIVATE)
    return Adapters(pick, deleted, imported)


def adapter_info(lab: Lab, job: Job) -> str:
    """What a run's adapter is and what it weighs, measured on disk."""
    lora, size = job.config.lora, (job.adapter_files or {}).get("bytes", 0)
    blocks = "all blocks" if lora.layers is None else f"blocks {lora.layers[0]}-{lora.layers[1]}"
    text = (f"**{job.id}** · r={lora.rank}, alpha={lora.alpha:g} on **{'+'.join(lora.targets)}** "
            f"({lora.side}, {blocks}) · {adapted_layers(lab, lora)} adapted layers × 2 matrices · "
            f"**{job.params.get('trainable', 0):,} parameters** · adapter file **{size / 1e6:.3f} MB** "
            f"({size:,} bytes, fp32 safetensors)")
    origin = job.origin or {}
    if origin.get("kind") == "imported":
        made = f" for {origin['base_model']}" if origin.get("base_model") else ""
        text += f"  \nimported from {origin.get('file') or 'an upload'} (made{made})"
        text += "".join(f"  \n⚠️ {n}" for n in origin.get("notices") or [])
    return text


def ui_pick(lab: Lab, run_id, session) -> str:
    if not run_id:
        return PICK_HINT
    try:
        return adapter_info(lab, lab.owned(run_id, session or ""))
    except ConfigError as exc:
        return f"⚠️ {html.escape(str(exc))}"


def ui_delete(lab: Lab, run_id, session) -> str:
    try:
        job = lab.delete(run_id, session or "")
    except ConfigError as exc:
        return f"⚠️ {html.escape(str(exc))}"
    return f"🗑 run **{job.id}** and its files were deleted."


@refused
def ui_download(lab: Lab, make, doing: str, run_id, session, progress=gr.Progress()):
    """``make`` is Lab.adapter_zip or Lab.export_merged; ``doing`` is what the progress bar says."""
    if doing:
        progress(0.1, desc=doing)
    return gr.update(value=str(make(run_id, session or "")), visible=True)


def ui_import(lab: Lab, files, session):
    """Upload -> validated run of this browser; errors stay on screen and change nothing."""
    session = browser_key(session)
    try:
        job = import_files(lab, files, session)
    except ConfigError as exc:
        names = ", ".join(Path(p).name for p in file_paths(files))
        return (f"❌ **Not imported** ({html.escape(names) or 'no file'}): {html.escape(str(exc))}",
                gr.update(value=None), session)
    return (f"✅ imported as run **{job.id}**; pick it under *Translate*.  \n{adapter_info(lab, job)}",
            gr.update(value=None), session)
