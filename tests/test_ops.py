"""Every op in the rule table against torch.autograd.grad, in float64, over a broadcasting shape matrix."""

import pytest
from helpers import assert_matches_torch
from op_cases import CASES


@pytest.mark.parametrize("fn, inputs", [pytest.param(fn, inputs, id=name) for name, fn, inputs in CASES])
def test_op_matches_torch_autograd(fn, inputs):
    assert_matches_torch(fn, inputs)


def test_kl_div_with_a_zero_target_gives_torchs_nan_target_gradient_there():
    """d/dt of t*log(t) at t = 0: torch's gradient is NaN there (and finite elsewhere); the input's is finite."""
    import torch
    import torch.nn.functional as F
    from helpers import engine_grads, torch_grads
    from op_cases import r

    target = r(3, 4, seed=1).softmax(1)
    target[0, 1] = target[2, 3] = 0.0

    def fn(x, t):
        return F.kl_div(x.log_softmax(1), t, reduction="batchmean")

    inputs = [r(3, 4, seed=2), target]
    ours, theirs = engine_grads(fn, inputs)[1], torch_grads(fn, inputs)
    assert torch.equal(ours[1].isnan(), target == 0) and torch.equal(theirs[1].isnan(), target == 0)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-7, atol=1e-10, equal_nan=True)
