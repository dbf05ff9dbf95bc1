"""Symbolic derivation with sympy: derive, simplify, prove and fuse closed-form gradients.

``derive(graph, output=loss, wrt=logits)`` reads the atomic ops recorded between one input
tensor and one output, derives the gradient element by element with a small algebra of
reductions over named axes (:mod:`.algebra`), simplifies it to the textbook form, and
prints it as torch code. ``graph.fuse(output, inputs)`` replaces the chain by one node
whose backward is that code; ``auto_fuse`` finds the fusable chains of a graph.
"""

from __future__ import annotations

from .algebra import AxisMax, AxisSum
from .chain import SymbolicError
from .derivation import Derivation, Proof
from .fusion import auto_fuse, clear_cache, derive, find_fusable, fuse

__all__ = ["derive", "fuse", "auto_fuse", "find_fusable", "clear_cache", "Derivation", "Proof", "SymbolicError",
           "AxisSum", "AxisMax"]
