"""What ``train()`` yields: plain dataclasses, so any consumer (UI, CLI, records) can use them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RunStarted:
    config: dict
    params: dict           # the exact breakdown of the model as it will train
    device: str
    train_pairs: int
    data_origin: str       # "hub" or "bundled"
    shapes: dict           # padded source/target lengths: one shape per run, so one trace


@dataclass(frozen=True)
class StepLogged:
    step: int              # 1-based
    loss: float
    lr: float
    tokens: int            # real (non-pad) source + target tokens in this step's batch
    tokens_per_s: float    # tokens / this step's wall time
    elapsed_s: float       # since train() was called
    compiled: bool         # False while the compiled step is still being traced
    grad_norm: float | None = None   # global norm of the LoRA gradients, before clipping


@dataclass(frozen=True)
class SamplesLogged:
    step: int              # 0 = the base model
    translations: list     # one per sample sentence (the run's config lists them)
    elapsed_s: float


@dataclass(frozen=True)
class EvalLogged:
    step: int              # 0 = the base model (the adapter at scale 0)
    val_loss: float        # the lesson's second curve: what the base knew (data.LESSONS: knew_name)
    elapsed_s: float
    heldout_loss: float | None = None   # fixed held-out slice of the training distribution


@dataclass(frozen=True)
class RunFinished:
    status: str            # "completed" (all steps, or early stopping) or "stopped"
    summary: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunFailed:
    step: int
    reason: str            # what happened, in words a person understands
    hint: str              # what to change


@dataclass(frozen=True)
class CheckpointSaved:
    step: int              # the steps done when it was saved: a resumed run continues with step + 1
    file: str              # its file name in the run's checkpoints/ directory
    bytes: int


@dataclass(frozen=True)
class RunResumed:
    step: int              # the checkpoint it continues from: what was logged after it is measured again
    was: str               # the record's status before (stopped, interrupted, completed, failed)
    steps: int             # the steps it now runs to


Event = RunStarted | StepLogged | EvalLogged | SamplesLogged | RunFinished | RunFailed | CheckpointSaved | RunResumed


def to_dict(event: Event) -> dict:
    return {"event": type(event).__name__, **asdict(event)}


def summary_text(status: str, s: dict) -> str:
    """The end-of-run figures, as measured (shared with the app's status line)."""
    lines = [f"{status}: {s['steps_done']} steps in {s['elapsed_s']:.1f} s; first loss point after "
             f"{s['first_loss_s']:.1f} s; " + (f"{s['mean_step_s']:.3f} s/step compiled" if s["mean_step_s"]
                                              else "no compiled step (run too short)")]
    if s.get("probe_loss_base") is not None:
        lines.append(f"train loss on {s['probe_pairs']} fixed training pairs: base {s['probe_loss_base']:.3f} -> "
                     f"LoRA {s['probe_loss_final']:.3f}")
    if s.get("final_heldout_loss") is not None:
        lines.append(f"held-out loss ({s['heldout_name']}, never trained on): base {s['base_heldout_loss']:.3f} -> "
                     f"LoRA {s['final_heldout_loss']:.3f} ({s['final_heldout_loss'] - s['base_heldout_loss']:+.3f})")
    if s.get("final_val_loss") is not None:
        lines.append(f"loss on what the base knew ({s.get('val_name') or 'validation slice'}, forgetting): base "
                     f"{s['base_val_loss']:.3f} -> LoRA {s['final_val_loss']:.3f} "
                     f"({s['final_val_loss'] - s['base_val_loss']:+.3f})")
    if s.get("stop_reason"):
        lines.append(f"ended: {s['stop_reason']}")
    return "\n".join(lines)


def loops_text(quality: dict) -> str:
    """How many greedy translations of the scored slice fell into a repetition loop, base and LoRA ("" for
    records from before the count was kept)."""
    base, lora = quality["base"].get("loops"), quality["lora"].get("loops")
    if base is None or lora is None:
        return ""
    return f"; repetition loops base {base} -> LoRA {lora} of {quality['n']}"


def change_text(quality: dict) -> str:
    """Whether the chrF and BLEU changes of the scored slice are more than the luck of which sentences it
    holds (evaluate.paired_change; "" for records from before it was kept)."""
    change = quality.get("change")
    if not change:
        return ""
    parts = []
    for key, name in (("chrf", "chrF"), ("bleu", "BLEU")):
        c = change[key]
        verdict = "a real change" if c["real"] else "within the noise of which sentences were scored"
        parts.append(f"{name} {c['change']:+.2f} (95% of resampled slices: {c['low']:+.2f} to {c['high']:+.2f}; "
                     f"{verdict})")
    return (f"\npaired bootstrap over {change['samples']:,} resamplings of the {change['sentences']} sentences: "
            + "; ".join(parts))


def confidence_text(quality: dict, summary: dict) -> str:
    """How much of the run's held-out fall one softmax temperature on the base reaches with its German
    unchanged, and the fall left with each model at its best temperature (quality.confidence; "" for
    records from before it was kept)."""
    c = quality.get("confidence")
    if not c or summary.get("final_heldout_loss") is None:
        return ""
    base, lora = c["base"], c["lora"]
    return (f"\nconfidence alone: one softmax temperature on the base (T = {base['temperature']:.2f}) changes its "
            f"held-out loss by {base['best_loss'] - base['loss']:+.3f} without changing a word of its German; the run "
            f"changed it by {summary['final_heldout_loss'] - summary['base_heldout_loss']:+.3f}, and by "
            f"{lora['best_loss'] - base['best_loss']:+.3f} with each model at its best temperature (LoRA's "
            f"T = {lora['temperature']:.2f})")


def first_choice_text(quality: dict) -> str:
    """The share of held-out target tokens each model ranks first given the reference so far, base and LoRA,
    with the paired bootstrap's verdict (quality.first_choice; "" for records from before it was kept)."""
    f = quality.get("first_choice")
    if not f:
        return ""
    verdict = "a real change" if f["real"] else "within the noise of which sentences were measured"
    return (f"\nfirst choice right (held-out, given the reference so far: greedy decoding writes the first "
            f"choice): base {100 * f['base']:.2f}% -> LoRA {100 * f['lora']:.2f}% of {f['tokens']:,} tokens, "
            f"{100 * f['change']:+.2f} points (95% of resampled sentence sets: {100 * f['low']:+.2f} to "
            f"{100 * f['high']:+.2f}; {verdict})")


def words_text(quality: dict) -> str:
    """The words whose count in the scored German changed most, base to LoRA, each with the references'
    count and whether LoRA's is nearer it (quality.words; "" for records from before it was kept)."""
    words = quality.get("words")
    if not words:
        return ""

    def side(w: dict) -> str:
        before, after = abs(w["base"] - w["reference"]), abs(w["lora"] - w["reference"])
        return "nearer" if after < before else "further from" if after > before else "as far from"
    parts = [f"\u201c{w['word']}\u201d {w['base']} -> {w['lora']} (references {w['reference']}; {side(w)} them)"
             for w in words]
    return (f"\nwords written more or less often in the {quality['n']} sentences, base -> LoRA: "
            + "; ".join(parts))


def quality_lines(quality: dict, summary: dict) -> list[str]:
    """The lines after BLEU/chrF that every view of a run prints, in one order (the CLI, the app's status
    line, the HTML report): sentence noise, words, confidence, first choices; those a record lacks are left
    out."""
    texts = (change_text(quality), words_text(quality), confidence_text(quality, summary), first_choice_text(quality))
    return [t.strip() for t in texts if t]
