"""The ascend toolchain (triton-ascend + ascendnpu-ir, no CANN, no NPU) as the tests use it.

``compile_dequant_kernel`` runs triton-ascend's real compiler for an Ascend SoC: TTIR -> linalg
(triton-adapter-opt) -> bishengir-compile (HFusion/HIVM: UB planning, sync insertion) -> hivmc. hivmc ships
only with the CANN toolkit, so on these machines the pipeline stops there with "External hivmc run
fails"; every error before that (UB overflow, lowering failures) is real and is reported as such.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

REQUIRE_ENV = "GPTQ_ASCEND_REQUIRE_TOOLCHAIN"
HIVMC_ERROR = "External hivmc run fails"


def bishengir_dir() -> Path | None:
    found = shutil.which("bishengir-compile")
    if found:
        return Path(found).parent
    try:
        import ascendnpuir
    except Exception:
        return None
    d = Path(ascendnpuir.__file__).resolve().parent / "bin"
    return d if (d / "bishengir-compile").exists() else None


def status() -> tuple[bool, str]:
    try:
        import triton
        from triton.backends import backends
    except Exception as e:
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    if "ascend" not in backends:
        return False, (f"triton {triton.__version__} has no ascend backend (triton-ascend is not installed "
                       "here; `make test-ascend` runs these tests in .venv-ascend)")
    if bishengir_dir() is None:
        return False, "bishengir-compile not found (ascendnpu-ir is not installed)"
    return True, ""


def require():
    """Skip (or, under `make test-ascend`, fail) when the toolchain is missing."""
    ok, why = status()
    if not ok:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but the ascend toolchain is missing: {why}")
        pytest.skip(why)


@dataclass
class CompileResult:
    compiled: bool        # the whole pipeline ran (only possible with CANN's hivmc on PATH)
    stopped_at_hivmc: bool
    log: str              # bishengir-compile's stderr + stdout, or the exception text


class _StubNPUUtils:
    """The npubin stage asks the NPU driver for the arch; with no driver, answer it ourselves."""

    arch = "Ascend910B3"

    def get_arch(self):
        return self.arch


def _compile_here(fn, signature: dict, constants: dict, arch: str, workdir: Path) -> CompileResult:
    """In THIS process (a fresh one: Triton's interpreter, once used, leaves triton.language patched)."""
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ["PATH"] = f"{bishengir_dir()}{os.pathsep}{os.environ.get('PATH', '')}"
    fake_home = workdir / "no-cann"      # bishengir-compile insists on the variable, not on a toolkit
    fake_home.mkdir(parents=True, exist_ok=True)
    os.environ["ASCEND_HOME_PATH"] = str(fake_home)
    os.environ["TRITON_CACHE_DIR"] = str(workdir / "triton-cache")
    stub = type("StubNPUUtils", (_StubNPUUtils,), {"arch": arch})
    backends["ascend"].compiler.add_stages.__globals__["NPUUtils"] = stub
    try:
        triton.compile(ASTSource(fn, signature, constants=constants), target=GPUTarget("npu", arch, 0))
        return CompileResult(True, False, "")
    except Exception as e:
        cause = e.__cause__ or e.__context__ or e
        parts = []
        for stream in ("stderr", "stdout"):
            data = getattr(cause, stream, None)
            if data:
                parts.append(data.decode(errors="replace") if isinstance(data, bytes) else str(data))
        log = "\n".join(parts) or f"{type(e).__name__}: {e}\n{type(cause).__name__}: {cause}"
        return CompileResult(False, HIVMC_ERROR in log, log)


def compile_dequant_kernel(k: int, n: int, bits: int, group_size: int, dtype: str, ub_bytes: int, arch: str,
                           workdir: Path) -> CompileResult:
    """Compile gptq_ascend's Triton dequant kernel for one plan, in a child Python process."""
    root = Path(__file__).resolve().parents[2]
    args = [str(x) for x in (k, n, bits, group_size, dtype, ub_bytes, arch, workdir)]
    r = subprocess.run([sys.executable, "-m", "tests.ascend.toolchain", *args], cwd=root, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        return CompileResult(False, False, f"compile helper failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return CompileResult(**json.loads(r.stdout.strip().splitlines()[-1]))


def _main(argv: list[str]) -> None:
    import torch

    from gptq_ascend.backends.ascend import tiling
    from gptq_ascend.backends.ascend import triton_dequant as td

    k, n, bits, group, dtype_name, ub, arch, workdir = argv
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    plan = tiling.plan_tiling(int(k), int(n), int(bits), int(group), 2, tiling.VECTOR_CORES_910B3, int(ub))
    _, const = td.kernel_launch_args(plan, dtype)
    sig = {"qweight_ptr": "*i32", "zeros_ptr": "*fp16", "scales_ptr": "*fp16",
           "out_ptr": {"float16": "*fp16", "bfloat16": "*bf16"}[dtype_name]}
    for name in td._gptq_dequant_kernel.arg_names[4:]:
        sig[name] = "constexpr" if name in const else "i32"
    result = _compile_here(td._gptq_dequant_kernel, sig, const, arch, Path(workdir))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    _main(sys.argv[1:])
