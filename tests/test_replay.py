"""Repeated structure (tensorgraph.replay): a repeated recording and its backward plan change no result.

The reference is today's full path: a recording made with no template (the recorder's full
path), and the rule walk (``graph._replay = None`` before ``graph.backward``). Every
repeated recording must give the same node data (names, sources, arguments, attributes,
values) and every plan the same gradients, bit for bit, under the same keys, in the same
order; the errors must be the same ones. The rule walk itself is checked against torch
autograd and finite differences elsewhere (test_ops.py, test_finite_differences.py).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from helpers import _weights_for, assert_same_gradients, assert_same_graph, off_the_common_path, walk
from op_cases import CASES
from torch.overrides import TorchFunctionMode, handle_torch_function, has_torch_function_unary

import tensorgraph as tg
from tensorgraph import replay
from tensorgraph.lecture import LECTURE_ROWS, forward, setup
from tensorgraph.ops import OPS

D = torch.float64


# ---------------------------------------------------------------- references and comparisons


def fresh() -> None:
    """Forget this thread's templates: the next recording takes the recorder's full path."""
    replay.templates().clear()
    replay._last_refusal[0] = ""  # a refusal is the reason of this test's plan, never an earlier test's


def _perturbed(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        y = x.clone()  # same strides
        y.add_(0.01 * torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(7)))
        return y
    return x


def _record_case(fn, inputs, weight):
    with tg.record() as graph:  # one line: every recording of a test case shares its template
        out = fn(*inputs)
        loss = (out * weight).sum()
    return graph, loss


def _full_path(fn, inputs, weight) -> tg.Graph:
    """The same recording made by the recorder's full path (the templates are put back afterwards)."""
    saved = dict(replay.templates())
    fresh()
    try:
        return _record_case(fn, inputs, weight)[0]
    finally:
        fresh()
        replay.templates().update(saved)


# ---------------------------------------------------------------- every op: repeated recordings and plans


@pytest.mark.parametrize("name,fn,inputs", CASES, ids=[c[0] for c in CASES])
def test_every_op_case_repeats_bit_identically(name, fn, inputs):
    weight = _weights_for(fn(*inputs))
    fresh()
    _record_case(fn, inputs, weight)  # a line's first recording only marks it as seen
    first, loss1 = _record_case(fn, inputs, weight)  # the full path again; becomes the template
    second, loss2 = _record_case(fn, inputs, weight)  # the same inputs: matched op by op
    third_inputs = [_perturbed(x) for x in inputs]
    third, loss3 = _record_case(fn, third_inputs, weight)  # new values, same structure
    assert_same_graph(second, first)
    assert_same_graph(third, _full_path(fn, third_inputs, weight))
    repeated = first._replay is second._replay is third._replay
    if not off_the_common_path(first):
        assert repeated, "a recording on the recorder's common path must match its template"
        assert replay.GENERATE_AFTER == 2 and first._replay.matchers is not None and any(first._replay.matchers)
    # first backward of the structure: the rule walk; second: traced; third: the plan (when it has one)
    for graph, loss in ((first, loss1), (second, loss2), (third, loss3)):
        assert_same_gradients(graph.backward(loss), walk(graph, loss))
    if repeated:
        plan = first._replay.plans.get((len(first) - 1, None))
        if plan is None:  # refused: only where the backward depends on values in a way a plan cannot replay,
            reason = replay._last_refusal[0]  # or where the walk names an input without a derivative
            if walk(first, loss1).incomplete:
                assert reason.startswith("an incomplete gradient: the loss depends on"), reason
            else:
                assert any(word in reason for word in ("read tensor values", "depends on tensor")), reason
        # a fourth step replays the plan again on fresh values
        fourth_inputs = [_perturbed(_perturbed(x)) for x in inputs]
        fourth, loss4 = _record_case(fn, fourth_inputs, weight)  # the generated matchers
        assert_same_graph(fourth, _full_path(fn, fourth_inputs, weight))
        assert_same_gradients(fourth.backward(loss4), walk(fourth, loss4))


def test_a_rule_that_reads_values_gets_no_plan(monkeypatch):
    """A rule that reads a tensor value into Python may take another branch at the next step: no plan."""

    exp_rule = OPS["exp"].rule

    def branching_rule(g, out, x):
        return g * out if bool((g > 0).any()) else g * out  # reads a value, like a data-dependent branch

    monkeypatch.setattr(OPS["exp"], "rule", branching_rule)
    x = torch.randn(4, 3, dtype=D)

    def make():
        with tg.record() as graph:
            loss = (x * 2).exp().sum()
        return graph, loss

    steps = _steps(make)
    assert steps[-1][0]._replay.plans == {(len(steps[-1][0]) - 1, None): None}
    assert "read tensor values" in replay._last_refusal[0]
    assert exp_rule is not branching_rule


def test_a_rule_reading_a_tensor_that_is_no_forward_value_gets_no_plan(monkeypatch):
    """A rule may read a tensor that is neither a forward value nor made by a recorded call (here a factor it
    keeps, changed between steps): a plan cannot read it, so none is made and every step walks with the factor of
    its time (a mutant dropping the check in _Printer.plan printed ``xNone = nodes[None]['value']``, which raised
    TypeError at the next step)."""
    factor = torch.ones((), dtype=D)
    monkeypatch.setattr(OPS["exp"], "rule", lambda g, out, x: g * out * factor)
    x = torch.randn(3, dtype=D)

    def make():
        with tg.record() as graph:
            loss = (x * 2).exp().sum()
        return graph, loss

    fresh()
    leaf = x.clone().requires_grad_()
    expected = torch.autograd.grad((leaf * 2).exp().sum(), [leaf])[0]
    for step in range(4):  # the walk, the trace, then the plan if one were made
        factor.fill_(step + 1.0)
        graph, loss = make()
        torch.testing.assert_close(graph.backward(loss)[x], expected * (step + 1), rtol=1e-12, atol=1e-12)
    assert graph._replay.plans == {(len(graph) - 1, None): None}
    assert "which is no forward value" in replay._last_refusal[0]


def test_a_gradient_not_made_by_a_recorded_call_gets_no_plan(monkeypatch):
    """A rule may return a tensor made outside the backward (here sum's, a ones tensor it keeps, right for the
    seed of ones): a plan cannot return it, so none is made (a mutant dropping the check in _Printer.plan looked
    up adjoint node None and raised TypeError from graph.backward)."""
    ones = torch.ones(3, dtype=D)
    monkeypatch.setattr(OPS["sum"], "rule", lambda g, out, x, *args, **kwargs: ones)
    x = torch.randn(3, dtype=D)

    def make():
        with tg.record() as graph:
            loss = x.sum()  # (x's gradient is the kept tensor itself: no recorded call reads it)
        return graph, loss

    fresh()
    leaf = x.clone().requires_grad_()
    expected = torch.autograd.grad(leaf.sum(), [leaf])[0]
    for _ in range(4):
        graph, loss = make()
        torch.testing.assert_close(graph.backward(loss)[x], expected, rtol=1e-12, atol=1e-12)
    assert graph._replay.plans == {(len(graph) - 1, None): None}
    assert "was not made by a recorded call" in replay._last_refusal[0]


@pytest.mark.parametrize("select", ["masked_select", "boolean_mask", pytest.param(
    "uint8_mask", marks=pytest.mark.filterwarnings("ignore:indexing with dtype torch.uint8 is now deprecated"))])
