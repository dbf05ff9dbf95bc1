"""After the lecture: the model of "Let's build GPT", recorded, checked against PyTorch and drawn by blocks.

Run from the repository root: ``.venv/bin/python examples/render_gpt.py [output folder]``
(created if missing; docs/img by default).

The classes are the lecture's (``Head``, ``MultiHeadAttention``, ``FeedForward``, ``Block``),
at a toy size. Function clusters nest like the calls that made them, so the drawings can
close whole parts of the model: each ``Head`` as one box, or each ``Block``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import tensorgraph as tg

vocab_size, block_size, n_embd, n_head, n_layer = 27, 8, 16, 2, 2


class Head(nn.Module):
    """One head of self-attention."""

    def __init__(self, head_size):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))

    def forward(self, x):
        B, T, C = x.shape  # noqa: N806 (the lecture's names)
        k = self.key(x)
        q = self.query(x)
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        wei = F.softmax(wei, dim=-1)
        v = self.value(x)
        return wei @ v


class MultiHeadAttention(nn.Module):
    def __init__(self, num_heads, head_size):
        super().__init__()
        self.heads = nn.ModuleList([Head(head_size) for _ in range(num_heads)])
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        return self.proj(out)


class FeedForward(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """Communication (attention), then computation (feed-forward), each with a residual connection."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.sa = MultiHeadAttention(n_head, n_embd // n_head)
        self.ffwd = FeedForward(n_embd)
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        x = x + self.ffwd(self.ln2(x))
        return x


class GPTLanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)
        self.position_embedding_table = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head=n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size)

    def forward(self, idx, targets):
        B, T = idx.shape  # noqa: N806
        tok_emb = self.token_embedding_table(idx)
        pos_emb = self.position_embedding_table(torch.arange(T))
        x = tok_emb + pos_emb
        x = self.blocks(x)
        x = self.ln_f(x)
        logits = self.lm_head(x)
        return F.cross_entropy(logits.view(B * T, vocab_size), targets.view(B * T))


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1337)
    model = GPTLanguageModel()
    xb = torch.randint(0, vocab_size, (4, block_size))
    yb = torch.randint(0, vocab_size, (4, block_size))
    with tg.record() as graph:
        loss = model(xb, yb)
    grads = graph.backward(loss)
    report = graph.compare(loss)
    print(f"{len(graph)} nodes, {len(grads)} gradients; every gradient matches torch autograd: {report.ok}")
    drawings = {
        "gpt_heads.svg": {"collapse": ["Head", "FeedForward"]},  # inside a block: one box per head
        "gpt_blocks.svg": {"collapse": ["Block"]},  # the whole model: one box per block
        # the backward pass around the blocks, torch's fused kernels written as their formulas
        "gpt_backward_blocks.svg": {"view": "backward", "grads": grads, "collapse": ["Block"], "textbook": True},
    }
    for name, options in drawings.items():
        path = graph.render(folder / name, loss=loss, cluster="function", **options)
        print(f"wrote {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/img"))
