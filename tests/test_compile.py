"""tg.compile: generated straight-line steps give the dynamic engine's gradients (float64, 1e-10) and torch's.

Truth comes from outside the compiler: torch autograd in float64 on the same forward (or on an
out-of-place equivalent where torch cannot follow an in-place op), and the dynamic engine.
No timing here: speed is measured by ``tensorgraph bench``.
"""

from __future__ import annotations

import copy
import functools
import itertools
import operator
import re
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import _weights_for
from op_cases import CASES

import tensorgraph as tg
from tensorgraph.compiler import CompiledGradients, CompiledStep, RecompileWarning
from tensorgraph.lecture import LECTURE_ROWS, setup
from tensorgraph.lecture import forward as lecture_forward
from tensorgraph.makemore.model import forward as exercise4_forward
from tensorgraph.ops import OPS

D = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}
PARAMS = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")


def r(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def torch_grads(forward, params, *inputs):
    """Gradients of forward(*inputs) w.r.t. params under torch autograd (on detached copies)."""
    leaves = [p.detach().clone().requires_grad_() for p in params]
    swap = dict(zip(map(id, params), leaves))
    loss = forward(*inputs, _params=[swap[id(p)] for p in params])
    return loss.detach(), torch.autograd.grad(loss, leaves)


def engine_grads(forward, params, *inputs):
    with tg.record() as graph:
        loss = forward(*inputs, _params=params)
    grads = graph.backward(loss)
    return loss, [grads[p] for p in params]


def assert_all_close(got, expected):
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL)


# ---------------------------------------------------------------- the lecture's MLP


@pytest.fixture(scope="module")
def lecture():
    ex = setup(n_hidden=64, dtype=D)
    return [p.clone() for p in ex.parameters], ex.Xb, ex.Yb


def _lecture_step(params, forward=lecture_forward, fuse=False):
    C, W1, b1, W2, b2, bngain, bnbias = params

    def training_step(Xb, Yb):
        return forward(C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb)

    return tg.compile(training_step, fuse=fuse)


@pytest.mark.parametrize("forward", [lecture_forward, exercise4_forward], ids=["atomic", "exercise4"])
def test_lecture_step_matches_engine_and_torch(lecture, forward):
    params, Xb, Yb = lecture
    step = _lecture_step(params, forward)
    for _ in range(2):  # the first call returns the recording's results; the second runs the generated code
        loss, grads = step(Xb, Yb)
        with tg.record() as graph:
            expected = forward(*params, Xb, Yb)
        engine = graph.backward(expected)
        torch.testing.assert_close(loss, expected, **TOL)
        assert_all_close([grads[p] for p in params], [engine[p] for p in params])
        leaves = [p.detach().clone().requires_grad_() for p in params]
        reference = torch.autograd.grad(forward(*leaves, Xb, Yb), leaves)
        assert_all_close([grads[name] for name in PARAMS], reference)
    assert step.recordings == 1
    assert isinstance(grads, CompiledGradients) and sorted(grads) == sorted(PARAMS)  # in order of first use
    assert grads["dW1"] is grads["W1"] and len(grads) == 7 and params[0] in grads


def test_lecture_step_is_bit_exact_with_the_engine(lecture):
    params, Xb, Yb = lecture
    step = _lecture_step(params)
    step(Xb, Yb)
    loss, grads = step(Xb, Yb)
    with tg.record() as graph:
        expected = lecture_forward(*params, Xb, Yb)
    engine = graph.backward(expected)
    assert torch.equal(loss, expected)
    for p in params:
        assert torch.equal(grads[p], engine[p]), "the generated code runs the engine's very kernels"


def test_in_place_parameter_updates_are_seen(lecture):
    params, Xb, Yb = lecture
    params = [p.clone() for p in params]
    step = _lecture_step(params)
    for _ in range(4):  # SGD, three ways of writing the update in place
        loss, grads = step(Xb, Yb)
        with tg.record() as graph:
            expected = lecture_forward(*params, Xb, Yb)
        engine = graph.backward(expected)
        assert_all_close([grads[p] for p in params], [engine[p] for p in params])
        for k, p in enumerate(params):
            g = grads[p]
            if k % 3 == 0:
                p.data -= 0.1 * g
            elif k % 3 == 1:
                p.sub_(0.1 * g)
            else:
                with torch.no_grad():
                    p -= 0.1 * g
    assert step.recordings == 1


def test_parameters_that_require_grad(lecture):
    params, Xb, Yb = lecture
    params = [torch.nn.Parameter(p.clone()) for p in params]
    step = _lecture_step(params)
    step(Xb, Yb)
    loss, grads = step(Xb, Yb)
    assert not loss.requires_grad and not grads["W1"].requires_grad, "torch autograd recorded nothing"
    reference = torch.autograd.grad(lecture_forward(*params, Xb, Yb), params)
    assert_all_close([grads[p] for p in params], reference)


def _compile_two_branches() -> CompiledStep:
    """``a = p * x`` feeding ``a.sin()`` and ``y = a + q`` (a's two branches, dy passed on to a and q), compiled
    and run twice (the recording's own results, then the generated code's), each time against torch autograd."""
    p, q = r(3, seed=27), r(3, seed=28)

    def forward(x):
        a = p * x
        z = a.sin()
        y = a + q
        return (y * y).sum() + z.sum()

    step = tg.compile(forward, fuse=False)
    x = r(3, seed=29)
    for _ in range(2):
        loss, grads = step(x)
        pt, qt = p.clone().requires_grad_(), q.clone().requires_grad_()
        a = pt * x
        ((a + qt) ** 2).sum().add(a.sin().sum()).backward()
        torch.testing.assert_close(grads[p], pt.grad, **TOL)
        torch.testing.assert_close(grads[q], qt.grad, **TOL)
    return step


def test_a_branch_that_is_also_a_parameters_gradient_is_not_added_into_in_place():
    # y = a + q passes dy on to a and q as one tensor; a's second branch (through sin) must not be added
    # into it in place, or dq, the same tensor, would get dsin too
    _compile_two_branches()


def test_a_branch_sharing_memory_with_another_gradient_is_not_added_into_in_place(monkeypatch):
    # a rule may hand on one gradient tensor to two inputs as distinct tensors sharing its memory (here add's
    # rule gives a g.detach() and q g itself): a's second branch (through sin) must not be added into the
    # detached one in place, or dq, the same memory, would get dsin too. Only the storage check in
    # _may_add_into sees it (the two are distinct statements, each read once, neither a view)
    def add_rule(g, out, x, other, *, alpha=1):
        return g.detach(), (g if alpha == 1 else g * alpha)

    monkeypatch.setattr(OPS["add"], "rule", add_rule)
    step = _compile_two_branches()
    assert "da = dy.detach() + " in step.source


def test_a_branch_sharing_memory_with_a_parameter_is_not_added_into_in_place(monkeypatch):
    # a rule may hand on a forward value's memory as a gradient (here mul's, for p * w under a plain sum, whose
    # upstream gradient is ones: dw is p itself, given as p.detach()): w's second branch must not be added into
    # it in place, or the parameter p would change. Only the forward values' storages in _may_add_into see it
    # (p is a captured tensor, no statement of the step)
    p, w = r(3, seed=30), r(3, seed=31)
    p_before = p.clone()
    mul_rule = OPS["mul"].rule

    def rule(g, out, x, other):
        return (g * other, x.detach()) if x is p else mul_rule(g, out, x, other)

    monkeypatch.setattr(OPS["mul"], "rule", rule)

    def forward(c):
        z = w.sin()
        y = p * w
        return y.sum() + z.sum() + c

    step = tg.compile(forward, fuse=False)
    c = r(seed=32)
    for _ in range(3):  # the recording's own results, then the generated code's, twice
        loss, grads = step(c)
        pt, wt = p_before.clone().requires_grad_(), w.clone().requires_grad_()
        expected = (pt * wt).sum() + wt.sin().sum() + c
        expected.backward()
        torch.testing.assert_close(p, p_before, rtol=0, atol=0)
        torch.testing.assert_close(loss, expected.detach(), **TOL)
        torch.testing.assert_close(grads[p], pt.grad, **TOL)
        torch.testing.assert_close(grads[w], wt.grad, **TOL)
    assert "dw = p.detach() + " in step.source


def test_source_is_readable_straight_line_code(lecture):
    params, Xb, Yb = lecture
    step = _lecture_step(params)
    with pytest.raises(RuntimeError, match="has not run yet"):
        _ = step.source
    step(Xb, Yb)
    source = step.source
    assert source.startswith("def step(Xb, Yb):")
    for line in ("hprebn = embcat @ W1 + b1", "h = torch.tanh(hpreact)", "dh = ", "dW1 = ", "dC = ", "# backward"):
        assert line in source, line
    assert "dcounts += " in source, "a second gradient branch is added in place"
    assert "for " not in source and "while " not in source and "graph" not in source
    assert "dXb" not in source and "dYb" not in source, "no gradient for integer data"
    rows = set(LECTURE_ROWS) - set(PARAMS)
    assert sum(f"d{name} = " in source for name in rows) >= 10, "lecture-style d-names for the user's tensors"
    compile(source, "<test>", "exec")


# ---------------------------------------------------------------- fused rules


def _fake_symbolic(monkeypatch, auto_fuse):
    import types

    module = types.ModuleType("tensorgraph.symbolic")
    module.auto_fuse = auto_fuse
    monkeypatch.setitem(sys.modules, "tensorgraph.symbolic", module)


def _with_custom_tanh_rule(graph, loss):
    """A stand-in for auto_fuse: a new graph whose tanh node carries its own (costlier) rule."""
    from tensorgraph.graph import Graph

    fused = Graph()
    fused._nodes = [dict(d) for d in graph._nodes]
    fused._live, fused._names = dict(graph._live), dict(graph._names)
    for data in fused._nodes:
        if data["op"] == "tanh":
            data["rule"] = lambda g, out, x: torch.ops.aten.tanh_backward(g, out) * 1.0 + 0.0
    return fused


def test_fused_rules_are_used_only_where_they_save_calls(lecture, monkeypatch):
    params, Xb, Yb = lecture
    _fake_symbolic(monkeypatch, _with_custom_tanh_rule)
    auto, forced = _lecture_step(params, fuse=None), _lecture_step(params, fuse=True)
    auto(Xb, Yb)
    forced(Xb, Yb)
    assert not auto.fused and forced.fused, "by default a rule making more torch calls is not used"
    assert "* 1.0" in forced.source and "* 1.0" not in auto.source
    for step in (auto, forced):
        loss, grads = step(Xb, Yb)
        with tg.record() as graph:
            expected = lecture_forward(*params, Xb, Yb)
        engine = graph.backward(expected)
        assert_all_close([grads[p] for p in params], [engine[p] for p in params])


def test_failing_fusion_falls_back_to_the_atomic_rules(lecture, monkeypatch):
    params, Xb, Yb = lecture

    def broken(graph, loss):
        raise ValueError("no derivation for this chain")

    _fake_symbolic(monkeypatch, broken)
    step = _lecture_step(params, fuse=None)
    with pytest.warns(UserWarning, match="fused rules unavailable .*no derivation for this chain.* atomic rules"):
        step(Xb, Yb)
    loss, grads = step(Xb, Yb)
    assert not step.fused and grads["W1"].shape == params[1].shape


@pytest.mark.slow
def test_symbolic_fused_rules_match_the_engine(lecture, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("derives the fused rules with sympy (tens of seconds the first time); run with -m slow")
    symbolic = pytest.importorskip("tensorgraph.symbolic")
    if not hasattr(symbolic, "auto_fuse"):
        pytest.skip("tensorgraph.symbolic has no auto_fuse yet")
    params, Xb, Yb = lecture
    step = _lecture_step(params, fuse=True)
    step(Xb, Yb)
    assert step.fused, "the lecture's cross-entropy and batchnorm chains are fused"
    loss, grads = step(Xb, Yb)
    with tg.record() as graph:
        expected = lecture_forward(*params, Xb, Yb)
    engine = graph.backward(expected)
    assert_all_close([grads[p] for p in params], [engine[p] for p in params])


def _torch_grad(loss_of, w):
    leaf = w.detach().clone().requires_grad_()
    return torch.autograd.grad(loss_of(leaf), leaf)[0]


@pytest.mark.parametrize("ignore", [0, -100])
@pytest.mark.parametrize("chain", ["nll_log_softmax", "cross_entropy_layer_norm"])
def test_fused_rules_are_re_checked_on_the_targets_they_assume(chain, ignore):
    """A rule fused on a batch without ignored targets must not be reused for one with them."""
    w, x = r(4, 5, seed=40), r(8, 4, seed=41)
    clean = torch.tensor([1, 2, 3, 4, 1, 2, 3, 4])
    padded = clean.clone()
    padded[:3] = ignore

    def loss_of(x, y, w):
        if chain == "nll_log_softmax":
            return F.nll_loss((x @ w).log_softmax(1), y, ignore_index=ignore)
        # a sum: the engine's own cross-entropy rule rescales a mean in float32 on this branch (fixed elsewhere)
        return F.cross_entropy(F.layer_norm(x @ w, (5,)), y, ignore_index=ignore, reduction="sum")

    step = tg.compile(lambda x, y: loss_of(x, y, w), fuse=True)
    step(x, clean)
    assert step.fused
    with pytest.warns(RecompileWarning, match=rf"assuming 'y' has no target equal to ignore_index={ignore}"):
        loss, grads = step(x, padded)
    torch.testing.assert_close(grads[w], _torch_grad(lambda w: loss_of(x, padded, w), w), **TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # that chain is never fused again: no flip-flopping between versions
        for y in (clean, padded, clean):
            loss, grads = step(x, y)
            torch.testing.assert_close(grads[w], _torch_grad(lambda w, y=y: loss_of(x, y, w), w), **TOL)
    assert step.recordings == 2


def test_fused_targets_read_through_a_view_or_a_captured_tensor_are_checked():
    w, x = r(4, 5, seed=42), r(8, 4, seed=43)
    targets = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])

    def loss_of(x, y, w):
        return F.nll_loss((x @ w).log_softmax(1), y.view(-1), ignore_index=0)

    step = tg.compile(lambda x: loss_of(x, targets, w), fuse=True)  # the targets: captured, read through a view
    step(x)
    assert step.fused
    targets[0, :2] = 0  # the captured tensor changed in place: a pad appears
    with pytest.warns(RecompileWarning, match="has no target equal to ignore_index=0"):
        loss, grads = step(x)
    torch.testing.assert_close(grads[w], _torch_grad(lambda w: loss_of(x, targets, w), w), **TOL)


def test_facts_about_tensors_computed_in_the_forward_are_not_fused_on():
    """Targets computed inside the forward cannot be re-checked before the step runs: that chain stays atomic."""
    w, x = r(4, 5, seed=44), r(8, 4, seed=45)
    labels = torch.tensor([0, 1, 2, 3, 4, 1, 2, 3, 4, 1])

    def loss_of(x, ix, w):
        return F.nll_loss((x @ w).log_softmax(1), labels[ix], ignore_index=0)

    step = tg.compile(lambda x, ix: loss_of(x, ix, w), fuse=True)
    first = torch.arange(1, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for ix in (first, torch.arange(0, 8), first):  # the second batch picks label 0 (ignored)
            loss, grads = step(x, ix)
            torch.testing.assert_close(grads[w], _torch_grad(lambda w, ix=ix: loss_of(x, ix, w), w), **TOL)
    assert step.recordings == 1 and "nll_loss" in step.source


def test_pick_rows_made_by_arange_in_the_forward_or_passed_in():
    w, x, y = r(4, 5, seed=46), r(6, 4, seed=47), torch.tensor([0, 3, 1, 2, 4, 0])

    def made(x, y):
        return -(x @ w).log_softmax(1)[torch.arange(6), y].mean()

    def passed(x, rows, y, w=w):
        return -(x @ w).log_softmax(1)[rows, y].mean()

    step = tg.compile(made, fuse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecompileWarning)
        for _ in range(2):
            loss, grads = step(x, y)
            torch.testing.assert_close(grads[w], _torch_grad(lambda w: passed(x, torch.arange(6), y, w), w), **TOL)
    step = tg.compile(passed, fuse=True)
    step(x, torch.arange(6), y)
    rows = torch.tensor([0, 0, 1, 1, 2, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecompileWarning)  # re-recorded where the rule was fused on arange rows
        loss, grads = step(x, rows, y)
    torch.testing.assert_close(grads[w], _torch_grad(lambda w: passed(x, rows, y, w), w), **TOL)


# ---------------------------------------------------------------- other forwards


def _closure(fn, params):
    """A forward(*inputs) closing over params; fn(*inputs, _params=...) lets the tests swap them."""
    return lambda *inputs: fn(*inputs, _params=params)


def _check_against_torch_and_engine(fn, params, *inputs, reference=None):
    step = tg.compile(_closure(fn, params), fuse=False)
    first, first_grads = step(*inputs)
    loss, grads = step(*inputs)
    expected_loss, expected = torch_grads(reference or fn, params, *inputs)
    torch.testing.assert_close(loss, expected_loss, **TOL)
    torch.testing.assert_close(first, expected_loss, **TOL)
    assert_all_close([grads[p] for p in params], expected)
    assert_all_close([first_grads[p] for p in params], expected)
    engine_loss, engine = engine_grads(fn, params, *inputs)
    assert_all_close([grads[p] for p in params], engine)
    return step


def test_broadcasting_and_fan_out():
    w, b, s = r(5, 4, seed=1), r(4, seed=2), r(3, 1, seed=3)

    def fn(x, _params):
        w, b, s = _params
        h = torch.tanh(x @ w + b)  # b broadcast over rows
        y = h * s + h.sum(0, keepdim=True) * h.exp()  # s over columns; h used four times
        return (y - y.mean()).pow(2).sum() + (s * b).sum()

    step = _check_against_torch_and_engine(fn, [w, b, s], r(3, 5, seed=4))
    assert "+=" in step.source


def test_a_value_is_not_inlined_past_an_in_place_change_of_its_input():
    # sin(h), read once, must be computed before h += 1, not inlined into the loss after it
    W = r(2, 2, seed=30)

    def forward(x):
        h = x @ W
        pieces = [h.sin()]  # an unnamed intermediate: inlinable where nothing changes h in between
        h.add_(1.0)
        return (pieces[0] * 2 + h * h).sum()

    step = tg.compile(forward, fuse=False)
    x = r(2, 2, seed=31)
    for _ in range(2):  # the recording's own results, then the generated code's
        loss, grads = step(x)
        Wt = W.clone().requires_grad_()
        h = x @ Wt
        expected = (h.sin() * 2 + (h + 1.0) ** 2).sum()
        expected.backward()
        torch.testing.assert_close(loss, expected.detach(), **TOL)
        torch.testing.assert_close(grads[W], Wt.grad, **TOL)


def test_in_place_ops_in_the_forward():
    w, v = r(4, 4, seed=5), r(4, seed=6)

    def fn(x, _params):
        w, v = _params
        h = torch.tanh(x @ w)
        h *= v  # tanh's rule needs h before this: the generated code saves a copy
        h += 1.0
        y = h.clone()
        y[0] = v * 2.0  # setitem: row 0 now comes from v
        return (y * y).sum()

    def out_of_place(x, _params):  # the same function, written so torch autograd can follow it
        w, v = _params
        h = torch.tanh(x @ w) * v + 1.0
        y = torch.cat([(v * 2.0).unsqueeze(0), h[1:]])
        return (y * y).sum()

    step = _check_against_torch_and_engine(fn, [w, v], r(3, 4, seed=7), reference=out_of_place)
    assert ".clone()" in step.source


def test_multi_output_ops_and_indexing():
    w = r(6, 5, seed=8)

    def fn(x, idx, _params):
        (w,) = _params
        h = x @ w
        values, indices = h.max(1)
        a, b = h.split([2, 3], dim=1)
        parts = torch.unbind(a, dim=1)
        return values.sum() + (b[idx] ** 2).sum() + parts[1].exp().sum() + h[range(4), indices].sum()

    step = _check_against_torch_and_engine(fn, [w], r(4, 6, seed=9), torch.tensor([0, 2, 2]))
    assert step.source.count(".max(1)") == 1, "a multi-output call runs once"


def test_cross_entropy_batch_norm_and_layer_norm():
    w, g, b = r(6, 5, seed=10), r(5, seed=11).abs() + 0.5, r(5, seed=12)

    def fn(x, y, _params):
        w, g, b = _params
        h = F.batch_norm(x @ w, None, None, g, b, training=True)
        h = F.layer_norm(torch.relu(h), (5,), g, b)
        return F.cross_entropy(h, y) + F.mse_loss(h, torch.zeros_like(h))

    _check_against_torch_and_engine(fn, [w, g, b], r(8, 6, seed=13), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]))



