"""Every op in the rule table against torch.autograd.grad, in float64, over a broadcasting shape matrix."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_matches_torch, engine_grads, finite_differences, torch_grads
from op_cases import CASES, r
from torch.overrides import TorchFunctionMode

import tensorgraph as tg


@pytest.mark.parametrize("fn, inputs", [pytest.param(fn, inputs, id=name) for name, fn, inputs in CASES])
def test_op_matches_torch_autograd(fn, inputs):
    assert_matches_torch(fn, inputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (torch built "
                    f"{'with' if torch.version.cuda else 'without'} CUDA); the same cases run on CPU above")
@pytest.mark.parametrize("fn, inputs", [pytest.param(fn, inputs, id=name) for name, fn, inputs in CASES])
def test_op_matches_torch_autograd_on_cuda(fn, inputs):
    """The rules are device-agnostic: every case again with its tensors on the GPU, against torch there."""
    inputs = [x.cuda() if isinstance(x, torch.Tensor) else x for x in inputs]

    def on_gpu(*args):  # tensors the case makes (indices, weights) are made on the GPU too
        with torch.device("cuda"):
            return fn(*args)

    with held_tensors_moved(fn, "cuda"):
        try:
            on_gpu(*inputs)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:  # a CPU tensor out of reach
            pytest.skip(f"torch itself refuses this case on CUDA: {str(err).splitlines()[0][:120]}")
        assert_matches_torch(on_gpu, inputs)


@contextlib.contextmanager
def held_tensors_moved(fn, device):
    """Move what a case holds rather than takes (targets in its closure, modules and tensors among the
    globals it names) to ``device`` while the block runs, and put the originals back after it."""
    undo = []
    for cell in fn.__closure__ or ():
        value = cell.cell_contents
        if isinstance(value, torch.Tensor):
            undo.append(lambda cell=cell, value=value: setattr(cell, "cell_contents", value))
            cell.cell_contents = value.to(device, copy=True)
    for name in fn.__code__.co_names:
        value = fn.__globals__.get(name)
        if isinstance(value, torch.Tensor):
            undo.append(lambda name=name, value=value: fn.__globals__.__setitem__(name, value))
            fn.__globals__[name] = value.to(device, copy=True)
        elif isinstance(value, torch.nn.Module):
            state = copy.deepcopy(value.state_dict())
            undo.append(lambda value=value, state=state: value.to("cpu").load_state_dict(state))
            value.to(device)
    try:
        yield
    finally:
        for step in reversed(undo):
            step()


def test_held_tensors_moved_puts_everything_back():
    """The CUDA test's mover, run with a copy standing in for the device: every held object comes back."""
    target, layer = torch.tensor([1, 0]), torch.nn.Linear(2, 2).double()
    globals()["_HELD_LAYER"] = layer
    before, original = layer.weight.detach().clone(), target  # (``target`` itself reads the cell)

    def case(x):
        return F.cross_entropy(_HELD_LAYER(x), target)  # noqa: F821 (set above)

    with held_tensors_moved(case, "cpu"):
        layer.weight.data.add_(1.0)  # the block changes the module; the state from before comes back
        assert case.__closure__[0].cell_contents is not original
    assert case.__closure__[0].cell_contents is original and torch.equal(layer.weight, before)
    del globals()["_HELD_LAYER"]


def test_scatter_src_larger_than_index():
    """torch reads only src's leading index.shape block: the rest of src gets a zero gradient.

    The engine crashed here; torch 2.13's autograd does too ("ScatterBackward0 returned an invalid
    gradient"), so the truths are finite differences and torch on the block actually read.
    """
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    src = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([[0], [3], [1]])
    for op in (torch.scatter, torch.scatter_add):
        for dim, idx in ((1, index), (0, index.T % 3)):
            def fn(x, s, op=op, dim=dim, idx=idx):
                return op(x, dim, idx, s)

            ours = engine_grads(fn, [x, src])[1]
            for mine, numeric in zip(ours, finite_differences(fn, [x, src])):
                torch.testing.assert_close(mine, numeric, rtol=1e-5, atol=1e-6)
            block = tuple(slice(0, n) for n in idx.shape)
            expected = torch_grads(lambda x, s, fn=fn, block=block: fn(x, s[block]), [x, src])
            for mine, theirs in zip(ours, expected):
                torch.testing.assert_close(mine, theirs, rtol=1e-7, atol=1e-10)


