"""A run dir is trusted only as far as fit wrote it (issue 21, run directories; JSON depth).

fit removes only the files it wrote, by their exact names; a checkpoint (its JSON state and its
tensors) and the config it was written under are covered by the digest it records, so an edit
between a kill and the resume is refused in one line instead of resumed into another run; a
checkpoint or stage record naming a file outside its run dir is refused (stage records: not
taken); JSON nested too deeply for Python's parser is a malformed file like any other (one
`error:` line and exit status 2 from the CLI; a stage record is not taken).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from pathlib import Path

import pytest
from conftest import extract_demo_stores, history_without_timing, pair_fit_config
from safetensors.torch import load_file
from test_redteam_fit import _KILLED, _run_script, _single_line
from test_shared_stages import _events, _trained
from typer.testing import CliRunner

from cli.stitchtrain_app import app
from featcache.errors import FeatcacheError
from stitchtrain.pipeline.fit import fit
from stitchtrain.train.config import FitConfig

DEEP = "[" * 200_000 + "]" * 200_000  # JSON nested deeper than Python's parser recurses
RUN = dict(objective="ffm", lrs=(1e-3, 5e-3), epochs=2, patience=2, batch_size=8)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust-rundir")
    return extract_demo_stores(
        root / "data", root / "stores", models=["dinov2-tiny", "clip-tiny"], layers=[2],
        shard_size=4,
    )  # fmt: skip


def _config(stores, out, **overrides) -> FitConfig:
    return pair_fit_config(stores, out, **{**RUN, **overrides})


def _digest(record: dict) -> str:
    """The documented digest of a checkpoint or stage record: SHA-256 of the record without
    its "digest", as JSON with sorted keys and no spaces."""
    body = {k: v for k, v in record.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _outcome(out: Path) -> dict:
    return {
        "stitch": load_file(str(out / "stitch.safetensors")),
        "history": history_without_timing(out),
        "metrics": json.loads((out / "metrics.json").read_text()),
    }


def _assert_same(got: dict, want: dict) -> None:
    assert got["stitch"].keys() == want["stitch"].keys()
    assert all(got["stitch"][k].equal(v) for k, v in want["stitch"].items())
    assert got["history"] == want["history"]
    assert got["metrics"] == want["metrics"]


@pytest.fixture(scope="module")
def killed(stores, tmp_path_factory):
    """An uninterrupted run ("whole": its outcome, and its run dir with stage-ffm.json), and a
    run dir SIGKILLed right after its first checkpoint (after epoch 0 of the first learning
    rate), kept as "snapshot" to be copied back to the config's out before each resume."""
    root = tmp_path_factory.mktemp("killed")
    whole = _config(stores, root / "whole")
    fit(whole)
    config = _config(stores, root / "run")
    done = _run_script(_KILLED, config, 1)
    assert done.returncode == -signal.SIGKILL, done.stderr
    state = json.loads((root / "run" / "checkpoint.json").read_text())
    assert (state["stage_index"], state["state"]["lr_index"], state["state"]["epoch"]) == (0, 0, 1)
    shutil.copytree(root / "run", root / "snapshot")
    outcome = _outcome(root / "whole")
    return {"config": config, "root": root, "whole": root / "whole", "outcome": outcome}


