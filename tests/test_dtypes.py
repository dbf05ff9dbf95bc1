"""float32 and float64, int index tensors, 0-d tensors and empty dims behave as torch does.

Every program runs under tensorgraph's engine and under torch autograd on fresh leaves;
the gradients must agree in shape, dtype and value (float32 within float32 tolerances).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_matches_torch, engine_grads, torch_grads
from op_cases import CASES

import tensorgraph as tg

D = torch.float64


def _as_float32(inputs):
    return [x.float() if isinstance(x, torch.Tensor) and x.dtype == D else x for x in inputs]


# float32 rounding differs between a formula and torch's fused kernel: ties and kinks can flip
_F32_SKIP = ("tied-", "float_roundtrip")


@pytest.mark.parametrize("fn, inputs", [pytest.param(fn, inputs, id=name) for name, fn, inputs in CASES
                                        if not name.startswith(_F32_SKIP)])
def test_every_op_case_in_float32(fn, inputs):
    """The whole op table again with float32 leaves: float32 gradients, close to torch's."""
    inputs = _as_float32(inputs)
    try:
        fn(*inputs)
    except (RuntimeError, ValueError) as err:  # float64 constants (class weights, a module) torch won't mix
        pytest.skip(f"torch itself refuses this case with float32 inputs: {err}")
    assert_matches_torch(fn, inputs, rtol=1e-4, atol=1e-4)


def test_mixed_float32_and_float64_promote_as_torch_does():
    a = torch.randn(3, 4, dtype=torch.float32)
    b = torch.randn(4, dtype=D)
    c = torch.randn((), dtype=D)  # a 0-d float64 does not promote a float32 tensor
    assert_matches_torch(lambda a, b, c: (a * b).sum(0) + (a * c).exp().mean(), [a, b, c], rtol=1e-5, atol=1e-6)
    with tg.record() as graph:
        loss = ((a * c).sum() + (a * b).sum())
    grads = graph.backward(loss)
    assert grads[a].dtype == torch.float32 and grads[b].dtype == D and grads[c].dtype == D
    assert graph.node("loss")["dtype"] == D


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_int_index_tensors(index_dtype):
    x = torch.randn(5, 4, dtype=D)
    idx = torch.tensor([4, 0, 0, 2], dtype=index_dtype)
    cases = [
        lambda x: x[idx],
        lambda x: x[idx[:2]][:, idx[1:3]] * x[idx[:2], 1:3],
        lambda x: x.index_select(1, idx[1:]),
        lambda x: F.embedding(idx.view(2, 2), x),
        lambda x: x.index_add(0, idx, torch.ones(4, 4, dtype=D) * x[0]),
        lambda x: x.index_put((idx[1:3],), x[0], accumulate=True),
    ]
    if index_dtype == torch.int64:  # torch requires int64 here
        cases += [lambda x: x.gather(0, idx.view(1, 4).long().clamp(max=4)),
                  lambda x: torch.zeros(3, 4, dtype=D).scatter_add(0, idx.long().view(1, 4) % 3, x[:1])]
    for fn in cases:
        assert_matches_torch(fn, [x])
    with tg.record() as graph:
        out = x[idx].sum()
    assert graph.node(idx)["dtype"] == index_dtype and idx not in graph.backward(out)


ZERO_D = {
    "exp_sum": lambda s, v: s.exp() + v.sum() * s,
    "broadcast": lambda s, v: (s * v + s / (v.abs() + 1)).sum(),
    "reductions": lambda s, v: s.sum() + s.mean() + s.max() + s.amax() + s.logsumexp(0) + s.norm(),
    "softmax": lambda s, v: F.softmax(s, dim=0) * F.log_softmax(s, 0),
    "stack_cat": lambda s, v: torch.cat([s.unsqueeze(0), v, s[None]]).pow(2).sum(),
    "index_view": lambda s, v: s[None, ..., None].expand(2, 3).sum() + s.reshape(1, 1).squeeze() + s.view(-1)[0],
    "where_clamp": lambda s, v: torch.where(v > 0, s, -s).sum() + s.clamp(-0.1, 0.1) + torch.maximum(s, v).sum(),
    "pow_tensor": lambda s, v: (v.abs() + 0.5).pow(s).sum() + s ** 2,
    "matmul_dot": lambda s, v: (v @ v) * s + torch.dot(v, v * s),
}