def test_a_small_lstm_language_model_compiles_to_the_engine_gradients():
    """makemore's next step: embedding, a 2-layer LSTM (its weights the module's), a linear head, cross-entropy."""
    torch.manual_seed(0)
    lstm, head = torch.nn.LSTM(4, 5, num_layers=2, batch_first=True).double(), torch.nn.Linear(5, 7).double()
    table = r(7, 4, seed=21)
    params = [table, *lstm.parameters(), *head.parameters()]

    def fn(xb, yb, _params):
        swap = dict(zip(map(id, params), _params))  # torch autograd's copies in torch_grads
        out, _ = torch.func.functional_call(lstm, {n: swap[id(p)] for n, p in lstm.named_parameters()},
                                            (_params[0][xb],))
        logits = F.linear(out, swap[id(head.weight)], swap[id(head.bias)])
        return F.cross_entropy(logits.reshape(-1, 7), yb.reshape(-1))

    xb, yb = torch.randint(0, 7, (3, 6)), torch.randint(0, 7, (3, 6))
    step = _check_against_torch_and_engine(fn, params, xb, yb)
    assert step.source.count("torch.lstm(") == 1, "the LSTM runs once (h_n and c_n are not read)"


def test_a_multi_output_call_whose_later_output_is_unread_runs_once():
    """std_mean's mean (and nn.LSTM's h_n) unread: the call was emitted again at that output, running twice."""
    w = r(6, 5, seed=22)

    def fn(x, _params):
        std, _ = torch.std_mean(x @ _params[0], 1)
        return std.sum()

    step = _check_against_torch_and_engine(fn, [w], r(4, 6, seed=23))
    assert step.source.count("std_mean(") == 1

def test_a_long_chain_compiles_to_code_of_bounded_depth():
    """``x = x * 1.0001 + 0.1`` 2,000 times: its unnamed intermediates were inlined into one expression 4,000 calls
    deep (RecursionError); now a variable every printer.MAX_NESTING levels, forward and backward."""
    import ast

    w = r(5, seed=24)

    def fn(x, _params):
        y = _params[0] * x
        for _ in range(2000):
            y = y * 1.0001 + 0.1
        return (y * y).sum()

    step = _check_against_torch_and_engine(fn, [w], r(5, seed=25))
    deepest, stack = 0, [(statement, 1) for statement in ast.parse(step.source).body]
    while stack:  # the source's deepest nesting, walked without recursion
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    assert deepest < 100, deepest


def test_dead_gradients_are_not_computed():
    w, unused, frozen = r(3, 3, seed=14), r(3, seed=15), r(3, seed=16)

    def forward(x, labels):
        h = (x @ w) * frozen  # frozen: a float tensor the caller excludes with params=
        return (h * x).sum() + labels.sum() * 0.0 + (unused.detach() * 0).sum()

    step = tg.compile(forward, params=[w, unused], fuse=False)
    loss, grads = step(r(2, 3, seed=17), torch.tensor([1, 2]))
    assert list(grads) == ["w"], "no gradient for data, integer inputs, excluded or disconnected tensors"
    with pytest.raises(KeyError, match="not a parameter"):
        grads[frozen]
    with pytest.raises(KeyError, match="intermediate gradients are not computed"):
        grads["h"]
    source = step.source
    assert "dx" not in source and "dfrozen" not in source and "dlabels" not in source


@pytest.mark.parametrize("dropout", [F.dropout, F.dropout1d, F.alpha_dropout, F.feature_alpha_dropout,
                                     lambda h, p, training: F.gumbel_softmax(h, tau=p, hard=True)])
def test_dropout_draws_a_new_mask_each_step(dropout):
    """(Also F.gumbel_softmax's noise.)"""
    w = r(8, 8, seed=18)

    def forward(x):
        return (dropout(torch.tanh(x @ w).view(4, 4, 2), p=0.5, training=True) * torch.arange(2.0)).sum()

    step = tg.compile(forward, fuse=False)
    x = r(4, 8, seed=19)
    step(x)
    torch.manual_seed(5)
    loss_a, grads_a = step(x)
    torch.manual_seed(6)
    loss_b, _ = step(x)
    assert not torch.equal(loss_a, loss_b), "the mask is drawn again, not baked in"
    torch.manual_seed(5)
    with tg.record() as graph:
        expected = forward(x)
    torch.testing.assert_close(loss_a, expected, **TOL)
    torch.testing.assert_close(grads_a[w], graph.backward(expected)[w], **TOL)


def test_in_place_updates_of_state_that_outlives_the_step_are_replayed():
    """Mutations nothing in the step reads (a counter, a buffer, an input) still happen on every call, as in eager."""
    def make():
        return {"w": r(4, 3, seed=50), "counter": torch.zeros((), dtype=torch.long), "buf": torch.zeros(3, dtype=D)}

    def forward(x, state):
        h = x @ state["w"]
        state["counter"].add_(1)  # an integer buffer, like BatchNorm's num_batches_tracked
        state["buf"][0] += 1  # through a view
        state["buf"][1:].add_(h.detach().sum())  # a float buffer, from a forward value
        x[0] *= 2  # the input itself
        return h.pow(2).sum()

    compiled, eager = make(), make()
    step = tg.compile(lambda x: forward(x, compiled), fuse=False)
    x_compiled, x_eager = r(5, 4, seed=51), r(5, 4, seed=51)
    for _ in range(3):
        before = x_eager.clone()
        loss, grads = step(x_compiled)
        expected = forward(x_eager, eager)
        torch.testing.assert_close(loss, expected, **TOL)
        torch.testing.assert_close(grads[compiled["w"]], _torch_grad(lambda w, before=before: (before @ w).pow(2).sum(),
                                                                     compiled["w"]), **TOL)
    for key in ("counter", "buf"):
        torch.testing.assert_close(compiled[key], eager[key], **TOL)
    torch.testing.assert_close(x_compiled, x_eager, **TOL)
    assert len(grads) == 1, "a mutated input is still an input, not a parameter"


def test_batch_norm_module_buffers_advance_as_in_eager():
    import copy

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    reference = copy.deepcopy(model)
    step = tg.compile(lambda x, y: F.cross_entropy(model(x), y), fuse=False)
    for seed in range(4):
        x, y = r(16, 4, seed=60 + seed), torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(seed))
        step(x, y)
        F.cross_entropy(reference(x), y)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(model[1], name), getattr(reference[1], name), **TOL)


def test_parameters_are_named_through_the_objects_the_forward_reads():
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x, y = r(5, 4, seed=110), torch.tensor([0, 1, 2, 0, 1])
    step = tg.compile(lambda x, y: F.cross_entropy(model(x), y), fuse=False)
    loss, grads = step(x, y)
    with tg.record() as graph:
        expected = F.cross_entropy(model(x), y)
    engine = graph.backward(expected)
    assert list(grads) == [graph.name_of(p) for p in model.parameters()] == \
        ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"]
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[f"model.{name}"], engine[p], **TOL)
    assert "model_0_weight" in step.source


# ---------------------------------------------------------------- guards


def test_guard_re_records_on_a_new_shape_once_and_caches(lecture):
    params, Xb, Yb = lecture
    step = _lecture_step(params)
    step(Xb, Yb)
    with pytest.warns(RecompileWarning, match=r"input 0 changed shape from \(32, 3\) to \(16, 3\)"):
        loss, grads = step(Xb[:16], Yb[:16])
    with tg.record() as graph:
        expected = lecture_forward(*params, Xb[:16], Yb[:16])
    torch.testing.assert_close(grads["W1"], graph.backward(expected)[params[1]], **TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # back to a known shape: the cached version, silently
        step(Xb, Yb)
        step(Xb[:16], Yb[:16])
    assert step.recordings == 2 and "range(16)" in step.source


def test_guard_on_dtype_and_on_a_rebound_parameter():
    module = sys.modules[__name__]
    module.W_GLOBAL = r(3, seed=20)

    def forward(x):
        return torch.tanh(x * W_GLOBAL).sum()  # noqa: F821 - a module global, rebound below

    step = tg.compile(forward, fuse=False)
    x = r(2, 3, seed=21)
    step(x)
    with pytest.warns(RecompileWarning, match="input 0 changed dtype from torch.float64 to torch.float32"):
        step(x.float())
    module.W_GLOBAL = module.W_GLOBAL - 0.5  # a new tensor, not an in-place update
    with pytest.warns(RecompileWarning, match="'W_GLOBAL' now refers to a different tensor"):
        loss, grads = step(x)
    with tg.record() as graph:
        expected = forward(x)
    torch.testing.assert_close(grads["W_GLOBAL"], graph.backward(expected)[module.W_GLOBAL], **TOL)
    assert step.recordings == 3
    del module.W_GLOBAL


def test_guard_on_device():
    # a program is specialised to its inputs' device: another device (meta here, cuda where there is one) records
    # again; the first device's program is kept and runs again when the inputs come back to it
    W = torch.tensor(0.5, dtype=D)

    def forward(x):
        return torch.tanh(x * W).sum()

    step = tg.compile(forward, fuse=False)
    x = r(2, 3, seed=22)
    step(x)
    with pytest.warns(RecompileWarning, match="input 0 changed device from cpu to meta"):
        loss, grads = step(x.to("meta"))
    assert loss.device.type == "meta" and grads[W].device.type == "meta"
    loss, grads = step(x)
    xt, Wt = x.clone(), W.clone().requires_grad_()
    torch.tanh(xt * Wt).sum().backward()
    torch.testing.assert_close(grads[W], Wt.grad, **TOL)
    assert step.recordings == 2


def test_guard_on_the_dtype_of_a_tensor_in_a_list_input():
    # the forward's .to(x.dtype) is no call at all for a float64 x: a float32 x must not replay that recording
    W = r(3, seed=23)

    def forward(xs):
        x = xs[0]
        return (x.tanh() * W).sum().to(x.dtype)

    step = tg.compile(forward, fuse=False)
    x = r(2, 3, seed=24)
    step([x])
    with pytest.warns(RecompileWarning, match=r"input 0\[0\] changed dtype from torch.float64 to torch.float32"):
        loss, grads = step([x.float()])
    Wt = W.clone().requires_grad_()
    expected = (x.float().tanh() * Wt).sum().to(torch.float32)
    expected.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[W], Wt.grad, **TOL)


def test_guard_on_python_values_compares_their_types():
    # 1 == True and hash alike, but x[1] is a row and x[True] all of x with a new leading dimension
    W = r(3, seed=25)

    def forward(x, i):
        return (x[i] * W).sum()

    step = tg.compile(forward, fuse=False)
    x = r(2, 3, seed=26)
    step(x, 1)
    with pytest.warns(RecompileWarning, match="input 1 changed"):
        loss, grads = step(x, True)
    Wt = W.clone().requires_grad_()
    expected = (x[True] * Wt).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), **TOL)
    torch.testing.assert_close(grads[W], Wt.grad, **TOL)


