"""Safe reading of Hugging Face checkpoints, and a streaming safetensors writer.

Reading: safetensors only by default (a pickle ``.bin`` checkpoint is refused unless the caller opts
in, and then loaded with ``torch.load(weights_only=True)``); index files are checked so that no entry
points outside the model folder or at a missing shard; truncated or corrupted files are reported by
name. Writing: :class:`SafetensorsWriter` writes a file whose header is planned up front, so tensors
are produced and written one at a time and memory stays bounded by the largest tensor.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError, GPTQAscendError
from .format import GPTQTensors, read_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def source_roots(folder: Path) -> list[Path]:
    """The folders a checkpoint's files may live in, after following symlinks.

    The rule: a file of the model folder (a shard, the index, config.json, a tokenizer or any other
    side file) may be a symlink only if it resolves inside the folder itself or, when the folder is a
    Hugging Face cache snapshot (``.../snapshots/<revision>/``), inside that repository's blob store
    (``.../blobs``, where the cache keeps the real files). Anything else is refused, never copied.
    """
    root = folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        blobs = root.parent.parent / "blobs"
        if blobs.is_dir():
            roots.append(blobs.resolve())
    return roots


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def checked_file(folder: Path, name: str, what: str, roots: list[Path] | None = None) -> Path:
    """``folder / name`` resolved, if it is a regular file the symlink rule allows (see source_roots).

    ``what`` names the file that refers to ``name`` (the index) or the file itself, for the message.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{what}: file name {name!r} is not a file name")
    lexical = os.path.normpath(name)
    if os.path.isabs(name) or lexical == ".." or lexical.startswith(".." + os.sep):
        raise CheckpointError(f"{what}: {name!r} points outside the model folder {folder}")
    path = folder / name
    try:
        resolved = path.resolve(strict=True)
        st = os.stat(resolved)
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop on older Pythons
        reason = getattr(e, "strerror", None) or str(e)
        raise CheckpointError(f"{what}: {name!r} is missing or unreadable ({reason})") from None
    roots = roots if roots is not None else source_roots(folder)
    if not any(_within(resolved, r) for r in roots):
        raise CheckpointError(
            f"{what}: {name!r} is a symlink to {resolved}, outside the model folder"
            + (" and its Hugging Face blob store" if len(roots) > 1 else "")
            + "; copy the file into the folder (symlinks may only point inside it, or into ../../blobs "
              "of a Hugging Face cache snapshot)")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{what}: {name!r} is not a regular file")
    return resolved