def test_a_rule_shaped_by_a_value_dependent_count_gets_no_plan(monkeypatch, select):
    """A rule that selects by a mask computed from values and bakes the count into a later call: a plan would
    replay the count of the traced step, so none is made (mutants dropping the check of value-dependent output
    shapes in _Printer._statement, for nonzero-like ops or for boolean or uint8 masks, or not counting forward
    values as data, replayed ones(3) @ picked for a mask of 2 and raised a size mismatch)."""

    def masked_fill_rule(g, out, x, mask, value):
        if select == "masked_select":
            picked = g.masked_select(mask)
        else:  # (torch still takes a uint8 mask as a boolean one, with a deprecation warning)
            picked = g[mask if select == "boolean_mask" else mask.to(torch.uint8)]
        ones = picked.new_ones(picked.shape[0])  # the count, read into Python, is an argument of this call
        return g.masked_fill(mask, 0), None, ones @ picked  # (picked.sum(), value's gradient)

    monkeypatch.setattr(OPS["masked_fill"], "rule", masked_fill_rule)
    v = torch.tensor(0.3, dtype=D)

    def make(x):
        with tg.record() as graph:
            loss = (x.masked_fill(x > 0.5, v) * x).sum()
        return graph, loss

    def expected(x):
        leaves = x.clone().requires_grad_(), v.clone().requires_grad_()
        return torch.autograd.grad((leaves[0].masked_fill(leaves[0] > 0.5, leaves[1]) * leaves[0]).sum(), leaves)

    fresh()
    three = torch.tensor([0.9, 0.1, 0.7, 0.8, -0.2], dtype=D)
    two = torch.tensor([0.9, 0.1, 0.2, 0.8, -0.2], dtype=D)
    for x in (three, three, three, two):  # the walk, the trace, then (a plan refused) the walk on 2 selected
        graph, loss = make(x)
        grads = graph.backward(loss)
        dx, dv = expected(x)
        torch.testing.assert_close(grads[x], dx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads[v], dv, rtol=1e-12, atol=1e-12)
    assert graph._replay.plans == {(len(graph) - 1, None): None}
    assert "makes a shape that depends on tensor values" in replay._last_refusal[0]


def test_an_incomplete_gradient_is_named_at_every_step():
    """The loss depends on soft_margin_loss's target, which has no derivative: the walk's Gradients name it, a
    plan's would not, so none is made (a mutant making plans of incomplete traces answered grads[y] with a bare
    KeyError from the fourth step on, and grads.incomplete was empty)."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 5, generator=g, dtype=D), torch.randn(4, 5, generator=g, dtype=D)

    def make():
        with tg.record() as graph:
            loss = F.soft_margin_loss(x * 2, y)
        return graph, loss

    fresh()
    leaf = x.clone().requires_grad_()
    expected = torch.autograd.grad(F.soft_margin_loss(leaf * 2, y), [leaf])[0]
    for _ in range(4):  # the walk, the trace, then the plan if one were made
        graph, loss = make()
        grads = graph.backward(loss)
        torch.testing.assert_close(grads[x], expected, rtol=1e-12, atol=1e-12)
        assert list(grads.incomplete) == [graph._names["y"]]
        with pytest.raises(KeyError, match="the 'target' argument of soft_margin_loss .* which has no derivative"):
            grads[y]
    assert graph._replay.plans == {(len(graph) - 1, None): None}
    assert replay._last_refusal[0].startswith("an incomplete gradient: the loss depends on 'y'")


def test_cross_entropy_rule_is_branch_free_and_replayed():
    """F.cross_entropy's derived rule handles ignore_index with masks, not a Python branch: it gets a plan."""
    logits = torch.randn(4, 3, dtype=D)
    target = torch.tensor([0, 2, 1, 2])

    def make():
        with tg.record() as graph:
            loss = F.cross_entropy(logits * 2, target, ignore_index=2)
        return graph, loss

    steps = _steps(make)
    graph, loss = steps[-1]
    assert [plan for plan in graph._replay.plans.values() if plan is not None]
    reference = logits.clone().requires_grad_()
    expected = torch.autograd.grad(F.cross_entropy(reference * 2, target, ignore_index=2), [reference])[0]
    torch.testing.assert_close(graph.backward(loss)[logits], expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the lecture's training step


def _lecture_step(ex, params):
    with tg.record() as graph:
        loss = forward(*params, ex.Xb, ex.Yb)
    return graph, loss


def test_lecture_training_steps_use_the_plan_and_stay_exact():
    ex = setup()
    params = [p.clone() for p in ex.parameters]
    fresh()
    for step in range(5):
        graph, loss = _lecture_step(ex, params)
        grads = graph.backward(loss)
        assert_same_gradients(grads, walk(graph, loss))
        if step >= 2:
            assert graph._replay.plans[(len(graph) - 1, None)] is not None
        if step < 4:
            with torch.no_grad():
                for p in params:
                    p -= 0.1 * grads[p]
    # the plan's gradients against torch autograd, on the last step's parameters
    refs = [p.detach().clone().requires_grad_() for p in params]
    forward(*refs, ex.Xb, ex.Yb).backward()
    for p, r in zip(params, refs):
        torch.testing.assert_close(grads[p], r.grad, rtol=1e-5, atol=1e-7)
    assert graph.compare(loss).ok
    parameters = {"C", "W1", "b1", "W2", "b2", "bngain", "bnbias"}  # here: params[0] ... (the caller's list)
    assert set(LECTURE_ROWS) - parameters <= set(graph.names) and "params[0]" in graph.names


def test_names_on_a_matched_recording_are_the_full_paths():
    ex = setup()
    params = ex.parameters
    fresh()
    _lecture_step(ex, params)
    first, _ = _lecture_step(ex, params)
    second, _ = _lecture_step(ex, params)
    assert second._replay is first._replay
    assert_same_graph(second, first)
    assert {"emb", "hprebn", "bnvar_inv", "logprobs", "loss"} <= set(second.names)


# ---------------------------------------------------------------- structure changes between steps


def _branchy(x, w, mode):
    with tg.record() as graph:
        h = x @ w
        if mode == "tanh":
            h = torch.tanh(h)
        elif mode == "relu":
            h = torch.relu(h)
        loss = h.sum(dim=0 if mode != "dim1" else 1).pow(2).sum()
    return graph, loss


@pytest.mark.parametrize("change", ["shape", "branch", "argument", "dtype", "leaf_strides", "requires_grad"])
def test_a_structure_change_falls_back_to_the_full_path(change):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 3, generator=g, dtype=D), torch.randn(3, 5, generator=g, dtype=D)
    fresh()
    for _ in range(4):  # first recording, template (walk), trace, plan
        graph, loss = _branchy(x, w, "tanh")
        graph.backward(loss)
    assert graph._replay.plans[(len(graph) - 1, None)] is not None
    template = graph._replay
    x2, w2, mode = x, w, "tanh"
    if change == "shape":
        x2 = torch.randn(6, 3, generator=g, dtype=D)
    elif change == "branch":
        mode = "relu"
    elif change == "argument":
        mode = "dim1"
    elif change == "dtype":
        x2, w2 = x.float(), w.float()
    elif change == "leaf_strides":
        w2 = w.t().contiguous().t()
    elif change == "requires_grad":
        w2 = w.clone().requires_grad_()
    changed, loss = _branchy(x2, w2, mode)
    assert changed._replay is not template
    fresh()
    reference, ref_loss = _branchy(x2, w2, mode)
    assert_same_graph(changed, reference)
    assert_same_gradients(changed.backward(loss), walk(reference, ref_loss))
    # and the original structure still replays its plan (a line keeps a few templates)
    again, loss = _branchy(x, w, "tanh")
    assert_same_gradients(again.backward(loss), walk(again, loss))


def _biased(x, w, b):
    with tg.record() as graph:
        h = torch.tanh(x @ w + b)
        loss = (h * h).sum()
    return graph, loss


