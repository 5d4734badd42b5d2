"""The loss, the train step and the eval function of a TF T5, and the exact token-weighted loss over
fixed batches (with the adapter at scale 0 for the base model's)."""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

from lora_demo.core.inject import at_scale
from lora_demo.core.lora import DropoutClock


def target_logits(model, batch, training: bool):
    """(logits, labels) at the target positions that count: (N, vocab) float32 and (N,).

    The LM head runs only on those positions: the decoder's states at non-pad labels are gathered
    first, so padding costs no head FLOPs and no (positions x vocabulary) logits are kept for the
    backward pass."""
    labels = batch["labels"]                                              # (B, T) with -100 padding
    mask = batch["attention_mask"]
    encoded = model.encoder(batch["input_ids"], attention_mask=mask, training=training)[0]
    states = model.decoder(model._shift_right(labels), encoder_hidden_states=encoded, encoder_attention_mask=mask,
                           use_cache=False, training=training)[0]       # (B, T, d)
    where = tf.where(labels != -100)                                      # (N, 2): the real targets
    states = tf.gather_nd(states, where)                                  # (N, d)
    if model.config.tie_word_embeddings:   # as TFT5ForConditionalGeneration.call does it
        logits = tf.matmul(states * (model.model_dim ** -0.5), tf.cast(model.shared.embeddings, states.dtype),
                           transpose_b=True)
    else:
        logits = model.lm_head(states)                                    # (N, vocab)
    return tf.cast(logits, tf.float32), tf.gather_nd(labels, where)


def token_losses(model, batch, training: bool):
    """(sum of token cross-entropies, number of target tokens) over non-pad targets, in float32: the
    loss over full logits with the padding masked out."""
    logits, targets = target_logits(model, batch, training)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
    return tf.reduce_sum(ce), tf.cast(tf.shape(targets)[0], tf.float32)


def seq2seq_loss(model, batch, training: bool):
    """Mean token cross-entropy of one batch: the training objective."""
    total, count = token_losses(model, batch, training)
    return total / tf.maximum(count, 1.0)


@contextlib.contextmanager
def trained_tape(variables):
    """A tape that watches only the weights being trained. By default a tape watches every trainable
    variable it reads, and the frozen base weights are still tf.Variables marked trainable; an eager
    step would then record and differentiate toward all of them (gradients nobody uses, held until
    the backward pass ends). Compiled steps prune that work either way."""
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(variables)
        yield tape


def make_step(model, opt, variables, clip_norm: float, clock: DropoutClock | None = None):
    def step(batch):
        if clock is not None:   # the dropout masks of this step are keyed on the step number
            clock.step.assign_add(1)
        with trained_tape(variables) as tape:
            loss = seq2seq_loss(model, batch, training=True)
        grads = tape.gradient(loss, variables)
        if clip_norm > 0:
            grads, norm = tf.clip_by_global_norm(grads, clip_norm)   # norm: before clipping
        else:
            norm = tf.linalg.global_norm(grads)
        opt.apply_gradients(zip(grads, variables))
        return tf.stack([loss, tf.cast(norm, loss.dtype)])   # (loss, gradient norm)
    return step


def make_preview(model, clock: DropoutClock | None):
    """The loss of the next step, as that step will compute it (its dropout masks, training mode), from an
    eager forward pass with no tape: reported at once while the step is traced, and the update itself then
    runs compiled. A taped eager step holds every activation until its backward pass, and the allocator
    keeps that working set: on flan-t5-base it raised the run's peak by 1 GB (BENCHMARKS.md)."""
    def preview(batch) -> float:
        if clock is None:
            return float(seq2seq_loss(model, batch, training=True))
        clock.step.assign_add(1)
        try:
            return float(seq2seq_loss(model, batch, training=True))
        finally:
            clock.step.assign_sub(1)
    return preview


def make_eval(model):
    def evaluate(batch):
        return token_losses(model, batch, training=False)
    return evaluate


def count_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())


