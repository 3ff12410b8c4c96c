"""``python -m gptq_ascend.validate`` (``make npu-check``) on a machine without an NPU: it runs, writes the
markdown + JSON report, and every hardware item says SKIPPED with the reason -- never PASS.

And the install side of the same promise: when the AscendC library fails to build under CANN, setup.py
still succeeds, records the failure, and the npu backend's reason (and so the report) names it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptq_ascend.backends.ascend import device

ROOT = Path(__file__).resolve().parents[2]
HARDWARE_ITEMS = {"ascendc-library", "kernel-tests", "engine-tests", "dequant-benchmark", "e2e-graph", "e2e-eager"}


@pytest.mark.skipif(device.npu_status()[0], reason="an NPU is visible: this checks the no-NPU report")
def test_report_without_npu_says_skipped_not_passed(tmp_path):
    model = next(p for p in sorted((ROOT / "tests" / "fixtures").iterdir()) if (p / "config.json").exists())
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "gptq_ascend.validate", "--out", str(out), "--model", str(model)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 3, r.stdout + r.stderr        # 3: nothing failed, something skipped
    report = json.loads((out / "npu-report.json").read_text())
    items = {i["id"]: i for i in report["items"]}
    assert set(items) == HARDWARE_ITEMS | {"environment"}
    why = device.npu_status()[1]
    for name in HARDWARE_ITEMS:
        assert items[name]["status"] == "SKIPPED", items[name]
        assert items[name]["reason"] == f"no NPU: {why}"
    assert items["environment"]["status"] == "INFO"
    assert items["environment"]["details"]["npu_count"] == 0
    assert report["summary"] == {"PASS": 0, "FAIL": 0, "SKIPPED": len(HARDWARE_ITEMS)}
    assert report["verdict"].startswith("NOT VALIDATED")
    md = (out / "npu-report.md").read_text()
    assert "**PASS**" not in md and md.count("**SKIPPED**") == len(HARDWARE_ITEMS)
    assert f"0 passed, 0 failed, {len(HARDWARE_ITEMS)} skipped" in md


def _setup_module():
    spec = importlib.util.spec_from_file_location("gptq_ascend_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_failed_ascendc_build_does_not_fail_the_install(tmp_path, monkeypatch):
    """ASCEND_HOME_PATH set but the library cannot be built (here: no torch_npu, or cmake fails): the
    build hook records why in lib/ascendc_build.json and returns; GPTQ_ASCEND_REQUIRE_ASCENDC=1 raises."""
    setup = _setup_module()
    monkeypatch.setattr(setup, "ROOT", tmp_path)
    monkeypatch.setenv("ASCEND_HOME_PATH", str(tmp_path / "cann"))
    monkeypatch.delenv("GPTQ_ASCEND_SKIP_ASCEND", raising=False)
    monkeypatch.delenv("GPTQ_ASCEND_REQUIRE_ASCENDC", raising=False)
    setup.build_ascend()
    record = json.loads((tmp_path / "python" / "gptq_ascend" / "lib" / "ascendc_build.json").read_text())
    assert record["built"] is False and record["cann"] == str(tmp_path / "cann")
    assert record["error"], record
    monkeypatch.setenv("GPTQ_ASCEND_REQUIRE_ASCENDC", "1")
    with pytest.raises((RuntimeError, OSError, subprocess.CalledProcessError)):
        setup.build_ascend()


def test_recorded_build_failure_is_the_reason_given(tmp_path, monkeypatch):
    from gptq_ascend.backends.ascend import dequant

    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "ascendc_build.json").write_text(json.dumps(
        {"built": False, "soc": "Ascend910B3", "cann": "/usr/local/Ascend/ascend-toolkit/latest",
         "error": "CalledProcessError: cmake exited 1"}))
    monkeypatch.setattr(dequant, "ascendc_library_path", lambda: lib / dequant.LIB_NAME)
    why = dequant.library_build_failure()
    assert "failed to build for Ascend910B3" in why and "cmake exited 1" in why
    assert "need no custom library" in why