@pytest.mark.parametrize("matchers", [False, True])
def test_a_leaf_of_another_shape_with_the_same_output_shape_is_another_structure(matchers):
    """A bias of shape (4, 5) where the template's was (1, 5): x @ w + b has the same shape either way and the
    strides are equal, so only the leaf's own shape tells them apart; its gradient must not be summed to
    (1, 5), as it was for the template's."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(4, 3, generator=g, dtype=D), torch.randn(3, 5, generator=g, dtype=D)
    b = torch.randn(1, 5, generator=g, dtype=D)
    fresh()
    for _ in range(2 + (replay.GENERATE_AFTER if matchers else 1)):
        template, loss = _biased(x, w, b)
        template.backward(loss)
    assert (template._replay.matchers is not None and template._replay.matchers[0] is not None) == matchers
    b2 = torch.randn(4, 5, generator=g, dtype=D)
    assert b2.stride() == b.stride()
    graph, loss = _biased(x, w, b2)
    assert graph._replay is not template._replay
    grads = graph.backward(loss)
    leaves = [t.clone().requires_grad_() for t in (x, w, b2)]
    (torch.tanh(leaves[0] @ leaves[1] + leaves[2]) ** 2).sum().backward()
    for tensor, leaf in zip((x, w, b2), leaves):
        assert grads[tensor].shape == leaf.grad.shape
        torch.testing.assert_close(grads[tensor], leaf.grad, rtol=1e-12, atol=1e-12)


def _scaled(x, factor, *, keepdim=False):
    with tg.record() as graph:
        y = (x * factor).sum(0, keepdim=keepdim)
        loss = y.exp().sum()
    return graph, loss


@pytest.mark.parametrize("first,then", [(2, 2.0), (2.0, 3.0), (0.0, -0.0), (1, True), (float("nan"), float("nan"))])
def test_non_tensor_arguments_match_strictly(first, then):
    x = torch.randn(3, 4, dtype=D)
    fresh()
    for _ in range(2 + replay.GENERATE_AFTER):  # the generated matchers compare the next call's arguments
        template, _ = _scaled(x, first)
    graph, loss = _scaled(x, then)
    same = type(first) is type(then) and (first == then and math.copysign(1, first) == math.copysign(1, then)
                                          or first != first and then != then)
    assert (graph._replay is template._replay) == same
    fresh()
    reference, _ = _scaled(x, then)
    assert_same_graph(graph, reference)


def test_keyword_arguments_and_scopes_are_part_of_the_structure():
    x = torch.randn(3, 4, dtype=D)
    fresh()
    for _ in range(2 + replay.GENERATE_AFTER):
        template, _ = _scaled(x, 2.0)
    graph, _ = _scaled(x, 2.0, keepdim=True)
    assert graph._replay is not template._replay and template._replay.matchers is not None

    def scoped(label):
        with tg.record() as graph:
            with tg.scope(label):
                loss = (x * 2).sum()
        return graph, loss

    fresh()
    for _ in range(2 + replay.GENERATE_AFTER):
        a, _ = scoped("a")
    b, _ = scoped("b")
    assert a._replay is not b._replay and b.node(2)["scope"] == "b"


def _scaled_by(x, **options):
    """A user function that torch function modes see (through handle_torch_function, as torch's own functions),
    taking any keyword: a keyword's name need not be an identifier."""
    if has_torch_function_unary(x):
        return handle_torch_function(_scaled_by, (x,), x, **options)
    return x * options["by-factor"]


def _keyword_step(x, w):
    with tg.record() as graph:
        h = _scaled_by(x, **{"by-factor": 3})  # no gradient rule: its output is only read detached
        loss = (h.detach() * w).exp().sum()
    return graph, loss


def test_a_keyword_that_is_no_identifier_is_left_to_the_generic_match():
    """A generated matcher names each keyword argument in its source (KWARG_<name>); a call with a keyword that is
    no identifier ("by-factor") gets none and is matched by the generic match. (A mutant generating it anyway
    raised a SyntaxError out of the with block once the structure had matched twice.)"""
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(3, generator=g, dtype=D), torch.randn(3, generator=g, dtype=D)
    fresh()
    for _ in range(3 + replay.GENERATE_AFTER):
        graph, loss = _keyword_step(x, w)
    template = graph._replay
    assert template is not None and template.matched > replay.GENERATE_AFTER
    assert template.matchers[0] is None and any(template.matchers[1:])
    reference, _ = _reference(_keyword_step, x, w)
    assert_same_graph(graph, reference)
    (expected,) = _torch_gradients(lambda leaf: ((x * 3) * leaf).exp().sum(), w)
    torch.testing.assert_close(graph.backward(loss)[w], expected, rtol=1e-12, atol=1e-12)


def _column(x, w, index):
    with tg.record() as graph:
        h = (x * w)[:, [index]]  # a tensor inside a list inside the index: kept as it is in the arguments, no node
        loss = h.exp().sum()
    return graph, loss


@pytest.mark.parametrize("reuse", [False, True])
def test_a_stray_tensor_in_the_arguments_is_this_steps(reuse):
    """A tensor the recorder keeps as it is (not a Ref: nested in a list in a tuple) cannot be compared with the
    template's: matching stops at its call, whose node holds this step's index, a new tensor or the same one
    changed in place, of the same output shape. Graphs as the full path's, gradients as torch autograd's."""
    g = torch.Generator().manual_seed(12)
    x, w = torch.randn(3, 4, generator=g, dtype=D), torch.randn(4, generator=g, dtype=D)
    index = torch.tensor(0)
    fresh()
    for step in range(3 + replay.GENERATE_AFTER):
        if reuse:
            index.fill_(step % 4)
        else:
            index = torch.tensor(step % 4)
        graph, loss = _column(x, w, index)
        assert_same_graph(graph, _reference(_column, x, w, index)[0])
        (expected,) = _torch_gradients(lambda leaf, i=index: (x * leaf)[:, [i]].exp().sum(), w)
        torch.testing.assert_close(graph.backward(loss)[w], expected, rtol=1e-12, atol=1e-12)
        assert expected[step % 4] != 0 and expected.count_nonzero() == 1
    assert graph._replay is not None and graph._replay.events  # the template replays the calls before it


def _product(a, b):
    with tg.record() as graph:
        loss = (a * b).sum()
    return graph, loss


def test_one_tensor_where_the_template_had_two_new_leaves_is_another_structure():
    x, y = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    fresh()
    for _ in range(2 + replay.GENERATE_AFTER):  # the generated matchers run from here on
        template, _ = _product(x, y)
    assert template._replay.matchers[0] is not None
    graph, loss = _product(x, x)
    assert graph._replay is not template._replay and graph.node(0)["value"] is x and len(graph) == 3
    fresh()
    reference, ref_loss = _product(x, x)
    assert_same_graph(graph, reference)
    assert_same_gradients(graph.backward(loss), walk(reference, ref_loss))


def _addcmul(a, b, c):
    with tg.record() as graph:
        loss = torch.addcmul(a, b, c).exp().sum()
    return graph, loss


@pytest.mark.parametrize("matchers", [False, True])
def test_a_repeated_new_leaf_in_another_position_is_another_structure(matchers):
    """addcmul(x, y, x) where the template had addcmul(a, b, b): as many new leaves, but the repeat is of the
    first, not the second; matched, the third argument would be y and both gradients wrong."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, generator=g, dtype=D), torch.randn(3, generator=g, dtype=D)
    fresh()
    for _ in range(2 + (replay.GENERATE_AFTER if matchers else 0)):
        template, _ = _addcmul(x, y, y)
    graph, loss = _addcmul(x, y, x)
    assert graph._replay is not template._replay
    grads = graph.backward(loss)
    leaves = [t.clone().requires_grad_() for t in (x, y)]
    torch.addcmul(leaves[0], leaves[1], leaves[0]).exp().sum().backward()
    torch.testing.assert_close(grads[x], leaves[0].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[y], leaves[1].grad, rtol=1e-12, atol=1e-12)


def _selected(x, mask):
    with tg.record() as graph:
        loss = (x.masked_select(mask).exp() * 2).sum()
    return graph, loss


@pytest.mark.parametrize("matchers", [False, True])
def test_an_output_of_another_shape_is_another_structure(matchers):
    """masked_select with a mask of another count: the same arguments as the template's (a leaf of the same shape
    and dtype), an output of another shape; matched, its nodes kept the template's shapes and the backward
    failed on a gradient of shape (2,) for a node of shape (3,)."""
    x = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=D)
    mask = torch.tensor([1, 0, 0, 0, 0, 1], dtype=torch.bool)
    fresh()
    for _ in range(2 + (replay.GENERATE_AFTER if matchers else 0)):
        template, _ = _selected(x, torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool))
    graph, loss = _selected(x, mask)
    assert graph._replay is not template._replay and graph.node(2)["shape"] == (2,)
    grads = graph.backward(loss)
    leaf = x.clone().requires_grad_()
    (leaf.masked_select(mask).exp() * 2).sum().backward()
    torch.testing.assert_close(grads[x], leaf.grad, rtol=1e-12, atol=1e-12)


def _prefix(x, w, v, more):
    with tg.record() as graph:
        loss = (x * w).exp().sum()
        if more:  # an update of a leaf, which a template does not replay, then a new leaf v
            x[0] = 5.0
            (x * v).sum()
    return graph, loss


def test_a_recording_that_stops_where_the_templates_replayed_calls_end_is_recorded_in_full():
    """The template goes on past its last replayed call (x[0] = ..., then a new leaf); a recording that ends
    there matched every replayed call but not the template's nodes: finished as the template, its leaf
    snapshot looked for the template's leaves (IndexError)."""
    g = torch.Generator().manual_seed(0)
    x0, w, v = (torch.randn(3, generator=g, dtype=D) for _ in range(3))
    fresh()
    for _ in range(3):
        template, loss = _prefix(x0.clone(), w, v, True)
        template.backward(loss)
    x = x0.clone()
    graph, loss = _prefix(x, w, v, False)
    assert graph._replay is not template._replay and len(graph) == 5
    grads = graph.backward(loss)
    leaves = [t.clone().requires_grad_() for t in (x0, w)]
    (leaves[0] * leaves[1]).exp().sum().backward()
    torch.testing.assert_close(grads[x], leaves[0].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[w], leaves[1].grad, rtol=1e-12, atol=1e-12)


