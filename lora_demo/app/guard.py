"""Typed numbers out of range are refused in the page, before they reach a control's value.

Gradio 6.17's slider clamps a typed value into its range when the box loses focus (its number box keeps
the typed value until then), and its server side rejects an out-of-range value on every event that reads
the control, with a toast each: rank 0 gave three identical toasts, then trained r=1. Here a listener in
the capture phase sees each keystroke of a number box first: a value outside the control's range (from the
settings table, the one source of the limits) never becomes the control's value, the box is marked, one
message under it names the field and its range, and when the box loses focus it shows the value it kept.
Train (and Sweep, Compare, Resume) pressed with a refusal not yet read is held once: the message shows, and
nothing starts.

The server checks every value again (config.py), for the API and anything that skips the page.
"""

from __future__ import annotations

import json

import gradio as gr

from lora_demo.core import settings


class Slider(gr.Slider):
    """A slider whose out-of-range values reach the handler, which refuses them with one message (Gradio's
    own check raises once per event that reads it)."""

    def preprocess(self, payload):
        return None if payload is None else gr.Number.round_to_precision(payload, self.precision)


class Number(gr.Number):
    """A number box whose out-of-range values reach the handler (see Slider)."""

    def preprocess(self, payload):
        return None if payload is None else self.round_to_precision(payload, self.precision)


def limits_of(elem_ids: dict[str, str]) -> dict:
    """elem_id -> {label, lo, hi, whole} of the page's numeric controls, from the settings table."""
    out = {}
    for elem_id, key in elem_ids.items():
        st = settings.BY_KEY[key]
        out[elem_id] = {"label": st.label, "lo": st.lo, "hi": st.top, "whole": st.kind == "int"}
    return out


def script(limits: dict, buttons: list[str]) -> str:
    """The page's listener, as a <script> for the page's head (Blocks.launch(head=...): it runs before the
    app renders, and listens on the document, so it sees every control the app renders later). ``limits``
    from limits_of, ``buttons`` the elem_ids of the buttons held while a refusal is unread."""
    code = GUARD_JS.replace("__LIMITS__", json.dumps(limits)).replace("__BUTTONS__", json.dumps(buttons))
    return f"<script>({code})();</script>"


GUARD_JS = r"""
() => {
  const LIMITS = __LIMITS__, BUTTONS = __BUTTONS__;
  const kept = new WeakMap(), unread = new Map();
  const owner = (input) => { let el = input; while (el && !(el.id in LIMITS)) el = el.parentElement; return el; };
  const fmt = (x) => (Math.abs(x) > 0 && Math.abs(x) < 1e-3) ? x.toExponential(0) : String(x);
  function problem(input, lim) {
    const raw = input.value.trim(), v = Number(raw), range = `${fmt(lim.lo)} to ${fmt(lim.hi)}`;
    if (raw === '' || !Number.isFinite(v)) return `${lim.label}: type a number from ${range}.`;
    if (lim.whole && !Number.isInteger(v)) return `${lim.label} must be a whole number from ${range}; ${raw} was refused.`;
    if (v < lim.lo || v > lim.hi) return `${lim.label} must be from ${range}; ${raw} was refused.`;
    return null;
  }
  function note(box, text) {
    let el = box.querySelector(':scope > .guard-msg');
    if (!text) { if (el) el.remove(); box.classList.remove('guard-bad'); return; }
    if (!el) { el = document.createElement('div'); el.className = 'guard-msg'; el.setAttribute('role', 'alert'); box.appendChild(el); }
    el.textContent = text;
    box.classList.add('guard-bad');
  }
  function onEdit(e) {
    const input = e.target;
    if (!(input instanceof HTMLInputElement) || input.type !== 'number') return;
    const box = owner(input);
    if (!box) return;
    const msg = problem(input, LIMITS[box.id]);
    if (msg === null) { kept.set(input, input.value); unread.delete(box.id); note(box, ''); return; }
    e.stopImmediatePropagation();      // the control keeps the value it had
    unread.set(box.id, msg);
    note(box, msg);
  }
  document.addEventListener('focusin', (e) => {
    const t = e.target;
    if (t instanceof HTMLInputElement && t.type === 'number' && owner(t) && problem(t, LIMITS[owner(t).id]) === null)
      kept.set(t, t.value);
  }, true);
  document.addEventListener('input', onEdit, true);
  document.addEventListener('change', onEdit, true);
  document.addEventListener('keydown', (e) => {
    const t = e.target;
    if (e.key === 'Enter' && t instanceof HTMLInputElement && t.type === 'number' && owner(t) && unread.has(owner(t).id))
      e.stopImmediatePropagation();
  }, true);
  document.addEventListener('blur', (e) => {
    const input = e.target;
    if (!(input instanceof HTMLInputElement) || input.type !== 'number') return;
    const box = owner(input);
    if (!box || problem(input, LIMITS[box.id]) === null) return;
    e.stopImmediatePropagation();      // no clamp into range: the box shows the value the control kept
    if (kept.has(input)) input.value = kept.get(input);
    const msg = unread.get(box.id) || '';
    note(box, msg && `${msg} It stays ${input.value}.`);
    if (msg) unread.set(box.id, `${msg} It stays ${input.value}.`);
  }, true);
  document.addEventListener('click', (e) => {
    const button = e.target instanceof Element && e.target.closest('button');
    const holder = button && button.closest('[id]');
    if (!holder || !BUTTONS.includes(holder.id) || unread.size === 0) return;
    e.stopImmediatePropagation();
    e.preventDefault();
    for (const [id, msg] of unread) { const box = document.getElementById(id); if (box) note(box, msg + ' Nothing was started: press it again to go on.'); }
    unread.clear();
  }, true);
}
"""
