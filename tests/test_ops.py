"""Every op in the rule table against torch.autograd.grad, in float64, over a broadcasting shape matrix."""

import pytest
from helpers import assert_matches_torch
from op_cases import CASES


@pytest.mark.parametrize("fn, inputs", [pytest.param(fn, inputs, id=name) for name, fn, inputs in CASES])
def test_op_matches_torch_autograd(fn, inputs):
    assert_matches_torch(fn, inputs)
