"""The op coverage table: one entry per (op, argument pattern), each a function and its inputs.

Used by test_ops.py (vs torch autograd in float64, over a broadcasting shape matrix) and
test_finite_differences.py (central differences, independent of torch autograd).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

D = torch.float64
SHAPES = [(), (5,), (1, 5), (4, 1), (4, 5)]


def r(*shape, low=None, positive=False, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 1000)
    x = torch.randn(shape, generator=gen, dtype=D)
    if positive:
        x = x.abs() + 0.5
    return x


def distinct(*shape, seed=0):
    """Values without ties (for max/min/sort-like ops)."""
    n = 1
    for s in shape:
        n *= s
    gen = torch.Generator().manual_seed(seed)
    return (torch.randperm(n, generator=gen).to(D) / n + 0.1 * torch.randn(n, generator=gen, dtype=D) / n).view(shape)


UNARY = {
    "neg": lambda x: -x,
    "neg_method": lambda x: x.neg(),
    "abs": lambda x: x.abs(),
    "abs_builtin": lambda x: abs(x),
    "exp": lambda x: x.exp(),
    "tanh": lambda x: torch.tanh(x),
    "sigmoid": lambda x: torch.sigmoid(x),
    "relu": lambda x: F.relu(x),
    "relu_method": lambda x: x.relu(),
    "sin": lambda x: x.sin(),
    "cos": lambda x: torch.cos(x),
    "expm1": lambda x: x.expm1(),
    "square": lambda x: x.square(),
    "erf": lambda x: torch.erf(x),
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": lambda x: F.silu(x),
    "softplus": lambda x: F.softplus(x, beta=2.0),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.1),
    "elu": lambda x: F.elu(x),
    "sign": lambda x: x.sign() * x,
    "floor": lambda x: x.floor() + x,
    "clamp": lambda x: x.clamp(-0.5, 0.5),
    "clamp_min": lambda x: x.clamp(min=0.1),
    "clip_max": lambda x: torch.clip(x, max=0.2),
    "pow_2": lambda x: x**2,
    "pow_3": lambda x: x.pow(3),
    "mul_scalar": lambda x: 2 * x,
    "mul_scalar_right": lambda x: x * 0.25,
    "add_scalar": lambda x: 1 + x,
    "sub_scalar": lambda x: x - 1.5,
    "rsub_scalar": lambda x: 1.5 - x,
    "div_scalar": lambda x: x / 3,
    "rpow": lambda x: 2**x,
    "add_alpha": lambda x: torch.add(x, x, alpha=2.0),
    "contiguous": lambda x: x.contiguous() * 1.0,
    "contiguous_transposed": lambda x: x.mT.contiguous(),
    "clamp_min_function": lambda x: torch.clamp_min(x, 0.1),
    "clone": lambda x: x.clone(),
    "to_same": lambda x: x.to(torch.float64) * 2,
    "float_roundtrip": lambda x: x.float().double(),
    "hardtanh": lambda x: F.hardtanh(x),
    "hardtanh_bounds": lambda x: F.hardtanh(x, min_val=-0.5, max_val=0.25),
    "hardtanh_module_inplace": lambda x: torch.nn.Hardtanh(-0.2, 0.7, inplace=True)(x * 1.0),
    "relu6": lambda x: F.relu6(x * 4),
    "relu6_module": lambda x: torch.nn.ReLU6()(x * 4 + 3),
    "mish": lambda x: F.mish(x),
    "hardswish": lambda x: F.hardswish(x * 3),
    "hardsigmoid": lambda x: F.hardsigmoid(x * 3),
    "tan": lambda x: x.tan(),
    "asin": lambda x: (x * 0.3).asin(),
    "acos": lambda x: torch.acos(x * 0.3),
    "arcsin_arccos": lambda x: torch.arcsin(x * 0.2) + (x * 0.2).arccos(),
    "atan": lambda x: torch.atan(x),
    "sinh": lambda x: x.sinh(),
    "cosh": lambda x: torch.cosh(x),
    "asinh": lambda x: x.asinh(),
    "atanh": lambda x: (x * 0.3).atanh(),
    "arctan_arcsinh_arctanh": lambda x: x.arctan() + torch.arcsinh(x) + (x * 0.2).arctanh(),
    "asin_tan_inplace": lambda x: (x * 0.3).asin_().tan_(),
}

POSITIVE_UNARY = {
    "log": lambda x: x.log(),
    "log2": lambda x: torch.log2(x),
    "log1p": lambda x: x.log1p(),
    "sqrt": lambda x: x.sqrt(),
    "rsqrt": lambda x: x.rsqrt(),
    "reciprocal": lambda x: x.reciprocal(),
    "rdiv": lambda x: 1 / x,
    "rdiv_2": lambda x: 2.5 / x,
    "pow_frac": lambda x: x**-0.5,
    "pow_1.5": lambda x: x**1.5,
    "acosh": lambda x: (x + 1).acosh(),
}

BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (b.abs() + 0.5),
    "maximum": lambda a, b: torch.maximum(a, b),
    "minimum": lambda a, b: torch.minimum(a, b),
    "max_binary": lambda a, b: torch.max(a, b),
    "where": lambda a, b: torch.where(a > 0, a, b),
    "where_method": lambda a, b: a.where(a > 0, b),  # bound as torch.where(condition, a, b)
    "pow_tensor": lambda a, b: (a.abs() + 0.5) ** b,
    "sub_alpha": lambda a, b: torch.sub(a, b, alpha=0.5),
    "mul_fanout": lambda a, b: a * b * a,
    "atan2": lambda a, b: torch.atan2(a, b),
    "lerp": lambda a, b: torch.lerp(a, b, 0.3),
}


def binary_cases():
    for (name, fn), (sa, sb) in itertools.product(BINARY.items(), itertools.product(SHAPES, SHAPES)):
        yield f"{name}-{sa}-{sb}", fn, [r(*sa, seed=1), r(*sb, seed=2)]


def _one_input_cases(table, positive_table):
    """Each function of ``table`` on a scalar and a matrix; those of ``positive_table`` on positive ones."""
    for name, fn in table.items():
        for shape in [(), (4, 5)]:
            yield f"{name}-{shape}", fn, [r(*shape, seed=3)]
    for name, fn in positive_table.items():
        for shape in [(), (4, 5)]:
            yield f"{name}-{shape}", fn, [r(*shape, positive=True, seed=4)]


def unary_cases():
    yield from _one_input_cases(UNARY, POSITIVE_UNARY)


REDUCTIONS = {
    "sum_all": lambda x: x.sum(),
    "sum_0": lambda x: x.sum(0),
    "sum_0_keepdim": lambda x: x.sum(0, keepdim=True),
    "sum_1_keepdims": lambda x: x.sum(1, keepdims=True),
    "sum_axis": lambda x: x.sum(axis=-1),
    "sum_tuple": lambda x: x.sum((0, 2)),
    "sum_tuple_keepdim": lambda x: torch.sum(x, dim=(0, 1), keepdim=True),
    "mean_all": lambda x: x.mean(),
    "mean_tuple_keepdim": lambda x: x.mean((0, 1), keepdim=True),
    "mean_neg": lambda x: x.mean(-1),
    "var_all": lambda x: x.var(),
    "var_0_unbiased": lambda x: x.var(0, unbiased=True),
    "var_0_biased_keepdim": lambda x: x.var(0, keepdim=True, unbiased=False),
    "var_correction": lambda x: torch.var(x, dim=(0, 1), correction=0),
    "std_1": lambda x: x.std(1),
    "var_mean": lambda x: (lambda var, mean: var * mean.exp())(*torch.var_mean(x, 1, keepdim=True)),
    "var_mean_tuple": lambda x: (lambda vm: vm[0].sqrt() + vm[1] ** 2)(torch.var_mean(x, dim=(0, 2), correction=0)),
    "var_mean_all": lambda x: torch.var_mean(x)[0] * torch.var_mean(x, unbiased=False)[1],
    "std_mean": lambda x: (lambda std, mean: std / (mean.exp() + 1))(*torch.std_mean(x, -1)),
    "var_mean_var_only": lambda x: torch.var_mean(x, 0)[0],
    "std_all": lambda x: x.std(),
    "logsumexp": lambda x: x.logsumexp(1),
    "softmax_1": lambda x: F.softmax(x, dim=1),
    "softmax_neg": lambda x: x.softmax(-1),
    "log_softmax": lambda x: F.log_softmax(x, 1),
    "log_softmax_method": lambda x: x.log_softmax(dim=0),
    "cumsum": lambda x: x.cumsum(1),
    "norm": lambda x: x.norm(),
    "norm_dim": lambda x: x.norm(dim=1),
    "prod_all": lambda x: x.prod(),
    "prod_dim": lambda x: x.prod(1),
    "prod_keepdim_with_zero": lambda x: torch.prod(x * (x > -1.0), 0, keepdim=True),
    "sort": lambda x: x.sort(1).values * torch.arange(5, dtype=x.dtype),
    "sort_descending": lambda x: torch.sort(x, dim=0, descending=True)[0].cumsum(0),
    "topk": lambda x: x.topk(2, dim=1).values.exp(),
    "msort": lambda x: torch.msort(x) * torch.arange(4, dtype=x.dtype)[:, None],
    "einsum_matmul": lambda x: torch.einsum("ij,jk->ik", x, x.T),
    "einsum_implicit": lambda x: torch.einsum("ij,ij", x, x.exp()),
    "einsum_sum_out": lambda x: torch.einsum("ij->j", x),
    "einsum_list": lambda x: torch.einsum("ij,kj->ik", [x, x[:2]]),
    "prod_via_exp": lambda x: x.exp().sum(0).log(),
}

SELECTIONS = {
    "max_all": lambda x: x.max(),
    "min_all": lambda x: x.min(),
    "max_dim": lambda x: x.max(1).values,
    "max_dim_keepdim": lambda x: x.max(1, keepdim=True).values,
    "max_dim_kw": lambda x: torch.max(x, dim=0)[0],
    "min_dim": lambda x: x.min(-1).values,
    "amax": lambda x: x.amax(1),
    "amin_keepdim": lambda x: x.amin(0, keepdim=True),
    "median_all": lambda x: x.median(),
    "median_dim": lambda x: x.median(1).values,
    "median_dim_keepdim_kw": lambda x: torch.median(x, dim=0, keepdim=True)[0],
    "nanmedian": lambda x: x.nanmedian() + x.nanmedian(-1).values.sum(),
    "kthvalue": lambda x: x.kthvalue(2, 1).values,
    "kthvalue_default_dim_keepdim": lambda x: torch.kthvalue(x, 4, keepdim=True)[0],
    "mode": lambda x: x.mode(0).values,
}

TIED = {
    "max_all_ties": lambda x: x.max(),
    "max_dim_ties": lambda x: x.max(1, keepdim=True).values,
    "amax_ties": lambda x: x.amax(1),
    "maximum_ties": lambda x: torch.maximum(x, x.flip(1)),
    "fmax_ties": lambda x: torch.fmax(x, x.flip(1)) + torch.fmin(x.flip(0), x),
    "median_all_ties": lambda x: x.median(),  # 2, four times: they share the gradient, as in torch
    "median_dim_ties": lambda x: x.median(1, keepdim=True).values,  # the returned index takes it
    "nanmedian_ties": lambda x: x.nanmedian() + x.nanmedian(0).values.sum(),
    "kthvalue_ties": lambda x: x.kthvalue(3, 1).values,
    "mode_ties": lambda x: x.mode(1).values,
    "hardtanh_at_bounds": lambda x: F.hardtanh(x, 0.0, 2.0),  # 0 and 2 are the bounds: no gradient there
    "relu6_at_0_and_6": lambda x: F.relu6(x * 2),  # 0 and 6
    "relu6_inplace_at_kinks": lambda x: F.relu6(x * 2 - 6, inplace=True),  # 0 and 6 again, in place
    "hardswish_at_kinks": lambda x: F.hardswish(x - 3) + F.hardsigmoid(x * 1.5 - 3),  # -3, 0 and 3
}

SHAPE_OPS = {
    "view": lambda x: x.view(3, 4, 5)[1:] * 1.0,
    "view_neg": lambda x: x.view(x.shape[0], -1),
    "reshape": lambda x: x.reshape(-1),
    "flatten": lambda x: x.flatten(1),
    "squeeze_unsqueeze": lambda x: x.unsqueeze(0).unsqueeze(-1).squeeze(0).squeeze(-1),
    "T": lambda x: x[0].T,
    "t": lambda x: x[1].t(),
    "mT": lambda x: x.mT,
    "transpose": lambda x: x.transpose(0, 2),
    "permute": lambda x: x.permute(2, 0, 1),
    "permute_tuple": lambda x: x.permute((1, 2, 0)),
    "expand": lambda x: x[:, :1].expand(3, 4, 5),
    "expand_as": lambda x: x[:1].expand_as(x),
    "repeat": lambda x: x.repeat(2, 1, 3),
    "repeat_new_dim": lambda x: x[0].repeat(2, 1, 1),
    "cat": lambda x: torch.cat([x, x * 2], dim=1),
    "cat_neg": lambda x: torch.cat((x[..., :2], x), -1),
    "stack": lambda x: torch.stack([x, x.exp()], dim=1),
    "split": lambda x: x.split(2, dim=2)[1],
    "split_sizes": lambda x: x.split([1, 3], dim=1)[1] * x.split([1, 3], dim=1)[0],
    "chunk": lambda x: x.chunk(2, 1)[0],
    "unbind": lambda x: x.unbind(0)[2] + x.unbind(0)[0],
    "flip": lambda x: x.flip(0),
    "roll": lambda x: x.roll(1, 2),
    "tril": lambda x: x.tril(),
    "triu": lambda x: torch.triu(x, 1),
    "narrow": lambda x: x.narrow(2, 1, 3),
    "select": lambda x: x.select(1, 2),
    "diagonal": lambda x: x[0].diagonal(),
    "pad": lambda x: F.pad(x, (1, 2)),
    "pad_crop": lambda x: F.pad(x, (-1, 1, 0, 2)),
    "swapaxes": lambda x: x.swapaxes(0, 1),
    "movedim": lambda x: x.movedim(0, -1),
    "sum_to_size": lambda x: x.sum_to_size(1, 4, 1),
}

INDEXING = {
    "int": lambda x, i: x[1],
    "neg_int": lambda x, i: x[-1, 2],
    "slice": lambda x, i: x[1:3, ::2],
    "ellipsis_none": lambda x, i: x[..., None, 1],
    "tensor": lambda x, i: x[i],
    "tensor_dup": lambda x, i: x[torch.tensor([0, 0, 2])],
    "list": lambda x, i: x[[0, 2, 2]],
    "range_tensor": lambda x, i: x[range(3), i],
    "bool_mask": lambda x, i: x[x > 0],
    "mixed": lambda x, i: x[1:, i[:2]],
    "index_select": lambda x, i: x.index_select(1, i),
    "gather": lambda x, i: x.gather(1, torch.tensor([[0, 1], [2, 2], [1, 0], [3, 3]])),
    "masked_fill": lambda x, i: x.masked_fill(x > 0.5, 0.0),
    "embedding": lambda x, i: F.embedding(torch.tensor([[0, 1], [3, 3]]), x),
    "embedding_pad": lambda x, i: F.embedding(torch.tensor([[0, 1], [3, 2]]), x, padding_idx=1),
}

MATMUL = {
    "mm": ((4, 3), (3, 5)),
    "mv": ((4, 3), (3,)),
    "vm": ((3,), (3, 5)),
    "dot": ((3,), (3,)),
    "batched_2d": ((2, 4, 3), (3, 5)),
    "batched_bcast": ((2, 1, 4, 3), (3, 3, 5)),
    "batched_3d": ((2, 4, 3), (2, 3, 5)),
    "vec_batched": ((3,), (2, 3, 5)),
}

LOSSES = {
    "cross_entropy": lambda x, y, w: F.cross_entropy(x, y),
    "cross_entropy_sum": lambda x, y, w: F.cross_entropy(x, y, reduction="sum"),
    "cross_entropy_none": lambda x, y, w: F.cross_entropy(x, y, reduction="none"),
    "cross_entropy_weight": lambda x, y, w: F.cross_entropy(x, y, weight=w),
    "cross_entropy_ignore": lambda x, y, w: F.cross_entropy(x, y, ignore_index=2),
    "cross_entropy_smooth": lambda x, y, w: F.cross_entropy(x, y, label_smoothing=0.1),
    "cross_entropy_smooth_weight": lambda x, y, w: F.cross_entropy(x, y, weight=w, label_smoothing=0.2),
    "cross_entropy_probs": lambda x, y, w: F.cross_entropy(x, F.softmax(w.expand_as(x) * 0 + torch.arange(
        x.shape[1], dtype=x.dtype), 1)),
    "nll_loss": lambda x, y, w: F.nll_loss(x.log_softmax(1), y),
    "nll_loss_weight_sum": lambda x, y, w: F.nll_loss(x.log_softmax(1), y, weight=w, reduction="sum"),
    "mse_loss": lambda x, y, w: F.mse_loss(x, x.flip(0) * 0.5),
    "l1_loss": lambda x, y, w: F.l1_loss(x, torch.zeros_like(x) + 0.1),
    "bce_logits": lambda x, y, w: F.binary_cross_entropy_with_logits(x, (x.detach() > 0).to(x.dtype)),
    "bce": lambda x, y, w: F.binary_cross_entropy(torch.sigmoid(x), torch.ones_like(x) * 0.3),
}


def nn_cases():
    x = r(6, 5, seed=7)
    w = r(5, seed=8, positive=True)
    y = torch.tensor([0, 2, 4, 1, 2, 3])
    for name, fn in LOSSES.items():
        yield name, _with_weight(fn, w), [x, y]  # class weights are not differentiable
    yield "cross_entropy_prob_target", lambda x, t: F.cross_entropy(x, t.softmax(1), label_smoothing=0.1), [
        x, r(6, 5, seed=9)]
    yield "linear", lambda x, w, b: F.linear(x, w, b), [r(4, 3, seed=1), r(5, 3, seed=2), r(5, seed=3)]
    yield "linear_nobias_3d", lambda x, w: F.linear(x, w), [r(2, 4, 3, seed=1), r(5, 3, seed=2)]
    yield "linear_module", lambda x: _linear_module(x), [r(4, 3, seed=4)]
    yield "addmm", lambda b, m1, m2: torch.addmm(b, m1, m2), [r(5, seed=1), r(4, 3, seed=2), r(3, 5, seed=3)]
    yield "baddbmm", lambda b, m1, m2: torch.baddbmm(b, m1, m2), [r(2, 4, 5, seed=1), r(2, 4, 3, seed=2),
                                                                     r(2, 3, 5, seed=3)]
    yield "baddbmm_scaled_broadcast", lambda b, m1, m2: torch.baddbmm(b, m1, m2, beta=0.5, alpha=-2.0), [
        r(4, 1, seed=1), r(2, 4, 3, seed=2), r(2, 3, 5, seed=3)]
    yield "baddbmm_method", lambda b, m1, m2: b.baddbmm(m1, m2, alpha=0.25), [r(2, 4, 5, seed=1), r(2, 4, 3, seed=2),
                                                                              r(2, 3, 5, seed=3)]
    yield "outer", lambda a, b: torch.outer(a, b), [r(3, seed=1), r(4, seed=2)]
    yield "inner", lambda a, b: torch.inner(a, b), [r(2, 3, 4, seed=1), r(5, 4, seed=2)]
    yield "inner_vector", lambda a, b: a.inner(b), [r(4, seed=1), r(4, seed=2)]
    yield "layer_norm", lambda x, w, b: F.layer_norm(x, (5,), w, b), [r(4, 5, seed=1), r(5, seed=2), r(5, seed=3)]
    yield "layer_norm_noaffine", lambda x: F.layer_norm(x, (3, 5)), [r(2, 3, 5, seed=1)]
    yield "batch_norm_train", lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), [
        r(8, 5, seed=1), r(5, seed=2), r(5, seed=3)]
    yield "batch_norm_eval", lambda x, w, b: F.batch_norm(x, torch.zeros(5, dtype=D), torch.ones(5, dtype=D), w, b), [
        r(8, 5, seed=1), r(5, seed=2), r(5, seed=3)]
    yield "conv1d", lambda x, w, b: F.conv1d(x, w, b, padding=1), [r(2, 3, 7, seed=1), r(4, 3, 3, seed=2),
                                                                    r(4, seed=3)]
    yield "conv2d", lambda x, w: F.conv2d(x, w, stride=2), [r(2, 3, 6, 6, seed=1), r(4, 3, 3, 3, seed=2)]
    yield "conv2d_bias", lambda x, w, b: F.conv2d(x, w, b, padding=1), [r(2, 3, 4, 4, seed=1), r(4, 3, 3, 3, seed=2),
                                                                        r(4, seed=3)]
    yield "convolution", lambda x, w, b: torch.convolution(x, w, b, [1], [1], [1], False, [0], 1) + torch.convolution(
        x, w.transpose(0, 1)[:, :3], None, [1], [1], [1], True, [0], 1)[..., :8].sum(), [
        r(2, 3, 8, seed=1), r(3, 3, 3, seed=2), r(3, seed=3)]
    yield "conv_tbc", lambda x, w, b: torch.conv_tbc(x, w, b, 1)[1:-1] + torch.conv_tbc(x, w, b), [
        r(7, 2, 3, seed=1), r(3, 3, 4, seed=2), r(4, seed=3)]
    yield "sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [
        r(2, 3, 4, seed=1), r(2, 5, 4, seed=2), r(2, 5, 3, seed=3)]
    yield "sdpa_causal_scale", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3), [
        r(1, 2, 4, 3, seed=1), r(1, 2, 4, 3, seed=2), r(1, 2, 4, 3, seed=3)]
    yield "sdpa_float_mask", lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), [
        r(3, 4, seed=1), r(5, 4, seed=2), r(5, 2, seed=3), r(3, 5, seed=4)]
    yield "sdpa_bool_mask", lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.tensor([[True, False, True], [True, True, False]])), [
        r(2, 4, seed=1), r(3, 4, seed=2), r(3, 2, seed=3)]
    hidden = torch.tensor([[True, False, True], [False, False, False]])  # the second query sees no key: 0
    yield "sdpa_bool_mask_hidden_row", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=hidden), [
        r(2, 4, seed=1), r(3, 4, seed=2), r(3, 2, seed=3)]
    yield "sdpa_float_mask_hidden_row", lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=m.masked_fill(~hidden, -float("inf"))), [
        r(2, 4, seed=1), r(3, 4, seed=2), r(3, 2, seed=3), r(2, 3, seed=4)]
    yield "sdpa_gqa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), [
        r(2, 4, 3, 5, seed=1), r(2, 2, 6, 5, seed=2), r(2, 2, 6, 3, seed=3)]
    yield "sdpa_gqa_float_mask_causal", lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=m, enable_gqa=True) + F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True), [
        r(6, 3, 5, seed=1), r(2, 3, 5, seed=2), r(2, 3, 4, seed=3), r(3, 3, seed=4)]
    yield "max_pool2d", lambda x: F.max_pool2d(x, 2), [distinct(1, 2, 4, 4)]
    yield "avg_pool2d", lambda x: F.avg_pool2d(x, 2), [r(1, 2, 4, 4, seed=1)]
    yield "adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(x, 1), [r(1, 2, 4, 4, seed=1)]
    yield "one_hot_matmul", lambda c: F.one_hot(torch.tensor([1, 0, 2]), 3).to(D) @ c, [r(3, 4, seed=1)]
    yield "scatter_add", lambda x, s: x.scatter_add(1, torch.tensor([[0, 1], [2, 2]]), s), [r(2, 4, seed=1),
                                                                                         r(2, 2, seed=2)]
    yield "index_put", lambda x, v: x.index_put((torch.tensor([0, 2]),), v), [r(3, 4, seed=1), r(4, seed=2)]
    spots = torch.tensor([[0, 2, 0, 1], [1, 1, 3, 1]])  # (nothing to x[0, 3]: it keeps its value)
    yield "scatter_reduce_sum_mean", lambda x, s: x.scatter_reduce(1, spots, s, "sum") + torch.scatter_reduce(
        x, 1, spots, s, "mean", include_self=False) + x.scatter_reduce(1, spots, s, reduce="mean") + (
        x * 1.0).scatter_reduce_(1, spots, s * 2, "sum", include_self=False), [r(2, 4, seed=1), r(2, 4, seed=2)]
    yield "scatter_reduce_amax_amin", lambda x, s: x.scatter_reduce(1, spots, s, "amax") + x.scatter_reduce(
        1, spots, s, "amin", include_self=False) + torch.scatter_reduce(x, 0, spots % 2, s, "amin"), [
        distinct(2, 4, seed=1), distinct(2, 4, seed=2) + 0.05]
    yield "index_reduce", lambda x, s: x.index_reduce(0, torch.tensor([0, 2, 0, 1]), s, "prod") + torch.index_reduce(
        x, 0, torch.tensor([0, 2, 0, 1]), s, "mean", include_self=False) + x.index_reduce(
        1, torch.tensor([2, 0, 2]), s, "amax") + x.index_reduce(0, torch.tensor([1, 1, 3, 1]), s, "amin"), [
        distinct(4, 3, seed=1), distinct(4, 3, seed=2) + 0.01]
    zeros = torch.tensor([[1.5, 0.0, 2.0, 0.0], [0.0, 2.0, -1.0, 0.5]], dtype=D)
    yield "scatter_reduce_prod", lambda x, s: x.scatter_reduce(1, spots, s, "prod") + x.scatter_reduce(
        1, spots, s, "prod", include_self=False), [zeros, zeros.flip(1) + torch.tensor([[0.0], [0.5]], dtype=D)]
    yield from norm_cases()
    yield from normalization_cases()
    yield from loss_cases()
    yield from pointwise_cases()
    yield from resampling_cases()
    yield from activation_cases()
    yield from scan_cases()
    yield from linalg_cases()
    yield from recurrent_cases()
    yield from decomposition_cases()
    yield from distance_cases()
    yield from more_shape_cases()
    yield from image_cases()
    yield from more_loss_cases()
    yield from product_cases()
    yield from ctc_cases()
    yield from attention_cases()


def _affine(layer):
    """A float64 module with random affine parameters, built once (outside any recording)."""
    gen = torch.Generator().manual_seed(0)
    layer = layer.double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, generator=gen)
    return layer


_GROUP_NORM = _affine(torch.nn.GroupNorm(2, 4))
_RMS_NORM = _affine(torch.nn.RMSNorm([3, 5], eps=1e-6))
_INSTANCE_NORM = _affine(torch.nn.InstanceNorm1d(3, affine=True))


def normalization_cases():
    yield "group_norm", lambda x, w, b: F.group_norm(x, 2, w, b), [r(3, 4, 5, seed=1), r(4, seed=2), r(4, seed=3)]
    yield "group_norm_noaffine_4d", lambda x: F.group_norm(x, 3, eps=1e-3), [r(2, 6, 2, 3, seed=4)]
    yield "group_norm_weight_only_2d", lambda x, w: F.group_norm(x, 1, weight=w), [r(4, 6, seed=5), r(6, seed=6)]
    yield "group_norm_module", lambda x: _GROUP_NORM(x), [r(2, 4, 3, 3, seed=7)]
    yield "rms_norm", lambda x, w: F.rms_norm(x, (5,), w), [r(4, 5, seed=1), r(5, seed=2)]
    yield "rms_norm_noweight_default_eps", lambda x: F.rms_norm(x, [3, 5]), [r(2, 3, 5, seed=3)]
    yield "rms_norm_eps_kw", lambda x, w: F.rms_norm(x, normalized_shape=(2, 5), weight=w, eps=0.1), [
        r(3, 2, 5, seed=4), r(2, 5, seed=5)]
    yield "rms_norm_module", lambda x: _RMS_NORM(x), [r(2, 3, 5, seed=6)]
    yield "instance_norm", lambda x, w, b: F.instance_norm(x, weight=w, bias=b), [r(2, 3, 5, seed=1), r(3, seed=2),
                                                                                  r(3, seed=3)]
    yield "instance_norm_2d_noaffine", lambda x: F.instance_norm(x, eps=1e-3), [r(2, 3, 2, 4, seed=4)]
    yield "instance_norm_eval", lambda x, w: F.instance_norm(x, torch.full((3,), 0.2, dtype=D), torch.full(
        (3,), 1.5, dtype=D), w, None, use_input_stats=False), [r(2, 3, 4, seed=8), r(3, seed=9)]
    yield "instance_norm_module", lambda x: _INSTANCE_NORM(x), [r(2, 3, 6, seed=1)]
    # training mode with running statistics: the forward updates them in place, and they are no input of the loss
    yield "instance_norm_running_train", lambda x, w, b: F.instance_norm(
        x, torch.zeros(3, dtype=D), torch.ones(3, dtype=D), w, b, use_input_stats=True), [
        r(2, 3, 5, seed=10), r(3, seed=11), r(3, seed=12)]


def _probs(*shape, seed=0):
    return r(*shape, seed=seed).softmax(-1)


def pointwise_cases():
    """lerp, addcmul, addcdiv, addbmm: broadcasting, scalar keywords, in place."""
    yield "lerp_tensor_weight", lambda a, b, w: torch.lerp(a, b, w), [r(4, 5, seed=1), r(5, seed=2), r(4, 1, seed=3)]
    yield "lerp_method_inplace", lambda a, b: (a * 1.0).lerp_(b, 0.75), [r(4, 5, seed=1), r(4, 5, seed=2)]
    yield "addcmul", lambda x, a, b: torch.addcmul(x, a, b), [r(4, 5, seed=1), r(4, 5, seed=2), r(5, seed=3)]
    yield "addcmul_value_inplace", lambda x, a, b: (x * 1.0).addcmul_(a, b, value=-0.5), [
        r(4, 5, seed=1), r(4, 1, seed=2), r(4, 5, seed=3)]
    yield "addcdiv", lambda x, a, b: torch.addcdiv(x, a, b, value=2.0), [r(5, seed=1), r(4, 5, seed=2),
                                                                           r(4, 5, seed=3, positive=True)]
    yield "addcdiv_method", lambda x, a, b: x.addcdiv(a, b), [r(4, 5, seed=1), r(4, 5, seed=2),
                                                             r(4, 5, seed=3, positive=True)]
    yield "addbmm", lambda m, b1, b2: torch.addbmm(m, b1, b2), [r(4, 5, seed=1), r(3, 4, 2, seed=2),
                                                                r(3, 2, 5, seed=3)]
    yield "addbmm_scaled_broadcast", lambda m, b1, b2: m.addbmm(b1, b2, beta=0.5, alpha=-2.0), [
        r(5, seed=1), r(3, 4, 2, seed=2), r(3, 2, 5, seed=3)]
    yield "atan2_method_inplace", lambda a, b: (a * 1.0).arctan2_(b) + a.arctan2(b), [r(4, 5, seed=1),
                                                                                     r(4, 5, seed=2)]


def resampling_cases():
    """F.interpolate in each mode (integer and fractional scales, sizes), transposed and 3-d convolutions."""
    x1, x2, x3 = r(2, 3, 5, seed=1), r(1, 2, 4, 5, seed=2), r(1, 2, 3, 3, 4, seed=3)
    yield "interpolate_nearest_1d", lambda x: F.interpolate(x, scale_factor=2), [x1]
    yield "interpolate_nearest_fractional", lambda x: F.interpolate(x, scale_factor=1.7), [x1]
    yield "interpolate_nearest_down", lambda x: F.interpolate(x, size=3), [x1]
    yield "interpolate_nearest_2d_size", lambda x: F.interpolate(x, size=(7, 8)), [x2]
    yield "interpolate_nearest_3d", lambda x: F.interpolate(x, scale_factor=(2, 1, 1.5)), [x3]
    yield "interpolate_nearest_exact", lambda x: F.interpolate(x, scale_factor=1.6, mode="nearest-exact"), [x2]
    yield "interpolate_linear", lambda x: F.interpolate(x, scale_factor=2.5, mode="linear"), [x1]
    yield "interpolate_linear_corners", lambda x: F.interpolate(x, size=8, mode="linear", align_corners=True), [x1]
    yield "interpolate_bilinear", lambda x: F.interpolate(x, scale_factor=(1.5, 2), mode="bilinear"), [x2]
    yield "interpolate_bilinear_recompute", lambda x: F.interpolate(
        x, scale_factor=1.3, mode="bilinear", recompute_scale_factor=True), [x2]
    yield "interpolate_bicubic_corners", lambda x: F.interpolate(x, size=(6, 9), mode="bicubic",
                                                                  align_corners=True), [x2]
    yield "interpolate_trilinear", lambda x: F.interpolate(x, scale_factor=2, mode="trilinear"), [x3]
    yield "upsample_module", lambda x: torch.nn.Upsample(scale_factor=2, mode="bilinear")(x), [x2]
    yield "interpolate_bilinear_antialias_down", lambda x: F.interpolate(
        x, scale_factor=0.4, mode="bilinear", antialias=True), [r(1, 2, 9, 11, seed=17)]
    yield "interpolate_bicubic_antialias_size", lambda x: F.interpolate(
        x, size=(3, 7), mode="bicubic", antialias=True, align_corners=True), [r(1, 2, 8, 6, seed=18)]
    yield "conv_transpose1d", lambda x, w, b: F.conv_transpose1d(x, w, b), [x1, r(3, 4, 3, seed=4), r(4, seed=5)]
    yield "conv_transpose1d_strided_groups", lambda x, w: F.conv_transpose1d(
        x, w, stride=2, padding=1, output_padding=1, groups=3, dilation=2), [r(2, 6, 5, seed=6), r(6, 2, 3, seed=7)]
    yield "conv_transpose2d_bias_groups", lambda x, w, b: F.conv_transpose2d(x, w, b, stride=(2, 1), groups=2), [
        x2, r(2, 3, 3, 2, seed=8), r(6, seed=9)]
    yield "conv_transpose2d_module", lambda x: _CONV_TRANSPOSE(x), [x2]
    yield "conv3d", lambda x, w, b: F.conv3d(x, w, b, padding=1), [x3, r(4, 2, 2, 2, 3, seed=10), r(4, seed=11)]
    yield "conv_transpose3d", lambda x, w: F.conv_transpose3d(x, w, stride=2), [x3, r(2, 3, 2, 2, 2, seed=12)]
    yield "conv_transpose3d_bias", lambda x, w, b: F.conv_transpose3d(x, w, b, padding=1), [
        x3, r(2, 3, 2, 2, 2, seed=15), r(3, seed=16)]

    image, grid = r(2, 2, 4, 5, seed=13), r(2, 3, 4, 2, seed=14) * 0.9
    for mode in ("bilinear", "nearest", "bicubic"):
        for padding in ("zeros", "border", "reflection"):
            for corners in (False, True):
                yield f"grid_sample_{mode}_{padding}{'_corners' if corners else ''}", lambda x, g, m=mode, p=padding, \
                    c=corners: F.grid_sample(x, g * 1.2, mode=m, padding_mode=p, align_corners=c), [image, grid]
    yield "grid_sample_3d", lambda x, g: F.grid_sample(x, g, align_corners=True) + F.grid_sample(
        x, g * 1.3, padding_mode="reflection", align_corners=False) + F.grid_sample(
        x, g, mode="nearest", align_corners=False), [
        r(1, 2, 3, 4, 3, seed=15), r(1, 2, 3, 2, 3, seed=16) * 0.8]
    yield "affine_grid", lambda t: F.affine_grid(t, [2, 3, 4, 5], align_corners=False) + F.affine_grid(
        t, torch.Size((2, 1, 4, 5)), align_corners=True) * 2, [r(2, 2, 3, seed=17)]
    yield "affine_grid_3d_sampled", lambda x, t: F.grid_sample(x, F.affine_grid(t, x.shape, align_corners=False),
                                                               align_corners=False), [
        r(1, 2, 3, 4, 2, seed=18), r(1, 3, 4, seed=19) * 0.5]


_CONV_TRANSPOSE = _affine(torch.nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1))


def loss_cases():
    """The elementwise losses at each reduction; targets are differentiable too."""
    x, t = r(4, 5, seed=1), r(4, 5, seed=2)
    for reduction in ("mean", "sum", "none"):
        yield f"smooth_l1_{reduction}", lambda a, b, red=reduction: F.smooth_l1_loss(a, b, reduction=red), [x, t]
        yield f"huber_{reduction}", lambda a, b, red=reduction: F.huber_loss(a, b, reduction=red, delta=0.5), [x, t]
        yield f"huber_weight_{reduction}", lambda a, b, w, red=reduction: F.huber_loss(a, b, red, 0.7, w), [
            x, t, r(4, 5, seed=3, positive=True)]
        yield f"mse_weight_{reduction}", lambda a, b, w, red=reduction: F.mse_loss(a, b, reduction=red, weight=w), [
            x, t, r(4, 5, seed=3, positive=True)]
        yield f"kl_div_{reduction}", lambda a, b, red=reduction: F.kl_div(a.log_softmax(-1), b, reduction=red), [
            x, _probs(4, 5, seed=4)]
        yield f"kl_div_log_target_{reduction}", lambda a, b, red=reduction: F.kl_div(
            a, b, reduction=red, log_target=True), [x, r(4, 5, seed=5)]
    yield "smooth_l1_beta", lambda a, b: F.smooth_l1_loss(a, b, beta=0.3), [x, t]
    yield "smooth_l1_beta0", lambda a, b: F.smooth_l1_loss(a, b, beta=0.0), [x, t]  # torch: the L1 loss
    yield "smooth_l1_legacy_broadcast", lambda a, b: F.smooth_l1_loss(a, b, size_average=False), [
        r(4, 1, seed=6), r(5, seed=7)]
    # the input broadcast by the target, the weight the input's shape: mean divides by the weight's sum
    yield "mse_weight_broadcast", lambda a, b, w: F.mse_loss(a, b, weight=w), [
        r(4, 1, seed=6), r(5, seed=7), r(4, 1, seed=8, positive=True)]
    yield "smooth_l1_module", lambda a, b: torch.nn.SmoothL1Loss(beta=2.0)(a, b), [x, t]
    yield "huber_module", lambda a, b: torch.nn.HuberLoss(reduction="sum", delta=0.2)(a, b), [x, t]
    yield "kl_div_batchmean", lambda a, b: F.kl_div(a.log_softmax(1), b, reduction="batchmean"), [
        x, _probs(4, 5, seed=8)]
    yield "kl_div_batchmean_log_target", lambda a, b: F.kl_div(a, b, reduction="batchmean", log_target=True), [
        r(3, 2, 4, seed=9), r(3, 2, 4, seed=10)]
    yield "kl_div_broadcast_legacy", lambda a, b: F.kl_div(a, b, reduce=False), [r(4, 5, seed=11),
                                                                                  _probs(5, seed=12)]
    yield "kl_div_module", lambda a, b: torch.nn.KLDivLoss(reduction="batchmean")(a.log_softmax(1), b), [
        x, _probs(4, 5, seed=13)]
    yield "kl_div_0d_batchmean", lambda a, b: F.kl_div(a, b, reduction="batchmean"), [r(seed=15), r(seed=16).exp()]
    yield "bce_target", lambda a, b: F.binary_cross_entropy(a.sigmoid(), b) + F.binary_cross_entropy(
        a.sigmoid(), b, reduction="sum"), [x, t.sigmoid()]
    pos_weight = r(5, seed=17, positive=True)  # (weight and pos_weight: torch defines no derivative for them)
    yield "bce_logits_target", lambda a, b: F.binary_cross_entropy_with_logits(a, b) + (
        F.binary_cross_entropy_with_logits(a, b, pos_weight * 2, reduction="sum", pos_weight=pos_weight)), [
        x, t.sigmoid()]


def _zero_row(*shape, seed=0):
    x = r(*shape, seed=seed)
    x[1] = 0
    return x


def norm_cases():
    """F.normalize, F.cosine_similarity; ``nonsmooth`` in a name: torch's convention (no finite differences)."""
    yield "normalize", lambda x: F.normalize(x), [r(4, 5, seed=1)]
    yield "normalize_dim_p1", lambda x: F.normalize(x, p=1, dim=-1), [r(2, 3, 5, seed=2)]
    yield "normalize_p3_dim0", lambda x: F.normalize(x, 3.0, 0), [r(4, 5, seed=3)]
    yield "normalize_p1.5_p0.5", lambda x: F.normalize(x, p=1.5, dim=1) + F.normalize(x, p=0.5, dim=1), [
        r(4, 5, seed=4)]
    yield "normalize_nonsmooth_zero_row", lambda x: F.normalize(x, dim=1), [_zero_row(3, 4, seed=5)]
    yield "normalize_nonsmooth_eps", lambda x: F.normalize(x, dim=1, eps=2.0), [r(3, 4, seed=6)]  # all clamped
    # nn.utils.parametrizations.weight_norm: the fused kernel (dim first or last) and the composite (other dims)
    yield "weight_norm", lambda v, g: torch._weight_norm(v, g, 0), [r(4, 5, seed=1), r(4, 1, positive=True, seed=2)]
    yield "weight_norm_last_dim", lambda v, g: torch._weight_norm(v, g, 2), [r(3, 4, 2, seed=3),
                                                                              r(1, 1, 2, positive=True, seed=4)]
    yield "weight_norm_middle_dim", lambda v, g: torch._weight_norm(v, g, 1), [r(3, 4, 2, seed=5),
                                                                                r(1, 4, 1, positive=True, seed=6)]
    yield "weight_norm_all_dims", lambda v, g: torch._weight_norm(v, g, -1), [r(3, 4, seed=7),
                                                                               r(positive=True, seed=8)]
    yield "weight_norm_keywords", lambda v, g: torch._weight_norm(v, g=g, dim=1), [r(4, 5, seed=9),
                                                                                    r(1, 5, positive=True, seed=10)]
    # a transposed v and g (a view, as a fuzzed select gives): torch makes them contiguous before its fused kernel
    yield "weight_norm_noncontiguous", lambda v, g: torch._weight_norm(v.t(), g.t(), 0), [
        r(5, 4, seed=11), r(1, 4, positive=True, seed=12)]
    yield "cosine_similarity", lambda a, b: F.cosine_similarity(a, b), [r(4, 5, seed=1), r(4, 5, seed=2)]
    yield "cosine_similarity_broadcast", lambda a, b: F.cosine_similarity(a, b, dim=-1), [r(1, 5, seed=1),
                                                                                          r(3, 4, 5, seed=2)]
    yield "cosine_similarity_1d", lambda a, b: torch.cosine_similarity(a, b, 0), [r(5, seed=3), r(5, seed=4)]
    yield "cosine_similarity_nonsmooth_zero_row", lambda a, b: F.cosine_similarity(a, b), [
        _zero_row(3, 4, seed=5), r(3, 4, seed=6)]
    yield "cosine_similarity_nonsmooth_eps", lambda a, b: F.cosine_similarity(a, b, eps=3.0), [
        r(3, 4, seed=7), r(3, 4, seed=8)]


