"""Safe reading of Hugging Face checkpoints, and a streaming safetensors writer.

Reading: safetensors only by default (a pickle ``.bin`` checkpoint is refused unless the caller opts
in, and then loaded with ``torch.load(weights_only=True)``); index files are checked so that no entry
points outside the model folder or at a missing shard; truncated or corrupted files are reported by
name. Writing: :class:`SafetensorsWriter` writes a file whose header is planned up front, so tensors
are produced and written one at a time and memory stays bounded by the largest tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError
from .format import GPTQTensors

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def _inside(folder: Path, name: str, index_path: Path) -> Path:
    """Resolve an index entry, refusing anything that escapes the model folder."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index_path}: shard name {name!r} is not a file name")
    candidate = (folder / name).resolve()
    root = folder.resolve()
    if os.path.isabs(name) or candidate.parent != root and root not in candidate.parents:
        raise CheckpointError(f"{index_path}: shard {name!r} points outside the model folder {folder}")
    return candidate


@dataclass
class Checkpoint:
    """The tensors of a model folder: which file holds each one, read lazily one tensor at a time."""

    folder: Path
    files: list[Path]
    tensor_file: dict[str, Path]
    pickled: bool = False
    _pickle_cache: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, folder: str | Path, allow_pickle: bool = False) -> Checkpoint:
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a directory")
        index = folder / INDEX_NAME
        if index.exists():
            return cls._from_index(folder, index)
        single = folder / SINGLE_NAME
        files = [single] if single.exists() else sorted(folder.glob("*.safetensors"))
        if files:
            return cls._from_files(folder, files)
        pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))
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
    def _from_index(cls, folder: Path, index: Path) -> Checkpoint:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: malformed JSON ({e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: expected a non-empty 'weight_map' object")
        tensor_file: dict[str, Path] = {}
        files: dict[Path, None] = {}
        for tensor, shard in weight_map.items():
            path = _inside(folder, shard, index)
            if not path.is_file():
                raise CheckpointError(f"{index}: shard {shard!r} (holding {tensor!r}) is missing")
            tensor_file[tensor] = path
            files[path] = None
        ckpt = cls(folder, list(files), tensor_file)
        # The index may be stale: every tensor it names must be in the shard it names.
        for path in ckpt.files:
            names = set(ckpt._header_names(path))
            for tensor, p in tensor_file.items():
                if p == path and tensor not in names:
                    raise CheckpointError(f"{index}: {tensor!r} is listed in {path.name} but not stored there")
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

    def _header_names(self, path: Path) -> list[str]:
        """Names stored in a safetensors file, after checking that the file is whole."""
        header = read_safetensors_header(path)
        return [k for k in header if k != "__metadata__"]

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
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:  # safetensors raises SafetensorError / OSError
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype string, shape) without reading the data."""
        path = self.tensor_file[name]
        if self.pickled:
            t = self._load_pickle(path)[name]
            return DTYPE_TO_ST[t.dtype], tuple(t.shape)
        entry = read_safetensors_header(path)[name]
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


def read_safetensors_header(path: Path) -> dict:
    """The parsed header, after checking that every tensor's bytes lie within the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: corrupted or truncated safetensors header "
                                      f"(claims {n} bytes, file has {size})")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not an object)")
    data_len = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            count = 1
            for d in entry["shape"]:
                count *= int(d)
            expected = count * ST_ITEMSIZE[entry["dtype"]]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupted header entry for {name!r} ({e!r})") from None
        if end - begin != expected or begin < 0:
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
        data = tensor.detach().contiguous().cpu()
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
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            number = s[: -len(unit)]
            try:
                value = float(number)
            except ValueError:
                break
            if value <= 0:
                break
            return int(value * _SIZE_UNITS[unit])
    try:
        value = int(s)
        if value > 0:
            return value
    except ValueError:
        pass
    raise CheckpointError(f"--max-shard-size: cannot read {text!r} (expected e.g. 5GB, 500MB, 2GiB)")
