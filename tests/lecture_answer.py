"""A learner's answer to the lecture's exercise 1, written by hand as the lecture does, with seedable mistakes.

``answer(v)`` is the correct manual backward pass; ``answer(v, mistake)`` makes one of
the mistakes the lecture's viewers made (see shared/seeds), and computes every later line
from the wrong value, as a learner's notebook would.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tensorgraph.lecture import record_exercise, setup

# mistake -> (the gradient the checker must blame, the kind it must report)
MISTAKES = {
    "dcounts-missing-branch": ("counts", "missing-branch"),  # forgot dcounts += dcounts_sum
    "dlogits-missing-max-branch": ("logits", "missing-branch"),  # forgot the logit_maxes branch
    "dbndiff-missing-branch": ("bndiff", "missing-branch"),  # forgot the bndiff2 branch
    "dhprebn-missing-branch": ("hprebn", "missing-branch"),  # forgot the bnmeani branch
    "dbnmeani-no-keepdim": ("bnmeani", "shape"),  # (-dbndiff).sum(0): shape (64,) for (1, 64)
    "dbnmeani-summed-all": ("bnmeani", "wrong"),  # (-dbndiff).sum(): every element summed, shape ()
    "dbndiff2-not-expanded": ("bndiff2", "shape"),  # 1/(n-1) * dbnvar: shape (1, 64) for (32, 64)
    "dbnbias-not-summed": ("bnbias", "not-unbroadcast"),  # dbnbias = dhpreact
    "db2-not-summed": ("b2", "not-unbroadcast"),  # db2 = dlogits
    "dcounts_sum_inv-not-summed": ("counts_sum_inv", "not-unbroadcast"),  # counts * dprobs, no .sum(1)
    "dW2-transposed": ("W2", "transposed"),  # dlogits.T @ h
    "dW1-transposed": ("W1", "transposed"),  # dhprebn.T @ embcat
    "dbnvar-sign": ("bnvar", "sign"),  # +0.5 instead of -0.5
    "dcounts_sum-sign": ("counts_sum", "sign"),  # counts_sum**-2 without the minus
    "dbndiff2-bessel": ("bndiff2", "scaled"),  # 1/n instead of 1/(n-1)
    "dlogprobs-not-divided": ("logprobs", "scaled"),  # -1.0 instead of -1.0/n
    "dhpreact-wrong": ("hpreact", "wrong"),  # (1 - h) * dh
    "dprobs-no-chain": ("probs", "wrong"),  # 1.0 / probs: the local derivative, not times dlogprobs
    "dhpreact-no-chain": ("hpreact", "wrong"),  # 1 - h**2: the local derivative, not times dh
    "dC-overwrite": ("C", "wrong"),  # dC[Xb] = demb: repeated rows do not add up
    "dlogprobs-wrong-row": ("logprobs", "wrong"),  # picks the wrong column
    "dh-half": ("h", "dtype"),  # right values in float16 (.half(), or built from a float16 tensor)
    "dbnvar-no-eps": ("bnvar", "wrong"),  # (bnvar)**-1.5: forgot the eps, a 3e-5 relative slip
    "dbnvar_inv-wrong-dim": ("bnvar_inv", "wrong"),  # .sum(1, keepdim=True): (32, 1), broadcast below
    "dhpreact-swapped": ("hpreact", "wrong"),  # (1 - hpreact**2) * dh: the tanh's input for its output
    "dW2-swapped": ("W2", "wrong"),  # hpreact.T @ dlogits: the layer before h
    "dbngain-swapped": ("bngain", "wrong"),  # (bndiff * dhpreact).sum(0, keepdim=True): bndiff for bnraw
}


def exercise(dtype: torch.dtype = torch.float32, **options):
    """(graph, loss, forward values by name) for the lecture's exercise 1 (``options``: setup's)."""
    graph, loss, _ = record_exercise(setup(dtype=dtype, **options))
    values = SimpleNamespace(**{name: graph.value(name) for name in graph.names})
    return graph, loss, values


def answer(v: SimpleNamespace, mistake: str | None = None) -> dict[str, torch.Tensor]:
    """The lecture's manual backward pass, line by line, with at most one seeded mistake."""
    n = v.Yb.shape[0]
    dlogprobs = torch.zeros_like(v.logprobs)
    if mistake == "dlogprobs-wrong-row":
        dlogprobs[range(n), (v.Yb + 1) % v.logprobs.shape[1]] = -1.0 / n
    else:
        dlogprobs[range(n), v.Yb] = -1.0 if mistake == "dlogprobs-not-divided" else -1.0 / n
    dprobs = (1.0 / v.probs) if mistake == "dprobs-no-chain" else (1.0 / v.probs) * dlogprobs
    dcounts_sum_inv = (v.counts * dprobs) if mistake == "dcounts_sum_inv-not-summed" else \
        (v.counts * dprobs).sum(1, keepdim=True)
    dcounts = v.counts_sum_inv * dprobs
    if mistake == "alt-formulas":  # the same maths, rounded differently
        dcounts_sum = -dcounts_sum_inv / v.counts_sum**2
    else:
        dcounts_sum = (v.counts_sum**-2 if mistake == "dcounts_sum-sign" else -v.counts_sum**-2) * dcounts_sum_inv
    if mistake != "dcounts-missing-branch":
        dcounts += torch.ones_like(v.counts) * dcounts_sum
    dnorm_logits = v.counts * dcounts
    dlogits = dnorm_logits.clone()
    dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)
    if mistake != "dlogits-missing-max-branch":
        dlogits += F.one_hot(v.logits.max(1).indices, num_classes=v.logits.shape[1]) * dlogit_maxes
    dh = dlogits @ v.W2.T
    if mistake == "dh-half":
        dh = dh.half()
    dW2 = dlogits.T @ v.h if mistake == "dW2-transposed" else v.h.T @ dlogits
    if mistake == "dW2-swapped":
        dW2 = v.hpreact.T @ dlogits
    db2 = dlogits if mistake == "db2-not-summed" else dlogits.sum(0)
    dhpreact = ((1.0 - v.h) if mistake == "dhpreact-wrong" else (1.0 - v.h**2)) * dh
    if mistake == "dhpreact-no-chain":
        dhpreact = 1.0 - v.h**2
    elif mistake == "dhpreact-swapped":
        dhpreact = (1.0 - v.hpreact**2) * dh
    dbngain = ((v.bndiff if mistake == "dbngain-swapped" else v.bnraw) * dhpreact).sum(0, keepdim=True)
    dbnraw = v.bngain * dhpreact
    dbnbias = dhpreact if mistake == "dbnbias-not-summed" else dhpreact.sum(0, keepdim=True)
    dbndiff = v.bnvar_inv * dbnraw
    dbnvar_inv = (v.bndiff * dbnraw).sum(1 if mistake == "dbnvar_inv-wrong-dim" else 0, keepdim=True)
    eps = 0.0 if mistake == "dbnvar-no-eps" else 1e-5
    dbnvar = (0.5 if mistake == "dbnvar-sign" else -0.5) * (v.bnvar + eps) ** -1.5 * dbnvar_inv
    if mistake == "dbndiff2-bessel":
        dbndiff2 = (1.0 / n) * torch.ones_like(v.bndiff2) * dbnvar
    elif mistake == "dbndiff2-not-expanded":
        dbndiff2 = (1.0 / (n - 1)) * dbnvar
    else:
        dbndiff2 = (1.0 / (n - 1)) * torch.ones_like(v.bndiff2) * dbnvar
    if mistake != "dbndiff-missing-branch":
        dbndiff += 2 * v.bndiff * dbndiff2
    dhprebn = dbndiff.clone()
    if mistake == "dbnmeani-no-keepdim":
        dbnmeani = (-dbndiff).sum(0)
    elif mistake == "dbnmeani-summed-all":  # a learner's notebook: .sum() with no dim
        dbnmeani = (-dbndiff).sum()
    else:
        dbnmeani = (-dbndiff).sum(0, keepdim=True)
    if mistake != "dhprebn-missing-branch":
        dhprebn += 1.0 / n * (torch.ones_like(v.hprebn) * dbnmeani)
    dembcat = torch.einsum("bh,eh->be", dhprebn, v.W1) if mistake == "alt-formulas" else dhprebn @ v.W1.T
    dW1 = dhprebn.T @ v.embcat if mistake == "dW1-transposed" else v.embcat.T @ dhprebn
    db1 = dhprebn.sum(0)
    demb = dembcat.view(v.emb.shape)
    dC = torch.zeros_like(v.C)
    if mistake == "dC-overwrite":
        dC[v.Xb] = demb
    else:
        for k in range(v.Xb.shape[0]):
            for j in range(v.Xb.shape[1]):
                dC[v.Xb[k, j]] += demb[k, j]
    return {
        "dlogprobs": dlogprobs, "dprobs": dprobs, "dcounts_sum_inv": dcounts_sum_inv, "dcounts_sum": dcounts_sum,
        "dcounts": dcounts, "dnorm_logits": dnorm_logits, "dlogit_maxes": dlogit_maxes, "dlogits": dlogits,
        "dh": dh, "dW2": dW2, "db2": db2, "dhpreact": dhpreact, "dbngain": dbngain, "dbnbias": dbnbias,
        "dbnraw": dbnraw, "dbnvar_inv": dbnvar_inv, "dbnvar": dbnvar, "dbndiff2": dbndiff2, "dbndiff": dbndiff,
        "dbnmeani": dbnmeani, "dhprebn": dhprebn, "dembcat": dembcat, "dW1": dW1, "db1": db1, "demb": demb,
        "dC": dC,
    }