def test_guard_on_inputs_that_alias_each_other():
    w = r(4, 4, seed=70)
    a, b = r(3, 4, seed=71), r(3, 4, seed=72)

    def forward(x, y, w=w):
        return ((x @ w) * (y @ w)).sum()

    def check(step, *args):
        loss, grads = step(*args)
        torch.testing.assert_close(grads[w], _torch_grad(lambda w: forward(*args, w), w), **TOL)

    step = tg.compile(forward, fuse=False)
    check(step, a, a)
    with pytest.warns(RecompileWarning, match="input 1 is no longer the same tensor as input 0"):
        check(step, a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both versions are cached
        check(step, b, b)
        check(step, b, a)
    assert step.recordings == 2
    step = tg.compile(forward, fuse=False)
    check(step, a, b)
    with pytest.warns(RecompileWarning, match="input 1 is now the same tensor as input 0"):
        check(step, b, b)


def test_guard_on_tensors_inside_a_list_input_that_alias_each_other():
    """The same tensor twice inside a list input is recorded as one leaf: the program reads it once. A list of two
    different tensors must record again (a mutant leaving list items out of the aliasing key replayed the
    recording of [a, a] for [a, b], computing with a twice)."""
    w = r(4, 4, seed=76)
    a, b = r(3, 4, seed=77), r(3, 4, seed=78)

    def forward(xs, w=w):
        return ((xs[0] @ w) * (xs[1] @ w).tanh()).sum()

    step = tg.compile(forward, fuse=False)
    step([a, a])
    with pytest.warns(RecompileWarning, match=r"input 0\[1\] is no longer the same tensor as input 0\[0\]"):
        loss, grads = step([a, b])
    torch.testing.assert_close(loss, forward([a, b]), **TOL)
    torch.testing.assert_close(grads[w], _torch_grad(lambda w: forward([a, b], w), w), **TOL)


def test_cache_size_bounds_the_versions_kept():
    """With cache_size=2, a third input signature evicts the oldest version: calling with the first one again
    records again (a mutant keeping one version more than cache_size replayed it). Every call gives torch's loss
    and gradient."""
    w = r(4, 3, seed=79)

    def forward(x, w=w):
        return torch.tanh(x @ w).sum()

    step = tg.compile(forward, fuse=False, cache_size=2)
    inputs = [r(n, 4, seed=80 + n) for n in (2, 3, 5, 2)]
    for call, x in enumerate(inputs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss, grads = step(x)
        assert step.recordings == call + 1 and len([m for m in caught if m.category is RecompileWarning]) == (
            call > 0), caught
        torch.testing.assert_close(loss, forward(x), **TOL)
        torch.testing.assert_close(grads[w], _torch_grad(lambda w, x=x: forward(x, w), w), **TOL)


def test_list_and_tuple_inputs_are_specialised_to_their_items():
    w = r(4, 3, seed=73)

    def forward(xs, pair, w=w):
        a, b = pair
        return sum(((x @ w) ** 2).sum() for x in xs) + (a * b).sum()

    step = tg.compile(forward, fuse=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fresh lists of the same shapes: one recording
        for seed in range(3):
            xs = [r(5, 4, seed=74 + seed), r(5, 4, seed=80 + seed)]
            pair = (r(3, seed=90 + seed), r(3, seed=95 + seed))
            loss, grads = step(xs, pair)
            torch.testing.assert_close(loss, forward(xs, pair), **TOL)
            torch.testing.assert_close(grads[w], _torch_grad(lambda w, xs=xs, p=pair: forward(xs, p, w), w), **TOL)
    assert step.recordings == 1 and len(grads) == 1, "tensors inside the inputs are data, not parameters"
    with pytest.warns(RecompileWarning, match=r"input 0\[1\] changed shape from \(5, 4\) to \(2, 4\)"):
        step([xs[0], xs[1][:2]], pair)
    with pytest.warns(RecompileWarning, match="input 0 is now a list of 1 items"):
        step([xs[0]], pair)
    with pytest.raises(TypeError, match="input 0 is a dict holding tensors"):
        tg.compile(lambda batch: (batch["x"] @ w).sum(), fuse=False)({"x": xs[0]})
    with pytest.raises(TypeError, match=r"input 0\[1\] is a dict holding tensors"):
        tg.compile(lambda batch: (batch[1]["x"] @ w).sum(), fuse=False)([xs[0], {"x": xs[0]}])


def test_guard_on_a_list_item_read_by_index_when_the_list_shrinks():
    """A list the forward reads by a constant index only (``scales[1]``) is guarded at that index; once the list
    is too short, the step does what the forward does, raise IndexError (a mutant taking the short list for
    unchanged replayed the recording's loss), and with a new item there gives torch's loss and gradient."""
    w, x = r(4, 4, seed=330), r(3, 4, seed=331)
    scales = [1.0, 2.0]

    def forward(x, w=w):
        return torch.tanh(x @ w).sum() * scales[1]

    step = tg.compile(forward, fuse=False)
    step(x)
    scales.pop()
    with pytest.raises(IndexError), pytest.warns(RecompileWarning, match=r"scales\[1\] was deleted"):
        step(x)
    scales.append(-3.0)
    with pytest.warns(RecompileWarning, match=r"scales\[1\] is now -3.0 \(the recording ran with 2.0\)"):
        loss, grads = step(x)
    torch.testing.assert_close(loss, forward(x), **TOL)
    torch.testing.assert_close(grads[w], _torch_grad(lambda w: forward(x, w), w), **TOL)


def test_guard_on_python_numbers_the_forward_reads():
    module = sys.modules[__name__]
    module.BETA_GLOBAL = 1.0
    w, x = r(4, 3, seed=100), r(5, 4, seed=101)
    scale = 2

    def forward(x, w=w):
        return (x @ w).pow(2).sum() * BETA_GLOBAL * scale  # noqa: F821 - a module global, changed below

    step = tg.compile(forward, fuse=False)
    step(x)
    for change, message in ((lambda: setattr(module, "BETA_GLOBAL", 0.0), "'BETA_GLOBAL' changed from 1.0 to 0.0"),
                            (lambda: setattr(module, "BETA_GLOBAL", 0), "'BETA_GLOBAL' changed from 0.0 to 0"),
                            (lambda: None, None)):
        change()
        if message:
            with pytest.warns(RecompileWarning, match=message):
                loss, grads = step(x)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                loss, grads = step(x)
        torch.testing.assert_close(loss, forward(x), **TOL)
        torch.testing.assert_close(grads[w], _torch_grad(lambda w: forward(x, w), w), **TOL)
    del module.BETA_GLOBAL

    def annealed(x, w=w):
        return (x @ w).pow(2).sum() * weight

    weight = 1.0
    step = tg.compile(annealed, fuse=False)
    step(x)
    weight = 0.25  # a closure variable
    with pytest.warns(RecompileWarning, match="'weight' changed from 1.0 to 0.25"):
        loss, grads = step(x)
    torch.testing.assert_close(grads[w], _torch_grad(lambda w: annealed(x, w), w), **TOL)


def test_guard_on_train_and_eval_mode_of_modules_the_forward_reads():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                                torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)).double()
    x, y = r(16, 4, seed=102), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    step = tg.compile(lambda x, y: F.cross_entropy(model(x), y), fuse=False)
    step(x, y)
    model.eval()
    with pytest.warns(RecompileWarning, match=r"model was switched to eval mode"):
        loss, grads = step(x, y)
    again, _ = step(x, y)  # no dropout: the same loss twice, as in eager
    with torch.no_grad():
        torch.testing.assert_close(loss, F.cross_entropy(model(x), y), **TOL)
    torch.testing.assert_close(again, loss, **TOL)
    model[3].train()  # one submodule
    with pytest.warns(RecompileWarning, match=r"model\.3 was switched to training mode"):
        step(x, y)


class _Linear:  # the lecture's part-3 layers: plain classes, not nn.Modules
    def __init__(self, fan_in, fan_out, seed):
        self.weight = r(fan_in, fan_out, seed=seed) / fan_in ** 0.5

    def __call__(self, x):
        return x @ self.weight

    def parameters(self):
        return [self.weight]


class _BatchNorm1d:
    def __init__(self, dim, seed):
        self.training = True  # set by hand: the guard must see it flip
        self.gamma, self.beta = 1 + 0.1 * r(dim, seed=seed), 0.1 * r(dim, seed=seed + 1)
        self.running_mean, self.running_var = 0.5 * r(dim, seed=seed + 2), 1 + r(dim, seed=seed + 3).abs()

    def __call__(self, x):
        if self.training:
            mean, var = x.mean(0, keepdim=True), x.var(0, keepdim=True)
        else:
            mean, var = self.running_mean, self.running_var
        return self.gamma * (x - mean) / torch.sqrt(var + 1e-5) + self.beta

    def parameters(self):
        return [self.gamma, self.beta]


class _Tanh:
    def __call__(self, x):
        return torch.tanh(x)

    def parameters(self):
        return []


class _Sequential:
    def __init__(self, layers):
        self.layers = layers

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _layers_loss(layers):
    """``forward(x, y)``: the user's layers in turn, then cross-entropy (the step these tests compile)."""
    def forward(x, y):
        for layer in layers:
            x = layer(x)
        return F.cross_entropy(x, y)
    return forward


def _eager_loss_and_grads(net, x, y):
    """The loss and the parameters' gradients under torch autograd, on a deep copy of the user's layers."""
    import copy
    net = copy.deepcopy(net)
    leaves = [p.requires_grad_() for layer in net for p in layer.parameters()]
    loss = _layers_loss(net)(x, y)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def test_guard_on_training_flags_of_the_lecture_s_own_layer_classes():
    layers = [_Linear(6, 8, seed=110), _BatchNorm1d(8, seed=111), _Tanh(), _Linear(8, 4, seed=115),
              _BatchNorm1d(4, seed=116)]
    model = _Sequential(layers)
    params = [p for layer in layers for p in layer.parameters()]
    x, y = r(16, 6, seed=120), torch.tensor([0, 1, 2, 3] * 4)

    forward = _layers_loss(layers)

    def nested(x, y):
        return F.cross_entropy(model(x), y)

    steps = tg.compile(forward, fuse=False), tg.compile(nested, fuse=False)
    for step in steps:
        step(x, y)
    norms = [layer for layer in layers if isinstance(layer, _BatchNorm1d)]
    for flags, path in (((False, False), r"layers\[1\]\.training is now False"),  # net.eval(), by hand
                        ((True, True), None),  # back to the first recording's flags: it runs again
                        ((True, False), r"layers\[4\]\.training is now False")):  # one layer
        for norm, flag in zip(norms, flags):
            norm.training = flag
        for step, prefix in zip(steps, ("", r"model\.")):
            with pytest.warns(RecompileWarning, match=rf"re-recording \w+: {prefix}{path}") if path else \
                    warnings.catch_warnings():
                if not path:
                    warnings.simplefilter("error", RecompileWarning)
                loss, grads = step(x, y)
            expected_loss, expected_grads = _eager_loss_and_grads(layers, x, y)
            torch.testing.assert_close(loss, expected_loss, **TOL)
            for p, expected in zip(params, expected_grads):
                torch.testing.assert_close(grads[p], expected, **TOL)
            with warnings.catch_warnings():
                warnings.simplefilter("error", RecompileWarning)  # nothing changed: replayed, not re-recorded
                again, _ = step(x, y)
            torch.testing.assert_close(again, loss, **TOL)


def test_a_backward_kernel_computes_only_the_outputs_the_step_reads():
    """The first convolution's input is data: its convolution_backward is asked for the weight's and the
    bias's gradients only (output_mask), not for a gradient of the images nobody reads; same for a layer norm
    applied to data. The gradients are still torch autograd's."""
    torch.manual_seed(6)
    conv = torch.nn.Conv2d(2, 4, 3, padding=1).double()
    norm = torch.nn.LayerNorm(6).double()
    head = torch.nn.Linear(4 * 5 * 6 + 6, 3).double()

    def forward(images, features, y):
        h = F.max_pool2d(torch.relu(conv(images)), 2).flatten(1)
        return F.cross_entropy(head(torch.cat([h, norm(features)], 1)), y)

    images, features, y = r(8, 2, 10, 12, seed=170), r(8, 6, seed=171), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    step = tg.compile(forward, fuse=False)
    for _ in range(2):
        loss, grads = step(images, features, y)
        params = [*conv.parameters(), *norm.parameters(), *head.parameters()]
        expected = torch.autograd.grad(forward(images, features, y), params)
        for p, g in zip(params, expected):
            torch.testing.assert_close(grads[p], g, **TOL)
    assert "[False, True, True])" in step.source.split("convolution_backward(")[1]
    assert "[False, True, True])" in step.source.split("native_layer_norm_backward(")[1]


def test_tensors_the_forward_stores_in_attributes_are_named_in_a_warning():
    """The lecture's part-3 layers keep ``self.out`` (for activation histograms); the compiled step does not
    replay that assignment, so the recording says that those attributes keep the recording's values."""
    class Linear(_Linear):
        def __call__(self, x):
            self.out = x @ self.weight
            return self.out

    layers = [Linear(6, 8, seed=180), _Tanh(), Linear(8, 4, seed=181)]
    x, y = r(16, 6, seed=182), torch.tensor([0, 1, 2, 3] * 4)

    forward = _layers_loss(layers)

    step = tg.compile(forward, fuse=False)
    with pytest.warns(UserWarning, match=r"stores tensors it computes in attributes \(layers\[0\]\.out, "
                                         r"layers\[2\]\.out\); the compiled step does not update them"):
        loss, grads = step(x, y)
    expected_loss, expected_grads = _eager_loss_and_grads(layers, x, y)
    torch.testing.assert_close(loss, expected_loss, **TOL)
    for layer, expected in zip(layers[::2], expected_grads):
        torch.testing.assert_close(grads[layer.weight], expected, **TOL)


def test_switching_between_train_and_eval_records_each_mode_once():
    """A loop that evaluates every few steps on batches of the training size: each mode is recorded once,
    not at every switch (the old cache was cleared by every flag change: two recordings per evaluation)."""
    layers = [_Linear(6, 8, seed=130), _BatchNorm1d(8, seed=131), _Tanh(), _Linear(8, 4, seed=135)]
    params = [p for layer in layers for p in layer.parameters()]
    torch.manual_seed(5)
    module = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                                 torch.nn.Linear(8, 4)).double()

    forward = _layers_loss(layers)

    steps = tg.compile(forward, fuse=False), tg.compile(lambda x, y: F.cross_entropy(module(x), y), fuse=False)
    y = torch.tensor([0, 1, 2, 3] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecompileWarning)
        for i in range(6):
            training = i % 2 == 0
            for norm in layers[1:2]:
                norm.training = training
            module.train(training)
            x = r(16, 6, seed=140 + i)
            loss, grads = steps[0](x, y)
            expected_loss, expected_grads = _eager_loss_and_grads(layers, x, y)
            torch.testing.assert_close(loss, expected_loss, **TOL)
            for p, expected in zip(params, expected_grads):
                torch.testing.assert_close(grads[p], expected, **TOL)
            reference = copy.deepcopy(module)
            loss, grads = steps[1](x, y)
            expected_loss = F.cross_entropy(reference(x), y)
            expected_grads = torch.autograd.grad(expected_loss, list(reference.parameters()))
            torch.testing.assert_close(loss, expected_loss.detach(), **TOL)
            for p, expected in zip(module.parameters(), expected_grads):
                torch.testing.assert_close(grads[p], expected, **TOL)
    assert [step.recordings for step in steps] == [2, 2]


def test_a_tensor_attribute_rebound_between_calls_is_seen():
    """The lecture's BatchNorm1d rebinds ``self.running_mean``; an eval step recorded before reads the new
    tensor (it is re-recorded), as eager code would, instead of the recording's old one."""
    layers = [_Linear(6, 8, seed=150), _BatchNorm1d(8, seed=151), _Tanh(), _Linear(8, 4, seed=155)]
    layers[1].training = False
    x, y = r(16, 6, seed=160), torch.tensor([0, 1, 2, 3] * 4)

    forward = _layers_loss(layers)

    step = tg.compile(forward, fuse=False)
    step(x, y)
    layers[1].running_mean = layers[1].running_mean + 0.5 * r(8, seed=161)  # updated outside the step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, grads = step(x, y)
    expected_loss, expected_grads = _eager_loss_and_grads(layers, x, y)
    torch.testing.assert_close(loss, expected_loss, **TOL)  # the old code kept the recording's running_mean
    for p, expected in zip(layers[0].parameters() + layers[3].parameters(), expected_grads[:1] + expected_grads[3:]):
        torch.testing.assert_close(grads[p], expected, **TOL)
    assert [str(w.message) for w in caught if w.category is RecompileWarning] == [
        "tg.compile: re-recording forward: layers[1].running_mean now refers to a different tensor"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecompileWarning)
        step(x, y)  # the guard holds again: no recording
    assert step.recordings == 2


