"""The result card: what a first-time user reads after a run, a verdict per question in plain words.

Pure functions from a run's status (records.status) to HTML. Every figure is the run's own measurement;
each verdict says whether its difference is more than noise, with the test that decided it (the paired
bootstraps of analysis/evaluate.py: over the held-out sentences for the losses, over the scored sentences
for chrF and BLEU). The expert statistics stay in the run's details (common.details_text).
"""

from __future__ import annotations

import html

from lora_demo import data

OK, NO, MEH, INFO = "ok", "bad", "meh", "info"
ICON = {OK: "✅", NO: "❌", MEH: "➖", INFO: "💰"}


def _pct(before: float, after: float) -> str:
    return f"{100 * (after - before) / before:+.1f}%" if before else "–"


def _row(kind: str, question: str, answer: str, figures: str, icon: str = "") -> str:
    return (f"<div class='q {kind}'><span class='icon'>{icon or ICON[kind]}</span><div><b>{html.escape(question)}</b> "
            f"{answer}<div class='fig'>{figures}</div></div></div>")


def _lesson(s: dict) -> data.Lesson:
    return data.LESSONS.get(s.get("data") or data.DEFAULT_LESSON, data.LESSONS[data.DEFAULT_LESSON])


def learned(s: dict) -> tuple[str, str, str]:
    """(kind, answer, figures) for "did it learn what it trained on?": the held-out loss base -> LoRA, and
    whether the fall is more than the luck of which sentences were held out."""
    summ, lesson = s.get("summary") or {}, _lesson(s)
    base, final = summ.get("base_heldout_loss"), summ.get("final_heldout_loss")
    if base is None or final is None:
        return MEH, "Not measured: the run ended before its first evaluation.", ""
    figures = (f"held-out loss on {summ.get('heldout_pairs') or ''} {html.escape(lesson.heldout_name)} pairs it never "
               f"trained on: {base:.3f} → {final:.3f} ({_pct(base, final)})")
    change = (s.get("quality") or {}).get("heldout_change")
    if change is None:
        return MEH, ("The loss fell" if final < base else "The loss rose") + (
            ", but it was not tested against the luck of which sentences were held out (that test runs with "
            "BLEU/chrF scoring, off for this run)."), figures
    if change["real"]:
        if change["change"] < 0:
            return OK, "Yes: the held-out loss fell by more than the luck of which sentences were held out.", figures
        return NO, "No: the held-out loss rose, by more than the luck of which sentences were held out.", figures
    return MEH, "Not clearly: the change is within the luck of which sentences were held out.", figures


def german(s: dict) -> tuple[str, str, str]:
    """(kind, answer, figures) for "did the German get better?": chrF and BLEU base -> LoRA on the scored
    slice, with the paired bootstrap's verdict on each."""
    q = s.get("quality")
    if not q:
        return MEH, "Not scored: BLEU/chrF is off for this run (More settings).", ""
    change = q.get("change") or {}
    parts, verdicts = [], {}
    for key, name in (("chrf", "chrF"), ("bleu", "BLEU")):
        c = change.get(key)
        verdicts[key] = None if c is None else (("rise" if c["change"] > 0 else "fall") if c["real"] else "noise")
        said = {"rise": "a real rise", "fall": "a real fall", "noise": "within noise", None: ""}[verdicts[key]]
        parts.append(f"{name} {q['base'][key]:.1f} → {q['lora'][key]:.1f} ({q['lora'][key] - q['base'][key]:+.1f}"
                     + (f", {said}" if said else "") + ")")
    loops = ""
    if q["base"].get("loops") is not None and q["lora"].get("loops") is not None:
        loops = f" · repetition loops {q['base']['loops']} → {q['lora']['loops']}"
    figures = f"{' · '.join(parts)} on {q['n']} {html.escape(q.get('split') or '')} sentences{loops}"
    chrf = verdicts["chrf"]
    if chrf == "rise":
        return OK, "Yes: chrF rose by more than the luck of which sentences were scored.", figures
    if chrf == "fall":
        return NO, "No: chrF fell by more than the luck of which sentences were scored.", figures
    return MEH, "Not clearly: the chrF change is within the luck of which sentences were scored.", figures


