"""The GPTQ checkpoint format: the one module that knows it.

Everything else in gptq-ascend (converter, CPU and NPU backends, vLLM plugin, tests) asks this module
how GPTQ tensors are laid out and what they mean. Nothing here is fast on purpose: this is the
definition each kernel is tested against, written to be read.

Layout, for a linear layer with K = in_features, N = out_features, b = bits, G = number of groups:

* ``qweight`` int32 ``[ceil(K*b/32), N]``, packed along K. ``qzeros`` int32 ``[G, ceil(N*b/32)]``,
  packed along N. ``scales`` float16 ``[G, N]``. ``g_idx`` int32 ``[K]``. ``bias`` optional ``[N]``.
* Packing treats each column (for qweight) or row (for qzeros) as a little-endian *bit stream* of
  32-bit words: code ``i`` occupies stream bits ``[b*i, b*(i+1))``. For 2/4/8 bits no code crosses a
  word; for 3 bits this is exactly AutoGPTQ/GPTQModel's "10 | 1 | 10 | 1 | 10" layout (32 codes in
  three words, codes 10 and 21 split across words), so one rule covers every width.
* Codes are unsigned. ``W[k, n] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]``.
* v1 (``"gptq"``) stores ``z - 1`` in qzeros; v2 (``"gptq_v2"``) stores ``z``. For 2/4/8 bits the
  v1 offset is applied to whole packed words (``word + 0x..0101``), which is how GPTQModel converts
  between the two: the borrow of a zero point of 0 into its neighbour on saving is undone by the
  carry on loading, so a v1 file it wrote reads back exactly (field-wise ``+1`` would get that
  neighbour wrong by one). For 3 bits GPTQModel shifts each decoded field modulo 8 instead, and so
  do we.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, FormatError

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
WORD_BITS = 32
# Where a checkpoint keeps its quantization settings when config.json has no quantization_config.
QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")

# Fields that only steer the quantization run, not the stored arithmetic: accepted and ignored.
_IGNORED_FIELDS = {
    "damp_percent", "damp_auto_increment", "true_sequential", "static_groups", "model_name_or_path",
    "model_file_base_name", "meta", "mse", "v2", "v2_alpha", "act_group_aware", "hyb_act",
    "offload_to_disk", "offload_to_disk_path", "rotation", "is_marlin_format", "quantizer",
    "adapter", "device", "pack_impl", "fail_safe", "gptaq", "gar", "foem", "hessian",
    "batch_size", "sample_size", "dataset", "tokenizer", "use_exllama", "exllama_config",
    "max_input_length", "cache_block_outputs", "use_cuda_fp16", "module_name_preceding_first_block",
    "block_name_to_quantize", "inside_layer_modules", "quant_type", "damp",
}


# --------------------------------------------------------------------------------------------------
# Quantization settings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantSpec:
    """The arithmetic settings of one quantized linear layer."""

    bits: int
    group_size: int  # -1: one group spanning all inputs
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits: {self.bits!r} is not supported (expected one of {SUPPORTED_BITS})")
        if not (self.group_size == -1 or self.group_size > 0):
            raise ConfigError(f"group_size: {self.group_size!r} is not supported (expected -1 or > 0)")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ConfigError(
                f"checkpoint_format: {self.checkpoint_format!r} is not supported "
                f"(expected one of {CHECKPOINT_FORMATS})"
            )

    @property
    def pack_factor(self) -> int:
        """Codes per int32 word for widths dividing 32 (3-bit has no integer factor)."""
        if WORD_BITS % self.bits:
            raise FormatError(f"{self.bits}-bit codes do not divide a 32-bit word")
        return WORD_BITS // self.bits

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        """The zero point every symmetric checkpoint uses (e.g. 128 for 8-bit, 8 for 4-bit)."""
        return 1 << (self.bits - 1)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.effective_group_size(in_features))


def _as_bool(value: Any, name: str, source: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{source}: field {name!r} must be true or false, got {_short(value)}")


def _as_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{source}: field {name!r} must be an integer, got {_short(value)}")
    return value


def _short(value: Any, limit: int = 60) -> str:
    """A config value for an error message, cut to one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _spec_from_fields(fields: Mapping[str, Any], base: QuantSpec | None, source: str) -> QuantSpec:
    values: dict[str, Any] = {}
    if "bits" in fields:
        values["bits"] = _as_int(fields["bits"], "bits", source)
    if "group_size" in fields:
        values["group_size"] = _as_int(fields["group_size"], "group_size", source)
    for name in ("sym", "desc_act"):
        if name in fields and fields[name] is not None:
            values[name] = _as_bool(fields[name], name, source)
    try:
        if base is None:
            for required in ("bits", "group_size"):
                if required not in values:
                    raise ConfigError(f"{source}: required field {required!r} is missing")
            return QuantSpec(**values)
        return replace(base, **values)
    except ConfigError as e:
        if str(e).startswith(source):
            raise
        raise ConfigError(f"{source}: {e}") from None