def _call_once(step, *inputs):
    """One call of the step, and the RecompileWarnings it gave (checked after its results: the old code gave
    wrong results silently)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = step(*inputs)
    return result, [str(w.message) for w in caught if w.category is RecompileWarning]


def _warned_once(step, warned, message):
    """``warned`` is one RecompileWarning saying ``message`` (None: no warning at all)."""
    assert warned == ([f"tg.compile: re-recording {step.__name__}: {message}"] if message else [])


def test_guard_on_atom_attributes_of_torch_modules():
    """``eps`` and ``momentum`` of torch's own modules, changed between calls, change what the step computes
    (the old code replayed the recording's values: the old eps in the loss, the old momentum in the running
    statistics)."""
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)).double()
    x, y = r(16, 6, seed=190), torch.tensor([0, 1, 2, 3] * 4)

    def forward(x, y):
        return F.cross_entropy(model(x), y)

    step = tg.compile(forward, fuse=False)
    changes = ((None, None), (lambda: setattr(model[4], "eps", 0.5), "model.4.eps is now 0.5 (the recording ran "
                                                                      "with 1e-05)"),
               (lambda: setattr(model[1], "momentum", 0.75), "model.1.momentum is now 0.75 (the recording ran "
                                                             "with 0.1)"),
               (lambda: setattr(model[1], "momentum", 0.1), None),  # both kept: switching back records nothing
               (lambda: setattr(model[1], "momentum", 0.75), None),
               (lambda: setattr(model[1], "momentum", 0.1), None))
    for change, message in changes:
        if change is not None:
            change()
        reference = copy.deepcopy(model)
        (loss, grads), warned = _call_once(step, x, y)
        expected = F.cross_entropy(reference(x), y)
        torch.testing.assert_close(loss, expected.detach(), **TOL)
        for p, g in zip(model.parameters(), torch.autograd.grad(expected, list(reference.parameters()))):
            torch.testing.assert_close(grads[p], g, **TOL)
        for buffer, expected_buffer in zip(model.buffers(), reference.buffers()):
            torch.testing.assert_close(buffer, expected_buffer, **TOL)
        _warned_once(step, warned, message)
    assert step.recordings == 3


def test_guard_on_a_float_attribute_of_the_user_s_own_module():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(6, 4).double()
            self.temperature = 1.0

        def forward(self, x):
            return self.proj(x) / self.temperature

    torch.manual_seed(8)
    head = Head()
    x, y = r(16, 6, seed=191), torch.tensor([0, 1, 2, 3] * 4)

    def forward(x, y):
        return F.cross_entropy(head(x), y)

    step = tg.compile(forward, fuse=False)
    for temperature, message in ((1.0, None), (0.5, "head.temperature is now 0.5 (the recording ran with 1.0)"),
                                 (1.0, None), (0.5, None), (0.5, None)):
        head.temperature = temperature
        (loss, grads), warned = _call_once(step, x, y)
        expected = F.cross_entropy(head(x), y)
        torch.testing.assert_close(loss, expected.detach(), **TOL)
        for p, g in zip(head.parameters(), torch.autograd.grad(expected, list(head.parameters()))):
            torch.testing.assert_close(grads[p], g, **TOL)
        _warned_once(step, warned, message)
    assert step.recordings == 2


class _Recurrent(torch.nn.Module):  # the user's module: state and logs the loop keeps on it, never read by forward
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4).double()
        self.last_loss, self.hidden, self.steps = None, None, 0

    def forward(self, x):
        return torch.tanh(self.proj(x)).sum()


def test_attributes_of_the_user_s_module_its_code_never_loads_record_nothing():
    """A module of the user's own class: every public number, str or None attribute was guarded (as torch's own
    modules' are: torch's code reads their ``eps``), so ``model.last_loss = loss.item()`` in the loop re-recorded at
    every call, and an attribute ``None`` at the recording (``model.hidden``) once when set. No code that ran
    loads them: one recording, and each call's loss and gradients are torch's."""
    torch.manual_seed(11)
    model, x = _Recurrent(), r(3, 4, seed=401)
    step = tg.compile(model, fuse=False)
    for call in range(10):
        (loss, grads), warned = _call_once(step, x)
        assert warned == []
        expected = model(x)
        for p, g in zip(model.parameters(), torch.autograd.grad(expected, list(model.parameters()))):
            torch.testing.assert_close(grads[p], g, **TOL)
        torch.testing.assert_close(loss, expected.detach(), **TOL)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * grads[p]
        model.last_loss, model.steps = loss.item(), call + 1
        if call == 2:
            model.hidden = torch.zeros(4, dtype=D)
    assert step.recordings == 1


class _Leaky(torch.nn.LeakyReLU):  # the user's class on one of torch's: torch's forward reads negative_slope
    pass


class _LeakyByHand(torch.nn.Module):  # the user's module handing itself to torch's code, which reads its slope
    def __init__(self):
        super().__init__()
        self.negative_slope, self.inplace = 0.01, False

    def forward(self, x):
        return torch.nn.LeakyReLU.forward(self, x)


class _Gated(torch.nn.Module):  # the user's module reading an attribute that is None at the recording
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4).double()
        self.gate = None

    def forward(self, x):
        h = self.proj(x)
        return (h if self.gate is None else h * self.gate).sum()


@pytest.mark.parametrize("make, attribute, value, message", [
    (_Leaky, "negative_slope", 0.3, "module.negative_slope is now 0.3 (the recording ran with 0.01)"),
    (_LeakyByHand, "negative_slope", 0.3, "module.negative_slope is now 0.3 (the recording ran with 0.01)"),
    (_Gated, "gate", 2.0, "module.gate is now 2.0 (the recording ran with None)")],
    ids=["a subclass of torch's module", "torch's code reading the user's module", "read by the forward"])
def test_attributes_of_the_user_s_module_that_code_reads_are_guarded(make, attribute, value, message):
    """What some code that ran reads of the user's module is still guarded: torch's code (the module derives from
    torch's LeakyReLU, or hands itself to its forward) or the forward's own (``self.gate``, None at the recording:
    setting it is a change the step must see). Each re-records once and gives torch's loss and gradient."""
    torch.manual_seed(12)
    module, w, x = make(), r(4, 4, seed=402), r(3, 4, seed=403)

    def forward(x):
        return module(x @ w).sum()

    step = tg.compile(forward, fuse=False)
    step(x)
    setattr(module, attribute, value)
    (loss, grads), warned = _call_once(step, x)
    _warned_once(step, warned, message)
    _assert_as_torch(loss, grads, forward, x, w)


class _Settings:  # the user's own object: plain Python attributes the forward branches on
    def __init__(self):
        self.update = True  # count the batches seen (under no_grad)
        self.penalty = False  # add a weight penalty to the loss
        self.activation = "tanh"


def _settings_step(s, w1, w2, seen):
    def loss_of(w1, w2, x, y):
        h = w1 @ x.T
        h = torch.tanh(h) if s.activation == "tanh" else torch.relu(h)
        loss = F.cross_entropy((w2 @ h).T, y)
        if s.penalty:
            loss = loss + 0.1 * w1.pow(2).sum()
        return loss

    def forward(x, y):
        if s.update:
            with torch.no_grad():
                seen.add_(1)
        return loss_of(w1, w2, x, y)

    return forward, loss_of


@pytest.mark.parametrize("attribute, values", [("penalty", (False, True)), ("update", (True, False)),
                                               ("activation", ("tanh", "relu"))])
def test_guard_on_bool_and_str_attributes_of_the_user_s_own_object(attribute, values):
    """``if s.penalty:`` (a branch in the loss), ``if s.update:`` (around a no_grad update) and a str mode
    (``s.activation``): flipped between calls, the step does what the forward now says, as plain torch does."""
    s, w1, w2, seen = _Settings(), r(8, 6, seed=192), r(4, 8, seed=193), torch.zeros((), dtype=D)
    x, y = r(16, 6, seed=194), torch.tensor([0, 1, 2, 3] * 4)
    forward, loss_of = _settings_step(s, w1, w2, seen)
    step = tg.compile(forward, fuse=False)
    first, second = values
    expected_seen = 0
    for value, message in ((first, None),
                           (second, f"s.{attribute} is now {second!r} (the recording ran with {first!r})"),
                           (second, None), (first, None), (second, None), (first, None)):
        setattr(s, attribute, value)
        (loss, grads), warned = _call_once(step, x, y)
        expected_seen += s.update
        leaves = [w1.clone().requires_grad_(), w2.clone().requires_grad_()]
        expected = loss_of(*leaves, x, y)
        torch.testing.assert_close(loss, expected.detach(), **TOL)
        for w, g in zip((w1, w2), torch.autograd.grad(expected, leaves)):
            torch.testing.assert_close(grads[w], g, **TOL)
        assert seen.item() == expected_seen
        _warned_once(step, warned, message)
    assert step.recordings == 2


def test_attribute_guard_compares_as_python_code_can_tell():
    """A NaN equals a NaN (a new NaN object records nothing), an equal value in a new object records nothing,
    a number of another type does (``1`` for ``1.0`` makes ``torch.full`` build an int64 tensor, exact where
    float32 rounds), and so does a deleted attribute the forward reads; one it never reads records nothing."""
    s, w, x = _Settings(), r(4, seed=195), r(4, seed=196)
    s.scale, s.offset, s.bonus = float("nan"), 1.0, 0.5

    def forward(x, w=w):
        if s.scale != s.scale:  # a NaN: no scale
            return (x * w).sum() * (torch.full((), s.offset) + 2 ** 24).to(D).sub(2 ** 24 - 1) + getattr(
                s, "bonus", 0.0)
        return (x * w).sum() * s.scale

    step = tg.compile(forward, fuse=False)
    for change, message in ((None, None),
                            (lambda: setattr(s, "scale", float("nan")), None),
                            (lambda: setattr(s, "offset", float(int("1"))), None),  # an equal float, a new object
                            (lambda: setattr(s, "offset", 1), "s.offset is now 1 (the recording ran with 1.0)"),
                            (lambda: delattr(s, "penalty"), None),  # never read by this forward
                            (lambda: delattr(s, "bonus"), "s.bonus was deleted (the recording ran with 0.5)")):
        if change is not None:
            change()
        (loss, grads), warned = _call_once(step, x)
        torch.testing.assert_close(loss, forward(x), **TOL)
        torch.testing.assert_close(grads[w], _torch_grad(lambda w: forward(x, w), w), **TOL)
        _warned_once(step, warned, message)
    assert step.recordings == 3


class _Net:  # the user's own object holding its layers in a list attribute
    def __init__(self, *weights):
        self.layers = list(weights)
        self.act = torch.tanh


def _through(layers, x, act=torch.tanh):
    for w in layers:
        x = act(x @ w)
    return x.sum()


class _Wrapper:  # the user's object whose __call__ calls no torch function itself: it hands x to its model
    def __init__(self, model):
        self.model = model

    def __call__(self, x):
        return self.model(x)


class _Layers:  # the user's model, reached through the wrapper
    def __init__(self, *weights):
        self.layers = list(weights)

    def __call__(self, x):
        return _through(self.layers, x)


class _Aliased(_Layers):  # the same list under an attribute the forward never loads, found first
    def __init__(self, *weights):
        self.all_layers = list(weights)
        self.layers = self.all_layers


class _Blocks(torch.nn.Module):  # a module holding its blocks in a plain list (not an nn.ModuleList)
    def __init__(self, *blocks):
        super().__init__()
        self.blocks = list(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x.sum()


class _ClassScaled:  # a setting held by the class, read as self.scale
    scale = 1.0

    def __init__(self, w):
        self.w = w

    def __call__(self, x):
        return _through([self.w], x) * self.scale


class _ClassLayers:  # layers held by the class
    layers: list = []

    def __call__(self, x):
        return _through(self.layers, x)


class _Named:  # an attribute read by getattr with a constant name
    def __init__(self, *weights):
        self.layers = list(weights)

    def __call__(self, x):
        return _through(self.layers, x)


def _partial_forward(layers, x):
    return _through(layers, x)


class _Private:  # the user's object reading its layers through a private attribute
    def __init__(self, *weights):
        self._layers = list(weights)

    def __call__(self, x):
        return _through(self._layers, x)


class _PrivateScale(torch.nn.Module):  # the user's module reading a private number and a private list
    def __init__(self, w):
        super().__init__()
        self._scale, self._weights = 1.0, [w]

    def forward(self, x):
        return _through(self._weights, x) * self._scale


def _container_cases():
    """(forward, change, message, the tensors whose gradients to check after it) for each kind of place a forward
    reaches its structure through: a list, a dict, an attribute, a module's submodules and parameters, a closure
    variable. Every change leaves the forward's code and the recorded tensors' values as they were."""
    w = [r(4, 4, seed=300 + k) for k in range(3)]
    cases = {}

    layers = [w[0], w[1]]
    cases["list appended"] = (lambda x: _through(layers, x), lambda: layers.append(w[2]),
                              "layers now has 3 items (the recording's had 2)", w)
    swapped = [w[0], w[1]]
    cases["list item replaced"] = (lambda x: _through(swapped, x), lambda: swapped.__setitem__(0, w[2]),
                                   "swapped[0] now refers to a different tensor", w)
    scales = [1.0]
    cases["list number changed"] = (lambda x: (x @ w[0]).sum() * scales[0], lambda: scales.__setitem__(0, 3.0),
                                    "scales[0] is now 3.0 (the recording ran with 1.0)", w[:1])
    cfg = {"scale": 1.0}
    cases["dict number changed"] = (lambda x: (x @ w[0]).sum() * cfg["scale"], lambda: cfg.update(scale=0.5),
                                    "cfg['scale'] is now 0.5 (the recording ran with 1.0)", w[:1])
    blocks = {"a": w[0], "b": w[1]}
    cases["dict reordered"] = (lambda x: _through(blocks.values(), x),
                               lambda: blocks.update(a=blocks.pop("a")),
                               "the keys of blocks are in another order (the recording's: ['a', 'b'])", w[:2])
    acts = {"tanh": w[0]}  # the same item under another key: the forward reads the key
    cases["dict key renamed"] = (lambda x: sum(getattr(torch, name)(x @ v).sum() for name, v in acts.items()),
                                 lambda: acts.update(sin=acts.pop("tanh")), "acts['tanh'] was deleted", w[:1])
    net = _Net(w[0], w[1])
    cases["attribute list appended"] = (lambda x: _through(net.layers, x, net.act), lambda: net.layers.append(w[2]),
                                        "net.layers now has 3 items (the recording's had 2)", w)
    net2 = _Net(w[0], w[1])
    cases["attribute rebound"] = (lambda x: _through(net2.layers, x, net2.act),
                                  lambda: setattr(net2, "layers", net2.layers[:1]),
                                  "net2.layers now refers to a different object (a list)", w[:2])
    net3 = _Net(w[0], w[1])
    cases["attribute function rebound"] = (lambda x: _through(net3.layers, x, net3.act),
                                           lambda: setattr(net3, "act", torch.sigmoid),
                                           "net3.act now refers to a different object (sigmoid)", w[:2])
    torch.manual_seed(9)
    stack = torch.nn.ModuleList([torch.nn.Linear(4, 4).double()])
    extra = torch.nn.Linear(4, 4).double()
    cases["module list appended"] = (lambda x: _through([], torch.stack([m(x) for m in stack]).sum(0)),
                                     lambda: stack.append(extra), "stack.1 was added",
                                     list(stack.parameters()) + list(extra.parameters()))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh()).double()
    cases["submodule replaced"] = (lambda x: model(x).sum(), lambda: model.__setitem__(1, torch.nn.Sigmoid()),
                                   "model.1 now refers to a different object (a Sigmoid)", list(model.parameters()))
    linear = torch.nn.Linear(4, 4).double()
    cases["parameter replaced"] = (lambda x: torch.tanh(linear(x)).sum(),
                                   lambda: setattr(linear, "weight", torch.nn.Parameter(r(4, 4, seed=310))),
                                   "linear.weight now refers to a different tensor", [linear.bias])

    norm = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).double().eval()
    cases["buffer replaced"] = (lambda x: torch.tanh(norm(x)).sum(),
                                lambda: setattr(norm[1], "running_mean", r(4, seed=311)),
                                "norm.1.running_mean now refers to a different tensor", list(norm.parameters()))

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = r(4, seed=312)  # a plain attribute: neither a parameter nor a buffer

        def forward(self, x):
            return (x @ w[0] * self.scale).sum()

    scaled = Scaled()
    cases["module tensor attribute replaced"] = (scaled, lambda: setattr(scaled, "scale", r(4, seed=313)),
                                                 "Scaled.scale now refers to a different tensor", w[:1])

    def closure_case():
        act = torch.tanh

        def forward(x):
            return act(x @ w[0]).sum()

        def change():
            nonlocal act
            act = torch.relu

        return forward, change

    forward, change = closure_case()
    cases["closure function rebound"] = (forward, change, "'act' now refers to a different object (relu)", w[:1])

    script = _script(W=w[0], layers=[w[0]], SCALE=1.0, vs=w[:2])  # a user's module: forward calls its helpers
    cases["helper's global rebound"] = (script["through_helper"], lambda: script.update(W=w[1]),
                                        "'W' now refers to a different tensor", w[:2])
    cases["helper's global list appended"] = (script["through_layers"], lambda: script["layers"].append(w[2]),
                                              "layers now has 2 items (the recording's had 1)", w)
    cases["comprehension reads a global"] = (script["comprehension"], lambda: script.update(SCALE=2.0),
                                             "'SCALE' changed from 1.0 to 2.0 (the recording used its value)", w[:2])
    other = _script(SCALE=1.0)
    users_model = other["Model"](w[0])
    cases["method reads a global"] = (lambda x: users_model(x), lambda: other.update(SCALE=3.0),
                                      "'SCALE' changed from 1.0 to 3.0 (the recording used its value)", w[:1])
    wrapped = _Wrapper(_Layers(w[0]))
    cases["list of an object called by one whose code calls no torch"] = (
        lambda x: wrapped(x), lambda: wrapped.model.layers.append(w[1]),
        "wrapped.model.layers now has 2 items (the recording's had 1)", w[:2])
    aliased = _Aliased(w[0])
    cases["list also held by an attribute never loaded"] = (
        lambda x: aliased(x), lambda: aliased.layers.append(w[1]),
        "aliased.layers now has 2 items (the recording's had 1)", w[:2])
    held = _Blocks(torch.nn.Linear(4, 4).double())
    block = torch.nn.Linear(4, 4).double()
    cases["module's plain list of modules appended"] = (
        held, lambda: held.blocks.append(block), "_Blocks.blocks now has 2 items (the recording's had 1)",
        list(held.blocks[0].parameters()) + list(block.parameters()))
    scaled_by_class = _ClassScaled(w[0])
    cases["class attribute changed"] = (lambda x: scaled_by_class(x), lambda: setattr(_ClassScaled, "scale", 2.0),
                                        "_ClassScaled.scale is now 2.0 (the recording ran with 1.0)", w[:1])
    _ClassLayers.layers.append(w[0])
    class_layers = _ClassLayers()
    cases["class attribute list appended"] = (lambda x: class_layers(x), lambda: _ClassLayers.layers.append(w[1]),
                                              "_ClassLayers.layers now has 2 items (the recording's had 1)", w[:2])
    named = _Named(w[0])
    cases["attribute read by getattr appended"] = (lambda x: named(x), lambda: named.layers.append(w[1]),
                                                   "named.layers now has 2 items (the recording's had 1)", w[:2])
    shadowed = _ClassScaled(w[0])
    cases["class attribute shadowed by the object's"] = (
        lambda x: shadowed(x), lambda: setattr(shadowed, "scale", 3.0),
        "shadowed.scale was set on the object (the recording read its class's scale)", w[:1])
    partial_layers = [w[0]]
    cases["functools.partial's argument appended"] = (
        functools.partial(_partial_forward, partial_layers), lambda: partial_layers.append(w[1]),
        "layers now has 2 items (the recording's had 1)", w[:2])
    private = _Private(w[0])
    cases["the user's object's private list appended"] = (lambda x: private(x), lambda: private._layers.append(w[1]),
                                                          "private._layers now has 2 items (the recording's had 1)",
                                                          w[:2])
    private_module = _PrivateScale(w[0])
    cases["the user's module's private number changed"] = (
        lambda x: private_module(x), lambda: setattr(private_module, "_scale", 3.0),
        "private_module._scale is now 3.0 (the recording ran with 1.0)", w[:1])
    private_list = _PrivateScale(w[0])
    cases["the user's module's private list appended"] = (
        lambda x: private_list(x), lambda: private_list._weights.append(w[1]),
        "private_list._weights now has 2 items (the recording's had 1)", w[:2])
    return cases


_SCRIPT = """
def mlp(x):
    return torch.tanh(x @ W)

def through_helper(x):
    return mlp(x).sum()

def deep(x):
    for v in layers:
        x = torch.tanh(x @ v)
    return x

def through_layers(x):
    return deep(x).sum()

def comprehension(x):
    return torch.stack([torch.tanh(x @ v) * SCALE for v in vs]).sum()

class Model:
    def __init__(self, W):
        self.W = W

    def __call__(self, x):
        return torch.tanh(x @ self.W).sum() * SCALE
"""


def _script(**variables):
    """The globals of a user's script defining ``_SCRIPT``'s functions, which read ``variables``."""
    namespace = {"__name__": "users_script", "torch": torch, **variables}
    exec(_SCRIPT, namespace)  # noqa: S102 - a module of the user's own, with globals the test changes
    return namespace


_CONTAINER_CASES = _container_cases()


@pytest.mark.parametrize("case", list(_CONTAINER_CASES))
def test_guard_on_the_structure_the_forward_reaches(case):
    """A layer appended to a list, an item or attribute replaced, a number changed inside a list or dict, a
    submodule, parameter or buffer swapped, a function rebound, a global that a helper function, a comprehension
    or a method reads changed: the step re-records once, saying what changed, and
    gives torch's results (the old code silently replayed the recording's structure)."""
    forward, change, message, tensors = _CONTAINER_CASES[case]
    x = r(3, 4, seed=320)
    step = tg.compile(forward, fuse=False)
    step(x)
    change()
    (loss, grads), warned = _call_once(step, x)
    _warned_once(step, warned, message)
    _, warned = _call_once(step, x)
    _warned_once(step, warned, None)  # the guard holds again
    flags = [t.requires_grad for t in tensors]
    for t in tensors:
        t.requires_grad_(True)
    try:
        expected = forward(x)
        expected_grads = torch.autograd.grad(expected, tensors, allow_unused=True)
    finally:
        for t, flag in zip(tensors, flags):
            t.requires_grad_(flag)
    torch.testing.assert_close(loss, expected.detach(), **TOL)
    for t, g in zip(tensors, expected_grads):
        if g is not None:
            torch.testing.assert_close(grads[t], g, **TOL)


class _Trainer:  # an engineer's training loop: the step is a bound method; the loop logs into the same object
    def __init__(self, w):
        self.w, self.losses, self.log = w, [], {"loss": None}
        self.step = tg.compile(self.loss_of, fuse=False)

    def loss_of(self, x):
        return torch.tanh(x @ self.w).sum()

    def train(self, x, steps):
        for _ in range(steps):
            loss, grads = self.step(x)
            with torch.no_grad():
                self.w -= 0.1 * grads[self.w]
            self.losses.append(loss.item())
            self.log["loss"] = self.losses[-1]


def test_structure_guard_leaves_out_what_the_forward_never_loads():
    """A list and a dict the loop fills on the forward's own object, which its code never loads, record nothing
    (guarding them would re-record at every step); the loss follows torch's at every step."""
    w, x = r(4, 4, seed=340), r(3, 4, seed=341)
    trainer = _Trainer(w.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecompileWarning)
        trainer.train(x, 5)
    assert trainer.step.recordings == 1
    expected, _ = _tanh_sgd(w, x, [0.1] * 5)
    assert trainer.losses == pytest.approx(expected, rel=1e-12)


def _tanh_sgd(w, x, lrs):
    """Torch autograd's SGD on the trainers' loss ``tanh(x @ w).sum()``: each step's loss, and the last ``w``."""
    losses = []
    for lr in lrs:
        losses.append(torch.tanh(x @ w).sum().item())
        w = w - lr * _torch_grad(lambda w: torch.tanh(x @ w).sum(), w)
    return losses, w


