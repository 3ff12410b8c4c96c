"""Offline mode: a GPTQ checkpoint -> an exactly dequantized FP16/BF16 Hugging Face checkpoint.

Streaming: the output tensors are planned from the source headers (names, dtypes, shapes), each shard's
header is written first, and tensors are then dequantized and written one at a time, so peak memory is
a few tensors, not the model. Atomic: everything goes to a temporary folder beside DST, renamed into
place only when complete; on any error or interruption DST is left as it was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import format as fmt
from .checkpoint import (
    INDEX_NAME,
    PICKLE_INDEX_NAME,
    QUANT_SUFFIXES,
    ST_TO_DTYPE,
    Checkpoint,
    PlannedTensor,
    SafetensorsWriter,
    checked_file,
    parse_size,
    shard_names,
    shard_plan,
    source_roots,
)
from .errors import CheckpointError, FormatError, GPTQAscendError

logger = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5's save_pretrained default

# (tensors, spec, in_features, dtype) -> [N, K] weight in dtype. The default is the reference.
DequantFn = Callable[[fmt.GPTQTensors, fmt.QuantSpec, int, torch.dtype], torch.Tensor]


def reference_dequant(t: fmt.GPTQTensors, spec: fmt.QuantSpec, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The HF Linear weight [N, K]: format.dequantize (the definition), transposed."""
    w = fmt.dequantize(t, spec, k, torch.float32)
    return cast_checked(w.t(), dtype).contiguous()


def backend_dequant(name: str) -> DequantFn:
    """Dequantize with an ops backend (e.g. 'cpu', 'npu') instead of the pure-torch reference."""
    from .ops import get_backend

    backend = get_backend(name)
    ok, why = backend.available()
    if not ok:
        raise GPTQAscendError(f"--backend {name}: not available here: {why}")

    def run(t: fmt.GPTQTensors, spec: fmt.QuantSpec, k: int, dtype: torch.dtype) -> torch.Tensor:
        w = backend.dequant(backend.repack(t, spec, k), torch.float32).cpu()
        return cast_checked(w.t(), dtype).contiguous()

    return run


class RangeError(FormatError):
    """A value that is finite in the source is not finite in the output dtype."""


Fp16RangeError = RangeError  # the name before bfloat16 output was checked too


