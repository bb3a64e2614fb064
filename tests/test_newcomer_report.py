"""Issue 23 (a newcomer's first hour), points 5, 6 and 10 on reports, sweeps and ``ls``:
where ``report --out`` may write and that it writes atomically; n, 95% intervals and
below-chance marks on small samples; the report's polish."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import write_sweep_dir
from typer.testing import CliRunner

from cli.experiments_app import experiments_app
from stitchtrain.studies.report.page import build_report

runner = CliRunner()


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    return write_sweep_dir(tmp_path_factory.mktemp("newcomer") / "sweep")


# -- point 6: report --out ----------------------------------------------------------------------
def test_report_refuses_a_dataset_folder_and_writes_nothing_there(sweep_dir, tmp_path):
    data = tmp_path / "shapes"
    for name in ("circle", "square"):
        (data / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / name / "01.png")
    before = _tree(data)
    result = runner.invoke(
        experiments_app,
        ["report", str(sweep_dir), "--out", str(data), "--no-cka", "--no-predictions"],
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert f"report folder {data}" in message and "circle, square" in message
    assert "choose another --out" in message
    assert _tree(data) == before  # not one file dropped there
    assert os.listdir(tmp_path) == ["shapes"]  # and no temp folder beside it


def test_report_refuses_a_folder_with_other_files_beside_a_report(sweep_dir, tmp_path):
    out = tmp_path / "report"
    build_report([sweep_dir], out, cka=False, predictions=False)
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(
        experiments_app,
        ["report", str(sweep_dir), "--out", str(out), "--no-cka", "--no-predictions"],
    )
    assert result.exit_code == 2, result.output
    assert "notes.txt" in result.output
    assert (out / "notes.txt").read_text() == "mine"


def test_rewriting_a_report_replaces_it_whole(sweep_dir, tmp_path):
    out = tmp_path / "report"
    out.mkdir()  # an empty folder is fine
    build_report([sweep_dir], out, cka=False, predictions=False)
    (out / "shapes_accuracy_old_to_gone.png").write_bytes(b"stale")  # an earlier report's plot
    (out / "shapes_accuracy_old_to_gone.csv").write_text("stale")
    result = runner.invoke(
        experiments_app,
        ["report", str(sweep_dir), "--out", str(out), "--no-cka", "--no-predictions"],
    )
    assert result.exit_code == 0, result.output
    assert not (out / "shapes_accuracy_old_to_gone.png").exists()
    assert (out / "index.html").is_file() and (out / "report.md").is_file()
    assert sorted(os.listdir(tmp_path)) == ["report"]  # no temp or old folder left


def test_a_failed_report_leaves_the_earlier_one_untouched(sweep_dir, tmp_path):
    out = tmp_path / "report"
    build_report([sweep_dir], out, cka=False, predictions=False)
    (out / "shapes_accuracy_dinov2_to_siglip2.png").write_bytes(b"the earlier report's plot")
    before = _tree(out)

    def progress(step: str, done: int, total: int) -> None:
        if step == "pages":
            raise KeyboardInterrupt  # stopped while the new report is half written

    with pytest.raises(KeyboardInterrupt):
        build_report([sweep_dir], out, cka=False, predictions=False, progress=progress)
    assert _tree(out) == before
    assert sorted(os.listdir(tmp_path)) == ["report"]
