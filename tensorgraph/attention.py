"""``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) recorded as its parts.

torch runs multi-head attention as one Python function, which the recorder sees as one call without
a rule. Recorded instead as the calls that function makes (in-projection, head split, scores, masks,
softmax, dropout, out-projection), in its order and on its two paths (the explicit softmax when the
weights are returned, ``F.scaled_dot_product_attention`` when not), every part has a rule, the
dropout masks are recorded constants (drawn as torch draws them), and the values are torch's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_SIGNATURE = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k", "bias_v",
    "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask", "need_weights",
    "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "static_k",
    "static_v", "average_attn_weights", "is_causal")
_REFUSED = ("static_k", "static_v")  # precomputed keys/values: no rule (and rarely used)


def _bound(args: tuple, kwargs: dict) -> dict[str, Any]:
    return {**dict(zip(_SIGNATURE, args)), **kwargs}


def refused_argument(args: tuple, kwargs: dict) -> str | None:
    """The argument of this call that is not recorded as parts, or None."""
    bound = _bound(args, kwargs)
    return next((name for name in _REFUSED if bound.get(name) is not None), None)


def multi_head_attention(call: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None]:
    """torch's multi_head_attention_forward, each tensor op made through ``call(func, *args, **kwargs)``."""
    a = _bound(args, kwargs)
    query, key, value, heads = a["query"], a["key"], a["value"], a["num_heads"]
    need_weights, is_causal = a.get("need_weights", True), a.get("is_causal", False)
    key_padding_mask, attn_mask = a.get("key_padding_mask"), a.get("attn_mask")
    batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, heads)
    if not batched:
        query, key, value = (call(Tensor.unsqueeze, t, 1) for t in (query, key, value))
        if key_padding_mask is not None:
            key_padding_mask = call(Tensor.unsqueeze, key_padding_mask, 0)
    target, batch, embed = query.shape
    if embed != a["embed_dim_to_check"]:
        raise AssertionError(f"was expecting embedding dimension of {a['embed_dim_to_check']}, but got {embed}")
    if embed % heads:
        raise AssertionError(f"embed_dim {embed} not divisible by num_heads {heads}")
    head = embed // heads
    key_padding_mask = _additive(call, key_padding_mask, query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # torch passes is_causal on to scaled_dot_product_attention
    else:
        attn_mask = _additive(call, attn_mask, query.dtype)
        if key_padding_mask is not None:
            is_causal = False
    q, k, v = _in_projection(call, a, query, key, value)
    if attn_mask is not None:
        attn_mask = _mask_3d(call, attn_mask, (target, key.shape[0]), batch * heads)
    if a.get("bias_k") is not None or a.get("bias_v") is not None:
        if a.get("bias_k") is None or a.get("bias_v") is None:
            raise AssertionError("bias_k and bias_v are set together")
        k = call(torch.cat, [k, call(Tensor.repeat, a["bias_k"], 1, batch, 1)])
        v = call(torch.cat, [v, call(Tensor.repeat, a["bias_v"], 1, batch, 1)])
        attn_mask, key_padding_mask = (_pad_key(call, m) for m in (attn_mask, key_padding_mask))
    q = call(Tensor.transpose, call(Tensor.view, q, target, batch * heads, head), 0, 1)
    k = call(Tensor.transpose, call(Tensor.view, k, k.shape[0], batch * heads, head), 0, 1)
    v = call(Tensor.transpose, call(Tensor.view, v, v.shape[0], batch * heads, head), 0, 1)
    if a["add_zero_attn"]:
        zeros = (batch * heads, 1, head)
        k = call(torch.cat, [k, call(torch.zeros, zeros, dtype=k.dtype, device=k.device)], dim=1)
        v = call(torch.cat, [v, call(torch.zeros, zeros, dtype=v.dtype, device=v.device)], dim=1)
        attn_mask, key_padding_mask = (_pad_key(call, m) for m in (attn_mask, key_padding_mask))
    source = k.shape[1]
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, source):
            raise AssertionError(f"expecting key_padding_mask shape of {(batch, source)}, but got "
                                 f"{key_padding_mask.shape}")
        per_head = call(Tensor.reshape, call(Tensor.expand, call(Tensor.view, key_padding_mask, batch, 1, 1, source),
                                             -1, heads, -1, -1), batch * heads, 1, source)
        attn_mask = per_head if attn_mask is None else call(Tensor.add, attn_mask, per_head)
    dropout_p = a["dropout_p"] if a.get("training", True) else 0.0
    out_weight, out_bias = a["out_proj_weight"], a["out_proj_bias"]
    if need_weights:
        scores_q = call(Tensor.mul, q, math.sqrt(1.0 / float(head)))
        keys_t = call(Tensor.transpose, k, -2, -1)
        scores = call(torch.bmm, scores_q, keys_t) if attn_mask is None else call(
            torch.baddbmm, attn_mask, scores_q, keys_t)
        weights = call(F.softmax, scores, dim=-1)
        if dropout_p > 0.0:
            weights = call(F.dropout, weights, p=dropout_p)
        out = call(Tensor.reshape, call(Tensor.transpose, call(torch.bmm, weights, v), 0, 1), target * batch, embed)
        out = call(Tensor.view, call(F.linear, out, out_weight, out_bias), target, batch, out_weight.shape[0])
        weights = call(Tensor.view, weights, batch, heads, target, source)
        if a.get("average_attn_weights", True):
            weights = call(Tensor.mean, weights, dim=1)
        if not batched:
            out, weights = call(Tensor.squeeze, out, 1), call(Tensor.squeeze, weights, 0)
        return out, weights
    if attn_mask is not None:
        attn_mask = call(Tensor.unsqueeze, attn_mask, 0) if attn_mask.shape[0] == 1 else call(
            Tensor.view, attn_mask, batch, heads, -1, source)
    q, k, v = (call(Tensor.view, t, batch, heads, t.shape[1], head) for t in (q, k, v))
    out = call(F.scaled_dot_product_attention, q, k, v, attn_mask, dropout_p, is_causal)
    out = call(Tensor.reshape, call(Tensor.permute, out, 2, 0, 1, 3), batch * target, embed)
    out = call(Tensor.view, call(F.linear, out, out_weight, out_bias), target, batch, out_weight.shape[0])
    return (out if batched else call(Tensor.squeeze, out, 1)), None


