"""tensorgraph: record a PyTorch forward pass as a graph, backpropagate through it with
its own engine, compare every gradient with PyTorch's, draw it, and derive fused
gradients symbolically."""

from .engine import Gradients
from .graph import Graph
from .record import record, scope

__version__ = "0.1.0"
__all__ = ["Graph", "Gradients", "record", "scope", "__version__"]