@dataclass
class Checkpoint:
    """The tensors of a model folder: which file holds each one, read lazily one tensor at a time."""

    folder: Path
    files: list[Path]
    tensor_file: dict[str, Path]
    pickled: bool = False
    _pickle_cache: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _headers: dict[Path, dict] = field(default_factory=dict, repr=False)  # each header parsed once
    _open: tuple[Path, object] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, folder: str | Path, allow_pickle: bool = False) -> Checkpoint:
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a directory")
        roots = source_roots(folder)
        index = folder / INDEX_NAME
        if os.path.lexists(index):
            return cls._from_index(folder, checked_file(folder, INDEX_NAME, str(index), roots), roots)
        single = folder / SINGLE_NAME
        names = [SINGLE_NAME] if os.path.lexists(single) else sorted(p.name for p in folder.glob("*.safetensors"))
        files = [checked_file(folder, n, str(folder / n), roots) for n in names]
        if files:
            return cls._from_files(folder, files)
        pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))
        pickles = [checked_file(folder, p.name, str(p), roots) for p in pickles]
        if pickles:
            if not allow_pickle:
                raise CheckpointError(
                    f"{pickles[0]}: pickle checkpoints are not loaded by default (unpickling runs code "
                    "from the file). Convert it to safetensors, or pass --allow-pickle to load it with "
                    "torch.load(weights_only=True)."
                )
            return cls._from_pickles(folder, pickles)
        raise CheckpointError(f"{folder}: no *.safetensors weights found")

    @classmethod
    def _from_index(cls, folder: Path, index: Path, roots: list[Path]) -> Checkpoint:
        where = folder / INDEX_NAME
        try:
            data = read_json(index)
        except GPTQAscendError as e:
            raise CheckpointError(str(e).replace(str(index), str(where), 1)) from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{where}: expected a non-empty 'weight_map' object")
        tensor_file: dict[str, Path] = {}
        files: dict[Path, str] = {}
        resolved: dict[str, Path] = {}
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str) or shard not in resolved:
                resolved[shard] = checked_file(folder, shard, f"{where} (shard of {tensor!r})", roots)
            tensor_file[tensor] = resolved[shard]
            files.setdefault(resolved[shard], shard)
        ckpt = cls(folder, list(files), tensor_file)
        # The index must describe its shards exactly: a tensor it names must be in the shard it names,
        # and a tensor a shard stores must be in the index (else it would be dropped without a word).
        listed: dict[Path, set[str]] = defaultdict(set)
        for tensor, path in tensor_file.items():
            listed[path].add(tensor)
        for path, shard in files.items():
            stored = set(ckpt._header_names(path))
            for tensor in sorted(listed[path] - stored):
                raise CheckpointError(f"{where}: {tensor!r} is listed in {shard} but not stored there")
            for tensor in sorted(stored - listed[path]):
                other = weight_map.get(tensor)
                also = f" (the index says it is in {other})" if other is not None else ""
                raise CheckpointError(f"{folder / shard}: stores {tensor!r}, "
                                      f"which {INDEX_NAME} does not list{also}; refusing to drop it")
        return ckpt

    @classmethod
    def _from_files(cls, folder: Path, files: list[Path]) -> Checkpoint:
        ckpt = cls(folder, files, {})
        for path in files:
            for name in ckpt._header_names(path):
                if name in ckpt.tensor_file:
                    raise CheckpointError(f"{path}: tensor {name!r} is also stored in {ckpt.tensor_file[name]}")
                ckpt.tensor_file[name] = path
        return ckpt

    @classmethod
    def _from_pickles(cls, folder: Path, files: list[Path]) -> Checkpoint:
        ckpt = cls(folder, files, {}, pickled=True)
        for path in files:
            for name in ckpt._load_pickle(path):
                ckpt.tensor_file[name] = path
        return ckpt

    def _load_pickle(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._pickle_cache:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises many types for bad pickles
                raise CheckpointError(f"{path}: cannot load with weights_only=True ({e})") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
            self._pickle_cache.clear()  # keep one file in memory at a time
            self._pickle_cache[path] = state
        return self._pickle_cache[path]

    def _header(self, path: Path) -> dict:
        header = self._headers.get(path)
        if header is None:
            header = self._headers[path] = read_safetensors_header(path)
        return header

    def _header_names(self, path: Path) -> list[str]:
        """Names stored in a safetensors file, after checking that the file is whole."""
        return [k for k in self._header(path) if k != "__metadata__"]

    # ----------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self.tensor_file)

    def get(self, name: str) -> torch.Tensor:
        path = self.tensor_file.get(name)
        if path is None:
            raise CheckpointError(f"{self.folder}: tensor {name!r} not found")
        if self.pickled:
            return self._load_pickle(path)[name]
        try:
            # One open file at a time: opening parses the whole header again, once per tensor would
            # make reading quadratic in the tensor count.
            if self._open is None or self._open[0] != path:
                self._open = None
                self._open = (path, safe_open(str(path), framework="pt"))
            return self._open[1].get_tensor(name)
        except Exception as e:  # safetensors raises SafetensorError / OSError
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype string, shape) without reading the data."""
        path = self.tensor_file[name]
        if self.pickled:
            t = self._load_pickle(path)[name]
            return DTYPE_TO_ST.get(t.dtype, str(t.dtype)), tuple(t.shape)
        entry = self._header(path)[name]
        return entry["dtype"], tuple(entry["shape"])

    def nbytes(self, name: str) -> int:
        """Bytes of a stored tensor, from its header."""
        st_dtype, shape = self.meta(name)
        n = ST_ITEMSIZE[st_dtype]
        for d in shape:
            n *= d
        return n

    def quantized_layers(self) -> dict[str, set[str]]:
        """Module prefix -> which of qweight/qzeros/scales/g_idx/bias it stores."""
        layers: dict[str, set[str]] = defaultdict(set)
        for name in self.tensor_file:
            prefix, _, suffix = name.rpartition(".")
            if suffix == "qweight":
                layers[prefix].add(suffix)
        for name in self.tensor_file:
            prefix, _, suffix = name.rpartition(".")
            if prefix in layers and (suffix in QUANT_SUFFIXES or suffix == "bias"):
                layers[prefix].add(suffix)
        return dict(layers)

    def layer_tensors(self, prefix: str) -> GPTQTensors:
        missing = [s for s in ("qweight", "qzeros", "scales") if f"{prefix}.{s}" not in self.tensor_file]
        if missing:
            raise CheckpointError(f"{self.folder}: quantized layer {prefix!r} has no "
                                  + ", ".join(f"{prefix}.{m}" for m in missing))

        def opt(s: str) -> torch.Tensor | None:
            return self.get(f"{prefix}.{s}") if f"{prefix}.{s}" in self.tensor_file else None

        return GPTQTensors(self.get(f"{prefix}.qweight"), self.get(f"{prefix}.qzeros"),
                           self.get(f"{prefix}.scales"), opt("g_idx"), opt("bias"))


# --------------------------------------------------------------------------------------------------
# The safetensors file format (https://github.com/huggingface/safetensors): 8-byte little-endian
# header length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {}},
# then the raw little-endian tensor bytes.
# --------------------------------------------------------------------------------------------------

DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_safetensors_header(path: Path) -> dict:
    """The parsed header, after checking every entry's fields and that its bytes lie within the file.

    Errors name the file and, for an entry, the tensor and the field.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open() below forever
            raise CheckpointError(f"{path}: not a regular file")
        size = st.st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: corrupted safetensors header: claims {n} bytes, over the "
                                      f"{MAX_HEADER_BYTES}-byte limit of the format")
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors header (claims {n} bytes, file has "
                                      f"{size})")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors header ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupted safetensors header (nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not an object)")
    data_len = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointError(f"{path}: corrupted header: '__metadata__' must map names to strings")
            continue

        def bad(what: str, name: str = name) -> CheckpointError:
            return CheckpointError(f"{path}: corrupted header entry for {name!r}: {what}")

        if not isinstance(entry, dict):
            raise bad("expected an object with dtype, shape and data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ST_ITEMSIZE:
            raise bad(f"'dtype' is {str(dtype)[:40]!r}, expected one of {', '.join(ST_ITEMSIZE)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"'shape' must be a list of non-negative integers, got {str(shape)[:60]}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise bad(f"'data_offsets' must be two non-negative integers [begin, end] with begin <= end, "
                      f"got {str(offsets)[:60]}")
        begin, end = offsets
        expected = math.prod(shape) * ST_ITEMSIZE[dtype]
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes, "
                                  f"its shape and dtype need {expected}")
        if end > data_len:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data "
                                  f"section, which has only {data_len} bytes")
    return header


