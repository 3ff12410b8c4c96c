"""The linear method of ``gptq_ascend``: GPTQ tensors in, a backend's repack and gemm out.

Loading uses vLLM's parameter classes, so QKV, merged gate/up and row-parallel layers shard under
tensor parallelism the way vLLM's own GPTQ method does:

============  ==========================  ===================================================
tensor        class                       sharded along
============  ==========================  ===================================================
qweight       PackedvLLMParameter         K (rows, packed) for row-parallel, N for column
g_idx         RowvLLMParameter            K (each rank keeps its rows' GLOBAL group ids)
scales        GroupQuantScaleParameter    K by groups and N; ChannelQuantScaleParameter (N only)
                                          for row-parallel act-order or group_size -1
qzeros        PackedvLLMParameter         like scales, packed along N; PackedColumnParameter
                                          when scales are whole
============  ==========================  ===================================================

After loading, each layer becomes one or more "parts" handed to a backend (``ops.choose_backend``):

* the usual case: one part, the layer's own tensors;
* fused layers whose shards carry different act-order permutations (g_idx): one part per shard;
* a rank's rows of a row-parallel act-order layer, whose groups are no longer of equal size: the rows
  are regrouped into equal, zero-padded groups (the padding rows decode to exactly 0), so any backend
  can take them; x is gathered into that order at run time.

The backend's packed tensors are registered on the layer as buffers, so torch.compile sees them as
graph inputs; ``apply`` rebuilds a ``PackedWeight`` view of them on every call. Under torch.compile a
backend that does not declare itself traceable (``compile_safe = True``) is called through the opaque
custom op ``gptq_ascend_vllm::gemm``, which has a fake implementation.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedColumnParameter,
    PackedvLLMParameter,
    RowvLLMParameter,
)

from .. import format as fmt
from .. import ops
from ..errors import ConfigError, FormatError
from . import compat

logger = logging.getLogger("vllm.gptq_ascend")

_PARAM_NAMES = ("qweight", "qzeros", "scales", "g_idx")
# Force one backend for every layer (e.g. "reference" to rule a kernel out when debugging).
BACKEND_ENV = "GPTQ_ASCEND_BACKEND"
_logged_choices: set[tuple[str, str]] = set()


# --------------------------------------------------------------------------------------------------
# The opaque op used under torch.compile
# --------------------------------------------------------------------------------------------------


def _gemm_impl(x: torch.Tensor, tensors: list[torch.Tensor], perm: torch.Tensor | None,
               bias: torch.Tensor | None, backend: str, names: str, bits: int, group_size: int,
               sym: bool, desc_act: bool, checkpoint_format: str, in_features: int,
               out_features: int) -> torch.Tensor:
    spec = _spec(bits, group_size, sym, desc_act, checkpoint_format)
    packed = ops.PackedWeight(backend, spec, in_features, out_features,
                              dict(zip(names.split(","), tensors, strict=True)), perm)
    return ops.get_backend(backend).gemm(x, packed, bias)


_spec_cache: dict[tuple, fmt.QuantSpec] = {}


def _spec(bits: int, group_size: int, sym: bool, desc_act: bool, checkpoint_format: str) -> fmt.QuantSpec:
    key = (bits, group_size, sym, desc_act, checkpoint_format)
    spec = _spec_cache.get(key)
    if spec is None:
        spec = _spec_cache[key] = fmt.QuantSpec(bits, group_size, sym, desc_act, checkpoint_format)
    return spec


@torch.library.custom_op("gptq_ascend_vllm::gemm", mutates_args=())
def opaque_gemm(x: torch.Tensor, tensors: list[torch.Tensor], perm: torch.Tensor | None,
                bias: torch.Tensor | None, backend: str, names: str, bits: int, group_size: int,
                sym: bool, desc_act: bool, checkpoint_format: str, in_features: int,
                out_features: int) -> torch.Tensor:
    """``backend.gemm`` as one op torch.compile does not look into (y = x @ W + bias)."""
    y = _gemm_impl(x, tensors, perm, bias, backend, names, bits, group_size, sym, desc_act,
                   checkpoint_format, in_features, out_features)
    return y.clone() if y.data_ptr() == x.data_ptr() else y


@opaque_gemm.register_fake
def _(x, tensors, perm, bias, backend, names, bits, group_size, sym, desc_act, checkpoint_format,
      in_features, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


# --------------------------------------------------------------------------------------------------
# One part of a layer, after loading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankLayout:
    """This rank's slice of a layer, as ``create_weights`` laid it out for the loaders."""

    k_part: int  # in_features on this rank
    n_part: int  # out_features on this rank: sum(sizes)
    sizes: tuple[int, ...]  # output partition sizes (the shards of a fused layer)
    row_parallel: bool  # K is split across ranks
    whole_scales: bool  # every rank holds every group's scales (row-parallel act-order / group_size -1)
    group: int  # the effective group size
    tp_rank: int
    tp_size: int
    input_size: int  # in_features of the whole layer


