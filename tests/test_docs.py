"""The documentation: the site builds with mkdocs --strict, the tutorial's code runs, the API page matches the code."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tensorgraph as tg

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_site_builds_strict(tmp_path):
    """Warnings (a broken link, a nav entry without its file) are errors."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f",
                             str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "tutorial" / "index.html").exists()


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a page, in order (```py blocks are shown, not run)."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def run_blocks(page: str, module_name: str, at_least: int) -> dict:
    """Run a page's python blocks in order in one namespace (returned); a failing block fails the test by number."""
    blocks = python_blocks(DOCS / page)
    assert len(blocks) >= at_least
    namespace: dict = {"__name__": module_name}
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"{page} block {number}", "exec"), namespace)  # noqa: S102
        except Exception as err:  # noqa: BLE001 - say which block failed
            pytest.fail(f"{page} python block {number} failed: {type(err).__name__}: {err}\n{block}")
    return namespace


def test_help_tg_shows_an_example_that_runs(tmp_path, monkeypatch):
    """``help(tg)`` is where a newcomer looks first: it showed one sentence and the module list."""
    lines = [line[4:] for line in tg.__doc__.splitlines() if line.startswith("    ")]
    assert any("graph.backward(L)" in line for line in lines) and any("tg.record()" in line for line in lines)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile("\n".join(lines), "tensorgraph.__doc__", "exec"), namespace)  # noqa: S102
    assert namespace["grads"]["a"].item() == -2.0 and namespace["grads"]["b"].item() == 2.0  # d(ab+a): b+1, a
    assert (tmp_path / "L.svg").exists()


def test_tutorial_code_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the tutorial writes check.svg
    namespace = run_blocks("tutorial.md", "__tutorial__", at_least=8)
    assert (tmp_path / "check.svg").exists()
    assert namespace["report"].first_error == "bndiff2"


NUMBER_WORDS = {word: number for number, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}


def test_tutorial_says_what_the_lectures_cmp_would_print(tmp_path, monkeypatch):
    """The tutorial said the lecture's cmp would print approximate: False for "the last nine rows" of its
    learner's answer; cmp (allclose against torch autograd) prints it for seven: dbnmeani's values are right
    (only its shape is not, and allclose broadcasts it) and so are db1's."""
    monkeypatch.chdir(tmp_path)
    text = (DOCS / "tutorial.md").read_text()
    claimed = re.search(r"would print `approximate: False` for (?:the last )?(\w+) rows", text)
    assert claimed, "the tutorial no longer says how many rows the lecture's cmp gets wrong"
    blocks = python_blocks(DOCS / "tutorial.md")
    learner: dict = {"__name__": "__tutorial__"}
    for number, block in enumerate(blocks[:3], 1):  # the forward, the engine's gradients, the learner's answer
        exec(compile(block, f"tutorial.md block {number}", "exec"), learner)  # noqa: S102
    first = blocks[0]
    replay = first.replace("with tg.record() as graph:", "if True:").replace("print(graph)", "")
    replay = replay.replace("n = Xb.shape[0]\n", "n = Xb.shape[0]\nfor p in ex.parameters: p.requires_grad_()\n")
    truth: dict = {"__name__": "__replay__"}
    exec(compile(replay, "tutorial.md block 1, under torch autograd", "exec"), truth)  # noqa: S102
    names = [name for name in learner["graph"].names if "d" + name in learner["manual"]]
    torch_grads = torch.autograd.grad(truth["loss"], [truth[name] for name in names])
    wrong = [name for name, g in zip(names, torch_grads) if not torch.allclose(learner["manual"]["d" + name], g)]
    assert len(wrong) == NUMBER_WORDS[claimed.group(1)], wrong
    assert "bnmeani" not in wrong and "bndiff2" in wrong


def test_questions_page_code_runs(tmp_path, monkeypatch):
    """docs/questions.md answers learners' questions with sessions whose claims it asserts (against torch float64)."""
    monkeypatch.chdir(tmp_path)
    run_blocks("questions.md", "__questions__", at_least=10)



def test_symbolic_page_sessions_run():
    """symbolic.md's sessions (```py: shown, not run by the site) pasted in order, as a reader does: the
    second used sympy without importing it."""
    blocks = re.findall(r"^```py\n(.*?)^```", (DOCS / "symbolic.md").read_text(), flags=re.S | re.M)
    assert len(blocks) >= 2 and "tg.symbolic.derive" in blocks[0] and "d.prove" in blocks[1]
    namespace: dict = {"__name__": "__symbolic__"}
    for number, block in enumerate(blocks[:2], 1):
        try:
            exec(compile(block, f"symbolic.md py block {number}", "exec"), namespace)  # noqa: S102
        except Exception as err:  # noqa: BLE001 - say which block failed
            pytest.fail(f"symbolic.md py block {number} failed: {type(err).__name__}: {err}\n{block}")

SIGNATURE = re.compile(r"^#{2,3} `((?:tg|Graph)\.[\w.]+)\((.*)\)`", flags=re.M)


def _documented() -> list[tuple[str, list[str]]]:
    found = []
    for name, params in SIGNATURE.findall((DOCS / "api.md").read_text()):
        names = [p.split("=")[0].strip().lstrip("*") for p in params.split(",") if p.strip() not in ("", "*")]
        found.append((name, names))
    return found


def test_api_signatures_match_the_code():
    documented = _documented()
    assert {name for name, _ in documented} >= {"tg.record", "tg.scope", "tg.trace", "tg.compile", "Graph.backward",
                                                "Graph.compare", "Graph.check", "Graph.backward_source"}
    for name, params in documented:
        owner, _, attr = name.partition(".")
        obj = getattr(tg if owner == "tg" else tg.Graph, attr)
        real = [p for p in inspect.signature(obj).parameters if p != "self"]
        assert params == real, f"{name}: documented {params}, the code has {real}"


def test_names_the_docs_import_exist():
    """training.md's "From Python" names come from tensorgraph.makemore; api.md's tg.RecompileWarning from tg."""
    import warnings

    import tensorgraph.makemore as makemore
    from tensorgraph.compiler import RecompileWarning

    for name in ("extend_config", "state_from_checkpoint", "CheckpointError", "load_checkpoint",
                 "model_from_checkpoint", "train", "TrainingInterrupted", "TrainingDiverged"):
        assert name in makemore.__all__ and hasattr(makemore, name), name
        assert f"`{name}" in (DOCS / "training.md").read_text(), name
    assert tg.RecompileWarning is RecompileWarning and "RecompileWarning" in tg.__all__
    assert "`tg.RecompileWarning`" in (DOCS / "api.md").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error", tg.RecompileWarning)  # how a user makes a re-record fail loudly


def test_nav_lists_existing_pages():
    nav = re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    assert {"index.md", "tutorial.md", "api.md", "design.md"} <= set(nav)
    assert all((DOCS / page).exists() for page in nav)


def test_docs_images_exist():
    for page in DOCS.glob("*.md"):
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text()):
            assert (DOCS / image).exists(), f"{page.name}: missing image {image}"


def test_readme_says_how_many_tests_there_are():
    """README's `make test` line said ~5,400 tests when the suite had grown to 6,668."""
    claimed = re.search(r"the test suite \(~([\d,]+) tests", (ROOT / "README.md").read_text())
    assert claimed, "README's `make test` line no longer says how many tests there are"
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             str(ROOT / "tests")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    collected = re.search(r"^(\d+)(?:/\d+)? tests? collected", result.stdout, flags=re.M)
    assert collected, result.stdout[-2000:] + result.stderr[-2000:]
    count, said = int(collected.group(1)), int(claimed.group(1).replace(",", ""))
    assert abs(count - said) <= 0.05 * count, f"README says ~{said:,} tests; pytest collects {count:,}"