def test_vander_matches_finite_differences_and_linalg_vander():
    """torch 2.13's autograd fails on torch.vander itself (it modifies a saved tensor in place), so the truths are
    finite differences and torch autograd of linalg.vander, the same powers in increasing order."""
    x = torch.tensor([0.0, -1.3, 0.7, 2.0], dtype=torch.float64)  # 0: the power x^1 still has derivative 1
    for n, increasing in ((None, False), (3, True), (5, False)):
        def fn(x, n=n, increasing=increasing):
            return torch.vander(x, n, increasing)

        def same(x, n=n, increasing=increasing):
            powers = torch.linalg.vander(x, N=n)
            return powers if increasing else powers.flip(-1)

        ours = engine_grads(fn, [x])[1][0]
        torch.testing.assert_close(ours, finite_differences(fn, [x])[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours, torch_grads(same, [x])[0], rtol=1e-7, atol=1e-10)
    ones = engine_grads(lambda x: torch.vander(x, 1) * x.unsqueeze(1), [x])[1][0]  # N = 1: constant powers
    torch.testing.assert_close(ones, torch_grads(lambda x: torch.ones(4, 1, dtype=x.dtype) * x.unsqueeze(1), [x])[0])


def test_ldexp_with_a_negative_integer_exponent_matches_finite_differences():
    """torch 2.13's autograd multiplies by an integer power of 2, which is 0 for a negative exponent; the
    engine gives 2**e, as finite differences do (and as torch does for a non-negative or floating exponent)."""
    x, exponent = r(4, seed=1), torch.tensor([-2, -1, 0, 3])

    def fn(x):
        return torch.ldexp(x, exponent)

    ours = engine_grads(fn, [x])[1][0]
    torch.testing.assert_close(ours, finite_differences(fn, [x])[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, torch_grads(lambda x: torch.ldexp(x, exponent.double()), [x])[0])


def test_scatter_reduce_amax_without_self_ignores_an_input_equal_to_the_result():
    """With include_self=False the input's element takes no part in the reduction; torch 2.13's autograd still
    counts it among the ties when it equals the result, giving the src element half its gradient. The engine
    gives all of it, as finite differences do."""
    x, src = torch.tensor([1.0, 5.0], dtype=torch.float64), torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)

    def fn(x, src):
        return x.scatter_reduce(0, torch.tensor([0, 0, 1]), src, "amax", include_self=False)

    ours = engine_grads(fn, [x, src])[1]
    for mine, numeric in zip(ours, finite_differences(fn, [x, src])):
        torch.testing.assert_close(mine, numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_chunked_with_options_gets_torchs_gradient(reduction):
    """With options, torch computes the loss in batch chunks (its own autograd function): the same loss, so the
    rule's gradient, from the reference computation, is torch's (to rounding)."""
    classes, options = torch.tensor([0, 4, 2, 2]), torch.nn.LinearCrossEntropyOptions()
    assert_matches_torch(lambda x, w, b: F.linear_cross_entropy(x, w, classes, linear_bias=b, reduction=reduction,
                                                                options=options),
                         [r(4, 3, seed=3), r(5, 3, seed=4), r(5, seed=5)])


def test_full_max_and_min_of_a_tensor_holding_nan():
    """The NaN is the result: torch gives it the gradient (split among NaNs); the engine gave every element NaN."""
    nan = float("nan")
    for x in (torch.tensor([nan, 1.0, nan, 2.0], dtype=torch.float64), torch.tensor([[3.0, nan], [1.0, 0.5]],
                                                                                    dtype=torch.float64)):
        assert_matches_torch(lambda x: x.max() * 2 + x.min(), [x])
        assert_matches_torch(lambda x: x.median() * 2 + x.nanmedian(), [x])  # the same selection


def test_relu_passes_the_gradient_where_its_input_is_nan():
    """torch's threshold_backward passes g where relu's output is NaN; the rule's ``g * (out > 0)`` gave 0 there."""
    x = torch.tensor([float("nan"), -1.0, 0.0, 2.0], dtype=torch.float64)
    assert_matches_torch(lambda x: torch.relu(x) * 3, [x])
    assert_matches_torch(lambda x: x.relu(), [x])


def test_kl_div_with_a_zero_target_gives_torchs_nan_target_gradient_there():
    """d/dt of t*log(t) at t = 0: torch's gradient is NaN there (and finite elsewhere); the input's is finite."""
    target = r(3, 4, seed=1).softmax(1)
    target[0, 1] = target[2, 3] = 0.0

    def fn(x, t):
        return F.kl_div(x.log_softmax(1), t, reduction="batchmean")

    inputs = [r(3, 4, seed=2), target]
    ours, theirs = engine_grads(fn, inputs)[1], torch_grads(fn, inputs)
    assert torch.equal(ours[1].isnan(), target == 0) and torch.equal(theirs[1].isnan(), target == 0)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-7, atol=1e-10, equal_nan=True)


def test_instance_norm_module_with_running_statistics_in_training_matches_torch():
    """The forward updates running_mean/var in place: no inputs of the loss, so later steps do not upset backward."""
    layer = torch.nn.InstanceNorm1d(3, affine=True, track_running_stats=True).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    with tg.record() as graph:
        loss = (layer(x) ** 2).sum()
    layer(x)  # another training step before the backward: torch autograd does not mind either
    ref = x.clone().requires_grad_()
    weight = layer.weight.detach().clone().requires_grad_()
    out = F.instance_norm(ref, None, None, weight, layer.bias.detach(), use_input_stats=True)
    expected = torch.autograd.grad((out ** 2).sum(), (ref, weight))
    grads = graph.backward(loss)
    torch.testing.assert_close(grads[x], expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[layer.weight], expected[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("y, x", [(0.0, 0.0), (0.0, -0.5), (0.0, 1e-20), (1e-20, 1e-20), (-0.0, 0.0), (3.0, 0.0)])
def test_atan2_where_its_denominator_is_zero_or_tiny_matches_torch(y, x):
    """At y = x = 0 torch gives 0, not NaN (found by the fuzzer: atan2 of a size-1 log_softmax, which is 0)."""
    for dtype in (torch.float32, torch.float64):
        inputs = [torch.tensor([y, 1.0], dtype=dtype), torch.tensor(x, dtype=dtype)]
        for ours, theirs in zip(engine_grads(torch.atan2, inputs)[1], torch_grads(torch.atan2, inputs)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)  # (1e-20: inf and NaN, as torch)


@pytest.mark.parametrize("name, fn", [
    ("nll_loss", lambda x, y: F.nll_loss(x.log_softmax(1), y)),
    ("nll_loss weighted", lambda x, y: F.nll_loss(x.log_softmax(1), y, weight=torch.arange(1.0, 6.0, dtype=x.dtype))),
    ("cross_entropy smoothed", lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1)),
    ("cross_entropy 3-D", lambda x, y: F.cross_entropy(x.view(2, 5, 2), y.view(2, 2))),
    ("cross_entropy weighted, smoothed", lambda x, y: F.cross_entropy(
        x, y, weight=torch.arange(1.0, 6.0, dtype=x.dtype), label_smoothing=0.2)),
    ("cross_entropy sum", lambda x, y: F.cross_entropy(x, y, reduction="sum")),
])
@pytest.mark.parametrize("ignored", ["every", "some"])
def test_class_losses_give_ignored_targets_torchs_zero_gradient(name, fn, ignored):
    """With every target ignored the loss is 0/0: torch's gradient is still 0; the rules gave nan everywhere."""
    x = r(4, 5, seed=3)
    y = torch.full((4,), -100) if ignored == "every" else torch.tensor([1, -100, 4, -100])
    ours, theirs = engine_grads(fn, [x, y])[1][0], torch_grads(fn, [x, y])[0]
    assert not theirs.isnan().any()
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-12)


def test_poisson_nll_loss_full_with_a_zero_target_gives_torchs_nan_target_gradient_there():
    """0 * log(0) in torch's masked Stirling term: NaN where a target is 0, finite elsewhere (found by the fuzzer)."""
    target = r(3, 4, seed=1).abs() * 2
    target[0, 1] = target[2, 3] = 0.0

    def fn(x, t):
        return F.poisson_nll_loss(x, t, log_input=False, full=True)

    inputs = [r(3, 4, seed=2).abs() + 0.5, target]
    ours, theirs = engine_grads(fn, inputs)[1], torch_grads(fn, inputs)
    assert torch.equal(ours[1].isnan(), target == 0) and torch.equal(theirs[1].isnan(), target == 0)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-7, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("dim", [1, None])
def test_nanmean_of_a_slice_of_nans_only_gives_torchs_nan_gradient(dim):
    """The slice's mean is 0/0 (NaN) and so is torch's gradient there; the rule gave 0 (masked_fill after g / 0)."""
    x = r(3, 4, seed=1)
    x[1] = float("nan")
    if dim is None:
        x[:] = float("nan")

    def fn(t):
        return t.nanmean(dim) if dim is not None else t.nanmean()

    ours, theirs = engine_grads(fn, [x])[1][0], torch_grads(fn, [x])[0]
    assert theirs[1].isnan().all()
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("module", [torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN])
def test_recurrent_module_on_unsorted_packed_sequences_matches_torch(module):
    """pack_padded_sequence(enforce_sorted=False), a 2-layer bidirectional batch_first module, pad_packed_sequence:
    h_n (and c_n) come back in the batch's order (index_select), the padding takes no gradient."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    rnn = module(3, 4, num_layers=2, bidirectional=True, batch_first=True).double()
    lengths = torch.tensor([2, 5, 1, 4])
    params = list(rnn.parameters())

    def fn(x, *weights):
        flat = dict(zip([name for name, _ in rnn.named_parameters()], weights))
        out, state = torch.func.functional_call(rnn, flat, (pack_padded_sequence(x, lengths, True, False),))
        padded, _ = pad_packed_sequence(out, batch_first=True, total_length=6)
        states = state if isinstance(state, tuple) else (state,)
        return torch.cat([padded.reshape(-1), *(s.reshape(-1) for s in states)])

    assert_matches_torch(fn, [r(4, 6, 3, seed=1), *[p.detach().clone() for p in params]])


def _recurrent_output_loss(out: tuple, weight: torch.Tensor) -> torch.Tensor:
    """A loss reading every output of an nn.LSTM/GRU/RNN call: the (padded) output and h_n (and c_n)."""
    from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

    output, state = out
    if isinstance(output, PackedSequence):
        output = pad_packed_sequence(output, total_length=weight.shape[0])[0]
    states = state if isinstance(state, tuple) else (state,)
    return (output * weight[:, :, :output.shape[-1]]).sum() + sum(s.pow(2).sum() for s in states)


@pytest.mark.parametrize("module, kwargs", [
    (torch.nn.LSTM, {"num_layers": 3, "bidirectional": True, "proj_size": 2}),
    (torch.nn.LSTM, {"num_layers": 2, "batch_first": True}),
    (torch.nn.GRU, {"num_layers": 2, "bidirectional": True}),
    (torch.nn.RNN, {"num_layers": 3, "nonlinearity": "relu", "batch_first": True}),
], ids=["lstm_proj_bidirectional", "lstm_batch_first", "gru_bidirectional", "rnn_relu_batch_first"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_recurrent_dropout_between_layers_matches_torch_with_the_same_seed(module, kwargs, packed):
    """nn.LSTM(num_layers=2, dropout=0.3) in training was refused (the kernel draws the masks between layers):
    recorded layer by layer with F.dropout between, it gives torch's outputs bit for bit for the same seed, and
    torch autograd's gradients (float64); tg.compile draws new masks at each call, as torch does."""
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    rnn = module(3, 4, dropout=0.4, **kwargs).double()
    batch_first = kwargs.get("batch_first", False)
    x = r(5, 6, 3, seed=1) if batch_first else r(6, 5, 3, seed=1)
    weight = r(6, 5, 8, seed=2).transpose(0, 1) if batch_first else r(6, 5, 8, seed=2)

    def forward(x):
        data = pack_padded_sequence(x, [6, 4, 4, 2, 1], batch_first, False) if packed else x
        return rnn(data)

    def loss_of(x):
        return _recurrent_output_loss(forward(x), weight.transpose(0, 1) if batch_first and packed else weight)
    torch.manual_seed(7)
    with tg.record() as graph:
        outputs = forward(x)
        loss = loss_of(x)
    grads = graph.backward(loss)
    torch.manual_seed(7)
    expected_outputs = forward(x)
    leaf = x.clone().requires_grad_()
    expected = torch.autograd.grad(loss_of(leaf), [leaf, *rnn.parameters()])
    leaves = torch.utils._pytree.tree_leaves
    for ours, theirs in zip(leaves(outputs), leaves(expected_outputs)):
        assert torch.equal(ours, theirs.detach())  # the same masks: torch's values bit for bit
    for tensor, truth in zip([x, *rnn.parameters()], expected):
        torch.testing.assert_close(grads[tensor], truth, rtol=1e-10, atol=1e-12)
    step = tg.compile(loss_of)
    for seed in (11, 12):  # a new mask at each call
        torch.manual_seed(seed)
        _, compiled = step(x)
        torch.manual_seed(seed)
        truth = torch.autograd.grad(loss_of(x), list(rnn.parameters()))
        for param, expected_grad in zip(rnn.parameters(), truth):
            torch.testing.assert_close(compiled[param], expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, fn", [
    ("eigh vectors", lambda a: torch.linalg.eigh(a).eigenvectors ** 2),
    ("eigh both", lambda a: torch.linalg.eigh(a)[1] ** 2 * torch.linalg.eigh(a)[0]),
    ("svd U", lambda a: torch.linalg.svd(a).U ** 2),
    ("svd Vh", lambda a: torch.svd(a).V ** 2),
])
def test_repeated_eigenvalues_give_torchs_nan_through_the_vectors(name, fn):
    """The eigen-/singular vectors' part divides by the gaps between values: NaN at a repeated one, as torch."""
    a = torch.diag(torch.tensor([1.0, 2.0, 2.0, 3.0], dtype=torch.float64))
    ours, theirs = engine_grads(fn, [a])[1][0], torch_grads(fn, [a])[0]
    assert theirs.isnan().any()
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10, equal_nan=True)


