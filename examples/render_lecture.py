"""Draw the lecture's exercise-1 graph three ways, plus a scoped MLP with clusters: the pictures of docs/rendering.md.

Run from the repository root: ``.venv/bin/python examples/render_lecture.py [output folder]``
(created if missing; docs/img by default).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import tensorgraph as tg
from tensorgraph.lecture import record_exercise


def scoped_mlp(layers: int = 3, width: int = 8, batch: int = 4) -> tuple[tg.Graph, torch.Tensor]:
    """A small MLP whose layers and batchnorms are tg.scope blocks (clusters in the picture)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, width, generator=g)
    weights = [torch.randn(width, width, generator=g) * 0.3 for _ in range(layers)]
    with tg.record() as graph:
        h = x
        for i, W in enumerate(weights):
            with tg.scope(f"layer{i}"):
                pre = h @ W
                with tg.scope("batchnorm"):
                    diff = pre - pre.mean(0, keepdim=True)
                    pre = diff * (diff.pow(2).mean(0, keepdim=True) + 1e-5) ** -0.5
                h = torch.tanh(pre)
        loss = h.square().mean()
    return graph, loss


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    graph, loss, _ = record_exercise()
    grads = graph.backward(loss)
    report = graph.compare(loss)
    pictures = [
        ("lecture_forward", {}),
        ("lecture_gradients", {"grads": grads, "compare": report}),
        ("lecture_backward", {"view": "backward", "grads": grads}),
    ]
    for name, options in pictures:
        print(graph.render(folder / f"{name}.svg", **options))
    mlp, mlp_loss = scoped_mlp()
    print(mlp.render(folder / "scoped_mlp.svg", loss=mlp_loss))
    print(mlp.render(folder / "scoped_mlp_collapsed.svg", loss=mlp_loss, collapse=["batchnorm"]))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/img"))