# ---------------------------------------------------------------- the rules added with the second batch of ops


def _with_zeros():
    """cumprod's inputs: zeros first, in the middle, repeated, last."""
    return torch.tensor([[1.5, 0.0, 2.0, 0.0, 3.0], [0.0, 2.0, -1.0, 0.5, 2.0], [2.0, 3.0, -1.0, 0.5, 0.0],
                         [0.7, -1.2, 0.9, 1.1, -0.4]], dtype=D)


def _spd(n, seed=0, batch=()):
    """A well-conditioned matrix (positive definite when symmetric)."""
    x = r(*batch, n, n, seed=seed)
    return x + 3 * torch.eye(n, dtype=D)


ACTIVATIONS = {  # unary, on r(4, 5) and a 0-d input
    "logsigmoid": lambda x: F.logsigmoid(x),
    "selu": lambda x: F.selu(x),
    "celu": lambda x: F.celu(x, alpha=0.7),
    "softsign": lambda x: F.softsign(x),
    "tanhshrink": lambda x: F.tanhshrink(x),
    "hardshrink": lambda x: F.hardshrink(x, 0.3),
    "softshrink": lambda x: F.softshrink(x) + torch.nn.Softshrink(0.2)(x),
    "threshold": lambda x: F.threshold(x, 0.1, -2.0),
    "rrelu_eval": lambda x: F.rrelu(x, 0.1, 0.3),
    "erfc": lambda x: torch.erfc(x) + torch.special.erfc(x * 2),
    "erfinv": lambda x: (x.tanh() * 0.9).erfinv(),
    "exp2": lambda x: x.exp2() + torch.special.exp2(x * 0.5),
    "deg2rad_rad2deg": lambda x: x.deg2rad().sin() + torch.rad2deg(x),
    "frac": lambda x: x.frac() * x,
    "sinc": lambda x: torch.sinc(x) + torch.special.sinc(x * 0.3),
    "ndtr": lambda x: torch.special.ndtr(x) + torch.special.log_ndtr(x),
    "ndtri": lambda x: torch.special.ndtri(x.sigmoid()),
    "logit": lambda x: x.sigmoid().logit() + torch.special.logit(x.sigmoid() * 0.5, eps=0.2),
    "bessel_i": lambda x: x.i0() + torch.special.i0e(x) + torch.special.i1(x) + torch.special.i1e(x),
    "special_aliases": lambda x: torch.special.expm1(x) + torch.special.log1p(x.exp()) + x * torch.special.round(x),
    "nan_to_num_finite": lambda x: x.nan_to_num() * x,
    "erfcx": lambda x: torch.special.erfcx(x) + torch.special.erfcx(x * 4 + 12),  # (large x: its asymptotic branch)
    "softmin": lambda x: F.softmin(x, -1) + F.softmin(x * 2, dim=0, dtype=D) * 2 + torch.nn.Softmin(-1)(x * 0.5),
    "fix_angle": lambda x: x.fix() * x + torch.fix(x) + torch.angle(x) * x,
    "frexp": lambda x: torch.frexp(x).mantissa + x.frexp()[0] * x,
}