def test_repeated_values_alone_have_a_gradient_and_tied_spectral_norms_share_it():
    """Through the values only there is no division: finite; amax / amin of tied singular values split evenly."""
    a = torch.diag(torch.tensor([3.0, 1.0, 3.0, 1.0], dtype=torch.float64))
    a[0, 1] = a[1, 0] = 1e-3  # not diagonal, still two pairs of nearly tied values
    tied = torch.diag(torch.tensor([3.0, 1.0, 3.0, 1.0], dtype=torch.float64))
    for x in (a, tied):
        for fn in (lambda t: torch.linalg.eigvalsh(t), lambda t: torch.linalg.eigh(t)[0] ** 2,
                   lambda t: torch.linalg.svdvals(t), lambda t: torch.linalg.matrix_norm(t, 2),
                   lambda t: torch.linalg.matrix_norm(t, -2), lambda t: torch.linalg.norm(t, "nuc")):
            ours, theirs = engine_grads(fn, [x])[1][0], torch_grads(fn, [x])[0]
            assert not theirs.isnan().any()
            torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("cell, gates", [(torch.rnn_tanh_cell, 1), (torch.rnn_relu_cell, 1), (torch.gru_cell, 3),
                                         (torch.lstm_cell, 4)], ids=["rnn_tanh", "rnn_relu", "gru", "lstm"])