def forgot(s: dict) -> tuple[str, str, str]:
    """(kind, answer, figures) for "what did it forget?": the loss on what the base already translated (the
    second live curve), base -> LoRA, with its paired bootstrap where measured."""
    summ, lesson = s.get("summary") or {}, _lesson(s)
    base, final = summ.get("base_val_loss"), summ.get("final_val_loss")
    if base is None or final is None:
        return MEH, "Not measured.", ""
    figures = f"loss on {html.escape(lesson.knew_name)} (what the base knew): {base:.3f} → {final:.3f} ({_pct(base, final)})"
    change = (s.get("quality") or {}).get("forget_change")
    if change is not None and not change["real"]:
        return OK, "Nothing beyond noise.", figures
    if final > base:
        return NO, "Some: the loss on what the base knew rose" + (", a real rise." if change else "."), figures
    return OK, "Nothing: the loss on what the base knew did not rise.", figures


def cost(s: dict) -> str:
    params, summ = s.get("params") or {}, s.get("summary") or {}
    parts = []
    if params.get("trainable") is not None:
        parts.append(f"{params['trainable']:,} trainable weights ({params['pct_trainable']:.3f}% of "
                     f"{params['total'] / 1e6:.1f}M)")
    if s.get("adapter_bytes"):
        parts.append(f"adapter {s['adapter_bytes'] / 1e6:.2f} MB")
    if summ.get("elapsed_s") is not None:
        parts.append(f"{summ['elapsed_s']:.0f} s of training ({summ.get('steps_done', s.get('step'))} steps)")
    if s.get("finished_s") is not None:
        parts.append(f"{s['finished_s']:.0f} s from start to result")
    return " · ".join(parts)


def headline(s: dict) -> tuple[str, str]:
    """(kind, one line): the verdict a first-time user reads first."""
    (lk, _, _), (gk, _, _), (fk, _, _) = learned(s), german(s), forgot(s)
    lesson = "the " + _lesson(s).name if _lesson(s).name != "europarl" else "Europarl"
    first = {OK: f"LoRA learned {lesson}", NO: f"LoRA did not learn {lesson}",
             MEH: f"LoRA did not clearly learn {lesson}"}[lk]
    if not s.get("quality"):
        second = "; its German was not scored."
    else:
        second = {OK: ", and its German got better.", NO: ", and its German got worse.",
                  MEH: ", but its German did not clearly change." if lk == OK
                  else ", and its German did not clearly change."}[gk]
    third = " It forgot some of what the base knew." if fk == NO else ""
    kind = OK if lk == OK and gk == OK else NO if NO in (lk, gk) else MEH
    if s["status"] != "completed":
        if (s.get("summary") or {}).get("final_heldout_loss") is None:
            return MEH, f"Stopped after {s['step']} of {s['total_steps']} steps, before its first evaluation."
        return kind, f"Stopped after {s['step']} of {s['total_steps']} steps. So far: {first}."
    return kind, first + second + third


def result_card(s: dict) -> str:
    """The card after a finished run: a one-line verdict, then a verdict per question."""
    if s["status"] == "failed":
        return f"<div class='card'><div class='headline bad'>❌ The run failed. {html.escape(s.get('error') or '')}</div></div>"
    kind, line = headline(s)
    icon = ICON[kind] if s["status"] == "completed" else "⏹️"
    rows = [_row(*_q("Did it learn what it trained on?", learned(s))),
            _row(*_q("Did the German get better?", german(s))),
            _row(*_q("Did it forget what the base knew?", forgot(s))),
            _row(INFO, "What did it cost?", "", cost(s))]
    return (f"<div class='card' id='result-card'><div class='headline {kind}'>{icon} {html.escape(line)}</div>"
            + "".join(rows) + "</div>")


def _q(question: str, answer: tuple[str, str, str]) -> tuple[str, str, str, str]:
    kind, said, figures = answer
    return kind, question, html.escape(said), figures