def _restore(killed) -> Path:
    """The killed run dir, as the kill left it, at the config's out."""
    out = Path(killed["config"].out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(killed["root"] / "snapshot", out)
    return out


def _edit_checkpoint(out: Path, edit, *, redigest: bool = False) -> None:
    record = json.loads((out / "checkpoint.json").read_text())
    edit(record)
    if redigest:
        record["digest"] = _digest(record)
    (out / "checkpoint.json").write_text(json.dumps(record))


def _checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint*"))


# -- 1. fit removes only what it wrote ----------------------------------------------------------
def test_fit_removes_only_the_checkpoint_files_it_wrote(stores, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    users = [
        "checkpoint-notes.txt",
        "checkpoint-notes.safetensors",
        "checkpoint.json.bak",
        "checkpoint-0123456789ABCDEF.safetensors",
        "checkpoint-0123456789abcdef.safetensors.bak",
        "checkpoint.json.fc-12-0badf00d-3.partial.txt",
    ]
    leftovers = [  # a kill's: fit's own names
        "checkpoint-0123456789abcdef.safetensors",
        "checkpoint.json.fc-12-0badf00d-3.partial",
        "checkpoint-0123456789abcdef.safetensors.fc-99-12345678-1.partial",
    ]
    for name in users + leftovers:
        (out / name).write_text("mine")
    fit(_config(stores, out, lrs=(1e-3,), epochs=1), checkpoint_every=0)
    assert (out / "metrics.json").is_file()
    assert _checkpoint_names(out) == sorted(users)
    assert all((out / name).read_text() == "mine" for name in users)


# -- 2. the digest covers the checkpoint and its config ------------------------------------------
@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r["state"].update(epoch=2),  # epoch 1 -> 2: the lr in progress would end
        lambda r: r["history"][0].update(val_loss=0.0),
        lambda r: r.pop("digest", None),  # a checkpoint without a digest proves nothing
    ],
    ids=["epoch", "history", "no-digest"],
)
def test_an_edited_checkpoint_is_refused_and_the_unedited_one_resumes_exactly(killed, edit):
    out = _restore(killed)
    original = (out / "checkpoint.json").read_bytes()
    _edit_checkpoint(out, edit)
    edited = (out / "checkpoint.json").read_bytes()
    with pytest.raises(FeatcacheError, match=r"Cannot resume from .*checkpoint\.json") as info:
        fit(killed["config"])
    message = str(info.value)
    _single_line(message)
    assert "digest" in message and "checkpoint-<16 hex>.safetensors" in message, message
    # nothing lost: the refusal wrote nothing, and the unedited checkpoint resumes exactly
    assert (out / "checkpoint.json").read_bytes() == edited
    assert _checkpoint_names(out) == _checkpoint_names(killed["root"] / "snapshot")
    (out / "checkpoint.json").write_bytes(original)
    fit(killed["config"])
    _assert_same(_outcome(out), killed["outcome"])
    assert _checkpoint_names(out) == []


def test_a_config_edited_between_kill_and_resume_is_refused(stores, killed):
    out = _restore(killed)
    saved = json.loads((out / "config.json").read_text())
    saved["lrs"] = [2e-3, 5e-3]
    (out / "config.json").write_text(json.dumps(saved, indent=2))
    edited = _config(stores, out, lrs=(2e-3, 5e-3))  # the command that matches the edit
    with pytest.raises(FeatcacheError, match=r"Cannot resume from .*checkpoint\.json") as info:
        fit(edited)
    message = str(info.value)
    _single_line(message)
    assert "another config" in message and "lrs" in message, message
    assert "checkpoint-<16 hex>.safetensors" in message, message
    assert _checkpoint_names(out) == _checkpoint_names(killed["root"] / "snapshot")
    # the advice works: without the checkpoint the edited config trains from the start
    for name in _checkpoint_names(out):
        (out / name).unlink()
    assert fit(edited)["stages"]["ffm"]["grid"][0]["lr"] == 2e-3


@pytest.mark.parametrize(
    "name", ["../x.safetensors", "ABSOLUTE", "sub/checkpoint-0123456789abcdef.safetensors",
             "checkpoint-notes.safetensors", "SYMLINK"],
)  # fmt: skip
def test_a_checkpoint_naming_a_tensors_file_outside_its_run_dir_is_refused(killed, name):
    out = _restore(killed)
    record = json.loads((out / "checkpoint.json").read_text())
    tensors = out / record["tensors"]["file"]
    outside = out.parent / "x.safetensors"
    shutil.copyfile(tensors, outside)
    if name == "SYMLINK":  # the plain name, but the file lies outside the run dir
        tensors.unlink()
        tensors.symlink_to(outside)
    else:
        name = str(outside) if name == "ABSOLUTE" else name
        (out / name).parent.mkdir(exist_ok=True)
        if not (out / name).exists():
            shutil.copyfile(outside, out / name)
        _edit_checkpoint(out, lambda r: r["tensors"].update(file=name), redigest=True)
    with pytest.raises(FeatcacheError, match=r"Cannot resume from .*checkpoint\.json") as info:
        fit(killed["config"])
    _single_line(str(info.value))
    assert "Expected" in str(info.value) and "inside" in str(info.value), str(info.value)


