"""tensorgraph: record a PyTorch forward pass as a graph, backpropagate through it with
its own engine, compare every gradient with PyTorch's, draw it, and derive fused
gradients symbolically.

    import torch, tensorgraph as tg

    a, b = torch.tensor(2.0), torch.tensor(-3.0)   # no requires_grad needed
    with tg.record() as graph:                     # ordinary torch code, recorded
        L = a * b + a
    grads = graph.backward(L)                      # not L.backward(): tensorgraph's own engine
    grads[a], grads["b"]                           # by tensor or by name
    print(graph.compare(L))                        # every gradient against torch autograd
    print(graph.backward_source(L))                # the backward pass as torch code
    graph.render("L.svg", grads=grads)             # the graph, with your names (Graphviz)

See help(tg.record), help(tg.Graph), and docs/tutorial.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from .engine import Gradients, trace
from .graph import Graph
from .record import record, scope

__version__ = "0.1.0"
__all__ = ["Graph", "Gradients", "record", "scope", "trace", "compile", "RecompileWarning", "load_graph", "symbolic",
           "__version__"]

# imported on first use, so `import tensorgraph` stays light
_LAZY = {"compile": ("tensorgraph.compiler", "compile"),
         "RecompileWarning": ("tensorgraph.compiler", "RecompileWarning"),
         "load_graph": ("tensorgraph.serialize", "load_graph"),
         "symbolic": ("tensorgraph.symbolic", None)}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'tensorgraph' has no attribute {name!r}")