@dataclass
class Part:
    index: int
    backend: str
    spec: fmt.QuantSpec
    in_features: int
    out_features: int
    names: tuple[str, ...]
    has_perm: bool
    has_gather: bool  # x is gathered (with one zero column appended) before the gemm
    compile_safe: bool

    def buffer(self, name: str) -> str:
        return f"gptq{self.index}_{name}"


def _pack_factor(bits: int) -> int | Fraction:
    return 32 // bits if 32 % bits == 0 else Fraction(32, bits)


def _exact_scales(scales: torch.Tensor) -> torch.Tensor:
    """The narrowest float dtype that holds the loaded scales exactly (they are loaded as float32)."""
    for dtype in (torch.float16, torch.bfloat16):
        narrowed = scales.to(dtype)
        if torch.equal(narrowed.to(scales.dtype), scales):
            return narrowed
    return scales


def regularize(t: fmt.GPTQTensors, spec: fmt.QuantSpec, in_features: int
               ) -> tuple[fmt.GPTQTensors, fmt.QuantSpec, int, torch.Tensor]:
    """Rewrite a layer whose rows belong to groups of unequal sizes as one with equal groups.

    Rows are sorted by group; each group is padded to ``g2`` rows (a multiple of 32, so every bit width
    packs) with codes equal to the group's zero point, which decode to exactly 0. Returns the new
    tensors, their spec (no act-order), the new K, and ``gather``: for each new row, the index of the x
    column feeding it, ``in_features`` (an appended zero column) for padding rows.
    """
    k, n = in_features, t.out_features
    num_groups = t.scales.shape[0]
    g_idx = t.g_idx.to(torch.int64)
    counts = torch.bincount(g_idx, minlength=num_groups)
    g2 = max(32, int(math.ceil(int(counts.max()) / 32)) * 32)
    order = torch.argsort(g_idx, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_group = torch.arange(k) - starts[g_idx[order]]
    new_row = g_idx[order] * g2 + rank_in_group  # destination of each sorted source row

    codes = fmt.unpack_weight_codes(t, spec, k)
    zeros = fmt.unpack_zeros(t.qzeros, spec, n)
    new_k = num_groups * g2
    new_codes = zeros.repeat_interleave(g2, dim=0)  # padding rows: code == zero point -> weight 0
    new_codes[new_row] = codes[order]
    gather = torch.full((new_k,), k, dtype=torch.int64)
    gather[new_row] = order
    new_spec = replace(spec, group_size=g2, desc_act=False)
    qweight = fmt.pack(new_codes, spec.bits, dim=0)
    out = fmt.GPTQTensors(qweight, t.qzeros, t.scales, None, None)
    fmt.validate_layer("regularized", out, new_spec, new_k)
    return out, new_spec, new_k, gather


def regroup(t: fmt.GPTQTensors, spec: fmt.QuantSpec, k: int
            ) -> tuple[fmt.GPTQTensors, fmt.QuantSpec, int, torch.Tensor | None]:
    """One part's tensors in a form every backend takes: (tensors, spec, K, gather or None).

    Groups this rank does not use are dropped; ``g_idx`` is dropped when it is the default order, kept
    (act-order) when the groups are equal but permuted, and otherwise the rows are regrouped into equal
    zero-padded groups by :func:`regularize`, whose ``gather`` feeds x in that order.
    """
    gi = t.g_idx.to(torch.int64)
    counts = torch.bincount(gi, minlength=t.scales.shape[0])
    if bool((counts == 0).any()):
        # Whole scales on a row-parallel rank: keep only the groups this rank's rows use.
        used = torch.nonzero(counts).flatten()
        remap = torch.full((t.scales.shape[0],), -1, dtype=torch.int64)
        remap[used] = torch.arange(used.numel())
        t = fmt.GPTQTensors(t.qweight, t.qzeros[used].contiguous(), t.scales[used].contiguous(),
                            remap[gi].to(torch.int32), None)
        gi = remap[gi]
    rows = t.scales.shape[0]
    group = spec.group_size if rows > 1 else -1
    if rows == 1 and spec.group_size != -1 and spec.num_groups(k) != 1:
        spec = replace(spec, group_size=-1)
    default = fmt.default_g_idx(k, group).to(torch.int64)
    if rows == spec.num_groups(k) and torch.equal(gi, default):
        return replace(t, g_idx=None), replace(spec, desc_act=False), k, None
    if rows == spec.num_groups(k) and torch.equal(torch.sort(gi).values, default):
        return replace(t, g_idx=gi.to(torch.int32)), replace(spec, desc_act=True), k, None
    return regularize(replace(t, g_idx=gi.to(torch.int32)), spec, k)


def _choose_backend(spec: fmt.QuantSpec, k: int, n: int) -> tuple[ops.Backend, str]:
    """``ops.choose_backend`` on vLLM's device, honouring ``GPTQ_ASCEND_BACKEND``."""
    prefer = os.environ.get(BACKEND_ENV) or None
    backend, reason = ops.choose_backend(compat.device_type(), spec, k, n, prefer=prefer)
    if prefer:
        reason += f" ({BACKEND_ENV}={prefer})"
    return backend, reason


def _log_choice(prefix: str, backend: ops.Backend, reason: str, spec: fmt.QuantSpec) -> None:
    # Once per kind of layer at INFO (a model has hundreds of layers), every layer at DEBUG.
    key = (backend.name, reason, spec.bits, spec.desc_act)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.info("gptq_ascend: %d-bit %s layers (first: %s) run on the %s", spec.bits,
                    "act-order" if spec.desc_act else "group-ordered", prefix, reason)
    logger.debug("gptq_ascend: %s -> %s (%s)", prefix, backend.name, reason)


def _register_part(layer: torch.nn.Module, index: int, backend: ops.Backend, packed: ops.PackedWeight,
                   k: int, n: int, gather: torch.Tensor | None) -> Part:
    """Register a part's packed tensors on ``layer`` as (non-persistent) buffers; return its Part."""
    part = Part(index=index, backend=backend.name, spec=packed.spec, in_features=k, out_features=n,
                names=tuple(packed.tensors), has_perm=packed.perm is not None, has_gather=gather is not None,
                compile_safe=bool(getattr(backend, "compile_safe", False)))
    for name, tensor in packed.tensors.items():
        layer.register_buffer(part.buffer(name), tensor, persistent=False)
    if packed.perm is not None:
        layer.register_buffer(part.buffer("_perm"), packed.perm, persistent=False)
    if gather is not None:
        layer.register_buffer(part.buffer("_gather"), gather, persistent=False)
    return part


# --------------------------------------------------------------------------------------------------
# The linear method
# --------------------------------------------------------------------------------------------------


class GPTQAscendLinearMethod(LinearMethodBase):
    """GPTQ weights for one layer of any vLLM linear class (and a quantized lm_head)."""

    def __init__(self, quant_config: Any, spec: fmt.QuantSpec, prefix: str, lm_head: bool = False) -> None:
        self.quant_config = quant_config
        self.spec = spec
        self.prefix = prefix
        self.lm_head = lm_head
        self.parts: list[Part] = []
        self._loaded: set[str] = set()
        self._g_idx_shards: dict[Any, torch.Tensor] = {}

    # ---- weights -------------------------------------------------------------------------------

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        spec = self.spec
        bits = spec.bits
        k_part = input_size_per_partition
        n_part = sum(output_partition_sizes)
        tp_rank, tp_size = self._tp(layer)
        row_parallel = input_size != input_size_per_partition
        group = spec.effective_group_size(input_size)
        whole_scales = row_parallel and (spec.desc_act or spec.group_size == -1)
        self._check_shapes(k_part, output_partition_sizes, input_size, row_parallel, whole_scales, group,
                           tp_size)

        pf = _pack_factor(bits)
        loader = extra_weight_attrs.get("weight_loader")
        if self.lm_head:
            make_loader = lambda name: self._lm_head_loader(layer, name)  # noqa: E731
        else:
            make_loader = lambda name: self._recording_loader(name, loader)  # noqa: E731

        qweight = PackedvLLMParameter(
            data=torch.empty(fmt.packed_len(k_part, bits), n_part, dtype=torch.int32),
            input_dim=0, output_dim=1, packed_dim=0, packed_factor=pf, weight_loader=make_loader("qweight"))
        g_idx = RowvLLMParameter(data=torch.full((k_part,), -1, dtype=torch.int32), input_dim=0,
                                 weight_loader=make_loader("g_idx"))
        zcols = fmt.packed_len(n_part, bits)
        if whole_scales:
            groups = math.ceil(input_size / group)
            scales = ChannelQuantScaleParameter(data=torch.empty(groups, n_part, dtype=torch.float32),
                                                output_dim=1, weight_loader=make_loader("scales"))
            qzeros = PackedColumnParameter(data=torch.empty(groups, zcols, dtype=torch.int32),
                                           output_dim=1, packed_dim=1, packed_factor=pf,
                                           weight_loader=make_loader("qzeros"))
        else:
            groups = math.ceil(k_part / group)
            scales = GroupQuantScaleParameter(data=torch.empty(groups, n_part, dtype=torch.float32),
                                              output_dim=1, input_dim=0, weight_loader=make_loader("scales"))
            qzeros = PackedvLLMParameter(data=torch.empty(groups, zcols, dtype=torch.int32),
                                         input_dim=0, output_dim=1, packed_dim=1, packed_factor=pf,
                                         weight_loader=make_loader("qzeros"))
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("g_idx", g_idx)
        layer.register_parameter("scales", scales)
        layer.register_parameter("qzeros", qzeros)
        self._layout = RankLayout(k_part=k_part, n_part=n_part, sizes=tuple(output_partition_sizes),
                                  row_parallel=row_parallel, whole_scales=whole_scales, group=group,
                                  tp_rank=tp_rank, tp_size=tp_size, input_size=input_size)
        # vLLM-Ascend reads layer.weight (weight prefetch) from the moment the layer exists.
        compat.expose_weight(layer, qweight.data)

    @staticmethod
    def _tp(layer: torch.nn.Module) -> tuple[int, int]:
        if hasattr(layer, "tp_size") and hasattr(layer, "tp_rank"):
            return int(layer.tp_rank), int(layer.tp_size)
        return compat.tp_rank_and_size()

    def _check_shapes(self, k_part: int, sizes: list[int], input_size: int, row_parallel: bool,
                      whole_scales: bool, group: int, tp_size: int) -> None:
        bits = self.spec.bits
        where = f"gptq_ascend: {self.prefix}"
        if bits == 3 and k_part % 32:
            raise ConfigError(f"{where}: 3-bit layers need in_features (per rank) to be a multiple of 32, "
                              f"got {k_part}")
        if row_parallel and (k_part * bits) % 32:
            raise ConfigError(f"{where}: in_features per rank ({k_part}) does not split the packed {bits}-bit "
                              f"rows evenly at tensor_parallel_size={tp_size}")
        if row_parallel and not whole_scales and k_part % group:
            raise ConfigError(f"{where}: in_features per rank ({k_part}) is not a multiple of group_size "
                              f"({group}) at tensor_parallel_size={tp_size}")
        if not self.lm_head and (len(sizes) > 1 or (tp_size > 1 and not row_parallel)):
            for n in sizes:
                if (n * bits) % 32:
                    raise ConfigError(
                        f"{where}: output partition of {n} columns does not fill whole 32-bit words of "
                        f"{bits}-bit zero points, so its packed qzeros cannot be split from its neighbours "
                        f"(sizes {sizes}, tensor_parallel_size={tp_size})")

    def _recording_loader(self, name: str, loader: Any):
        def load(param, loaded_weight, *args, **kwargs):
            shard = args[0] if args else kwargs.get("loaded_shard_id")
            try:
                loader(param, loaded_weight, *args, **kwargs)
            except (AssertionError, RuntimeError, ValueError, IndexError) as e:  # vLLM's bare shape asserts
                where = "" if shard is None else f" (shard {shard!r})"
                raise FormatError(f"{self.prefix}.{name}{where}: the checkpoint's {loaded_weight.dtype} "
                                  f"{tuple(loaded_weight.shape)} does not fit the layer's "
                                  f"{tuple(param.data.shape)} ({e or type(e).__name__})") from None
            self._loaded.add(name)
            if name == "g_idx" and shard is not None:
                self._g_idx_shards[shard] = loaded_weight.detach().to("cpu", torch.int32).clone()
        return load

    def _lm_head_loader(self, layer: torch.nn.Module, name: str):
        """Load a (vocab-parallel, padded) quantized lm_head: shard N, zero the padding."""
        bits = self.spec.bits

        def load(param, loaded_weight, *args, **kwargs):
            self._loaded.add(name)
            if name == "g_idx":
                param.data.copy_(loaded_weight)
                return
            idx = layer.shard_indices
            start, end = idx.org_vocab_start_index, idx.org_vocab_end_index
            if name == "qzeros":
                if (start * bits) % 32:
                    raise FormatError(f"{self.prefix}.qzeros: vocab shard start {start} is not word aligned")
                start_w = start * bits // 32
                width = min(fmt.packed_len(end - start, bits), loaded_weight.shape[1] - start_w)
                src = loaded_weight.narrow(1, start_w, width)
            else:
                src = loaded_weight.narrow(1, start, end - start)
            param.data.zero_()
            param.data[:, : src.shape[1]].copy_(src)
        return load

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module):
        raise ConfigError(
            f"gptq_ascend: {self.prefix} is quantized (lm_head: true) but the model ties it to the input "
            "embedding (tie_word_embeddings: true), so vLLM would skip the quantized lm_head tensors. Set "
            "\"tie_word_embeddings\": false in config.json if the checkpoint stores lm_head.qweight")

    # ---- after loading -------------------------------------------------------------------------

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        lay = self._layout
        qweight = layer.qweight.data
        qzeros = layer.qzeros.data
        scales = _exact_scales(layer.scales.data)
        g_idx = layer.g_idx.data
        for name in ("qweight", "qzeros", "scales"):
            if self._loaded and name not in self._loaded:
                raise FormatError(f"{self.prefix}.{name}: not found in the checkpoint")
        # Only a g_idx the checkpoint does not store gets the default order; a stored one with -1 (or
        # any bad entry) is refused by validate_loaded below, exactly as `convert` refuses it.
        if "g_idx" not in self._loaded if self._loaded else bool((g_idx < 0).all()):
            # Absent from the checkpoint: the default order, as global group ids of this rank's rows.
            k0 = lay.tp_rank * lay.k_part if lay.row_parallel else 0
            g_idx = fmt.default_g_idx(lay.input_size, self.spec.group_size)[k0:k0 + lay.k_part]
            self._g_idx_shards = {}
        if lay.row_parallel and not lay.whole_scales:
            # The rank holds groups [first, first + k_part/group) of scales; g_idx holds global ids.
            g_idx = g_idx - lay.tp_rank * (lay.k_part // lay.group)
            if bool((g_idx < 0).any()) or bool((g_idx >= scales.shape[0]).any()):
                raise FormatError(
                    f"{self.prefix}.g_idx: rows are not in group order although desc_act is false; under "
                    f"tensor parallelism that needs desc_act: true in the quantization config")

        groups = math.ceil((lay.input_size if lay.whole_scales else lay.k_part) / lay.group)
        fmt.validate_loaded(fmt.GPTQTensors(qweight, qzeros, scales, g_idx), self.spec, lay.k_part, groups,
                            self._checkpoint_shards())

        pieces: list[tuple[int, int, torch.Tensor | None]]  # (column start, column end, g_idx)
        shards = self._g_idx_shards
        if g_idx is not None and len(shards) > 1 and not _all_equal(list(shards.values())):
            if lay.row_parallel:
                raise FormatError(f"{self.prefix}.g_idx: shards disagree on a row-parallel layer")
            offsets = _shard_offsets(lay.sizes, shards.keys())
            if len(offsets) != len(lay.sizes):
                raise FormatError(f"{self.prefix}.g_idx: shards {sorted(map(str, shards))} disagree and not "
                                  f"every one of the {len(lay.sizes)} shards was loaded")
            pieces = sorted((c0, c1, shards[sid]) for sid, (c0, c1) in offsets.items())
        else:
            pieces = [(0, lay.n_part, g_idx)]

        self.parts = []
        for c0, c1, gi in pieces:
            z0 = c0 * self.spec.bits // 32
            z1 = fmt.packed_len(c1, self.spec.bits) if c1 == lay.n_part else c1 * self.spec.bits // 32
            t = fmt.GPTQTensors(qweight[:, c0:c1].contiguous(), qzeros[:, z0:z1].contiguous(),
                                scales[:, c0:c1].contiguous(), gi, None)
            self._add_part(layer, t, c1 - c0)

        for name in _PARAM_NAMES:
            if name in layer._parameters:
                del layer._parameters[name]
        main = max((getattr(layer, self.parts[0].buffer(n)) for n in self.parts[0].names),
                   key=lambda x: x.numel() * x.element_size())
        compat.expose_weight(layer, main)
        self._g_idx_shards = {}

    def _checkpoint_shards(self) -> list[tuple[str, int, int, torch.Tensor | None]]:
        """(checkpoint module name, columns, its own g_idx) of each module fused into this layer."""
        sizes = self._layout.sizes
        if len(sizes) == 1:
            return [(self.prefix, 0, self._layout.n_part, None)]
        parent, _, leaf = self.prefix.rpartition(".")
        subs = (getattr(self.quant_config, "packed_modules_mapping", None) or {}).get(leaf, [])
        if len(subs) == len(sizes):
            names = [f"{parent}.{sub}" if parent else sub for sub in subs]
        else:
            names = [f"{self.prefix} (output shard {i})" for i in range(len(sizes))]
        try:
            by_range = {r: self._g_idx_shards[sid] for sid, r in _shard_offsets(sizes, self._g_idx_shards).items()}
        except (KeyError, TypeError, ValueError, IndexError):  # shard ids this layout does not name
            by_range = {}
        bounds = list(_shard_offsets(sizes, range(len(sizes))).values())
        return [(name, c0, c1, by_range.get((c0, c1))) for name, (c0, c1) in zip(names, bounds, strict=True)]

    def _add_part(self, layer: torch.nn.Module, t: fmt.GPTQTensors, n: int) -> None:
        t, spec, k, gather = regroup(t, self.spec, self._layout.k_part)
        backend, reason = _choose_backend(spec, k, n)
        _log_choice(self.prefix, backend, reason, spec)
        packed = backend.repack(t, spec, k)
        self.parts.append(_register_part(layer, len(self.parts), backend, packed, k, n, gather))

    # ---- forward -------------------------------------------------------------------------------

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        parts = self.parts
        single = len(parts) == 1
        outs = []
        for part in parts:
            xi = x
            if part.has_gather:
                xi = F.pad(x, (0, 1)).index_select(-1, getattr(layer, part.buffer("_gather")))
            outs.append(self._gemm(layer, part, xi, bias if single else None))
        if single:
            return outs[0]
        y = torch.cat(outs, dim=-1)
        return y if bias is None else y + bias.to(y.dtype)

    @staticmethod
    def _gemm(layer: torch.nn.Module, part: Part, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        tensors = [getattr(layer, part.buffer(n)) for n in part.names]
        perm = getattr(layer, part.buffer("_perm")) if part.has_perm else None
        if torch.compiler.is_compiling() and not part.compile_safe:
            s = part.spec
            return opaque_gemm(x, tensors, perm, bias, part.backend, ",".join(part.names), s.bits,
                               s.group_size, s.sym, s.desc_act, s.checkpoint_format, part.in_features,
                               part.out_features)
        packed = ops.PackedWeight(part.backend, part.spec, part.in_features, part.out_features,
                                  dict(zip(part.names, tensors, strict=True)), perm)
        return ops.get_backend(part.backend).gemm(x, packed, bias)


def _all_equal(tensors: list[torch.Tensor]) -> bool:
    return all(torch.equal(tensors[0], t) for t in tensors[1:])


def _shard_offsets(sizes: list[int], shard_ids) -> dict[Any, tuple[int, int]]:
    """Column ranges of each shard id (0, 1, ... or 'q', 'k', 'v') in a fused layer's output."""
    order = {"q": 0, "k": 1, "v": 2}
    out, start = {}, 0
    bounds = []
    for s in sizes:
        bounds.append((start, start + s))
        start += s
    for sid in shard_ids:
        i = order[sid] if isinstance(sid, str) else int(sid)
        out[sid] = bounds[i]
    return out


compat.register_weight_loader_v2(GPTQAscendLinearMethod)