POSITIVE_ACTIVATIONS = {  # unary, on positive inputs
    "lgamma": lambda x: x.lgamma() + torch.special.gammaln(x * 2),
    "digamma": lambda x: torch.digamma(x) + torch.special.psi(x) + torch.special.digamma(x * 2),
    "polygamma": lambda x: torch.polygamma(1, x) + x.polygamma(2) + torch.special.polygamma(0, x),
    "mvlgamma": lambda x: torch.mvlgamma(x + 1, 2) + torch.special.multigammaln(x + 2, 3),
    "entr": lambda x: torch.special.entr(x),
    # (a and s take no gradient: torch refuses to differentiate them)
    "incomplete_gamma": lambda x: torch.special.gammainc(torch.tensor(2.5, dtype=x.dtype), x) + torch.igammac(
        torch.full((5,), 0.7, dtype=x.dtype), x * 2) + torch.full((1,), 1.5, dtype=x.dtype).igamma(x),
    "zeta": lambda x: torch.special.zeta(torch.tensor(3.0, dtype=x.dtype), x) + torch.special.zeta(2.5, x * 2),
}

BINARY_NEW = {  # over the broadcasting shape matrix
    "logaddexp": lambda a, b: torch.logaddexp(a, b) + torch.logaddexp2(b, a),
    "hypot": lambda a, b: torch.hypot(a, b),
    "add_alpha": lambda a, b: torch.add(a, b, alpha=-0.5) + a.add(b, alpha=2.0) + (a + 0 * b).add_(b, alpha=3),
    "xlogy": lambda a, b: torch.xlogy(a, b.abs() + 0.5) + torch.special.xlog1py(b, a.abs()),
    "remainder_fmod": lambda a, b: a % (b.abs() + 0.5) + torch.fmod(a, b.abs() + 0.5),
    # (a negative integer exponent: see test_ops, torch's gradient is 0 there)
    "ldexp": lambda a, b: torch.ldexp(a, b) + torch.ldexp(b, torch.tensor([3, 0, 1, 2, 0])[-b.shape[-1]:]) * a,
}