@dataclass
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * ST_ITEMSIZE[DTYPE_TO_ST[self.dtype]]


class SafetensorsWriter:
    """Writes one safetensors file whose tensors are known (name, dtype, shape) in advance.

    The header goes out first; :meth:`write` then takes the tensors in plan order, so only one
    tensor needs to be in memory at a time.
    """

    def __init__(self, path: Path, plan: list[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path = path
        self.plan = plan
        self._next = 0
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for p in plan:
            header[p.name] = {"dtype": DTYPE_TO_ST[p.dtype], "shape": list(p.shape),
                              "data_offsets": [offset, offset + p.nbytes]}
            offset += p.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned, as safetensors does
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        p = self.plan[self._next]
        if name != p.name or tensor.dtype != p.dtype or tuple(tensor.shape) != p.shape:
            raise CheckpointError(f"{self.path}: internal error: expected {p.name} {p.dtype} {p.shape}, "
                                  f"got {name} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().cpu().reshape(-1)  # 1-D: a 0-D tensor cannot be viewed as bytes
        self._file.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.plan):
            self._file.close()
            raise CheckpointError(f"{self.path}: internal error: {len(self.plan) - self._next} tensors "
                                  "were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def shard_plan(plan: Iterable[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy sharding in order, like transformers: a tensor bigger than the limit gets its own shard."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for p in plan:
        if shards[-1] and size + p.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return [s for s in shards if s] or [[]]


def shard_names(count: int) -> Iterator[str]:
    for i in range(count):
        yield f"model-{i + 1:05d}-of-{count:05d}.safetensors"


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' / '500MiB' / 1000000 -> bytes (decimal units as in transformers)."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    if not isinstance(text, str):
        raise CheckpointError(f"--max-shard-size: {text!r} is not a size (expected e.g. 5GB, 500MB, 2GiB)")
    s = text.strip().upper().replace(" ", "")
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            number = s[: -len(unit)]
            try:
                value = float(number)
            except ValueError:
                break
            if not (math.isfinite(value) and value > 0) or value * _SIZE_UNITS[unit] < 1:
                break
            return int(value * _SIZE_UNITS[unit])
    try:
        value = int(s)
        if value > 0:
            return value
    except ValueError:
        pass
    raise CheckpointError(f"--max-shard-size: cannot read {text!r} (expected e.g. 5GB, 500MB, 2GiB)")
