"""The named endpoints for API clients: plain values in and out, so a ``gradio_client`` script can do
everything the page does.

A run belongs to whoever holds its owner key. ``/train``, ``/sweep`` and ``/import_adapter`` return
the key they used; any client that passes it as ``owner_key`` may stop, list, translate with,
download, inspect and delete those runs. A call without a key acts with its connection's own key
(so one connection sees its own runs, as before), and a client without the right key is refused.
"""

from __future__ import annotations

from typing import Iterator

import gradio as gr

from lora_demo.analysis import anatomy
from lora_demo.analysis import compare
from lora_demo.present import share
from lora_demo.core.config import ConfigError, TrainConfig, expand_sweep, parse_methods, parse_ranks, parse_seeds
from lora_demo.core.params import preview
from lora_demo.lab import Lab
from lora_demo.lab.records import summary_row
from lora_demo.app.common import DEFAULT_RANKS, errors, key_of
from lora_demo.app.common import depth
from lora_demo.core import settings
from lora_demo.app.common import import_files

_T = TrainConfig()   # API defaults are the config's defaults


class Api:
    def __init__(self, lab: Lab):
        self.lab = lab

    def register(self) -> None:
        """Declare every endpoint inside the current gr.Blocks."""
        for name in ("params", "train", "sweep", "stop", "runs", "translate", "delete_run", "inspect", "similarity",
                     "budget", "analyse", "resume", "settings"):
            gr.api(getattr(self, name), api_name=name, concurrency_limit=None)
        # endpoints with file inputs or outputs go through hidden components
        hidden = gr.Button(visible=False)
        run, key = gr.Textbox(visible=False), gr.Textbox(visible=False)
        files, file_out, answer = gr.File(file_count="multiple", visible=False), gr.File(visible=False), \
            gr.JSON(visible=False)
        hidden.click(self.import_adapter, [files, key], [answer], api_name="import_adapter")
        hidden.click(self.download_adapter, [run, key], [file_out], api_name="download_adapter")
        hidden.click(self.download_merged, [run, key], [file_out], api_name="download_merged")
        hidden.click(self.report, [run, key], [file_out], api_name="report")

    def _key(self, request, presented) -> str:
        return key_of(self.lab, request, presented)

    def _config(self, params: dict, **values):
        """The run's config from an endpoint's parameters (the settings table's ``api`` names)."""
        samples = params.get("samples")
        return settings.config_of({**settings.from_api(params), **values}, self.lab.loaded.name, depth(self.lab),
                                  samples=samples or ())

    @errors
    def params(self, rank: int = 8, alpha: float = 16.0, targets: list[str] | None = None, side: str = "both",
               first_layer: int = 0, last_layer: int = -1, method: str = "lora") -> dict:
        """Exact parameter breakdown for a LoRA config on the loaded model (no training needed)."""
        cfg = settings.lora_of(settings.from_api(locals()), depth(self.lab))
        b = preview(self.lab.loaded.model.config, cfg)
        return {**b.to_dict(), "rows": b.rows(), "config": {"rank": cfg.rank, "alpha": cfg.alpha,
                                                           "targets": list(cfg.targets), "side": cfg.side,
                                                           "layers": cfg.layers, "method": cfg.method}}

    @errors
    def train(self, rank: int = 8, alpha: float = 16.0, targets: list[str] | None = None, side: str = "both",
              first_layer: int = 0, last_layer: int = -1, steps: int = _T.steps, batch_size: int = _T.batch_size,
              lr: float = _T.lr, train_size: int = _T.train_size, seed: int = _T.seed, optimizer: str = _T.optimizer,
              bleu_size: int = _T.bleu_size, data: str = _T.data, eval_every: int = _T.eval_every,
              early_stop: int = _T.early_stop, samples: list[str] | None = None, owner_key: str = "",
              method: str = "lora", loraplus_ratio: float = 16.0, checkpoint_every: int = _T.checkpoint_every,
              request: gr.Request = None) -> Iterator[dict]:
        """Queue a training run and stream its progress; the last message carries the summary and BLEU/chrF.
        ``data``: the lesson, "captions" (the default: Multi30k, WMT16's multimodal task 1), "news" or
        "europarl"; ``samples``: sentences translated at every evaluation (default none; the page uses three); ``early_stop``: patience in evaluations (0 = off); ``method``: lora,
        rslora, dora, pissa, loraplus (with ``loraplus_ratio``) or full; ``checkpoint_every``: steps between
        checkpoints (0 = off), which /resume continues from.
        Every message carries ``owner_key``: with it, any client may stop, use or delete the run."""
        cfg = self._config(locals())
        key = self._key(request, owner_key)
        job = self.lab.submit(cfg, key)
        for status in self.lab.watch(job):
            yield {**status, "owner_key": key}

    @errors
    def sweep(self, ranks: str = DEFAULT_RANKS, alpha: float = 16.0, targets: list[str] | None = None,
              side: str = "both", first_layer: int = 0, last_layer: int = -1, steps: int = _T.steps,
              batch_size: int = _T.batch_size, lr: float = _T.lr, train_size: int = _T.train_size,
              seed: int = _T.seed, optimizer: str = _T.optimizer, bleu_size: int = _T.bleu_size,
              seeds: str = "", data: str = _T.data, eval_every: int = _T.eval_every, early_stop: int = _T.early_stop,
              samples: list[str] | None = None, owner_key: str = "", methods: str = "",
              loraplus_ratio: float = 16.0, checkpoint_every: int = _T.checkpoint_every,
              request: gr.Request = None) -> Iterator[dict]:
        """Train the same config at each rank, once per seed (``seeds`` "0,1,2"; default: ``seed`` alone),
        and with each of ``methods`` ("lora,dora,full"; default: lora); runs with the same seed share the
        data order. Streams every run's status; the last message also has ``groups`` (each config's
        held-out mean and spread over seeds) and ``verdicts`` between neighbouring configs."""
        params = dict(locals())
        key = self._key(request, owner_key)
        ranks_list = parse_ranks(ranks)
        seed_list = parse_seeds(seeds) if str(seeds or "").strip() else [seed]
        method_list = parse_methods(methods) if str(methods or "").strip() else ["lora"]
        cfg = self._config(params, rank=ranks_list[0], method=method_list[0])
        jobs = self.lab.submit_sweep(expand_sweep(cfg, ranks_list, seed_list, method_list), key)
        for job in jobs:
            for _ in self.lab.watch(job):
                yield {"sweep": job.sweep, "runs": [self.lab.status(j) for j in jobs], "owner_key": key}
        gs = compare.groups([j.record() for j in jobs])
        yield {"sweep": jobs[0].sweep, "runs": [self.lab.status(j) for j in jobs], "owner_key": key,
               "groups": [{k: g[k] for k in ("label", "method", "rank", "seeds", "heldout", "delta", "forget", "bleu")}
                          for g in gs],
               "verdicts": [compare.verdict(a, b) for a, b in zip(gs, gs[1:])], "rule": compare.RULE}

    @errors
    def resume(self, run_id: str, steps: int = 0, owner_key: str = "", request: gr.Request = None) -> Iterator[dict]:
        """Continue a stopped, interrupted or ended run from its newest checkpoint, to ``steps`` (0: the
        steps it planned; more goes beyond them). Streams its status as /train does; the status's
        ``resumes`` says where it resumed, ``checkpoint_steps`` which checkpoints it keeps."""
        key = self._key(request, owner_key)
        job = self.lab.resume(run_id, key, int(steps) if steps else None)
        for status in self.lab.watch(job):
            yield {**status, "owner_key": key}

    @errors
    def settings(self, run_id: str, owner_key: str = "", request: gr.Request = None) -> dict:
        """A run's settings as the page's controls (``values``), the page link's query and the
        ``python -m lora_demo`` command lines that train the same run."""
        job = self.lab.session_job(run_id, self._key(request, owner_key))
        values = settings.values_of(job.config, depth(self.lab))
        full = {**values, "ranks": str(values["rank"]), "methods": values["method"]}
        return {"values": values, "query": share.to_query(values),
                "cli": share.cli_lines(full, self.lab.loaded.name, self.lab.precision, self.lab.data_source,
                                       depth(self.lab), job.config.train.samples)}

    @errors
    def stop(self, run_id: str = "", owner_key: str = "", request: gr.Request = None) -> dict:
        """Stop a run or a whole sweep (default: this session's newest unfinished run). Within one step."""
        mine = self.lab.runs(self._key(request, owner_key))
        if run_id:
            if not any(run_id in (j.id, j.sweep) for j in mine):
                raise ConfigError(f"no run or sweep {run_id!r} in this session")
            target = run_id
        else:
            going = [j for j in mine if not j.done.is_set()]
            if not going:
                raise ConfigError("no run to stop in this session")
            target = going[-1].sweep or going[-1].id
        job = self.lab.stop(target)
        # the step the run had logged when the request arrived: it ends after at most one more
        return {"stopped": target, "stop_requested": True, "step_at_request": job.losses[-1][0] if job.losses else 0}

    @errors
    def delete_run(self, run_id: str, owner_key: str = "", request: gr.Request = None) -> dict:
        """Delete one of this session's finished runs and its files (to make room under the run limit)."""
        return {"deleted": self.lab.delete(run_id, self._key(request, owner_key)).id}

    @errors
    def runs(self, all_runs: bool = False, owner_key: str = "", request: gr.Request = None) -> list[dict]:
        """Recorded runs of this session (or of the whole server with all_runs), oldest first."""
        key = self._key(request, owner_key)
        return [summary_row(j, key) for j in self.lab.runs(None if all_runs else key)]

    @errors
    def translate(self, text: str, run_id: str = "", scale: float = 1.0, reference: str = "",
                  sides: list[str] | None = None, blocks: str = "all", modules: list[str] | None = None,
                  beside: list[str] | None = None, owner_key: str = "", request: gr.Request = None) -> dict:
        """English lines -> base and LoRA German side by side (default run: this session's newest).
        With reference German (one line per sentence), per-sentence chrF for both. ``sides``, ``blocks``
        and ``modules`` keep only part of the adapter on (e.g. sides=["decoder"], modules=["self q"]).
        ``beside``: up to three more run ids; ``runs`` then holds each run's German (and chrF), every
        column from one batched decode with the base."""
        return self.lab.translate_request(text, run_id, scale, self._key(request, owner_key), reference,
                                          anatomy.keep_spec(sides, blocks, modules), beside=beside)

    @errors
    def inspect(self, run_id: str, owner_key: str = "", request: gr.Request = None) -> dict:
        """ΔW of each adapted layer: ‖ΔW‖_F, ‖ΔW‖/‖W‖, singular values, effective rank; the heatmap grid."""
        return self.lab.inspect(run_id, self._key(request, owner_key))

    @errors
    def analyse(self, run_id: str, owner_key: str = "", request: gr.Request = None) -> dict:
        """What a run learned and forgot, from its weights: held-out (en→de) and de→en loss as its scale
        goes 0 → 1, the rank-truncation curve, and per layer ‖ΔW‖/‖W‖, magnitude and direction change and
        intruder dimensions beside a random update of the same norm and rank."""
        return self.lab.analyse(run_id, self._key(request, owner_key))

    @errors
    def similarity(self, run_a: str, run_b: str, owner_key: str = "", request: gr.Request = None) -> dict:
        """Subspace similarity φ (Hu et al. 2021, sec. 7) per shared layer between two of this session's runs."""
        return self.lab.similarity(run_a, run_b, self._key(request, owner_key))

    @errors
    def budget(self, run_id: str, owner_key: str = "", request: gr.Request = None) -> dict:
        """A run's budget predicted when it was queued, beside what it measured."""
        return self.lab.budget(run_id, self._key(request, owner_key))

    # owner_key defaults to None here: a hidden component with no value is otherwise a required argument
    @errors
    def import_adapter(self, files, owner_key: str | None = None, request: gr.Request = None) -> dict:
        """Import an adapter (a zip, or adapter_config.json + adapter_model.safetensors) into this session."""
        key = self._key(request, owner_key)
        job = import_files(self.lab, files, key)
        lora = job.config.lora
        return {"run_id": job.id, "owner_key": key, "status": job.status, "rank": lora.rank, "alpha": lora.alpha,
                "targets": list(lora.targets), "side": lora.side, "layers": list(lora.layers) if lora.layers else None,
                "adapter_bytes": job.adapter_files["bytes"], "trainable": job.params.get("trainable"),
                "notices": job.origin.get("notices", [])}

    @errors
    def download_adapter(self, run_id, owner_key: str | None = None, request: gr.Request = None) -> str:
        """This session's run ``run_id`` as a zip of its PEFT adapter directory."""
        return str(self.lab.adapter_zip(run_id, self._key(request, owner_key)))

    @errors
    def report(self, run_ids, owner_key: str | None = None, request: gr.Request = None) -> str:
        """A self-contained HTML report of this session's runs ``run_ids`` (comma-separated; default: all)."""
        key = self._key(request, owner_key)
        ids = [i for i in str(run_ids or "").replace(" ", ",").split(",") if i]
        jobs = [self.lab.session_job(i, key) for i in ids] if ids else self.lab.runs(key)
        if not jobs:
            raise ConfigError("no runs in this session to report")
        return str(self.lab.report(jobs))

    @errors
    def download_merged(self, run_id, owner_key: str | None = None, request: gr.Request = None) -> str:
        """This session's run ``run_id`` merged into the base model: a zip of a TF save_pretrained checkpoint."""
        return str(self.lab.export_merged(run_id, self._key(request, owner_key)))
