"""`make demo`: what a new user runs first.

Until the served demo model lands (issue 6), this inspects the bundled Qwen3-1.7B-GPTQ-Int8-style
fixture, converts it offline with --verify, and prints the verification summary.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "qwen3-int8-g128-sym"


def main() -> int:
    if not FIXTURE.exists():
        print(f"demo: {FIXTURE} is missing (run from a full clone of the repository)", file=sys.stderr)
        return 1
    print(f"$ gptq-ascend inspect {FIXTURE.relative_to(ROOT)}")
    rc = cli_main(["inspect", str(FIXTURE)])
    if rc:
        return rc
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "qwen3-fp16"
        print(f"\n$ gptq-ascend convert {FIXTURE.relative_to(ROOT)} {out} --verify")
        rc = cli_main(["convert", str(FIXTURE), str(out), "--verify"])
    print("\nnext: `make test`, and the README's `vllm serve ... --quantization gptq_ascend` section")
    return rc


if __name__ == "__main__":
    sys.exit(main())
