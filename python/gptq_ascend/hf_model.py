"""Load a checkpoint into a transformers model, GPTQ layers included, for checks outside vLLM.

A plain checkpoint loads with ``from_pretrained``. A GPTQ checkpoint is built from its config with
every quantized ``nn.Linear`` replaced by :class:`GPTQLinear`, which runs the same op contract (and
so the same kernels) as the vLLM plugin: this is "the GPTQ checkpoint run online", in-process, with
per-layer hidden states available.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from . import format as fmt
from .checkpoint import Checkpoint
from .errors import CheckpointError
from .ops import Backend, PackedWeight, choose_backend

logger = logging.getLogger(__name__)


class GPTQLinear(nn.Module):
    """``y = x @ W + b`` through an ops backend, W held in the backend's packed layout."""

    def __init__(self, backend: Backend, packed: PackedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.backend = backend
        self.packed = packed
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = packed.in_features, packed.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.gemm(x, self.packed, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        s = self.packed.spec
        return f"{self.in_features}->{self.out_features}, {s.bits}-bit g{s.group_size}, backend={self.backend.name}"


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, backend: str | None = None) -> nn.Module:
    """A transformers causal LM for ``path``; GPTQ checkpoints run through ops backends."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not fmt.GPTQConfig.present(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    qcfg = fmt.GPTQConfig.load(path)
    hf_cfg = AutoConfig.from_pretrained(path)
    if hasattr(hf_cfg, "quantization_config"):
        delattr(hf_cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    ckpt = Checkpoint.open(path)
    layers = ckpt.quantized_layers()
    quant_tensors = {f"{p}.{s}" for p, parts in layers.items() for s in parts}
    state = {}
    for n in ckpt.names():
        if n not in quant_tensors:
            t = ckpt.get(n)
            state[n] = t.to(dtype) if t.is_floating_point() else t
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise CheckpointError(f"{path}: tensors the model does not have: {unexpected[:5]}")
    reasons: set[str] = set()
    for prefix in layers:
        spec = qcfg.spec_for(prefix)
        if spec is None:
            raise CheckpointError(f"{path}: {prefix}.qweight is stored but the config leaves it unquantized")
        t = ckpt.layer_tensors(prefix)
        k = t.in_features(spec)
        chosen, why = choose_backend("cpu", spec, k, t.out_features, prefer=backend)
        reasons.add(why)
        bias = t.bias.to(dtype) if t.bias is not None else None
        t.bias = None
        parent_name, _, child = prefix.rpartition(".")
        parent = model.get_submodule(parent_name)
        if not isinstance(getattr(parent, child), nn.Linear):
            raise CheckpointError(f"{path}: {prefix} is not a Linear layer in {type(model).__name__}")
        setattr(parent, child, GPTQLinear(chosen, chosen.repack(t, spec, k), bias))
    still_missing = [m for m in missing if m.rsplit(".", 1)[0] not in layers]
    tied = getattr(hf_cfg, "tie_word_embeddings", False)
    still_missing = [m for m in still_missing if not (tied and m == "lm_head.weight")]
    if still_missing:
        raise CheckpointError(f"{path}: the checkpoint lacks {still_missing[:5]}")
    if tied:
        model.tie_weights()
    for r in sorted(reasons):
        logger.info("GPTQ layers of %s: %s", path.name, r)
    return model
