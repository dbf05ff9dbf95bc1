"""Shared test helpers: run a function under tensorgraph and under torch autograd, compare."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import tensorgraph as tg


def _weights_for(out: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(out.shape, generator=gen, dtype=out.dtype) if out.dim() else torch.tensor(0.7, dtype=out.dtype)


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