class _CountingTrainer(_Trainer):  # the loop keeps its counters and logs on the step's own object
    def __init__(self, w):
        self.iteration, self.last_loss, self.scale = 0, None, 1.0
        self.opt = types.SimpleNamespace(lr=0.1)  # an optimiser-like object the forward never loads
        super().__init__(w)

    def loss_of(self, x):
        return torch.tanh(x @ self.w).sum() * self.scale

    def train(self, x, steps):
        for _ in range(steps):
            loss, grads = self.step(x)
            with torch.no_grad():
                self.w -= self.opt.lr * grads[self.w]
            self.iteration += 1
            self.last_loss = loss.item()
            self.opt.lr *= 0.9


def test_numbers_the_forward_never_loads_record_nothing():
    """A step counter, the last loss and a decaying learning rate kept on the step's own object re-recorded at
    every call (any number attribute was guarded); only the numbers the forward's code loads are: ``self.scale``
    changed re-records once. Each step's loss is torch's."""
    w, x = r(4, 4, seed=380), r(3, 4, seed=381)
    trainer = _CountingTrainer(w.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecompileWarning)
        trainer.train(x, 4)
    assert trainer.step.recordings == 1
    trainer.scale = 2.0
    (loss, _), warned = _call_once(trainer.step, x)
    _warned_once(trainer.step, warned, "self.scale is now 2.0 (the recording ran with 1.0)")
    torch.testing.assert_close(loss, torch.tanh(x @ trainer.w).sum() * 2.0, **TOL)
    _, expected = _tanh_sgd(w, x, list(itertools.accumulate([0.1, 0.9, 0.9, 0.9], operator.mul)))  # lr *= 0.9
    torch.testing.assert_close(trainer.w, expected, **TOL)


class _Net:  # the user's class reaching its weights through a method and its activation through a property
    def __init__(self, weights):
        self.weight_list, self._act = weights, torch.tanh

    @property
    def act(self):
        return self._act

    def weights(self):
        return self.weight_list

    def __call__(self, x):
        for w in self.weights():
            x = self.act(x @ w)
        return x.sum()


@pytest.mark.parametrize("change, message", [
    (lambda net, w: net.weight_list.append(w), "net.weight_list now has 2 items (the recording's had 1)"),
    (lambda net, w: setattr(net, "_act", torch.sigmoid), "net._act now refers to a different object (sigmoid)")])
def test_structure_guard_follows_the_methods_and_properties_the_forward_names(change, message):
    """What the forward reads through its objects' methods and properties is guarded like what it names."""
    w, x = [r(4, 4, seed=350 + k) for k in range(2)], r(3, 4, seed=352)
    net = _Net([w[0]])

    def forward(x):
        return net(x)

    step = tg.compile(forward, fuse=False)
    step(x)
    change(net, w[1])
    (loss, _), warned = _call_once(step, x)
    _warned_once(step, warned, message)
    torch.testing.assert_close(loss, forward(x), **TOL)


@pytest.mark.parametrize("generator", ["random", "numpy"])
def test_random_numbers_drawn_outside_torch_send_the_step_to_the_engine(generator):
    """A batch sampled with Python's random module or numpy.random inside the forward: the compiled code would
    reuse the recording's batch at every call (it did, silently); the step says so once and runs the engine,
    which draws again, and every call gives torch's loss and gradient on the batch drawn for it."""
    import random

    import numpy

    data, w = r(50, 4, seed=360), r(4, 3, seed=361)

    def draw():
        return random.sample(range(50), 8) if generator == "random" else numpy.random.randint(0, 50, 8)

    def forward():
        return F.cross_entropy(data[draw()] @ w, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))

    step = tg.compile(forward, fuse=False)
    losses = []
    for call in range(3):
        random.seed(call), numpy.random.seed(call)
        if call == 0:
            with pytest.warns(RecompileWarning, match="is no longer compiled: the forward draws random numbers from "
                                                      + ("Python's random module" if generator == "random"
                                                         else "numpy.random")):
                loss, grads = step()
        else:
            loss, grads = step()
        random.seed(call), numpy.random.seed(call)
        torch.testing.assert_close(loss, forward(), **TOL)
        random.seed(call), numpy.random.seed(call)
        torch.testing.assert_close(grads[w], _torch_grad(lambda w: F.cross_entropy(
            data[draw()] @ w, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])), w), **TOL)
        losses.append(loss.item())
    assert len(set(losses)) == 3  # three batches


def test_a_numpy_index_keeps_the_fused_rules():
    """``C[ix]`` with a numpy array of indices: the fusion's index test compared the array with a slice (numpy's
    element-wise ==) and gave up the fused rules for the whole step with a warning."""
    import numpy

    C, W = r(27, 4, seed=370), r(4, 27, seed=371)
    ix, y = numpy.array([1, 5, 7, 3]), torch.tensor([2, 0, 26, 5])

    def forward():
        return F.cross_entropy(C[ix] @ W, y)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step = tg.compile(forward)
        loss, grads = step()
    torch.testing.assert_close(grads[W], _torch_grad(lambda W: F.cross_entropy(C[ix] @ W, y), W), **TOL)


def test_structure_guard_walks_an_object_with_a_non_string_attribute_name():
    """An object whose ``__dict__`` has a key that is not a string (``vars(o)[1] = 2``) within the forward's
    reach: the recording crashed (``'int' object has no attribute 'startswith'``)."""
    w, x = r(4, 4, seed=335), r(3, 4, seed=336)
    holder = types.SimpleNamespace(w=w)
    vars(holder)[1] = 2

    def forward(x):
        return torch.tanh(x @ holder.w).sum()

    loss, grads = tg.compile(forward, fuse=False)(x)
    torch.testing.assert_close(grads[w], _torch_grad(lambda w: torch.tanh(x @ w).sum(), w), **TOL)


def test_structure_guard_accepts_what_cannot_change_the_step():
    """An equal number in a new object, and a tensor the loss never read replaced, record nothing."""
    w, unused, x = r(4, 4, seed=330), r(4, seed=331), r(3, 4, seed=332)
    held = {"w": w, "unused": unused, "scale": 0.5}

    def forward(x):
        return (x @ held["w"]).sum() * held["scale"]

    step = tg.compile(forward, fuse=False)
    step(x)
    held["scale"] = float("0.5")
    held["unused"] = r(4, seed=333)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecompileWarning)
        loss, grads = step(x)
    assert step.recordings == 1
    torch.testing.assert_close(loss, forward(x), **TOL)
    torch.testing.assert_close(grads[w], _torch_grad(lambda w: (x @ w).sum() * 0.5, w), **TOL)


def _tanh_loss(x, w):
    return torch.tanh(x @ w).sum()


def _assert_as_torch(loss, grads, forward, x, w):
    """``loss`` and ``grads[w]`` are torch autograd's for ``forward(x)`` (float64), ``w`` being the leaf."""
    w.requires_grad_(True)
    try:
        expected = forward(x)
        expected_grad, = torch.autograd.grad(expected, w)
    finally:
        w.requires_grad_(False)
    torch.testing.assert_close(loss, expected.detach(), **TOL)
    torch.testing.assert_close(grads[w], expected_grad, **TOL)


_CONFIG = {"scale": 0.5, "step": 0, "w": r(4, 4, seed=389)}  # a global config the loop writes its step into


def _global_config_loss(x):
    return _tanh_loss(x, _CONFIG["w"]) * _CONFIG["scale"]


class _Configured:  # the user's object reading a setting of its config dict
    def __init__(self, w):
        self.w, self.cfg = w, {"scale": 0.5, "step": 0}

    def __call__(self, x):
        return _tanh_loss(x, self.w) * self.cfg["scale"]


class _ConfiguredModule(torch.nn.Module):  # the same, as the user's nn.Module (a plain dict attribute)
    def __init__(self, w):
        super().__init__()
        self.w, self.cfg = w, {"scale": 0.5, "step": 0}

    def forward(self, x):
        return _tanh_loss(x, self.w) * self.cfg["scale"]


def _keyed_cases():
    """(forward, what the loop does before call i, the weight) where the forward reads its dict or list only by
    constant keys and the loop changes other items: the compiled step stays right without re-recording."""
    w = r(4, 4, seed=390)
    cases = {}
    cfg = {"scale": 0.5, "step": 0, "history": []}

    def log_step(i):
        cfg["step"] = i
        cfg["history"].append(float(i))  # a list under a key the forward never reads

    cases["closure dict, the loop sets other keys"] = (lambda x: _tanh_loss(x, w) * cfg["scale"], log_step, w)
    cases["global dict, the loop sets another key"] = (_global_config_loss,
                                                       lambda i: _CONFIG.__setitem__("step", i), _CONFIG["w"])
    log = [2.0]
    cases["list read at [0], the loop appends"] = (lambda x: _tanh_loss(x, w) * log[0],
                                                   lambda i: log.append(float(i)), w)
    opts = {"scale": 0.5}
    cases["dict.get, a missing key with a default"] = (
        lambda x: _tanh_loss(x, w) * opts.get("scale") + opts.get("shift", 0.0),
        lambda i: opts.__setitem__("step", i), w)
    configured = _Configured(w)
    cases["the user's object's dict"] = (lambda x: configured(x),
                                         lambda i: configured.cfg.__setitem__("step", i), w)
    module = _ConfiguredModule(w)
    cases["the user's module's dict"] = (module, lambda i: module.cfg.__setitem__("step", i), w)
    return cases


_KEYED_CASES = _keyed_cases()


@pytest.mark.parametrize("case", list(_KEYED_CASES))
def test_structure_guard_guards_only_the_items_read_by_constant_keys(case):
    """A config dict the forward reads ``cfg["scale"]`` of, or a list it reads ``log[0]`` of, while the training
    loop writes ``cfg["step"] = i`` or appends to the list: the whole dict or list was guarded, so every call
    re-recorded (10 recordings in 10 calls). Only the items at the keys read are guarded now: one recording, and
    each call's loss and gradient are torch's."""
    forward, between, w = _KEYED_CASES[case]
    step = tg.compile(forward, fuse=False)
    x = r(3, 4, seed=391)
    for call in range(10):
        between(call)
        (loss, grads), warned = _call_once(step, x)
        assert warned == []
        _assert_as_torch(loss, grads, forward, x, w)
        with torch.no_grad():
            w -= 0.01 * grads[w]  # (a training step: the next call's values differ)
    assert step.recordings == 1


class _DerivedConfig(dict):  # a dict whose __getitem__ reads another key
    def __getitem__(self, key):
        return dict.__getitem__(self, "base") * 2 if key == "scale" else dict.__getitem__(self, key)


def _scaled_by(cfg, loss):  # the user's helper reading a setting of the dict passed to it
    return loss * cfg["scale"]


_SETTINGS = {"scale": 0.5, "alpha": 1.0}


def _alpha():  # four calls down from the forward: deeper than the helpers the guard follows by their names
    return _SETTINGS["alpha"]


def _alpha_3():
    return _alpha()


def _alpha_2():
    return _alpha_3()


def _alpha_1():
    return _alpha_2()


_GLOBAL_SCALE = 1.0


class _Node:  # the user's objects holding one another, and settings at the bottom
    def __init__(self, child=None, settings=None):
        self.child, self.settings = child, settings


def _totals(settings):  # a generator summing the settings it was given (a local: no name the guard reads)
    while True:
        yield sum(settings.values())


class _ReadsItsAttributes:  # the user's object reading a list by a constant index, and by vars(self)
    def __init__(self, w):
        self.w, self.scales = w, [0.5]

    def __call__(self, x):
        loss = _tanh_loss(x, self.w) * self.scales[0]
        for value in vars(self).values():
            if isinstance(value, list):
                loss = loss * len(value)
        return loss


class _ScaledByGlobal:  # the user's object whose method, calling no torch function, reads a global
    def __init__(self, w):
        self.w = w

    def scale(self):
        return _GLOBAL_SCALE

    def __call__(self, x):
        return _tanh_loss(x, self.w) * self.scale()


def _still_guarded_cases():
    """(forward, change, message) where what the forward reads of a dict or list changes: the item at a key it
    reads, or any item where it reads a computed key, iterates, passes the dict on, or reads through a dict
    subclass. Each must re-record."""
    w = r(4, 4, seed=392)
    cases = {}
    cfg = {"scale": 0.5, "step": 0}
    cases["the key read changed"] = (lambda x: _tanh_loss(x, w) * cfg["scale"], lambda: cfg.update(scale=2.0),
                                     "cfg['scale'] is now 2.0 (the recording ran with 0.5)")
    computed, key = {"scale": 0.5, "step": 0}, "scale"
    cases["a computed key"] = (lambda x: _tanh_loss(x, w) * computed[key], lambda: computed.update(scale=2.0),
                               "computed['scale'] is now 2.0 (the recording ran with 0.5)")
    weights = {"a": 0.5, "b": 2.0}
    cases["the dict iterated"] = (lambda x: _tanh_loss(x, w) * sum(weights.values()),
                                  lambda: weights.update(b=3.0), "weights['b'] is now 3.0 (the recording ran with 2.0)")
    passed = {"scale": 0.5}
    cases["the dict passed to a helper"] = (lambda x: _scaled_by(passed, _tanh_loss(x, w)),
                                            lambda: passed.update(scale=2.0),
                                            "passed['scale'] is now 2.0 (the recording ran with 0.5)")
    log = [1.0, 2.0]
    cases["the last item read, the loop appends"] = (lambda x: _tanh_loss(x, w) * log[-1], lambda: log.append(3.0),
                                                     "log[-1] is now 3.0 (the recording ran with 2.0)")
    added = {"scale": 0.5}
    cases["a key read with get added"] = (lambda x: _tanh_loss(x, w) * added.get("scale") + added.get("shift", 0.0),
                                          lambda: added.update(shift=1.0),
                                          "added['shift'] was added (the recording ran without it)")
    deleted = {"scale": 0.5}
    cases["a key read with get deleted"] = (lambda x: _tanh_loss(x, w) * deleted.get("scale", 1.0),
                                            lambda: deleted.pop("scale"),
                                            "deleted['scale'] was deleted (the recording ran with 0.5)")
    mixers = [r(4, 4, seed=393), r(4, 4, seed=398)]
    cases["a list item read replaced"] = (lambda x: _tanh_loss(x @ mixers[0], w),
                                          lambda: mixers.__setitem__(0, mixers[1]),
                                          "mixers[0] now refers to a different tensor")
    shared = {"scale": 0.5, "other": 1.0}
    holder = types.SimpleNamespace(settings=shared)
    cases["the same dict also iterated through an attribute"] = (
        lambda x: _tanh_loss(x, w) * shared["scale"] * sum(holder.settings.values()),
        lambda: shared.update(other=3.0), "holder.settings['other'] is now 3.0 (the recording ran with 1.0)")
    cases["another key read four calls down"] = (lambda x: _tanh_loss(x, w) * _SETTINGS["scale"] * _alpha_1(),
                                                 lambda: _SETTINGS.update(alpha=2.0),
                                                 "_SETTINGS['alpha'] is now 2.0 (the recording ran with 1.0)")
    settings = {"scale": 0.5, "alpha": 1.0}
    hooks = {"alpha": lambda: settings["alpha"]}
    cases["another key read by a function held in a dict"] = (
        lambda x: _tanh_loss(x, w) * settings["scale"] * hooks["alpha"](), lambda: settings.update(alpha=2.0),
        "settings['alpha'] is now 2.0 (the recording ran with 1.0)")
    by_global = _ScaledByGlobal(w)
    cases["a global read by a method that calls no torch function"] = (
        lambda x: by_global(x), lambda: globals().update(_GLOBAL_SCALE=2.0),
        "'_GLOBAL_SCALE' changed from 1.0 to 2.0 (the recording used its value)")
    generic = _ReadsItsAttributes(w)
    cases["a list also reached by vars(self)"] = (lambda x: generic(x), lambda: generic.scales.append(1.0),
                                                  "generic.scales now has 2 items (the recording's had 1)")
    deep_shared = {"scale": 0.5, "other": 1.0}
    deep = _Node(_Node(_Node(_Node(settings=deep_shared))))  # four levels down: deeper than the guard walks
    cases["the same dict also iterated four levels down"] = (
        lambda x: _tanh_loss(x, w) * deep_shared["scale"] * sum(deep.child.child.child.settings.values()),
        lambda: deep_shared.update(other=3.0), "deep_shared['other'] is now 3.0 (the recording ran with 1.0)")
    gen_shared = {"scale": 0.5, "other": 1.0}
    totals = _totals(gen_shared)
    cases["the same dict also iterated by a generator"] = (
        lambda x: _tanh_loss(x, w) * gen_shared["scale"] * next(totals),
        lambda: gen_shared.update(other=3.0), "gen_shared['other'] is now 3.0 (the recording ran with 1.0)")
    derived = _DerivedConfig(base=0.5)
    cases["a dict subclass"] = (lambda x: _tanh_loss(x, w) * derived["scale"], lambda: derived.update(base=2.0),
                                "derived['base'] is now 2.0 (the recording ran with 0.5)")
    return {name: (*case, w) for name, case in cases.items()}


_STILL_GUARDED_CASES = _still_guarded_cases()


@pytest.mark.parametrize("case", list(_STILL_GUARDED_CASES))
def test_structure_guard_re_records_when_what_the_forward_reads_changes(case):
    """Guarding a dict or list by the constant keys the forward reads must not miss a change it reads: the key
    read, by the forward or by any code that ran while recording (a helper four calls down, a function held in a
    dict: the guard follows neither by its names), or, where the keys read are not known (a computed key, the
    dict iterated or passed on, a dict subclass, code reaching attributes by computed names, the dict held
    where the guard does not look: four levels down, by a generator), any item. The step
    re-records once, says what changed, and gives torch's loss and gradient. (A global read by a method calling
    no torch function was not guarded at all: the old code replayed the recording's value.)"""
    forward, change, message, w = _STILL_GUARDED_CASES[case]
    step = tg.compile(forward, fuse=False)
    x = r(3, 4, seed=394)
    step(x)
    change()
    (loss, grads), warned = _call_once(step, x)
    _warned_once(step, warned, message)
    _assert_as_torch(loss, grads, forward, x, w)
    (loss, grads), warned = _call_once(step, x)
    _warned_once(step, warned, None)  # the guard holds again
    _assert_as_torch(loss, grads, forward, x, w)


