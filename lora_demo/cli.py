"""Command line: ``python -m lora_demo train|translate|params ...``.

The CLI calls the same functions as the app, so its numbers are the app's numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, LoraConfig, RunConfig, TrainConfig, parse_targets


def _lora_args(p: argparse.ArgumentParser) -> None:
    d = LoraConfig()
    p.add_argument("--model", default="google/flan-t5-small", help="hub id, local checkpoint dir, or 'tiny'")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha; the update is scaled by alpha/r")
    p.add_argument("--targets", default="q,v", help="comma-separated T5 modules: q,k,v,o,wi,wi_0,wi_1,wo")
    p.add_argument("--side", default=d.side, choices=("both", "encoder", "decoder"))
    p.add_argument("--layers", default="all", help="inclusive block range such as 0-7, or 'all'")
    p.add_argument("--lora-dropout", type=float, default=d.dropout)


def _lora_config(a) -> LoraConfig:
    return LoraConfig(rank=a.rank, alpha=a.alpha, targets=parse_targets(a.targets), side=a.side, layers=a.layers,
                      dropout=a.lora_dropout)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lora_demo", description="LoRA Lab: LoRA for FLAN-T5 in TensorFlow")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="exact parameter breakdown (offline: uses shipped configs)")
    _lora_args(p)
    p.add_argument("--full", action="store_true", help="no LoRA: everything trainable (full fine-tuning)")
    p.add_argument("--json", action="store_true")

    t = TrainConfig()
    p = sub.add_parser("train", help="train an adapter; writes adapter files and metrics.json")
    _lora_args(p)
    p.add_argument("--steps", type=int, default=t.steps)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--train-size", type=int, default=t.train_size, help="pairs from the start of the train split")
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--optimizer", default=t.optimizer)
    p.add_argument("--eval-every", type=int, default=t.eval_every)
    p.add_argument("--eval-size", type=int, default=t.eval_size)
    p.add_argument("--data", default="auto", choices=("auto", "hub", "bundled"))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--json", action="store_true", help="JSON lines of events instead of a progress bar")

    p = sub.add_parser("translate", help="translate English with the base model and (optionally) an adapter")
    p.add_argument("--model", default="google/flan-t5-small")
    p.add_argument("--adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--scale", type=float, default=1.0, help="adapter strength: 0 = base model, 1 = as trained")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    p.add_argument("sentences", nargs="*", help="English sentences (default: one per line on stdin)")
    return ap


def cmd_params(a) -> int:
    from .params import format_table, preview

    b = preview(a.model, None if a.full else _lora_config(a))
    print(json.dumps(b.to_dict(), indent=2) if a.json else format_table(b))
    return 0


def _load(name: str):
    from .models import load_model

    return load_model(name, fallback=False)


def cmd_train(a) -> int:
    from . import adapters, data
    from .events import EvalLogged, RunFailed, RunFinished, StepLogged, summary_text, to_dict
    from .train import train

    run = RunConfig(model=a.model, lora=_lora_config(a),
                    train=TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, train_size=a.train_size,
                                      seed=a.seed, optimizer=a.optimizer, eval_every=a.eval_every,
                                      eval_size=a.eval_size))
    loaded = _load(a.model)
    train_pairs = data.load_pairs("train", run.train.train_size, source=a.data)
    val_pairs = data.load_pairs("validation", run.train.eval_size, source=a.data)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bar = None
    if not a.json:
        from tqdm import tqdm

        bar = tqdm(total=run.train.steps, desc="training", unit="step", file=sys.stderr)
    losses, vals, end, started = [], [], None, None
    for ev in train(run, loaded.model, loaded.tokenizer, train_pairs, val_pairs, data_origin=train_pairs.origin):
        if a.json:
            print(json.dumps(to_dict(ev), default=float), flush=True)
        if isinstance(ev, StepLogged):
            losses.append([ev.step, ev.loss])
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{ev.loss:.3f}", tok_s=f"{ev.tokens_per_s:,.0f}")
        elif isinstance(ev, EvalLogged):
            vals.append([ev.step, ev.val_loss])
        elif isinstance(ev, (RunFinished, RunFailed)):
            end = ev
        else:
            started = ev
    if bar:
        bar.close()
    if started is not None:
        adapters.save_adapter(loaded.model, run.lora, loaded.name, out)
    status = end.status if isinstance(end, RunFinished) else "failed"
    metrics = {"status": status, "config": run.to_dict(), "model": loaded.name,
               "params": started.params if started else None, "summary": getattr(end, "summary", {}),
               "losses": losses, "val_losses": vals,
               "error": f"{end.reason}. {end.hint}." if isinstance(end, RunFailed) else ""}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    if isinstance(end, RunFailed):
        print(f"error: {end.reason}. {end.hint}.", file=sys.stderr)
        return 1
    if not a.json:
        s = end.summary
        print(summary_text(status, s) + f"\nwrote {out}")
    return 0


def cmd_translate(a) -> int:
    from . import adapters
    from .evaluate import translate_both
    from .inject import apply_lora

    sentences = a.sentences or [line.strip() for line in sys.stdin if line.strip()]
    if not sentences:
        raise ConfigError("give English sentences as arguments or one per line on stdin")
    loaded = _load(a.model)
    if a.adapter:
        cfg, state = adapters.read_adapter(a.adapter)
        apply_lora(loaded.model, cfg)
        adapters.assign_state(loaded.model, state)
    base, lora = translate_both(loaded.model, loaded.tokenizer, sentences, scale=a.scale,
                                max_new_tokens=a.max_new_tokens)
    for en, b, l in zip(sentences, base, lora):
        if a.json:
            print(json.dumps({"en": en, "base": b, "lora": l if a.adapter else None}, ensure_ascii=False))
        else:
            print(f"EN   {en}\nBASE {b}" + (f"\nLORA {l}" if a.adapter else "") + "\n")
    return 0


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    try:
        code = {"params": cmd_params, "train": cmd_train, "translate": cmd_translate}[a.command](a)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except (OSError, ValueError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
