"""The sample sentences of a run, translated at each evaluation point, and the one way a run's
model is chosen for translating (samples, BLEU and chrF alike)."""

from __future__ import annotations

import contextlib
import threading
import time

from lora_demo import data
from lora_demo.core.events import SamplesLogged
from lora_demo.core.inject import at_scale


SAMPLE_TOKENS = 48


@contextlib.contextmanager
def translating(model, lora, translator=None, base: bool = False):
    """The model that translates for a run as it stands (``base``: as it was before training).

    With a ``translator`` (lab.serving.Serving, as the app has) that fixed model, with the run's
    update merged in for the length of the block (nothing merged for the base); without one (the
    CLI) the training model itself, its adapter at scale 0 for the base. Samples, BLEU and chrF all
    take their model from here."""
    if translator is not None:
        from lora_demo.adapters import run_state

        with translator.use(lora, None if base else run_state(model, lora)) as merged:
            yield merged
    elif base:   # (full fine-tuning has no scale to set: its base is scored before its first step)
        with at_scale(model, 0.0):
            yield model
    else:
        yield model


class Samples:
    """The run's sample sentences, translated at every evaluation point (base model first) with the
    compiled generation path. With a ``translator`` (lab.serving.Serving, as the app has) the
    current adapter is merged into that fixed model, whose compiled functions serve every run;
    without one (the CLI) the training model translates, the adapter at scale 0 for the base. The
    generate function is compiled in a background thread after the first step, so the first evaluation
    point does not wait for it. The tokenizer is used only on the training thread (the fast
    tokenizer must not be used by two threads at once)."""

    def __init__(self, model, tokenizer, sentences, lora=None, translator=None):
        from lora_demo.analysis.evaluate import encode_chunk

        self.model, self.tokenizer, self.lora, self.translator = model, tokenizer, lora, translator
        self.ids, self.mask, self.n = encode_chunk(tokenizer, [data.PROMPT + s for s in sentences])
        self.thread: threading.Thread | None = None
        self.logged_base = False

    def _generate(self, base: bool):
        from lora_demo.analysis.evaluate import generate_ids

        with translating(self.model, self.lora, self.translator, base) as model:
            return generate_ids(model, self.ids, self.mask, SAMPLE_TOKENS)

    def _translate(self, base: bool = False) -> list[str]:
        gen = self._generate(base)
        return data.decode(self.tokenizer, gen, self.n)

    def warm_up(self, after=None) -> None:
        """Compile the generate function in a thread, once ``after`` (the step's trace: both hold the
        GIL while tracing, so side by side each takes longer and the first compiled step waits) is done."""
        from lora_demo.analysis.evaluate import generate_ids

        def run():
            if after is not None:
                after.join()
            try:   # compiles (once per process with a translator); the output is thrown away
                # (the training model at scale 1: this thread runs beside training, which must not see scale 0)
                with self.translator.use() if self.translator is not None else contextlib.nullcontext(self.model) \
                        as model:
                    generate_ids(model, self.ids, self.mask, SAMPLE_TOKENS)
            except Exception:  # the evaluation point translates (and reports) itself
                pass
        self.thread = threading.Thread(target=run, daemon=True, name="samples-compile")
        self.thread.start()

    def log_base(self, t0: float):
        """The base model's German (step 0). Full fine-tuning without a translator logs it before the
        first step: later the training model is no longer the base."""
        if not self.logged_base:
            base = self._translate(base=True)
            self.logged_base = True
            yield SamplesLogged(0, base, time.perf_counter() - t0)

    def log(self, step: int, t0: float):
        self.finish()
        yield from self.log_base(t0)
        yield SamplesLogged(step, self._translate(), time.perf_counter() - t0)

    def finish(self) -> None:
        if self.thread is not None:
            self.thread.join()
