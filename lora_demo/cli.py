"""Command line: ``python -m lora_demo params|train|sweep|methods|translate|export|inspect|report|bench ...``.

The CLI calls the same functions as the app, so its numbers are the app's numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from lora_demo.core import settings
from lora_demo.core.config import (METHOD_LR, METHODS, ConfigError, LoraConfig, RunConfig, TrainConfig, expand_sweep,
                                   parse_methods, parse_ranks, parse_seeds)


def _lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="google/flan-t5-small", help="hub id, local checkpoint dir, or 'tiny'")
    settings.cli_args(p, "lora")


def _lora_config(a, method: str | None = None) -> LoraConfig:
    fields_ = settings.from_args(a, "lora")
    return LoraConfig(**{**fields_, "method": method or fields_["method"]})


def _train_args(p: argparse.ArgumentParser) -> None:
    settings.cli_args(p, "train")
    p.add_argument("--data", default="auto", choices=("auto", "hub", "bundled", "hub-stream"),
                   help="where the WMT16 pairs come from; hub-stream reads the full hub train split (4.5M "
                        "pairs) as training goes, without downloading it first (needs the hub)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="compute precision of training (auto: bf16 where the hardware does it fast; "
                        "weights, LoRA factors and the loss stay float32)")
    p.add_argument("--strategy", default="default", choices=("default", "mirrored", "multiworker"),
                   help="tf.distribute strategy: one device, all local GPUs (mirrored), or the workers in "
                        "TF_CONFIG (multiworker)")
    p.add_argument("--json", action="store_true", help="JSON lines of events instead of a progress bar")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lora_demo", description="LoRA Lab: LoRA for FLAN-T5 in TensorFlow")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="exact parameter breakdown (offline: uses shipped configs)")
    _lora_args(p)
    p.add_argument("--full", action="store_true", help="no LoRA: everything trainable (full fine-tuning)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("train", help="train an adapter; writes adapter files and metrics.json")
    _lora_args(p)
    _train_args(p)
    p.add_argument("--out", required=True, help="output directory")

    _sweep_parsers(sub)
    _tool_parsers(sub)
    return ap


def _sweep_parsers(sub) -> None:
    """``sweep`` and ``methods``: the same arguments, different defaults."""
    for name, ranks, methods, seeds, text in (
            ("sweep", "1,2,4,8,16", None, None, "train the same config at several ranks (and methods); one record "
                                                "per run + summary"),
            ("methods", "8", ",".join(METHODS), "0,1,2", "compare LoRA, rsLoRA, DoRA, PiSSA, LoRA+ and full "
                                                       "fine-tuning at one budget, 3 seeds each, with what each learns "
                                                       "and forgets (a sweep over methods with --analyse)")):
        p = sub.add_parser(name, help=text)
        _lora_args(p)
        p.add_argument("--ranks", default=ranks, help="comma-separated ranks")
        p.add_argument("--methods", default=methods,
                       help="comma-separated methods, each trained at every rank (full fine-tuning once, having "
                            "no rank), e.g. lora,rslora,dora,pissa,loraplus,full (default: --method alone)")
        p.add_argument("--method-lr", default=",".join(f"{k}={v:g}" for k, v in METHOD_LR.items()),
                       help="learning rates per method that override --lr, e.g. loraplus=1e-3,full=1e-4 (the "
                            "defaults were measured on the bundled tiny model: docs/lora.md)")
        p.add_argument("--seeds", default=seeds,
                       help="comma-separated seeds: every rank is trained once per seed, and summary.md gives "
                            "each config's mean and spread and says which differences are above seed noise "
                            "(default: --seed alone)")
        p.add_argument("--analyse", action="store_true", default=name == "methods",
                       help="after training: learning vs forgetting with each run's scale curve, rank truncation, "
                            "magnitude/direction change and intruder dimensions (methods.md, analysis.json, "
                            "figures.html)")
        _train_args(p)
        p.add_argument("--out", required=True, help="directory for the runs, runs.csv (one row per run), summary.csv "
                       "(per config: mean and spread over seeds) and summary.md (both, and the verdicts)")


def _tool_parsers(sub) -> None:
    """``translate``, ``bench``, ``export``, ``inspect`` and ``report``."""
    p = sub.add_parser("translate", help="translate English with the base model and (optionally) an adapter")
    p.add_argument("--model", default="google/flan-t5-small")
    p.add_argument("--adapter", help="adapter: a directory or zip with adapter_config.json + "
                                     "adapter_model.safetensors (ours or made by PEFT)")
    p.add_argument("--scale", type=float, default=1.0, help="adapter strength: 0 = base model, 1 = as trained")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    p.add_argument("sentences", nargs="*", help="English sentences (default: one per line on stdin)")

    p = sub.add_parser("bench", help="measure step time, first loss, memory, translation latency (random weights)")
    p.add_argument("--quick", action="store_true", help="flan-t5-small only (a few minutes)")
    p.add_argument("--model", default="google/flan-t5-small",
                   help="architecture for the step figures (shipped config or 'tiny' for a smoke run)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="precision of our LoRA step (auto: bf16 where the hardware does it fast)")
    p.add_argument("--child", choices=("lora", "lora-compiled", "full"), help=argparse.SUPPRESS)
    p.add_argument("--child-model", default="google/flan-t5-small", help=argparse.SUPPRESS)

    p = sub.add_parser("export", help="merge an adapter into the base model; save a full TF checkpoint "
                                      "(save_pretrained) that TFAutoModelForSeq2SeqLM loads")
    p.add_argument("--model", default="google/flan-t5-small")
    p.add_argument("--adapter", required=True, help="adapter directory or zip (ours or made by PEFT)")
    p.add_argument("--out", required=True, help="output directory for the merged checkpoint and tokenizer")
    p = sub.add_parser("inspect", help="what a run's adapter learned: per-layer ‖ΔW‖, ‖ΔW‖/‖W‖, singular "
                                       "values, effective rank, the heatmap grid, φ against another run, and "
                                       "the predicted vs measured budget, as JSON")
    p.add_argument("run_dir", help="a run directory (or an adapter directory or zip)")
    p.add_argument("--compare", help="a second run: subspace similarity φ per shared layer")
    p.add_argument("--model", help="base model (default: the run's own, from metrics.json)")
    p = sub.add_parser("report", help="one self-contained HTML file of runs (comparison table, interactive loss "
                                      "and quality charts, parameter breakdown, budget, sample translations, "
                                      "seeds and software versions) that opens with no network")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, or a sweep's output directory")
    p.add_argument("--out", default="report.html", help="the HTML file to write")
    p.add_argument("--title", default="LoRA Lab report")


def cmd_report(a) -> int:
    from lora_demo.present import report

    out = report.write(a.run_dirs, a.out, a.title)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, self-contained: open it in any browser, offline)")
    return 0


def cmd_inspect(a) -> int:
    from lora_demo import adapters
    from lora_demo.analysis import anatomy
    from lora_demo.analysis import budget
    from lora_demo.core.inject import base_kernels

    record_path = Path(a.run_dir) / "metrics.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if (Path(a.run_dir) / adapters.FULL_FILE).is_file():
        raise ConfigError(f"{a.run_dir} is a full fine-tuning run: it has no adapter to take apart (the methods "
                          "command's --analyse measures its magnitude, direction and intruder figures)")
    adapter = adapters.read_adapter(a.run_dir)
    name = a.model or record.get("model") or adapter.base_model
    if not name:
        raise ConfigError("this adapter does not say which base model it is for; pass --model")
    loaded = _load(name)
    cfg = adapters.check_fits(adapter, loaded.model, loaded.name)
    out = {"run": str(a.run_dir), "model": loaded.name,
           **anatomy.inspect(cfg, adapter.state, anatomy.norms(base_kernels(loaded.model)))}
    if a.compare:
        other = adapters.read_adapter(a.compare)
        out["similarity"] = {"with": str(a.compare), **anatomy.similarity(
            cfg, adapter.state, adapters.check_fits(other, loaded.model, loaded.name), other.state)}
    if record.get("prediction") and Path(a.run_dir).is_dir():
        meas = budget.measured(record, adapters.tensor_bytes(a.run_dir))
        out["budget"] = {"predicted": record["prediction"], "measured": meas,
                         "rows": budget.side_by_side(record["prediction"], meas)}
    print(json.dumps(out, indent=2, default=float))
    return 0


def cmd_params(a) -> int:
    from lora_demo.core.params import format_table, preview

    b = preview(a.model, None if a.full else _lora_config(a))   # (--method full gives the same as --full)
    print(json.dumps(b.to_dict(), indent=2) if a.json else format_table(b))
    return 0


def _load(name: str, precision: str = "fp32"):
    from lora_demo.core.models import load_model

    return load_model(name, fallback=False, precision=precision)


def _method_lr(text: str) -> dict[str, float]:
    """'loraplus=1e-3,full=1e-4' -> {'loraplus': 0.001, 'full': 0.0001}."""
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, _, value = part.partition("=")
        try:
            out[parse_methods(name.strip())[0]] = float(value)
        except ValueError:
            raise ConfigError(f"--method-lr entries look like loraplus=1e-3, got {part!r}") from None
    return out


def _run_config(a, rank=None, seed=None, method=None) -> RunConfig:
    lora = _lora_config(a, method) if rank is None else replace(_lora_config(a, method), rank=rank)
    lr = _method_lr(getattr(a, "method_lr", "")).get(lora.method, a.lr)
    if a.data == "hub-stream" and a.dataset != "europarl":
        raise ConfigError("--data hub-stream streams the WMT16 train split: use it with --dataset europarl")
    train = {**settings.from_args(a, "train"), "lr": lr, **({} if seed is None else {"seed": seed})}
    return RunConfig(model=a.model, lora=lora, train=TrainConfig(**train))


def _execute(a, loaded, job, base_cache: dict, strategy=None, history: list[dict] | None = None) -> None:
    """Train, score and record one run, with a progress bar (or JSON lines)."""
    from lora_demo.analysis.budget import predict
    from lora_demo.core.events import StepLogged, to_dict
    from lora_demo.core.models import model_precision
    from lora_demo import data
    from lora_demo.lab.execute import execute

    job.prediction = predict(loaded.model.config, job.config.lora, job.config.train,
                             history or [], model_precision(loaded.model))

    bar = None
    if not a.json:
        from tqdm import tqdm

        bar = tqdm(total=job.config.train.steps, desc=f"r={job.config.lora.rank}", unit="step", file=sys.stderr)

    def on_change(event):
        if event is None:
            if job.phase == "evaluating" and not a.json:
                print(f"scoring BLEU/chrF on {job.config.train.bleu_size} "
                      f"{data.LESSONS[job.config.train.data].test_name} sentences...", file=sys.stderr)
            return
        if a.json:
            print(json.dumps(to_dict(event), default=float), flush=True)
        elif isinstance(event, StepLogged):
            bar.update(1)
            bar.set_postfix(loss=f"{event.loss:.3f}", tok_s=f"{event.tokens_per_s:,.0f}")

    try:
        execute(job, loaded.model, loaded.tokenizer, lambda split, n, dataset: _pairs(a.data, split, n, dataset),
                base_cache, on_change, strategy=strategy)
    finally:
        if bar:
            bar.close()


def _pairs(source: str, split: str, n: int, dataset: str):
    """The pairs of a split; with hub-stream, the train split as a stream (validation and test
    slices are small and read from the hub as usual)."""
    from lora_demo import data
    from lora_demo.core.hub import hub_reachable

    if source != "hub-stream" or split == "heldout" or dataset != "europarl":
        return data.pairs_for(split, n, dataset, source="auto" if source == "hub-stream" else source)
    if split == "train":
        if not hub_reachable():
            raise SystemExit("--data hub-stream needs the Hugging Face hub, which does not answer from here; "
                             "use --data auto or bundled")
        return data.hub_stream()
    return data.load_pairs(split, n, source="hub")


def _report(job) -> str:
    from lora_demo.core.events import loops_text, quality_lines, summary_text

    if job.status == "failed":
        return f"error: {job.error}"
    text = summary_text(job.status, job.summary)
    if job.quality:
        q = job.quality
        text += (f"\nBLEU base {q['base']['bleu']:.2f} -> LoRA {q['lora']['bleu']:.2f}; chrF base "
                 f"{q['base']['chrf']:.2f} -> LoRA {q['lora']['chrf']:.2f} ({q['n']} {q.get('split', 'newstest2016')} sentences; "
                 f"{q['lora']['bleu_signature']})" + loops_text(q)
                 + "".join("\n" + line for line in quality_lines(q, job.summary)))
    return text


@contextlib.contextmanager
def _output_dir(out: str, chief: bool):
    """The directory this process writes to: ``out`` on the chief (or alone); on any other worker of
    a cluster a private temporary directory, removed afterwards, so one run directory is written."""
    if chief:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lora-lab-worker-") as tmp:
        yield Path(tmp) / Path(out).name


def _strategy_first(a):
    """The strategy, created before the model is loaded (TensorFlow's runtime must not have started)."""
    from lora_demo.training.distribute import is_chief, make_strategy

    strategy = make_strategy(a.strategy)
    chief = is_chief(strategy)
    if not chief:   # the chief scores and records; this worker only trains
        a.bleu_size = 0
    return strategy, chief


def _worker_note(job, chief: bool) -> None:
    if not chief:
        s = job.summary
        print(f"worker (not chief): {job.status}, {s.get('steps_done', 0)} steps with {s.get('workers')} workers / "
              f"{s.get('replicas')} replicas; the chief writes the record", file=sys.stderr)


def cmd_train(a) -> int:
    from lora_demo.lab import owners
    from lora_demo.lab.records import Job

    strategy, chief = _strategy_first(a)
    run = _run_config(a)
    loaded = _load(a.model, a.precision)
    if not a.json:
        print(_lesson_note(run.train.data, loaded.kind), file=sys.stderr)
    with _output_dir(a.out, chief) as out:
        job = Job(Path(a.out).resolve().name, run, owners.digest("cli"), out)   # no owner key: a CLI run
        _execute(a, loaded, job, {}, strategy)
    _worker_note(job, chief)
    if chief and not a.json:
        print(_report(job) + f"\nwrote {out}")
    elif job.status == "failed":
        print(f"error: {job.error}", file=sys.stderr)
    return 1 if job.status == "failed" else 0


def _lesson_note(lesson: str, kind: str) -> str:
    """What LoRA trains on and why, and what the base saw (for a bundled base, from its build record)."""
    from lora_demo import data
    from lora_demo.core.models import base_saw

    saw = base_saw(kind)
    return (f"lesson: {data.LESSONS[lesson].label}\n{data.LESSONS[lesson].why}"
            + (f"\nthe base saw: {saw}" if saw else ""))


def cmd_sweep(a) -> int:
    from lora_demo.analysis import compare
    from lora_demo.lab.records import Job

    seeds = [a.seed] if a.seeds is None else parse_seeds(a.seeds)

    methods = [a.method] if a.methods is None else parse_methods(a.methods)

    def configs_():   # every (method, rank, seed): config.expand_sweep
        lrs = _method_lr(a.method_lr)
        return expand_sweep(_run_config(a, method=methods[0]), parse_ranks(a.ranks), seeds, methods,
                            {m: lrs.get(m, a.lr) for m in methods})
    configs = configs_()   # validate every rank and seed before training any
    strategy, chief = _strategy_first(a)
    configs = configs_()   # again: a worker skips scoring
    loaded = _load(a.model, a.precision)
    if not a.json:
        print(_lesson_note(configs[0].train.data, loaded.kind), file=sys.stderr)
    with _output_dir(a.out, chief) as out:
        sweep, base_cache, jobs = f"sweep-{Path(a.out).resolve().name}", {}, []
        for cfg in configs:
            job = Job.new(cfg, "cli", out, sweep=sweep)
            jobs.append(job)
            _execute(a, loaded, job, base_cache, strategy, history=[j.record() for j in jobs])
            if not a.json and chief:
                print(f"{cfg.lora.method} r={cfg.lora.rank} seed {cfg.train.seed}: " + _report(job).replace("\n", "\n  "),
                      file=sys.stderr)
    if not chief:
        _worker_note(jobs[-1], chief)
        return 1 if any(j.status == "failed" for j in jobs) else 0
    records = [j.record() for j in jobs]
    (out / "runs.csv").write_text(compare.to_csv(records), encoding="utf-8")
    (out / "summary.csv").write_text(compare.groups_csv(compare.groups(records)), encoding="utf-8")
    (out / "summary.md").write_text(compare.to_markdown(records), encoding="utf-8")
    if a.analyse:
        from lora_demo.analysis.learned import analyse_runs

        analyse_runs(records, jobs, loaded, out, log=None if a.json else lambda m: print(m, file=sys.stderr))
    if not a.json:
        print(compare.to_markdown(records) + f"\nwrote {len(jobs)} runs, runs.csv, summary.csv (per config, over "
              f"seeds) and summary.md to {out}")
    return 1 if any(j.status == "failed" for j in jobs) else 0


def cmd_translate(a) -> int:
    from lora_demo import adapters
    from lora_demo.analysis.evaluate import translate_both
    from lora_demo.core.inject import apply_lora

    sentences = a.sentences or [line.strip() for line in sys.stdin if line.strip()]
    if not sentences:
        raise ConfigError("give English sentences as arguments or one per line on stdin")
    loaded = _load(a.model)
    if a.adapter:
        adapter = _adapter_for(a, loaded)
        apply_lora(loaded.model, adapter.config)
        adapters.assign_state(loaded.model, adapter.state)
    base, lora = translate_both(loaded.model, loaded.tokenizer, sentences, scale=a.scale,
                                max_new_tokens=a.max_new_tokens)
    for en, b, l in zip(sentences, base, lora):
        if a.json:
            print(json.dumps({"en": en, "base": b, "lora": l if a.adapter else None}, ensure_ascii=False))
        else:
            print(f"EN   {en}\nBASE {b}" + (f"\nLORA {l}" if a.adapter else "") + "\n")
    return 0


def _adapter_for(a, loaded):
    """Read ``--adapter`` and check it against the loaded model (errors say what does not fit)."""
    from lora_demo import adapters

    adapter = adapters.read_adapter(a.adapter)
    adapters.check_fits(adapter, loaded.model, loaded.name)
    print(f"adapter: {adapters.describe(adapter)}", file=sys.stderr)
    for note in adapter.notices:
        print(f"note: {note}", file=sys.stderr)
    return adapter


def cmd_export(a) -> int:
    from lora_demo import adapters

    loaded = _load(a.model)
    adapter = _adapter_for(a, loaded)
    out = adapters.export_merged(loaded.model, loaded.tokenizer, adapter.config, adapter.state, a.out,
                                 source={"adapter": str(a.adapter), "base_model": loaded.name})
    print(f"wrote a merged TF checkpoint to {out} (load it with TFAutoModelForSeq2SeqLM.from_pretrained)")
    return 0


def cmd_bench(a) -> int:
    from benchmarks import bench

    if a.child:   # one peak-memory measurement, in its own process
        from lora_demo.core.models import resolve_precision

        bench.child(a.child, a.child_model, resolve_precision(a.precision))
        return 0
    figures = bench.run(quick=a.quick, precision=a.precision, model=a.model,
                        log=(lambda m: print(m, file=sys.stderr, flush=True)))
    print(json.dumps(figures) if a.json else bench.table(figures))
    return 0


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    try:
        code = {"params": cmd_params, "train": cmd_train, "sweep": cmd_sweep, "methods": cmd_sweep,
                "translate": cmd_translate, "export": cmd_export, "inspect": cmd_inspect, "report": cmd_report,
                "bench": cmd_bench}[a.command](a)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except (OSError, ValueError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
