"""What a setup trains, before it trains: the exact parameter breakdown (one line on the first screen, the
table and chart folded under it) and the predicted budget beside full fine-tuning and the course demo's
setup. Both follow the form; a value out of range says so in their place and nothing else changes."""

from __future__ import annotations

import html

from lora_demo.app.common import Form
from lora_demo.core.config import ConfigError
from lora_demo.core.params import preview
from lora_demo.lab import Lab
from lora_demo.present import plots


def ui_params(lab: Lab, form: Form, shows: dict, v: dict) -> dict:
    try:
        b = preview(lab.loaded.model.config, form.lora(lab, v))
    except ConfigError as exc:
        return {shows["summary"]: f"<div class='notice'>⚠️ {html.escape(str(exc))}</div>"}
    return {shows["summary"]: breakdown_line(b),
            shows["table"]: [[n, f"{p:,}", f"{t:,}", f"{pct:.3f}%"] for n, p, t, pct in b.rows()],
            shows["params_plot"]: plots.params_figure(b.rows())}


def breakdown_line(b) -> str:
    """The breakdown in one line: what trains, of how much, and what the adapter weighs."""
    return (f"Trains **{b.trainable:,}** of {b.total:,} weights (**{b.pct_trainable:.3f}%**); the rest stay "
            f"frozen · adapter **{b.adapter_mb:.3f} MB** (fp32)")


def ui_budget(lab: Lab, form: Form, v: dict) -> str:
    try:
        return budget_markdown(lab.predict(form.run(lab, v)))
    except ConfigError as exc:
        return f"⚠️ {html.escape(str(exc))}"


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
