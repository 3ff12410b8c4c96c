"""The ascend toolchain (triton-ascend + ascendnpu-ir, no CANN, no NPU) as the tests use it.

``compile_for_ascend`` runs triton-ascend's real compiler for an Ascend SoC: TTIR -> linalg
(triton-adapter-opt) -> bishengir-compile (HFusion/HIVM: UB planning, sync insertion) -> hivmc. hivmc ships
only with the CANN toolkit, so on these machines the pipeline stops there with "External hivmc run
fails"; every error before that (UB overflow, lowering failures) is real and is reported as such.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
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


def compile_for_ascend(fn, signature: dict, constants: dict, arch: str, monkeypatch, tmp_path) -> CompileResult:
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("PATH", f"{bishengir_dir()}{os.pathsep}{os.environ.get('PATH', '')}")
    fake_home = tmp_path / "no-cann"      # bishengir-compile insists on the variable, not on a toolkit
    fake_home.mkdir(exist_ok=True)
    monkeypatch.setenv("ASCEND_HOME_PATH", str(fake_home))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    stub = type("StubNPUUtils", (_StubNPUUtils,), {"arch": arch})
    monkeypatch.setitem(backends["ascend"].compiler.add_stages.__globals__, "NPUUtils", stub)
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