def fused_answer(v: SimpleNamespace) -> dict[str, torch.Tensor]:
    """Exercises 2 and 3: cross-entropy and batchnorm backpropagated in one line each, the rest as the lecture.

    Forward values are recomputed the way a learner would (``F.softmax``, ``.var``, ``rsqrt``), so
    they differ from the recorded ones in the last bits.
    """
    n = v.Yb.shape[0]
    dlogits = (F.softmax(v.logits, 1) - F.one_hot(v.Yb, v.logits.shape[1])) / n
    dh = dlogits @ v.W2.T
    dW2 = v.h.T @ dlogits
    db2 = dlogits.sum(0)
    dhpreact = dh * (1 - v.h * v.h)
    bnvar_inv = (v.hprebn.var(0, keepdim=True) + 1e-5).rsqrt()
    bnraw = (v.hprebn - v.hprebn.mean(0, keepdim=True)) * bnvar_inv
    dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
    dbnbias = dhpreact.sum(0, keepdim=True)
    dhprebn = v.bngain * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0)
                                          - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0))
    dW1 = v.embcat.T @ dhprebn
    db1 = dhprebn.sum(0)
    dembcat = dhprebn @ v.W1.T
    demb = dembcat.view(v.emb.shape)
    dC = torch.einsum("bkv,bkd->vd", F.one_hot(v.Xb, v.C.shape[0]).to(demb.dtype), demb)
    return {"dlogits": dlogits, "dh": dh, "dW2": dW2, "db2": db2, "dhpreact": dhpreact, "dbngain": dbngain,
            "dbnbias": dbnbias, "dhprebn": dhprebn, "dW1": dW1, "db1": db1, "dembcat": dembcat, "demb": demb,
            "dC": dC}