@pytest.mark.parametrize("input_dtype, state_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_a_cell_mixing_dtypes_gets_torchs_gradients(cell, gates, input_dtype, state_dtype):
    """torch runs a cell whose input side (x, w_ih, b_ih) and state side (hx, w_hh, b_hh) differ in dtype, each
    projection in its own; the rule multiplied a float64 gradient by a float32 weight (found by the fuzzer)."""
    generator = torch.Generator().manual_seed(0)

    def make(*shape, dtype):
        return torch.randn(*shape, dtype=dtype, generator=generator)

    x, w_ih, b_ih = make(2, 3, dtype=input_dtype), make(4 * gates, 3, dtype=input_dtype), make(4 * gates,
                                                                                               dtype=input_dtype)
    h, c = make(2, 4, dtype=state_dtype), make(2, 4, dtype=state_dtype)
    w_hh, b_hh = make(4 * gates, 4, dtype=state_dtype), make(4 * gates, dtype=state_dtype)

    def fn(x, w_ih, b_ih, h, c, w_hh, b_hh):
        out = cell(x, (h, c) if cell is torch.lstm_cell else h, w_ih, w_hh, b_ih, b_hh)
        return torch.cat([o.double().reshape(-1) for o in (out if isinstance(out, tuple) else (out,))])

    inputs = [x, w_ih, b_ih, h, c, w_hh, b_hh]
    _, ours = engine_grads(fn, inputs)
    for mine, theirs in zip(ours, torch_grads(fn, inputs)):
        if theirs is None:  # (c, outside the LSTM)
            continue
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op, gates", [(torch.rnn_tanh, 1), (torch.gru, 3)], ids=["rnn_tanh", "gru"])
def test_a_packed_sequence_mixing_dtypes_gets_torchs_gradients(op, gates):
    """torch's packed overload accepts a float32 input side with a float64 state side, as the cells do."""
    generator = torch.Generator().manual_seed(1)

    def make(*shape, dtype):
        return torch.randn(*shape, dtype=dtype, generator=generator)

    inputs = [make(3, 2, dtype=torch.float32), make(1, 2, 2, dtype=torch.float64),
              make(2 * gates, 2, dtype=torch.float32), make(2 * gates, 2, dtype=torch.float64)]

    def fn(data, hx, w_ih, w_hh):
        out, h_n = op(data, torch.tensor([2, 1]), hx, [w_ih, w_hh], False, 1, 0.0, False, False)
        return torch.cat([out.double().reshape(-1), h_n.reshape(-1)])

    _, ours = engine_grads(fn, inputs)
    for mine, theirs in zip(ours, torch_grads(fn, inputs)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def _all_outputs_of_an_lstm(packed):
    """A 2-layer bidirectional LSTM over 5 steps whose output, h_n and c_n all reach the loss (60 sigmoid calls
    per run of all its layers: 3 gates, 5 steps, 2 layers, 2 directions)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True).double()

    def loss_of(x):
        if packed:
            out, (h, c) = lstm(pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False))
            out = pad_packed_sequence(out)[0]
        else:
            out, (h, c) = lstm(x)
        return (out * out).sum() + h.sin().sum() + (h * c).sum()

    return lstm, loss_of, 60


def _both_states_of_an_lstm_cell(packed):
    """An LSTMCell over 4 steps whose h and c both reach the loss at every step (3 sigmoid calls per step)."""
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(3, 4).double()

    def loss_of(x):
        h, c = cell(x[0])
        loss = (h * c).sum()
        for t in range(1, 4):
            h, c = cell(x[t], (h, c))
            loss = loss + (h * c).sum()
        return loss

    return cell, loss_of, 12


class _Sigmoids(TorchFunctionMode):
    """Counts the sigmoid calls made inside it (3 per LSTM step run: the input, forget and output gates)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", None) == "sigmoid"
        return func(*args, **(kwargs or {}))


def _sigmoids_in_plan(plan):
    """The sigmoid calls of a backward plan (its calls are the functions f<j> of its namespace)."""
    made = plan.fn.__globals__
    return sum(name[0] == "f" and name[1:].isdigit() and getattr(f, "__name__", None) == "sigmoid"
               for name, f in made.items())


@pytest.mark.parametrize("make, packed", [(_all_outputs_of_an_lstm, False), (_all_outputs_of_an_lstm, True),
                                          (_both_states_of_an_lstm_cell, False)], ids=["lstm", "packed", "cell"])
def test_a_recurrent_call_whose_outputs_all_reach_the_loss_runs_again_once(make, packed):
    """Each output's rule ran the layers again from the call's inputs, so an LSTM whose output, h_n and c_n reach
    the loss ran them three times in graph.backward, in a repeated structure's plan, in backward_source's code
    and in tg.compile's step; the rules of one call's outputs now share one run, with torch's gradients."""
    from tensorgraph import codegen

    module, loss_of, sigmoids = make(packed)
    x, params = r(5, 3, 3, seed=1), list(module.parameters())
    truth = torch.autograd.grad(loss_of(x), params)

    def assert_truth(grads):
        for p, expected in zip(params, truth):
            torch.testing.assert_close(grads[p], expected, rtol=1e-7, atol=1e-10)

    with torch.no_grad():  # (the parameters require grad: keep torch autograd out of the recordings)
        counted = _Sigmoids()
        for k in range(5):  # one line recorded again and again: the rule walk, the traced backward, its plan
            with tg.record() as graph:
                loss = loss_of(x)
            with counted if k == 0 else contextlib.nullcontext():  # (a mode around it: the rule walk)
                assert_truth(graph.backward(loss))
        assert counted.count == sigmoids
        if not packed:  # (a packed sequence's batch sizes are read into Python: it gets no plan)
            assert _sigmoids_in_plan(graph._replay.plans[(len(graph) - 1, None)]) == sigmoids
        generated = codegen.generate(graph, loss)
        assert generated.text().count(".sigmoid()") == sigmoids
        namespace = codegen.run(generated.text(), graph)
        assert_truth({p: namespace[generated.variables[graph.node_id(p)]] for p in params})
        step = tg.compile(loss_of)
        step(x)
        assert_truth(step(x)[1])
        assert step.source.count(".sigmoid()") == sigmoids


_TIES = torch.tensor([[x, low, high] for x in (0.0, 1.0, 2.0) for low in (0.0, 1.0, 2.0) for high in (0.0, 1.0, 2.0)],
                     dtype=torch.float64).unbind(1)  # every order of input and bounds, ties and min > max included


@pytest.mark.parametrize("name, fn", [
    ("clamp_tensor_bounds", lambda x, low, high: x.clamp(low, high)),
    ("clamp_min_tensor", lambda x, low, high: torch.clamp_min(x, low) + x.clamp(min=high)),
    ("clamp_max_tensor", lambda x, low, high: x.clamp_max(high) + torch.clamp(x, max=low)),
    ("clamp_number_bounds", lambda x, low, high: x.clamp(1.0, 1.0) + x.clamp(0.0, 2.0) + x.clamp(min=1.0) + (
        x.clamp(max=1.0) + x.clamp(2.0, 0.0)) * low),
    ("fmax_fmin", lambda x, low, high: torch.fmax(x, low) + torch.fmin(x, high)),
    ("margin_losses_at_their_kink", lambda x, low, high: F.hinge_embedding_loss(x, -torch.ones_like(x), margin=1.0) + (
        F.margin_ranking_loss(x, low, torch.ones_like(x)))),
])
def test_gradients_at_ties_follow_the_installed_torch(name, fn):
    """torch 2.14 changed these at ties (clamp strictly inside number bounds, a tensor bound sharing a tie, fmax as
    maximum, and the composites on clamp_min with them): the rules must give whichever torch is installed."""
    assert_matches_torch(fn, list(_TIES))