def activation_cases():
    yield from _one_input_cases(ACTIVATIONS, POSITIVE_ACTIVATIONS)
    for (name, fn), (sa, sb) in itertools.product(BINARY_NEW.items(), [((4, 5), (4, 5)), ((4, 1), (5,)), ((), (4, 5))]):
        yield f"{name}-{sa}-{sb}", fn, [r(*sa, seed=1), r(*sb, seed=2)]
    yield "prelu", lambda x, w: F.prelu(x, w), [r(2, 3, 4, seed=1), r(3, seed=2)]
    yield "prelu_shared_1d", lambda x, w: F.prelu(x, w), [r(5, seed=3), r(1, seed=4)]
    yield "prelu_module_4d", lambda x: _PRELU(x), [r(2, 3, 2, 2, seed=5)]
    yield "glu", lambda x: F.glu(x), [r(3, 4, seed=1)]
    yield "glu_dim0", lambda x: F.glu(x, 0) + torch.nn.GLU(1)(x.T).T.sum(), [r(4, 6, seed=2)]
    yield "copysign", lambda a, b: torch.copysign(a, b) + a.copysign(-1.0), [r(4, 5, seed=1), r(5, seed=2)]
    # tensor bounds, min > max in 5 places: max wins there and takes the gradient
    yield "clamp_tensor_bounds", lambda x, lo, hi: torch.clamp(x, lo, hi) + x.clamp(min=lo) * 2 + x.clip(max=hi) * 3, [
        _apart(4, 5, seed=1), r(4, 5, seed=2) * 0.5, r(5, seed=3) * 0.5 + 0.3]
    yield "clamp_min_max_tensor", lambda x, lo, hi: torch.clamp_max(x, hi) + x.clamp_min(lo) * 2 + (
        x * 1.0).clamp_max_(hi) * 3, [_apart(4, 5, seed=1), r(4, 5, seed=2) * 0.5, r(5, seed=3) * 0.5 + 0.3]
    yield "float_power", lambda a, b: torch.float_power(a.abs() + 0.5, b) + a.float_power(2), [
        r(4, 5, seed=1), r(5, seed=2)]
    yield "remainder_scalar", lambda a: a % 0.7 + torch.remainder(a, -0.4), [r(4, 5, seed=1)]
    special = torch.tensor([[0.0, -0.3, 0.3, 2.0], [float("nan"), float("inf"), -float("inf"), 0.1]], dtype=D)
    # torch's conventions at these points: 0 for a replaced NaN/inf, the limit at 0, 0 where x == 0
    yield "nonsmooth_nan_to_num", lambda x: torch.nan_to_num(x, nan=1.0, posinf=2.0) * 3, [special]
    zeros = torch.tensor([[0.0, -0.3, 0.3, 2.0], [0.0, 1.0, -0.0, 0.1]], dtype=D)
    yield "nonsmooth_at_zero", lambda x: torch.sinc(x) + torch.xlogy(x, 2.0) + torch.copysign(x, -1.0) + (
        torch.special.i1(x) + torch.special.i1e(x)), [zeros]
    below = torch.tensor([[-0.5, 1.0, 2.0, 3.0], [-1.0, 0.5, -2.0, 1.0]], dtype=D)  # y <= 0 (-1) where x == 0: 0
    yield "nonsmooth_xlogy_at_zero", lambda x: torch.xlogy(x, below) + torch.special.xlog1py(x, below - 1), [zeros]
    yield "nonsmooth_shrink_kinks", lambda x: F.hardshrink(x, 0.3) + F.softshrink(x, 0.3) + F.threshold(x, 0.1, 5.0), [
        torch.tensor([[0.3, -0.3, 0.1, 0.0], [1.0, -1.0, 0.2, 0.5]], dtype=D)]


_PRELU = _affine(torch.nn.PReLU(3))


def scan_cases():
    """cumprod (with zeros), cummax/cummin (with ties), logcumsumexp, nansum/nanmean, diff, trace, diag."""
    x, zeros = r(4, 5, seed=5), _with_zeros()
    yield "cumprod", lambda x: x.cumprod(1), [x]
    yield "cumprod_dim0_dtype", lambda x: torch.cumprod(x, 0, dtype=D), [x]
    yield "cumprod_zeros", lambda x: x.cumprod(1) + x.cumprod(dim=0), [zeros]  # smooth (a polynomial)
    yield "cumprod_0d", lambda x: x.cumprod(0), [r(seed=1)]
    yield "cummax", lambda x: x.cummax(1).values + torch.cummin(x, 0)[0], [distinct(4, 5)]
    yield "cummax_0d", lambda x: x.cummax(0).values * x.cummin(-1).values, [r(seed=2)]
    yield "logcumsumexp", lambda x: x.logcumsumexp(1) + torch.logcumsumexp(x * 30, dim=0), [x]
    yield "nansum_nanmean", lambda x: x.nansum() + x.nansum(1, keepdim=True) * x.nanmean(0) + x.nanmean(), [x]
    with_nan = r(4, 5, seed=6)
    with_nan[1, 2] = with_nan[3, 0] = float("nan")
    yield "nonsmooth_nansum_nan", lambda x: x.nansum(0) + x.nanmean(1).sum() + torch.nanmean(x, (0, 1)), [with_nan]
    yield "diff", lambda x: x.diff() + torch.diff(x, n=2, dim=0).sum(), [x]
    yield "diff_to_empty", lambda x: torch.diff(x, n=2, dim=0, prepend=x[:1]) * 2 + torch.diff(x[:2], 3, 0).sum(), [
        r(2, 3, seed=9)]
    yield "diff_prepend_append", lambda x, p, a: torch.diff(x, dim=1, prepend=p, append=a), [
        x, r(4, 2, seed=7), r(4, 1, seed=8)]
    yield "trace", lambda x: x.trace() + torch.trace(x.T @ x), [x]
    yield "trapezoid", lambda y: torch.trapezoid(y) + torch.trapz(y, dim=0).sum() + torch.trapezoid(
        y, dx=0.5, dim=-1), [x]
    yield "trapezoid_x_1d", lambda y, t: torch.trapezoid(y, t) + torch.trapz(y.T, t, dim=0) * 2, [x, r(5, seed=10)]
    yield "trapezoid_x_broadcast", lambda y, t, u: torch.trapezoid(y, t, dim=1) + torch.trapz(y, u).sum(
        -1, keepdim=True), [r(3, 4, 5, seed=11), r(4, 1, seed=12), r(4, 5, seed=13)]
    yield "trapezoid_one_and_no_point", lambda y, t: torch.trapezoid(y[:, :1]) + torch.trapezoid(y[:, :0]) + (
        torch.trapezoid(y[:, :1], t[:1])), [x, r(5, seed=10)]
    yield "cumulative_trapezoid", lambda y: torch.cumulative_trapezoid(y) + torch.cumulative_trapezoid(
        y, dx=0.3, dim=-1) + torch.cumulative_trapezoid(y, dim=0).sum(0, keepdim=True)[:, :4], [x]
    yield "cumulative_trapezoid_x", lambda y, t, u: torch.cumulative_trapezoid(y, t) + torch.cumulative_trapezoid(
        y.T, t, dim=0).T + torch.cumulative_trapezoid(y, u, dim=0)[:, :4].sum(0), [x, r(5, seed=10), r(4, 1, seed=14)]
    probs = torch.tensor([0.1, 0.45, 0.93], dtype=D)  # (no rank falls on a kink)
    yield "quantile", lambda x: torch.quantile(x, 0.3) + torch.quantile(x, 0.7, dim=1).sum() + x.quantile(
        0.25, dim=0, keepdim=True).sum() + torch.quantile(x[0, 0], 0.4), [distinct(4, 5)]
    yield "quantile_q_tensor", lambda x, q: torch.quantile(x, q, dim=1) + torch.quantile(x, q, dim=0, keepdim=True).sum(
        (1, 2)).unsqueeze(1) + torch.quantile(x, q).unsqueeze(1) + torch.quantile(x, q[1], dim=-1), [distinct(4, 5),
                                                                                                      probs]
    yield "quantile_interpolations", lambda x, q: torch.quantile(x, q, 1, interpolation="lower") + torch.quantile(
        x, q, 1, interpolation="higher") + x.quantile(q, 1, interpolation="nearest") + torch.quantile(
        x, q, dim=1, interpolation="midpoint"), [distinct(4, 5), probs]
    with_nans = distinct(4, 5)
    with_nans[1, 2] = with_nans[3, 0] = with_nans[3, 4] = float("nan")
    yield "nanquantile", lambda x, q: torch.nanquantile(x, q, dim=1) + x.nanquantile(q, interpolation="midpoint")[
        :, None] + torch.nanquantile(x, 0.6, dim=0).sum(), [with_nans, probs]
    with_nans = with_nans.clone()
    with_nans[2] = float("nan")  # quantile: NaN where a slice holds one; nanquantile: NaN for a slice of NaNs only
    # (made finite: test_codegen compares with torch.equal)
    yield "nonsmooth_quantile_nan", lambda x, q: (torch.quantile(x, q, dim=1) + torch.nanquantile(
        x, q, dim=1)).nan_to_num(), [with_nans, probs]
    yield "gradient", lambda x: torch.gradient(x)[0] + torch.gradient(x, spacing=2.0)[1] * 3 + torch.gradient(
        x, dim=1, edge_order=2)[0] + torch.gradient(x, spacing=[0.5, 3.0], dim=[1, 0], edge_order=2)[1], [x]
    yield "gradient_3d", lambda x: torch.gradient(x, dim=-1)[0] + torch.gradient(x, spacing=(0.3,), dim=(1,))[0], [
        r(2, 5, 4, seed=1)]
    # coordinates as spacing (torch differentiates through them): increasing, with uneven gaps
    a, b = r(5, positive=True, seed=2).cumsum(0), r(4, positive=True, seed=3).cumsum(0)
    yield "gradient_coordinates", lambda x, a, b: torch.gradient(x, spacing=(b, a))[0] + torch.gradient(
        x, spacing=[b, a], edge_order=2)[1] * 2 + torch.gradient(x, spacing=(a,), dim=1)[0] * 3 + torch.gradient(
        x, spacing=(a, b), dim=(-1, 0), edge_order=2)[1], [x, a, b]
    yield "gradient_coordinates_3d", lambda x, a, b: torch.gradient(x, spacing=(a, b), dim=(1, -1), edge_order=2)[
        0] + torch.gradient(x, spacing=[b], dim=2)[0], [r(2, 5, 4, seed=4), a, b]
    yield "gradient_coordinates_fewest_points", lambda x, a, b: torch.gradient(x, spacing=(a[:2],), dim=0)[0].sum(
        0) + torch.gradient(x, spacing=(b[1:],), dim=1, edge_order=2)[0], [r(2, 3, seed=5), a, b]
    yield "aminmax", lambda x: torch.aminmax(x).min + torch.aminmax(x, dim=1).max.sum() + x.aminmax(
        dim=0, keepdim=True)[0].sum() + torch.aminmax(x, dim=-1, keepdim=True)[1], [distinct(4, 5)]
    yield "diag", lambda x: x.diag() + torch.diag(x, 1).sum() + torch.diag(x[0], -1).sum(), [x]
    yield "diag_embed_diagflat", lambda x: torch.diag_embed(x).sum(0) + torch.diag_embed(x, 1, 0, 2).sum(1)[:5, :5] + (
        torch.diagflat(x[:2], -1)[:5, :5]), [r(4, 5, seed=9)]


TIED_NEW = {
    "scatter_reduce_ties": lambda x: x.scatter_reduce(1, torch.tensor([[0, 0, 2, 2], [3, 1, 3, 3]]), x.flip(1),
                                                      "amax") + x.scatter_reduce(0, torch.tensor([[1, 0, 0, 0]]),
                                                                                 x[1:], "amin"),
    "aminmax_ties": lambda x: torch.aminmax(x, dim=1)[1].sum() + torch.aminmax(x).min,  # ties share it evenly
    "cummax_ties": lambda x: x.cummax(1).values + x.cummin(0).values.sum(),  # the returned index takes it
    "cumprod_zero_ties": lambda x: (x - 2).cumprod(1),  # 0s where x was 2
    "sinc_at_integers": lambda x: torch.sinc(x) + torch.sinc(x - 3),
}


def linalg_cases():
    a, b = _spd(4, seed=1), _spd(4, seed=2, batch=(2,))
    yield "det", lambda a: torch.linalg.det(a) + a.det(), [a]
    yield "det_batched", lambda b: torch.det(b), [b]
    singular = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 5.0]], dtype=D)
    yield "nonsmooth_det_singular", lambda a: torch.linalg.det(a) * 2, [singular]  # torch: 0, not the adjugate
    yield "slogdet", lambda a: torch.linalg.slogdet(a).logabsdet + torch.slogdet(a * -1)[1], [a]
    yield "logdet", lambda b: torch.logdet(b) + b.logdet(), [b]
    yield "inverse", lambda a: torch.linalg.inv(a) + a.inverse() + torch.inverse(a), [a]
    yield "inverse_batched", lambda b: torch.linalg.inv(b), [b]
    yield "solve", lambda a, c: torch.linalg.solve(a, c), [a, r(4, 3, seed=3)]
    yield "solve_vector_batched", lambda b, c: torch.linalg.solve(b, c), [b, r(4, seed=4)]
    yield "solve_right_broadcast", lambda b, c: torch.linalg.solve(b, c, left=False), [b, r(3, 4, seed=5)]
    yield "addmv", lambda i, m, v: torch.addmv(i, m, v, beta=0.5, alpha=2.0) + i.addmv(m, v), [
        r(4, seed=1), r(4, 3, seed=2), r(3, seed=3)]
    yield "addr", lambda i, u, v: torch.addr(i, u, v) + i.addr(u, v, alpha=-1.5), [r(1, 3, seed=1), r(4, seed=2),
                                                                                    r(3, seed=3)]
    yield "tensordot", lambda a, b: torch.tensordot(a, b, dims=([2, 0], [0, 1])), [r(3, 2, 4, seed=1),
                                                                                  r(4, 3, 5, seed=2)]
    yield "tensordot_int", lambda a, b: torch.tensordot(a, b, 1) + torch.tensordot(a, b.sum(-1, keepdim=True), dims=0
                                                                                   ).sum((2, 3))[:, :2], [
        r(3, 4, seed=1), r(4, 2, seed=2)]
    yield "cross", lambda a, b: torch.linalg.cross(a, b) + torch.cross(a, b, dim=1), [r(4, 3, seed=1), r(1, 3, seed=2)]
    yield "cross_default_dim", lambda a, b: torch.cross(a, b), [r(3, 4, seed=1), r(3, 4, seed=2)]
    yield "tensorinv", lambda a, b: torch.linalg.tensorinv(a, ind=1) + torch.linalg.tensorinv(b).sum(), [
        r(4, 2, 2, seed=1) + torch.eye(4, dtype=D).view(4, 2, 2) * 3, r(2, 3, 6, seed=2)]
    yield "tensorsolve", lambda a, b, c: torch.linalg.tensorsolve(a, b) + torch.linalg.tensorsolve(
        c, b, dims=(0, 2)).sum(), [r(2, 3, 6, seed=1), r(2, 3, seed=2), r(2, 2, 3, 3, seed=3)]
    yield "vdot_vecdot", lambda a, b: torch.linalg.vecdot(a, b) + a[0].vdot(b) + torch.vdot(b, a[1]) + (
        torch.linalg.vecdot(a, a.flip(0) * 2, dim=0).sum()), [r(4, 5, seed=1), r(5, seed=2)]
    yield "linalg_matmul", lambda a, b: torch.linalg.matmul(a, b), [r(2, 4, 3, seed=1), r(3, 2, seed=2)]
    yield "multi_dot", lambda v, a, b, c, w: torch.linalg.multi_dot([a, b, c]) + torch.linalg.multi_dot(
        (v, a, b, w)) + torch.linalg.multi_dot([a, b, w])[:, None] + torch.linalg.multi_dot([v, a]).sum(), [
        r(4, seed=1), r(4, 3, seed=2), r(3, 5, seed=3), r(5, 2, seed=4), r(5, seed=5)]
    yield "chain_matmul", lambda a, b, c: torch.chain_matmul(a, b, c) + torch.chain_matmul(a @ b, c) * 2, [
        r(4, 3, seed=2), r(3, 5, seed=3), r(5, 2, seed=4)]
    yield "matrix_power", lambda a: torch.linalg.matrix_power(a, 3) + torch.matrix_power(a, -2) + a.matrix_power(
        1) + torch.linalg.matrix_power(a, 0) * a, [_spd(4, seed=3) / 3]
    yield "matrix_power_batched", lambda b: torch.linalg.matrix_power(b, 4) + torch.linalg.matrix_power(b, -1), [
        b / 3]
    yield "inv_ex_solve_ex", lambda a, c: torch.linalg.inv_ex(a).inverse + torch.linalg.solve_ex(a, c)[0] + (
        torch.linalg.solve_ex(a, c, left=False).result), [a, r(4, 4, seed=6)]
    yield "linalg_diagonal", lambda x: torch.linalg.diagonal(x) + torch.linalg.diagonal(x, offset=1, dim1=0, dim2=2
                                                                                         ).sum(-1), [r(3, 4, 5, seed=7)]
    yield "nuclear_frobenius_norm", lambda a, b: torch.nuclear_norm(a) + torch.nuclear_norm(b, (0, 2), keepdim=True
                                                                                            ).sum() + (
        torch.frobenius_norm(b, (1, 2)).sum() + torch.nuclear_norm(a, True) + torch.frobenius_norm(a, [0, 1])), [
        r(4, 3, seed=8), r(2, 3, 5, seed=9)]
    yield "renorm", lambda x: x.renorm(2, 0, 2.0) + torch.renorm(x, 1, 1, 2.5) + torch.renorm(x, 3, 0, 1.0) + (
        x.renorm(float("inf"), 1, 1.0)), [distinct(4, 5) * 8 - 4]
    yield "bilinear", lambda x1, x2, w, b: F.bilinear(x1, x2, w, b), [r(4, 3, seed=1), r(4, 2, seed=2),
                                                                       r(5, 3, 2, seed=3), r(5, seed=4)]
    yield "bilinear_module_3d", lambda x1, x2: _BILINEAR(x1, x2), [r(2, 4, 3, seed=1), r(2, 4, 2, seed=2)]


