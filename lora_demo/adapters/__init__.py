"""Adapters that travel: PEFT-format files out, validated PEFT-format files in, and merged export.

An adapter directory is what PyTorch PEFT writes and reads for T5:

- ``adapter_config.json``: ``peft_type`` LORA, ``r``, ``lora_alpha``, ``target_modules``, ...
- ``adapter_model.safetensors``: keys such as
  ``base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight`` in PyTorch layouts,
  ``lora_A`` (r, in) and ``lora_B`` (out, r): the transposes of the Keras (in, r) and (r, out).

Import trusts nothing it reads. Files are parsed from bytes (never unpickled, never unpacked to
disk), with a size cap; the config must describe plain LoRA; every key must name a T5 projection
with both halves present; and ``check_fits`` compares every shape with the chosen base model. Each
failure raises ``AdapterError`` with a message that says what is wrong and what would fit.

What the adapter covers is read from its keys, not from ``target_modules``: PEFT accepts module
names, suffixes and regular expressions there, while the keys say exactly which layers were
adapted. LoRA Lab describes that set as targets x stacks x block range and refuses a set that
cannot be described so, rather than silently adapting a different set.
"""

from lora_demo.adapters.files import (CONFIG_FILE, FULL_FILE, KEY, MAGNITUDE, MERGE_NOTE, PREFIX, WEIGHTS_FILE, Adapter,
                                      AdapterError, adapter_state, describe, full_state, load_state, peft_config,
                                      run_state, save_adapter, save_run_state, stored_rank, tensor_bytes, write_adapter,
                                      zip_dir)
from lora_demo.adapters.merge import (assign_state, delta, delta_svd, deltas, export_merged, kernel_updates,
                                     merged_into, merged_kernels)
from lora_demo.adapters.upload import check_fits, parse_adapter, parse_safetensors, read_adapter, read_files

__all__ = ["CONFIG_FILE", "FULL_FILE", "KEY", "MAGNITUDE", "MERGE_NOTE", "PREFIX", "WEIGHTS_FILE", "Adapter",
           "AdapterError", "adapter_state", "assign_state", "check_fits", "delta", "delta_svd", "deltas", "describe", "export_merged",
           "full_state", "kernel_updates", "load_state", "merged_into", "merged_kernels", "parse_adapter", "parse_safetensors", "peft_config",
           "read_adapter", "read_files", "run_state", "save_adapter", "save_run_state", "stored_rank", "tensor_bytes",
           "write_adapter", "zip_dir"]
