"""What this machine has for the Ascend paths: torch_npu, an NPU, its SoC, vector cores, triton-ascend.

Every probe answers ``(ok, reason)`` or a value with a documented fallback, and never raises: the
backends turn the reasons into ``available()`` answers and the hardware report (``gptq_ascend.validate``)
prints them.
"""

from __future__ import annotations

import torch

from .tiling import VECTOR_CORES_910B3


def import_torch_npu():
    """(torch_npu, "") or (None, why it does not import)."""
    try:
        import torch_npu  # noqa: F401

        return torch_npu, ""
    except Exception as e:  # ImportError, or a torch_npu built for another torch / without CANN
        return None, f"torch_npu is not importable ({type(e).__name__}: {e})"


def npu_status() -> tuple[bool, str]:
    """(True, "") when torch_npu imports and an NPU is visible, else (False, what is missing)."""
    torch_npu, why = import_torch_npu()
    if torch_npu is None:
        return False, why
    try:
        if not torch.npu.is_available():
            return False, "torch_npu is installed but no NPU device is visible (driver, ASCEND_RT_VISIBLE_DEVICES?)"
    except Exception as e:
        return False, f"torch.npu.is_available() failed ({type(e).__name__}: {e})"
    return True, ""


def npu_count() -> int:
    """Visible NPUs (0 without torch_npu or a device)."""
    if not npu_status()[0]:
        return 0
    try:
        return int(torch.npu.device_count())
    except Exception:
        return 0


def default_device() -> torch.device:
    from ...errors import BackendError

    ok, why = npu_status()
    if not ok:
        raise BackendError(f"npu backend: {why}")
    return torch.device("npu", torch.npu.current_device())


def soc_name(device: torch.device | int | None = None) -> str | None:
    """The SoC name torch_npu reports (e.g. "Ascend910B3"), or None without an NPU."""
    ok, _ = npu_status()
    if not ok:
        return None
    try:
        return str(torch.npu.get_device_name(device))
    except Exception:
        return None


def soc_family(name: str | None) -> str:
    """"a2a3" (910B/910C: per-group and int4), "310p" (per-channel int8 only), "unknown" (no NPU
    name: limits checked as for A2/A3) or "other" (op not documented)."""
    if not name:
        return "unknown"
    n = name.lower().replace(" ", "").replace("_", "")
    if "910b" in n or "91093" in n or "910c" in n:
        return "a2a3"
    if "310p" in n:
        return "310p"
    return "other"


_cores: tuple[int, str] | None = None


def vector_cores_and_source() -> tuple[int, str]:
    """Vector cores of the current NPU and where the number came from: torch_npu's device properties
    when they carry ``vector_core_num``, else ``torch.npu.get_device_limit`` (torch_npu 2.13's
    npu_config.py returns ``vector_core_num`` there), else the 910B3's 40 (the AscendC launcher asks ACL
    itself)."""
    global _cores
    if _cores is None:
        _cores = (VECTOR_CORES_910B3, "default (910B3)")
        try:
            dev = torch.npu.current_device()
            n = int(getattr(torch.npu.get_device_properties(dev), "vector_core_num", 0) or 0)
            if n > 0:
                _cores = (n, "torch.npu.get_device_properties().vector_core_num")
            elif hasattr(torch.npu, "get_device_limit"):
                n = int(torch.npu.get_device_limit(dev).get("vector_core_num", 0) or 0)
                if n > 0:
                    _cores = (n, "torch.npu.get_device_limit()['vector_core_num']")
        except Exception:
            pass
    return _cores


def vector_cores() -> int:
    return vector_cores_and_source()[0]


def triton_ascend_status() -> tuple[bool, str]:
    """Whether Triton imports and has its Ascend backend (triton-ascend), regardless of a device."""
    from .triton_dequant import available

    ok, why = available()
    if not ok:
        return False, why
    try:
        from triton.backends import backends as triton_backends

        if "ascend" not in triton_backends:
            return False, f"triton has no ascend backend (triton-ascend is not installed; backends: " \
                          f"{', '.join(sorted(triton_backends)) or 'none'})"
    except Exception as e:
        return False, f"cannot list triton backends ({type(e).__name__}: {e})"
    return True, ""


def npu_triton_status() -> tuple[bool, str]:
    """The Triton dequant path on an NPU: triton-ascend plus a visible NPU."""
    ok, why = triton_ascend_status()
    if not ok:
        return False, why
    return npu_status()