_BILINEAR = _affine(torch.nn.Bilinear(3, 2, 4))


def _flat(*outputs):
    """Several outputs as one tensor, so that each takes its own gradient."""
    return torch.cat([t.reshape(-1) for t in outputs])


def _rnn_params(gates, input_size, hidden, *, layers=1, directions=1, bias=True, proj=0, seed=0):
    """Flat weights as nn.LSTM/GRU/RNN pass them: w_ih, w_hh (, b_ih, b_hh) (, w_hr) per layer and direction."""
    out, params = proj or hidden, []
    for layer in range(layers):
        size = input_size if layer == 0 else out * directions
        for _ in range(directions):
            shapes = [(gates * hidden, size), (gates * hidden, out)] + [(gates * hidden,)] * (2 * bias)
            shapes += [(proj, hidden)] if proj else []
            params += [r(*shape, seed=seed + len(params)) * 0.6 for shape in shapes]
    return params


def _sequence(op, layers=1, bidirectional=False, batch_first=False, bias=True):
    """torch.lstm/gru/rnn_* as nn.LSTM/GRU/RNN.forward calls it, with its weights as the case's inputs."""
    lstm = op is torch._VF.lstm

    def fn(x, *rest):
        hx, params = ((rest[0], rest[1]), rest[2:]) if lstm else (rest[0], rest[1:])
        return _flat(*op(x, hx, list(params), bias, layers, 0.0, False, bidirectional, batch_first))
    return fn


_LENGTHS = torch.tensor([3, 2, 1])  # sorted: enforce_sorted=False starts its permutation from empty_like


def _packed_gru(x, h0, *params):
    """A padded batch through pack_padded_sequence, a 2-layer bidirectional GRU and pad_packed_sequence."""
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, _LENGTHS, batch_first=True)
    data, h_n = torch._VF.gru(packed.data, packed.batch_sizes, h0, list(params), True, 2, 0.0, False, True)
    out = torch.nn.utils.rnn.PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    padded, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=4)
    return _flat(padded, h_n)


_LSTM_MODULE = _affine(torch.nn.LSTM(2, 3, num_layers=2, bidirectional=True))
_LSTM_PROJ_MODULE = _affine(torch.nn.LSTM(2, 3, proj_size=2, batch_first=True))
_GRU_MODULE = _affine(torch.nn.GRU(2, 3, bias=False))
_RNN_MODULE = _affine(torch.nn.RNN(2, 3, nonlinearity="relu", num_layers=2))
_LSTM_CELL = _affine(torch.nn.LSTMCell(2, 3))
_GRU_CELL = _affine(torch.nn.GRUCell(2, 3, bias=False))


def recurrent_cases():
    """The recurrent cells and sequences (torch.lstm_cell ... torch._VF.lstm ...), their weights as inputs."""
    x, h, c = r(2, 3, seed=1), r(2, 4, seed=2), r(2, 4, seed=3)
    yield "lstm_cell", lambda x, h, c, *w: _flat(*torch.lstm_cell(x, (h, c), *w)), [
        x, h, c, *_rnn_params(4, 3, 4, seed=10)]
    yield "lstm_cell_no_bias_c_only", lambda x, h, c, *w: torch.lstm_cell(x, (h, c), *w)[1], [
        x, h, c, *_rnn_params(4, 3, 4, bias=False, seed=20)]
    yield "lstm_cell_h_only", lambda x, h, c, *w: torch.lstm_cell(x, (h, c), *w)[0], [
        x, h, c, *_rnn_params(4, 3, 4, seed=25)]
    yield "gru_cell", lambda x, h, *w: torch.gru_cell(x, h, *w), [x, h, *_rnn_params(3, 3, 4, seed=30)]
    yield "gru_cell_no_bias", lambda x, h, *w: torch.gru_cell(x, h, *w), [x, h, *_rnn_params(3, 3, 4, bias=False,
                                                                                                 seed=40)]
    yield "rnn_tanh_cell", lambda x, h, *w: torch.rnn_tanh_cell(x, h, *w), [x, h, *_rnn_params(1, 3, 4, seed=50)]
    yield "rnn_relu_cell_no_bias", lambda x, h, *w: torch.rnn_relu_cell(x, h, *w), [
        x, h, *_rnn_params(1, 3, 4, bias=False, seed=60)]
    yield "rnn_relu_cell", lambda x, h, *w: torch.rnn_relu_cell(x, h, *w), [x, h, *_rnn_params(1, 3, 4, seed=65)]
    yield "lstm_cell_module_unbatched_no_hx", lambda x: _flat(*_LSTM_CELL(x)), [r(2, seed=4)]
    yield "gru_cell_module_no_hx", lambda x: _GRU_CELL(x), [r(2, 2, seed=5)]
    seq, h0 = r(3, 2, 2, seed=6), r(1, 2, 3, seed=7)
    yield "lstm", _sequence(torch._VF.lstm), [seq, h0, r(1, 2, 3, seed=8), *_rnn_params(4, 2, 3, seed=70)]
    yield "lstm_2_layers_bidirectional_batch_first", _sequence(torch._VF.lstm, 2, True, True), [
        seq, r(4, 3, 2, seed=9), r(4, 3, 2, seed=10), *_rnn_params(4, 2, 2, layers=2, directions=2, seed=80)]
    yield "lstm_proj_2_layers", _sequence(torch._VF.lstm, 2), [
        seq, r(2, 2, 2, seed=11), r(2, 2, 3, seed=12), *_rnn_params(4, 2, 3, layers=2, proj=2, seed=100)]
    yield "gru_2_layers_no_bias", _sequence(torch._VF.gru, 2, bias=False), [
        seq, r(2, 2, 3, seed=13), *_rnn_params(3, 2, 3, layers=2, bias=False, seed=120)]
    yield "gru_bidirectional_batch_first", _sequence(torch._VF.gru, 1, True, True), [
        seq, r(2, 3, 3, seed=14), *_rnn_params(3, 2, 3, directions=2, seed=140)]
    yield "rnn_tanh_2_layers_bidirectional", _sequence(torch._VF.rnn_tanh, 2, True), [
        seq, r(4, 2, 3, seed=15), *_rnn_params(1, 2, 3, layers=2, directions=2, seed=160)]
    yield "rnn_relu", _sequence(torch._VF.rnn_relu), [seq, h0, *_rnn_params(1, 2, 3, seed=180)]
    yield "gru_packed_2_layers_bidirectional", _packed_gru, [
        r(3, 4, 2, seed=16), r(4, 3, 2, seed=17), *_rnn_params(3, 2, 2, layers=2, directions=2, seed=200)]
    yield "pad_sequence", lambda a, b: torch.nn.utils.rnn.pad_sequence([a, b]), [r(2, 3, seed=21), r(4, 3, seed=22)]
    yield "pad_sequence_left_batch_first", lambda a, b: torch.nn.utils.rnn.pad_sequence([a, b], True, 0.5, "left"), [
        r(3, seed=23), r(1, seed=24)]
    yield "lstm_module_unbatched", lambda x: _flat(_LSTM_MODULE(x)[0], *_LSTM_MODULE(x)[1]), [r(3, 2, seed=18)]
    yield "lstm_module_proj_batch_first", lambda x: _flat(_LSTM_PROJ_MODULE(x)[0]), [r(2, 3, 2, seed=19)]
    yield "gru_module_no_bias", lambda x, h: _flat(*_GRU_MODULE(x, h)), [seq, h0]
    yield "rnn_module_relu_2_layers", lambda x: _flat(*_RNN_MODULE(x)), [seq]


def _pd(x):
    """A symmetric positive-definite matrix made from any square ``x`` (finite differences then move it as a whole)."""
    return x @ x.mT + x.shape[-1] * torch.eye(x.shape[-1], dtype=x.dtype)


def _sym(x):
    return x + x.mT


def _eigh_invariant(w, v):
    """Eigenvectors only through their squares: the same whichever sign the solver picks."""
    return v * v * w.unsqueeze(-2)


def _svd_invariant(u, s, vh):
    """Singular vectors only through their squares (each pair's sign is the solver's choice)."""
    return (u * u * s.unsqueeze(-2)).sum(-2, keepdim=True).mT + (vh * vh).sum(-1, keepdim=True)


