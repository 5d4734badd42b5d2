"""The setup as a link and as command lines: the page's address follows every control, a link opened
restores the controls (checked against their limits; nothing starts), and an instructor's ``hide=`` list
hides some."""

from __future__ import annotations

from functools import partial

import gradio as gr

from lora_demo.app.common import PRIVATE, Form, depth
from lora_demo.core.config import ConfigError
from lora_demo.lab import Lab
from lora_demo.present import share


def wire(lab: Lab, form: Form, act) -> tuple[dict, dict, dict]:
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


