#!/usr/bin/env bash
# Create (or reuse) .venv-ascend: the toolchain venv for the Ascend checks that can run WITHOUT an NPU.
#
#   tools/setup_ascend_venv.sh            # create/refresh ./.venv-ascend
#   ASCEND_VENV=/path tools/setup_ascend_venv.sh
#
# It holds the CPU torch, triton-ascend (Triton's Ascend backend) and ascendnpu-ir (bishengir-compile),
# which is enough to run the Triton dequant kernel under TRITON_INTERPRET=1 and to compile it for
# Ascend910B up to the last stage (hivmc, which only ships with the CANN toolkit). It does NOT contain
# torch_npu or CANN: nothing in this venv touches an NPU.
#
# Vanilla `triton` must not sit beside triton-ascend (both provide the `triton` package); torch's CPU
# wheel does not pull it, and the script removes it if something else did.
#
# The gptq_ascend sources are put on sys.path with a .pth file (no build of the CPU extension here).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ASCEND_VENV:-$ROOT/.venv-ascend}"
PY="${PYTHON:-python3}"

# Pinned versions: these are the ones verified on the build machine (see docs/ascend.md).
TORCH_VERSION=2.13.0
TRITON_ASCEND_VERSION=3.2.0
ASCENDNPU_IR_VERSION=1.2.0
PYBIND11_VERSION=3.1.0
PYTEST_VERSION=9.2.0
NUMPY_VERSION=2.3.5

want="torch=${TORCH_VERSION} triton-ascend=${TRITON_ASCEND_VERSION} ascendnpu-ir=${ASCENDNPU_IR_VERSION} pybind11=${PYBIND11_VERSION}"
stamp="$VENV/.gptq-ascend-stamp"

if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "setup_ascend_venv: $VENV is up to date ($want)"
    touch "$stamp"   # for make: the stamp is newer than this script
    exit 0
fi

start=$(date +%s)
echo "setup_ascend_venv: creating $VENV ($want)"
"$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --no-input --progress-bar off)
# torch: the CPU build. On the project's machines pip resolves torch==2.13.0 to the local +cpu wheel;
# elsewhere pass the CPU index, e.g. TORCH_INDEX_ARGS="--index-url <pytorch cpu index>".
"${pip[@]}" ${TORCH_INDEX_ARGS:-} "torch==${TORCH_VERSION}" | tail -n 1
"$VENV/bin/python" - <<'EOF'
import torch, sys
if torch.version.cuda is not None:
    sys.exit(f"setup_ascend_venv: got a CUDA torch build ({torch.__version__}); the CPU build is expected")
print("setup_ascend_venv: torch", torch.__version__)
EOF
"${pip[@]}" "triton-ascend==${TRITON_ASCEND_VERSION}" "ascendnpu-ir==${ASCENDNPU_IR_VERSION}" \
    "pybind11==${PYBIND11_VERSION}" "pytest==${PYTEST_VERSION}" "numpy==${NUMPY_VERSION}" \
    hypothesis safetensors tqdm | tail -n 1
# Vanilla triton would shadow triton-ascend's `triton` package.
if "$VENV/bin/python" -m pip show triton >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip uninstall -y triton
    "${pip[@]}" --force-reinstall --no-deps "triton-ascend==${TRITON_ASCEND_VERSION}" | tail -n 1
fi
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$ROOT/python" > "$site/gptq_ascend_src.pth"

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md, shutil, sys
import triton
from triton.backends.compiler import GPUTarget  # noqa: F401
from triton.backends import backends
if "ascend" not in backends:
    sys.exit(f"setup_ascend_venv: triton at {triton.__file__} has no ascend backend ({sorted(backends)})")
import pathlib
import ascendnpuir
compiler = pathlib.Path(ascendnpuir.__file__).resolve().parent / "bin" / "bishengir-compile"
if not compiler.exists() and shutil.which("bishengir-compile") is None:
    sys.exit("setup_ascend_venv: bishengir-compile not found (ascendnpu-ir is incomplete)")
print("setup_ascend_venv: bishengir-compile at", compiler)
import gptq_ascend  # noqa: F401
print("setup_ascend_venv: triton-ascend", md.version("triton-ascend"), "ascendnpu-ir", md.version("ascendnpu-ir"))
EOF
echo "$want" > "$stamp"
echo "setup_ascend_venv: done in $(( $(date +%s) - start )) s"
