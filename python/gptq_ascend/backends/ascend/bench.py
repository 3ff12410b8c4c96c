"""The NPU columns of ``python -m benchmarks.dequant --device npu``: one layer packed for every path.

Each path is forced (``repack_npu(mode=...)``) so the fused op, the AscendC kernel and the Triton kernel
are timed as separate columns on the same weights, beside the automatically chosen path (``ours``) and
dense FP16 ``torch.matmul``. A path that cannot run here is reported with its reason, never dropped
silently.
"""

from __future__ import annotations

import torch

from ... import format as fmt
from ...errors import BackendError
from ...ops import PackedWeight

PATH_COLUMNS = ("fused", "ascendc", "triton")


def pack_every_path(t: fmt.GPTQTensors, spec: fmt.QuantSpec, in_features: int,
                    device: torch.device) -> dict[str, PackedWeight | str]:
    """Per path in PATH_COLUMNS: the layer packed for it on ``device``, or why that path is unavailable."""
    from ..npu import repack_npu

    out: dict[str, PackedWeight | str] = {}
    for path in PATH_COLUMNS:
        try:
            out[path] = repack_npu(t, spec, in_features, mode=path, device=device)
        except BackendError as e:
            out[path] = str(e)
    return out


def run_path(path: str, x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """One call of ``path`` (asynchronous on the NPU: the caller synchronizes)."""
    from ..npu import gemm_packed

    return gemm_packed(x, packed, None, None if path == "fused" else path)
