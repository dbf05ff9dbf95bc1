"""Every rule against central finite differences in float64: a truth independent of torch autograd."""

import pytest
import torch
import torch.nn.functional as F
from helpers import engine_grads, finite_differences
from op_cases import CASES, FD_SETTINGS, LEGACY_QR

# ties and kinks have no derivative for finite differences to measure
NON_SMOOTH = ("tied-", "max_binary", "maximum", "minimum", "where", "nn-max_pool2d", "nn-l1_loss",
              "float_roundtrip",  # float32 rounding swamps the difference quotient
              "embedding_pad",  # padding_idx's zero gradient is a convention, not the derivative
              "scale_grad_by_freq",  # the gradient divided by each index's count: a heuristic, not the derivative
              "nonsmooth",  # torch's convention where a norm is clamped to eps (a zero vector)
              "symmetrised")  # torch's symmetric gradient of a factorisation reading one triangle
FD_CASES = [(name, fn, inputs) for name, fn, inputs in CASES
            if (name.startswith("smooth-") or not any(k in name for k in NON_SMOOTH))
            and sum(x.numel() for x in inputs if isinstance(x, torch.Tensor)) <= 400]


@pytest.mark.parametrize("name, fn, inputs", [pytest.param(name, fn, inputs, id=name)
                                              for name, fn, inputs in FD_CASES])
def test_rule_matches_finite_differences(name, fn, inputs):
    eps, rtol, atol = FD_SETTINGS.get(name, (1e-6, 1e-5, 1e-6))
    _, ours = engine_grads(fn, inputs)
    numeric = finite_differences(fn, inputs, eps=eps)
    for i, (a, b) in enumerate(zip(ours, numeric)):
        if b is None:
            continue
        if a is None:
            assert torch.allclose(b, torch.zeros_like(b), atol=1e-6), f"input {i}: engine has no gradient"
            continue
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, i=i: f"input {i}: {m}")


def test_fd_covers_every_differentiable_op():
    """Each op with a rule appears in at least one finite-difference case."""
    import tensorgraph as tg
    from tensorgraph.ops import OPS

    seen = set()
    for _, fn, inputs in FD_CASES:
        with tg.record() as graph:
            fn(*inputs)
        seen |= {d["op"] for d in graph._nodes}
    # the only rules no finite-difference case reaches, and why
    covered_elsewhere = {
        "cpu": ".cpu() of a CPU tensor returns the tensor itself: nothing is recorded",
        "cuda": "needs a CUDA device",
        "vander": "torch 2.13's autograd fails on torch.vander (an in-place cumprod), so no op case can hold it; "
                  "tested against finite differences and torch.linalg.vander in test_ops",
        "no_grad_update": "an update under torch.no_grad(): its identity gradient is torch autograd's convention, "
                          "not the update's derivative; tested against torch in test_engine",
    }
    if not LEGACY_QR:
        covered_elsewhere["qr"] = "torch.qr and Tensor.qr were removed in torch 2.14 (they raise): no case holds them"
    rules = {name for name, op in OPS.items() if op.rule is not None}
    missing = rules - seen - set(covered_elsewhere)
    assert not missing, f"ops with a rule but no finite-difference case: {sorted(missing)}"


def test_batch_norm_with_weight_and_bias_viewing_its_input():
    """torch 2.13's autograd gets this wrong (the input's other columns change); the engine follows the maths."""
    x = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def fn(t):
        return F.batch_norm(t, None, None, t[..., 0], t[..., 0], training=True)

    (ours,) = engine_grads(fn, [x])[1]
    (numeric,) = finite_differences(fn, [x])
    torch.testing.assert_close(ours, numeric, rtol=1e-5, atol=1e-6)


def test_batch_norm_with_one_expanded_tensor_as_weight_and_bias():
    """torch 2.13 reads uninitialised memory here (1e227 in one of five runs); the engine follows the maths."""
    gen = torch.Generator().manual_seed(2)
    x, s = torch.randn(2, 2, dtype=torch.float64, generator=gen), torch.randn((), dtype=torch.float64, generator=gen)

    def fn(t, scale):
        w = scale.expand(2)  # stride 0, the same tensor for weight and bias
        return F.batch_norm(t, None, None, w, w, training=True)

    ours = engine_grads(fn, [x, s])[1]
    numeric = finite_differences(fn, [x, s])
    for got, expected in zip(ours, numeric):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

