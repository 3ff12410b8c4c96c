"""The old name of :mod:`gptq_ascend.vllm_cpu_shim`, kept only so that existing shims keep working.

``vllm`` scripts installed by ``--install-shim`` before the rename run ``from gptq_ascend.serve import
main``. ``python -m gptq_ascend.vllm_cpu_shim --install-shim`` (which ``make`` runs whenever it installs the
package) rewrites such a script to the new name; once no environment holds an old shim, this module can
go.
"""

from __future__ import annotations

import sys

from .vllm_cpu_shim import _cli, main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
