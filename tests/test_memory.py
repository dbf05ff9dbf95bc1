"""Nothing leaked: record-and-backward steps keep memory flat, and dropped graphs are freed at once.

"At once" means by reference counting, with the cyclic garbage collector switched off: a
reference cycle through a graph would keep every tensor it recorded alive until the next
collection (the engine once had one, through a recursive closure).
"""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
import torch.nn.functional as F

import tensorgraph as tg
from tensorgraph import graph as graph_module

STEPS = 3000


GROWTH_BOUND_MB = 30.0


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


class TinyMLP:
    """A small MLP trained with graph.backward: the step whose memory must stay flat."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.W1 = torch.randn(10, 32, generator=g) * 0.3
        self.b1 = torch.zeros(32)
        self.W2 = torch.randn(32, 5, generator=g) * 0.3
        self.b2 = torch.zeros(5)
        self.X = torch.randn(16, 10, generator=g)
        self.Y = torch.randint(0, 5, (16,), generator=g)

    def step(self) -> float:
        W1, b1, W2, b2 = self.W1, self.b1, self.W2, self.b2
        with tg.record() as graph:
            h = torch.tanh(self.X @ W1 + b1)
            logits = h @ W2 + b2
            loss = F.cross_entropy(logits, self.Y)
        grads = graph.backward(loss)
        with torch.no_grad():
            for p in (W1, b1, W2, b2):
                p -= 0.05 * grads[p]
        return loss.item()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc/self/status to read VmRSS")
def test_3000_record_and_backward_steps_keep_memory_flat():
    model = TinyMLP()
    for _ in range(100):  # warm up allocator pools and caches
        model.step()
    gc.collect()
    before = rss_mb()
    first = model.step()
    for _ in range(STEPS - 1):
        last = model.step()
    growth = rss_mb() - before
    assert last < first, "the steps should train the model"
    assert growth < GROWTH_BOUND_MB, f"{STEPS} steps grew the process by {growth:.1f} MB (bound {GROWTH_BOUND_MB})"
    assert len(graph_module._GRAPHS) <= 2, f"{len(graph_module._GRAPHS)} graphs still alive after the steps"


def _record_and_use(use: str) -> tuple:
    """Record and use a graph in a function of its own, as user code does (see the note on f_locals below)."""
    x, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    with tg.record() as graph:
        h = torch.tanh(x @ w)
        loss = (h * h).mean()
    if use == "backward":
        graph.backward(loss)
    elif use == "compare":
        graph.compare(loss)
    elif use == "trace":
        tg.trace(graph, loss)
    elif use == "nx":
        graph.nx.number_of_edges()
        list(graph.nx.nodes(data="name"))
    elif use == "failed_backward":
        w.data.add_(1.0)  # backward refuses: the error must not keep the graph alive either
        with pytest.raises(RuntimeError, match="modified in place"):
            graph.backward(loss)
    return weakref.ref(graph), weakref.ref(h), weakref.ref(loss)


@pytest.fixture
def no_cyclic_gc():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.mark.parametrize("use", ["backward", "compare", "trace", "nx", "failed_backward"])
def test_a_dropped_graph_is_freed_without_the_cyclic_collector(no_cyclic_gc, use):
    refs = _record_and_use(use)
    alive = [name for name, ref in zip(["graph", "h", "loss"], refs) if ref() is not None]
    assert not alive, f"still alive once dropped, with the cyclic GC off: {alive}"


def _failing_block() -> list:
    x = torch.randn(3)
    refs = []
    try:
        with tg.record() as graph:
            y = x.exp()
            refs = [weakref.ref(graph), weakref.ref(y)]
            raise KeyError("user code failed inside the block")
    except KeyError:
        pass
    return refs


def test_a_block_that_raises_frees_its_graph(no_cyclic_gc):
    assert all(ref() is None for ref in _failing_block())


def test_a_loop_that_records_keeps_only_the_latest_graph(no_cyclic_gc):
    """Within one running function, each record replaces the previous graph (no pile-up).

    On Python < 3.13 ``frame.f_locals`` is a cached snapshot: naming reads it, so the function
    that recorded keeps its last graph until it records again or returns.
    """
    x = torch.randn(8, 4, dtype=torch.float64)
    w = torch.randn(4, 4, dtype=torch.float64)
    refs = []
    for _ in range(20):
        with tg.record() as graph:
            loss = torch.tanh(x @ w).sum()
        w = w - 0.01 * graph.backward(loss)[w]
        refs.append(weakref.ref(graph))
    assert sum(ref() is not None for ref in refs) <= 2