def _torch_runs(call: Callable[[], object]) -> bool:
    """Whether the installed torch still runs a long-deprecated spelling: torch 2.14 removed torch.cholesky,
    torch.qr and their Tensor methods (they raise, naming torch.linalg's): the cases hold them only where they run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    except RuntimeError:
        return False
    return True


LEGACY_CHOLESKY = _torch_runs(lambda: torch.eye(2, dtype=D).cholesky())
LEGACY_QR = _torch_runs(lambda: torch.eye(2, dtype=D).qr())
MATRIX_SQRTH = hasattr(torch.linalg, "matrix_sqrth")  # new in torch 2.14, as linalg.polar: cased where torch has them
POLAR = hasattr(torch.linalg, "polar")


def decomposition_cases():
    """Cholesky, eigh, SVD, QR, pinv, lstsq, matrix_exp and triangular solves, on well-separated spectra.

    ``symmetrised`` in a name: a factorisation reading one triangle of its input, given that input directly;
    its gradient is torch's symmetric convention (no finite differences).
    """
    x, xb = r(4, 4, seed=11), r(2, 3, 3, seed=12)
    yield "cholesky", lambda x: torch.linalg.cholesky(_pd(x)) + torch.linalg.cholesky(_pd(x), upper=True).mT * 2, [x]
    if LEGACY_CHOLESKY:
        yield "cholesky_legacy", lambda x: torch.cholesky(_pd(x), upper=True).mT * 2 + (
            _pd(x).cholesky() * _pd(x).cholesky(upper=True).mT), [x]
    yield "cholesky_batched_upper", lambda x: torch.linalg.cholesky(_pd(x), upper=True), [xb]
    yield "cholesky_ex", lambda x: torch.linalg.cholesky_ex(_pd(x)).L + torch.linalg.cholesky_ex(
        _pd(x), upper=True)[0], [xb]
    yield "symmetrised_cholesky", lambda a: torch.linalg.cholesky(a), [_pd(x)]
    yield "cholesky_solve", lambda b, x: torch.cholesky_solve(b, torch.linalg.cholesky(_pd(x))) + torch.cholesky_solve(
        b, torch.linalg.cholesky(_pd(x), upper=True), upper=True), [r(4, 2, seed=13), x]
    yield "cholesky_solve_triangle_broadcast", lambda b, t: torch.cholesky_solve(b, t.tril()) + torch.cholesky_solve(
        b, t.mT.triu(), True), [r(3, 2, seed=14), _spd(3, seed=15, batch=(2,))]
    yield "cholesky_inverse", lambda t: torch.cholesky_inverse(t.tril()) + torch.cholesky_inverse(
        t.triu(), upper=True) + t.tril().cholesky_inverse(), [_spd(4, seed=16)]
    yield "cholesky_inverse_batched", lambda x: torch.cholesky_inverse(torch.linalg.cholesky(_pd(x))), [xb]
    yield "eigh", lambda x: _eigh_invariant(*torch.linalg.eigh(_sym(x))), [x]
    yield "eigh_upper_batched", lambda x: _eigh_invariant(*torch.linalg.eigh(_sym(x), UPLO="U")), [xb]
    yield "eigh_values", lambda x: torch.linalg.eigh(_sym(x)).eigenvalues.exp(), [x]
    yield "eigh_vectors", lambda x: torch.linalg.eigh(_sym(x))[1] ** 2, [xb]
    yield "symmetrised_eigh", lambda a: _eigh_invariant(*torch.linalg.eigh(a)), [_sym(x)]
    yield "eigvalsh", lambda x: torch.linalg.eigvalsh(_sym(x)) * torch.linalg.eigvalsh(_sym(x), UPLO="U"), [xb]
    tall, wide = r(5, 3, seed=17), r(2, 3, 5, seed=18)
    for name, a in (("tall", tall), ("wide", wide), ("square", x)):
        yield f"svd_{name}", lambda a: _svd_invariant(*torch.linalg.svd(a, full_matrices=False)), [a]
        yield f"svd_full_matrices_{name}", lambda a: _svd_full_invariant(*torch.linalg.svd(a)), [a]
        yield f"svd_torch_{name}", lambda a: _svd_invariant(*_with_vh(torch.svd(a))) + _svd_full_invariant(
            *_with_vh(torch.svd(a, some=False))), [a]
        yield f"svdvals_{name}", lambda a: torch.linalg.svdvals(a) + torch.svd(a, compute_uv=False).S + (
            torch.linalg.svd(a)[1] ** 2), [a]
        yield f"qr_{name}", lambda a: _qr_sum(*torch.linalg.qr(a)) + _qr_sum(*torch.linalg.qr(a, "reduced")) * 2, [a]
        if LEGACY_QR:
            yield f"qr_legacy_{name}", lambda a: _qr_sum(*a.qr()), [a]
        yield f"pinv_{name}", lambda a: torch.linalg.pinv(a) + torch.pinverse(a) * 2, [a]
    yield "svd_U_only", lambda a: torch.linalg.svd(a, full_matrices=False).U ** 2, [tall]
    yield "svd_Vh_only", lambda a: torch.linalg.svd(a, full_matrices=False).Vh ** 2, [wide]
    yield "matrix_norm_spectral", lambda a: torch.linalg.matrix_norm(a, "nuc") + torch.linalg.matrix_norm(a, 2) * 2 + (
        torch.linalg.matrix_norm(a, -2) * 3), [wide]
    yield "matrix_norm_spectral_dims", lambda a: torch.linalg.matrix_norm(a, "nuc", dim=(2, 0), keepdim=True) + (
        torch.linalg.matrix_norm(a, -2, dim=(0, -1), keepdim=True).mT), [r(4, 2, 3, seed=19)]
    yield "linalg_norm_spectral", lambda a: torch.linalg.norm(a, "nuc") + torch.linalg.norm(a, 2) + torch.linalg.norm(
        a, -2, dim=(1, 0)) + a.norm(p="nuc") + torch.norm(a[None], "nuc", dim=(1, 2), keepdim=True), [tall]
    yield "cond", lambda a: torch.linalg.cond(a) + torch.linalg.cond(a, 2) * 2 + torch.linalg.cond(a, -2), [wide]
    yield "qr_modes", lambda a, w: _qr_sum(*torch.linalg.qr(a, mode="complete")) + _qr_sum(
        *torch.linalg.qr(w, "complete")).sum(), [x, wide]
    if LEGACY_QR:
        yield "qr_legacy_some", lambda a: _qr_sum(*torch.qr(a, some=False)), [x]
    yield "qr_Q_only_wide", lambda w: torch.linalg.qr(w).Q * 2, [wide]
    yield "qr_R_only_tall", lambda a: torch.linalg.qr(a).R * 2, [tall]
    yield "pinv_hermitian", lambda x: torch.linalg.pinv(_sym(x), hermitian=True), [xb]
    yield "pinv_low_rank_tolerances", lambda b, c: torch.linalg.pinv(b @ c, atol=1e-9) + torch.linalg.pinv(
        b @ c, rtol=1e-9), [r(5, 2, seed=20), r(2, 4, seed=21)]
    # not the default driver on CPU, gelsy: its rounding varies from call to call (test_replay wants repeats exact)
    yield "lstsq", lambda a, b: torch.linalg.lstsq(a, b, driver="gels").solution, [tall, r(5, 2, seed=22)]
    yield "lstsq_vector_batched", lambda a, b: torch.linalg.lstsq(a, b, driver="gelsd")[0], [
        r(2, 5, 3, seed=23), r(2, 5, seed=24)]
    yield "matrix_exp", lambda a: torch.linalg.matrix_exp(a) + (a * 0.5).matrix_exp() + torch.matrix_exp(-a), [x]
    yield "matrix_exp_batched", lambda a: torch.linalg.matrix_exp(a), [xb]
    if MATRIX_SQRTH:
        yield "matrix_sqrth", lambda x: torch.linalg.matrix_sqrth(_pd(x)), [x]
        yield "matrix_sqrth_batched", lambda x: torch.linalg.matrix_sqrth(_pd(x)).exp(), [xb]
        yield "symmetrised_matrix_sqrth", lambda a: torch.linalg.matrix_sqrth(a) ** 2, [_pd(x)]
    if POLAR:  # unique for full column rank (no sign to make invariant); well conditioned, for float32 too
        yield "polar_square", lambda a: _flat(*torch.linalg.polar(a)), [_spd(4, seed=39)]
        yield "polar_tall_batched", lambda a: _flat(torch.linalg.polar(a).U ** 2, torch.linalg.polar(a).H.exp()), [
            r(2, 5, 3, seed=38)]
        yield "polar_U_only", lambda a: torch.linalg.polar(a).U.exp(), [tall]
        yield "polar_H_only_batched", lambda a: torch.linalg.polar(a)[1] ** 3, [_spd(3, seed=40, batch=(2,))]
    t = _spd(4, seed=25)  # its triangles are well conditioned
    yield "solve_triangular", lambda a, b: torch.linalg.solve_triangular(a, b, upper=True) + (
        torch.linalg.solve_triangular(a, b, upper=False, unitriangular=True)), [t, r(4, 3, seed=26)]
    yield "solve_triangular_right_broadcast", lambda a, b: torch.linalg.solve_triangular(
        a, b, upper=False, left=False) + torch.linalg.solve_triangular(a, b, upper=True, left=False,
                                                                      unitriangular=True), [
        _spd(3, seed=27, batch=(2,)), r(4, 3, seed=28)]
    yield "triangular_solve", lambda b, a: torch.triangular_solve(b, a).solution + torch.triangular_solve(
        b, a, upper=False, transpose=True)[0] + b.triangular_solve(a, unitriangular=True, transpose=True)[0], [
        r(4, 2, seed=29), t]
    yield "triangular_solve_coefficient", lambda b, a: torch.triangular_solve(b, a, False).cloned_coefficient.sum(
        -1, keepdim=True) * torch.triangular_solve(b, a, False).solution, [r(4, 2, seed=30), t]
    yield "lu", lambda a: _lu_sum(*torch.linalg.lu(a)), [x]
    yield "lu_factor", lambda a: torch.linalg.lu_factor(a).LU + torch.linalg.lu_factor_ex(a * 2)[0], [xb]
    yield "lu_solve_of_lu_factor", lambda a, b: torch.linalg.lu_solve(*torch.linalg.lu_factor(a), b) + (
        torch.linalg.lu_solve(*torch.linalg.lu_factor(a), b, adjoint=True)), [x, r(4, 2, seed=31)]
    for name, a in (("tall", tall), ("wide", wide)):
        yield f"lu_{name}", lambda a: _flat(*torch.linalg.lu(a)[1:]) + _flat(
            torch.linalg.lu(a).L * torch.linalg.lu(a).P.sum(-1, keepdim=True), torch.linalg.lu(a).U.exp()), [a]
        yield f"lu_factor_{name}", lambda a: torch.linalg.lu_factor(a).LU + torch.linalg.lu_factor_ex(a * 2)[0], [a]
        yield f"lu_unpack_{name}", lambda a: _flat(*torch.lu_unpack(*torch.linalg.lu_factor(a))[1:]), [a]
    yield "lu_L_or_U_only", lambda a, w: _flat(torch.linalg.lu(a).L, torch.linalg.lu(w).U, torch.lu_unpack(
        *torch.linalg.lu_factor(a)).U), [tall, wide]
    yield "householder_product", lambda a, t: torch.linalg.householder_product(a, t) + torch.orgqr(a, t).exp() + (
        a.orgqr(t[:1])), [tall, r(2, seed=32)]
    yield "householder_product_batched_square", lambda a, t: torch.linalg.householder_product(a, t), [xb, r(
        2, 3, seed=33)]
    yield "ormqr", lambda a, t, c, d: _flat(torch.ormqr(a, t, c), torch.ormqr(a, t, c, transpose=True), torch.ormqr(
        a, t, d, left=False), a.ormqr(t, d, False, True)), [r(2, 4, 3, seed=34), r(2, 3, seed=35), r(2, 4, 2, seed=36),
                                                             r(2, 2, 4, seed=37)]
    yield "torch_lu_deprecated", lambda a, b: _flat(torch.lu(a)[0], a.lu(get_infos=True)[0], torch.lu_solve(
        b, *torch.linalg.lu_factor(a)), b.lu_solve(*torch.lu(a))), [x, r(4, 2, seed=31)]
    pivots = torch.tensor([[3, 2, 3], [2, 2, 3]], dtype=torch.int32)
    yield "lu_solve_packed_right_broadcast", lambda lu, p, b: torch.linalg.lu_solve(lu, p, b, left=False) + (
        torch.linalg.lu_solve(lu, p, b, left=False, adjoint=True)), [_spd(3, seed=32, batch=(2,)), pivots,
                                                                     r(4, 3, seed=33)]


def _with_vh(usv):
    u, s, v = usv
    return u, s, v.mT


def _svd_full_invariant(u, s, vh):
    """With full_matrices=True only the first min(m, n) singular vectors are determined by A."""
    k = s.shape[-1]
    return _svd_invariant(u[..., :k], s, vh[..., :k, :])


def _lu_sum(p, lower, upper):
    return p.sum(-1, keepdim=True) * lower + upper * 2


def _qr_sum(q, r):
    """Q and R together (neither is gauge-dependent: the solver's choice is smooth in A)."""
    return q.sum(-1, keepdim=True) * r.sum(-2, keepdim=True)


def distance_cases():
    """p-norms, dist, pairwise_distance, cdist and pdist for p = 0, 1, 0.5, 1.5, 2, 3 and inf."""
    x, y = r(4, 5, seed=1), r(3, 5, seed=2)
    yield "vector_norm_p", lambda x: torch.linalg.vector_norm(x, 1) + torch.linalg.vector_norm(x, 3, dim=1).sum() + (
        torch.linalg.vector_norm(x, 0.5, dim=(0, 1), keepdim=True) + torch.linalg.vector_norm(x, -1.5, 0).sum()), [x]
    yield "vector_norm_inf", lambda x: torch.linalg.vector_norm(x, float("inf"), dim=1) + (
        torch.linalg.vector_norm(x, -float("inf"))), [distinct(4, 5, seed=1) - 0.5]
    yield "norm_p", lambda x: x.norm(p=1) + torch.norm(x, 3, dim=0).sum() + x.norm(0) + x.norm(float("inf")), [x]
    yield "linalg_norm", lambda x: torch.linalg.norm(x) + torch.linalg.norm(x, 3, dim=1).sum() + torch.linalg.norm(
        x, "fro") + torch.linalg.norm(x[0], 1) + torch.linalg.matrix_norm(x, keepdim=True).sum(), [x]
    yield "dist", lambda a, b: torch.dist(a, b) + torch.dist(a, b * 2, 1) + a.dist(b, 3), [x, r(5, seed=3)]
    yield "pairwise_distance", lambda a, b: F.pairwise_distance(a, b) + F.pairwise_distance(
        a, b, 1.5, keepdim=True).T, [
        x, r(1, 5, seed=3)]
    yield "pairwise_distance_module_p3", lambda a, b: torch.nn.PairwiseDistance(3.0, eps=0.1)(a, b), [
        x, r(4, 5, seed=4)]
    for p in (1.0, 0.5, 1.5, 2.0, 3.0):
        yield f"cdist_p{p}", lambda a, b, p=p: torch.cdist(a, b, p=p), [x, y]
        yield f"pdist_p{p}", lambda a, p=p: F.pdist(a, p=p), [x]
    yield "cdist_batched_broadcast", lambda a, b: torch.cdist(a, b), [r(2, 4, 5, seed=1), r(3, 5, seed=2)]
    ties = torch.tensor([[-1.0, 0.0, 2.0], [2.0, 0.0, 1.0], [-1.0, 1.0, 2.0]], dtype=D)  # zero coordinates of a diff
    yield "nonsmooth_distance_zero_coordinates", lambda a: torch.cdist(a, a[:2] * 1.0, 1.5) + F.pdist(a, 1.5).sum() + (
        torch.cdist(a, a.flip(0), 3).sum()), [ties]
    yield "cdist_0_inf", lambda a, b: torch.cdist(a, b, 0) + torch.cdist(a, b, float("inf")), [
        distinct(4, 5, seed=2), distinct(3, 5, seed=3) + 1]
    yield "pdist_inf", lambda a: F.pdist(a, float("inf")), [distinct(4, 5, seed=4)]
    # torch's conventions: 0 where two points coincide, and every tied coordinate of an inf-distance gets it all
    same = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 2.0, -2.0]], dtype=D)
    yield "nonsmooth_distance_coincident", lambda a: F.pdist(a) + F.pdist(a, 3) + F.pdist(a, float("inf")) + (
        torch.cdist(a, a).sum(0)) + torch.cdist(a, a, p=0.5).sum(1) + torch.cdist(a, a * 0.5, p=float("inf")).sum(1), [
        same]


def more_shape_cases():
    x = r(3, 4, 5, seed=6)
    yield "select_slice_scatter", lambda x, s, t: torch.select_scatter(x, s, 0, 1) + x.select_scatter(s * 2, 0, -1) + (
        torch.slice_scatter(x, t, 1, 0, 4, 2)) + x.slice_scatter(t, dim=-1, start=1, step=2) + torch.slice_scatter(
        x, s.expand(2, 4), end=2), [r(3, 4, seed=1), r(4, seed=2), r(3, 2, seed=3)]
    yield "masked_fill_tensor_value", lambda x, v: x.masked_fill(x > 0.5, v) + torch.masked_fill(x, x < 0, v * 2), [
        r(4, 5, seed=1), r(seed=2)]
    yield "diagonal_scatter", lambda x, s: torch.diagonal_scatter(x, s) + x.diagonal_scatter(s[:2] * 3, 1), [
        r(3, 3, seed=1), r(3, seed=2)]
    yield "put", lambda x, s: x.put(torch.tensor([0, 5, 6, 11]), s) + x.put(torch.tensor([1, 5, 1, 2]), s,
                                                                            accumulate=True) + (x * 1.0).put_(
        torch.tensor([3, 2, 1, 0]), s), [r(3, 4, seed=1), r(2, 2, seed=2)]
    # torch's convention, not the derivative: each of the source elements written to one place gets its gradient
    yield "nonsmooth_put_duplicates", lambda x, s: x.put(torch.tensor([0, 5, 5, 11]), s), [r(3, 4, seed=1),
                                                                                            r(2, 2, seed=2)]
    yield "as_strided", lambda x: x.as_strided((3, 3), (2, 1)) + torch.as_strided(x, (3, 3), (1, 3), 1) + x[
        1:].as_strided((3, 3), (1, 1)), [r(3, 4, seed=1)]
    yield "broadcast_tensors", lambda a, b: torch.broadcast_tensors(a, b)[0] * torch.broadcast_tensors(a, b)[1].exp(), [
        r(4, 1, seed=1), r(5, seed=2)]
    yield "meshgrid", lambda a, b, c: torch.meshgrid(a, b, c, indexing="ij")[0] + torch.meshgrid(
        [a, b, c], indexing="ij")[2] * 2 + torch.meshgrid(b, a, c, indexing="xy")[1].exp() + torch.meshgrid(
        b, a, c, indexing="xy")[0], [r(3, seed=1), r(4, seed=2), r(2, seed=3)]
    yield "meshgrid_two", lambda a, b: torch.meshgrid(a, b, indexing="ij")[1] + torch.meshgrid(
        b, a, indexing="xy")[0] * 3, [r(3, seed=1), r(4, seed=2)]
    yield "unsafe_split_chunk", lambda x: torch.unsafe_split(x, 2)[1] + x.unsafe_chunk(2)[0] * 2 + (
        torch.unsafe_split_with_sizes(x, [2, 2])[0]), [r(4, 3, seed=1)]
    yield "constant_pad_nd", lambda x: torch.constant_pad_nd(x, (1, 2)) + torch.constant_pad_nd(x, [0, 3], 2.0) + (
        torch.constant_pad_nd(x, (-1, 0, 1, 1))[:4, :2].sum()), [r(4, 3, seed=1)]
    yield "tile", lambda x: x.tile(2, 1) + torch.tile(x, (1, 1, 2, 1))[0], [r(2, 4, 5, seed=1)]
    yield "repeat_interleave", lambda x: x.repeat_interleave(2, dim=1).cumsum(1).sum(1) + torch.repeat_interleave(
        x, torch.tensor([1, 0, 3, 2]), dim=-2).cumsum(1).sum(1), [r(3, 4, 2, seed=1)]
    yield "repeat_interleave_flat", lambda x: torch.repeat_interleave(x, 3) * torch.arange(60, dtype=D), [
        r(4, 5, seed=2)]
    yield "take_along_dim", lambda x: torch.take_along_dim(x, torch.tensor([[0, 2, 2], [1, 0, 3]]), 1), [
        r(2, 4, seed=1)]
    yield "take_along_dim_broadcast_flat", lambda x: torch.take_along_dim(x, torch.tensor([[1]]), dim=-1) + (
        x.take_along_dim(torch.tensor([5, 5, 0]))), [r(3, 2, seed=2)]
    yield "take", lambda x: torch.take(x, torch.tensor([[0, 5], [5, 19]])), [r(4, 5, seed=3)]
    yield "unfold", lambda x: x.unfold(2, 3, 1) + x.unfold(-1, 2, 2)[..., :1, :1], [x]
    yield "rot90_flips", lambda x: x.rot90() + x.rot90(-1, (1, 2)) * 2 + x.rot90(2, [0, 2]) + x.fliplr() + x.flipud(), [
        r(3, 3, 3, seed=2)]
    yield "narrow_copy", lambda x: x.narrow_copy(1, 1, 2) * 2, [x]
    yield "atleast", lambda x: torch.atleast_2d(x) + torch.atleast_3d(x).sum() + torch.atleast_1d(x), [r(seed=1)]
    yield "stacks", lambda a, b: torch.hstack([a, b]).sum(1) + torch.vstack((a, b)).sum(0).sum() + torch.dstack(
        [a, b]).sum(2).sum(1) + torch.column_stack([a, b]).sum(1) + torch.row_stack([a, b]).sum(), [
        r(3, 2, seed=1), r(3, 2, seed=2)]
    yield "stacks_1d", lambda a, b: torch.hstack([a, b]) + torch.vstack([a, b]).sum(0).repeat(2) + torch.column_stack(
        (a, b, a)).sum(1).repeat(2) + torch.dstack([a, b]).flatten(), [r(3, seed=1), r(3, seed=2)]
    yield "tensor_split", lambda x: x.tensor_split(3, dim=2)[1] + torch.tensor_split(x, [1, 3], 1)[2][..., :2], [x]
    yield "hsplit_vsplit_dsplit", lambda x: torch.hsplit(x, 2)[1].sum() + x.vsplit([1])[1].sum() + torch.dsplit(
        x, [2, 4])[2].sum(), [x]
    yield "index_fill", lambda x, v: x.index_fill(1, torch.tensor([0, 2]), -1.0) + x.index_fill(0, torch.tensor([1]),
                                                                                                v), [r(3, 4, seed=1),
                                                                                                     r(seed=2)]
    yield "index_copy", lambda x, s: x.index_copy(1, torch.tensor([3, 0]), s), [r(3, 4, seed=1), r(3, 2, seed=2)]
    yield "masked_scatter", lambda x, s: x.masked_scatter(torch.tensor([True, False, True, True]), s), [
        r(3, 4, seed=1), r(4, 4, seed=2)]
    yield "pad_modes", lambda x: F.pad(x, (2, 1), mode="reflect") + F.pad(x, (1, 2), mode="replicate") + F.pad(
        x, (3, 0), mode="circular"), [r(2, 3, 5, seed=1)]
    yield "pad_modes_2d", lambda x: F.pad(x, (1, 1, 2, 0), mode="reflect") + F.pad(x, (0, 2, 1, 1), "replicate") + (
        F.pad(x, (1, 1, 1, 1), mode="circular")), [r(1, 2, 3, 4, seed=2)]