def _additive(call: Callable[..., Any], mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: masked out) as the float mask torch adds to the scores: -inf where True."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return call(Tensor.masked_fill, call(torch.zeros_like, mask, dtype=dtype), mask, float("-inf"))


def _mask_3d(call: Callable[..., Any], mask: Tensor, size: tuple[int, int], planes: int) -> Tensor:
    """attn_mask as torch checks and shapes it: (L, S) becomes (1, L, S); (N * heads, L, S) stays."""
    if mask.dim() == 2:
        if tuple(mask.shape) != size:
            raise RuntimeError(f"The shape of the 2D attn_mask is {mask.shape}, but should be {size}.")
        return call(Tensor.unsqueeze, mask, 0)
    if mask.dim() == 3:
        if tuple(mask.shape) != (planes, *size):
            raise RuntimeError(f"The shape of the 3D attn_mask is {mask.shape}, but should be {(planes, *size)}.")
        return mask
    raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")


def _pad_key(call: Callable[..., Any], mask: Tensor | None) -> Tensor | None:
    """One more key (bias_k, the zero attention): the masks get a column of 0 (not masked)."""
    return None if mask is None else call(F.pad, mask, (0, 1))


def _in_projection(call: Callable[..., Any], a: dict[str, Any], query: Tensor, key: Tensor, value: Tensor) -> tuple:
    """q, k, v: one packed weight (one linear for self-attention, two for encoder-decoder) or three weights."""
    bias = a["in_proj_bias"]
    if a.get("use_separate_proj_weight", False):
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                 f"{value.shape[:2]}")
        weights = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
        if any(w is None for w in weights):
            raise AssertionError("use_separate_proj_weight is True but q_proj_weight, k_proj_weight or "
                                 "v_proj_weight is None")
        biases = call(Tensor.chunk, bias, 3) if bias is not None else (None, None, None)
        return tuple(call(F.linear, x, w, b) for x, w, b in zip((query, key, value), weights, biases))
    if key.shape != value.shape:
        raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
    weight, embed = a["in_proj_weight"], query.shape[-1]
    if weight is None:
        raise AssertionError("use_separate_proj_weight is False but in_proj_weight is None")
    if key is value and query is key:  # self-attention: one linear, its thirds made contiguous (as torch)
        return tuple(call(Tensor.contiguous, t) for t in call(Tensor.chunk, call(F.linear, query, weight, bias), 3, -1))
    if key is value:  # encoder-decoder attention
        w_q, w_kv = call(Tensor.split, weight, [embed, 2 * embed])
        b_q, b_kv = call(Tensor.split, bias, [embed, 2 * embed]) if bias is not None else (None, None)
        k, v = (call(Tensor.contiguous, t) for t in call(Tensor.chunk, call(F.linear, key, w_kv, b_kv), 2, -1))
        return call(F.linear, query, w_q, b_q), k, v
    weights = call(Tensor.chunk, weight, 3)
    biases = call(Tensor.chunk, bias, 3) if bias is not None else (None, None, None)
    return tuple(call(F.linear, x, w, b) for x, w, b in zip((query, key, value), weights, biases))