def _casts(x, y):
    with tg.record() as graph:
        same = x.float()  # x is float32 already: x itself comes back, and the graph has not seen x yet
        wider = y.float()  # the same method, a new value: the template's next call
        loss = (same * wider).sum()
    return graph, loss


def test_a_call_returning_an_unseen_input_as_is_does_not_stop_matching():
    """The fuzzer's find: ``x.float()`` of a float32 ``x`` the graph meets only later was matched against the
    template's next ``float`` call and stopped matching, so the structure never got its generated matchers."""
    x, y = torch.randn(3), torch.randn(3, dtype=D)
    fresh()
    for _ in range(2 + replay.GENERATE_AFTER):
        graph, loss = _casts(x, y)
    assert graph._replay is not None and graph._replay.matchers is not None
    fresh()
    reference, ref_loss = _casts(x, y)
    assert_same_graph(graph, reference)
    assert_same_gradients(graph.backward(loss), walk(reference, ref_loss))


def _twice(x, which):
    def left(t):
        return t.exp()  # line A

    def right(t):
        return t.exp()  # line B: the same op from another line

    with tg.record() as graph:
        y = left(x) if which == "left" else right(x)
        loss = y.sum()
    return graph, loss


def test_the_same_op_from_another_line_is_another_structure():
    x = torch.randn(3, dtype=D)
    fresh()
    _twice(x, "left")
    a, _ = _twice(x, "left")
    b, _ = _twice(x, "right")
    assert a._replay is not None and a._replay is not b._replay
    assert a.node("y")["source"] != b.node("y")["source"]
    fresh()
    reference, _ = _twice(x, "right")
    assert_same_graph(b, reference)


def _reference(step, *args):
    """``step(*args)`` recorded by the recorder's full path (the templates are put back afterwards)."""
    saved = dict(replay.templates())
    fresh()
    try:
        return step(*args)
    finally:
        fresh()
        replay.templates().update(saved)


def _autocast_step(x, w, inside):
    with tg.record() as graph:  # (inside: autocast switched on and off inside the block, around the same line)
        with torch.autocast("cpu", dtype=torch.bfloat16) if inside else contextlib.nullcontext():
            loss = torch.tanh(x * w).sum()
    return graph, loss


def _either_line(x, w, first):
    with tg.record() as graph:
        if first:
            a = x * w  # line A
            loss = a.exp().sum()
        else:
            b = x * w  # line B: the same calls from another line of the same code
            loss = b.exp().sum()
    return graph, loss


@pytest.mark.parametrize("matchers", [False, True])
def test_the_same_call_from_another_line_of_the_same_code_is_another_structure(matchers):
    """Another instruction than the template's, in the same code object, is its call only on the template's line
    (replay._same_line: a mutant matching it on any line gave b the source and name of line A's a)."""
    x, w = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    fresh()
    for _ in range(2 + (replay.GENERATE_AFTER if matchers else 0)):
        template, _ = _either_line(x, w, True)
    assert (template._replay.matchers is not None) == matchers
    graph, loss = _either_line(x, w, False)
    assert graph._replay is not template._replay
    reference, _ = _reference(_either_line, x, w, False)
    assert_same_graph(graph, reference)
    assert "b" in graph.names and "a" not in graph.names
    leaf = w.clone().requires_grad_()
    (x * leaf).exp().sum().backward()
    torch.testing.assert_close(graph.backward(loss)[w], leaf.grad, rtol=1e-12, atol=1e-12)


_SHARED = torch.randn(3, dtype=D, generator=torch.Generator().manual_seed(5))


def _layer(x, repeats):
    for _ in range(repeats):
        x = (x * _SHARED).tanh()
    return x


def _stack(x, nested):
    """The same calls from the same lines either way: two calls of _layer, or one that loops twice."""
    y = _layer(_layer(x, 1), 1) if nested else _layer(x, 2)
    return y.sum()


def _two_blocks(x, which):
    if which == "first":
        with tg.record() as graph:  # a with line of its own ...
            loss = _stack(x, nested=True)
    else:
        with tg.record() as graph:  # ... and another, recording the same calls from another call tree
            loss = _stack(x, nested=False)
    return graph, loss


def test_each_with_line_keeps_its_own_templates():
    """Templates are keyed by the line of the ``with`` statement: a block at another line of the same function
    never uses this line's template, even where its calls (the same functions, lines and arguments) match it.
    Here the two blocks' call trees differ, which a template does not check (a mutant keying templates by the
    code object alone gave the second block the first one's calls: nodes of one _layer call in two)."""
    x = torch.randn(3, dtype=D)
    fresh()
    for _ in range(2 + replay.GENERATE_AFTER):
        first, _ = _two_blocks(x, "first")
    for step in range(3):
        graph, loss = _two_blocks(x, "second")
        assert graph._replay is not first._replay
        if step:
            assert graph._replay is not None  # its own line's template
        assert_same_graph(graph, _reference(_two_blocks, x, "second")[0])
    assert len({key for key in replay.templates() if key[0] is _two_blocks.__code__}) == 2
    leaf = x.clone().requires_grad_()
    _layer(leaf, 2).sum().backward()
    torch.testing.assert_close(graph.backward(loss)[x], leaf.grad, rtol=1e-12, atol=1e-12)


def _one_line(x, nested):
    with tg.record() as graph:  # one with line for both call trees
        loss = _stack(x, nested=nested)
    return graph, loss