@dataclass(frozen=True)
class GPTQConfig:
    """A checkpoint's quantization config, with GPTQModel's per-module ``dynamic`` overrides."""

    default: QuantSpec
    lm_head: bool = False
    dynamic: tuple[tuple[str, bool, Mapping[str, Any]], ...] = ()  # (regex, quantized, overrides)
    modules_in_block_to_quantize: tuple[str, ...] | None = None
    modules_to_not_convert: tuple[str, ...] = ()
    source: str = "quantization_config"
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], source: str = "quantization_config") -> GPTQConfig:
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        method = cfg.get("quant_method", "gptq")
        if method != "gptq":
            raise ConfigError(f"{source}: field 'quant_method' is {method!r}; only 'gptq' is supported")
        fmt = cfg.get("checkpoint_format", cfg.get("format", "gptq"))
        if fmt is None:
            fmt = "gptq"
        if fmt not in CHECKPOINT_FORMATS:
            name = "checkpoint_format" if "checkpoint_format" in cfg else "format"
            raise ConfigError(
                f"{source}: field {name!r} is {fmt!r}; supported: {', '.join(CHECKPOINT_FORMATS)}"
            )
        pack_dtype = cfg.get("pack_dtype", "int32")
        if pack_dtype not in ("int32", "torch.int32"):
            raise ConfigError(f"{source}: field 'pack_dtype' is {pack_dtype!r}; only int32 is supported")
        base = _spec_from_fields(cfg, None, source)
        default = replace(base, checkpoint_format=fmt)

        dynamic: list[tuple[str, bool, Mapping[str, Any]]] = []
        raw_dynamic = cfg.get("dynamic") or {}
        if not isinstance(raw_dynamic, Mapping):
            raise ConfigError(f"{source}: field 'dynamic' must be an object of regex -> overrides")
        for key, overrides in raw_dynamic.items():
            if not isinstance(key, str):  # JSON keys are strings; this guards from_dict callers
                raise ConfigError(f"{source}: dynamic key {key!r} must be a string")
            quantized = not key.startswith("-:")
            pattern = key[2:] if key.startswith(("-:", "+:")) else key
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{source}: dynamic pattern {key!r} is not a valid regex: {e}") from None
            overrides = overrides or {}
            if not isinstance(overrides, Mapping):
                raise ConfigError(f"{source}: dynamic[{key!r}] must be an object, got {overrides!r}")
            if quantized:  # validate the override now, not when the first module hits it
                _spec_from_fields(overrides, default, f"{source}: dynamic[{key!r}]")
            dynamic.append((pattern, quantized, dict(overrides)))

        in_block = cfg.get("modules_in_block_to_quantize")
        names: tuple[str, ...] | None = None
        if in_block is not None:
            flat: list[str] = []
            if isinstance(in_block, list):
                for item in in_block:
                    flat.extend(item if isinstance(item, list) else [item])
            if not isinstance(in_block, list) or not all(isinstance(n, str) for n in flat):
                raise ConfigError(f"{source}: field 'modules_in_block_to_quantize' must be a list of module "
                                  f"names (or of lists of them), got {_short(in_block)}")
            names = tuple(flat)
        not_convert_raw = cfg.get("modules_to_not_convert") or []
        if not isinstance(not_convert_raw, list) or not all(isinstance(n, str) for n in not_convert_raw):
            raise ConfigError(f"{source}: field 'modules_to_not_convert' must be a list of module names, "
                              f"got {_short(not_convert_raw)}")
        not_convert = tuple(not_convert_raw)
        lm_head = cfg.get("lm_head", False)
        return cls(
            default=default,
            lm_head=_as_bool(lm_head, "lm_head", source) if lm_head is not None else False,
            dynamic=tuple(dynamic),
            modules_in_block_to_quantize=names,
            modules_to_not_convert=not_convert,
            source=source,
            raw=dict(cfg),
        )

    @classmethod
    def load(cls, model_dir: str | Path) -> GPTQConfig:
        """Read ``quantization_config`` from config.json, or quantize_config.json beside it."""
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        hf_config = read_json(config_path) if config_path.exists() else None
        if hf_config is not None and not isinstance(hf_config, dict):
            raise ConfigError(f"{config_path}: expected a JSON object, got a JSON {type(hf_config).__name__}")
        if hf_config is not None and "quantization_config" in hf_config:
            return cls.from_dict(hf_config["quantization_config"], f"{config_path} [quantization_config]")
        for name in QUANT_CONFIG_FILES:
            path = model_dir / name
            if path.exists():
                return cls.from_dict(read_json(path), str(path))
        if hf_config is None:
            raise ConfigError(f"{config_path}: not found (is {model_dir} a Hugging Face model folder?)")
        raise ConfigError(
            f"{config_path}: no 'quantization_config' and no quantize_config.json beside it: "
            "this is not a GPTQ checkpoint"
        )

    @staticmethod
    def present(model_dir: str | Path) -> bool:
        """Whether :meth:`load` would find quantization settings in ``model_dir`` (without checking them).

        The same files, read by the same reader, as :meth:`load`: callers that must tell a GPTQ folder
        from a plain one (and load the plain one some other way) ask this instead of reading JSON.
        """
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if config_path.exists():
            hf_config = read_json(config_path)
            if isinstance(hf_config, dict) and "quantization_config" in hf_config:
                return True
        return any((model_dir / name).exists() for name in QUANT_CONFIG_FILES)

    def spec_for(self, module_name: str) -> QuantSpec | None:
        """The settings of ``module_name``, or None when the config leaves it unquantized.

        Matching follows GPTQModel and vLLM: ``re.match`` (anchored at the start), first matching
        ``dynamic`` rule wins, ``-:`` rules exclude the module.
        """
        if module_name.split(".")[-1] == "lm_head" and not self.lm_head:
            return None
        if any(skip and (module_name == skip or module_name.startswith(skip + ".") or
                         f".{skip}." in f".{module_name}.") for skip in self.modules_to_not_convert):
            return None
        if self.modules_in_block_to_quantize is not None and not module_name.endswith("lm_head"):
            if not any(module_name.endswith("." + n) or module_name == n
                       for n in self.modules_in_block_to_quantize):
                return None
        for pattern, quantized, overrides in self.dynamic:
            if re.match(pattern, module_name):
                if not quantized:
                    return None
                return _spec_from_fields(overrides, self.default, f"{self.source}: dynamic")
        return self.default