def eval_loss(fn, batches) -> float:
    """Token-weighted mean loss over a fixed set of batches (exact, unlike a mean of batch means)."""
    sums = np.array([[float(x) for x in fn(b)] for b in batches])
    return float(sums[:, 0].sum() / max(sums[:, 1].sum(), 1.0))


def base_and_lora(model, fn, batches, base: float | None = None) -> tuple[float, float]:
    """The same loss with the adapter at scale 0 (the base model, exactly) and at scale 1. With
    ``base`` (full fine-tuning: measured before the first step) only the second is measured."""
    if base is not None:
        return base, eval_loss(fn, batches)
    with at_scale(model, 0.0):
        base = eval_loss(fn, batches)
    return base, eval_loss(fn, batches)


# The softmax temperatures searched for the lowest held-out loss, and how closely the best is found.
T_RANGE, T_TOLERANCE = (0.5, 2.0), 0.01
_GOLDEN = (5 ** 0.5 - 1) / 2


def best_temperature(kept) -> dict:
    """How far the held-out loss falls by changing only the model's confidence: the token-weighted loss
    of ``kept`` (heldout_logits' (logits, targets) of each batch) with every logit divided by one
    temperature T, at T = 1 and at the best T in T_RANGE (to within T_TOLERANCE). One T > 0 for every
    logit keeps each position's argmax, so the greedy German is the same at every T: what this lowers, a
    run could lower without changing a word.

    The loss is convex in 1/T, so it has one minimum over T, found by golden-section search on logits
    computed once: 14 evaluations of the loss instead of a 31-point grid. On flan-t5-small (random
    weights, float32; 64 held-out pairs, 2,271 target tokens, a 32,128-word vocabulary; AVX512-BF16 EPYC)
    the forward pass takes 3.2 s and each evaluation 0.2 s: 6.1 s in all, against 10.8 s for the grid."""
    count = max(sum(int(targets.shape[0]) for _, targets in kept), 1)

    def loss(t: float) -> float:
        return sum(float(tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits / t)))
                   for logits, targets in kept) / count

    lo, hi = T_RANGE
    x1, x2 = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    f1, f2 = loss(x1), loss(x2)
    while hi - lo > T_TOLERANCE:
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - _GOLDEN * (hi - lo)
            f1 = loss(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + _GOLDEN * (hi - lo)
            f2 = loss(x2)
    t, best = (x1, f1) if f1 <= f2 else (x2, f2)
    at_one = loss(1.0)
    if at_one <= best:
        t, best = 1.0, at_one
    return {"tokens": count, "loss": at_one, "temperature": round(t, 2), "best_loss": best}


def heldout_logits(model, batches) -> list:
    """(logits, targets) of each batch's real target positions, teacher-forced, in evaluation mode: the one
    forward pass that best_temperature and first_choice both read."""
    return [target_logits(model, batch, training=False) for batch in batches]


def first_choice(kept, batches) -> dict:
    """Per row of ``batches``: how many of its target tokens the model ranks first given the reference so
    far (``right``), and how many it has (``targets``). Greedy decoding writes the first choice, so this
    share, not the loss, is what the greedy German follows: a run can lower the loss by moving probability
    among wrong words, or onto the right word without making it the first, and change no German for the
    better. ``nll``: each row's summed next-token loss (its held-out loss, per sentence, for the paired
    bootstrap of the loss). ``kept`` is heldout_logits(model, batches)."""
    right: list[int] = []
    targets: list[int] = []
    nll: list[float] = []
    for (logits, labels), batch in zip(kept, batches):
        rows = np.nonzero(np.asarray(batch["labels"]) != -100)[0]   # row-major, as target_logits gathers them
        hit = np.argmax(logits.numpy(), axis=-1) == labels.numpy()
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits).numpy()
        n = len(batch["labels"])
        right += np.bincount(rows, weights=hit, minlength=n).astype(int).tolist()
        targets += np.bincount(rows, minlength=n).astype(int).tolist()
        nll += np.bincount(rows, weights=loss, minlength=n).tolist()
    return {"right": right, "targets": targets, "nll": nll}
