"""The expression printer: recorded calls print as the source a user writes, and that source re-runs bit-exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tensorgraph as tg
from tensorgraph import printer
from tensorgraph.graph import Ref, identifier
from tensorgraph.lecture import record_exercise


def _inliner(graph):
    """Name user variables; inline everything else, so a node prints as one expression."""

    def name(node):
        data = graph._nodes[node]
        if data["named"] or data["func"] is None or data["inplace"]:
            return identifier(data["name"])
        return printer.call(data["func"], data["args"], data["kwargs"], name, output_index=data["output_index"])

    return name


def _record_expressions():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 4, generator=gen, dtype=torch.float64) + 0.5
    y = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    with tg.record() as graph:
        a = -(x + y) * x  # noqa: F841 - every local is read back by name
        b = (x + 1e-5) ** -0.5  # noqa: F841
        c = 1 / x * y  # noqa: F841
        d = 1.5 - x  # noqa: F841
        e = 2 ** (-x)  # noqa: F841
        f = (-x) ** 2  # noqa: F841
        g = -x ** 2  # noqa: F841
        h = x.T @ y  # noqa: F841
        i = F.cross_entropy(x, t)  # noqa: F841
        j = x[:, 1:3]  # noqa: F841
        k = x[..., None]  # noqa: F841
        m = torch.tanh(x).sum(0, keepdim=True)  # noqa: F841
        o = x - (y - x)  # noqa: F841
        p = 1 / (x * 3) / (2 - y)  # noqa: F841
        q = -(-x)  # noqa: F841, B002
        r = (x**2) ** 3  # noqa: F841
        s = x ** (y**2)  # noqa: F841
        u = x.max(1, keepdim=True).values - x  # noqa: F841
        v = x * (1 / 31)  # noqa: F841
        w = x[range(3), t]  # noqa: F841
        z = F.softmax(x, 1).view(-1)  # noqa: F841
    return graph


EXPECTED = {
    "a": "-(x + y) * x",
    "b": "(x + 1e-05)**-0.5",
    "c": "1 / x * y",  # left-associative: no parentheses needed
    "d": "1.5 - x",
    "e": "2**-x",
    "f": "(-x)**2",
    "g": "-x**2",
    "h": "x.T @ y",
    "i": "F.cross_entropy(x, t)",
    "j": "x[:, 1:3]",
    "k": "x[..., None]",
    "m": "torch.tanh(x).sum(0, keepdim=True)",
    "o": "x - (y - x)",
    "p": "1 / (x * 3) / (2 - y)",
    "q": "-(-x)",
    "r": "(x**2)**3",
    "s": "x**(y**2)",
    "u": "x.max(1, keepdim=True).values - x",
    "v": "x * (1 / 31)",
    "w": "x[range(3), t]",
    "z": "F.softmax(x, dim=1).view(-1)",
}


def test_expressions_print_as_written_with_minimal_parentheses():
    graph = _record_expressions()
    name = _inliner(graph)
    for var, source in EXPECTED.items():
        assert printer.expression(graph, graph.node_id(var), name) == source, var


def test_printed_source_reruns_bit_exactly():
    """Independent truth: the recorded value itself; the source must re-create it."""
    for graph in (_record_expressions(), record_exercise()[0]):
        name = _inliner(graph)
        namespace = printer.namespace(graph)
        for node, data in enumerate(graph._nodes):
            if data["func"] is None or data["inplace"]:
                continue
            source = printer.expression(graph, node, name)
            value = eval(source, dict(namespace))  # noqa: S307 - the point of the test
            assert torch.equal(value, data["value"]), f"{data['name']} = {source}"


def test_lecture_statements_read_like_the_lecture():
    graph, _, _ = record_exercise()
    name = _inliner(graph)

    def line(var):
        return printer.statement(graph, graph.node_id(var), name)

    assert line("hprebn") == "hprebn = embcat @ W1 + b1"
    assert line("bnmeani") == "bnmeani = hprebn.sum(0, keepdim=True) * (1 / 32)"
    assert line("bnvar_inv") == "bnvar_inv = (bnvar + 1e-05)**-0.5"
    assert line("h") == "h = torch.tanh(hpreact)"
    assert line("logit_maxes") == "logit_maxes = logits.max(1, keepdim=True).values"
    assert line("counts_sum") == "counts_sum = counts.sum(1, keepdims=True)"
    assert line("loss") == "loss = -logprobs[range(32), Yb].mean()"


def test_inplace_ops_print_as_statements():
    x = torch.randn(3, 4)
    y = torch.randn(3, 4)
    with tg.record() as graph:
        z = x.clone()
        z += 1
        z[0] = 2.0
        z *= y
        z.clamp_(min=0)
    lines = [printer.statement(graph, n) for n, d in enumerate(graph._nodes) if d["inplace"]]
    assert lines == ["z_v0 += 1", "z_v1[0] = 2.0", "z_v2 *= y", "z_v3.clamp_(min=0)"]
    node = next(n for n, d in enumerate(graph._nodes) if d["op"] == "setitem")
    with pytest.raises(ValueError, match="statement"):
        printer.expression(graph, node)


def test_a_node_is_given_by_id_name_or_tensor():
    """printer.expression(graph, "h") failed with "list indices must be integers or slices, not str"."""
    x, w = torch.randn(3, 4), torch.randn(4, 2)
    with tg.record() as graph:
        h = x @ w
        y = h.tanh()
    assert printer.expression(graph, "y") == printer.expression(graph, y) == "h.tanh()"
    assert printer.statement(graph, "h") == printer.statement(graph, graph.node_id("h")) == "h = x @ w"
    with pytest.raises(KeyError, match=r"printer: no node 9 in this graph \(its node ids run from 0 to 3\)"):
        printer.expression(graph, 9)
    with pytest.raises(KeyError, match="printer: no tensor named 'hh'"):
        printer.statement(graph, "hh")


def test_literals_and_names():
    assert printer.literal(torch.Size([32, 27])).text == "(32, 27)"
    assert printer.literal((5,)).text == "(5,)"
    assert printer.literal(range(2, 9)).text == "range(2, 9)"
    assert printer.literal(torch.float64).text == "torch.float64"
    assert printer.literal(0.1).text == "0.1"
    assert printer.literal(float("-inf")).text == "-float('inf')"
    assert printer.literal(Ref(3), lambda node: f"t{node}").text == "t3"
    assert printer.qualified_name(torch.tanh) == "torch.tanh"
    assert printer.qualified_name(F.linear) == "F.linear"
    assert printer.qualified_name(torch.ops.aten.tanh_backward) == "torch.ops.aten.tanh_backward"
    with pytest.raises(ValueError, match="no source form"):
        printer.literal(torch.Generator())


def test_textbook_writes_a_fused_kernel_as_its_formula_with_the_parentheses_it_needs():
    aten = torch.ops.aten
    names = {0: "dh", 1: "h", 2: printer.Expr("a + b", printer.SUM)}
    name = names.__getitem__
    assert printer.textbook(aten.tanh_backward, (Ref(0), Ref(1)), {}, name).text == "(1 - h**2) * dh"
    assert printer.textbook(aten.tanh_backward, (Ref(2), Ref(2)), {}, name).text == "(1 - (a + b)**2) * (a + b)"
    assert printer.textbook(aten.tanh_backward.default, (Ref(0), Ref(1)), {}, name).text == "(1 - h**2) * dh"
    assert printer.textbook(aten.threshold_backward, (Ref(0), Ref(2), 0), {}, name).text == "(a + b > 0) * dh"
    assert printer.textbook(aten.mm, (Ref(0), Ref(1)), {}, name) is None  # not a fused backward kernel
    # the formulas compute what the kernels do
    g, y = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)
    for kernel, args in [(aten.sigmoid_backward, (g, y)), (aten._softmax_backward_data, (g, y, 1, torch.float64)),
                         (aten.gelu_backward, (g, y)), (aten.silu_backward, (g, y))]:
        refs = tuple(Ref(i) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
        text = printer.textbook(kernel, refs, {}, {0: "g", 1: "y"}.__getitem__).text
        torch.testing.assert_close(eval(text, {**printer.NAMESPACE, "g": g, "y": y}), kernel(*args))  # noqa: S307
    # elu_backward from the output (elu) or the input (selu, celu), every coefficient: torch's kernel is the truth
    v = torch.randn(3, 4, dtype=torch.float64)
    for args in [(g, 1.0, 1.0, 1.0, True, v), (g, 0.5, 1.0, 1.0, True, v), (g, 1.67, 1.05, 1.0, False, v),
                 (g, 0.7, 1.0, 1 / 0.7, False, v), (g, 0.3, 2.0, 3.0, False, v), (g, 0.3, 2.0, 3.0, True, v)]:
        refs = (Ref(0), *args[1:5], Ref(1))
        text = printer.textbook(aten.elu_backward, refs, {}, {0: "g", 1: "v"}.__getitem__).text
        torch.testing.assert_close(eval(text, {**printer.NAMESPACE, "g": g, "v": v}),  # noqa: S307
                                   aten.elu_backward(*args), rtol=1e-12, atol=1e-14, msg=text)
    # native_layer_norm_backward: (dx, dweight, dbias), None where the mask does not ask
    x, w, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), torch.randn(4).double()
    _, mean, rstd = aten.native_layer_norm(x, (4,), w, b, 1e-5)
    tensors = {"g": g, "x": x, "mean": mean, "rstd": rstd, "w": w, "b": b}
    refs = tuple(Ref(i) for i in range(6))
    name = dict(enumerate(tensors)).__getitem__
    for mask in ([True, True, True], [True, False, True]):
        text = printer.textbook(aten.native_layer_norm_backward, (refs[0], refs[1], (4,), *refs[2:], mask), {},
                                name).text
        got = eval(text, {**printer.NAMESPACE, **tensors})  # noqa: S307
        want = aten.native_layer_norm_backward(g, x, (4,), mean, rstd, w, b, mask)
        for part, truth in zip(got, want):
            assert (part is None) == (truth is None), text
            if truth is not None:
                torch.testing.assert_close(part, truth, rtol=1e-12, atol=1e-14, msg=text)