# config.json, quantize_config.json and the index are kilobytes; a cap keeps a hostile one from being
# read whole into memory (or copied) before anything else is checked.
MAX_JSON_BYTES = 64 * 2**20


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a small JSON file; every way it can be bad is a ConfigError naming ``path``."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if st.st_size > limit:
            raise ConfigError(f"{path}: {st.st_size} bytes; JSON files over {limit // 2**20} MiB are refused")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None


# --------------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------------


def packed_len(count: int, bits: int) -> int:
    """Number of int32 words that hold ``count`` codes of ``bits`` bits."""
    return math.ceil(count * bits / WORD_BITS)


def _to_uint32(words: torch.Tensor) -> torch.Tensor:
    return words.to(torch.int64) & 0xFFFFFFFF


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> int32 with the same bit pattern."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """Unpack ``count`` unsigned codes along ``dim`` (0 for qweight, 1 for qzeros) -> int32."""
    if packed.dtype != torch.int32:
        raise FormatError(f"packed tensor must be int32, got {packed.dtype}")
    words = _to_uint32(packed.movedim(dim, 0))
    if words.shape[0] != packed_len(count, bits):
        raise FormatError(
            f"{count} {bits}-bit codes need {packed_len(count, bits)} words along dim {dim}, "
            f"got {words.shape[0]}"
        )
    offset = torch.arange(count, dtype=torch.int64) * bits
    word, shift = offset // WORD_BITS, offset % WORD_BITS
    view = (-1,) + (1,) * (words.dim() - 1)
    codes = words[word] >> shift.view(view)
    if WORD_BITS % bits:
        # A 3-bit code can start near the end of a word and continue in the next one.
        spill = (shift + bits > WORD_BITS).view(view)
        nxt = words[torch.clamp(word + 1, max=words.shape[0] - 1)]
        codes |= torch.where(spill, nxt << (WORD_BITS - shift).view(view), 0)
    return (codes & ((1 << bits) - 1)).to(torch.int32).movedim(0, dim)


def pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`unpack`: unsigned codes along ``dim`` -> int32 words."""
    codes = codes.to(torch.int64).movedim(dim, 0)
    if codes.numel() and (codes.min() < 0 or codes.max() > (1 << bits) - 1):
        raise FormatError(f"codes must lie in [0, {(1 << bits) - 1}] to pack into {bits} bits")
    count = codes.shape[0]
    n_words = packed_len(count, bits)
    offset = torch.arange(count, dtype=torch.int64) * bits
    word, shift = offset // WORD_BITS, offset % WORD_BITS
    view = (-1,) + (1,) * (codes.dim() - 1)
    out = torch.zeros((n_words + 1,) + tuple(codes.shape[1:]), dtype=torch.int64)
    # Bit fields are disjoint, so adding the pieces is the same as OR-ing them.
    out.index_add_(0, word, (codes << shift.view(view)) & 0xFFFFFFFF)
    out.index_add_(0, word + 1, codes >> (WORD_BITS - shift).view(view))
    return _to_int32(out[:n_words]).movedim(0, dim)


