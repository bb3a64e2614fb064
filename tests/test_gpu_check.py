"""The prepared device check runs end to end in smoke mode (CPU, tiny models), so it cannot rot
between GPU sessions; a step past its time box is recorded and the run goes on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STEPS = ["decode", "env", "pytest", "extract", "loader", "ffm-n2", "ffm-n14", "ffm-n22",
         "tree-2", "tree-4"]  # fmt: skip


def _check(out: Path, *extra: str) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--smoke", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / "gpu-check.json").read_text()), (out / "gpu-check.md").read_text()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    # a generous budget: this box may be shared; the 85 s default is the script's own
    return _check(tmp_path_factory.mktemp("check"), "--budget-s", "300")


def test_smoke_runs_every_step_ok(smoke):
    report, _ = smoke
    assert report["smoke"] is True
    assert [step["name"] for step in report["steps"]] == STEPS
    failed = {s["name"]: s.get("error") for s in report["steps"] if s["status"] != "ok"}
    assert not failed, failed
    for step in report["steps"]:
        assert step["seconds"] > 0 and step["peak_host_mib"] > 0, step["name"]
        assert step["result"], step["name"]
    results = {step["name"]: step["result"] for step in report["steps"]}
    assert results["pytest"]["skipped"] >= 9 and results["pytest"]["failed"] == 0  # no CUDA
    assert set(results["extract"]["rows"]) == {"one layer", "seven layers"}
    assert all(row["ratio"] > 0 for row in results["extract"]["rows"].values())
    assert results["extract"]["rows"]["one layer"]["precision_error"]["max_abs"] > 0  # bf16
    assert results["loader"]["staged_gb_per_s"] > 0 and results["loader"]["streamed_gb_per_s"] > 0
    assert [results[f"ffm-n{n}"]["position"] for n in (2, 14, 22)] == [1, 4, 5]  # of 6 blocks
    assert all(results[f"ffm-n{n}"]["predicted_speedup"] > 1 for n in (2, 14, 22))
    assert len(results["tree-4"]["encoders"]) == 4 and results["tree-4"]["precision"] == "bf16"
    assert {row["way"] for row in results["decode"]["rows"]} == {"threads", "processes"}


def test_markdown_lists_every_step_with_its_status(smoke):
    report, markdown = smoke
    for step in report["steps"]:
        assert f"| {step['name']} | {step['status']} |" in markdown
    assert "Device check (smoke" in markdown


def test_a_step_past_its_time_box_is_recorded_and_the_next_runs(tmp_path):
    report, markdown = _check(
        tmp_path, "--steps", "loader,env", "--time-box", "loader=0.01", "--budget-s", "120"
    )
    assert report["statuses"] == {"loader": "timeout", "env": "ok"}
    assert (
        "killed after" in report["steps"][0]["error"] and "time box" in report["steps"][0]["error"]
    )
    assert "### loader: timeout" in markdown