@pytest.mark.parametrize("name", sorted(ZERO_D))
def test_zero_dim_tensors(name):
    s = torch.tensor(0.7, dtype=D)
    v = torch.randn(3, dtype=D)
    assert_matches_torch(ZERO_D[name], [s, v])
    with tg.record() as graph:
        loss = ZERO_D[name](s, v)
    assert graph.backward(loss if loss.dim() == 0 else loss.sum())[s].shape == ()


EMPTY = {
    "sum_exp": lambda e, x: e.exp().sum() + x.sum(),
    "mean_dim": lambda e, x: e.mean(0),  # mean over 0 elements: nan, as in torch
    "matmul_empty_batch": lambda e, x: e @ x,
    "matmul_empty_inner": lambda e, x: e.T[:, :0] @ x[:0],
    "cat_empty": lambda e, x: torch.cat([e, x.T]).tanh(),
    "softmax": lambda e, x: F.softmax(e, dim=1),
    "reshape_expand": lambda e, x: e.reshape(0, 3, 1).expand(0, 3, 2) * 2,
    "slicing": lambda e, x: x[3:] * 2 + e.sum(),
    "linear": lambda e, x: F.linear(e, x.T),
    "layer_norm": lambda e, x: F.layer_norm(e, (3,)),
    "max_dim": lambda e, x: e.max(1).values,
    "cross_entropy_sum": lambda e, x: F.cross_entropy(e, torch.zeros(0, dtype=torch.long), reduction="sum"),
}


# var/std with no degrees of freedom left (n <= correction): torch's gradient is inf, or nan where x == mean
NO_DOF = {
    "var_one_element": lambda x: x[:1].var(),
    "std_one_element": lambda x: x[:1].std(),
    "var_zero_dim": lambda x: x[0].var(),
    "var_correction_n": lambda x: x.var(correction=4),
    "var_correction_above_n": lambda x: x.var(correction=6),
    "std_correction_n": lambda x: x.std(correction=4),
    "var_dim_correction_n": lambda x: x.reshape(2, 2).var(1, correction=2).sum(),
    "var_dim_correction_above_n": lambda x: x.reshape(2, 2).var(1, correction=3).sum(),
    "var_dim_one_element": lambda x: x.reshape(4, 1).var(1).sum(),
}


@pytest.mark.parametrize("name", sorted(NO_DOF))
@pytest.mark.filterwarnings("ignore:.*degrees of freedom is <= 0")
def test_var_and_std_without_degrees_of_freedom(name):
    """Used to raise ZeroDivisionError (2 / (n - correction)); torch gives inf and nan."""
    x = torch.tensor([0.3, -1.2, 0.8, 2.0], dtype=D)
    fn = NO_DOF[name]
    with tg.record() as graph:
        loss = fn(x)
    mine = graph.backward(loss)[x]
    ref = x.clone().requires_grad_()
    (theirs,) = torch.autograd.grad(fn(ref), [ref])
    torch.testing.assert_close(mine, theirs, equal_nan=True)


@pytest.mark.parametrize("name", sorted(EMPTY))
def test_empty_dims(name):
    e = torch.randn(0, 3, dtype=D)
    x = torch.randn(3, 2, dtype=D)
    fn = EMPTY[name]
    expected = fn(e, x)
    with tg.record() as graph:
        out = fn(e, x)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    grads = graph.backward(out, grad=torch.ones_like(out))
    refs = [t.clone().requires_grad_() for t in (e, x)]
    ref_out = fn(*refs)
    theirs = torch.autograd.grad(ref_out, refs, torch.ones_like(ref_out), allow_unused=True)
    for tensor, their in zip((e, x), theirs):
        mine = grads[tensor] if tensor in grads else None
        if their is None or mine is None:
            assert (their is None or not their.count_nonzero()) and (mine is None or not mine.count_nonzero())
            continue
        assert mine.shape == their.shape and mine.dtype == their.dtype
        torch.testing.assert_close(mine, their, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_with_a_wider_dtype_argument(name, dtype):
    """x.softmax(dim, dtype=float64) casts first: the gradient is differentiated in float64, then x's dtype.

    A float16 x crashed the rule (torch's CPU backward kernel refuses a float16 input dtype with a float32
    output); the gradient must be x's dtype and equal torch's, and float64 truth within x's precision.
    """
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3)).to(dtype)
    wide = torch.float32 if dtype != torch.float32 else D

    def fn(x):
        return getattr(x, name)(1, dtype=wide) * torch.arange(5, dtype=wide)

    assert_matches_torch(fn, [x], rtol=0, atol=0)
    (ours,) = engine_grads(fn, [x])[1]
    (truth,) = torch_grads(fn, [x.double()])
    torch.testing.assert_close(ours.double(), truth, rtol=torch.finfo(dtype).eps * 4, atol=torch.finfo(dtype).eps * 4)