def _ones_word(bits: int) -> int:
    """A 32-bit word whose every ``bits``-wide field holds 1 (the v1 zero-point offset)."""
    return sum(1 << (bits * j) for j in range(WORD_BITS // bits))


def _shift_fields(qzeros: torch.Tensor, bits: int, delta: int) -> torch.Tensor:
    n = qzeros.shape[-1] * WORD_BITS // bits
    return pack((unpack(qzeros, bits, n, dim=1) + delta) & ((1 << bits) - 1), bits, dim=1)


def qzeros_v1_to_v2(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored ``z - 1`` -> ``z``, the way GPTQModel converts (see the module docstring)."""
    if bits == 3:
        # 3-bit fields straddle words, so GPTQModel shifts each decoded field instead.
        return _shift_fields(qzeros, bits, +1)
    return _to_int32(_to_uint32(qzeros) + _ones_word(bits))


def qzeros_v2_to_v1(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 3:
        return _shift_fields(qzeros, bits, -1)
    return _to_int32(_to_uint32(qzeros) - _ones_word(bits))


def unpack_zeros(qzeros: torch.Tensor, spec: QuantSpec, out_features: int) -> torch.Tensor:
    """The true zero points ``z`` [G, N] (int32), whatever the checkpoint format stores."""
    if spec.checkpoint_format == "gptq":
        qzeros = qzeros_v1_to_v2(qzeros, spec.bits)
    return unpack(qzeros, spec.bits, out_features, dim=1)


def pack_zeros(zeros: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Inverse of :func:`unpack_zeros`."""
    packed = pack(zeros, spec.bits, dim=1)
    return qzeros_v2_to_v1(packed, spec.bits) if spec.checkpoint_format == "gptq" else packed


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    g = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // g


def act_order_perm(g_idx: torch.Tensor) -> torch.Tensor | None:
    """A K permutation that makes ``g_idx`` non-decreasing, or None when it already is.

    Backends with act-order checkpoints permute weight rows once (``q[perm]``) and gather activation
    columns (``x[:, perm]``) per call, so their inner loops only ever see contiguous groups.
    """
    if g_idx.numel() < 2 or bool((g_idx[1:] >= g_idx[:-1]).all()):
        return None
    return torch.argsort(g_idx.to(torch.int64), stable=True)


# --------------------------------------------------------------------------------------------------
# One layer's tensors
# --------------------------------------------------------------------------------------------------


@dataclass
class GPTQTensors:
    """The stored tensors of one quantized linear layer, exactly as read from the checkpoint."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def in_features(self, spec: QuantSpec) -> int:
        if self.g_idx is not None:
            return self.g_idx.numel()
        return self.qweight.shape[0] * WORD_BITS // spec.bits


# Shapes are checked from headers before any tensor is read or any output allocated; a layer whose
# dimensions are out of this range is refused by name (no real model comes near it, and K or N of 0
# would let a header of a few bytes make the dequant allocate memory proportional to the other one).
MAX_FEATURES = 2**24

Meta = tuple["torch.dtype | str | None", tuple[int, ...]]  # (dtype, or its safetensors name if unknown; shape)


def _meta_text(meta: Meta) -> str:
    dtype, shape = meta
    return f"{str(dtype).replace('torch.', '')} {tuple(shape)}"


def check_layer_shapes(name: str, metas: Mapping[str, Meta], spec: QuantSpec,
                       in_features: int | None = None, num_groups: int | None = None) -> int:
    """Check one layer's tensor dtypes and shapes (from a header, or loaded tensors); return K.

    ``metas`` maps qweight / qzeros / scales and, if stored, g_idx / bias to (dtype, shape).
    ``num_groups`` overrides the scale rows expected from K (a tensor-parallel rank holding a slice of
    the rows but every group's scales). Errors name the tensor (``name.qweight`` ...) and say what
    was expected.
    """
    def fail(tensor: str, msg: str) -> FormatError:
        return FormatError(f"{name}.{tensor}: {msg}")

    for tname in ("qweight", "qzeros", "scales"):
        if tname not in metas:
            raise fail(tname, "missing (a quantized layer needs qweight, qzeros and scales)")
    for tname in ("qweight", "qzeros"):
        dtype, shape = metas[tname]
        if dtype != torch.int32 or len(shape) != 2:
            raise fail(tname, f"expected a 2-D int32 tensor, got {_meta_text(metas[tname])}")
    dtype, shape = metas["scales"]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or len(shape) != 2:
        raise fail("scales", f"expected a 2-D float tensor, got {_meta_text(metas['scales'])}")
    g_meta = metas.get("g_idx")
    if g_meta is not None and (g_meta[0] not in (torch.int32, torch.int64) or len(g_meta[1]) != 1):
        raise fail("g_idx", f"expected a 1-D int32 tensor, got {_meta_text(g_meta)}")
    qshape = tuple(metas["qweight"][1])
    n = qshape[1]
    if in_features is not None:
        k = in_features
    elif g_meta is not None:
        k = g_meta[1][0]
    else:
        k = qshape[0] * WORD_BITS // spec.bits
    if not (0 < n <= MAX_FEATURES):
        raise fail("qweight", f"out_features (dim 1) must be in [1, {MAX_FEATURES}], got {n}")
    if not (0 < k <= MAX_FEATURES):
        raise fail("qweight", f"in_features must be in [1, {MAX_FEATURES}], got {k}")
    if g_meta is not None and g_meta[1][0] != k:
        raise fail("g_idx", f"expected {k} entries (in_features), got {g_meta[1][0]}")
    rows = packed_len(k, spec.bits)
    if qshape[0] != rows:
        raise fail("qweight", f"expected shape ({rows}, {n}) for in_features={k} at {spec.bits} bits, "
                              f"got {qshape}")
    if spec.bits == 3 and k % 32:
        raise fail("qweight", f"3-bit layers need in_features to be a multiple of 32, got {k}")
    groups = num_groups if num_groups is not None else spec.num_groups(k)
    if tuple(metas["scales"][1]) != (groups, n):
        raise fail("scales", f"expected shape ({groups}, {n}) for in_features={k}, "
                             f"group_size={spec.group_size}, got {tuple(metas['scales'][1])}")
    zcols = packed_len(n, spec.bits)
    if tuple(metas["qzeros"][1]) != (groups, zcols):
        raise fail("qzeros", f"expected shape ({groups}, {zcols}), got {tuple(metas['qzeros'][1])}")
    b_meta = metas.get("bias")
    if b_meta is not None and tuple(b_meta[1]) != (n,):
        raise fail("bias", f"expected shape ({n},) (out_features), got {tuple(b_meta[1])}")
    return k


def validate_layer(name: str, t: GPTQTensors, spec: QuantSpec, in_features: int | None = None,
                   num_groups: int | None = None) -> int:
    """Check that a layer's tensors agree with each other and with ``spec``; return K.

    The one validation of a layer's tensors: the converter calls it on what it read, the vLLM plugin
    on what vLLM loaded, the backends before they repack. Shapes as in :func:`check_layer_shapes`,
    then values: every g_idx entry must name a group that exists, every scale must be finite.
    Errors name the tensor (``name.qweight`` ...) and say what was expected.
    """
    metas: dict[str, Meta] = {n: (getattr(t, n).dtype, tuple(getattr(t, n).shape))
                              for n in ("qweight", "qzeros", "scales", "g_idx", "bias")
                              if getattr(t, n) is not None}
    k = check_layer_shapes(name, metas, spec, in_features, num_groups)
    groups = t.scales.shape[0]
    if t.g_idx is not None:
        lo, hi = int(t.g_idx.min()), int(t.g_idx.max())
        if lo < 0 or hi >= groups:
            raise FormatError(f"{name}.g_idx: values must lie in [0, {groups - 1}], found range [{lo}, {hi}]")
    bad = ~torch.isfinite(t.scales)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise FormatError(f"{name}.scales: {int(bad.sum())} non-finite value(s) (NaN/Inf), first at {idx}")
    return k


def validate_loaded(t: GPTQTensors, spec: QuantSpec, in_features: int, num_groups: int,
                    shards: list[tuple[str, int, int, torch.Tensor | None]]) -> None:
    """:func:`validate_layer` for a layer as a serving engine loaded it (the vLLM plugin calls this).

    A fused layer (q/k/v, gate/up) holds several checkpoint modules side by side along N; each
    ``(checkpoint module name, first column, end column, its own g_idx or None)`` in ``shards`` is
    validated on its columns under its own name, so an error names the tensor as the file stores it.
    """
    n = t.out_features
    for name, c0, c1, g_idx in shards:
        z0 = c0 * spec.bits // WORD_BITS
        z1 = packed_len(c1, spec.bits) if c1 == n else c1 * spec.bits // WORD_BITS
        part = GPTQTensors(t.qweight[:, c0:c1], t.qzeros[:, z0:z1], t.scales[:, c0:c1],
                           g_idx if g_idx is not None else t.g_idx)
        validate_layer(name, part, spec, in_features, num_groups)


# --------------------------------------------------------------------------------------------------
# The reference dequantization
# --------------------------------------------------------------------------------------------------


def unpack_weight_codes(t: GPTQTensors, spec: QuantSpec, in_features: int | None = None) -> torch.Tensor:
    """Unsigned codes q [K, N] (int32)."""
    k = in_features if in_features is not None else t.in_features(spec)
    return unpack(t.qweight, spec.bits, k, dim=0)


def dequantize(
    t: GPTQTensors,
    spec: QuantSpec,
    in_features: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``W[k, n] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]`` as a [K, N] tensor.

    Computed in float32 (``float64`` if asked): ``q - z`` is an exact small integer and the scale is an
    fp16 value, so one rounding (to ``dtype``) happens at the end.
    """
    k = in_features if in_features is not None else t.in_features(spec)
    n = t.out_features
    q = unpack_weight_codes(t, spec, k)
    z = unpack_zeros(t.qzeros, spec, n)
    g_idx = t.g_idx.to(torch.int64) if t.g_idx is not None else default_g_idx(k, spec.group_size).long()
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    w = (q - z[g_idx]).to(compute) * t.scales.to(compute)[g_idx]
    return w.to(dtype)