def image_cases():
    """1-d and 3-d pooling, adaptive max pooling, im2col and col2im, the pixel and channel shuffles."""
    seq, img, vol = r(2, 3, 8, seed=1), distinct(2, 3, 6, 5, seed=2), r(1, 2, 4, 4, 6, seed=3)
    yield "max_pool1d", lambda x: F.max_pool1d(x, 3, stride=2, padding=1), [distinct(2, 3, 8, seed=1)]
    yield "max_pool1d_dilated_ceil", lambda x: F.max_pool1d(x, 2, dilation=2, ceil_mode=True), [distinct(2, 3, 9)]
    yield "avg_pool1d", lambda x: F.avg_pool1d(x, 3, 2, 1) + F.avg_pool1d(x, 3, 2, 1, count_include_pad=False), [seq]
    yield "adaptive_avg_pool1d", lambda x: F.adaptive_avg_pool1d(x, 3), [seq]
    yield "adaptive_max_pool", lambda x: F.adaptive_max_pool2d(x, (2, 3)) + F.adaptive_max_pool2d(x, 1), [img]
    yield "adaptive_max_pool1d", lambda x: F.adaptive_max_pool1d(x, 3), [distinct(2, 3, 8, seed=4)]
    yield "max_pool3d", lambda x: F.max_pool3d(x, 2) + F.max_pool3d(x, (2, 2, 3), stride=(2, 2, 3)).sum(), [
        distinct(1, 2, 4, 4, 6, seed=5)]
    yield "max_pool1d_indices", lambda x: F.max_pool1d(x, 3, stride=2, padding=1, return_indices=True)[0], [
        distinct(2, 3, 8, seed=6)]
    yield "max_pool2d_indices", lambda x: F.max_pool2d(x, 3, 2, 1, return_indices=True)[0] + torch.nn.MaxPool2d(
        2, return_indices=True, ceil_mode=True)(x)[0][..., :3, :3].sum(), [distinct(2, 3, 6, 5, seed=7)]
    yield "max_pool3d_indices", lambda x: F.max_pool3d(x, (2, 2, 3), dilation=(1, 2, 1), return_indices=True)[0], [
        distinct(1, 2, 4, 5, 6, seed=8)]
    yield "adaptive_max_pool_indices", lambda x: F.adaptive_max_pool2d(x, (2, 3), return_indices=True)[0].sum(
        -1, keepdim=True) + F.adaptive_max_pool1d(x.flatten(-2), 4, return_indices=True)[0].sum(-1)[..., None, None], [
        img]
    yield "max_unpool1d", lambda x, v: F.max_unpool1d(v, F.max_pool1d(x, 2, return_indices=True)[1], 2) + (
        F.max_unpool1d(*F.max_pool1d(x, 2, return_indices=True), 2, output_size=[9]).sum()), [
        distinct(2, 3, 9, seed=9), r(2, 3, 4, seed=10)]
    yield "max_unpool2d", lambda x, v: torch.nn.MaxUnpool2d(2)(
        v, F.max_pool2d(x, 2, return_indices=True)[1], (6, 5)) + (
        F.max_unpool2d(*F.max_pool2d(x, 3, 3, 1, return_indices=True), 3, 3, 1, output_size=(6, 5))), [
        distinct(2, 3, 6, 5, seed=11), r(2, 3, 3, 2, seed=12)]
    yield "max_unpool3d_unbatched", lambda x: F.max_unpool3d(*F.max_pool3d(x, 2, return_indices=True), 2), [
        distinct(2, 4, 4, 4, seed=13)]
    yield "avg_pool3d", lambda x: F.avg_pool3d(x, 2, padding=1) + F.avg_pool3d(x, 2, divisor_override=3).sum(), [vol]
    yield "adaptive_avg_pool3d", lambda x: F.adaptive_avg_pool3d(x, (2, 3, 4)), [vol]
    yield "unfold_im2col", lambda x: F.unfold(x, 3, padding=1, stride=2) + F.unfold(x, (2, 3), dilation=(2, 1)).sum(), [
        r(2, 3, 6, 5, seed=4)]
    yield "fold_col2im", lambda x: F.fold(x, (4, 5), 2) + F.fold(x, (5, 7), (2, 2), padding=1, stride=2)[..., :4, :5], [
        r(2, 12, 12, seed=5)]
    yield "fold_unfold_modules", lambda x: torch.nn.Fold((3, 3), 2)(torch.nn.Unfold(2)(x)), [r(1, 2, 3, 3, seed=6)]
    yield "pixel_shuffle", lambda x: F.pixel_shuffle(x, 2) + torch.nn.PixelShuffle(2)(x * 2), [r(2, 8, 3, 2, seed=7)]
    yield "pixel_unshuffle", lambda x: F.pixel_unshuffle(x, 2), [r(2, 3, 4, 6, seed=8)]
    yield "channel_shuffle", lambda x: F.channel_shuffle(x, 3) * torch.arange(6, dtype=D).view(6, 1, 1), [
        r(2, 6, 2, 2, seed=9)]
    yield "interpolate_area", lambda x, y, z: F.interpolate(x, size=3, mode="area") + F.interpolate(
        y, scale_factor=0.5, mode="area").sum(-1) + F.interpolate(z, size=(3, 2, 1), mode="area").sum((-2, -1)), [
        r(1, 2, 7, seed=1), r(1, 2, 6, 4, seed=2), r(1, 2, 3, 4, 5, seed=3)]
    yield "adaptive_max_pool3d", lambda x: F.adaptive_max_pool3d(x, 2) + F.adaptive_max_pool3d(
        x, (2, 2, 2), return_indices=True)[0] + torch.nn.AdaptiveMaxPool3d((2, 1, 2))(x), [distinct(1, 2, 4, 4, 4)]
    # (the samples given: the regions are fixed, as the recorder fixes them when it draws them; see test_engine)
    gen = torch.Generator().manual_seed(11)
    samples2, samples3 = torch.rand(1, 2, 2, dtype=D, generator=gen), torch.rand(1, 1, 3, dtype=D, generator=gen)
    yield "fractional_max_pool", lambda x, z: F.fractional_max_pool2d(x, 2, output_size=4, _random_samples=samples2) + (
        F.fractional_max_pool2d(x, (2, 3), output_size=(4, 4), return_indices=True, _random_samples=samples2)[0]) + (
        F.fractional_max_pool3d(z, 2, output_size=(2, 2, 2), _random_samples=samples3) * F.fractional_max_pool3d(
            z, 2, output_size=2, return_indices=True, _random_samples=samples3)[0]).sum(), [
        distinct(1, 2, 7, 7), distinct(1, 1, 4, 5, 5, seed=1)]
    yield "lp_pool", lambda x, y, z: F.lp_pool1d(x, 2, 3) + F.lp_pool1d(x.abs() + 0.1, 3.0, 3, stride=3) + (
        F.lp_pool2d(y, 2, 2).sum((-2, -1))[..., None] + torch.nn.LPPool2d(1.5, 2, stride=1, ceil_mode=True)(
            y.abs()).sum((-2, -1))[..., None]) + F.lp_pool3d(z, 2, 2).sum((-3, -2, -1))[..., None], [
        r(2, 3, 9, seed=1), r(2, 3, 4, 6, seed=2), r(2, 3, 4, 4, 2, seed=3)]
    yield "local_response_norm", lambda x, y, z: F.local_response_norm(x, 3) + torch.nn.LocalResponseNorm(
        2, alpha=0.1, beta=0.5, k=2.0)(x) + F.local_response_norm(y, 4, alpha=0.3).sum(-1) + F.local_response_norm(
        z, 2, alpha=0.3).sum((-2, -1)), [r(2, 5, 4, seed=4), r(2, 5, 4, 2, seed=5), r(2, 5, 4, 2, 2, seed=6)]
    bags, starts = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]), torch.tensor([0, 2, 2, 5])  # (the second bag is empty)
    yield "embedding_bag", lambda w: F.embedding_bag(bags, w, starts) + F.embedding_bag(
        bags.view(4, 2), w, mode="sum") + F.embedding_bag(bags, w, starts, mode="max") * 2, [distinct(10, 3)]
    yield "embedding_bag_padding_last_offset", lambda w: F.embedding_bag(bags, w, starts, padding_idx=4) + (
        F.embedding_bag(bags, w, torch.tensor([0, 3, 8]), mode="max", padding_idx=-1, include_last_offset=True).sum()
    ), [distinct(10, 3)]
    # (scale_grad_by_freq: torch's heuristic, not the derivative: no finite differences)
    yield "embedding_bag_scale_grad_by_freq", lambda w: F.embedding_bag(bags.view(2, 4), w, mode="sum",
                                                                        scale_grad_by_freq=True), [distinct(10, 3)]
    yield "embedding_bag_per_sample_weights", lambda w, p: F.embedding_bag(
        bags, w, starts, mode="sum", per_sample_weights=p) + F.embedding_bag(
        bags.view(2, 4), w, mode="sum", per_sample_weights=p.view(2, 4))[[0, 1, 1, 0]], [r(10, 3, seed=1), r(8, seed=2)]


def product_cases():
    """kron, cov and corrcoef (with their weights), block_diag, cartesian_prod, combinations, linalg.vander."""
    x = r(3, 6, seed=1)
    counts = torch.tensor([1, 2, 1, 3, 1, 2])
    yield "kron", lambda a, b: torch.kron(a, b) + a.kron(b * 2), [r(2, 3, seed=1), r(3, 2, seed=2)]
    yield "kron_mixed_dims", lambda a, b: torch.kron(a, b).sum(0) + torch.kron(b, a).sum(0) * 2, [
        r(2, seed=1), r(2, 3, 2, seed=2)]
    yield "kron_0d", lambda a, b: torch.kron(a, b), [r(seed=1), r(3, seed=2)]
    yield "cov", lambda a: torch.cov(a) + a.cov(correction=0), [x]
    yield "cov_weights", lambda a, w, n: torch.cov(a, fweights=n, aweights=w) + torch.cov(
        a, correction=0, aweights=w) + a.cov(fweights=n, correction=2), [x, r(6, seed=2, positive=True), counts]
    yield "cov_1d_aweights", lambda a, w: torch.cov(a, correction=2, aweights=w), [r(6, seed=3),
                                                                                  r(6, seed=4, positive=True)]
    yield "corrcoef", lambda a: torch.corrcoef(a) + a.corrcoef().exp(), [x]
    yield "corrcoef_one_variable", lambda a: torch.corrcoef(a) * a.sum(), [r(5, seed=5)]
    yield "block_diag", lambda a, b, c: torch.block_diag(a, b, c), [r(2, 3, seed=1), r(3, seed=2), r(seed=3)]
    yield "cartesian_prod", lambda a, b, c: torch.cartesian_prod(a, b, c) + torch.cartesian_prod(a).sum(), [
        r(2, seed=1), r(3, seed=2), r(2, seed=3)]
    yield "combinations", lambda a: torch.combinations(a).sum(1).repeat(2) + torch.combinations(
        a, 3, with_replacement=True)[:12].prod(1), [r(4, seed=1)]
    yield "linalg_vander", lambda a: torch.linalg.vander(a) + torch.linalg.vander(a, N=6)[..., 2:].sum(-1, True), [
        r(2, 4, seed=1)]


