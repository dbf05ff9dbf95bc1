"""graph.backward_source: the generated backward runs, equals the engine bit for bit, and reads like the lecture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import _weights_for
from op_cases import CASES

import tensorgraph as tg
from tensorgraph import codegen, printer
from tensorgraph.compare import replay
from tensorgraph.engine import root_node
from tensorgraph.lecture import LECTURE_ROWS, record_exercise, setup


def _run_and_compare(graph, loss, grad=None):
    """Exec the generated code; every gradient variable must equal the engine's (bit-exact)."""
    generated = codegen.generate(graph, loss, grad)
    namespace = codegen.run(generated.text(), graph, grad, graph.node(loss)["name"] if grad is not None else "loss")
    engine = graph.backward(loss, grad).by_node
    for node, variable in generated.variables.items():
        assert torch.equal(namespace[variable], engine[node]), f"{variable}\n{generated.text()}"
    return generated, namespace


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lecture_answer_key_runs_and_matches(dtype):
    graph, loss, _ = record_exercise(setup(dtype=dtype))
    generated, namespace = _run_and_compare(graph, loss)
    # every lecture row gets its d-variable, and they match torch autograd too (independent truth)
    root = root_node(graph, loss)
    values = replay(graph, root)
    values[root].backward()
    for name in LECTURE_ROWS:
        torch.testing.assert_close(namespace["d" + name], values[graph.node_id(name)].grad, rtol=1e-5, atol=1e-8)


def test_lecture_answer_key_reads_like_the_lecture():
    graph, loss, _ = record_exercise()
    source = graph.backward_source(loss)
    code = [line.split("  #")[0] for line in source.splitlines() if not line.startswith("#")]
    for expected in [
        "dloss = torch.ones_like(loss)",
        "dprobs = dlogprobs / probs",
        "dcounts = dprobs * counts_sum_inv",
        "dcounts_sum_inv = (dprobs * counts).sum(1, keepdim=True)",
        "dcounts += dcounts_sum",  # the second branch, broadcast as the lecture writes it
        "dlogits = dnorm_logits.clone()",
        "dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)",
        "db2 = dlogits.sum(0)",
        "dh = dlogits.mm(W2.t())",
        "dW2 = h.t().mm(dlogits)",
        "dbnbias = dhpreact.sum(0, keepdim=True)",
        "dbngain = (dhpreact * bnraw).sum(0, keepdim=True)",
        "dbndiff2 = (dbnvar * (1 / 31)).expand(32, 64)",
        "dhprebn += dbnmeani * (1 / 32)",
        "demb = dembcat.reshape(32, 3, 10)",
        "dC = torch.zeros_like(C).index_put_((Xb,), demb, accumulate=True)",
    ]:
        assert expected in code, f"{expected!r} not in\n{source}"
    assert sum(line.startswith(("dlogprobs =", "dC =")) for line in code) == 2
    # forward lines as headers, rules named in comments
    assert "# probs = counts * counts_sum_inv" in source
    assert "# bnvar_inv = (bnvar + 1e-05)**-0.5" in source
    assert "# mul: d(a*b)/da = b" in source
    assert "broadcast-undo: sum to (1, 64)" in source
    assert "branch through counts_sum" in source
    bare = graph.backward_source(loss, comments=False)
    assert "#" not in bare and len(bare.splitlines()) == len(code)


def test_attention_rules_are_named_in_the_comments():
    # a causal attention head's answer key: every rule says what it does (masked_fill read "rule")
    g = torch.Generator().manual_seed(0)
    x, wq, wk = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((2, 3, 4), (4, 4), (4, 4)))
    tril = torch.tril(torch.ones(3, 3))
    with tg.record() as graph:
        q, k = x @ wq, x @ wk
        wei = (q @ k.transpose(-2, -1) * 4**-0.5).masked_fill(tril == 0, float("-inf"))
        loss = (F.gelu(F.softmax(wei, dim=-1)) ** 2).sum()
    source = graph.backward_source(loss)
    assert "masked_fill: the filled elements get none" in source
    assert "gelu: d gelu(x)/dx = Phi(x) + x*phi(x)" in source
    assert ": rule" not in source
    namespace = codegen.run(source, graph)  # and it still computes torch's gradients
    ref = x.clone().requires_grad_()
    wei_t = ((ref @ wq) @ (ref @ wk).transpose(-2, -1) * 4**-0.5).masked_fill(tril == 0, float("-inf"))
    (F.gelu(F.softmax(wei_t, dim=-1)) ** 2).sum().backward()
    torch.testing.assert_close(namespace["dx"], ref.grad)


