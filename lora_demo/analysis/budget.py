"""What a run costs, predicted before it trains and measured after. No TensorFlow, no gradio.

Exact (arithmetic on the model config, equal to what a run measures):
- trainable parameters;
- adapter bytes: trainable × 4 (float32 tensors; the file adds a small JSON header);
- optimiser state: slots × trainable × 4 (AdamW, RAdam and LAMB keep 2 moments per weight;
  Lookahead(AdamW) also keeps the slow weights).

Estimated, and labelled so:
- activation memory, from batch and lengths (see ``activation_bytes``);
- step time, extrapolated from this machine's latest finished run of the same model and precision,
  in proportion to tokens per step. With no such run there is no estimate (never a made-up number).
"""

from __future__ import annotations

from lora_demo.core.config import LoraConfig, TrainConfig
from lora_demo.core.params import BYTES_FP32, preview, specs_from_config

SLOTS = {"adamw": 2, "radam": 2, "lamb": 2, "lookahead_adamw": 3}
MB = 1e6


def activation_bytes(config, batch: int, source_len: int, target_len: int, bytes_per: int = 4) -> int:
    """Activations kept for the backward pass of one step, a first-order estimate.

    Per encoder block: ~8 vectors of d_model and 3 of d_ff per token (norm, q/k/v/o in and out,
    residual; FFN in, gate, out) plus 2 attention maps (scores, probabilities) per head. Per decoder
    block: ~12 of d_model (self and cross attention), 3 of d_ff, and self (T×T) plus cross (T×S)
    maps. Plus the logits and their softmax over the vocabulary. Frozen weights need no weight
    gradients, but activations are kept all the same, because the LoRA layers are spread through
    the stack."""
    d, ff, h, v = config.d_model, config.d_ff, config.num_heads, config.vocab_size
    enc = config.num_layers * (batch * source_len * (8 * d + 3 * ff) + 2 * batch * h * source_len ** 2)
    dec = (config.num_decoder_layers or config.num_layers) * (
        batch * target_len * (12 * d + 3 * ff) + 2 * batch * h * (target_len ** 2 + target_len * source_len))
    head = 2 * batch * target_len * v
    return int((enc + dec + head) * bytes_per)


def predict(config, lora: LoraConfig, train: TrainConfig, history: list[dict] | None = None,
            precision: str = "fp32") -> dict:
    """LoRA against full fine-tuning, and against the course demo's setup (LoRA plus the shared
    embedding left trainable), for one config. ``history``: finished run records (any order)."""
    b = preview(config, lora)
    full_total = preview(config, None).total
    shared = next(s.size for s in specs_from_config(config) if s.path == "shared.weight")
    slots = SLOTS.get(train.optimizer, 2)
    act = activation_bytes(config, train.batch_size, train.max_source_len, train.max_target_len,
                           2 if precision == "bf16" else 4)
    step = _step_estimate(history or [], train, full=not lora.adapter)

    def column(trainable: int, total: int = b.total) -> dict:
        return {"trainable": trainable, "pct_trainable": 100.0 * trainable / total,
                "adapter_bytes": trainable * BYTES_FP32, "optimizer_bytes": slots * trainable * BYTES_FP32}

    return {"lora": {**column(b.trainable), "activation_bytes_est": act,
                     "step_s_est": step["step_s"] if step else None},
            "full": {**column(full_total, full_total), "activation_bytes_est": act, "step_s_est": None},
            "lora_plus_shared_embedding": column(b.trainable + shared),
            "total_params": b.total, "optimizer": train.optimizer, "optimizer_slots": slots,
            "step_basis": step["basis"] if step else "no finished run of this model on this machine yet: "
                                                      "train once and later runs get a step-time estimate"}


def _step_estimate(history: list[dict], train: TrainConfig, full: bool = False) -> dict | None:
    """Seconds per step: the latest finished run's measured mean (runs of the same model and
    precision on this machine, full fine-tuning from full fine-tuning only), scaled by tokens per step."""
    done = [r for r in history if (r.get("summary") or {}).get("mean_step_s") and r.get("data")
            and (r["config"]["lora"].get("method") == "full") == full]
    if not done:
        return None
    last = max(done, key=lambda r: r.get("created", 0))
    t, shapes = last["config"]["train"], last["data"]
    their = t["batch_size"] * (shapes["source_len"] + shapes["target_len"])
    # the same data settings give the same padded lengths; otherwise assume the maximum lengths
    same = all(t[k] == getattr(train, k) for k in ("train_size", "eval_size", "max_source_len", "max_target_len"))
    lens = (shapes["source_len"], shapes["target_len"]) if same else (train.max_source_len, train.max_target_len)
    tokens = train.batch_size * sum(lens)
    step = last["summary"]["mean_step_s"] * tokens / their
    return {"step_s": step, "basis": f"run {last['run_id']}: {last['summary']['mean_step_s']:.3f} s/step at "
                                     f"{their:,} tokens per step, scaled to {tokens:,}"}


def measured(record: dict, adapter_tensor_bytes: int | None) -> dict:
    """The same figures as ``predict``'s LoRA column, from a finished run's record."""
    s, mem = record.get("summary") or {}, record.get("memory") or {}
    return {"trainable": (record.get("params") or {}).get("trainable"), "adapter_bytes": adapter_tensor_bytes,
            "optimizer_bytes": s.get("optimizer_state_bytes"), "step_s": s.get("mean_step_s"),
            "rss_growth_bytes": int(mem["rss_growth_mb"] * 2**20) if mem.get("rss_growth_mb") is not None else None,
            "peak_rss_bytes": int(mem["peak_rss_mb"] * 2**20) if mem.get("peak_rss_mb") is not None else None}


def side_by_side(pred: dict, meas: dict) -> list[list]:
    """Rows: figure, predicted, measured, off by (%), with how each prediction was made."""
    def off(p, m):
        return None if p is None or m is None or not p else 100.0 * (m - p) / p
    lp = pred["lora"]
    rows = [
        ["trainable parameters", lp["trainable"], meas["trainable"], "exact"],
        ["adapter tensors (MB)", lp["adapter_bytes"] / MB, _mb(meas["adapter_bytes"]), "exact"],
        ["optimiser state (MB)", lp["optimizer_bytes"] / MB, _mb(meas["optimizer_bytes"]), "exact"],
        ["activations (MB) vs process growth", lp["activation_bytes_est"] / MB, _mb(meas["rss_growth_bytes"]),
         "estimate; measured is the process's RSS growth during the run"],
        ["step time (s)", lp["step_s_est"], meas["step_s"], "estimate from an earlier run" if lp["step_s_est"]
         else "no earlier run to extrapolate from"],
    ]
    return [[name, p, m, off(p, m), how] for name, p, m, how in rows]


def _mb(n):
    return None if n is None else n / MB