def more_loss_cases():
    """The margin, ranking, embedding, Poisson, Gaussian and multi-label losses at each reduction."""
    x, y = r(4, 5, seed=1), r(4, 5, seed=2)
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=D)
    classes = torch.tensor([0, 4, 2, 2])
    yield "linear_cross_entropy", lambda x, w, b: F.linear_cross_entropy(x, w, classes, linear_bias=b) + (
        F.linear_cross_entropy(x[0], w, classes[0], reduction="sum")) + F.linear_cross_entropy(
        x, w, classes, reduction="none", weight=torch.arange(1.0, 6.0, dtype=x.dtype), ignore_index=2,
        label_smoothing=0.1).sum(), [r(4, 3, seed=3), r(5, 3, seed=4), r(5, seed=5)]
    yield "linear_cross_entropy_k_dim_probs", lambda x, w, b, p: F.linear_cross_entropy(
        x, w, torch.tensor([[0, 1], [3, 2], [1, 1], [2, 0]]), linear_bias=b) + F.linear_cross_entropy(
        x, w[:, 0], p.softmax(-1)), [r(4, 3, seed=3), r(5, 2, 3, seed=4), r(5, 2, seed=5), r(4, 5, seed=6)]
    for red in ("mean", "sum", "none"):
        yield f"multi_margin_{red}", lambda a, red=red: F.multi_margin_loss(a, classes, reduction=red), [x]
        yield f"soft_margin_{red}", lambda a, red=red: F.soft_margin_loss(a, y, reduction=red), [x]  # (y: no grad)
        yield f"hinge_embedding_{red}", lambda a, red=red: F.hinge_embedding_loss(a, (y > 0) * 2.0 - 1, 0.5,
                                                                                  reduction=red), [x]
        yield f"margin_ranking_{red}", lambda a, b, t, red=red: F.margin_ranking_loss(a, b, t, 0.2, reduction=red), [
            x, y, y.sign()]
        yield f"cosine_embedding_{red}", lambda a, b, red=red: F.cosine_embedding_loss(a, b, sign, 0.1,
                                                                                       reduction=red), [x, y]
        yield f"poisson_nll_{red}", lambda a, t, red=red: F.poisson_nll_loss(a, t, reduction=red), [x, y.abs() * 3]
        yield f"gaussian_nll_{red}", lambda a, t, v, red=red: F.gaussian_nll_loss(a, t, v, reduction=red), [
            x, y, r(4, 5, seed=3, positive=True)]
        yield f"multilabel_soft_margin_{red}", lambda a, t, red=red: F.multilabel_soft_margin_loss(
            a, t, reduction=red), [
            x, y.sigmoid()]
        yield f"triplet_margin_{red}", lambda a, p, n, red=red: F.triplet_margin_loss(a, p, n, reduction=red), [
            x, y, r(4, 5, seed=3)]
    yield "multi_margin_p2_weight", lambda a: F.multi_margin_loss(a, classes, p=2, margin=0.5, weight=torch.arange(
        1.0, 6.0, dtype=D)), [x]
    yield "multilabel_margin", lambda a: F.multilabel_margin_loss(a, torch.tensor([[3, 0, -1, 1, 1]] * 4)) + (
        F.multilabel_margin_loss(a, torch.tensor([[1, 2, 4, -1, 0]] * 4), reduction="sum")), [x]
    yield "poisson_nll_full_not_log", lambda a, t: F.poisson_nll_loss(a, t, log_input=False, full=True, eps=1e-3), [
        x.abs() + 0.2, y.abs() * 3]
    yield "poisson_nll_full_log_broadcast", lambda a, t: F.poisson_nll_loss(a, t, full=True), [r(4, 1, seed=5),
                                                                                              y.abs() * 3]
    yield "gaussian_nll_homoscedastic_full", lambda a, t, v: F.gaussian_nll_loss(a, t, v, full=True), [
        x, y, r(4, seed=4, positive=True)]
    yield "gaussian_nll_var_broadcast_float", lambda a, t, v: F.gaussian_nll_loss(a, t, v) + F.gaussian_nll_loss(
        a, t, 0.5, reduction="sum"), [x, y, r(4, 1, seed=4, positive=True)]
    yield "gaussian_nll_nonsmooth_clamped_var", lambda a, t, v: F.gaussian_nll_loss(a, t, v, eps=0.6), [
        x, y, r(4, 5, seed=5, positive=True)]
    yield "multilabel_soft_margin_weight", lambda a, t, w: F.multilabel_soft_margin_loss(a, t, w), [
        x, y.sigmoid(), r(5, seed=6, positive=True)]
    yield "cosine_embedding_1d", lambda a, b: F.cosine_embedding_loss(a, b, torch.tensor(-1.0, dtype=D)), [
        r(5, seed=1), r(5, seed=2)]
    yield "triplet_margin_swap_p1", lambda a, p, n: F.triplet_margin_loss(a, p, n, margin=2.0, p=1, swap=True), [
        x, y, r(4, 5, seed=3)]
    yield "triplet_margin_swap_module", lambda a, p, n: torch.nn.TripletMarginLoss(margin=3.0, swap=True)(a, p, n), [
        x, r(4, 5, seed=2), r(4, 5, seed=3) * 0.2]
    yield "margin_ranking_module_broadcast", lambda a, b: torch.nn.MarginRankingLoss(0.5)(
        a, b, torch.ones(4, 5, dtype=D)), [r(4, 1, seed=1), r(1, 5, seed=2)]


def ctc_cases():
    """F.ctc_loss on log_softmax outputs (torch's gradient is for those): padded and concatenated targets,
    each reduction, another blank, an impossible alignment with zero_infinity, unbatched, the module."""
    logits = r(6, 3, 5, seed=1)
    padded, concatenated = torch.tensor([[1, 2, 0, 0], [3, 3, 1, 4], [2, 0, 0, 0]]), torch.tensor([1, 2, 3, 3, 1, 4, 2])
    frames, lengths = torch.tensor([6, 5, 6]), torch.tensor([2, 4, 1])
    for red in ("mean", "sum", "none"):
        yield f"ctc_loss_{red}", lambda x, t, i, n, red=red: F.ctc_loss(x.log_softmax(2), t, i, n, reduction=red), [
            logits, padded, frames, lengths]
    yield "ctc_loss_concatenated_blank", lambda x, t: F.ctc_loss(x.log_softmax(-1), t, (6, 5, 6), (2, 4, 1),
                                                                   blank=4 - 4, reduction="sum") + F.ctc_loss(
        x.log_softmax(-1), t.clamp_max(3), [6, 6, 6], [2, 4, 1], blank=4), [logits, concatenated]
    repeated = torch.tensor([[1, 1, 1, 0], [3, 3, 1, 4], [2, 0, 0, 0]])  # 1 1 1 needs 5 frames: it gets 4
    yield "ctc_loss_zero_infinity", lambda x, t, i, n: F.ctc_loss(x.log_softmax(2), t, i, n, zero_infinity=True,
                                                                  reduction="none") + torch.nn.CTCLoss(
        zero_infinity=True)(x.log_softmax(2), t, i, n), [logits, repeated, torch.tensor([4, 6, 6]), torch.tensor(
            [3, 4, 1])]
    yield "ctc_loss_unbatched", lambda x, t: F.ctc_loss(x.log_softmax(1), t, torch.tensor(6), torch.tensor(3)), [
        r(6, 5, seed=2), torch.tensor([2, 2, 4])]
    yield "ctc_loss_empty_target_mean", lambda x: F.ctc_loss(x.log_softmax(2), torch.tensor([[1, 0], [0, 0], [2, 3]]),
                                                             [6, 6, 6], [1, 0, 2]), [logits]


def _mha(q, k, v, w_in, b_in, w_out, b_out, *, bias_k=None, bias_v=None, add_zero_attn=False, **kwargs):
    """F.multi_head_attention_forward with 2 heads, no dropout; the output and the weights (if any) as one tensor."""
    out, weights = F.multi_head_attention_forward(q, k, v, q.shape[-1], 2, w_in, b_in, bias_k, bias_v, add_zero_attn,
                                                  0.0, w_out, b_out, **kwargs)
    return out if weights is None else torch.cat([out.flatten(), weights.flatten()])


_MHA_MODULE = _affine(torch.nn.MultiheadAttention(4, 2, bias=False, kdim=3, vdim=5, batch_first=True))
_ENCODER_LAYER = _affine(torch.nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, norm_first=True))


def attention_cases():
    """Multi-head attention, recorded as its parts: each in-projection, mask, head layout and path of torch's."""
    x, memory = r(3, 2, 4, seed=1), r(5, 2, 4, seed=2)
    weights = [r(12, 4, seed=3), r(12, seed=4), r(4, 4, seed=5), r(4, seed=6)]
    hidden = torch.tensor([[False, True, False], [False, False, True], [True, False, False]])  # True: masked out
    padding = torch.tensor([[False, False, True], [False, False, False]])
    causal = torch.nn.Transformer.generate_square_subsequent_mask(3, dtype=D)
    yield "mha_self", lambda x, *w: _mha(x, x, x, *w), [x, *weights]
    yield "mha_self_masks_no_weights", lambda x, *w: _mha(x, x, x, *w, attn_mask=hidden, key_padding_mask=padding,
                                                          need_weights=False), [x, *weights]
    yield "mha_encoder_decoder_float_mask_per_head", lambda x, m, mask, *w: _mha(
        x, m, m, *w, attn_mask=mask, average_attn_weights=False), [x, memory, r(3, 5, seed=7), *weights]
    yield "mha_unbatched_padding", lambda q, k, v, *w: _mha(q, k, v, *w, key_padding_mask=torch.tensor(
        [False, True, False, False, True])), [r(3, 4, seed=23), r(5, 4, seed=24), r(5, 4, seed=8), *weights]
    yield "mha_separate_weights_3d_mask", lambda q, k, v, wq, wk, wv, b, mask, wo, bo: _mha(
        q, k, v, None, b, wo, bo, use_separate_proj_weight=True, q_proj_weight=wq, k_proj_weight=wk,
        v_proj_weight=wv, attn_mask=mask, need_weights=False), [
        x, r(5, 2, 3, seed=9), r(5, 2, 5, seed=10), r(4, 4, seed=11), r(4, 3, seed=12), r(4, 5, seed=13),
        r(12, seed=14), r(4, 3, 5, seed=15), r(4, 4, seed=16), r(4, seed=17)]
    for need in (True, False):
        yield f"mha_bias_kv_zero_attn{'' if need else '_no_weights'}", lambda x, bk, bv, *w, need=need: _mha(
            x, x, x, *w, bias_k=bk, bias_v=bv, add_zero_attn=True, attn_mask=hidden, key_padding_mask=padding,
            need_weights=need), [x, r(1, 1, 4, seed=18), r(1, 1, 4, seed=19), *weights]
        yield f"mha_causal{'' if need else '_no_weights'}", lambda x, *w, need=need: _mha(
            x, x, x, *w, attn_mask=causal, is_causal=True, need_weights=need), [x, *weights]
    yield "mha_module_kdim_vdim", lambda q, k, v: _MHA_MODULE(q, k, v)[0] + _MHA_MODULE(q, k, v)[1].sum(), [
        r(2, 3, 4, seed=20), r(2, 5, 3, seed=21), r(2, 5, 5, seed=22)]
    yield "transformer_encoder_layer", lambda x: _ENCODER_LAYER(x, src_key_padding_mask=padding), [x]


def _with_weight(fn, w):
    return lambda x, y: fn(x, y, w)


def _linear_module(x):
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2).double()
    return layer(x)


def _apart(*shape, seed=0, low=0.3):
    """Random values at least ``low`` away from 0 and from each other's negatives (kinks stay far away)."""
    x = r(*shape, seed=seed)
    return x + low * x.sign() + (x == 0) * low


# Smooth instances of ops whose other cases sit on ties or kinks, and of every remaining rule:
# these also run under finite differences (``FD_SETTINGS``: a coarser step where rounding is the point).
SMOOTH = {
    "maximum": (lambda a, b: torch.maximum(a, b), [r(4, 5, seed=1), r(4, 5, seed=2) + 0.05]),
    "minimum_bcast": (lambda a, b: torch.minimum(a, b), [r(4, 5, seed=1), r(5, seed=3) + 0.05]),
    "max_binary": (lambda a, b: torch.max(a, b) * torch.min(a, b), [r(4, 5, seed=1), r(4, 5, seed=2) + 0.05]),
    "where": (lambda a, b: torch.where(torch.arange(5) % 2 == 0, a, b), [r(4, 5, seed=1), r(4, 5, seed=2)]),
    "where_method": (lambda a, b: a.where(torch.arange(5) % 2 == 0, b), [r(4, 5, seed=1), r(4, 5, seed=2)]),
    "fmax_fmin": (lambda a, b: torch.fmax(a, b) * torch.fmin(a, b), [r(4, 5, seed=1), r(5, seed=2) + 0.05]),
    "max_pool2d": (lambda x: F.max_pool2d(x, 2), [distinct(1, 2, 4, 4)]),
    "l1_loss": (lambda x, t: F.l1_loss(x, t), [r(3, 4, seed=1), r(3, 4, seed=2) + 0.01]),
    "rsub": (lambda a, b: torch.rsub(a, b, alpha=2), [r(3, 4, seed=1), r(4, seed=2)]),
    "T": (lambda x: x.T * x.T.exp(), [r(3, 4, seed=1)]),
    "adjoint": (lambda x: x.adjoint().tanh(), [r(2, 3, 4, seed=1)]),
    "copy": (lambda x, s: _copied(x, s), [r(3, 4, seed=1), r(4, seed=2)]),
    "setitem": (lambda x, v: _assigned(x, v), [r(3, 4, seed=1), r(4, seed=2)]),
    "index_add": (lambda x, s: x.index_add(0, torch.tensor([0, 2, 0]), s, alpha=2.0), [r(3, 4, seed=1),
                                                                                       r(3, 4, seed=2)]),
    "scatter": (lambda x, s: x.scatter(1, torch.tensor([[2, 0], [1, 3]]), s), [r(2, 4, seed=1), r(2, 2, seed=2)]),
    "masked_select": (lambda x: x.masked_select(torch.tensor([True, False, True])), [r(4, 3, seed=1)]),
    "log10": (lambda x: torch.log10(x), [r(3, 4, seed=1, positive=True)]),
    "steps": (lambda x: x.trunc() + x.round() + x.ceil() + x.sgn() + x * x, [_apart(3, 4, seed=1) + 0.25]),
    "clamp_max": (lambda x: x.clamp_max(0.2) + x.clamp(max=torch.tensor(0.4, dtype=D)), [_apart(3, 4, seed=1)]),
    "vector_norm": (lambda x: torch.linalg.vector_norm(x, dim=1, keepdim=True) * x, [r(3, 4, seed=1)]),
    "unflatten_ravel": (lambda x: x.unflatten(1, (2, 2)).exp().ravel(), [r(3, 4, seed=1)]),
    "view_as_reshape_as": (lambda x, t: x.view_as(t).sin() + x.reshape_as(t).cos(), [r(3, 4, seed=1),
                                                                                      r(2, 6, seed=2)]),
    "broadcast_to": (lambda x: torch.broadcast_to(x, (3, 2, 4)).tanh(), [r(2, 1, seed=1)]),
    "amin_min": (lambda x: x.amin(1) + x.min(0).values.sum() + x.min(), [distinct(4, 5, seed=3)]),
    "casts_float": (lambda x: x.float().double() * x.to(torch.float32).to(D) + x.type(torch.float32).type_as(x),
                    [r(3, 4, seed=1)]),
    "casts_half": (lambda x: x.half().double() + x.bfloat16().to(D), [r(3, 4, seed=1)]),
    "fill": (lambda x, v: _filled(x, v), [r(3, 4, seed=1), r(seed=2)]),
    "as_tensor": (lambda x: torch.as_tensor(x, dtype=torch.float32).double() * x + torch.as_tensor(x).exp()
                  + torch.as_tensor([1.0, 2.0, 3.0, 4.0], dtype=D), [r(3, 4, seed=1)]),
}
FD_SETTINGS = {  # name: (eps, rtol, atol): 16-bit and 32-bit rounding make the function a staircase
    "smooth-casts_float": (1e-3, 1e-3, 1e-4),
    "smooth-casts_half": (0.25, 6e-2, 6e-2),
    "smooth-as_tensor": (1e-3, 1e-3, 1e-4),
}


def _copied(x, s):
    y = x * 2
    y.copy_(s)
    return y * x


def _filled(x, v):
    y = x * 2
    y.fill_(v)
    return y * x + torch.fill(x, v * 3)


def _assigned(x, v):
    y = x * 1.0
    y[1] = v
    y[:, 0] = v.sum()
    return y.exp()


def all_cases():
    for name, (fn, inputs) in SMOOTH.items():
        yield f"smooth-{name}", fn, inputs
    yield from unary_cases()
    yield from binary_cases()
    for name, fn in REDUCTIONS.items():
        yield f"reduce-{name}", fn, [r(3, 4, 5, seed=5)] if "tuple" in name else [r(4, 5, seed=5)]
    for name, fn in SELECTIONS.items():
        yield f"select-{name}", fn, [distinct(4, 5)]
    for name, fn in {**TIED, **TIED_NEW}.items():
        yield f"tied-{name}", fn, [torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], dtype=D)]
    for name, fn in SHAPE_OPS.items():
        yield f"shape-{name}", fn, [r(3, 4, 5, seed=6)]
    for name, fn in INDEXING.items():
        yield f"index-{name}", fn, [r(4, 5, seed=7), torch.tensor([2, 0, 3])]
    for name, (sa, sb) in MATMUL.items():
        yield f"matmul-{name}", (lambda a, b: a @ b), [r(*sa, seed=1), r(*sb, seed=2)]
    yield "matmul-function", (lambda a, b: torch.matmul(a, b)), [r(4, 3, seed=1), r(3, 2, seed=2)]
    yield "matmul-mm", (lambda a, b: torch.mm(a, b)), [r(4, 3, seed=1), r(3, 2, seed=2)]
    yield "matmul-bmm", (lambda a, b: torch.bmm(a, b)), [r(2, 4, 3, seed=1), r(2, 3, 2, seed=2)]
    yield "matmul-transposed", (lambda a, b: a.T @ b.T), [r(3, 4, seed=1), r(2, 3, seed=2)]
    for name, fn, inputs in nn_cases():
        yield f"nn-{name}", fn, inputs


CASES = list(all_cases())