def test_grad_seed_and_inplace_forward():
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(3, dtype=torch.float64)
    with tg.record() as graph:
        y = x * w
        y += 1.0
        y = y.tanh()
        z = y.sum(1)
    seed = torch.randn(4, dtype=torch.float64)
    _run_and_compare(graph, z, seed)


def test_code_seeded_with_a_grad_at_any_output_runs_as_documented():
    """backward_source("h", grad=g) reads dh: codegen.run(src, graph, grad=g) put g in dloss (NameError)."""
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)  # noqa: N806
    seed = torch.randn(4, 2, generator=g, dtype=torch.float64)
    W_ref = W.clone().requires_grad_()  # noqa: N806
    torch.tanh(x @ W_ref).backward(seed)  # torch autograd: the truth
    with tg.record() as graph:
        h = torch.tanh(x @ W)
        loss = (h**2).sum()
        dh = loss * 2  # a forward tensor named dh: the seed's variable becomes grad_h
    for comments in (True, False):
        source = graph.backward_source(h, grad=seed, comments=comments)
        assert "grad_h" in source
        torch.testing.assert_close(codegen.run(source, graph, grad=seed)["dW"], W_ref.grad, rtol=0, atol=1e-15)
    assert dh is not None
    with pytest.raises(ValueError, match="reads no seed gradient.*generated without grad="):
        codegen.run(graph.backward_source(loss), graph, grad=torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("root", [None, "h"])
@pytest.mark.parametrize("named_dh", [False, True])
def test_code_run_casts_a_seed_of_another_dtype_as_torch_does(named_dh, root):
    """A float64 seed for a float32 output is cast to float32 first, also when the seed's variable is grad_h
    (a forward tensor is named dh): uncast, the generated matmul raised a dtype mismatch. With root= the seed
    goes in that variable too (it went in dh, which the code does not read)."""
    g = torch.Generator().manual_seed(1)
    x, W = torch.randn(4, 3, generator=g), torch.randn(3, 2, generator=g)  # noqa: N806
    seed = torch.randn(4, 2, generator=g, dtype=torch.float64)
    W_ref = W.clone().requires_grad_()  # noqa: N806
    torch.tanh(x @ W_ref).backward(seed)  # torch autograd casts the seed to the output's float32
    with tg.record() as graph:
        h = torch.tanh(x @ W)
        loss = (h**2).sum()
        if named_dh:
            dh = loss * 2  # noqa: F841 - a forward tensor named dh
    source = graph.backward_source(h, grad=seed)
    assert ("grad_h" in source) == named_dh
    dW = codegen.run(source, graph, grad=seed, root=root)["dW"]  # noqa: N806
    assert dW.dtype == torch.float32
    torch.testing.assert_close(dW, W_ref.grad, rtol=1e-6, atol=1e-6)


def test_one_tensor_used_twice_gets_two_statements():
    x = torch.randn(5, dtype=torch.float64)
    with tg.record() as graph:
        a = x * x
        loss = a.sum()
    generated, _ = _run_and_compare(graph, loss)
    assert "dx = da * x" in generated.text() and "dx += da * x" in generated.text()


def _check_case(fn, inputs):
    probe = fn(*inputs)
    weight = _weights_for(probe)
    with tg.record() as graph:
        out = fn(*inputs)
        loss = (out * weight).sum()
    _run_and_compare(graph, loss)


def test_generated_code_matches_the_engine_on_op_cases():
    """Every other op case by default (about 4 s); all of them with -m slow."""
    for _, fn, inputs in CASES[::2]:
        _check_case(fn, inputs)


@pytest.mark.slow
def test_generated_code_matches_the_engine_on_the_other_op_cases(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: run with -m slow")
    for _, fn, inputs in CASES[1::2]:
        _check_case(fn, inputs)


def test_bad_loss_is_named():
    graph, _, _ = record_exercise()
    with pytest.raises(ValueError, match="no tensor named 'nope'"):
        graph.backward_source("nope")


def test_a_gradient_passed_on_unchanged_keeps_the_users_name():
    """``logits = h @ W + b``: the add passes dlogits on as the matmul's gradient; the trace names it dlogits."""
    torch.manual_seed(0)
    h, W, b = (torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64),
               torch.randn(5, dtype=torch.float64))
    with tg.record() as graph:
        logits = h @ W + b
        loss = (logits * logits).mean()
    traced = tg.trace(graph, loss)
    adjoint = traced.adjoint
    assert "dlogits" in adjoint.names and "dmatmul_1" not in adjoint.names
    logits_t = (h @ W + b).requires_grad_()
    (expected,) = torch.autograd.grad((logits_t * logits_t).mean(), logits_t)
    dlogits = adjoint.nx.nodes[adjoint.names.index("dlogits")]["value"]
    torch.testing.assert_close(dlogits, expected, rtol=1e-12, atol=1e-12)


def test_a_rule_reads_its_own_gradient_by_name_after_an_add_passed_it_on():
    """micrograd's first example: ``de = dd`` made the rule of ``e = a * b`` read ``da = dd * b``."""
    a, b, c, f = (torch.tensor(v, dtype=torch.float64) for v in (2.0, -3.0, 10.0, -2.0))
    with tg.record() as graph:
        e = a * b
        d = e + c
        L = d * f
    generated, namespace = _run_and_compare(graph, L)
    lines = [line.code for line in generated.lines]
    assert "de = dd" in lines and "da = de * b" in lines and "db = de * a" in lines, generated.text()
    leaves = [t.clone().requires_grad_() for t in (a, b, c, f)]
    ((leaves[0] * leaves[1] + leaves[2]) * leaves[3]).backward()
    for name, leaf in zip("abcf", leaves):
        torch.testing.assert_close(namespace["d" + name], leaf.grad, rtol=0, atol=0)


def test_an_int_or_slice_pick_reads_as_zeros_then_an_assignment():
    """softmax of 3 numbers, ``-probs[0].log()``: ``dprobs = torch.zeros_like(probs)``, ``dprobs[0] = ...``; it was a
    flat ``index_add_`` over ``arange(3).view(3)[0]``. The code gives torch autograd's float64 gradients."""
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    W = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with tg.record() as graph:
        counts = x.exp()
        probs = counts / counts.sum()
        loss = -probs[0].log() + (W[:, 1:] * W[1, :2]).sum()
    generated, namespace = _run_and_compare(graph, loss)
    code = [line.code for line in generated.lines]
    assert "dprobs = torch.zeros_like(probs)" in code and "dprobs[0] = -dloss / probs[0]" in code, generated.text()
    assert "arange" not in generated.text() and "index_add_" not in generated.text()
    leaves = [t.clone().requires_grad_() for t in (x, W)]
    c = leaves[0].exp()
    (-(c / c.sum())[0].log() + (leaves[1][:, 1:] * leaves[1][1, :2]).sum()).backward()
    torch.testing.assert_close(namespace["dx"], leaves[0].grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(namespace["dW"], leaves[1].grad, rtol=1e-12, atol=1e-15)


def test_a_backward_kernel_returning_several_gradients_is_called_once():
    """grid_sampler_2d_backward gives dimg and dgrid, layer norm's kernel dx, dweight and dbias: one call each,
    its outputs read from a variable (the code called the kernel again for every output)."""
    generator = torch.Generator().manual_seed(0)
    img, theta = (torch.randn(*shape, dtype=torch.float64, generator=generator) for shape in [(1, 2, 4, 4), (1, 2, 3)])
    ln = torch.nn.LayerNorm(4).double()
    with tg.record() as graph:
        grid = F.affine_grid(theta, [1, 2, 4, 4], align_corners=False)
        out = ln(F.grid_sample(img, grid, align_corners=False))
        loss = (out * out.flip(-1)).sum()
    generated, _ = _run_and_compare(graph, loss)
    text = generated.text()
    assert text.count("grid_sampler_2d_backward(") == 1 and text.count("native_layer_norm_backward(") == 1, text


def _max_nesting(source):
    """How deep the deepest statement of ``source`` nests (AST levels), walked without recursion."""
    import ast

    deepest, stack = 0, [(statement, 1) for statement in ast.parse(source).body]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _packed_gru(steps):
    """A 2-layer GRU on a packed batch (lengths steps and steps - 3), the loss read from the output's .data."""
    torch.manual_seed(0)
    rnn = torch.nn.GRU(3, 4, num_layers=2).double()
    x = torch.randn(steps, 2, 3, dtype=torch.float64)

    def forward(x):
        out, _ = rnn(torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([steps, steps - 3])))
        return (out.data**2).sum()

    return forward, x, list(rnn.parameters())


def _packed_lstm(steps):
    """A 1-layer LSTM on pack_sequence of two sequences, the loss read from pad_packed_sequence's output."""
    torch.manual_seed(0)
    rnn = torch.nn.LSTM(3, 4).double()
    x = torch.randn(steps, 2, 3, dtype=torch.float64)

    def forward(x):
        packed = torch.nn.utils.rnn.pack_sequence([x[:, 0], x[: steps - 5, 1]])
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(rnn(packed)[0])
        return (out.tanh() * out).sum()

    return forward, x, list(rnn.parameters())


@pytest.mark.parametrize("make, steps", [(_packed_gru, 10), (_packed_lstm, 30)], ids=["gru-2-layers", "lstm"])
def test_a_long_packed_recurrence_prints_runnable_code(make, steps):
    """A packed RNN's backward re-runs its steps through chains of ``torch.cat([part, state[rows:]])``: printing
    them inlined into one expression raised RecursionError (a 2-layer GRU at 10 steps, an LSTM at 30)."""
    forward, x, params = make(steps)
    with tg.record() as graph:
        loss = forward(x)
    generated, namespace = _run_and_compare(graph, loss)
    assert _max_nesting(generated.text()) < 100
    leaf = x.clone().requires_grad_()
    truth = torch.autograd.grad(forward(leaf), [leaf, *params])  # torch autograd, in float64
    for tensor, expected in zip((x, *params), truth):
        variable = generated.variables[graph.node_id(tensor)]
        torch.testing.assert_close(namespace[variable], expected, rtol=1e-12, atol=1e-12)


def test_a_long_chain_prints_runnable_code_of_bounded_depth():
    """``x = x * 1.0001 + 0.1`` 2,000 times: one expression 2,000 calls deep raised RecursionError; now a variable
    every printer.MAX_NESTING levels, and the comment names the chain's first and last rules. (The chain goes
    through a list item, whose earlier values have no names: a plain variable's or an attribute's would be x_v0,
    x_v1 ...)"""
    w = torch.randn(5, dtype=torch.float64)
    state = [w]
    with tg.record() as graph:
        state[0] = w * 1.5
        for _ in range(2000):
            state[0] = state[0] * 1.0001 + 0.1
        loss = (state[0] * state[0]).sum()
    generated, namespace = _run_and_compare(graph, loss)
    text = generated.text()
    assert _max_nesting(text) < 100 and max(map(len, text.splitlines())) < 2000
    assert "more rules" in text
    leaf = w.clone().requires_grad_()
    y = leaf * 1.5
    for _ in range(2000):
        y = y * 1.0001 + 0.1
    (expected,) = torch.autograd.grad((y * y).sum(), leaf)
    torch.testing.assert_close(namespace["dw"], expected, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- textbook=True: the fused kernels as formulas


def _textbook_matches_autograd(graph, loss, leaves_only=False):
    """Exec the textbook code in float64; every gradient variable (of a leaf, with ``leaves_only``) must equal
    torch autograd's (a replay)."""
    generated = codegen.generate(graph, loss, textbook=True)
    namespace = codegen.run(generated.text(), graph)
    root = root_node(graph, loss)
    values = replay(graph, root, differentiable=generated.variables)  # (torch refuses some: a loss's weight)
    values[root].backward()
    for node, variable in generated.variables.items():
        if leaves_only and graph._nodes[node]["kind"] == "op":
            continue
        truth = values[node].grad
        assert truth is not None, variable
        torch.testing.assert_close(namespace[variable], truth, rtol=1e-12, atol=1e-14, msg=variable)
    return generated.text()


def test_textbook_lecture_answer_key_writes_the_formula_and_matches_autograd():
    graph, loss, _ = record_exercise(setup(dtype=torch.float64))
    default = graph.backward_source(loss)
    assert "dhpreact = torch.ops.aten.tanh_backward(dh, h)  # tanh: d tanh(x)/dx = 1 - tanh(x)**2, in torch's " \
           "fused kernel" in default  # the default is unchanged: bit-exact with torch
    source = _textbook_matches_autograd(graph, loss)
    assert "dhpreact = (1 - h**2) * dh  # tanh: d tanh(x)/dx = 1 - tanh(x)**2\n" in source
    assert "torch.ops.aten" not in source
    assert graph.backward_source(loss, textbook=True) == source
    # everything but the tanh line reads as before
    assert [line for line in default.splitlines() if "dhpreact =" not in line] == \
           [line for line in source.splitlines() if "dhpreact =" not in line]


_W = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
TEXTBOOK_CASES = {  # each uses one fused kernel; weighted by _W, so softmax's gradient is not 0
    "tanh_backward": (lambda x: torch.tanh(x), "(1 - y**2) * dy"),
    "sigmoid_backward": (lambda x: torch.sigmoid(x), "y * (1 - y) * dy"),
    "threshold_backward": (lambda x: F.relu(x), "(y > 0) * dy"),
    "threshold_backward-threshold": (lambda x: F.threshold(x, 0.1, 2.0), "(x > 0.1) * dy"),
    "_softmax_backward_data": (lambda x: F.softmax(x, 1), "y * (dy - (dy * y).sum(1, keepdim=True))"),
    "_softmax_backward_data-dim0": (lambda x: x.softmax(0), "y * (dy - (dy * y).sum(0, keepdim=True))"),
    "_log_softmax_backward_data": (lambda x: F.log_softmax(x, 1), "dy - y.exp() * dy.sum(1, keepdim=True)"),
    "gelu_backward": (lambda x: F.gelu(x), "torch.erf(x / 2**0.5)"),
    "gelu_backward-tanh": (lambda x: F.gelu(x, approximate="tanh"), "0.044715 * x**3"),
    "silu_backward": (lambda x: F.silu(x), "torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))) * dy"),
    "leaky_relu_backward": (lambda x: F.leaky_relu(x, 0.2), "torch.where(y > 0, dy, 0.2 * dy)"),
    "hardtanh_backward": (lambda x: F.hardtanh(x, -0.5, 0.5), "((x > -0.5) & (x < 0.5)) * dy"),
    "hardtanh_backward-relu6": (lambda x: F.relu6(x * 4), "< 6.0"),
    "softplus_backward": (lambda x: F.softplus(x), "torch.where(x > 20.0, dy, torch.sigmoid(x) * dy)"),
    "softplus_backward-beta": (lambda x: F.softplus(x, beta=2.0, threshold=1.0), "torch.where(x * 2.0 > 1.0"),
    "elu_backward": (lambda x: F.elu(x), "torch.where(y > 0, dy, (y + 1.0) * dy)"),
    "elu_backward-alpha": (lambda x: F.elu(x, alpha=0.5), "torch.where(y > 0, dy, (y + 0.5) * dy)"),
    "elu_backward-selu": (lambda x: F.selu(x), "torch.where(x > 0, 1.0507009873554805 * dy, 1.0507009873554805 * "
                                               "1.6732632423543772 * torch.exp(x) * dy)"),
    # (alpha 0.5: torch autograd's celu backward takes 1/alpha of alpha rounded to float32, exact for 0.5; see
    # test_textbook_celu_is_the_derivative_of_its_forward)
    "elu_backward-celu": (lambda x: F.celu(x, alpha=0.5), "torch.where(x > 0, dy, 0.5 * 2.0 * torch.exp(x * 2.0) * "
                                                          "dy)"),
    "mish_backward": (lambda x: F.mish(x), "(torch.tanh(torch.log1p(torch.exp(x))) + x * torch.sigmoid(x) * "
                                           "(1 - torch.tanh(torch.log1p(torch.exp(x)))**2)) * dy"),
    "hardswish_backward": (lambda x: F.hardswish(x), "torch.where(x <= -3, 0.0, torch.where(x < 3, (x / 3 + 0.5) * "
                                                     "dy, dy))"),
    # (hardsigmoid: torch's kernel takes 1/6 rounded to float32; see test_textbook_hardsigmoid_is_the_derivative_...)
    "log_sigmoid_backward": (lambda x: F.logsigmoid(x), "torch.sigmoid(-x) * dy"),
    "softshrink_backward": (lambda x: F.softshrink(x, 0.7), "(x.abs() > 0.7) * dy"),
    "hardshrink_backward": (lambda x: F.hardshrink(x), "(x.abs() > 0.5) * dy"),
}


@pytest.mark.parametrize("case", list(TEXTBOOK_CASES))
def test_textbook_writes_each_fused_kernel_as_its_formula(case):
    forward, expected = TEXTBOOK_CASES[case]
    kernel = case.split("-")[0]
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    with tg.record() as graph:
        y = forward(x)
        loss = (y * _W).sum()
    default = graph.backward_source(loss)
    assert f"torch.ops.aten.{kernel}(" in default  # the default calls torch's kernel, bit-exact
    source = _textbook_matches_autograd(graph, loss)
    assert expected in source, source
    assert "torch.ops.aten" not in source and "fused kernel" not in source and "torch's kernel" not in source
    assert ": rule" not in source, source  # every rule note names its formula


@pytest.mark.parametrize("forward, note", [
    (lambda x: F.softplus(x), "softplus: d softplus(x)/dx = sigmoid(beta*x) (1 where beta*x > threshold)"),
    (lambda x: F.leaky_relu(x, 0.2), "leaky_relu: d leaky_relu(x)/dx = 1 where x > 0, else negative_slope"),
    (lambda x: F.gelu(x), "gelu: d gelu(x)/dx = Phi(x) + x*phi(x)"),
    (lambda x: F.gelu(x, approximate="tanh"), "gelu: d gelu(x)/dx for gelu(x) = x/2*(1 + tanh(u)), u = "
                                              "sqrt(2/pi)*(x + 0.044715*x**3): (1 + tanh(u))/2 + x/2*(1 - tanh(u)**2)"
                                              "*du/dx"),
    (lambda x: F.elu(x), "elu: d elu(x)/dx = 1 where x > 0, else elu(x) + alpha"),
    (lambda x: F.selu(x), "selu: d selu(x)/dx = scale where x > 0, else scale*alpha*exp(x)"),
    (lambda x: F.celu(x), "celu: d celu(x)/dx = 1 where x > 0, else exp(x/alpha)"),
    (lambda x: F.mish(x), "mish: d mish(x)/dx = t + x*sigmoid(x)*(1 - t**2), t = tanh(softplus(x))"),
    (lambda x: F.hardswish(x), "hardswish: d hardswish(x)/dx = 0 where x <= -3, x/3 + 1/2 where -3 < x < 3, else 1"),
    (lambda x: F.hardsigmoid(x), "hardsigmoid: d hardsigmoid(x)/dx = 1/6 strictly between -3 and 3, else 0"),
    (lambda x: F.logsigmoid(x), "log_sigmoid: d logsigmoid(x)/dx = sigmoid(-x) = 1 - sigmoid(x)"),
    (lambda x: F.softsign(x), "softsign: d softsign(x)/dx = 1/(1 + |x|)**2"),
    (lambda x: F.tanhshrink(x), "tanhshrink: d(x - tanh(x))/dx = 1 - (1 - tanh(x)**2) = tanh(x)**2"),
    (lambda x: F.softshrink(x), "softshrink: d softshrink(x)/dx = 1 where |x| > lambd, else 0"),
    (lambda x: F.hardshrink(x), "hardshrink: d hardshrink(x)/dx = 1 where |x| > lambd, else 0"),
    (lambda x: F.rrelu(x), "rrelu: d rrelu(x)/dx = 1 where x > 0, else the mean slope (lower + upper)/2"),
    (lambda x: F.prelu(x, torch.tensor([0.25], dtype=x.dtype)), "prelu: d prelu(x)/dx = 1 where x > 0, else weight"),
    (lambda x: F.softmin(x, 1), "softmin: -s*(g - (g*s).sum(dim)), s = softmin(x) = softmax(-x)"),
    (lambda x: F.glu(torch.cat([x, x.cos()]), 0), "glu: glu(x) = a*sigmoid(b), halves a, b of x: d/da = sigmoid(b)"),
    (lambda x: torch.sin(x), "sin: d sin(x)/dx = cos(x)"),
    (lambda x: torch.atanh(x.tanh()), "atanh: d atanh(x)/dx = 1/(1 - x**2)"),
    (lambda x: torch.erf(x), "erf: d erf(x)/dx = 2/sqrt(pi)*exp(-x**2)"),
    (lambda x: torch.log1p(x.abs()), "log1p: d log(1 + x)/dx = 1/(1 + x)"),
    (lambda x: torch.hypot(x, x.cos()), "hypot: d hypot(x,y)/dy = y/hypot(x,y)"),
    (lambda x: x.clamp(-0.5, 0.5), "clamp: 1 where min <= x <= max"),
    (lambda x: x.round() + x, "round: round is piecewise constant: 0"),
])
def test_each_activations_rule_note_names_the_formula_it_uses(forward, note):
    # softplus and leaky_relu read "rule"; gelu(approximate='tanh') was noted with the exact (erf) formula
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with tg.record() as graph:
        loss = (forward(x) * _W).sum()
    for textbook in (False, True):
        source = graph.backward_source(loss, textbook=textbook)
        assert note in source and ": rule" not in source, source
        assert "tanh(u)" not in note or "Phi" not in source, source


def test_textbook_hardsigmoid_is_the_derivative_of_its_forward():
    # torch's hardsigmoid backward kernel multiplies by one_sixth(1.0f / 6.0f), 1.8e-8 off 1/6 in float64; the formula
    # takes the exact 1/6: the truth is autograd through hardsigmoid written out, (x + 3).clamp(0, 6) / 6 (no input
    # at the kinks -3, 3, where clamp passes the gradient and the kernel does not)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    assert not bool((x.abs() == 3).any())
    with tg.record() as graph:
        loss = (F.hardsigmoid(x) * _W).sum()
    assert "torch.ops.aten.hardsigmoid_backward(" in graph.backward_source(loss)
    source = graph.backward_source(loss, textbook=True)
    assert "dx = ((x > -3) & (x < 3)) * (dmul_1 * " in source, source
    assert "torch.ops.aten" not in source, source
    leaf = x.clone().requires_grad_()
    ((leaf + 3).clamp(0, 6) / 6 * _W).sum().backward()
    torch.testing.assert_close(codegen.run(source, graph)["dx"], leaf.grad, rtol=1e-12, atol=1e-14)


def test_the_method_where_names_the_branch_its_tensor_takes():
    # a.where(condition, b) is bound as torch.where(condition, a, b); the note for a was the condition's,
    # empty ("where: "), when the method's own order reached the notes
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with tg.record() as graph:
        loss = (x.where(x > 0, b) * _W).sum()
    source = graph.backward_source(loss)
    assert "dx = torch.where(gt_1, dwhere_1, 0.0)  # " in source, source
    assert "then where: d/da = 1 where the condition holds\n" in source, source
    assert "then where: d/db = 1 where it does not\n" in source, source
    assert "where: \n" not in source
    _textbook_matches_autograd(graph, loss)


def test_textbook_celu_is_the_derivative_of_its_forward():
    # torch autograd's celu backward (derivatives.yaml: 1.0/alpha.toFloat()) takes 1/alpha of alpha rounded to
    # float32, 4e-9 off the derivative of F.celu's own float64 forward at alpha 0.7; the rule and the formula take
    # the exact 1/alpha: the truth is autograd through celu written out, x where x > 0, else alpha*expm1(x/alpha)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    with tg.record() as graph:
        loss = (F.celu(x, 0.7) * _W).sum()
    source = graph.backward_source(loss, textbook=True)
    assert "dx = torch.where(x > 0, dcelu_1, 0.7 * (10 / 7) * torch.exp(x * (10 / 7)) * dcelu_1)" in source, source
    leaf = x.clone().requires_grad_()
    (torch.where(leaf > 0, leaf, 0.7 * torch.expm1(leaf / 0.7)) * _W).sum().backward()
    torch.testing.assert_close(codegen.run(source, graph)["dx"], leaf.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape, affine", [((5,), True), ((5,), False), ((3, 5), True)])
def test_textbook_layer_norm_backward_is_its_formula_and_matches_autograd(shape, affine):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64) * 2 + 1
    w = (torch.randn(shape, generator=gen, dtype=torch.float64) + 1).requires_grad_() if affine else None
    b = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_() if affine else None
    weight = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    x.requires_grad_()
    with tg.record() as graph:
        y = F.layer_norm(x, shape, w, b)
        loss = (y * weight).sum()
    assert "native_layer_norm_backward(" in graph.backward_source(loss)  # the default calls torch's kernel
    source = _textbook_matches_autograd(graph, loss)  # every gradient, in float64, within 1e-12 of autograd's
    assert "native_layer_norm_backward" not in source, source
    dims = "-1" if len(shape) == 1 else "(-2, -1)"
    assert f".mean({dims}, keepdim=True)" in source, source
    assert "layer_norm: rstd*(gw - mean(gw) - x̂*mean(gw*x̂))" in source, source


def test_textbook_reads_a_gradient_used_twice_by_its_variable():
    # softmax's formula reads its gradient twice: an inlined one gets a variable, not written out twice
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W = _W
    with tg.record() as graph:
        loss = (F.softmax(x, 1) * W).sum()
    assert "torch.ops.aten._softmax_backward_data(dmul_1 * W," in graph.backward_source(loss)
    source = _textbook_matches_autograd(graph, loss)
    assert "dsoftmax_1 = dmul_1 * W\n" in source, source
    assert "(dsoftmax_1 - (dsoftmax_1 * F.softmax(x, dim=1)).sum(1, keepdim=True))" in source, source


def test_textbook_cross_entropy_with_label_smoothing_matches_autograd():
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = torch.tensor([1, 0, 4, 2])
    with tg.record() as graph:
        logits = x * 3
        loss = F.cross_entropy(logits, target, label_smoothing=0.1)
    assert "torch.ops.aten._log_softmax_backward_data" in graph.backward_source(loss)
    source = _textbook_matches_autograd(graph, loss)
    assert "torch.ops.aten" not in source


@pytest.mark.parametrize("reduction, scale", [("mean", " / 4"), ("sum", "")])
def test_textbook_cross_entropy_is_softmax_minus_onehot(reduction, scale):
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W = torch.randn(5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = torch.tensor([1, 0, 4, 2])
    with tg.record() as graph:
        logits = x @ W
        loss = F.cross_entropy(logits, target, reduction=reduction) * 3
    source = _textbook_matches_autograd(graph, loss)
    expected = f"dlogits = (F.softmax(logits, 1) - F.one_hot(target, 5)){scale} * (dloss * 3)  # mul: d(a*b)/da = b, "
    assert expected + "then cross_entropy" in source, source
    assert "tmp" not in source, source  # the closed form's own temporaries are not printed


@pytest.mark.parametrize("target, ignore_index", [([1, -100, 4, 2], -100), ([1, 2, 4, 2], 2)])
def test_textbook_cross_entropy_with_an_ignored_target_keeps_the_closed_form(target, ignore_index):
    # an ignored row gets no gradient and is not counted in n (one_hot cannot even take -100): the rule's closed
    # form stays, and still matches autograd
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = torch.tensor(target)
    with tg.record() as graph:
        logits = x * 2
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index)
    source = _textbook_matches_autograd(graph, loss)
    assert "one_hot" not in source and "dlogits = " in source


def test_textbook_code_matches_autograd_on_the_op_cases_it_changes():
    """Every op case whose answer key calls a kernel of the table (over 100 of them), in float64."""
    changed = 0
    for name, fn, inputs in CASES:
        if name.startswith("nn-celu"):  # torch autograd's celu is off its forward: test_textbook_celu_is_the_...
            continue
        inputs = [i.double() if isinstance(i, torch.Tensor) and i.is_floating_point() else i for i in inputs]
        weight = _weights_for(fn(*inputs))
        with tg.record() as graph:
            loss = (fn(*inputs) * weight).sum()
        try:
            default = graph.backward_source(loss)
        except (NotImplementedError, ValueError):  # (cases with no answer key: hooks, unsupported calls)
            continue
        if "aten.hardsigmoid_backward(" in default:  # off its forward too: test_textbook_hardsigmoid_is_the_...
            continue
        if any(f"torch.ops.aten.{kernel}(" in default for kernel in printer.TEXTBOOK):
            changed += 1
            # (the leaves: a replayed intermediate's .grad is not always torch's gradient of the original, as in
            # lstm_cell's second output)
            source = _textbook_matches_autograd(graph, loss, leaves_only=True)
            assert not any(f"torch.ops.aten.{kernel}(" in source for kernel in printer.TEXTBOOK), source
    assert changed > 100