def test_structure_guard_under_a_profiler_guards_lists_and_dicts_whole():
    """Under a profiler (another ``sys.setprofile`` hook) the recording cannot see which code ran: a dict is
    guarded whole again, so that a key read four calls down, where the guard follows no name, is still seen."""
    w, x = r(4, 4, seed=404), r(3, 4, seed=405)
    settings = dict(_SETTINGS)

    def forward(x):
        return _tanh_loss(x, w) * _SETTINGS["scale"] * _alpha_1()

    step = tg.compile(forward, fuse=False)
    sys.setprofile(lambda frame, event, arg: None)
    try:
        step(x)
    finally:
        sys.setprofile(None)
    try:
        _SETTINGS["alpha"] = settings["alpha"] + 2.0
        (loss, grads), warned = _call_once(step, x)
        _warned_once(step, warned, f"_SETTINGS['alpha'] is now {settings['alpha'] + 2.0} (the recording ran with "
                                   f"{settings['alpha']})")
        _assert_as_torch(loss, grads, forward, x, w)
    finally:
        _SETTINGS.update(settings)


def test_a_list_the_forward_only_appends_to_is_not_guarded():
    """The forward appends each step's activations to a list for statistics, and the loop reads and clears it:
    the list was guarded whole, so every call re-recorded. The forward never reads it, so nothing of it is
    guarded; the recording says that the compiled step does not append (it replays torch calls, not Python),
    and each call's loss and gradient are torch's."""
    w, x = r(4, 4, seed=396), r(3, 4, seed=397)
    acts = []

    def forward(x):
        h = torch.tanh(x @ w)
        acts.append(h.detach())
        return h.sum()

    step = tg.compile(forward, fuse=False)
    with pytest.warns(UserWarning, match="the forward appends to acts; the compiled step does not: it replays torch "
                                         "calls, not Python code, so later calls add nothing to it"):
        step(x)
    for _ in range(9):
        acts.clear()
        (loss, grads), warned = _call_once(step, x)
        assert warned == [] and acts == []  # (as the note says)
        _assert_as_torch(loss, grads, forward, x, w)
        with torch.no_grad():
            w -= 0.01 * grads[w]
    assert step.recordings == 1 and step.fallback is None  # (compiled: not the engine)


def test_a_list_the_forward_appends_to_and_reads_runs_through_the_engine():
    """A list the forward appends to and iterates: each call's loss depends on what the list holds, and the
    forward changes it while recorded, so the recording cannot be replayed; the loop clearing it or not, each
    call's loss and gradient are torch's (the engine runs the forward's Python code from the second call on)."""
    w, x = r(4, 4, seed=399), r(3, 4, seed=400)
    acts = []

    def forward(x):
        acts.append(torch.tanh(x @ w))
        return sum(a.sum() for a in acts)

    step = tg.compile(forward, fuse=False)
    expected_acts = []
    for call in range(5):
        if call == 3:
            acts.clear()
            expected_acts.clear()
        (loss, grads), warned = _call_once(step, x)
        w.requires_grad_(True)
        expected_acts.append(torch.tanh(x @ w))
        expected = sum(a.sum() for a in expected_acts)
        expected_grad, = torch.autograd.grad(expected, w)
        w.requires_grad_(False)
        expected_acts[:] = [a.detach() for a in expected_acts]
        torch.testing.assert_close(loss, expected.detach(), **TOL)
        torch.testing.assert_close(grads[w], expected_grad, **TOL)
        assert len(acts) == len(expected_acts)
        if call == 1:
            assert warned[0].endswith("the forward changed acts (a list) while it was recorded, Python state that it "
                                      "also reads: recording it again to see whether it changes it at every call")
            assert "no longer compiled: the forward changes acts (a list) at every call" in warned[1]
        else:
            assert warned == []
    assert step.recordings == 2 and step.fallback is not None


def test_a_step_the_engine_runs_is_not_told_what_the_compiled_step_would_not_do():
    """Notes such as 'the compiled step does not append to acts' were given for a step that then ran through the
    engine, which does append: they said the opposite of what happened."""
    w, x = r(4, 4, seed=401), r(3, 4, seed=402)
    state = types.SimpleNamespace(calls=0, out=None)

    def forward(x):
        state.out = torch.tanh(x @ w)  # (a tensor kept in an attribute: the compiled step would not update it)
        state.calls += 1
        return state.out.sum() * state.calls

    step = tg.compile(forward, fuse=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for call in range(3):
            loss, _ = step(x)
            torch.testing.assert_close(loss, torch.tanh(x @ w).sum() * (call + 1), **TOL)
    messages = [str(w.message) for w in caught]
    assert step.fallback is not None and state.calls == 3
    assert not any("the compiled step does not" in m for m in messages), messages


# ---------------------------------------------------------------- Python state the forward changes and reads


_HISTORY = []  # a global list the forward appends to and reads the length of
_CALLS = 0  # a global counter the forward rebinds and reads
_LOG = []  # a global list that a method of the user's class appends to and reads


class _StepCounter:  # the forward is a bound method counting its calls on its own object
    def __init__(self, w):
        self.w, self.step = w, 0

    def loss(self, x):
        self.step += 1
        scale = 0.99 ** self.step
        return torch.tanh(x @ self.w).sum() * scale


class _Logging:  # a method of the user's class, which no name of the forward's reaches, reads a global it changes
    def __init__(self, w):
        self.w = w

    def __call__(self, x):
        _LOG.append(1.0)
        return torch.tanh(x @ self.w).sum() * len(_LOG)


class _CountingModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.calls = torch.nn.Linear(4, 4, dtype=D), 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(self.fc(x)).sum() / self.calls


def _changing_state(case):
    """A fresh forward changing Python state it reads, and its parameters (a second call starts again from the same
    state: the eager reference's and the compiled step's states evolve apart)."""
    global _CALLS
    w = r(4, 4, seed=410).requires_grad_()
    if case == "a global list appended to, its length read":
        _HISTORY.clear()

        def forward(x):
            n = len(_HISTORY)
            _HISTORY.append(1.0)
            return torch.tanh(x @ w).sum() * (n + 1)
        return forward, [w]
    if case == "a counter attribute incremented and read":
        counter = _StepCounter(w)
        return counter.loss, [w]
    if case == "a dict item written and read":
        cache = {}

        def forward(x):
            cache["k"] = cache.get("k", 0) + 1
            return torch.tanh(x @ w).sum() * cache["k"]
        return forward, [w]
    if case == "a list popped":
        stack = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]

        def forward(x):
            return torch.tanh(x @ w).sum() * stack.pop()
        return forward, [w]
    if case == "a global rebound":
        _CALLS = 0

        def forward(x):
            global _CALLS
            _CALLS += 1
            return torch.tanh(x @ w).sum() * _CALLS
        return forward, [w]
    if case == "a closure variable rebound":
        calls = 0

        def forward(x):
            nonlocal calls
            calls += 1
            return torch.tanh(x @ w).sum() / calls
        return forward, [w]
    if case == "a global list a method appends to":
        _LOG.clear()
        return _Logging(w), [w]
    if case == "a module's counter":
        torch.manual_seed(411)
        model = _CountingModule()
        return model, list(model.parameters())
    if case == "a module's training mode flipped":
        torch.manual_seed(412)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=D), torch.nn.BatchNorm1d(4, dtype=D))

        def forward(x):
            model.train(not model.training)
            return torch.tanh(model(x)).pow(2).sum()
        return forward, list(model.parameters())
    raise AssertionError(case)


_CHANGING_STATE = {
    "a global list appended to, its length read": "_HISTORY (a list)",
    "a counter attribute incremented and read": "self.step",
    "a dict item written and read": "cache (a dict)",
    "a list popped": "stack (a list)",
    "a global rebound": "the global '_CALLS'",
    "a closure variable rebound": "the closure variable 'calls'",
    "a global list a method appends to": "_LOG (a list)",
    "a module's counter": "_CountingModule.calls",
    "a module's training mode flipped": "the training mode of model",
}

class _Swapping:  # double buffering: each call reads one tensor and swaps the two for the next call
    def __init__(self, w, front, back):
        self.w, self.front, self.back = w, front, back

    def loss_of(self, x):
        loss = torch.tanh(x @ self.w + self.front).sum()
        self.front, self.back = self.back, self.front
        return loss


def test_a_forward_swapping_the_tensors_it_reads_gives_torch_s_loss_at_every_call():
    """The forward rebinds self.front (read by the loss) to self.back (not read) and back: Python state it
    reads, changed at every call, so every call runs through the engine. (A mutant counting a rebound tensor as
    a change only when the loss read both the old and the new one replayed the first recording at every call:
    every other loss was the other buffer's.)"""
    w, x = r(4, 4, seed=340), r(3, 4, seed=341)
    front, back = r(4, seed=342), r(4, seed=343)
    model, truth = _Swapping(w, front, back), _Swapping(w, front, back)
    step = tg.compile(model.loss_of, fuse=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecompileWarning)
        for _ in range(4):
            loss, grads = step(x)
            reads = truth.front
            torch.testing.assert_close(loss, truth.loss_of(x), **TOL)
            torch.testing.assert_close(grads[w], _torch_grad(lambda w, b=reads: torch.tanh(x @ w + b).sum(), w),
                                       **TOL)
            assert model.front is truth.front
    assert step.fallback is not None and "self.back" in step.fallback


@pytest.mark.parametrize("case", list(_CHANGING_STATE))
def test_a_forward_changing_python_state_it_reads_gives_torch_s_loss_at_every_call(case):
    """The forward changes, while recorded, Python state the guard watches and the loss depends on (``n =
    len(hist); hist.append(1.0)``, ``self.step += 1``, ``cache["k"] = cache.get("k", 0) + 1``, ``stack.pop()``,
    ``global n; n += 1``). The guard held the state after the recording, which later calls (running no Python
    code) never changed again, so every call replayed the first call's loss (2x off by the second call). Now
    the step records once more to see whether the forward changes it at every call (it does), then runs every
    call through the engine: at each of six calls of SGD the loss and gradients are torch autograd's (float64)
    on the same evolving state."""
    x = r(3, 4, seed=413)
    forward, params = _changing_state(case)
    expected = []
    for _ in range(6):  # torch autograd, on a fresh copy of the state
        loss = forward(x)
        grads = torch.autograd.grad(loss, params)
        expected.append((loss.detach(), grads))
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.1 * g
    forward, params = _changing_state(case)
    step = tg.compile(forward, fuse=False)
    place = _CHANGING_STATE[case]
    for call, (expected_loss, expected_grads) in enumerate(expected):
        (loss, grads), warned = _call_once(step, x)
        torch.testing.assert_close(loss, expected_loss, **TOL)
        for p, g in zip(params, expected_grads):
            torch.testing.assert_close(grads[p], g, **TOL)
        with torch.no_grad():
            for p in params:
                p -= 0.1 * grads[p]
        if call == 1:
            assert warned[0] == (f"tg.compile: re-recording {step.__name__}: the forward changed {place} while it "
                                 f"was recorded, Python state that it also reads: recording it again to see whether "
                                 f"it changes it at every call")
            assert warned[1].startswith(f"tg.compile: {step.__name__} is no longer compiled: the forward changes "
                                        f"{place} at every call, Python state that it also reads")
        else:
            assert warned == []
    assert step.recordings == 2 and step.fallback is not None


class _Lazy:  # sets itself up on its first call: the state it leaves is the one it finds at every later call
    def __init__(self, w):
        self.w, self.ready, self.scale = w, False, 1.0

    def __call__(self, x):
        if not self.ready:
            self.scale, self.ready = 0.5, True
        return torch.tanh(x @ self.w).sum() * self.scale


@pytest.mark.parametrize("case", ["a flag set on the first call", "model.train() inside the forward"])
def test_a_forward_that_leaves_the_state_as_it_finds_it_is_compiled(case):
    """A forward that sets Python state it reads to a value it keeps (a lazy set-up, ``model.train()`` after an
    evaluation in eval mode): the second recording finds the state it leaves, so that version is compiled and
    replayed, and every call's loss and gradients are torch's."""
    x = r(3, 4, seed=415)
    w = r(4, 4, seed=416).requires_grad_()
    if case == "a flag set on the first call":
        forward, params, place = _Lazy(w), [w], "_Lazy.ready"
        reference = _Lazy(w.detach().clone().requires_grad_())
        ref_params = [reference.w]
    else:
        torch.manual_seed(417)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=D), torch.nn.BatchNorm1d(4, dtype=D)).eval()
        twin = copy.deepcopy(model)

        def forward(x):
            model.train()
            return torch.tanh(model(x)).pow(2).sum()

        def reference(x):
            twin.train()
            return torch.tanh(twin(x)).pow(2).sum()
        params, ref_params, place = list(model.parameters()), list(twin.parameters()), "the training mode of model"
    step = tg.compile(forward, fuse=False)
    for call in range(5):
        (loss, grads), warned = _call_once(step, x)
        expected = reference(x)
        expected_grads = torch.autograd.grad(expected, ref_params)
        torch.testing.assert_close(loss, expected.detach(), **TOL)
        for p, g in zip(params, expected_grads):
            torch.testing.assert_close(grads[p], g, **TOL)
        _warned_once(step, warned, f"the forward changed {place} while it was recorded, Python state that it also "
                                   f"reads: recording it again to see whether it changes it at every call"
                     if call == 1 else None)
        with torch.no_grad():
            for p, q, g in zip(params, ref_params, expected_grads):
                p -= 0.1 * g
                q -= 0.1 * g
    assert step.recordings == 2 and step.fallback is None  # (calls 3 to 5 replayed the second recording)


def test_a_forward_reading_python_state_it_does_not_change_is_compiled():
    """The same kinds of state, read and not changed by the forward (a list's length, a counter attribute, a dict
    item, a global, a closure variable, a module's flag): one recording, no warning, no engine; each call's loss
    and gradient are torch's."""
    history, cache, counter = [1.0, 1.0], {"k": 2}, _StepCounter(r(4, 4, seed=418))
    counter.step = 3
    calls = 4
    model = torch.nn.BatchNorm1d(4, dtype=D).eval()
    w, x = counter.w, r(3, 4, seed=419)

    def forward(x):
        scale = len(history) * cache["k"] * 0.99 ** counter.step * calls * (1.0 + _CALLS)
        return torch.tanh(model(x @ w)).sum() * scale

    step = tg.compile(forward, fuse=False)
    for _ in range(5):
        (loss, grads), warned = _call_once(step, x)
        assert warned == []
        _assert_as_torch(loss, grads, forward, x, w)
        with torch.no_grad():
            w -= 0.1 * grads[w]
    assert step.recordings == 1 and step.fallback is None


# ---------------------------------------------------------------- work the forward does under torch.no_grad()


class _LectureLinear:  # makemore part 3, as the lecture writes it (float64)
    def __init__(self, fan_in, fan_out, generator, bias=True):
        self.weight = torch.randn((fan_in, fan_out), generator=generator, dtype=D) / fan_in ** 0.5
        self.bias = torch.zeros(fan_out, dtype=D) if bias else None

    def __call__(self, x):
        self.out = x @ self.weight
        if self.bias is not None:
            self.out += self.bias
        return self.out

    def parameters(self):
        return [self.weight] + ([] if self.bias is None else [self.bias])


class _LectureBatchNorm1d:  # makemore part 3: the running statistics are rebound under torch.no_grad()
    def __init__(self, dim, eps=1e-5, momentum=0.1):
        self.eps = eps
        self.momentum = momentum
        self.training = True
        self.gamma = torch.ones(dim, dtype=D)
        self.beta = torch.zeros(dim, dtype=D)
        self.running_mean = torch.zeros(dim, dtype=D)
        self.running_var = torch.ones(dim, dtype=D)

    def __call__(self, x):
        if self.training:
            xmean = x.mean(0, keepdim=True)
            xvar = x.var(0, keepdim=True)
        else:
            xmean = self.running_mean
            xvar = self.running_var
        xhat = (x - xmean) / torch.sqrt(xvar + self.eps)
        self.out = self.gamma * xhat + self.beta
        if self.training:
            with torch.no_grad():
                self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * xmean
                self.running_var = (1 - self.momentum) * self.running_var + self.momentum * xvar
        return self.out

    def parameters(self):
        return [self.gamma, self.beta]


class _InPlaceBatchNorm1d(_LectureBatchNorm1d):  # the same statistics, updated in place
    def __call__(self, x):
        xmean, xvar = x.mean(0), x.var(0)
        self.out = self.gamma * (x - xmean) / torch.sqrt(xvar + self.eps) + self.beta
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * xmean)
            self.running_var.lerp_(xvar, self.momentum)
        return self.out


class _LectureTanh:
    def __call__(self, x):
        self.out = torch.tanh(x)
        return self.out

    def parameters(self):
        return []