# -- 3. stage records ------------------------------------------------------------------------------
def _reuse_copy(killed, where: Path) -> Path:
    shutil.copytree(killed["whole"], where)
    return where


def _edit_record(run_dir: Path, edit, *, redigest: bool = False) -> None:
    path = run_dir / "stage-ffm.json"
    record = json.loads(path.read_text())
    edit(record)
    if redigest:
        record["digest"] = _digest(record)
    path.write_text(json.dumps(record, indent=1))


@pytest.mark.parametrize(
    ("edit", "epochs", "trained"),
    [
        (lambda r: None, 2, []),  # the unedited record is taken
        (lambda r: r["result"].update(val_loss=0.0), 2, ["ffm"]),
        (lambda r: r["history"][0].update(train_loss=0.0), 2, ["ffm"]),
        (lambda r: r["key"]["config"].update(epochs=3), 3, ["ffm"]),  # passed off as epochs=3
        (lambda r: r.pop("digest", None), 2, ["ffm"]),
    ],
    ids=["unedited", "result", "history", "key", "no-digest"],
)
def test_a_stage_record_whose_digest_does_not_cover_it_is_not_taken(
    stores, killed, tmp_path, edit, epochs, trained
):
    source = _reuse_copy(killed, tmp_path / "ffm")
    _edit_record(source, edit)
    config = _config(stores, tmp_path / "run", epochs=epochs)
    assert _trained(_events(config, [source])) == trained


@pytest.mark.parametrize("how", ["symlink", "named-outside"])
def test_a_stage_record_whose_stitch_file_lies_outside_its_run_dir_is_not_taken(
    stores, killed, tmp_path, how
):
    source = _reuse_copy(killed, tmp_path / "ffm")
    stitch = source / "stitch-ffm.safetensors"
    outside = tmp_path / "stitch-ffm.safetensors"
    shutil.copyfile(stitch, outside)
    if how == "symlink":
        stitch.unlink()
        stitch.symlink_to(outside)
    else:
        _edit_record(source, lambda r: r.update(stitch_file=f"../{outside.name}"), redigest=True)
    config = _config(stores, tmp_path / "run")
    assert _trained(_events(config, [source])) == ["ffm"]


def test_a_stage_record_nested_too_deeply_is_not_taken(stores, killed, tmp_path):
    source = _reuse_copy(killed, tmp_path / "ffm")
    (source / "stage-ffm.json").write_text(DEEP)
    config = _config(stores, tmp_path / "run")
    assert _trained(_events(config, [source])) == ["ffm"]


# -- 4. JSON nested too deeply in the run dir: one error line, exit 2 ----------------------------
@pytest.mark.parametrize("name", ["checkpoint.json", "config.json", "metrics.json"])
def test_json_nested_too_deeply_is_a_one_line_cli_error(killed, name):
    out = _restore(killed)
    (out / name).write_text(DEEP)
    config = killed["config"]
    args = ["fit", "--source", config.source, "--target", config.target, "--position", "2"]
    args += ["--out", str(out), "--objective", "ffm", "--lr", "1e-3,5e-3", "--epochs", "2"]
    args += ["--patience", "2", "--batch-size", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert name in lines[0] and "nested too deeply" in lines[0], result.output
    with pytest.raises(FeatcacheError, match=name):  # and the API raises the project's error
        fit(config)


def test_every_reader_of_a_run_dirs_config_refuses_deep_json_in_one_line(tmp_path):
    """eval and tree build read a finished run's config.json too: one error line, exit 2."""
    from cli.tree_app import tree_app

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(DEEP)
    (run / "stitch.safetensors").write_bytes(b"")  # the config is refused before it is read
    commands = [
        (app, ["eval", str(run)]),
        (tree_app, ["build", "--trunk", "dinov2-tiny", "--position", "2", "--branch", str(run),
                    "--out", str(tmp_path / "tree"), "--random-init"]),
    ]  # fmt: skip
    for command, args in commands:
        result = CliRunner().invoke(command, args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert "config.json" in lines[0] and "nested too deeply" in lines[0], result.output
    assert not (tmp_path / "tree").exists()
