"""The examples run: each exercise script, the learner's script through `tensorgraph check`, and the notebook."""

from __future__ import annotations

import io
import os
import runpy
import sys
from contextlib import redirect_stdout
from pathlib import Path

import nbformat
import pytest
from jupyter_client import KernelManager
from nbclient import NotebookClient

from tensorgraph.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


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


def test_wavenet_train():
    """The next lecture's WaveNet: gradients by layer name, the 3-d batch norm's dgamma mistake named."""
    out = _run("wavenet_train.py", "10")
    assert "step 0: every gradient matches torch autograd" in out
    assert "layer 12 (Tanh)" in out and "gradient std" in out
    assert "dim 0 only: not-unbroadcast" in out and "validation loss" in out


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


def test_render_gpt_draws_the_lectures_transformer_by_blocks(tmp_path):
    """Let's build GPT's model: its gradients match torch, and collapse= closes heads and whole blocks (nested
    function clusters)."""
    out = _run("render_gpt.py", str(tmp_path))
    assert "every gradient matches torch autograd: True" in out
    heads, blocks = (tmp_path / "gpt_heads.svg").read_text(), (tmp_path / "gpt_blocks.svg").read_text()
    assert all(f">{name}</text>" in heads for name in ("Head", "Head#4", "FeedForward#2", "MultiHeadAttention"))
    assert ">Block#2</text>" in blocks and ">Head</text>" not in blocks and "softmax" not in blocks
    assert ">Block</text>" in (tmp_path / "gpt_backward_blocks.svg").read_text()


def _printed(cells) -> str:
    return "".join(output.get("text", "") for cell in cells for output in cell.get("outputs", []))


def test_notebook_runs_and_its_first_exercise_still_checks_after_the_last(tmp_path):
    """Top to bottom, then back to exercise 1's cells, as learners go back. Exercise 4 rebound C, W1 ... to
    its trained copies: the learner's right gradients, computed with them, were then judged against the
    recorded tensors ("first error: dh (wrong)", and the fixed answer's ``assert fixed.ok`` failed)."""
    notebook = nbformat.read(EXAMPLES / "backprop_ninja.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    code = {index: cell for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
    with client.setup_kernel():
        for index, cell in code.items():
            client.execute_cell(cell, index)  # raises CellExecutionError, naming the cell, if a cell fails
        printed = _printed(code.values())
        assert "first error: dbndiff2 (scaled)" in printed
        assert "26/26 right, no errors" in printed
        assert "the lecture's formula: proved" in printed
        assert (tmp_path / "check.svg").exists()
        again = [_run_new_cell(client, notebook, cell.source) for cell in code.values()
                 if "graph.check(my_backward(" in cell.source]  # the learner's answers, checked again
        assert len(again) == 2
        assert "first error: dbndiff2 (scaled)" in _printed(again) and "26/26 right" in _printed(again)
        truth = ("""
from tensorgraph.lecture import forward
names = ["C", "W1", "b1", "W2", "b2", "bngain", "bnbias"]
leaves = [graph.value(name).double().requires_grad_() for name in names]
expected = torch.autograd.grad(forward(*leaves, Xb, Yb), leaves)
mine = my_backward()
print(all(torch.allclose(mine["d" + name].double(), e, rtol=1e-4, atol=1e-7) for name, e in zip(names, expected)))
""")
        assert _printed([_run_new_cell(client, notebook, truth)]).strip() == "True"


def _run_new_cell(client: NotebookClient, notebook, source: str):
    """A cell added at the end of the notebook and run, as a learner reruns a cell further up."""
    notebook.cells.append(nbformat.v4.new_code_cell(source))
    return client.execute_cell(notebook.cells[-1], len(notebook.cells) - 1)


# ---------------------------------------------------------------- a learner's notebook, in a real IPython kernel


class Kernel:
    """An IPython kernel running this checkout's tensorgraph: cells run as a notebook runs them (IPython's
    namespace: ``Out``, ``_``, displayed results cached)."""

    def __init__(self, cwd: Path) -> None:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env={**os.environ, "PYTHONPATH": path}, cwd=str(cwd))
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=120)

    def run(self, code: str, *, fails: bool = False) -> list[dict]:
        """Run one cell; its outputs (stream, execute_result, display_data, error) in order. An error fails the
        test unless the cell ``fails``; ``self.count`` is the cell's number (``In[3]``)."""
        outputs: list[dict] = []

        def keep(message: dict) -> None:
            if message["msg_type"] in ("stream", "execute_result", "display_data", "error"):
                outputs.append({"type": message["msg_type"], **message["content"]})

        reply = self.client.execute_interactive(code, output_hook=keep, timeout=300)
        self.count = reply["content"]["execution_count"]
        errors = [f"{o['ename']}: {o['evalue']}" for o in outputs if o["type"] == "error"]
        assert (reply["content"]["status"] == "error") == fails, f"cell: {errors}\n{code}"
        return outputs

    def printed(self, code: str) -> str:
        return "".join(o["text"] for o in self.run(code) if o["type"] == "stream" and o["name"] == "stdout")

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    running = Kernel(tmp_path_factory.mktemp("notebook"))
    running.run("import torch, tensorgraph as tg\ntorch.set_num_threads(1)")
    yield running
    running.close()


