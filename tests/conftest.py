import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)  # tiny tensors: threads cost more than they give, and keep results deterministic


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
