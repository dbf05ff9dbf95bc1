"""The examples run: each exercise script, the learner's script through `tensorgraph check`, and the notebook."""

from __future__ import annotations

import io
import runpy
import sys
from contextlib import redirect_stdout
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tensorgraph.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *argv: str) -> str:
    """Run an example in this process (no second torch import) and return what it printed."""
    saved = sys.argv
    sys.argv = [str(EXAMPLES / script), *argv]
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        sys.argv = saved
    return out.getvalue()


def test_exercise1_compare():
    out = _run("exercise1_compare.py")
    assert "(26/26 exact, 26/26 approximate)" in out
    assert "dcounts += dcounts_sum" in out  # the answer key


def test_exercise1_check_finds_the_learners_mistake(capsys):
    status = main(["check", str(EXAMPLES / "exercise1_check.py")])
    out = capsys.readouterr().out
    assert status == 1
    assert "first error: dbndiff2 (scaled)" in out and "(n-1)/n = 31/32" in out


def test_exercise2_3_derive():
    out = _run("exercise2_3_derive.py")
    assert "dloss/dlogits = dloss*(probs[i,j] - KroneckerDelta(Yb[i], j))/n" in out
    assert "ok=True" in out
    assert "the lecture's formula: proved" in out
    assert "without Bessel's n/(n-1): not equal" in out


def test_exercise4_train():
    out = _run("exercise4_train.py", "10")
    assert "step 0: every gradient matches torch autograd" in out
    assert "bit for bit" in out and "validation loss" in out


def test_render_lecture_creates_a_missing_folder(tmp_path):
    folder = tmp_path / "new" / "img"
    out = _run("render_lecture.py", str(folder))
    names = ["lecture_forward", "lecture_gradients", "lecture_backward", "scoped_mlp", "scoped_mlp_collapsed"]
    for name in names:
        assert (folder / f"{name}.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert out.count(".svg") == len(names)


def test_notebook_runs(tmp_path):
    notebook = nbformat.read(EXAMPLES / "backprop_ninja.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.get("outputs", []))
    assert "first error: dbndiff2 (scaled)" in printed
    assert "26/26 right, no errors" in printed
    assert "the lecture's formula: proved" in printed
    assert (tmp_path / "check.svg").exists()