def test_notebook_a_displayed_object_does_not_rename_the_users_tensors(kernel):
    """A cell that shows ``layers`` puts it in IPython's ``Out``, which comes before the user's variables in the
    namespace: the next recording named the parameters ``Out[3][0].weight``, and ``grads["layers[0].weight"]``
    raised KeyError. The gradient found by the user's name is checked against torch autograd in float64."""
    kernel.run("""
g = torch.Generator().manual_seed(0)
class Linear:
    def __init__(self, fan_in, fan_out):
        self.weight = torch.randn((fan_in, fan_out), generator=g, dtype=torch.float64) / fan_in**0.5
        self.bias = torch.zeros(fan_out, dtype=torch.float64)
    def __call__(self, x):
        self.out = x @ self.weight + self.bias
        return self.out
layers = [Linear(3, 5), Linear(5, 2)]
x = torch.randn(4, 3, generator=g, dtype=torch.float64)
""")
    shown = kernel.run("layers")  # the learner looks at the layers: Out[n] holds the list
    assert shown[0]["type"] == "execute_result"
    printed = kernel.printed("""
def forward(layers, x):
    h = x
    for layer in layers:
        h = torch.tanh(layer(h))
    return (h ** 2).sum()
with tg.record() as graph:
    loss = forward(layers, x)
grads = graph.backward(loss)
weights = [layer.weight.detach().clone().requires_grad_() for layer in layers]
twins = [Linear(1, 1), Linear(1, 1)]
for twin, layer, weight in zip(twins, layers, weights):
    twin.weight, twin.bias = weight, layer.bias
expected = torch.autograd.grad(forward(twins, x), weights)
print(sorted(name for name in graph.names if name.startswith(("layers", "Out"))))
print(all(torch.allclose(grads[f"layers[{i}].weight"], expected[i], rtol=1e-12, atol=1e-12) for i in range(2)))
""")
    assert printed.splitlines() == ["['layers[0].bias', 'layers[0].out', 'layers[0].weight', 'layers[1].bias', "
                                    "'layers[1].out', 'layers[1].weight']", "True"]


def test_notebook_a_tensor_reachable_only_through_out_is_named_there(kernel):
    """IPython's ``Out`` is still searched, last: a result used in a block through ``Out[n]`` is named after it."""
    number = kernel.run("torch.arange(3.0, dtype=torch.float64)")[0]["execution_count"]
    printed = kernel.printed(f"""
with tg.record() as graph:
    total = (Out[{number}] * 2).sum()
print(graph.names[0])
""")
    assert printed.strip() == f"Out[{number}]"


def test_notebook_sources_name_the_cells_as_ipython_numbers_them(kernel):
    """Errors and node sources named the file IPython compiled a cell into (``/tmp/ipykernel_51/2094948501.py:2``),
    which tells a learner nothing; IPython's own traceback says ``Cell In[5], line 2``."""
    kernel.run("def bessel(x):\n    return torch.special.bessel_j0(x)")  # (an op without a rule)
    defined = kernel.count
    outputs = kernel.run("""x = torch.randn(3, dtype=torch.float64)
with tg.record() as graph:
    y = bessel(x).sum() * 2
print(graph.node("y")["source"], graph.node("special_bessel_j0_1")["source"])
graph.backward(y)
""", fails=True)
    assert outputs[0]["text"].split() == [f"In[{kernel.count}]:3", f"In[{defined}]:2"]
    assert outputs[-1]["evalue"] == (f"tensorgraph: no gradient rule for the op 'special_bessel_j0' (called at "
                                     f"In[{defined}]:2, producing 'special_bessel_j0_1')")
