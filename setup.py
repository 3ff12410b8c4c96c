"""Build and install gptq-ascend.

* The Python package lives in ``python/gptq_ascend``.
* The CPU kernel (``csrc/cpu``) is a torch C++ extension built with ninja: ``gptq_ascend._C``.
* The Ascend kernel library (``csrc/ascend``) is built by the top-level CMakeLists.txt with CANN's
  ascendc.cmake, and only when ``ASCEND_HOME_PATH`` points at a CANN toolkit; otherwise it is skipped
  with a message saying so (the package then uses the Triton or reference path on NPU).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def cpu_extension():
    """The CPU kernel: every .cpp under csrc/cpu, one extension, runtime ISA dispatch inside.

    No -march flag: the AVX-512 and AVX2 kernels raise their own ISA with `#pragma GCC target` in
    their translation units (kernel_avx512.cpp, kernel_avx512_vbmi.cpp, kernel_avx2.cpp) and ops.cpp
    picks one at run time, so the same build runs on any x86-64 (and compiles, with the portable kernel
    only, elsewhere).
    The C++ standard is left to torch (C++20 for torch >= 2.10). -fopenmp is required: ATen's
    at::parallel_for is an inline OpenMP loop, serial if this extension is built without it.
    """
    from torch.utils.cpp_extension import CppExtension

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    # The Makefile installs the package first with GPTQ_ASCEND_NO_EXT=1, then builds the extension in
    # place, so ninja's incremental rebuilds work and nothing is compiled twice.
    if not sources or os.environ.get("GPTQ_ASCEND_NO_EXT"):
        return None
    return CppExtension(
        name="gptq_ascend._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc" / "cpu")],
        depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.[hi]*")),
        extra_compile_args=["-O3", "-fopenmp", "-DNDEBUG", "-Wall"],
        extra_link_args=["-fopenmp"],
    )


def build_ascend() -> None:
    """The Ascend hook: build csrc/ascend (AscendC kernels + torch_npu op library) with the top-level
    CMakeLists.txt when a CANN toolkit is present, and say clearly why it is skipped otherwise.

    Needs ASCEND_HOME_PATH (CANN's set_env.sh sets it), cmake, and torch_npu importable by this Python.
    SOC_VERSION (default Ascend910B3) selects the chip. Installs lib/libgptq_ascend_{npu,kernels}.so into
    python/gptq_ascend, where gptq_ascend.backends.npu loads them. GPTQ_ASCEND_SKIP_ASCEND=1 skips it.
    """
    if os.environ.get("GPTQ_ASCEND_SKIP_ASCEND") == "1":
        print("gptq-ascend: GPTQ_ASCEND_SKIP_ASCEND=1: skipping the AscendC kernel library.", file=sys.stderr)
        return
    home = os.environ.get("ASCEND_HOME_PATH")
    if not home:
        print("gptq-ascend: ASCEND_HOME_PATH is not set: skipping the AscendC kernel library "
              "(the CPU build is unaffected; on an NPU the fused torch_npu op is used, and the Triton "
              "dequant kernel where the fused op refuses a layer).", file=sys.stderr)
        return
    status = ROOT / "python" / "gptq_ascend" / "lib" / "ascendc_build.json"
    status.parent.mkdir(parents=True, exist_ok=True)
    soc = os.environ.get("SOC_VERSION", "Ascend910B3")
    try:
        _cmake_ascend(home, soc)
        status.write_text(json.dumps({"built": True, "soc": soc, "cann": home}) + "\n")
    except Exception as e:
        # The fused torch_npu op and the Triton kernel need no custom library: the install goes on, the
        # failure is recorded for gptq_ascend.validate's report and the npu backend's reasons.
        if os.environ.get("GPTQ_ASCEND_REQUIRE_ASCENDC") == "1":
            raise
        status.write_text(json.dumps({"built": False, "soc": soc, "cann": home,
                                      "error": f"{type(e).__name__}: {e}"}) + "\n")
        print(f"gptq-ascend: WARNING: the AscendC kernel library was NOT built ({type(e).__name__}: {e}); "
              "installing without it (recorded in gptq_ascend/lib/ascendc_build.json; "
              "GPTQ_ASCEND_REQUIRE_ASCENDC=1 makes this an error).", file=sys.stderr)


def _cmake_ascend(home: str, soc: str) -> None:
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake is not on PATH")
    try:
        import torch_npu  # noqa: F401
    except Exception as e:
        missing.append(f"torch_npu is not importable ({type(e).__name__}: {e})")
    if missing:
        raise RuntimeError("ASCEND_HOME_PATH is set but " + "; ".join(missing))
    build_dir = ROOT / "build" / "ascend"
    build_dir.mkdir(parents=True, exist_ok=True)
    print(f"gptq-ascend: building the AscendC kernel library for {soc} with CANN at {home}", file=sys.stderr)
    subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DSOC_VERSION={soc}",
                           f"-DASCEND_HOME_PATH={home}", f"-DPython3_EXECUTABLE={sys.executable}",
                           "-DGPTQ_ASCEND_HOST_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release"])
    subprocess.check_call(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1)])
    subprocess.check_call(["cmake", "--install", str(build_dir), "--prefix",
                           str(ROOT / "python" / "gptq_ascend")])


def main() -> None:
    from torch.utils.cpp_extension import BuildExtension

    ext = cpu_extension()

    class Build(BuildExtension):
        def run(self):
            build_ascend()
            super().run()

    setup(
        name="gptq-ascend",
        version="0.1.0",
        description="GPTQ checkpoints on vLLM for Ascend NPUs and CPUs: online dequant kernels and an "
                    "exact offline converter",
        python_requires=">=3.10",
        package_dir={"": "python"},
        packages=find_packages("python"),
        package_data={"gptq_ascend": ["lib/*.so", "lib/*.json"]},
        ext_modules=[ext] if ext is not None else [],
        cmdclass={"build_ext": Build.with_options(use_ninja=True)},
        install_requires=["safetensors", "tqdm", "numpy"],
        extras_require={"test": ["pytest", "hypothesis", "ruff", "openai", "requests", "matplotlib"]},
        entry_points={
            "console_scripts": ["gptq-ascend = gptq_ascend.cli:main"],
            "vllm.general_plugins": ["gptq_ascend = gptq_ascend.vllm_plugin:register"],
        },
    )


if __name__ == "__main__":
    main()