def cast_checked(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, refusing to turn a value into Inf/NaN (the caller adds the tensor's name)."""
    out = x.to(dtype)
    bad = ~torch.isfinite(out)
    if bool(bad.any()):
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            raise RangeError(f"{int((~finite).sum())} value(s) are NaN/Inf already in float32 (scales or "
                             "weights too large for any output dtype)")
        big = float(x.abs().max())
        advice = ("; convert with --dtype bfloat16 instead"
                  if dtype == torch.float16 and big <= torch.finfo(torch.bfloat16).max else "")
        raise RangeError(f"{int(bad.sum())} value(s) exceed the {str(dtype).replace('torch.', '')} range "
                         f"(max |x| = {big:.6g} > {torch.finfo(dtype).max:.6g}){advice}")
    return out


@dataclass
class ConvertPlan:
    """What the output will hold, computed from headers only."""

    config: fmt.GPTQConfig
    layers: dict[str, tuple[fmt.QuantSpec, int]]  # prefix -> (spec, in_features)
    outputs: list[PlannedTensor]
    source_of: dict[str, tuple[str, str]]  # output name -> ("quant", prefix) | ("plain", src name)


def layer_metas(ckpt: Checkpoint, prefix: str, parts: set[str]) -> dict[str, fmt.Meta]:
    """(dtype, shape) of a layer's stored tensors, from the header (unknown dtypes as their names)."""
    out: dict[str, fmt.Meta] = {}
    for part in parts:
        st_dtype, shape = ckpt.meta(f"{prefix}.{part}")
        out[part] = (ST_TO_DTYPE.get(st_dtype, st_dtype), shape)
    return out


def plan_conversion(ckpt: Checkpoint, config: fmt.GPTQConfig, dtype: torch.dtype) -> ConvertPlan:
    """The output, from headers only: every layer's shapes are checked here, before anything is read."""
    layers: dict[str, tuple[fmt.QuantSpec, int]] = {}
    for prefix, parts in ckpt.quantized_layers().items():
        spec = config.spec_for(prefix)
        if spec is None:
            raise FormatError(f"{prefix}.qweight: the checkpoint stores this module quantized, but "
                              f"{config.source} says it is not (lm_head / dynamic '-:' / "
                              "modules_to_not_convert); refusing to guess its settings")
        k = fmt.check_layer_shapes(prefix, layer_metas(ckpt, prefix, parts), spec)
        layers[prefix] = (spec, k)

    outputs: list[PlannedTensor] = []
    source_of: dict[str, tuple[str, str]] = {}
    quant_names = {f"{p}.{s}" for p in layers for s in QUANT_SUFFIXES}
    for name in sorted(ckpt.names()):
        prefix, _, suffix = name.rpartition(".")
        if prefix in layers and suffix == "qweight":
            spec, k = layers[prefix]
            _, qshape = ckpt.meta(name)
            outputs.append(PlannedTensor(f"{prefix}.weight", dtype, (qshape[1], k)))
            source_of[f"{prefix}.weight"] = ("quant", prefix)
        elif name in quant_names:
            continue
        else:
            st_dtype, shape = ckpt.meta(name)
            src_dtype = ST_TO_DTYPE.get(st_dtype)
            if src_dtype is None:
                raise CheckpointError(f"{ckpt.tensor_file[name]}: tensor {name!r} has dtype {st_dtype}, "
                                      "which the converter does not handle")
            if name.endswith(".weight") and name[: -len(".weight")] in layers:
                raise CheckpointError(f"{ckpt.tensor_file[name]}: stores {name!r} beside "
                                      f"{name[: -len('.weight')]}.qweight; the output would hold two")
            out_dtype = dtype if src_dtype.is_floating_point else src_dtype
            outputs.append(PlannedTensor(name, out_dtype, shape))
            source_of[name] = ("plain", name)
    return ConvertPlan(config, layers, outputs, source_of)


@dataclass
class ConvertResult:
    dst: Path
    shards: int
    tensors: int
    quantized_layers: int
    bytes_written: int
    verify: VerifyReport | None = None


@dataclass
class VerifyReport:
    checked: int = 0
    max_abs_error: float = 0.0
    nonfinite: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.nonfinite == 0

    def summary(self) -> str:
        status = "OK" if self.ok else "FAILED"
        lines = [f"verify: {status}: {self.checked} tensors checked, max abs error {self.max_abs_error:.3g}, "
                 f"{self.nonfinite} NaN/Inf values"]
        lines += [f"  mismatch: {m}" for m in self.mismatches[:20]]
        if len(self.mismatches) > 20:
            lines.append(f"  ... and {len(self.mismatches) - 20} more")
        return "\n".join(lines)


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr)


def _hf_config(src: Path) -> dict:
    path = src / "config.json"
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: not found (is {src} a Hugging Face model folder?)")
    checked_file(src, "config.json", str(path))
    cfg = fmt.read_json(path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a JSON {type(cfg).__name__}")
    return cfg


_SKIP_FILES = {"config.json", *fmt.QUANT_CONFIG_FILES, INDEX_NAME, PICKLE_INDEX_NAME}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _side_files(src: Path) -> list[tuple[str, Path]]:
    """(name, resolved path) of the files to copy, each checked against the symlink rule first."""
    roots = source_roots(src)
    files = []
    for p in sorted(src.iterdir()):
        if p.name in _SKIP_FILES or p.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if not p.is_symlink() and not p.is_file():
            if not p.is_dir():
                logger.warning("%s: not a regular file (a FIFO, socket or device); not copied", p)
            continue
        if p.is_symlink() and p.is_dir():
            continue
        files.append((p.name, checked_file(src, p.name, str(p), roots)))
    return files


def _copy_side_files(files: list[tuple[str, Path]], dst: Path) -> list[str]:
    for name, path in files:
        shutil.copyfile(path, dst / name)
        shutil.copystat(path, dst / name)
    return [name for name, _ in files]


def _check_dst(src: Path, dst: Path) -> None:
    """Refuse a DST that is the source, lies inside it or contains it (symlinks resolved)."""
    target = dst.resolve()
    for root in source_roots(src):
        if target == root or root in target.parents or target in root.parents:
            where = ("is" if target == root else "is inside" if root in target.parents else "contains")
            raise GPTQAscendError(f"{dst}: the destination {where} the source {root}; choose a folder "
                                  "outside it (--force never replaces or deletes source files)")


def _missing_parents(path: Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, deepest first."""
    out = []
    p = path.parent
    while not os.path.lexists(p) and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def _remove_dirs(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first; stops at one that is not empty (someone else wrote there)
        try:
            os.rmdir(d)
        except OSError:
            break


def convert(
    src: str | Path,
    dst: str | Path,
    dtype: str | torch.dtype = "float16",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    verify: bool = False,
    allow_pickle: bool = False,
    progress: bool | None = None,
    dequant_fn: DequantFn = reference_dequant,
) -> ConvertResult:
    """Convert ``src`` (GPTQ) into ``dst`` (plain FP16/BF16). See the module docstring."""
    src, dst = Path(src), Path(dst)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) and dtype in DTYPES else dtype
    if torch_dtype not in DTYPES.values():
        raise GPTQAscendError(f"--dtype: {dtype!r} is not supported (expected float16 or bfloat16)")
    dtype_name = {v: k for k, v in DTYPES.items()}[torch_dtype]
    max_bytes = parse_size(max_shard_size)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    _check_dst(src, dst)
    if os.path.lexists(dst) and not force:
        raise GPTQAscendError(f"{dst}: already exists (pass --force to replace it)")

    hf_config = _hf_config(src)
    config = fmt.GPTQConfig.load(src)
    ckpt = Checkpoint.open(src, allow_pickle=allow_pickle)
    plan = plan_conversion(ckpt, config, torch_dtype)
    side_files = _side_files(src)

    created = _missing_parents(dst)
    existing = created[-1].parent if created else dst.parent
    if not existing.is_dir():
        raise CheckpointError(f"{existing}: not a directory (the destination would be inside it)")
    tmp: Path | None = None
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any folder
        shards = shard_plan(plan.outputs, max_bytes)
        names = list(shard_names(len(shards)))
        weight_map: dict[str, str] = {}
        total = 0
        with _progress(len(plan.outputs), f"convert {src.name}", progress) as bar:
            for shard_name, shard in zip(names, shards, strict=True):
                writer = SafetensorsWriter(tmp / shard_name, shard)
                for p in shard:
                    tensor = _produce(ckpt, plan, p, dequant_fn)
                    writer.write(p.name, tensor)
                    weight_map[p.name] = shard_name
                    total += p.nbytes
                    bar.update(1)
                writer.close()
        _write_text(tmp / INDEX_NAME, json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")

        out_config = dict(hf_config)
        out_config.pop("quantization_config", None)
        out_config["torch_dtype"] = dtype_name
        if "dtype" in out_config:
            out_config["dtype"] = dtype_name
        _write_text(tmp / "config.json", json.dumps(out_config, indent=2) + "\n")
        _copy_side_files(side_files, tmp)

        report = None
        if verify:
            report = verify_conversion(src, tmp, torch_dtype, allow_pickle=allow_pickle, progress=progress)
            if not report.ok:
                raise VerifyFailed(report)
        _replace(tmp, dst)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(created)
        if isinstance(e, OSError):
            raise CheckpointError(f"{e.filename or dst}: {e.strerror or e} (writing {dst}; nothing was "
                                  "written)") from None
        raise
    return ConvertResult(dst, len(shards), len(plan.outputs), len(plan.layers), total, report)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class VerifyFailed(GPTQAscendError):
    def __init__(self, report: VerifyReport):
        super().__init__(report.summary() + "\nthe output was NOT written")
        self.report = report


def _produce(ckpt: Checkpoint, plan: ConvertPlan, p: PlannedTensor, dequant_fn: DequantFn) -> torch.Tensor:
    kind, key = plan.source_of[p.name]
    if kind == "quant":
        spec, k = plan.layers[key]
        t = ckpt.layer_tensors(key)
        t.bias = None  # the bias is written as its own tensor
        fmt.validate_layer(key, t, spec, k)
        try:
            w = dequant_fn(t, spec, k, p.dtype)
        except RangeError as e:
            raise RangeError(f"{key}: dequantized weight: {e}") from None
        if tuple(w.shape) != p.shape or w.dtype != p.dtype:
            raise FormatError(f"{key}: dequant returned {w.dtype} {tuple(w.shape)}, expected {p.dtype} {p.shape}")
        return w
    tensor = ckpt.get(key)
    if not tensor.is_floating_point():
        return tensor
    try:
        return cast_checked(tensor, p.dtype)
    except RangeError as e:
        raise RangeError(f"{ckpt.tensor_file[key]}: tensor {key!r}: {e}") from None


def _replace(tmp: Path, dst: Path) -> None:
    """Move the finished folder into place; an existing DST survives until the new one is there."""
    if os.path.lexists(dst):
        backup = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.rmdir(backup)
        os.replace(dst, backup)
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(backup, dst)
            raise
        if backup.is_dir() and not backup.is_symlink():
            shutil.rmtree(backup, ignore_errors=True)
        else:  # DST was a file or a symlink: remove it, not what it points to
            backup.unlink()
    else:
        os.replace(tmp, dst)


def verify_conversion(src: str | Path, out: str | Path, dtype: torch.dtype, allow_pickle: bool = False,
                      progress: bool | None = None) -> VerifyReport:
    """Re-read ``out`` and compare every tensor with the reference dequant of ``src``.

    Quantized layers must equal ``format.dequantize`` rounded to ``dtype`` within one ulp of the
    target dtype (the reference rounds once; a backend that rounds in another order may differ by
    one ulp); plain tensors must equal the source cast to ``dtype``.
    """
    src, out = Path(src), Path(out)
    config = fmt.GPTQConfig.load(src)
    ckpt = Checkpoint.open(src, allow_pickle=allow_pickle)
    result = Checkpoint.open(out)
    plan = plan_conversion(ckpt, config, dtype)
    report = VerifyReport()
    ulp = torch.finfo(dtype).eps
    missing = [p.name for p in plan.outputs if p.name not in result.tensor_file]
    report.mismatches += [f"{n}: missing from the output" for n in missing]
    with _progress(len(plan.outputs), "verify", progress) as bar:
        for p in plan.outputs:
            bar.update(1)
            if p.name in missing:
                continue
            got = result.get(p.name)
            report.checked += 1
            if got.is_floating_point():
                report.nonfinite += int((~torch.isfinite(got)).sum())
            kind, key = plan.source_of[p.name]
            if kind == "quant":
                spec, k = plan.layers[key]
                t = ckpt.layer_tensors(key)
                expected = fmt.dequantize(t, spec, k, torch.float64).t()
            else:
                expected = ckpt.get(key)
                expected = expected.to(dtype) if expected.is_floating_point() else expected
            if got.shape != expected.shape or got.dtype != p.dtype:
                report.mismatches.append(f"{p.name}: got {got.dtype} {tuple(got.shape)}, expected "
                                         f"{p.dtype} {tuple(expected.shape)}")
                continue
            if not got.is_floating_point():
                if not torch.equal(got, expected):
                    report.mismatches.append(f"{p.name}: integer values differ")
                continue
            g, e = got.to(torch.float64), expected.to(torch.float64)
            err = (g - e).abs()
            finite = torch.isfinite(err)
            max_err = float(err[finite].max()) if bool(finite.any()) else 0.0
            report.max_abs_error = max(report.max_abs_error, max_err)
            tol = ulp * e.abs() + torch.finfo(dtype).tiny
            bad = ~(err <= tol)
            if bool(bad.any()):
                idx = tuple(int(i) for i in bad.nonzero()[0])
                report.mismatches.append(
                    f"{p.name}: {int(bad.sum())} of {e.numel()} values differ from the reference dequant "
                    f"(max abs error {max_err:.3g}; first at {idx}: got {float(g[idx]):.6g}, "
                    f"expected {float(e[idx]):.6g})")
    return report
