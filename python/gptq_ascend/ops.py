"""The op contract every backend implements, and the choice of backend.

Three operations, the same on every device:

* ``repack(tensors, spec, in_features) -> PackedWeight``: once, at load time, from the checkpoint's
  GPTQ tensors into whatever layout the backend's kernel streams best. Act-order checkpoints are
  handled here: K is permuted once (``format.act_order_perm``) and ``PackedWeight.perm`` records it.
* ``gemm(x, packed, bias) -> y``: ``y = x @ W + bias`` for ``x`` of shape ``[..., K]``; ``y`` has
  shape ``[..., N]`` and ``x``'s dtype; accumulation in float32. ``W`` is what
  ``format.dequantize`` defines. ``bias`` may be None.
* ``dequant(packed, dtype) -> W``: ``[K, N]`` in the ORIGINAL (checkpoint) K order.

A backend also says whether it can run at all on this machine (``available``) and whether it can
take a given layer (``can_implement``), each with the reason when it cannot, so callers can log why
a layer went elsewhere.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from .errors import BackendError
from .format import GPTQTensors, QuantSpec

logger = logging.getLogger(__name__)


@dataclass
class PackedWeight:
    """A layer's weights in a backend's layout. ``tensors`` are backend-private."""

    backend: str
    spec: QuantSpec
    in_features: int
    out_features: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    perm: torch.Tensor | None = None  # int64 [K]: x[..., perm] feeds the kernel (act-order)


class Backend(ABC):
    """One implementation of the op contract."""

    name: str = ""

    @abstractmethod
    def available(self) -> tuple[bool, str]:
        """(True, "") when this backend can run here, else (False, why not)."""

    @abstractmethod
    def can_implement(self, spec: QuantSpec, in_features: int, out_features: int) -> tuple[bool, str]:
        """(True, "") when this backend takes a layer of these settings and shape, else why not."""

    def describe(self) -> str:
        """What this backend will run on this machine (e.g. the CPU kernel tier and why), for the log."""
        return ""

    @abstractmethod
    def repack(self, t: GPTQTensors, spec: QuantSpec, in_features: int) -> PackedWeight:
        ...

    @abstractmethod
    def gemm(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        ...

    @abstractmethod
    def dequant(self, packed: PackedWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        ...


def check_gemm_args(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None,
                    dtypes: tuple[torch.dtype, ...], device_type: str) -> None:
    """The argument checks every backend's ``gemm`` shares, with errors that say what was expected."""
    if x.dtype not in dtypes:
        raise BackendError(f"{packed.backend} gemm: x has dtype {x.dtype}; expected one of {dtypes}")
    if x.device.type != device_type:
        raise BackendError(f"{packed.backend} gemm: x is on {x.device}; expected a {device_type} tensor")
    if x.dim() < 1 or x.shape[-1] != packed.in_features:
        raise BackendError(f"{packed.backend} gemm: x has shape {tuple(x.shape)}; expected [..., "
                           f"{packed.in_features}] (in_features)")
    if bias is not None and tuple(bias.shape) != (packed.out_features,):
        raise BackendError(f"{packed.backend} gemm: bias has shape {tuple(bias.shape)}; expected "
                           f"({packed.out_features},)")


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    _load_builtin_backends()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def backends() -> dict[str, Backend]:
    _load_builtin_backends()
    return dict(_REGISTRY)


# Preference order per device type: the first available backend that can implement a layer wins.
PREFERENCE = {
    "cpu": ("cpu", "reference"),
    "npu": ("npu", "npu_triton", "reference"),
}


def choose_backend(device_type: str, spec: QuantSpec, in_features: int, out_features: int,
                   prefer: str | None = None) -> tuple[Backend, str]:
    """The backend for a layer, and a sentence saying why it was chosen (for the log)."""
    _load_builtin_backends()
    order = (prefer,) if prefer else PREFERENCE.get(device_type, ("reference",))
    refusals = []
    for name in order:
        backend = _REGISTRY.get(name)
        if backend is None:
            refusals.append(f"{name}: not built into this install")
            continue
        ok, why = backend.available()
        if ok:
            ok, why = backend.can_implement(spec, in_features, out_features)
        if ok:
            reason = f"{name} backend on {device_type}"
            detail = backend.describe()
            if detail:
                reason += f" [{detail}]"
            if refusals:
                reason += " (skipped " + "; ".join(refusals) + ")"
            return backend, reason
        refusals.append(f"{name}: {why}")
    raise BackendError(f"no backend can run a {spec.bits}-bit layer ({in_features}->{out_features}) on "
                       f"{device_type}: " + "; ".join(refusals))


_loaded = False


def _load_builtin_backends() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from .backends import load_all

    load_all()