def _part3_network(norm=_LectureBatchNorm1d, seed=2147483647):
    """The lecture's part-3 MLP (smaller): embedding, Linear-BatchNorm-Tanh twice, Linear-BatchNorm."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randn((27, 6), generator=g, dtype=D)
    layers = [_LectureLinear(18, 16, g, bias=False), norm(16), _LectureTanh(),
              _LectureLinear(16, 16, g, bias=False), norm(16), _LectureTanh(),
              _LectureLinear(16, 27, g, bias=False), norm(27)]
    layers[-1].gamma *= 0.1
    return C, layers


def _part3_loss(C, layers):
    def forward(Xb, Yb):
        emb = C[Xb]
        x = emb.view(emb.shape[0], -1)
        for layer in layers:
            x = layer(x)
        return F.cross_entropy(x, Yb)
    return forward


def _part3_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 27, (n, 3), generator=g), torch.randint(0, 27, (n,), generator=g)


def _train_part3(norm, run, steps=12, lr=0.1):
    """``steps`` SGD steps of the part-3 network on the same minibatches; ``run(forward, C, layers)`` gives the
    step: a function of (Xb, Yb) returning (loss, gradients in the order of the parameters)."""
    C, layers = _part3_network(norm)
    params = [C] + [p for layer in layers for p in layer.parameters()]
    Xtr, Ytr = _part3_data(200, seed=1)
    step = run(_part3_loss(C, layers), params)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        ix = torch.randint(0, Xtr.shape[0], (32,), generator=g)
        loss, grads = step(Xtr[ix], Ytr[ix])
        for p, grad in zip(params, grads):
            p.data += -lr * grad
    return C, layers, params


def _with_torch(forward, params):
    def step(Xb, Yb):
        for p in params:
            p.requires_grad_()
        loss = forward(Xb, Yb)
        grads = torch.autograd.grad(loss, params)
        for p in params:
            p.requires_grad_(False)
        return loss.detach(), grads
    return step


def _with_engine(forward, params):
    def step(Xb, Yb):
        with tg.record() as graph:
            loss = forward(Xb, Yb)
        grads = graph.backward(loss)
        return loss, [grads[p] for p in params]
    return step


def _compiled(steps):
    def run(forward, params):
        step = tg.compile(forward, fuse=False)
        steps.append(step)

        def call(Xb, Yb):
            loss, grads = step(Xb, Yb)
            return loss, [grads[p] for p in params]
        return call
    return run


def _statistics(layers):
    return [t for layer in layers if hasattr(layer, "running_mean") for t in (layer.running_mean, layer.running_var)]


def _dev_loss(C, layers):
    for layer in layers:
        layer.training = False
    Xdev, Ydev = _part3_data(100, seed=3)
    with torch.no_grad():
        return _part3_loss(C, layers)(Xdev, Ydev)


@pytest.mark.parametrize("norm", [_LectureBatchNorm1d, _InPlaceBatchNorm1d], ids=["rebound", "in_place"])
def test_running_statistics_updated_under_no_grad_are_replayed(norm):
    """The part-3 BatchNorm1d updates its running statistics under torch.no_grad() (rebinding
    ``self.running_mean``, or in place): N compiled steps leave them, the parameters and the eval-mode dev loss
    as N plain torch steps do (float64), and as N engine steps do, bit for bit (the same kernels). Before, the
    compiled step kept the first step's statistics (a dev loss of 2.67 instead of 2.57 in the lecture)."""
    steps = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        C, layers, params = _train_part3(norm, _compiled(steps))
    C_torch, layers_torch, params_torch = _train_part3(norm, _with_torch)
    C_engine, layers_engine, params_engine = _train_part3(norm, _with_engine)
    for got, torch_value, engine_value in zip(_statistics(layers) + params, _statistics(layers_torch) + params_torch,
                                              _statistics(layers_engine) + params_engine):
        torch.testing.assert_close(got, torch_value, **TOL)
        assert torch.equal(got, engine_value)
    assert not any("no_grad" in str(w.message) for w in caught), "nothing made under no_grad is lost"
    # the lecture's statistics start as (dim,) and become (1, dim): one recording for that, then none
    assert steps[0].recordings == (2 if norm is _LectureBatchNorm1d else 1)
    torch.testing.assert_close(_dev_loss(C, layers), _dev_loss(C_torch, layers_torch), **TOL)
    assert "running_mean" in steps[0].source and "no_grad" in steps[0].source


def test_running_statistics_rebound_source_and_guards():
    """The step reads ``layers[1].running_mean`` from the layer and stores the new tensor there (with the
    user's names); an eval-mode step after training reads the new statistics."""
    C, layers = _part3_network()
    forward = _part3_loss(C, layers)
    step = tg.compile(forward, fuse=False)
    Xb, Yb = _part3_data(32, seed=4)
    for layer in layers:  # (dim,) -> (1, dim) outside the step, as the lecture's first step does
        if hasattr(layer, "running_mean"):
            layer.running_mean, layer.running_var = layer.running_mean[None], layer.running_var[None]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="tg.compile: the forward stores tensors")  # (``self.out``)
        warnings.simplefilter("error", RecompileWarning)
        for _ in range(3):
            step(Xb, Yb)
    assert step.recordings == 1
    source = step.source
    assert "layers_1_running_mean = layers_1.running_mean" in source
    assert re.search(r"\n    layers_1\.running_mean = running_mean\w*\n", source)
    reference = copy.deepcopy(layers)
    for layer in layers:
        layer.training = False
    with warnings.catch_warnings(), pytest.warns(RecompileWarning, match=r"layers\[1\]\.training is now False"):
        warnings.filterwarnings("ignore", message="tg.compile: the forward stores tensors")
        loss, _ = step(Xb, Yb)
    torch.testing.assert_close(loss, _dev_loss_on(reference, C, Xb, Yb), **TOL)


def _dev_loss_on(layers, C, Xb, Yb):
    for layer in layers:
        layer.training = False
    with torch.no_grad():
        return _part3_loss(C, layers)(Xb, Yb)


_bnmean_running = torch.zeros(())
_bnstd_running = torch.ones(())


def _part4_forward(params):
    """The lecture's inline BatchNorm (part 3 before the classes, part 4): module globals rebound in the forward."""
    C, W1, b1, W2, b2, bngain, bnbias = params

    def forward(Xb, Yb):
        global _bnmean_running, _bnstd_running
        emb = C[Xb]
        hprebn = emb.view(emb.shape[0], -1) @ W1 + b1
        bnmeani = hprebn.mean(0, keepdim=True)
        bnstdi = hprebn.std(0, keepdim=True)
        h = torch.tanh(bngain * (hprebn - bnmeani) / bnstdi + bnbias)
        with torch.no_grad():
            _bnmean_running = 0.999 * _bnmean_running + 0.001 * bnmeani
            _bnstd_running = 0.999 * _bnstd_running + 0.001 * bnstdi
        return F.cross_entropy(h @ W2 + b2, Yb)
    return forward


def test_globals_rebound_under_no_grad_are_replayed():
    """``global bnmean_running; bnmean_running = 0.999 * bnmean_running + 0.001 * bnmeani`` inside the forward:
    the compiled step reads the global and rebinds it at each call, as plain torch does."""
    global _bnmean_running, _bnstd_running
    results = []
    for compiled in (False, True):
        _bnmean_running, _bnstd_running = torch.zeros((1, 12), dtype=D), torch.ones((1, 12), dtype=D)
        params = [r(27, 4, seed=170), r(12, 12, seed=171) / 4, r(12, seed=172) * 0.1, r(12, 27, seed=173) / 4,
                  r(27, seed=174) * 0.1, 1 + 0.1 * r(12, seed=175), 0.1 * r(12, seed=176)]
        forward = _part4_forward(params)
        step = _compiled([])(forward, params) if compiled else _with_torch(forward, params)
        _sgd(step, params, (_part3_data(32, seed=180 + i) for i in range(8)), 0.1)
        results.append([_bnmean_running, _bnstd_running, *params])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, **TOL)
    assert not torch.equal(results[1][0], torch.zeros((1, 12), dtype=D))


class _Centring:
    """Centres its input on a running mean that it reads and then rebinds under no_grad (an EMA centring)."""

    def __init__(self, dim):
        self.gain, self.running_mean = 1 + 0.1 * r(dim, seed=185), torch.zeros(dim, dtype=D)

    def __call__(self, x):
        out = (x - self.running_mean) * self.gain
        with torch.no_grad():
            self.running_mean = 0.9 * self.running_mean + 0.1 * x.mean(0)
        return out


def _centred_loss(layer, w):
    def forward(Xb, Yb):
        return ((layer(Xb @ w) - Yb) ** 2).sum()
    return forward


def _sgd(step, params, batches, lr):
    """SGD steps of ``step`` over ``batches``, any warning an error (nothing re-recorded or left unreplayed);
    the last loss."""
    loss = None
    for Xb, Yb in batches:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss, grads = step(Xb, Yb)
        for p, grad in zip(params, grads):
            p.data -= lr * grad
    return loss


def test_a_rebound_place_the_loss_reads_is_read_anew_at_each_call():
    """The loss reads ``layer.running_mean`` before the forward rebinds it under no_grad: each compiled call
    reads the tensor the previous call stored (it kept the first call's tensor), as plain torch does."""
    results = []
    for compiled in (False, True):
        layer, w = _Centring(4), r(3, 4, seed=186)
        params = [w, layer.gain]
        forward = _centred_loss(layer, w)
        step = _compiled([])(forward, params) if compiled else _with_torch(forward, params)
        loss = _sgd(step, params, ((r(8, 3, seed=187 + i), r(8, 4, seed=193 + i)) for i in range(5)), 0.01)
        results.append([loss, layer.running_mean, *params])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, **TOL)


def test_in_place_updates_under_no_grad_are_replayed():
    """``counter.add_(1)``, ``running.lerp_(x, 0.1)`` and ``running[0] = ...`` under no_grad run at every call,
    in order with the forward (the statistic of this call's values); a value the loss then reads is the
    updated one, as in plain torch."""
    w = r(4, seed=190)
    compiled_state = (torch.zeros((), dtype=torch.long), torch.zeros(4, dtype=D))
    eager_state = (torch.zeros((), dtype=torch.long), torch.zeros(4, dtype=D))

    def make(counter, running, w):
        def forward(x):
            h = torch.tanh(x * w)
            with torch.no_grad():
                counter.add_(1)
                running.lerp_(h.mean(0), 0.1)
                running[0] = counter * 0.5
            return (h * running).sum()
        return forward

    step = tg.compile(make(*compiled_state, w), fuse=False)
    for i in range(5):
        x = r(6, 4, seed=191 + i)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss, grads = step(x)
        leaf = w.clone().requires_grad_()
        expected = make(*eager_state, leaf)(x)
        torch.testing.assert_close(loss, expected.detach(), **TOL)
        torch.testing.assert_close(grads[w], torch.autograd.grad(expected, leaf)[0], **TOL)
    assert compiled_state[0].item() == eager_state[0].item() == 5
    torch.testing.assert_close(compiled_state[1], eager_state[1], **TOL)
    assert step.recordings == 1
    assert "counter.add_(1)" in step.source


class _BufferCentring(torch.nn.Module):
    """_Centring as an nn.Module: its running mean a buffer, rebound (not updated in place) under no_grad."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(dim, dtype=D))

    def forward(self, x):
        out = x - self.running_mean
        with torch.no_grad():
            self.running_mean = 0.9 * self.running_mean + 0.1 * x.mean(0)
        return out


def test_a_module_buffer_rebound_under_no_grad_is_replayed():
    """``self.running_mean = ...`` in a module's forward sets the buffer: the step reads it at each call and
    stores the new tensor there (it kept the recording's tensor, warning that it could not reach it)."""
    results = []
    for compiled in (False, True):
        model = torch.nn.Sequential(torch.nn.Linear(3, 4, dtype=D), _BufferCentring(4))
        with torch.no_grad():
            model[0].weight.copy_(r(4, 3, seed=210))
            model[0].bias.copy_(r(4, seed=219))
        params = list(model.parameters())
        forward = _model_loss(model)
        step = _compiled([])(forward, params) if compiled else _with_torch(forward, params)
        loss = _sgd(step, params, ((r(8, 3, seed=211 + i), r(8, 4, seed=215 + i)) for i in range(4)), 0.01)
        results.append([loss, model[1].running_mean, *params])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, **TOL)


def _model_loss(model):
    def forward(Xb, Yb):
        return ((model(Xb) - Yb) ** 2).sum()
    return forward


def _clipped_loss(W, b):
    def forward(Xb, Yb):
        with torch.no_grad():
            W.clamp_(-0.3, 0.3)
        return ((Xb @ W + b - Yb) ** 2).sum()
    return forward


def test_a_parameter_clipped_in_place_under_no_grad_keeps_its_gradient():
    """``W.clamp_(-0.3, 0.3)`` under no_grad, then ``W`` used: ``grads[W]`` (and ``grads["W"]``) is torch's
    ``W.grad``, the gradient at the clipped value (the step returned no gradient for ``W``)."""
    results = []
    for compiled in (False, True):
        W, b = r(4, 3, seed=200), r(3, seed=201)
        params = [W, b]
        forward = _clipped_loss(W, b)
        step = tg.compile(forward, fuse=False) if compiled else _with_torch(forward, params)
        for i in range(3):
            Xb, Yb = r(8, 4, seed=202 + i), r(8, 3, seed=206 + i)
            loss, grads = step(Xb, Yb)
            if compiled:
                assert grads["W"] is grads[W]
                grads = [grads[p] for p in params]
            for p, grad in zip(params, grads):
                p.data -= 0.1 * grad
        results.append([loss, *params])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, **TOL)


def test_a_failed_check_puts_back_what_no_grad_work_changed():
    """A read after the no_grad updates differs: the call runs again by other code, and the statistics (in place
    or rebound) are updated once, as by plain torch."""
    class Stats:
        def __init__(self):
            self.total = torch.zeros(3, dtype=D)
            self.mean = torch.zeros(3, dtype=D)

    w = r(3, seed=200)

    def make(stats, w):
        def forward(x):
            h = x * w
            with torch.no_grad():
                stats.total += h.sum(0)
                stats.mean = 0.5 * stats.mean + 0.5 * h.mean(0)
            if h.sum() > 0:
                return (h * 2).sum()
            return (h * h).sum()
        return forward

    compiled, eager = Stats(), Stats()
    step = tg.compile(make(compiled, w), fuse=False)
    for i in range(6):
        x = r(4, 3, seed=201 + i).abs() * (1 if i % 3 else -1) * w.sign()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RecompileWarning)
            loss, _ = step(x)
        torch.testing.assert_close(loss, make(eager, w)(x), **TOL)
        torch.testing.assert_close(compiled.total, eager.total, **TOL)
        torch.testing.assert_close(compiled.mean, eager.mean, **TOL)
    assert step.fallback is None and step.recordings == 2


def test_a_value_read_after_a_no_grad_update_is_checked():
    """``counter.add_(1)`` under no_grad, then ``if counter % 2 == 1:``: the step updates the counter and checks
    the branch on its new value (two versions, one per branch), as plain torch takes it at each call."""
    w = r(3, seed=205)
    counter = torch.zeros((), dtype=torch.long)

    def forward(x):
        h = x * w
        with torch.no_grad():
            counter.add_(1)
        if counter % 2 == 1:
            return (h * 2).sum()
        return (h * h).sum()

    step = tg.compile(forward, fuse=False)
    x = r(2, 3, seed=206)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecompileWarning)
        for i in range(1, 7):
            loss, grads = step(x)
            leaf = w.clone().requires_grad_()
            expected = (x * leaf * 2).sum() if i % 2 == 1 else (x * leaf * x * leaf).sum()
            torch.testing.assert_close(loss, expected.detach(), **TOL)
            torch.testing.assert_close(grads[w], torch.autograd.grad(expected, leaf)[0], **TOL)
    assert counter.item() == 6
    assert step.fallback is None and step.recordings == 2


_history = []


def test_a_no_grad_value_the_step_cannot_reach_still_warns():
    """A value made under no_grad that ends where the step cannot reach it (appended to a list) is not
    replayed: the recording warns, naming it and its line."""
    w = r(3, seed=210)

    def forward(x):
        h = x * w
        with torch.no_grad():
            _history.append(h.mean())
        return h.sum()

    with pytest.warns(UserWarning, match=r"torch.no_grad\(\) \('mean' at \S*test_compile.py:\d+ "
                                         r"\(_history.append\(h.mean\(\)\)\)\) where the compiled step cannot reach"), \
            pytest.warns(UserWarning, match="the forward appends to _history; the compiled step does not"):
        tg.compile(forward, fuse=False)(r(2, 3, seed=211))
    _history.clear()


# ---------------------------------------------------------------- what cannot be compiled


def test_no_grad_values_the_loss_uses_are_refused():
    w = r(3, seed=22)

    def stale(x):
        with torch.no_grad():
            scale = x.abs().max()
        return (x * w / scale).sum()

    with pytest.raises(ValueError, match=r"'scale', computed under torch.no_grad\(\)"):
        tg.compile(stale, fuse=False)(r(3, seed=24))

    def updated(x):
        h = x * w
        with torch.no_grad():
            h.mul_(1.5)  # the compiled code would not redo this update
        return (h * x).sum()

    with pytest.raises(ValueError, match=r"'h', updated in place under torch.no_grad\(\) at .*test_compile.py:\d+"):
        tg.compile(updated, fuse=False)(r(3, seed=24))


# ---------------------------------------------------------------- values the forward reads into Python


def _steps_match_torch(step, forward, w, calls):
    """Each call's loss and gradient equal torch autograd's on the same forward, run as written (float64)."""
    for inputs in calls:
        loss, grads = step(*inputs)
        torch.testing.assert_close(loss, forward(*inputs, w=w), **TOL)
        torch.testing.assert_close(grads[w], _torch_grad(lambda w, inputs=inputs: forward(*inputs, w=w), w), **TOL)


