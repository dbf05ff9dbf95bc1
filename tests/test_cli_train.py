"""``tensorgraph train`` and ``tensorgraph sample``: outputs, resume, and every bad input (one line, exit 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tensorgraph.cli import main
from tensorgraph.makemore.data import load_words

TINY = ["--steps", "40", "--hidden", "16", "--eval-every", "20", "--quiet", "--no-render"]


@pytest.fixture(scope="module")
def words_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "names300.txt"
    path.write_text("\n".join(load_words()[:300]) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, words_file):
    """One small run through the CLI, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run") / "a"
    code = main(["train", "--steps", "60", "--hidden", "16", "--seed", "1", "--data", str(words_file), "--out",
                 str(out), "--json", "--quiet", "--eval-every", "20", "--samples", "5"])
    assert code == 0
    return out


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_writes_its_outputs(tmp_path, words_file, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(capsys, "train", "--steps", "50", "--hidden", "16", "--data", words_file,
                                   "--out", out, "--json", "--eval-every", "25")
    assert code == 0, stderr
    line = stdout.strip()
    assert "\n" not in line  # --json: stdout is the one JSON line; the summary went to stderr
    metrics = json.loads(line)
    assert set(metrics) == {"train_loss", "val_loss", "steps", "seconds", "backend"}
    assert metrics["steps"] == 50 and metrics["backend"] == "engine" and 1.0 < metrics["val_loss"] < 4.0
    assert {"model.pt", "loss.png", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["val_loss"] == metrics["val_loss"] and len(saved["samples"]) == 20
    assert [h["step"] for h in saved["history"]] == [25, 50]
    if saved["files"].get("graph"):  # the picture of one step, when Graphviz and tensorgraph.render are there
        assert Path(saved["files"]["graph"]).stat().st_size > 1000
    else:
        assert saved["notes"] and saved["notes"][0].startswith("graph picture skipped")
    assert "train loss" in stderr and "samples:" in stderr


def test_sample_is_reproducible(trained, capsys):
    code, first, err = run_cli(capsys, "sample", "--checkpoint", trained / "model.pt", "--n", 7)
    assert code == 0, err
    assert len(first.splitlines()) == 7
    _, second, _ = run_cli(capsys, "sample", "--checkpoint", trained / "model.pt", "--n", 7)
    _, other, _ = run_cli(capsys, "sample", "--checkpoint", trained / "model.pt", "--n", 7, "--seed", 5)
    assert first == second and first != other
    # the default seed is the training seed + 10, as the lecture samples, and train printed those names
    metrics = json.loads((trained / "metrics.json").read_text())
    _, five, _ = run_cli(capsys, "sample", "--checkpoint", trained / "model.pt", "--n", 5)
    assert five.split() == metrics["samples"]


def test_resume_continues(trained, tmp_path, words_file, capsys):
    out = tmp_path / "resumed"
    code, stdout, err = run_cli(capsys, "train", "--resume", trained / "model.pt", "--steps", 80, "--out", out,
                                "--json", "--quiet", "--no-render")
    assert code == 0, err
    assert json.loads(stdout)["steps"] == 80
    data = torch.load(out / "model.pt", weights_only=True)
    assert data["step"] == 80 and data["config"]["n_hidden"] == 16 and len(data["losses"]) == 80
    assert "note: the learning rate already decayed at step 30" in err  # shown even with --quiet


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps: expected a positive integer, got 0"),
    (["--steps", "-3"], "--steps: expected a positive integer"),
    (["--steps", "lots"], "--steps: expected a positive integer, got 'lots'"),
    (["--batch", "1"], "tensorgraph train: error: argument --batch: expected at least 2 (batchnorm's variance needs "
                       "two examples), got 1"),  # it said "tensorgraph: error: batch_size must ...", not the option
    (["--hidden", "0"], "--hidden: expected a positive integer"),
    (["--lr", "0"], "--lr: expected a positive number"),
    (["--lr", "nan"], "--lr: expected a positive number"),
    (["--seed", "-1"], "--seed: expected a seed"),
    (["--backend", "jax"], "invalid choice: 'jax'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--samples", "-2"], "--samples"),
    (["--data", "{tmp}/missing.txt"], "data file not found: {tmp}/missing.txt"),
    (["--data", "{tmp}"], "data file is a directory"),
    (["--data", "{tmp}/empty.txt"], "data file is empty: {tmp}/empty.txt"),
    (["--data", "{tmp}/latin1.txt"], "{tmp}/latin1.txt:3: not valid UTF-8"),
    (["--data", "{tmp}/spaces.txt"], "{tmp}/spaces.txt:2: expected one word per line"),
    (["--data", "{tmp}/dots.txt"], "{tmp}/dots.txt:1: '.' is reserved"),
    (["--data", "{tmp}/few.txt"], "too few words"),
    (["--resume", "{tmp}/missing.pt"], "checkpoint not found: {tmp}/missing.pt"),
    (["--resume", "{tmp}/junk.pt"], "not a tensorgraph checkpoint"),
    (["--out", "{tmp}/few.txt"], "exists and is not a folder"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, argv, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "latin1.txt").write_bytes("anna\nbob\nzo\xeb\n".encode("latin-1"))
    (tmp_path / "spaces.txt").write_text("anna\nmary ann\n")
    (tmp_path / "dots.txt").write_text("a.b\n")
    (tmp_path / "few.txt").write_text("anna\nbob\ncyd\n")
    (tmp_path / "junk.pt").write_bytes(os.urandom(300))
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, stdout, stderr = run_cli(capsys, "train", "--out", tmp_path / "out", "--quiet", *argv)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert message.format(tmp=tmp_path) in stderr
    assert not (tmp_path / "out" / "model.pt").exists()


@pytest.mark.parametrize("argv, message", [
    (["check", "learner.py", "--anwser"],
     "tensorgraph check: error: unrecognized arguments: --anwser (did you mean --answer?)"),
    (["train", "--hiden", "16"],
     "tensorgraph train: error: unrecognized arguments: --hiden 16 (did you mean --hidden?)"),
    (["render", "--out", "x.svg", "--gards"],
     "tensorgraph render: error: unrecognized arguments: --gards (did you mean --grads?)"),
    (["derive", "batchnorm", "--frobnicate"], "tensorgraph derive: error: unrecognized arguments: --frobnicate\n"),
])
def test_a_misspelt_option_names_the_command_and_the_option_meant(capsys, argv, message):
    """A typo in an option said "tensorgraph: error: unrecognized arguments: --anwser": not which command's
    options were read, nor the option meant."""
    code, stdout, stderr = run_cli(capsys, *argv)
    assert code == 2 and stdout == ""
    assert stderr == message if message.endswith("\n") else stderr == message + "\n", stderr


@pytest.mark.parametrize("argv, prog", [
    (["train", "--data", "{tmp}/missing.txt"], "tensorgraph train"),
    (["train", "--resume", "{tmp}/missing.pt"], "tensorgraph train"),
    (["sample", "--checkpoint", "{tmp}/missing.pt"], "tensorgraph sample"),
])
def test_errors_from_a_command_name_the_command(tmp_path, capsys, argv, prog):
    """A command's own errors (a data file, a checkpoint) said "tensorgraph: error:", argparse's "tensorgraph train:
    error:"; both now name the command."""
    code, _, stderr = run_cli(capsys, *[a.format(tmp=tmp_path) for a in argv], *(["--quiet"] * (argv[0] == "train")))
    assert code == 2 and stderr.startswith(f"{prog}: error: ") and "not found" in stderr, stderr


def test_bad_resume_options(trained, tmp_path, words_file, capsys):
    checkpoint = trained / "model.pt"
    other = tmp_path / "other.txt"
    other.write_text("xyz\nzyx\n" * 10)
    accented = tmp_path / "accented.txt"
    accented.write_text("anna\nrené\n" + "bob\n" * 10)
    cases = [
        (["--hidden", "32"], "--hidden 32 conflicts with the checkpoint"),
        (["--steps", "60"], "already at step 60"),
        ([], "finished its 60 steps"),
        (["--steps", "100", "--data", other], "has the characters 'xyz' but the checkpoint"),
        (["--steps", "100", "--data", accented], f"{accented}:2: the character 'é' is not in the vocabulary"),
    ]
    for argv, message in cases:
        code, _, stderr = run_cli(capsys, "train", "--resume", checkpoint, *argv, "--out", tmp_path / "o", "--quiet")
        assert code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr, (argv, stderr)


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{tmp}/missing.pt"], "checkpoint not found"),
    (["--checkpoint", "{tmp}/junk.pt"], "not a tensorgraph checkpoint"),
    (["--checkpoint", "{tmp}/other.pt"], "not a tensorgraph makemore checkpoint"),
    (["--checkpoint", "{tmp}/junk.pt", "--n", "0"], "--n: expected a positive integer"),
    ([], "the following arguments are required: --checkpoint"),
])
def test_sample_bad_input(tmp_path, capsys, argv, message):
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 truncated zip")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    code, _, stderr = run_cli(capsys, "sample", *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert message in stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_saves_a_checkpoint_and_says_where(tmp_path, words_file):
    """The real command in a subprocess, interrupted with SIGINT: a checkpoint, its path, status 130."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tensorgraph.cli", "train", "--steps", "1000000", "--hidden", "16", "--data",
           str(words_file), "--out", str(out), "--eval-every", "100000", "--no-render"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert "training the makemore MLP" in proc.stdout.readline()  # data loaded, the loop is starting
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert "training interrupted at step" in last and f"checkpoint saved to {out / 'model.pt'}" in last
    assert "Traceback" not in stderr
    data = torch.load(out / "model.pt", weights_only=True)
    assert 0 < data["step"] < 1_000_000 and len(data["losses"]) == data["step"]


def test_a_new_run_does_not_overwrite_another_runs_checkpoint(trained, tmp_path, words_file, capsys):
    before = (trained / "model.pt").read_bytes()
    code, _, stderr = run_cli(capsys, "train", *TINY, "--data", words_file, "--out", trained)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert f"--out {trained} already holds a run's checkpoint" in stderr and "--resume" in stderr
    assert "--force" in stderr and (trained / "model.pt").read_bytes() == before
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.pt").write_bytes(before)
    code, _, stderr = run_cli(capsys, "train", *TINY, "--data", words_file, "--out", copy, "--force")
    assert code == 0, stderr
    assert torch.load(copy / "model.pt", weights_only=True)["step"] == 40


def test_resume_on_other_data_is_refused(trained, tmp_path, words_file, capsys):
    """Same characters, other words: the sha256 of the data in the checkpoint tells them apart."""
    other = tmp_path / "other.txt"
    other.write_text("\n".join(load_words()[300:600]) + "\n")
    argv = ["train", "--resume", trained / "model.pt", "--steps", 70, "--data", other, "--out", tmp_path / "o",
            "--quiet", "--no-render"]
    code, _, stderr = run_cli(capsys, *argv)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert f"--data {other} is not the data the checkpoint {trained / 'model.pt'} was trained on" in stderr
    code, _, stderr = run_cli(capsys, *argv, "--force")
    assert code == 0 and f"note: continuing on {other}, which is not the data the checkpoint was trained on" in stderr
    same = tmp_path / "same.txt"
    same.write_bytes(words_file.read_bytes())  # the same bytes elsewhere: fine
    code, _, stderr = run_cli(capsys, *argv[:6], same, "--out", tmp_path / "p", "--quiet", "--no-render")
    assert code == 0, stderr


def test_a_diverging_run_is_one_line_and_writes_no_checkpoint(tmp_path, words_file, capsys):
    code, _, stderr = run_cli(capsys, "train", *TINY, "--lr", "1e30", "--data", words_file, "--out", tmp_path)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert "training diverged at step" in stderr and "smaller learning rate (--lr" in stderr
    assert not (tmp_path / "model.pt").exists()


def test_damaged_checkpoints_are_one_line(trained, tmp_path, capsys):
    raw = (trained / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    flipped = bytearray(raw)
    losses = torch.load(trained / "model.pt", weights_only=True)["losses"].numpy().tobytes()
    flipped[raw.find(losses) + 5] ^= 0x01  # one bit of one step's loss
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    for name in ("cut.pt", "flipped.pt"):
        for argv in (["sample", "--checkpoint", tmp_path / name],
                     ["train", "--resume", tmp_path / name, "--steps", 100, "--out", tmp_path / "o", "--quiet"]):
            code, _, stderr = run_cli(capsys, *argv)
            assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
            assert f"{tmp_path / name} is not a tensorgraph checkpoint, or it is truncated/corrupt" in stderr


@pytest.mark.parametrize("command", ["train", "demo"])
def test_out_must_be_a_writable_folder(tmp_path, capsys, command):
    (tmp_path / "afile").write_text("x")
    cases = [("", "--out: expected a folder, got an empty string"),
             (tmp_path / "afile", f"--out {tmp_path / 'afile'}: exists and is not a folder")]
    if Path("/proc/self/fdinfo").is_dir():  # a folder nobody can write to, root included
        cases.append(("/proc/self/fdinfo", "--out /proc/self/fdinfo: the folder is not writable"))
    for out, message in cases:
        code, stdout, stderr = run_cli(capsys, command, "--steps", 10, "--out", out, "--quiet")
        assert code == 2 and message in stderr, stderr
        assert "Exercise 1" not in stdout  # the demo checks --out before its exercises


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    """The console script, interrupted while it imports torch: `tensorgraph: interrupted`, status 130."""
    import re

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    module, function = re.search(r'^tensorgraph = "([\w.]+):(\w+)"', pyproject, re.M).groups()
    script = f"import sys; from {module} import {function}; sys.exit({function}())"  # what pip's wrapper runs
    root = str(Path(__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    # (a shell's background job ignores SIGINT, and its children inherit that: the child gets it back)
    proc = subprocess.Popen([sys.executable, "-c", script, "train", "--steps", "5", "--out", str(tmp_path)],
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.4)  # python is up; torch (seconds) is being imported
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "tensorgraph: interrupted"


def test_resume_when_the_data_file_moved_or_changed(tmp_path, words_file, capsys):
    data = tmp_path / "names.txt"
    data.write_bytes(words_file.read_bytes())
    code, _, stderr = run_cli(capsys, "train", *TINY, "--data", data, "--out", tmp_path / "run")
    assert code == 0, stderr
    resume = ["train", "--resume", tmp_path / "run" / "model.pt", "--steps", 50, "--quiet", "--no-render"]
    data.write_text("\n".join(reversed(load_words(words_file))) + "\n")  # the same characters, edited
    code, _, stderr = run_cli(capsys, *resume)
    assert code == 2 and f"the data file {data} has changed since the checkpoint" in stderr
    data.rename(tmp_path / "moved.txt")
    code, _, stderr = run_cli(capsys, *resume)
    assert code == 2 and f"{data}, is not there any more; pass --data with its new place" in stderr