def test_grad_of_another_dtype_is_cast_to_the_loss_dtype():
    """As torch autograd does: a float32 grad= for a float16 output is rounded to float16 before the rules run.

    The engine kept the float32 seed (the gradient of the output itself came back float32, and the
    gradients below it skipped float16's rounding: 0.06 off torch's here). backward_source and
    codegen.run must compute the same bits.
    """
    from tensorgraph import codegen

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).half()
    seed = torch.full((3, 4), 1 / 3)
    with tg.record() as graph:
        y = x * 3
        z = y.exp()
    grads = graph.backward(z, grad=seed)
    ref = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad((ref * 3).exp(), ref, seed)
    assert grads[z].dtype == grads[y].dtype == grads[x].dtype == torch.float16
    assert torch.equal(grads[x], expected)
    namespace = codegen.run(graph.backward_source(z, grad=seed), graph, grad=seed)
    assert torch.equal(namespace["dx"], expected)
    assert graph.compare(z, grad=seed).exact_count == 2
    for _ in range(3):  # a training loop's repeated recordings: the cached plan casts the same way
        with tg.record() as graph:
            y = x * 3
            z = y.exp()
        assert torch.equal(graph.backward(z, grad=seed)[x], expected)


@pytest.mark.parametrize("dtype, wide", [(torch.float32, D), (torch.float16, torch.float32), (torch.bfloat16, D)])
def test_cumsum_with_a_wider_dtype_is_bit_exact_with_torch(dtype, wide):
    """torch casts the gradient back to x's dtype before the reversed cumsum; the rule summed in the wide dtype
    (1 ulp off in float32, 2e-3 in float16)."""
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert_matches_torch(lambda x: x.cumsum(1, dtype=wide), [x], rtol=0, atol=0)
    assert_matches_torch(lambda x: torch.cumsum(x, 0, dtype=wide), [x], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_in_half_precision_computes_in_float32_as_torch_does(dtype):
    gen = torch.Generator().manual_seed(0)
    x, w = (torch.randn(shape, generator=gen).to(dtype) for shape in ((4, 8), (8,)))
    assert_matches_torch(lambda x, w: F.rms_norm(x, (8,), w), [x, w], rtol=0, atol=0)  # bit for bit


@pytest.mark.filterwarnings("ignore:Using a target size")
@pytest.mark.parametrize("loss", [F.huber_loss, F.smooth_l1_loss])
@pytest.mark.parametrize("x_dtype, t_dtype, reduction", [(D, torch.float32, "sum"), (torch.float32, D, "mean")])
def test_fused_losses_promote_mixed_dtypes_as_the_forward_does(loss, x_dtype, t_dtype, reduction):
    """torch's own huber backward raises here; the engine promotes both operands, as the forward kernel does."""
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, generator=gen, dtype=x_dtype), torch.randn(4, generator=gen, dtype=t_dtype)
    with tg.record() as graph:
        out = loss(x, t, reduction=reduction)
    grads = graph.backward(out)
    x_ref, t_ref = x.to(D).requires_grad_(), t.to(D).requires_grad_()  # the truth: both in float64
    loss(x_ref, t_ref, reduction=reduction).backward()
    assert grads[x].dtype == x_dtype and grads[t].dtype == t_dtype
    torch.testing.assert_close(grads[x], x_ref.grad.to(x_dtype))
    torch.testing.assert_close(grads[t], t_ref.grad.to(t_dtype))


def test_addr_with_a_float32_vector_promotes_as_torch_does():
    """torch's own backward fails here ("addmv input tensors must have the same dtype"); so did the rule. The truth:
    torch autograd on the promoted (float64) vector, its gradient rounded to float32."""
    m, u, v = torch.randn(4, 3, dtype=D), torch.randn(4, dtype=torch.float32), torch.randn(3, dtype=D)
    ours = engine_grads(torch.addr, [m, u, v])[1]
    theirs = torch_grads(lambda a, b, c: torch.addr(a, b.double(), c), [m, u, v])
    for got, expected in zip(ours, theirs):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