@pytest.mark.parametrize("generated", [False, True])
def test_a_loop_in_one_call_does_not_replay_a_template_of_two_calls(generated):
    """``_layer(x, 2)`` makes the calls of ``_layer(_layer(x, 1), 1)`` from the same lines, in one call of _layer
    instead of two. A template of the two calls matched it op for op and gave its nodes the template's calls:
    a node in call 2 of a block with two calls (render drew a second ``_layer`` cluster), and the names of two
    calls (``x_2``). Each call of the template is now matched to its own user frame."""
    x = torch.randn(3, dtype=D)
    fresh()
    for _ in range(2 + (replay.GENERATE_AFTER if generated else 0)):
        _one_line(x, True)
    template = replay.templates()[next(iter(replay.templates()))][0]
    assert (template.matchers is not None) == generated
    for _ in range(3):
        graph, loss = _one_line(x, False)
        reference = _reference(_one_line, x, False)[0]
        assert_same_graph(graph, reference)
        assert graph._calls == reference._calls and len(graph._calls) == 2
    assert graph._replay is not None and graph._replay.matched >= 1  # the loop's own structure replays
    graph, _ = _one_line(x, True)  # and the nested one still gets its two calls
    assert [d["call"] for d in graph._nodes] == [d["call"] for d in _reference(_one_line, x, True)[0]._nodes]
    leaf = x.clone().requires_grad_()
    _layer(leaf, 2).sum().backward()
    graph, loss = _one_line(x, False)
    torch.testing.assert_close(graph.backward(loss)[x], leaf.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("where", ["around", "inside"])
def test_a_recording_under_autocast_is_the_full_paths(where):
    """Under torch.autocast the full path marks each float op (its casts happen below the recorded calls), and
    graph.backward refuses them; a template made without autocast must not replay them unmarked (it did: the
    ops whose dtypes autocast leaves alone matched, and backward ran)."""
    x, w = torch.randn(3, 4), torch.randn(4)
    for _ in range(3):
        _autocast_step(x, w, False)
    if where == "around":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            graph, loss = _autocast_step(x, w, False)
            reference = _reference(_autocast_step, x, w, False)[0]
    else:
        graph, loss = _autocast_step(x, w, True)
        reference = _reference(_autocast_step, x, w, True)[0]
    assert_same_graph(graph, reference)
    assert [d["unsupported"] is not None for d in graph._nodes] == [False, False, True, True, True]
    with pytest.raises(NotImplementedError, match="recorded under torch.autocast"):
        graph.backward(loss)


def _torch_gradients(fn, *inputs):
    """Torch autograd's gradients of ``fn(*inputs)`` with respect to the inputs (fresh float64 copies)."""
    refs = [x.detach().clone().requires_grad_() for x in inputs]
    return torch.autograd.grad(fn(*refs), refs)


def _in_place(x, b, v):
    h = x.exp()  # exp's rule reads its output: the value before the update, kept by the recorder
    h += b  # b: a new leaf in an in-place call
    h.mul_(v)  # a constant argument
    h.add_(b, alpha=0.5)  # a keyword argument
    values, _ = h.max(0)
    values += 1.0  # one output of a call returning two: its sibling's recorded result keeps the old value
    pooled = F.avg_pool1d(h.unsqueeze(0), 2)  # a view of a tensor made inside the call, which no one else sees
    pooled.mul_(3.0)
    return h.tanh().sum() + values.exp().sum() + pooled.sum()


def _out_of_place(x, b, v):  # the same function for torch autograd (which refuses exp's output updated in place)
    h = (x.exp() + b) * v + 0.5 * b
    return h.tanh().sum() + (h.max(0)[0] + 1.0).exp().sum() + (F.avg_pool1d(h.unsqueeze(0), 2) * 3.0).sum()


def _in_place_step(x, b, v):
    with tg.record() as graph:
        loss = _in_place(x, b, v)
    return graph, loss


def test_in_place_ops_on_intermediates_are_replayed():
    """``h += b`` on a tensor the graph made (the lecture's part-3 Linear) is matched like any other call, before it
    runs: the recording is the template's, node for node what the full path makes (the old value kept, the new
    version with its 'previous' link, names, versions), and the gradients are torch autograd's. Before, matching
    stopped at the first in-place call: every step made a new template and walked the rules."""
    g = torch.Generator().manual_seed(3)
    b = torch.randn(4, generator=g, dtype=D)
    fresh()
    for step in range(6):  # seen, template (walk), matched (trace), matched (plan) ...
        x = torch.randn(3, 4, generator=g, dtype=D)
        graph, loss = _in_place_step(x, b, 2.0)
        grads = graph.backward(loss)
        if step == 1:
            template = graph._replay
            assert [e.inplace for e in template.events].count(True) == 5
        elif step > 1:
            assert graph._replay is template and template.matched == step - 1
        reference, ref_loss = _reference(_in_place_step, x, b, 2.0)
        assert_same_graph(graph, reference)
        assert_same_gradients(grads, walk(reference, ref_loss))
        dx, db = _torch_gradients(lambda x, b: _out_of_place(x, b, 2.0), x, b)
        torch.testing.assert_close(grads[x], dx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads[b], db, rtol=1e-12, atol=1e-12)
    assert template.plans[(len(graph) - 1, None)] is not None
    assert graph.names[1:4] == ["h_v0", "b", "h_v1"]
    changed, loss = _in_place_step(x, b, 3.0)  # another constant: the full path from there
    assert changed._replay is not template
    assert_same_graph(changed, _reference(_in_place_step, x, b, 3.0)[0])


def _hidden_change(x, b, hidden):
    with tg.record() as graph:
        h = x * 2
        if hidden:
            with torch._C.DisableTorchFunction():  # a change the recorder does not see
                h.add_(1.0)
        h += b
        loss = h.sum()
    return graph, loss


def test_an_unseen_change_before_an_in_place_op_is_the_full_paths_error():
    x, b = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    fresh()
    for _ in range(3):
        graph, _ = _hidden_change(x, b, hidden=False)
    assert graph._replay.matched == 1
    with pytest.raises(RuntimeError, match=r"tensor 'h' was modified in place by an operation") as replayed:
        _hidden_change(x, b, hidden=True)
    fresh()
    with pytest.raises(RuntimeError) as full:
        _hidden_change(x, b, hidden=True)
    assert str(replayed.value) == str(full.value)


def _hidden_change_in_a_list(x, hidden):
    with tg.record() as graph:
        h = x * 2
        if hidden:
            with torch._C.DisableTorchFunction():  # a change the recorder does not see
                h.add_(1.0)
        loss = torch.cat([x, h]).exp().sum()  # h inside a list: checked apart from the positional tensors
    return graph, loss


@pytest.mark.parametrize("matchers", [False, True])
def test_an_unseen_change_of_a_tensor_in_a_list_is_the_full_paths_error(matchers):
    """The full path refuses h changed unseen before torch.cat([x, h]) as it records the call; a match that
    looked only at the node of a tensor in a list (not its version) recorded it, and backward raised later."""
    x = torch.randn(3, dtype=D)
    fresh()
    for _ in range(3 + (replay.GENERATE_AFTER if matchers else 0)):
        graph, _ = _hidden_change_in_a_list(x, hidden=False)
    assert graph._replay.matched == 1 + (replay.GENERATE_AFTER if matchers else 0)
    with pytest.raises(RuntimeError, match=r"tensor 'h' was modified in place by an operation") as replayed:
        _hidden_change_in_a_list(x, hidden=True)
    fresh()
    with pytest.raises(RuntimeError) as full:
        _hidden_change_in_a_list(x, hidden=True)
    assert str(replayed.value) == str(full.value)


class _LectureLinear:  # makemore part 3, with a bias
    def __init__(self, fan_in, fan_out, g):
        self.weight = torch.randn((fan_in, fan_out), generator=g, dtype=D) / fan_in ** 0.5
        self.bias = torch.randn(fan_out, generator=g, dtype=D) * 0.1

    def __call__(self, x):
        self.out = x @ self.weight
        self.out += self.bias
        return self.out

    def parameters(self):
        return [self.weight, self.bias]


class _LectureBatchNorm1d:  # makemore part 3: running statistics rebound under torch.no_grad()
    def __init__(self, dim):
        self.gamma, self.beta = torch.ones(dim, dtype=D), torch.zeros(dim, dtype=D)
        self.running_mean, self.running_var = torch.zeros(dim, dtype=D), torch.ones(dim, dtype=D)

    def __call__(self, x):
        xmean, xvar = x.mean(0, keepdim=True), x.var(0, keepdim=True)
        self.out = self.gamma * ((x - xmean) / torch.sqrt(xvar + 1e-5)) + self.beta
        with torch.no_grad():
            self.running_mean = 0.9 * self.running_mean + 0.1 * xmean
            self.running_var = 0.9 * self.running_var + 0.1 * xvar
        return self.out

    def parameters(self):
        return [self.gamma, self.beta]


def _part3_loss(x, y, *params):
    """The part-3 layers' forward with ``params`` in their places (torch autograd's copy of it)."""
    layers = _part3_layers(torch.Generator().manual_seed(5))
    values = iter(params)
    for layer in layers:
        for name in ("weight", "bias", "gamma", "beta"):  # (the order of the layers' parameters())
            if hasattr(layer, name):
                setattr(layer, name, next(values))
    return _part3_forward(layers, x, y)


def _part3_layers(g):
    return [_LectureLinear(6, 8, g), _LectureBatchNorm1d(8), torch.tanh, _LectureLinear(8, 5, g),
            _LectureBatchNorm1d(5)]


def _part3_forward(layers, x, y):
    for layer in layers:
        x = layer(x)
    return F.cross_entropy(x, y)


def test_lecture_part3_layers_are_replayed_and_match_torch():
    """The part-3 net (Linear with ``self.out += self.bias``, BatchNorm1d updating its statistics under no_grad):
    every step after the second matches the template to the end and runs the backward plan; each step's
    gradients are torch autograd's (float64) on the same parameters, through SGD updates."""
    layers = _part3_layers(torch.Generator().manual_seed(5))
    params = [p for layer in layers if hasattr(layer, "parameters") for p in layer.parameters()]
    g = torch.Generator().manual_seed(6)
    fresh()
    for step in range(5):
        x, y = torch.randn(10, 6, generator=g, dtype=D), torch.randint(0, 5, (10,), generator=g)
        with tg.record() as graph:
            loss = _part3_forward(layers, x, y)
        grads = graph.backward(loss)
        if step == 1:
            template = graph._replay
        elif step > 1:
            assert graph._replay is template and template.matched == step - 1
        if step > 2:
            assert template.plans[(len(graph) - 1, None)] is not None
        expected = _torch_gradients(functools.partial(_part3_loss, x, y), *params)
        for p, dp in zip(params, expected):
            torch.testing.assert_close(grads[p], dp, rtol=1e-10, atol=1e-12)
        for p in params:
            p -= 0.1 * grads[p]


def _not_replayed(x, b, kind):
    with tg.record() as graph:
        h = x * 2
        if kind == "view":
            h = h[0]
            h += b  # through a view of x * 2
        elif kind == "aliased":
            flat = h.view(-1)  # noqa: F841 - a recorded view of h
            h += b
        elif kind == "setitem":
            h[0] = b
        elif kind == "relu_inplace":
            F.relu(h, inplace=True)
        elif kind == "leaf":
            x += b  # the caller's tensor
            h = h + x
        loss = (h * h).sum()
    return graph, loss


@pytest.mark.parametrize("kind", ["view", "aliased", "setitem", "relu_inplace", "leaf"])
def test_in_place_ops_a_template_does_not_replay_are_recorded_in_full(kind):
    """In-place calls whose full path does more than keep the target's old value (other recorded tensors sharing
    its memory, x[i] = v, inplace=True, a leaf updated): matching stops there, and the rest is recorded in full."""
    g = torch.Generator().manual_seed(4)
    x0, b = torch.randn(3, 4, generator=g, dtype=D), torch.randn(4, generator=g, dtype=D)
    fresh()
    for _ in range(4):
        x = x0.clone()
        graph, loss = _not_replayed(x, b, kind)
        grads = graph.backward(loss)
        reference, ref_loss = _reference(_not_replayed, x0.clone(), b, kind)
        assert_same_graph(graph, reference)
        assert_same_gradients(grads, walk(reference, ref_loss))
        assert graph._replay is None or graph._replay.matched == 0  # a new template at every step


def _argument_chosen_step(q, k, v, dropout_p, inplace):
    torch.manual_seed(0)
    with tg.record() as graph:  # one line: the recordings share a template
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        h = attended * 2
        loss = (F.relu(h, inplace=inplace) * h).sum()
    return graph, loss


def _argument_chosen_torch(q, k, v, dropout_p, inplace):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(0)
    h = F.scaled_dot_product_attention(*leaves, dropout_p=dropout_p, is_causal=True) * 2
    (F.relu(h, inplace=inplace) * h).sum().backward()
    return [t.grad for t in leaves]


def test_arguments_that_take_a_call_off_the_common_path_are_not_replayed():
    """A template's attention without dropout and F.relu(h) took the common path; the same lines called with
    dropout_p > 0 (model.train() after evaluating) and inplace=True must not: the attention is recorded as its
    parts (else its node has no rule) and the in-place relu as a new version of h (else it is no node at all,
    and h's gradient is wrong). Checked against torch autograd."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 4, 3, generator=g, dtype=D) for _ in range(3))
    fresh()
    for dropout_p, inplace in [(0.0, False)] * 3 + [(0.5, False), (0.0, False), (0.0, False), (0.0, True)]:
        graph, loss = _argument_chosen_step(q, k, v, dropout_p, inplace)
        grads = graph.backward(loss)
        for tensor, expected in zip((q, k, v), _argument_chosen_torch(q, k, v, dropout_p, inplace)):
            torch.testing.assert_close(grads[tensor], expected)


# ---------------------------------------------------------------- names


class _Layer:
    def __init__(self, w):
        self.w = w
        self.out = None

    def __call__(self, x):
        self.out = torch.tanh(x @ self.w)
        return self.out


def _layers_step(layers, x, alias):
    with tg.record() as graph:
        h = x
        for layer in layers:
            h = layer(h)
        loss = h.sum()
        if alias:
            first_out = layers[0].out  # noqa: F841 - names node layers[0].out differently
    return graph, loss


def test_names_follow_the_variables_of_each_step():
    g = torch.Generator().manual_seed(1)
    layers = [_Layer(torch.randn(4, 4, generator=g, dtype=D)) for _ in range(2)]
    x = torch.randn(2, 4, generator=g, dtype=D)
    fresh()
    _layers_step(layers, x, alias=False)
    plain, _ = _layers_step(layers, x, alias=False)
    assert "layers[0].out" in plain.names and "layers[0].w" in plain.names
    renamed, _ = _layers_step(layers, x, alias=True)  # same structure, another variable names a node
    assert renamed._replay is plain._replay
    assert "first_out" in renamed.names and "layers[0].out" not in renamed.names
    fresh()
    reference, _ = _layers_step(layers, x, alias=True)
    assert_same_graph(renamed, reference)
    again, loss = _layers_step(layers, x, alias=False)
    assert "layers[0].out" in again.names
    assert again.backward(loss)["dlayers[0].w"].shape == (4, 4)


def _function_locals(x):
    def inner(t):
        hidden = t * 3
        return hidden.exp()

    with tg.record() as graph:
        out = inner(x)
        loss = out.sum()
    return graph, loss


def test_function_local_names_on_matched_recordings():
    x = torch.randn(3, dtype=D)
    fresh()
    _function_locals(x)
    first, _ = _function_locals(x)
    graph, loss = _function_locals(x)
    assert graph._replay is first._replay  # matched
    assert_same_graph(graph, first)
    assert "hidden" in graph.names and "out" in graph.names
    assert graph.backward(loss)["dhidden"].shape == (3,)


# ---------------------------------------------------------------- errors, on both paths


def _steps(make, count=4, backward=True):
    """``count`` recordings of one structure, each backpropagated: the walk, the trace, then plans."""
    fresh()
    out = []
    for _ in range(count):
        graph, loss, *rest = make()
        if backward:
            assert_same_gradients(graph.backward(loss), walk(graph, loss))
        out.append((graph, loss, *rest))
    return out


def test_errors_are_the_same_on_every_path():
    x = torch.randn(3, dtype=D)

    def make():
        with tg.record() as graph:
            y = torch.tanh(x * 2)
            loss = y.sum()
        return graph, loss, y

    for graph, loss, y in _steps(make, backward=False):
        with pytest.raises(ValueError, match="must be a scalar"):
            graph.backward(y)
        with pytest.raises(ValueError, match="grad has shape"):
            graph.backward(loss, grad=torch.ones(2, dtype=D))
        with pytest.raises(ValueError, match="belongs to no graph"):
            graph.backward(torch.ones(()))
        with pytest.raises(ValueError, match="grad must be a tensor"):
            graph.backward(loss, grad=1.0)
        graph.backward(loss)
        graph.backward(loss)


def test_modified_after_recording_is_an_error_on_the_plan_path():
    x = torch.randn(3, dtype=D)

    def make():
        with tg.record() as graph:
            h = torch.tanh(x * 2)
            loss = h.sum()
        return graph, loss, h

    steps = _steps(make)
    graph, loss, h = steps[-1]
    assert graph._replay.plans  # this structure has a plan
    h.add_(1.0)
    with pytest.raises(RuntimeError, match=r"'h' was modified in place"):
        graph.backward(loss)


def test_an_input_modified_after_recording_without_leaf_checks_is_an_error_on_the_plan_path():
    # check_leaves=False: no leaf snapshot, so only the versions of the inputs of each rule's node show the change
    w = torch.randn(3, dtype=D)

    def make():
        with tg.record(check_leaves=False) as graph:
            h = torch.tanh(w * 2)
            loss = (h * w).sum()
        return graph, loss, h

    steps = _steps(make)
    graph, loss, h = steps[-1]
    assert graph._replay.plans  # this structure has a plan
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match=r"'w' was modified in place"):
        graph.backward(loss)


def test_data_written_after_recording_is_an_error_on_the_plan_path():
    w = torch.randn(3, 3, dtype=D)
    x = torch.randn(2, 3, dtype=D)

    def make():
        with tg.record() as graph:
            loss = torch.tanh(x @ w).sum()
        return graph, loss

    steps = _steps(make)
    graph, loss = steps[-1]
    w.data -= 0.1  # no version bump: the leaf checksum catches it
    with pytest.raises(RuntimeError, match=r"'w' was modified in place"):
        graph.backward(loss)
    w.data += 0.1
    graph2, loss2 = make()
    assert_same_gradients(graph2.backward(loss2), walk(graph2, loss2))


def test_an_op_without_rule_raises_the_same_error_every_step():
    x = torch.rand(4, dtype=D) + 0.5

    def make():
        with tg.record() as graph:
            loss = torch.special.bessel_j0(x).sum()  # no rule for bessel_j0
        return graph, loss

    for graph, loss in _steps(make, backward=False):
        with pytest.raises(NotImplementedError, match=r"bessel_j0.*test_replay\.py:\d+"):
            graph.backward(loss)


def test_anomaly_mode_keeps_no_template():
    x = torch.rand(3, dtype=D) + 0.5

    def make():
        with tg.record(anomaly=True) as graph:
            loss = (x.log() * 2).sum()
        return graph, loss

    for graph, _loss in [make(), make()]:
        assert graph._replay is None


def test_a_seed_gradient_has_its_own_plan():
    x = torch.randn(3, dtype=D)

    def make():
        with tg.record() as graph:
            y = torch.tanh(x * x)
        return graph, y

    for graph, y in _steps(make, backward=False):
        seed = torch.arange(3, dtype=D)
        assert_same_gradients(graph.backward(y, grad=seed), walk(graph, y, seed))
    assert any(key[1] is not None for key in graph._replay.plans)


def test_own_rules_and_other_modes_use_the_rule_walk():
    x = torch.randn(3, dtype=D)

    def make():
        with tg.record() as graph:
            y = x.exp()
            loss = y.sum()
        return graph, loss

    graph, loss = _steps(make)[-1]
    graph.node("y")["rule"] = lambda g, out, x: g * 10  # a node carrying its own rule
    torch.testing.assert_close(graph.backward(loss)[x], torch.full((3,), 10.0, dtype=D))
    graph.node("y")["rule"] = None
    traced = tg.trace(graph, loss)  # a backward recorded by another recorder makes the rule walk's calls
    assert_same_gradients(traced.grads, walk(graph, loss))
    assert "dy" in traced.adjoint.names


def test_a_rule_carried_by_the_traced_step_never_becomes_the_plan_of_the_next_steps():
    """The trace of a graph whose node carries its own rule records that rule's calls: no plan is made of it
    (a mutant dropping the check in _Printer.plan replayed g * 10 for the exp of every later step, whose nodes
    carry no rule, and its gradients were ten times torch's)."""
    x = torch.randn(3, dtype=D)

    def make():
        with tg.record() as graph:
            y = (x * 2).exp()
            loss = y.sum()
        return graph, loss

    fresh()
    for step in range(5):  # the walk, the trace (under the node's own rule), then no plan
        graph, loss = make()
        if step == 2:
            graph.node("y")["rule"] = lambda g, out, t: g * 10
        grads = graph.backward(loss)
        leaf = x.clone().requires_grad_()
        expected = torch.autograd.grad((leaf * 2).exp().sum(), [leaf])[0]
        if step == 2:  # d(loss)/dy * 10 through y's rule, times 2 through x * 2
            expected = torch.full_like(x, 20.0)
        torch.testing.assert_close(grads[x], expected, rtol=1e-12, atol=1e-12)
    assert graph._replay.plans == {(len(graph) - 1, None): None}
    assert "carries its own rule" in replay._last_refusal[0]


def test_a_seed_that_is_a_forward_value_makes_no_plan():
    """graph.backward(out, grad=y) with y a value of the graph: the trace cannot tell the rules' reads of y from
    reads of the seed, so no plan is made (a mutant dropping the check in _Printer.plan read the seed where the
    rule reads y: the next step's grad=ones gave 2 * ones * ones instead of 2 * y * ones)."""
    x, w = torch.randn(3, dtype=D), torch.randn(3, dtype=D)

    def make():
        with tg.record() as graph:
            y = x * w
            out = y * y
        return graph, out

    def expected(seed):
        leaf = w.clone().requires_grad_()
        y = x * leaf
        return torch.autograd.grad(y * y, [leaf], grad_outputs=seed)[0]

    fresh()
    for _ in range(4):  # the walk, the trace, then the plan if one were made: each seeded with y itself
        graph, out = make()
        y = graph.node("y")["value"]
        torch.testing.assert_close(graph.backward(out, y)[w], expected(y), rtol=1e-12, atol=1e-12)
    graph, out = make()  # the same structure and seed shape, seeded with ones
    seed = torch.ones(3, dtype=D)
    torch.testing.assert_close(graph.backward(out, seed)[w], expected(seed), rtol=1e-12, atol=1e-12)
    assert graph._replay.plans == {(len(graph) - 1, (3,), D, x.device): None}
    assert "the seed is a forward value" in replay._last_refusal[0]


class _CallLog(TorchFunctionMode):
    """A user's mode that logs the torch calls made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


def test_another_torch_function_mode_around_the_backward_sees_the_rule_walk_at_every_step():
    """A mode around graph.backward records or changes its torch calls: no trace and no plan run under it, it
    sees the rule walk's calls at every step (a mutant dropping the mode check in Template.backward traced the
    third step under the mode, 412 calls, and ran the plan at the fourth, 60; the walk makes 93)."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(4, 3, generator=g, dtype=D), torch.randn(3, 5, generator=g, dtype=D)
    target = torch.tensor([0, 1, 4, 2])

    def make():
        with tg.record() as graph:
            h = torch.tanh(x @ w)
            loss = F.cross_entropy(h, target)
        return graph, loss

    fresh()
    leaf = w.clone().requires_grad_()
    expected = torch.autograd.grad(F.cross_entropy(torch.tanh(x @ leaf), target), [leaf])[0]
    for _ in range(4):
        graph, loss = make()
        with _CallLog() as seen:
            grads = graph.backward(loss)
        with _CallLog() as walked:
            reference = walk(graph, loss)
        assert seen.calls == walked.calls
        assert_same_gradients(grads, reference)
        torch.testing.assert_close(grads[w], expected, rtol=1e-12, atol=1e-12)
    assert graph._replay is not None and graph._replay.plans == {}
    for _ in range(2):  # without the mode: the structure's first walk, then the trace that makes its plan
        graph, loss = make()
        graph.backward(loss)
    graph, loss = make()
    assert graph._replay.plans[(len(graph) - 1, None)] is not None
    torch.testing.assert_close(graph.backward(loss)[w], expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- threads, memory, bounds


def test_threads_keep_their_own_templates():
    errors = []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            w = torch.randn(4, 4, generator=g, dtype=D)
            for _ in range(30):
                x = torch.randn(3, 4, generator=g, dtype=D)
                with tg.record() as graph:
                    loss = torch.tanh(x @ w).pow(2).sum()
                assert_same_gradients(graph.backward(loss), walk(graph, loss))
        except Exception as err:  # noqa: BLE001 - reported in the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors


def test_graphs_of_repeated_steps_are_freed_at_once():
    x = torch.randn(8, 4, dtype=D)
    w = torch.randn(4, 4, dtype=D)

    def step():
        with tg.record() as graph:
            loss = torch.tanh(x @ w).sum()
        grads = graph.backward(loss)
        return weakref.ref(graph), grads[w]

    fresh()
    gc.disable()
    try:
        for _ in range(5):
            ref, grad = step()
            assert ref() is None, "a graph must be freed by reference counting (no cycle through its template)"
    finally:
        gc.enable()


def test_the_template_cache_is_bounded():
    fresh()
    x = torch.randn(3, dtype=D)
    for i in range(replay.MAX_TEMPLATES + 10):  # distinct lines: distinct code objects
        code = compile(f"with tg.record() as g{i}:\n    y = x * {i + 1}\n", f"<line {i}>", "exec")
        exec(code, {"tg": tg, "x": x})  # noqa: S102
    assert len(replay.templates()) <= replay.MAX_TEMPLATES
    assert all(len(line) <= replay.PER_LINE for line in replay.templates().values())


def test_a_one_off_recording_makes_no_template():
    x = torch.randn(3, dtype=D)
    fresh()
    graphs = []
    for _ in range(3):
        with tg.record() as graph:
            (x * 2).sum()
        graphs.append(graph)
    assert graphs[0]._replay is None  # the line's first recording: only marked as seen
    assert graphs[1]._replay is not None and graphs[2]._replay is graphs[1]._replay


def test_template_nodes_hold_no_tensors():
    x = torch.randn(3, dtype=D)
    fresh()
    for _ in range(2):
        with tg.record():
            (x * 2).sum()
    [line] = replay.templates().values()
    for data in line[0].nodes:
        assert data["value"] is None and data["result"] is None
        assert not any(isinstance(v, torch.Tensor) for v in data.values())


def test_plan_source_reads_like_the_backward():
    ex = setup()
    params = ex.parameters
    fresh()
    for _ in range(3):
        graph, loss = _lecture_step(ex, params)
        graph.backward(loss)
    plan = graph._replay.plans[(len(graph) - 1, None)]
    assert plan.source.startswith("def plan(nodes, seed):")
    assert "# dprobs" in plan.source and "def unchanged(nodes):" in plan.source


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: plans on GPU untested here")
def test_plans_on_cuda_match_the_rule_walk():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, generator=g).cuda()

    def make():
        x = torch.randn(4, 16, generator=g).cuda()
        with tg.record() as graph:
            loss = torch.tanh(x @ w).pow(2).mean()
        return graph, loss

    for graph, loss in _steps(make):
        assert graph.value(loss).is_cuda
    assert graph._replay.plans[(len(graph) - 1, None)] is not None


def test_matchers_are_generated_only_for_a_structure_that_keeps_repeating():
    """Making them costs up to ~0.5 ms per call: a structure that repeats once or twice never pays it."""
    x, y = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    fresh()
    generated = []
    for _ in range(2 + replay.GENERATE_AFTER):
        graph, _ = _product(x, y)
        generated.append(graph._replay is not None and graph._replay.matchers is not None)
    assert generated == [False] * (1 + replay.GENERATE_AFTER) + [True]


def test_a_template_with_matchers_is_freed_without_the_garbage_collector():
    """Generated matchers reach the next call through the session, not the template: no reference cycle."""
    x, y = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    fresh()
    for _ in range(2 + replay.GENERATE_AFTER):
        graph, _ = _product(x, y)
    template = weakref.ref(graph._replay)
    matcher = weakref.ref(graph._replay.matchers[0])
    gc.disable()
    try:
        del graph
        fresh()
        assert template() is None and matcher() is None
    finally:
        gc.enable()


# ---------------------------------------------------------------- the opt-outs of long training loops


def _lecture_step_with(ex, names, check_leaves):
    with tg.record(names=names, check_leaves=check_leaves) as graph:  # one line: one template for all settings
        loss = forward(ex.C, ex.W1, ex.b1, ex.W2, ex.b2, ex.bngain, ex.bnbias, ex.Xb, ex.Yb)
    return graph, loss


def test_opt_outs_change_names_and_checks_but_not_gradients():
    """names=False gives op-based names, check_leaves=False no snapshot; full and replayed, same gradients."""
    fresh()
    ex = setup(dtype=D)
    settings = [(True, True), (False, False), (False, True), (True, False)] * 3  # each again after the others
    reference, ref_loss = _lecture_step_with(ex, True, True)
    ref_grads = reference.backward(ref_loss)
    for k, (names, check_leaves) in enumerate(settings):
        graph, loss = _lecture_step_with(ex, names, check_leaves)
        assert graph._replay is not None, "replayed from the same line's template"
        grads = graph.backward(loss)
        assert [grads[p] is not None for p in ex.parameters] == [True] * 7
        for node, expected in ref_grads.by_node.items():
            assert torch.equal(grads.by_node[node], expected), f"step {k}: gradient of node {node}"
        user_names = {"logits", "hpreact", "bnraw"} & set(graph.names)
        assert bool(user_names) == names, f"step {k}: names={names} but {sorted(graph.names)[:5]}"
        assert bool(graph._fingerprints) == check_leaves, f"step {k}: check_leaves={check_leaves}"
        if not names:
            assert "logits" not in graph.names and graph.node(ex.W1)["name"].startswith("leaf_")
            assert graph.backward(loss)[ex.W1] is not None  # tensors still find their nodes


def test_check_leaves_false_trusts_data_writes_but_not_version_bumps():
    """Without the snapshot a write through .data goes unseen (as in torch); an in-place op is still caught."""
    w = torch.randn(3, 3, dtype=D)
    x = torch.randn(3, dtype=D)
    for _ in range(4):  # full path, then replayed
        for check_leaves in (True, False):
            with tg.record(check_leaves=check_leaves) as graph:
                y = (x @ w).tanh().sum()
            w.data.mul_(1.0)  # the same values: no leaf really changed
            graph.backward(y)
            with tg.record(check_leaves=check_leaves) as graph:
                y = (x @ w).tanh().sum()
            w.data[0, 0] += 1.0
            if check_leaves:
                with pytest.raises(RuntimeError, match="'w' was modified in place after it was recorded"):
                    graph.backward(y)
            else:
                graph.backward(y)  # unseen: the rule reads the changed w, as torch's would
            with tg.record(check_leaves=check_leaves) as graph:
                y = (x @ w).tanh().sum()
            with torch.no_grad():
                w[0, 0] -= 1.0  # an in-place op: the version counter sees it either way
            with pytest.raises(RuntimeError, match="modified in place"):
                graph.backward(y)


def test_anomaly_cannot_skip_the_leaf_check():
    with pytest.raises(ValueError, match="anomaly=True checks every recorded value"):
        tg.record(anomaly=True, check_leaves=False)


def test_a_name_looked_up_in_a_graph_without_names_says_why():
    ex = setup(dtype=D)
    graph, loss = _lecture_step_with(ex, False, True)
    grads = graph.backward(loss)
    with pytest.raises(KeyError, match=r"recorded with tg.record\(names=False\)"):
        grads["logits"]
    with pytest.raises(ValueError, match=r"recorded with tg.record\(names=False\)"):
        graph.check({"dlogits": torch.zeros(32, 27, dtype=D)}, loss)
    named, loss = _lecture_step_with(ex, True, True)
    with pytest.raises(KeyError) as err:
        named.node("nonexistent")
    assert "names=False" not in str(err.value)


def test_an_input_returned_as_is_does_not_stop_matching():
    """``t.flatten(0, 0)`` of a 1-d tensor returns t itself (no node); the next flatten is the template's."""
    fresh()
    t1 = torch.randn((), dtype=D)

    def fn(t):
        t2 = t[None]
        same = t2.flatten(0, 0)  # an alias: nothing recorded
        return t.flatten(0, 0) * 3 + same * 2

    weight = torch.ones(1, dtype=D)
    graph, loss = _record_case(fn, [t1], weight)
    reference, expected = graph, walk(graph, loss)
    for _ in range(2 + replay.GENERATE_AFTER):
        graph, loss = _record_case(fn, [t1], weight)
        assert_same_graph(graph, reference)
        assert_same_gradients(graph.backward(loss), expected)
    assert graph._replay is not None and graph._replay.matchers is not None
    x = t1.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad((fn(x) * weight).sum(), x)
    torch.testing.assert_close(graph.backward(loss)[t1], grad, rtol=1e-12, atol=0)
