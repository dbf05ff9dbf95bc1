"""Shared test helpers: run a function under tensorgraph and under torch autograd, compare."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

import tensorgraph as tg
from tensorgraph import engine
from tensorgraph.ops import OPS, lookup


def _weights_for(out: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    weight = torch.randn(out.shape, generator=gen, dtype=out.dtype) if out.dim() else torch.tensor(0.7, dtype=out.dtype)
    return weight.to(out.device)


def engine_grads(fn: Callable[..., torch.Tensor], inputs: list[Any]) -> tuple[torch.Tensor, list[Any]]:
    """Record fn(*inputs), backprop a random projection of its output with the engine."""
    probe = fn(*inputs)
    weight = _weights_for(probe)
    with tg.record() as graph:
        out = fn(*inputs)
        loss = (out * weight).sum()
    grads = graph.backward(loss)
    result = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            result.append(grads[x] if x in grads else None)
        else:
            result.append(None)
    return loss.detach(), result


def torch_grads(fn: Callable[..., torch.Tensor], inputs: list[Any]) -> list[Any]:
    refs = [x.detach().clone().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for x in inputs]
    out = fn(*refs)
    weight = _weights_for(out.detach())
    loss = (out * weight).sum()
    diff = [r for r in refs if isinstance(r, torch.Tensor) and r.requires_grad]
    got = iter(torch.autograd.grad(loss, diff, allow_unused=True))
    return [next(got) if isinstance(r, torch.Tensor) and r.requires_grad else None for r in refs]


def assert_matches_torch(fn, inputs, rtol=1e-7, atol=1e-10):
    _, ours = engine_grads(fn, inputs)
    theirs = torch_grads(fn, inputs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, f"input {i}: torch has no gradient, engine has one"
            continue
        assert a is not None, f"input {i}: engine gave no gradient"
        assert a.shape == b.shape, f"input {i}: shape {tuple(a.shape)} != torch's {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"input {i}: dtype {a.dtype} != torch's {b.dtype}"
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, i=i: f"input {i}: {m}")


def finite_differences(fn, inputs, eps=1e-6):
    """Central differences of sum(fn(*inputs) * weight), for every element of every float input."""
    probe = fn(*inputs)
    weight = _weights_for(probe)

    def loss_of(values):
        return (fn(*values) * weight).sum().item()

    grads = []
    for i, x in enumerate(inputs):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            grads.append(None)
            continue
        g = torch.zeros_like(x)
        flat = g.view(-1)
        for k in range(x.numel()):
            plus = [v.clone() if isinstance(v, torch.Tensor) else v for v in inputs]
            minus = [v.clone() if isinstance(v, torch.Tensor) else v for v in inputs]
            plus[i].view(-1)[k] += eps
            minus[i].view(-1)[k] -= eps
            flat[k] = (loss_of(plus) - loss_of(minus)) / (2 * eps)
        grads.append(g)
    return grads


# ---------------------------------------------------------------- repeated structure (tensorgraph.replay)


def walk(graph: tg.Graph, loss, grad=None) -> engine.Gradients:
    """The rule walk (the engine without plans), on the same graph."""
    saved, graph._replay = graph._replay, None
    try:
        return engine.backward(graph, loss, grad)
    finally:
        graph._replay = saved


def _same_tensor(a, b) -> bool:
    """Bit for bit (nan where nan)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0))


def assert_same_gradients(got: engine.Gradients, ref: engine.Gradients) -> None:
    assert list(got.by_node) == list(ref.by_node), "the same gradients, in the same order"
    for node, expected in ref.by_node.items():
        assert _same_tensor(got.by_node[node], expected), f"gradient of node {node} differs"
    assert list(got) == list(ref)  # names


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return _same_tensor(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def assert_same_graph(got: tg.Graph, ref: tg.Graph) -> None:
    """Node for node, key for key (in the same order), values included."""
    assert len(got) == len(ref)
    for node, (x, y) in enumerate(zip(got._nodes, ref._nodes)):
        assert list(x) == list(y), f"node {node}: keys differ"
        for key in y:
            assert _equal(x[key], y[key]), f"node {node} ({y['name']}): {key} {x[key]!r} != {y[key]!r}"
    assert got._names == ref._names
    assert got.names == ref.names


def off_the_common_path(graph: tg.Graph) -> bool:
    """Calls a template does not replay: matching stops at them. In-place changes other than an in-place op of
    the table on a tensor the graph made and that shares memory with no other recorded tensor (``x[i] = v``,
    ``F.relu(x, inplace=True)``, updates of leaves or of views of recorded tensors, no_grad updates), and ops that
    may update an input (batch_norm)."""
    nodes = graph._nodes

    def replayed(data: dict[str, Any]) -> bool:
        entry = lookup(data["func"]) if data["func"] is not None else None
        return (entry is not None and entry[2] and entry[0].name == data["op"]
                and data["op"] not in ("setitem", "detach") and nodes[data["previous"]]["kind"] != "leaf")

    return _updated_shared_memory(graph) or any(
        ((data["inplace"] or data["previous"] is not None) and not replayed(data))
        or (OPS.get(data["op"]) and OPS[data["op"]].mutates) for data in nodes)


def _updated_shared_memory(graph: tg.Graph) -> bool:
    """Whether a tensor updated in place shares its storage with another recorded tensor (at the end of the
    block: a superset of the recorder's aliases at the update, which share storage)."""
    storages: dict[int, int] = {}
    updated = set()
    for node, _, tensor in graph._live.values():
        ptr = tensor.untyped_storage().data_ptr()
        storages[ptr] = storages.get(ptr, 0) + 1
        if graph._nodes[node]["inplace"]:
            updated.add(ptr)
    return any(storages[ptr] > 1 for ptr in updated)