def test_a_branch_on_a_tensor_value_is_checked_at_every_call():
    """``if h.sum() > 0`` taking the other branch at a later call: not the replayed branch (a silent wrong loss
    and gradient before), but each branch recorded once and re-checked at every call."""
    w = r(3, 3, seed=110)

    def forward(x, w=w):
        h = x @ w
        if h.sum() > 0:
            return (h * 2).sum()
        return (h * -3).sum()

    ones = torch.ones(2, 3, dtype=D)
    sign = 1.0 if (ones @ w).sum() > 0 else -1.0
    calls = [(ones * sign * s,) for s in (1.0, -1.0, 2.0, -0.5, 1.0, -1.0)]
    step = tg.compile(forward, fuse=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _steps_match_torch(step, forward, w, calls)
    assert step.recordings == 2, "each branch is recorded once, then both versions are kept"
    assert len(caught) == 1 and re.fullmatch(
        rf"tg.compile: re-recording forward: the value read at \S*test_compile.py:"
        rf"{forward.__code__.co_firstlineno + 2} \(if h.sum\(\) > 0:\) is now (False|True) \(the recording read "
        rf"(True|False)\)", str(caught[0].message))
    assert "if bool(gt_1) is not False:" in step.source or "if bool(gt_1) is not True:" in step.source


def test_three_branches_on_a_tensor_value_are_all_kept():
    """A forward reading values into Python keeps more versions per input signature than one that does not
    (two branches in each mode): three branches taken in turn are recorded once each (a mutant keeping two
    versions recorded again at every third call, and gave up compiling after four such recordings)."""
    w = r(3, 3, seed=111)

    def forward(x, w=w):
        h = x @ w
        total = h.sum()
        if total > 1:
            return (h * 2).sum()
        if total > -1:
            return h.tanh().sum()
        return (h * -3).sum()

    ones = torch.ones(2, 3, dtype=D)
    unit = ones / (ones @ w).sum()  # (unit @ w).sum() == 1
    calls = [(unit * s,) for s in (3.0, 0.0, -3.0) * 3]
    step = tg.compile(forward, fuse=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecompileWarning)
        _steps_match_torch(step, forward, w, calls)
    assert step.recordings == 3 and step.fallback is None


def _scaled(x, w):
    h = x @ w
    return (h / h.std().item()).pow(2).sum()  # a Python float: a constant of the recorded graph


def _logged(x, w):
    loss = (x @ w).tanh().sum()
    print(f"loss {loss.item():.4f}")  # logging: the value is read, not used in a torch call
    return loss


def _sliced(x, w):
    n = int((x > 0).sum())  # a size read from the data
    return (x @ w).reshape(-1)[:n].pow(2).sum()


@pytest.mark.parametrize("read", [_scaled, _logged, _sliced])
def test_values_that_change_at_every_call_fall_back_to_the_engine(read, capsys):
    """A value read into Python that changes at every call: re-recorded a few times, then every call runs
    through the engine, with one warning naming the line; every loss and gradient is torch's."""
    w = r(3, 3, seed=111)

    def forward(x, w=w):
        return read(x, w)

    step = tg.compile(forward, fuse=False)
    calls = [(r(4, 3, seed=120 + i).abs() * torch.arange(12).reshape(4, 3).lt(i + 1).mul(2).sub(1),)
             for i in range(9)]  # i + 1 positive elements: a new size, scale and loss at each call
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _steps_match_torch(step, forward, w, calls)
    from tensorgraph.compiler import _VALUE_RECORDINGS

    assert step.recordings == 1 + _VALUE_RECORDINGS
    line = f"{__file__.rsplit('/', 1)[-1]}:{read.__code__.co_firstlineno + 2 - (read is _sliced)}"
    assert step.fallback is not None and line in step.fallback
    given_up = [str(c.message) for c in caught if "no longer compiled" in str(c.message)]
    assert len(given_up) == 1 and line in given_up[0] and "engine" in given_up[0]
    loss, grads = step(calls[0][0])  # by name too, as the compiled step gives them
    torch.testing.assert_close(grads["w"], _torch_grad(lambda w: forward(calls[0][0], w=w), w), **TOL)


def _signs(x, w):
    h = x @ w
    rows = (h.sum(1) > 0).tolist()  # a list: checked by the bytes of the tensor it read
    return sum((h[i] * (2.0 if up else -1.0)).sum() for i, up in enumerate(rows))


def _zero_sign(x, w):
    import math

    sign = math.copysign(1.0, x[0, 0].item())  # -0.0 and 0.0 compare equal, but their signs differ
    return (x @ w).pow(2).sum() * sign


def _formatted(x, w):
    label = f"{x.sum():.0f}"  # a string made from a tensor (Tensor.__format__)
    return (x @ w).sum() * (1.0 if label.startswith("-") else 2.0)


@pytest.mark.parametrize("read", [_signs, _zero_sign, _formatted])
def test_lists_signed_zeros_and_strings_read_into_python_are_checked(read):
    w = r(3, 3, seed=112)

    def forward(x, w=w):
        return read(x, w)

    x = r(4, 3, seed=113)
    flipped = x.clone()
    flipped[0, 0] = -0.0
    x[0, 0] = 0.0
    calls = [(x,), (-x,), (flipped,), (x,), (-x,), (flipped,)]
    step = tg.compile(forward, fuse=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecompileWarning)
        _steps_match_torch(step, forward, w, calls)
    assert step.fallback is None and step.recordings <= 3


def test_a_failed_check_puts_back_state_the_step_changed_in_place():
    """BatchNorm's running statistics and a counter are updated before the value is read: a call whose read
    differs runs again by other code, and must not update them twice."""
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    reference = copy.deepcopy(model)
    counters = {"compiled": torch.zeros((), dtype=torch.long), "eager": torch.zeros((), dtype=torch.long)}

    def forward(x, y, model=model, counter=counters["compiled"]):
        counter.add_(1)
        loss = F.cross_entropy(model(x), y)
        if x.sum() > 0:  # read after the updates
            loss = loss * 2
        return loss

    step = tg.compile(forward, fuse=False)
    params = list(model.parameters())
    for i in range(6):
        x = r(8, 4, seed=130 + i).abs() * (1 if i % 3 else -1)
        y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RecompileWarning)
            loss, grads = step(x, y)
        expected = forward(x, y, reference, counters["eager"])
        torch.testing.assert_close(loss, expected, **TOL)
        for p, g in zip(params, torch.autograd.grad(expected, list(reference.parameters()))):
            torch.testing.assert_close(grads[p], g, **TOL)
    assert step.recordings == 2 and "_undo" in step.source
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(model[1], name), getattr(reference[1], name), **TOL)
    assert counters["compiled"].item() == counters["eager"].item() == 6


def test_a_read_the_step_cannot_recompute_runs_through_the_engine():
    """A value computed under torch.no_grad() inside the forward and read into Python cannot be re-checked (the
    step replays no_grad work but does not check its reads): every call runs through the engine (before: the
    recorded branch, silently)."""
    w = r(3, 3, seed=114)

    def forward(x, w=w):
        h = x @ w
        with torch.no_grad():
            positive = h.sum() > 0
        if positive:
            return (h * 2).sum()
        return (h * -3).sum()

    step = tg.compile(forward, fuse=False)
    x = torch.ones(2, 3, dtype=D)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(x)
    assert [c.category for c in caught] == [RecompileWarning]
    assert re.search(r"no longer compiled: the value read at \S*test_compile.py:\d+ \(if positive:\) cannot be "
                     r"re-checked .* torch.no_grad\(\)", str(caught[0].message))
    _steps_match_torch(step, forward, w, [(x,), (-x,), (x * 2,)])
    assert step.recordings == 1


def test_a_forward_that_reads_no_values_gets_no_checks(lecture):
    params, Xb, Yb = lecture
    step = _lecture_step(params)
    step(Xb, Yb)
    assert "_Diverged" not in step.source and "_undo" not in step.source and " if " not in step.source


def test_bad_forwards_get_clear_errors():
    w = r(3, seed=25)
    with pytest.raises(TypeError, match="expected a function"):
        tg.compile(42)
    with pytest.raises(TypeError, match="must return the loss"):
        tg.compile(lambda x: (x * w).tolist(), fuse=False)(r(3, seed=26))
    with pytest.raises(ValueError, match="scalar floating-point loss"):
        tg.compile(lambda x: x * w, fuse=False)(r(3, seed=27))
    with pytest.raises(NotImplementedError, match="bessel_j0"):
        tg.compile(lambda x: torch.special.bessel_j0(x * w).sum(), fuse=False)(r(3, seed=28))


def test_parameters_passed_as_arguments_are_refused_not_silently_ignored():
    w, x = r(4, 3, seed=29), r(5, 4, seed=30)
    with pytest.raises(ValueError, match=r"no gradient: the loss depends only on tensors it receives as arguments "
                                         r"\('W', 'X'\).*close over the parameters"):
        tg.compile(lambda W, X: (X @ W).pow(2).sum(), fuse=False)(w, x)
    loss, grads = tg.compile(lambda W, X: (X @ W).pow(2).sum(), params=[], fuse=False)(w, x)  # asked for none
    torch.testing.assert_close(loss, (x @ w).pow(2).sum(), **TOL)
    assert len(grads) == 0


def test_params_and_options_that_would_compute_nothing_are_refused():
    """params=W (a tensor: its rows), a numpy array, an integer tensor, or tensors the forward never reads all gave
    a step with no gradient at all, silently; cache_size=0 and fuse='yes' were taken as something else."""
    import numpy as np

    w, x = r(4, 3, seed=31), r(5, 4, seed=32)

    def forward(X):  # noqa: N803
        return (X @ w).pow(2).sum()

    with pytest.raises(TypeError, match=r"params must be a list of tensors; a single tensor W is params=\[W\]"):
        tg.compile(forward, params=w)
    with pytest.raises(TypeError, match="params must be a list of tensors, not ndarray"):
        tg.compile(forward, params=np.ones(3))
    with pytest.raises(TypeError, match=r"params\[1\] is a float, not a tensor"):
        tg.compile(forward, params=[w, 0.5])
    with pytest.raises(ValueError, match=r"params\[0\] has dtype torch.int64; only floating-point tensors"):
        tg.compile(forward, params=[torch.arange(3)])
    with pytest.raises(ValueError, match=r"the loss depends on no tensor in params= \(1 given\).*not copies"):
        tg.compile(forward, params=[w.clone()], fuse=False)(x)
    with pytest.raises(ValueError, match="cache_size must be an integer >= 1.*not 0"):
        tg.compile(forward, cache_size=0)
    with pytest.raises(TypeError, match="fuse must be None .*True or False, not 'yes'"):
        tg.compile(forward, fuse="yes")
    loss, grads = tg.compile(forward, params=(p for p in [w]), fuse=False)(x)  # any iterable of the tensors
    expected = torch_grads(lambda X, _params: (X @ _params[0]).pow(2).sum(), [w], x)
    torch.testing.assert_close(loss, expected[0], **TOL)
    torch.testing.assert_close(grads[w], expected[1][0], **TOL)


# ---------------------------------------------------------------- every op in the rule table


@pytest.mark.parametrize("name, fn, inputs", [pytest.param(*case, id=case[0]) for case in CASES[::3]])
def test_every_op_compiles_to_the_engine_gradients(name, fn, inputs):
    weight = _weights_for(fn(*inputs))
    floats = [x for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]

    def forward():
        return (fn(*inputs) * weight).sum()

    step = tg.compile(forward, fuse=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step()
        loss, grads = step()
    with tg.record() as graph:
        expected = forward()
    engine = graph.backward(expected)
    torch.testing.assert_close(loss, expected, **TOL)
    for x in floats:
        if x in engine:
            torch.testing.assert_close(grads[x], engine[x], **TOL)
        else:
            assert x not in grads


def test_a_call_returning_a_one_element_tuple_compiles():
    """x.split(n) of a dim of n elements returns a 1-tuple: the step unpacked it as ``s = ...`` (the tuple itself)."""
    x = r(5, 4, seed=30)

    def forward():
        return (x.split(4, dim=1)[0] * 2 + torch.gradient(x, dim=0)[0]).sum()

    step = tg.compile(forward, fuse=False)
    step()
    loss, grads = step()
    with tg.record() as graph:
        expected = forward()
    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(grads[x], graph.backward(expected)[x], **TOL)


# ---------------------------------------------------------------- the recorder's fast path keeps the node schema


def test_recorded_nodes_have_every_default_key():
    from tensorgraph.graph import _NODE_DEFAULTS

    x = r(3, seed=29)
    with tg.record() as graph:
        y = x.max(0)
        z = torch.tanh(x) * 2
        z += 1
    required = set(_NODE_DEFAULTS) | {"value", "inputs", "shape", "dtype"}
    for data in graph._nodes:
        assert required <= set(data), sorted(required - set(data))
    assert y.values.shape == () and z.shape == (3,)


# ---------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (torch built "
                    f"{'with' if torch.version.cuda else 'without'} CUDA); the same checks run there on CPU above")
def test_compiled_step_on_cuda_matches_the_engine():
    ex = setup(n_hidden=64, dtype=D)
    params = [p.cuda() for p in ex.parameters]
    Xb, Yb = ex.Xb.cuda(), ex.Yb.cuda()
    step = _lecture_step(params)
    step(Xb, Yb)
    loss, grads = step(Xb, Yb)
    with tg.record() as graph:
        expected = lecture_forward(*params, Xb, Yb)
    engine = graph.backward(expected)
    assert loss.device.type == "cuda"
    assert_all_close([grads[p] for p in params], [engine[p] for p in params])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (torch built "
                    f"{'with' if torch.version.cuda else 'without'} CUDA); the same checks run there on CPU above")
@pytest.mark.parametrize("read", [_signs, _scaled, _formatted])
def test_values_read_into_python_are_checked_on_cuda(read):
    w = r(3, 3, seed=115).cuda()

    def forward(x, w=w):
        return read(x, w)

    x = r(4, 3, seed=116).cuda()
    calls = [(x * (1 + i) * (-1) ** i,) for i in range(8)]  # two sign patterns; a new scale and sum each call
    step = tg.compile(forward, fuse=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecompileWarning)
        _steps_match_torch(step, forward, w, calls)
    assert (step.fallback is not None) == (read is not _signs) and step.recordings <= 5


# ---------------------------------------------------------------- the bench command (plumbing only: no timings)


def test_bench_command_runs_and_reports_every_part(capsys):
    import json

    from tensorgraph.cli import main

    status = main(["bench", "--json", "--quick", "--repeats", "1", "--inner", "1", "--sizes", "10,20",
                   "--memory-steps", "3", "--threads", "1"])  # about 15 s: data, four compilations, fused rules
    report = json.loads(capsys.readouterr().out)
    assert status == 0
    assert {"torch", "engine", "compiled", "floor"} <= set(report["steps"]) and report["steps"]["torch"]["ratio"] == 1.0
    assert report["targets"] == {"engine": 1.3, "compiled": 0.8}
    assert report["overhead"]["ops"] == 29 and [row["nodes"] for row in report["scaling"]][:2] == [11, 21]
    assert set(report["memory"]) == {"engine", "compiled"} and report["machine"]["threads"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "--device: expected cpu or cuda, got 'tpu'"),
    (["--sizes", "10,x"], "--sizes: expected comma-separated node counts"),
    (["--only", "steps,speed"], "--only: unknown part 'speed'"),
    (["--repeats", "0"], "expected a positive integer"),
])
def test_bench_command_bad_options_are_one_line(argv, message, capsys):
    from tensorgraph.cli import main

    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda runs there")
def test_bench_on_cuda_without_a_gpu_says_so(capsys):
    from tensorgraph.cli import main

    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def test_gradient_hooks_are_refused_not_skipped():
    """The generated step cannot call a Python hook: a hook in the forward or on a parameter raises, naming it."""
    W = r(3, 2).requires_grad_()
    x = r(4, 3, seed=1)

    def hooked(x):
        h = x @ W
        h.register_hook(lambda g: g * 2)
        return h.sin().sum()

    with pytest.raises(NotImplementedError, match=r"'h' has a gradient hook .*tg.compile"):
        tg.compile(hooked)(x)
    step = tg.compile(lambda x: (x @ W).sin().sum())
    step(x)
    handle = W.register_hook(lambda g: g * 2)  # on a parameter, after the step was compiled
    with pytest.raises(NotImplementedError, match=r"parameter 'W' has a gradient hook .*test_compile.py:\d+"):
        step(x)
    handle.remove()
    _, grads = step(x)
    Wt = W.detach().clone().requires_grad_()
    (x @ Wt).sin().sum().backward()
    torch.testing.assert_close(grads[W], Wt.grad, **TOL)


def test_embedding_with_max_norm_compiles_with_torchs_renormalisation():
    """F.embedding(max_norm=...) raised UnsupportedCall; its in-place renormalisation of the weight is replayed by
    the compiled step as the recording made it, so an SGD loop follows torch's, the weight's rows included."""
    gen = torch.Generator().manual_seed(0)
    W, V = torch.randn(10, 4, generator=gen, dtype=torch.float64) * 3, r(4, 2, seed=403)
    W_torch, V_torch = W.clone().requires_grad_(), V.clone().requires_grad_()
    batches = [torch.tensor([[1, 2, 2], [5, 1, 9]]), torch.tensor([[3, 4, 0], [7, 7, 8]])]
    step = tg.compile(lambda idx: (F.embedding(idx, W, max_norm=1.5) @ V).tanh().sum())
    for idx in batches * 2:
        loss, grads = step(idx)
        with torch.no_grad():
            W.sub_(0.1 * grads[W])
            V.sub_(0.1 * grads[V])
        expected = (F.embedding(idx, W_torch, max_norm=1.5) @ V_torch).tanh().sum()
        expected.backward()
        with torch.no_grad():
            W_torch.sub_(0.1 * W_torch.grad)
            V_torch.sub_(0.1 * V_torch.grad)
        W_torch.grad = V_torch.grad = None
        torch.testing.assert_close(loss, expected.detach(), **TOL)
        torch.testing.assert_close(W, W_torch.detach(), **TOL)


# ---------------------------------------------------------------- outputs whose size depends on values

_SELECTIONS = {
    "masked_select": lambda W, x: (W * x).masked_select(x > 0).tanh().sum(),
    "boolean index": lambda W, x: ((W * x)[x > 0] ** 2).sum(),
    "nonzero": lambda W, x: (W * x)[torch.nonzero(x > 0).squeeze(1)].exp().sum(),
    "where(cond)": lambda W, x: W[torch.where(x > 0)].sin().sum(),
    "reshaped": lambda W, x: (W * x).masked_select(x > 0).reshape(-1, 1).expand(-1, 2).sum(),
}


@pytest.mark.parametrize("case", list(_SELECTIONS))
def test_a_selection_of_another_size_is_not_replayed_with_the_recordings_shapes(case):
    """Found by the compile fuzzer: the step printed masked_select's output size into its code (``expand(2)``), so
    a call selecting another count of elements crashed ("Number of elements of source < number of ones in mask")
    or ran code written for the recording's count. The size is a read now: such a call records again."""
    fn = _SELECTIONS[case]
    W = torch.randn(5, dtype=D, generator=torch.Generator().manual_seed(0))
    step = tg.compile(lambda x: fn(W, x), fuse=False)
    for signs in ([1, -1, 1, -1, -1], [1, 1, 1, -1, 1], [-1, -1, 1, -1, -1], [1, -1, 1, -1, -1]):
        x = torch.tensor(signs, dtype=D) * torch.linspace(0.5, 1.5, 5, dtype=D)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RecompileWarning)
            loss, grads = step(x)
        reference = W.clone().requires_grad_()
        expected = fn(reference, x)
        expected.backward()
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(grads[W], reference.grad, rtol=1e-12, atol=1e-14)
