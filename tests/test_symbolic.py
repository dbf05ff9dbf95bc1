"""tensorgraph.symbolic: closed forms derived from recorded chains, proven, fused, and checked.

Independent truths: sympy proofs against textbook formulas typed in here (n stays a
symbol), torch autograd and the engine on the atomic chain in float64, and formulas that
must NOT hold (a different forward must derive a different result).
"""

from __future__ import annotations

import inspect
import math
import time

import pytest
import sympy as sp
import torch
import torch.nn.functional as F

import tensorgraph as tg
from tensorgraph import symbolic
from tensorgraph.cli import main
from tensorgraph.lecture import record_exercise, setup
from tensorgraph.naming import set_names
from tensorgraph.rules import CLAMP_PASSES_AT_BOUND
from tensorgraph.symbolic import SymbolicError, fused_rules, fusion
from tensorgraph.symbolic.algebra import Sigmoid
from tensorgraph.symbolic.fusion import STATS, _derive, verify

D = torch.float64


@pytest.fixture(scope="module")
def lecture():
    graph, loss, ex = record_exercise(setup(dtype=D))
    return graph, loss, ex


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def record(fn, *inputs, weight=None):
    """Record ``fn(*inputs)`` (and, with ``weight``, a scalar loss after it); inputs are named after fn's parameters."""
    with tg.record() as graph:
        out = fn(*inputs)
        loss = (out * weight).sum() if weight is not None else out
    names = {node: data["name"] for node, data in enumerate(graph._nodes)
             if data["named"] and not data["name"].startswith("inputs")}
    for name, tensor in zip(inspect.signature(fn).parameters, inputs):
        names[graph.node_id(tensor)] = name
    set_names(graph, names)
    return graph, out, loss


def derive(fn, *inputs, wrt=0, tol=1e-9):
    """Derive d fn / d inputs[wrt]; then fuse the chain and check the fused backward numerically.

    graph.fuse replaces the chain by one node; backward through it must equal the atomic
    engine and torch autograd (float64) for every input, to ``tol``.
    """
    weight = torch.randn(fn(*inputs).shape, dtype=D, generator=_gen(7))
    graph, out, loss = record(fn, *inputs, weight=weight)
    d = symbolic.derive(graph, output=out, wrt=inputs[wrt])
    fused = graph.fuse(output=out, inputs=[inputs[wrt]])
    assert len(fused) <= len(graph) and any(data["op"] == "fused" for data in fused._nodes)
    atomic, ours = graph.backward(loss), fused.backward(loss)
    leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    reference = iter(torch.autograd.grad((fn(*leaves) * weight).sum(), [t for t in leaves if t.requires_grad]))
    for tensor in inputs:
        if tensor.is_floating_point():
            want = next(reference)
            assert (ours[tensor] - atomic[tensor]).abs().max() <= tol
            assert (ours[tensor] - want).abs().max() <= tol * max(1.0, float(want.abs().max()))
    return d


# ---------------------------------------------------------------------- the lecture's two chains


def test_cross_entropy_of_the_lecture(lecture):
    graph, loss, _ = lecture
    symbolic.clear_cache()
    start = time.perf_counter()
    d = symbolic.derive(graph, output=loss, wrt="logits")
    print(f"\nlecture cross-entropy derived in {time.perf_counter() - start:.2f} s")
    s = d.symbols
    n, j, dloss = s["n"], s["j"], s["dloss"]
    assert isinstance(n, sp.Symbol) and n in d.grad("logits").free_symbols  # n stays symbolic
    textbook = dloss * (s["probs"] - sp.KroneckerDelta(j, s["Yb"])) / n
    assert d.prove(textbook)
    softmax = sp.exp(s["logits"]) / d.sum(sp.exp(s["logits"]), "j")
    assert d.prove(dloss * (softmax - sp.KroneckerDelta(j, s["Yb"])) / n)
    assert not d.prove(dloss * (s["probs"] - sp.KroneckerDelta(j, s["Yb"])))  # the 1/n matters
    assert d.grad("logit_maxes") == 0  # the max-subtraction cancels, identically
    assert d.expr.has(symbolic.AxisSum) and s["logit_maxes"] not in d.expr.free_symbols
    assert d.prove(d.expr)
    assert r"\mathrm{probs}" in d.latex and "\\delta" in d.latex
    assert ".sum(1, keepdim=True)" in d.source and "def " in d.source
    assert "identically zero" in d.steps and "$$" in d.steps and "through `logit_maxes`" in d.steps



def test_the_steps_of_a_scalar_chain_read_as_a_handout():
    """micrograd's neuron, o = tanh(x1*w1 + bias): the steps said 'one element at a time: .' and numbered their
    sections 1, 3, 4, 5, 6 (no reductions, so no section 2). The closed form is torch autograd's gradient."""
    x1, w1, bias = (torch.tensor(v, dtype=torch.float64) for v in (2.0, -3.0, 6.5))
    with tg.record() as graph:
        o = torch.tanh(x1 * w1 + bias)
    d = symbolic.derive(graph, output=o, wrt=w1)
    assert "Every tensor is a scalar." in d.steps and "one element at a time" not in d.steps
    sections = [line.split(".")[0] for line in d.steps.splitlines() if line[:3] in {f"**{k}" for k in range(1, 10)}]
    assert sections == ["**1", "**2", "**3", "**4", "**5"], sections
    assert "rules of step" not in d.steps
    w = w1.clone().requires_grad_()
    (truth,) = torch.autograd.grad(torch.tanh(x1 * w + bias), w)
    s = d.symbols
    value = d.textbook.subs({s["do"]: 1, s["x1"]: 2.0, s["o"]: math.tanh(2.0 * -3.0 + 6.5)})
    assert abs(float(value) - truth.item()) < 1e-12
    # with reductions, the sections keep 1 to 6 and refer to each other by those numbers
    bn = symbolic.derive(record_exercise(setup(dtype=torch.float64))[0], output="hpreact", wrt="hprebn")
    assert "rules of step 2" in bn.steps and "Step 4 left it" in bn.steps and "**6. The fused backward" in bn.steps


def _lecture_batchnorm(d, correction, gain="bngain"):
    s = d.symbols
    n, dy, raw = s["n"], s["d" + d.output], s["bnraw"]
    return s[gain] * s["bnvar_inv"] / n * (n * dy - d.sum(dy, "i") - correction * raw * d.sum(dy * raw, "i"))


def test_batchnorm_of_the_lecture(lecture):
    graph, _, _ = lecture
    start = time.perf_counter()
    d = symbolic.derive(graph, output="hpreact", wrt="hprebn")
    print(f"\nlecture batchnorm derived in {time.perf_counter() - start:.2f} s")
    n = d.symbols["n"]
    assert d.prove(_lecture_batchnorm(d, n / (n - 1)))  # the lecture's formula, Bessel's correction
    assert not d.prove(_lecture_batchnorm(d, 1))
    s = d.symbols
    assert d.prove(d.sum(s["dhpreact"] * s["bnraw"], "i"), wrt="bngain")
    assert d.prove(d.sum(s["dhpreact"], "i"), wrt="bnbias")
    assert d.textbook.free_symbols >= {s["bnraw"], s["bnvar_inv"], s["bngain"]}  # the textbook's own tensors
    assert s["hprebn"] not in d.textbook.free_symbols
    assert set(d.gradients) == {"hprebn", "bngain", "bnbias"}
    assert "0.03225806451612903 is 1/(n - 1)" in d.steps and "0.03125 is 1/n" in d.steps


def test_lecture_derivations_are_cached(lecture):
    graph, loss, _ = lecture
    first = symbolic.derive(graph, output=loss, wrt="logits")
    hits = STATS["cached"]
    again, _ = record_exercise(setup(dtype=D, seed=5))[:2]  # same structure, other values
    second = symbolic.derive(again, output="loss", wrt="logits")
    assert second is first and STATS["cached"] == hits + 1
    fused = again.fuse(output="loss", inputs="logits")  # the cached rule is right on the new values
    want = again.backward("loss")
    got = fused.backward("loss")
    assert all((got[name] - want[name]).abs().max() <= 1e-9 for name in got)


# ---------------------------------------------------------------------- each forward derives its own form


def batchnorm(h, gain, bias, *, biased=False, eps=1e-5, dim=0):
    """The lecture's batchnorm lines, with the variance, eps and the reduced dimension as options."""
    n = h.shape[dim]
    bnmeani = 1 / n * h.sum(dim, keepdim=True)
    bndiff = h - bnmeani
    bndiff2 = bndiff**2
    bnvar = (1 / n if biased else 1 / (n - 1)) * bndiff2.sum(dim, keepdim=True)
    bnvar_inv = (bnvar + eps) ** -0.5
    bnraw = bndiff * bnvar_inv
    hpreact = gain * bnraw + bias
    return hpreact


def _bn_inputs(rows=8, cols=5, dim=0):
    g = _gen(1)
    shape = (1, cols) if dim == 0 else (rows, 1)
    return torch.randn(rows, cols, dtype=D, generator=g), torch.randn(shape, dtype=D, generator=g) + 1, \
        torch.randn(shape, dtype=D, generator=g)


def test_biased_variance_derives_its_own_form():
    d = derive(lambda h, gain, bias: batchnorm(h, gain, bias, biased=True), *_bn_inputs())
    assert d.prove(_lecture_batchnorm(d, 1, "gain"))
    n = d.symbols["n"]
    assert not d.prove(_lecture_batchnorm(d, n / (n - 1), "gain"))


@pytest.mark.parametrize("eps", [1e-3, 0.5])
def test_another_eps_derives_its_own_form(eps):
    d = derive(lambda h, gain, bias: batchnorm(h, gain, bias, eps=eps), *_bn_inputs())
    s = d.symbols
    n, dy = s["n"], s["d" + d.output]

    def form(epsilon):  # the lecture's formula with bnvar_inv written out from bnvar
        inv = (s["bnvar"] + epsilon) ** sp.Rational(-1, 2)
        raw = s["bndiff"] * inv
        return s["gain"] * inv / n * (n * dy - d.sum(dy, "i") - n / (n - 1) * raw * d.sum(dy * raw, "i"))

    assert d.prove(form(sp.nsimplify(eps)))
    assert not d.prove(form(sp.Rational(1, 100000)))
    assert sp.nsimplify(eps) in d.grad("h").atoms(sp.Rational)


def test_reduction_over_rows_instead_of_columns():
    inputs = _bn_inputs(dim=1)
    d = derive(lambda h, gain, bias: batchnorm(h, gain, bias, dim=1), *inputs)
    s = d.symbols
    m, dy, raw = s["n_j"], s["d" + d.output], s["bnraw"]
    rows = s["gain"] * s["bnvar_inv"] / m * (m * dy - d.sum(dy, "j") - m / (m - 1) * raw * d.sum(dy * raw, "j"))
    assert d.prove(rows)
    assert not d.prove(rows.xreplace({s["j"]: s["i"], m: s["n"]}))  # the same formula over the other axis


def lecture_cross_entropy(logits, Yb, reduction="mean"):
    n = logits.shape[0]
    logit_maxes = logits.max(1, keepdim=True).values
    norm_logits = logits - logit_maxes
    counts = norm_logits.exp()
    counts_sum = counts.sum(1, keepdims=True)
    counts_sum_inv = counts_sum**-1
    probs = counts * counts_sum_inv
    logprobs = probs.log()
    picked = logprobs[range(n), Yb]
    return -picked.mean() if reduction == "mean" else -picked.sum()


def _ce_inputs():
    return torch.randn(7, 5, dtype=D, generator=_gen(2)) * 3, torch.tensor([0, 4, 1, 1, 3, 2, 0])


def test_sum_instead_of_mean_in_the_loss():
    d = derive(lambda x, y: lecture_cross_entropy(x, y, "sum"), *_ce_inputs())
    s = d.symbols
    delta = sp.KroneckerDelta(s["j"], s["y"])
    assert d.prove(s["dout"] * (s["probs"] - delta))
    assert not d.prove(s["dout"] * (s["probs"] - delta) / s["n"])
    assert d.grad("logit_maxes") == 0


def test_functional_cross_entropy_is_lowered_to_the_same_chain():
    for reduction, scale in (("mean", 1), ("sum", 0)):
        d = derive(lambda x, y, r=reduction: F.cross_entropy(x, y, reduction=r), *_ce_inputs())
        s = d.symbols
        x = s["x"]
        softmax = sp.exp(x) / d.sum(sp.exp(x), "j")
        form = s["dout"] * (softmax - sp.KroneckerDelta(s["j"], s["y"]))
        assert d.prove(form / s["n"] if scale else form)
        assert "log_softmax" in d.source  # saved tensors are recomputed with torch's stable kernel


def _x(rows=6, cols=5, seed=3):
    return torch.randn(rows, cols, dtype=D, generator=_gen(seed))


def test_softmax_functional_and_by_hand():
    def by_hand(x):
        shifted = x - x.amax(1, keepdim=True)
        return shifted.exp() / shifted.exp().sum(1, keepdim=True)

    for fn in (lambda x: F.softmax(x, dim=1), by_hand):
        d = derive(fn, _x())
        s = d.symbols
        y, dy = s["out"], s["dout"]
        assert d.prove(y * (dy - d.sum(dy * y, "j")))
        assert not d.prove(y * (dy - d.sum(dy * y, "i")))  # summed over the wrong axis


def test_log_softmax():
    d = derive(lambda x: F.log_softmax(x, dim=1), _x())
    s = d.symbols
    assert d.prove(s["dout"] - sp.exp(s["out"]) * d.sum(s["dout"], "j"))
    d = derive(lambda x: F.log_softmax(x, dim=0), _x())
    s = d.symbols
    assert d.prove(s["dout"] - sp.exp(s["out"]) * d.sum(s["dout"], "i"))


def _layer_norm_form(d, x, w, eps):
    s, j = d.symbols, "j"
    m = s["n_j"]
    mu = d.sum(x, j) / m
    rstd = (d.sum((x - mu) ** 2, j) / m + eps) ** sp.Rational(-1, 2)
    xhat, dxhat = (x - mu) * rstd, s["dout"] * w
    return rstd / m * (m * dxhat - d.sum(dxhat, j) - xhat * d.sum(dxhat * xhat, j))


def test_layer_norm_over_the_last_dimension():
    w, b = torch.randn(5, dtype=D, generator=_gen(4)), torch.randn(5, dtype=D, generator=_gen(5))

    def by_hand(x, w, b, eps=1e-5):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w + b

    for fn in (lambda x, w, b: F.layer_norm(x, (5,), w, b), by_hand):
        d = derive(fn, _x(), w, b)
        s = d.symbols
        assert d.prove(_layer_norm_form(d, s["x"], s["w"], sp.Rational(1, 100000)))
        assert d.prove(d.sum(s["dout"], "i"), wrt="b")


def test_layer_and_batch_norm_derive_with_respect_to_their_weight_and_bias():
    """The chain starts at the weight (or bias): the normalised tensor enters from outside, and its axes line up
    with the weight's. It raised 'TypeError: object of type NoneType has no len()' (wrapped in SymbolicError)."""
    w, b = torch.randn(5, dtype=D, generator=_gen(4)) + 1, torch.randn(5, dtype=D, generator=_gen(5))
    for fn in (lambda x, w, b: F.layer_norm(x, (5,), w, b),
               lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True)):
        for wrt in (1, 2):
            d = derive(fn, _x(), w, b, wrt=wrt)  # fused from the weight or bias: every gradient equals torch's
            s = d.symbols
            assert d.prove(d.sum(s["dout"], "j"), wrt="b")  # the bias: summed over the rows (the input's axis i)


def test_rms_norm_and_mse_extras():
    w = torch.randn(5, dtype=D, generator=_gen(6))

    def rms_norm(x, w, eps=1e-6):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    d = derive(rms_norm, _x(), w)
    s = d.symbols
    x, m, dy = s["x"], s["n_j"], s["dout"]
    rstd = (d.sum(x**2, "j") / m + sp.Rational(1, 10**6)) ** sp.Rational(-1, 2)
    assert d.prove(rstd * dy * s["w"] - x * rstd**3 / m * d.sum(dy * s["w"] * x, "j"))

    target = _x(seed=9)
    for fn in (lambda p, t: ((p - t) ** 2).mean(), lambda p, t: F.mse_loss(p, t)):
        d = derive(fn, _x(), target)
        s = d.symbols
        assert d.prove(2 * s["dout"] * (s["p"] - s["t"]) / (s["n"] * s["n_j"]))
        assert d.prove(-2 * s["dout"] * (s["p"] - s["t"]) / (s["n"] * s["n_j"]), wrt="t")


def test_more_reductions_and_elementwise_ops():
    cases = [
        lambda x: x.var(0, keepdim=True),
        lambda x: x.std(1),
        lambda x: torch.logsumexp(x, 1),
        lambda x: torch.tanh(x) * torch.sigmoid(x) + x.relu() - x.abs().sqrt(),
        lambda x: (x.exp() - 1).log1p().sum(1) / x.shape[1],
        lambda x: x.amax(0) + x.min(1, keepdim=True).values,
        lambda x: (x * 3.0 - 1).mean(),
        lambda x: x / x.norm(dim=1, keepdim=True),
        lambda x: torch.linalg.vector_norm(x, dim=0),
        lambda x: F.gelu(x).mean(1) + F.softplus(x).sum(1) + torch.erf(x).sum(1),
    ]
    for fn in cases:
        derive(fn, _x())


def test_standardising_by_the_sample_std_proves_its_textbook_form():
    # the rule for sum_i x**2 read through a variance with Bessel's correction must cancel its 1/(n - 1)s
    # (n**2/(n - 1) - n/(n - 1) is n), or the sums that should vanish never meet: both proofs failed
    d = derive(lambda x: (x - x.mean(0)) / x.std(0), _x())
    s = d.symbols
    x, n, dy = s["x"], s["n"], s["dout"]
    mu = d.sum(x, "i") / n
    std = sp.sqrt(d.sum((x - mu) ** 2, "i") / (n - 1))
    y = (x - mu) / std
    assert d.prove((dy - d.sum(dy, "i") / n - y * d.sum(dy * y, "i") / (n - 1)) / std)
    assert not d.prove((dy - d.sum(dy, "i") / n - y * d.sum(dy * y, "i") / n) / std)
    assert d.prove(d.expr)  # the derivation's own written-out form

    # the same through x.var() and rsqrt: the root's base (n_j*var - var)/(n_j - 1) + eps must read var + eps
    d = derive(lambda x: (x - x.mean(1, keepdim=True)) * torch.rsqrt(x.var(1, keepdim=True) + 1e-5), _x())
    s = d.symbols
    x, m, dy = s["x"], s["n_j"], s["dout"]
    mu = d.sum(x, "j") / m
    rstd = (d.sum((x - mu) ** 2, "j") / (m - 1) + sp.Rational(1, 100000)) ** sp.Rational(-1, 2)
    y = (x - mu) * rstd
    assert d.prove(rstd * (dy - d.sum(dy, "j") / m - y * d.sum(dy * y, "j") / (m - 1)))
    assert d.prove(d.expr)


def test_gelu_tanh_approximation_derives_and_is_not_taken_for_the_exact_one():
    # GPT-2's gelu (nn.GELU(approximate="tanh")): derivable, and its cached derivation never serves the exact gelu
    symbolic.clear_cache()
    for fn in (lambda x: F.gelu(x, approximate="tanh").sum(1), lambda x: F.gelu(x).sum(1),
               lambda x: F.gelu(x, approximate="tanh") * 2.0, lambda x: F.gelu(x, approximate="tanh") + F.gelu(x)):
        derive(fn, _x() * 3)
    graph, out, _ = record(lambda x: F.gelu(x, approximate="tanh"), _x())
    assert "tanh" in str(symbolic.derive(graph, output=out, wrt=0).textbook)


def test_an_odd_power_of_the_input_is_not_inverted_to_a_root():
    """x**3 inverted to x = pow_1**(1/3) is the principal root: NaN in torch for x < 0. Every chain through a cube
    of its input was refused by the numerical check, and with check=False its code returned NaN."""
    for fn in (lambda x: (x**3).sin(), lambda x: (x.pow(3) * 2.0 + x).tanh(), lambda x: torch.exp(x**5 * 0.1)):
        d = derive(fn, _x())  # fused: equal to torch autograd in float64
        assert not any(p.exp.is_Rational and not p.exp.is_Integer for p in d.textbook.atoms(sp.Pow)), d.textbook
    graph, out, _ = record(lambda x: (x**3).sin(), _x())
    symbolic.clear_cache()
    d = symbolic.derive(graph, output=out, wrt=0, check=False)
    x = _x().requires_grad_()
    (want,) = torch.autograd.grad((x**3).sin().sum(), x)
    (got,) = d.backward(torch.ones(6, 5, dtype=D), x.detach())
    assert (got - want).abs().max() <= 1e-12


def test_gelu_written_out_reads_in_its_input():
    """0.5*x is a rescaled copy of x, not a saved tensor worth writing the gradient in: the GELU written out
    read 0.856*mul_1**3*tanh_1**2 ... (mul_1 = 0.5*x) where 0.107*x**3*tanh_1**2 ... is meant."""
    def gelu(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    d = derive(gelu, _x() * 3)
    s = d.symbols
    assert s["x"] in d.textbook.free_symbols and s["tanh_1"] in d.textbook.free_symbols
    assert s["mul_1"] not in d.textbook.free_symbols, d.textbook
    # proofs compare float constants at float64's precision: the same product multiplied out in another order
    # (0.10703222440890038/2 against 0.05351611220445019) differed in the 19th digit and read 'not equal'
    assert d.prove(d.expr)
    x, dy = s["x"], s["dout"]
    c, a = sp.Float(math.sqrt(2 / math.pi)), sp.Float(0.044715)
    t = sp.tanh(c * (x + a * x**3))
    assert d.prove(dy * ((1 + t) / 2 + x / 2 * (1 - t**2) * c * (1 + 3 * a * x**2)))
    assert not d.prove(dy * ((1 + t) / 2 + x / 2 * (1 - t**2) * c * (1 + 3 * 0.04472 * x**2)))


def test_a_layer_norm_over_two_dimensions_puts_both_sizes_in_front():
    d = derive(lambda x: F.layer_norm(x, (4, 5)), torch.randn(3, 4, 5, dtype=D, generator=_gen(3)))
    s = d.symbols
    coeff, rest = d.textbook.as_independent(sp.Add)
    assert coeff == s["out_inv"] / (s["n_j"] * s["n_k"]), d.textbook  # not out_inv/n_j, then /n_k inside
    assert all(sp.fraction(term)[1] == 1 for term in sp.Add.make_args(rest)), d.textbook
    dy, y = s["dout"], s["out"]
    total = d.sum(d.sum(dy, "k"), "j")
    assert d.prove(coeff * (s["n_j"] * s["n_k"] * dy - total - y * d.sum(d.sum(dy * y, "k"), "j")))


def test_saved_denominators_are_reused():
    """x / (x.std(0) + eps): the saved std + eps is the denominator (it read 100000*(dout - ...)/(100000*std + 1));
    sqrt(x**2 + eps) divides as the saved root (it read x/sqrt(x**2 + 1.0e-8))."""
    def standardise(x):
        std = x.std(0, keepdim=True)
        denom = std + 1e-5
        return (x - x.mean(0, keepdim=True)) / denom

    d = derive(standardise, _x())
    s = d.symbols
    assert s["denom"] in d.textbook.free_symbols and not d.textbook.has(sp.Integer(100000)), d.textbook
    n, dy, diff = s["n"], s["dout"], s["std_diff"]
    assert d.prove((dy - d.sum(dy, "i") / n - diff * d.sum(dy * diff, "i") / ((n - 1) * s["std"] * s["denom"]))
                   / s["denom"])
    d = derive(lambda x: torch.sqrt(x**2 + 1e-8).sum(), _x())
    s = d.symbols
    assert d.textbook == s["dout"] * s["x"] / s["sqrt_1"], d.textbook


def test_proofs_read_sigmoid_hyperbolics_and_float_constants_as_written():
    """A correct formula written the usual way proves: sigmoid as 1/(1 + exp(-x)) (the derivation keeps sigmoid
    whole), 1/cosh(x)**2 for 1 - tanh(x)**2, eps typed as the float 1e-6. All three read 'not equal'."""
    d = derive(lambda x: x * torch.sigmoid(x), _x())
    x, dy = d.symbols["x"], d.symbols["dout"]
    sigmoid = 1 / (1 + sp.exp(-x))
    assert d.prove(dy * sigmoid * (1 + x * (1 - sigmoid)))
    assert not d.prove(dy * sigmoid * (1 + x * (1 + sigmoid)))
    d = derive(lambda x: F.softplus(x), _x())
    x, dy = d.symbols["x"], d.symbols["dout"]
    # torch's softplus is x itself past its threshold (20), so its gradient is 1 there
    assert d.prove(sp.Piecewise((dy, x > 20), (dy * sp.exp(x) / (1 + sp.exp(x)), True)))
    assert not d.prove(dy * sp.exp(x) / (1 + sp.exp(x)))
    d = derive(lambda x: torch.tanh(x), _x())
    assert d.prove(d.symbols["dout"] / sp.cosh(d.symbols["x"]) ** 2)
    assert not d.prove(d.symbols["dout"] / sp.cosh(d.symbols["x"]))

    def rms_norm(x, w, eps=1e-6):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    d = derive(rms_norm, _x(), torch.randn(5, dtype=D, generator=_gen(6)))
    s = d.symbols
    x, m, dy, w = s["x"], s["n_j"], s["dout"], s["w"]
    for eps in (sp.Float(1e-6), sp.Rational(1, 10**6)):
        rstd = (d.sum(x**2, "j") / m + eps) ** sp.Rational(-1, 2)
        assert d.prove(rstd * dy * w - x * rstd**3 / m * d.sum(dy * w * x, "j"))
    assert not d.prove(rstd * dy * w - x * rstd**3 / m * d.sum(dy * w * x, "j") * 2)


def test_trigonometric_and_hyperbolic_ops():
    d = derive(lambda x: torch.tan(x * 0.5).sum(1) + x.atan().sinh().sum(1), _x())
    s = d.symbols
    x, dy = s["x"], s["dout"]
    assert d.prove(dy * (sp.Rational(1, 2) * (1 + sp.tan(x / 2) ** 2) + sp.cosh(sp.atan(x)) / (1 + x**2)))
    derive(lambda x: (x * 0.3).asin() * (x * 0.2).acos() + (x * 0.4).atanh() - x.cosh() * x.asinh(), _x())
    derive(lambda x: (x.abs() + 1.5).acosh().mean(0), _x())


def test_the_arange_pick_negative_targets_and_scalar_parameters():
    """x[torch.arange(n), y] (arange recorded inside the block or made before it), y < 0, 0-dim parameters."""
    x, y = _ce_inputs()
    rows = torch.arange(7)
    negative = torch.tensor([0, -1, 1, -5, 3, 2, -2])  # torch counts negative class indices from the end
    for fn, targets in ((lambda x, y: -x.log_softmax(1)[torch.arange(x.shape[0]), y].mean(), y),
                        (lambda x, y, rows=rows: -x.log_softmax(1)[rows, y].mean(), y),
                        (lambda x, y: -x.log_softmax(1)[range(x.shape[0]), y].mean(), negative)):
        d = derive(fn, x, targets)  # derived, checked, fused: the fused backward equals torch autograd
        s = d.symbols
        softmax = sp.exp(s["x"]) / d.sum(sp.exp(s["x"]), "j")
        assert d.prove(s["dout"] * (softmax - sp.KroneckerDelta(s["j"], s["y"])) / s["n"])
    temperature = torch.tensor(0.7, dtype=D)
    derive(lambda x, t: (x / t).pow(2).sum(), _x(), temperature)  # 0-dim parameter: d t is a 0-dim gradient
    mask = (torch.rand(6, 5, generator=_gen(4)) > 0.3).to(D)
    derive(lambda x, m: (x**2 * m).sum() / m.sum(), _x(), mask)  # a masked mean
    derive(lambda t, x: (x / t).pow(2).sum(), temperature, _x())  # a 0-dim input


def test_constants_are_lifted_to_sizes_only_when_unambiguous():
    d = derive(lambda x: x.sum(0, keepdim=True) / x.shape[0] * 0.5, _x())
    assert d.symbols["n"] in d.grad("x").free_symbols
    assert "is n" in d.steps or "is 1/n" in d.steps
    with tg.record() as graph:  # n = 2: 1.0 could be n - 1 or 1/(n - 1)
        x = _x(rows=2)
        y = 1.0 * x.sum(0, keepdim=True)
    d = symbolic.derive(graph, output=y, wrt=x)
    assert d.symbols["n"] not in d.grad("x").free_symbols


def test_a_constant_equal_to_a_size_is_that_size_only_at_the_recorded_shapes():
    """4.0 with 5 columns reads as n_j - 1: exact at the recorded shapes, refused (not wrong) at others."""
    def fn(x):
        s = x.sum(1)
        scaled = s * 4.0  # a plain number that happens to equal n_j - 1
        return scaled.pow(2).sum()

    x, wider, g = _x(6, 5), _x(6, 9), torch.tensor(1.0, dtype=D)
    d = derive(fn, x)  # at the recorded shapes the fused backward equals torch autograd
    assert "the constant 4.0 is n_j - 1" in d.steps
    with pytest.raises(SymbolicError, match=r"read the constant 4.0 at 'scaled' \(mul at .*test_symbolic.py:\d+\) "
                                            r"as n_j - 1; with shapes \[\(6, 9\)\]"):
        d.backward(g, wider)
    reference = x.clone().requires_grad_()
    want = torch.autograd.grad(fn(reference), reference)[0]
    assert (d.backward(g, x)[0] - want).abs().max() <= 1e-12 * want.abs().max()
    s = d.symbols
    proof = d.prove(2 * s["dout"] * 16 * s["s"])  # true for this forward, but not with n_j symbolic
    assert not proof and "holds at the recorded sizes (n = 6, n_j = 5) only" in str(proof)
    assert not d.prove(2 * s["dout"] * 9 * s["s"]).note  # a wrong formula gets no such note

    plain = derive(lambda x: x.sum(1).pow(2).sum(), x)  # nothing lifted: the code runs at any shape
    reference = wider.clone().requires_grad_()
    want = torch.autograd.grad(reference.sum(1).pow(2).sum(), reference)[0]
    assert (plain.backward(g, wider)[0] - want).abs().max() <= 1e-12 * want.abs().max()


# ---------------------------------------------------------------------- fuse and auto_fuse on the lecture


def test_fuse_the_lecture_chains(lecture):
    graph, loss, _ = lecture
    before = len(graph)
    atomic = graph.backward(loss)
    fused = graph.fuse(output=loss, inputs=["logits"])
    fused = fused.fuse(output="hpreact", inputs="hprebn")
    assert len(graph) == before  # the original is untouched
    assert len(fused) == before - 19
    ops = {data["name"]: data for data in fused._nodes if data["op"] == "fused"}
    assert set(ops) == {"loss", "hpreact"} and all(data["rule"] is not None for data in ops.values())
    assert "probs" not in fused.names and "bnraw" not in fused.names
    grads = fused.backward(loss)
    for name in grads:
        assert (grads[name] - atomic[name]).abs().max() <= 1e-9, name
    assert {"bngain", "bnbias", "W1", "C"} <= set(grads)
    report = fused.compare(loss)  # the fused node's forward replays the chain under torch autograd
    assert report.ok and "hprebn" in {row.name for row in report.rows}


def test_auto_fuse_finds_both_chains(lecture):
    graph, loss, _ = lecture
    pairs = symbolic.find_fusable(graph, loss)
    names = {(graph._nodes[o]["name"], graph._nodes[i]["name"]) for o, i in pairs}
    assert names == {("loss", "matmul_2"), ("h", "matmul_1")}
    fused = symbolic.auto_fuse(graph, loss)
    assert sum(data["op"] == "fused" for data in fused._nodes) == 2
    atomic, grads = graph.backward(loss), fused.backward(loss)
    assert {"C", "W1", "b1", "bngain", "bnbias", "W2", "b2"} <= set(grads)
    for name in grads:
        assert (grads[name] - atomic[name]).abs().max() <= 1e-9, name


def _ordinary_graphs():
    """Forward passes of everyday models (a dropout mask, running statistics, 0-dim tensors, an arange pick)."""
    torch.manual_seed(0)
    X, Y = torch.randn(5, 4, dtype=D), torch.randint(0, 3, (5,))
    mask, temperature = (torch.rand(5, 3) > 0.3).to(D), torch.tensor(0.7, dtype=D)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    return model, {
        "batchnorm module": lambda W: F.cross_entropy(model(X @ W @ W.T), Y),
        "dropout": lambda W: F.dropout(X @ W, 0.5, training=True).pow(2).sum(),
        "detached scale": lambda W: ((X @ W) / (X @ W).std().detach()).pow(2).sum(),
        "arange pick": lambda W: -(X @ W).log_softmax(1)[torch.arange(5), Y].mean(),
        "masked mean": lambda W: (((X @ W) - 1) ** 2 * mask).sum() / mask.sum(),
        "0-dim scale": lambda W: ((X @ W) * temperature).tanh().pow(2).mean(),
        "sum of losses": lambda W: sum([F.cross_entropy(X @ W, Y), ((X @ W) ** 2).mean()]),
    }


@pytest.mark.parametrize("case", list(_ordinary_graphs()[1]))
def test_auto_fuse_on_ordinary_graphs(case):
    model, forwards = _ordinary_graphs()
    forward = forwards[case]
    W = torch.randn(4, 3, dtype=D, generator=_gen(13))
    torch.manual_seed(1)  # the same dropout mask in the recording and in the reference
    with tg.record() as graph:
        loss = forward(W)
    buffers = [b.clone() for b in model.buffers()]
    assert symbolic.find_fusable(graph, loss)
    fused = symbolic.auto_fuse(graph, loss)
    assert any(data["op"] == "fused" for data in fused._nodes)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # the check replays on copies
    grads = fused.backward(loss)  # before the reference's forward updates the running statistics
    leaves = [W, *model.parameters()]
    reference = W.clone().requires_grad_()
    torch.manual_seed(1)
    want = torch.autograd.grad(forward(reference), [reference, *model.parameters()], allow_unused=True)
    for tensor, expected in zip(leaves, want):
        if expected is not None:
            assert (grads[tensor] - expected).abs().max() <= 1e-10 * max(1.0, float(expected.abs().max()))


def test_constants_and_running_statistics_take_no_gradient():
    x, w = _x(), torch.randn(5, 5, dtype=D, generator=_gen(14))
    model = torch.nn.BatchNorm1d(5).double()
    torch.manual_seed(2)
    with tg.record() as graph:
        h = x @ w
        loss = (model(F.dropout(h, 0.5, training=True)) / h.std().detach()).pow(2).sum()
    d = symbolic.derive(graph, output=loss, wrt=h)
    params = [p.name for p in d.chain.params]
    assert {"dropout_mask_1", "detach_1", "model.running_mean", "model.running_var", "model.weight"} <= set(params)
    assert set(d.gradients) == {"h", "model.weight", "model.bias"}
    grads = d.backward(torch.tensor(1.0, dtype=D), *[graph.node(n)["value"] for n in ["h", *params]])
    assert [name for name, grad in zip(["h", *params], grads) if grad is not None] == ["h", "model.weight",
                                                                                        "model.bias"]


_DETACHED = {
    "mse against a detached target": (lambda x: F.mse_loss(x, x.detach() * 0.5), {"mul_1"}),
    "centred by a detached mean": (lambda x: (x - x.detach().mean()).pow(2).mean(), {"mean_1"}),
    "weighted by a detached softmax": (lambda x: (x * x.detach().softmax(1)).sum(1, keepdim=True).tanh(),
                                       {"softmax_1"}),
    "standardised by detached statistics": (lambda x: ((x - x.detach().mean(0)) / x.detach().std(0)).pow(2).mean(),
                                            {"mean_1", "std_1"}),
}


@pytest.mark.parametrize("case", list(_DETACHED))
def test_a_detached_tensor_is_a_constant_of_the_chain(case):
    """x.detach() and what is computed from it alone enter the chain as parameters (constants, as torch's gradient
    treats them): derive and graph.fuse give torch autograd's gradient (float64), and they are no op of the chain
    (once lowered with axes of their own: 'operands line up axis i with axis k')."""
    fn, constants = _DETACHED[case]
    d = derive(fn, _x(), tol=1e-12)
    assert {p.name for p in d.chain.params} == constants
    assert set(d.gradients) == {"x"} | constants  # their gradients stop at the detach, as torch's do


def test_a_detached_tensor_feeds_the_auto_fused_and_compiled_chain():
    X, W = torch.randn(6, 4, dtype=D, generator=_gen(2)), torch.randn(4, 3, dtype=D, generator=_gen(3))

    def forward(W):
        h = X @ W
        return F.mse_loss(h, h.detach() * 0.5) + (h - h.detach().mean()).pow(2).mean()

    with tg.record() as graph:
        loss = forward(W)
    fused = symbolic.auto_fuse(graph, loss)
    nodes = [data for data in fused._nodes if data["op"] == "fused"]
    assert [[fused._nodes[i]["name"] for i in data["inputs"]] for data in nodes] == [["h", "mul_1", "mean_1"]]
    leaf = W.clone().requires_grad_()
    want, = torch.autograd.grad(forward(leaf), leaf)
    step = tg.compile(lambda: forward(W), fuse=True)
    for grads in (fused.backward(loss), step()[1]):
        assert (grads[W] - want).abs().max() <= 1e-12 * max(1.0, float(want.abs().max()))
    assert step.fused


def test_an_output_reached_only_through_a_detached_tensor_is_refused_by_name():
    x = _x()
    with tg.record() as graph:
        y = (x.detach() * 2).sum()
    with pytest.raises(SymbolicError, match=r"'y' \(sum at .*\) depends on 'x' .* only through tensors without a "
                                            r"gradient"):
        symbolic.derive(graph, output=y, wrt=x)


# ---------------------------------------------------------------------- errors and the safety net


def test_unsupported_subgraphs_name_the_node(lecture):
    graph, loss, _ = lecture
    with pytest.raises(SymbolicError, match=r"'matmul_2' \(matmul at .*lecture.py:\d+\).*contraction"):
        symbolic.derive(graph, output=loss, wrt="h")
    with pytest.raises(SymbolicError, match="one input tensor; got 2"):
        graph.fuse(output=loss, inputs=["logits", "Yb"])
    with pytest.raises(SymbolicError, match="does not depend on"):
        symbolic.derive(graph, output="hprebn", wrt="logits")
    with tg.record() as g:
        x = _x()
        y = (x[1:] * 2).sum()
    with pytest.raises(SymbolicError, match=r"getitem.*only x\[range\(n\), targets\]"):
        symbolic.derive(g, output=y, wrt=x)
    with tg.record() as g:
        x = _x(5, 5)
        y = x - x.sum(1)  # keepdim=True forgotten: lines row sums up with columns
    with pytest.raises(SymbolicError, match="keepdim=True missing"):
        symbolic.derive(g, output=y, wrt=x)


def test_bad_arguments_say_what_is_accepted(lecture):
    graph, loss, _ = lecture
    with pytest.raises(SymbolicError, match=r"the output must be a tensor recorded in this graph, its name or its "
                                            r"node id; there is no node 999 \(its node ids run from 0 to \d+\)"):
        symbolic.derive(graph, output=999, wrt="logits")
    with pytest.raises(SymbolicError, match=r"the wrt must be a tensor .*; got None$"):
        symbolic.derive(graph, output=loss, wrt=None)
    with pytest.raises(SymbolicError, match=r"the input must be a tensor .*; got 0.5 \(a float\)"):
        graph.fuse(loss, [0.5])
    # the text of a list of tensors or of an array was the whole message: thousands of characters, many lines
    with pytest.raises(SymbolicError, match=r"the wrt must be a tensor .*; got a list; give one tensor, not a list$"):
        symbolic.derive(graph, output=loss, wrt=[graph.value("logits")])
    with pytest.raises(SymbolicError, match=r"the wrt must be a tensor .*; got a ndarray$"):
        symbolic.derive(graph, output=loss, wrt=graph.value("logits").numpy())


def test_an_unforeseen_failure_is_refused_by_name(monkeypatch):
    """An internal error while deriving becomes a SymbolicError naming the chain; auto_fuse skips that chain."""
    def broken(*args):
        raise KeyError(3)

    monkeypatch.setattr(symbolic.fusion, "verify", broken)
    with tg.record() as graph:
        x = _x(3, 4)
        y = (x.exp() * 2.5).sum()
    with pytest.raises(SymbolicError, match=r"could not derive 'y' \(sum at .*test_symbolic.py:\d+\) with respect "
                                            r"to 'x' .*KeyError: 3"):
        symbolic.derive(graph, output=y, wrt=x)
    assert symbolic.find_fusable(graph, y) == []
    assert not any(data["op"] == "fused" for data in symbolic.auto_fuse(graph, y)._nodes)


def test_a_tensor_used_outside_the_chain_is_not_fused_away():
    with tg.record() as g:
        x = _x()
        probs = F.softmax(x, 1)
        picked = (probs * 2).sum()
        loss = picked + probs[0, 0]  # noqa: F841 - probs is used outside the chain
    with pytest.raises(SymbolicError, match="'probs'.*also used by"):
        g.fuse(output=picked, inputs=[x])


def test_a_wrong_rule_is_refused(lecture):
    graph, loss, _ = lecture
    d, binding = _derive(graph, graph.node_id(loss), graph.node_id("logits"))
    verify(d, graph, binding)
    honest = d.backward
    d.backward = lambda g, *args: tuple(t * 1.001 if t is not None else None for t in honest(g, *args))
    try:
        with pytest.raises(SymbolicError, match="disagrees with torch autograd"):
            verify(d, graph, binding)
    finally:
        d.backward = honest


# ---------------------------------------------------------------------- the rule table's fused rules


def _cross_entropy_by_the_derived_rule(x, y, reduction):
    """The engine's d F.cross_entropy / dx (asserted to come from the derived rule), and torch autograd's."""
    calls = fused_rules.CALLS["cross_entropy"]
    graph, _, loss = record(lambda x, y: F.cross_entropy(x, y, reduction=reduction), x, y)
    ours = graph.backward(loss)[x]
    assert fused_rules.CALLS["cross_entropy"] == calls + 1
    ref = x.clone().requires_grad_()
    return ours, torch.autograd.grad(F.cross_entropy(ref, y, reduction=reduction), ref)[0]


def test_functional_cross_entropy_and_batch_norm_use_the_derived_rules():
    x, y = _ce_inputs()
    for reduction in ("mean", "sum"):
        ours, want = _cross_entropy_by_the_derived_rule(x, y, reduction)
        assert (ours - want).abs().max() <= 1e-12
    calls = fused_rules.CALLS["cross_entropy"]
    graph, _, loss = record(lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1), x, y)
    graph.backward(loss)
    assert fused_rules.CALLS["cross_entropy"] == calls  # outside its scope: the general rule

    w, b = torch.randn(4, dtype=D, generator=_gen(8)), torch.randn(4, dtype=D, generator=_gen(9))
    for shape, affine in (((6, 4), True), ((3, 4, 5), True), ((6, 4), False)):
        h = torch.randn(shape, dtype=D, generator=_gen(10))
        weight = torch.randn(shape, dtype=D, generator=_gen(11))
        args = (w, b) if affine else (None, None)
        calls = fused_rules.CALLS["batch_norm"]
        graph, _, loss = record(lambda h, args=args, weight=weight: (
            F.batch_norm(h, None, None, *args, training=True) * weight).sum(), h)
        grads = graph.backward(loss)
        assert fused_rules.CALLS["batch_norm"] == calls + 1
        leaves = [t.clone().requires_grad_() for t in (h, *(args if affine else ()))]
        out = F.batch_norm(leaves[0], None, None, *(leaves[1:] if affine else (None, None)), training=True)
        want = torch.autograd.grad((out * weight).sum(), leaves)
        for tensor, expected in zip((h, w, b), want):
            assert (grads[tensor] - expected).abs().max() <= 1e-10


def test_cross_entropy_with_ignored_targets_keeps_float64():
    """The mean over the kept rows is rescaled in the gradient's dtype (an int count made the factor float32)."""
    x, _ = _ce_inputs()
    y = torch.tensor([0, -100, 1, -100, 3, -100, -100])  # 7/3 rounds differently in float32
    for reduction in ("mean", "sum"):
        ours, want = _cross_entropy_by_the_derived_rule(x, y, reduction)
        assert ours.dtype == D
        assert (ours - want).abs().max() <= 1e-12 * want.abs().max()
    for reduction in ("mean", "sum"):  # every row ignored: the loss is nan (0/0), torch's gradient 0
        ours, want = _cross_entropy_by_the_derived_rule(x, torch.full((7,), -100), reduction)
        assert torch.equal(ours, want) and torch.equal(want, torch.zeros_like(x))
    kept = torch.tensor([0, 4, 1, 1, 3, 2, 0])  # nothing ignored: exactly the closed form
    g = torch.tensor(1.0, dtype=D)
    closed = fused_rules.cross_entropy_derivation("mean").backward(g, x, kept)[0]
    assert torch.equal(fused_rules.cross_entropy(g, x, kept, None, -100, "mean", 0.0), closed)


def test_the_steps_name_tensorgraphs_own_lines_without_an_install_path(tmp_path, monkeypatch, capsys):
    """``tensorgraph derive --steps`` run from any folder printed the lecture's lines as
    ``(`max` at /home/.../site-packages/tensorgraph/lecture.py:84)`` in a handout."""
    import tensorgraph.lecture as lecture

    monkeypatch.chdir(tmp_path)
    assert main(["derive", "cross-entropy", "--steps"]) == 0
    out = capsys.readouterr().out
    with open(lecture.__file__, encoding="utf-8") as source:  # the line the step names is the lecture's max
        line = next(i for i, text in enumerate(source, 1) if "logit_maxes = logits.max(1" in text)
    assert f"(`max` at tensorgraph/lecture.py:{line})" in out, out[:1500]
    assert lecture.__file__ not in out and "site-packages" not in out


# ---------------------------------------------------------------------- the command line


def test_cli_derive(capsys):
    assert main(["derive", "cross-entropy"]) == 0
    out = capsys.readouterr().out
    assert "proved" in out and "dlogit_maxes = 0" in out and "def d_loss" in out
    assert main(["derive", "batchnorm", "--biased", "--latex"]) == 0
    out = capsys.readouterr().out
    assert r"\mathrm{dhprebn}_{ij}" in out and "n - 1" not in out
    assert main(["derive", "batchnorm", "--steps"]) == 0
    assert "### Gradient of `hpreact`" in capsys.readouterr().out
    assert main(["derive", "cross-entropy", "--biased"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--biased applies to the batchnorm chain only" in err
    assert main(["derive", "softmax"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["derive", "Cross_Entropy"]) == 0  # spelled as in F.cross_entropy
    assert "def d_loss" in capsys.readouterr().out


def test_the_fused_graph_keeps_the_guard_on_changed_leaves():
    x, y = _ce_inputs()
    w = torch.randn(5, 5, dtype=D, generator=_gen(12))
    with tg.record() as graph:
        loss = lecture_cross_entropy(x @ w, y)
    fused = graph.fuse(loss, "logits")
    fused.backward(loss)
    w.data -= 0.1  # changes the recorded value without a version bump
    with pytest.raises(RuntimeError, match="'w' was modified in place after it was recorded"):
        fused.backward(loss)


def test_fusing_an_anomaly_mode_graph():
    x, y = _ce_inputs()
    with tg.record(anomaly=True) as graph:  # every node fingerprinted, fused-away ones too
        loss = lecture_cross_entropy(x * 2.0, y)
    fused = symbolic.auto_fuse(graph, loss)
    assert (fused.backward(loss)[x] - graph.backward(loss)[x]).abs().max() <= 1e-12


# ---------------------------------------------------------------------- gradient hooks and fusion


def _hooked_cross_entropy(X, W, Y, *, inplace_hook=False):
    """Cross-entropy after a matmul, with a hook that doubles a gradient: on probs (inside the chain), or on
    the matmul's output before a recorded in-place update (a hook of an earlier version, outside the chain)."""
    h = (X @ W).sin()
    if inplace_hook:
        h.register_hook(lambda g: g * 3)
        h.mul_(2)
    probs = F.softmax(h, 1)
    if not inplace_hook:
        probs.register_hook(lambda g: g * 2)
    return -probs.log()[range(X.shape[0]), Y].mean()


@pytest.mark.parametrize("inplace_hook", [False, True])
def test_fusion_never_skips_a_gradient_hook(inplace_hook):
    """A hook on a tensor fused away would never run (graph.fuse refuses, auto_fuse leaves it atomic); the hooks
    of earlier versions of a tensor outside the chain are kept. Truth: torch autograd running the same hooks."""
    X, Y = _x(6, 4, seed=20), _ce_inputs()[1][:6]
    W = torch.randn(4, 5, dtype=D, generator=_gen(21), requires_grad=True)
    with tg.record() as graph:
        loss = _hooked_cross_entropy(X, W, Y, inplace_hook=inplace_hook)
    reference = W.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(_hooked_cross_entropy(X, reference, Y, inplace_hook=inplace_hook), reference)
    fused = [symbolic.auto_fuse(graph, loss)]
    if inplace_hook:
        fused.append(graph.fuse(loss, "h"))
    else:
        with pytest.raises(SymbolicError, match=r"'probs' \(softmax at .*test_symbolic.py:\d+\) has a gradient hook "
                                                r"\(hook .*<lambda> defined at .*test_symbolic.py:\d+\)"):
            graph.fuse(loss, "h")
    for graph_ in fused:
        assert any(data["op"] == "fused" for data in graph_._nodes)
        assert (graph_.backward(loss)[W] - want).abs().max() <= 1e-12


def test_a_cast_in_the_chain_is_kept_in_the_fused_backward():
    """``x.double()`` then layer norm with a float64 weight: the fused backward recomputes the normalised values
    in float64, as the forward did (the cast was dropped: a float64 gradient with float32 accuracy, 5e-7)."""
    x = torch.randn(6, 5, generator=_gen(22))
    w = torch.randn(5, dtype=D, generator=_gen(23))
    weight = torch.randn(6, 5, dtype=D, generator=_gen(24))

    def fn(x, w):
        return F.layer_norm(x.double(), (5,), w)

    graph, out, loss = record(fn, x, w, weight=weight)
    assert "x.to(torch.float64)" in symbolic.derive(graph, output=out, wrt=x).source
    grads = graph.fuse(output=out, inputs=x).backward(loss)
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    want = torch.autograd.grad((fn(*leaves) * weight).sum(), leaves)
    assert torch.equal(grads[x], want[0])
    assert (grads[w] - want[1]).abs().max() <= 1e-12


# ---------------------------------------------------------------------- chains too long to derive


def test_a_chain_too_long_to_derive_is_refused_in_seconds():
    """Two layer norms with a gelu between them multiply out past 100,000 terms: sympy took hours. The
    derivation stops at the size limit with an error naming the node; auto_fuse fuses a shorter chain
    (gradients as torch autograd's)."""
    w, b = torch.randn(5, dtype=D, generator=_gen(25)), torch.randn(5, dtype=D, generator=_gen(26))

    def two_norms(x, w, b):
        return F.layer_norm(F.gelu(F.layer_norm(x, (5,), w, b)), (5,))

    graph, out, loss = record(two_norms, _x(), w, b, weight=_x(seed=27))
    start = time.perf_counter()
    with pytest.raises(SymbolicError, match=r"the chain from 'x' \(leaf at .*\) is too long to derive in one piece: "
                                            r"the gradient of '\w+' \(\w+ at .*test_symbolic.py:\d+\) grew past "
                                            r"10,000 terms"):
        symbolic.derive(graph, output=out, wrt="x")
    print(f"\nrefused in {time.perf_counter() - start:.1f} s")
    with pytest.raises(SymbolicError, match="too long"):  # remembered: a training loop pays the attempt once
        symbolic.derive(graph, output=out, wrt="x")


def test_find_fusable_tries_ops_too_long_to_derive_once(monkeypatch):
    """The same ops seen from another of their inputs (a layer norm's weight or bias rather than its input) derive
    the same gradients: once the chain from one is too long, the others are not tried (seconds each)."""
    monkeypatch.setattr(symbolic.algebra, "SIZE_LIMIT", 60)
    symbolic.clear_cache()
    w, b = torch.randn(5, dtype=D, generator=_gen(25)), torch.randn(5, dtype=D, generator=_gen(26))
    graph, out, loss = record(lambda x, w, b: F.layer_norm(x, (5,), w, b), _x(), w, b, weight=_x(seed=27))
    tried, real = [], fusion._derive

    def counting(graph, output, source, check=True):
        tried.append(graph._nodes[source]["name"])
        return real(graph, output, source, check=check)

    monkeypatch.setattr(fusion, "_derive", counting)
    try:
        pairs = symbolic.find_fusable(graph, loss)
        assert tried == ["x", "weight"], tried
        assert [graph._nodes[i]["name"] for _, i in pairs] == ["weight"]
    finally:
        symbolic.clear_cache()


def test_the_size_limit_keeps_the_textbook_forms(monkeypatch):
    """Past the limit, the optional forms give way (the fully written-out d.expr); the closed form stays."""
    monkeypatch.setattr(symbolic.algebra, "SIZE_LIMIT", 150)
    symbolic.clear_cache()
    try:
        d = derive(lambda h, gain, bias: batchnorm(h, gain, bias), *_bn_inputs())
        n = d.symbols["n"]
        assert d.prove(_lecture_batchnorm(d, n / (n - 1), "gain"))
        assert d.prove(d.expr) and d.symbols["bnraw"] in d.textbook.free_symbols
    finally:
        symbolic.clear_cache()


def test_softmax_with_a_temperature_tensor_derives_the_textbook_form():
    """z = x / T, then the stabilised softmax: dx = out*(dout - sum_j dout*out)/T. The rewrite would not divide by
    1/T, so the code summed exp(x/T) unshifted: NaN once logits reach ~500 in float64 (~60 in float32), where
    torch autograd is finite (the derivation is cached: a later step with larger logits reuses it)."""
    temperature = torch.tensor(0.7, dtype=D)

    def softmax_t(x, T):
        z = x / T
        e = (z - z.max(1, keepdim=True).values).exp()
        return e / e.sum(1, keepdim=True)

    d = derive(softmax_t, _x(), temperature)
    weight = _x(seed=28)
    for scale in (100.0, 1000.0):
        x = _x() * scale
        graph, out, loss = record(softmax_t, x, temperature, weight=weight)
        grads = graph.fuse(output=out, inputs=x).backward(loss)
        leaves = [x.clone().requires_grad_(), temperature.clone().requires_grad_()]
        (want,) = torch.autograd.grad((softmax_t(*leaves) * weight).sum(), leaves[0])
        assert torch.isfinite(grads[x]).all()
        assert (grads[x] - want).abs().max() <= 1e-12
    s = d.symbols
    assert d.prove(s["out"] * (s["dout"] - d.sum(s["dout"] * s["out"], "j")) / s["T"])
    assert s["out"] in d.textbook.free_symbols and s["x"] not in d.textbook.free_symbols


def test_scaled_and_label_smoothed_cross_entropy_read_as_the_textbook_form():
    """A reduction of a saved tensor folds back into its own symbol: the pick of log-probabilities is `picked`, the
    mean of them `smooth`. Without that, F.cross_entropy(x / 2, y) read exp(logprobs + picked - sum_j logprobs*delta)
    (the softmax, written with a term that cancels) and label smoothing exp(logp - smooth - sum_j logp / n_j)."""
    def smoothed(x, y, eps=0.1):
        logp = x.log_softmax(-1)
        smooth = -logp.mean(-1)
        return ((1 - eps) * -logp[range(x.shape[0]), y] + eps * smooth).mean()

    x, y = _ce_inputs()
    for fn, scale, smoothing in ((lambda x, y: F.cross_entropy(x / 2.0, y), sp.Rational(1, 2), 0),
                                 (smoothed, 1, sp.Rational(1, 10))):
        d = derive(fn, x, y)  # checked, fused: equal to torch autograd in float64
        s = d.symbols
        logp = s["out_logprobs"] if "out_logprobs" in s else s["logp"]
        delta = sp.KroneckerDelta(s["j"], s["y"])
        form = s["dout"] * scale * (sp.exp(logp) - (1 - smoothing) * delta - smoothing / s["n_j"]) / s["n"]
        assert d.prove(form)
        assert not d.textbook.has(symbolic.AxisSum), d.textbook  # no sum left that cancels
        assert sp.simplify(d.textbook - form) == 0, d.textbook
        assert d.textbook.as_independent(sp.Add)[0] == s["dout"] * scale / s["n"], d.textbook  # no n_j pulled out
        assert r"\sum" not in d.latex


def test_size_one_dimensions_added_by_indexing():
    """``m[:, None]`` instead of keepdim=True (or unsqueeze): a reshape, the same closed form."""
    def cross_entropy(logits, y):
        shifted = logits - logits.max(1).values[:, None]
        probs = shifted.exp() / shifted.exp().sum(1)[..., None]
        return -probs.log()[range(logits.shape[0]), y].mean()

    d = derive(cross_entropy, *_ce_inputs())
    s = d.symbols
    assert d.prove(s["dout"] * (s["probs"] - sp.KroneckerDelta(s["j"], s["y"])) / s["n"])
    x, y = _ce_inputs()
    w = torch.randn(5, 5, dtype=D, generator=_gen(29))
    with tg.record() as graph:
        loss = cross_entropy(x @ w, y)
    assert [graph.node(o)["name"] for o, _ in symbolic.find_fusable(graph, loss)] == ["loss"]
    reference = w.clone().requires_grad_()
    (want,) = torch.autograd.grad(cross_entropy(x @ reference, y), reference)
    assert (symbolic.auto_fuse(graph, loss).backward(loss)[w] - want).abs().max() <= 1e-12


def test_a_closed_form_unstable_at_large_logits_is_not_fused():
    """The product of a softmax over the rows and one over the columns: its gradient holds exponentials of the
    logits over square roots of both normalisers, which overflow (nan) once the logits pass ~88 in float32 (~709
    in float64), where torch's kernels are exact. Such a rule is derived (d.unstable says why) but never fused:
    auto_fuse and tg.compile keep the atomic rules. (A softmax raised to a tensor power, p ** T, was this
    example until it was written through the saved softmax: see the sharpened softmax tests below.)"""
    X, W = torch.randn(8, 4, generator=_gen(30)), torch.randn(4, 5, generator=_gen(32)) * 30
    weight = torch.randn(8, 5, generator=_gen(31))

    def forward(W):
        logits = X @ W
        return (logits.softmax(1) * logits.softmax(0) * weight).sum()

    with tg.record() as graph:
        loss = forward(W)
    assert float((X @ W).abs().max()) > 88
    want = _autograd_of(forward, W)
    assert bool(torch.isfinite(want).all())
    for grads in (symbolic.auto_fuse(graph, loss).backward(loss), tg.compile(lambda: forward(W), fuse=True)()[1]):
        assert (grads[W] - want).abs().max() <= 1e-5 * want.abs().max()
    d = symbolic.derive(graph, output=loss, wrt="logits")
    assert "is not finite where torch autograd's is finite" in d.unstable and d.unstable in d.checked
    assert all(graph._nodes[i]["name"] != "logits" for _, i in symbolic.find_fusable(graph, loss))
    with pytest.raises(SymbolicError, match=r"the closed form of dloss/dlogits is not used: its d\w+ is not finite"):
        graph.fuse(loss, "logits")


@pytest.mark.parametrize("low, high", [(-30.0, -5.0), (-30.0, 3.0)], ids=["all negative", "mostly negative"])
def test_a_closed_form_that_overflows_only_for_positive_logits_is_not_fused(low, high):
    """The rows-and-columns softmax above, recorded with its logits all negative or with their largest magnitude
    negative: scaled to magnitude 1,000 keeping their signs, its exponentials only underflow, so the rule
    stayed finite and the chain was fused; a later float32 step with logits near +1,000 got nan where torch's
    kernels are exact. The check also flips the signs, so the chain is left to the atomic rules."""
    weight = torch.randn(8, 5, dtype=D, generator=_gen(31))
    recorded = low + (high - low) * torch.rand(8, 5, dtype=D, generator=_gen(30))

    def forward(Z):
        return (Z.softmax(1) * Z.softmax(0) * weight.to(Z.dtype)).sum()

    Z = recorded.clone()
    with tg.record() as graph:
        loss = forward(Z)
    d = symbolic.derive(graph, output=loss, wrt=Z)
    assert "is not finite where torch autograd's is finite" in d.unstable and "signs flipped" in d.unstable
    assert all(i != graph.node_id(Z) for _, i in symbolic.find_fusable(graph, loss))
    with pytest.raises(SymbolicError, match=r"is not used: its dZ is not finite"):
        graph.fuse(loss, Z)
    want = _autograd_of(forward, Z)
    assert (symbolic.auto_fuse(graph, loss).backward(loss)[Z] - want).abs().max() <= 1e-9 * want.abs().max()
    Z32 = recorded.float()
    step = tg.compile(lambda: forward(Z32), fuse=True)
    for shift in (0.0, 1000.0):  # recorded and derived at the first step; logits near +1,000 at the second
        Z32.add_(shift)
        got, want32 = step()[1][Z32], _autograd_of(forward, Z32)
        exact = _autograd_of(forward, recorded + shift)
        assert bool(torch.isfinite(want32).all()) and bool(torch.isfinite(got).all()), shift
        assert (got.double() - exact).abs().max() <= 2 * (want32.double() - exact).abs().max() + 1e-6


def test_a_rule_right_only_for_the_recorded_signs_is_not_fused():
    """clamp(x, t, t) recorded with x > 0 > t: torch sends the gradient to t where x > t and to neither where
    x < t; the derived rule sends it to t on both sides. Scaling t keeping its sign never puts it above x, so
    the rule was fused and a later step with t above x got torch's gradient wrong; flipping t's sign finds
    it, and the chain is left to the atomic rules."""
    x, t, w = (torch.tensor([v], dtype=D) for v in (1.15, -0.41, 0.7))

    def forward(x, t):
        return (torch.clamp(x, t, t) * w).sum()

    step = tg.compile(lambda: forward(x, t), fuse=True)
    for value in (-0.41, 2.0):  # recorded and derived at the first step
        t.fill_(value)
        grads = step()[1]
        for tensor, want in zip((x, t), _torch_grads(forward, x, t)):
            assert (grads[tensor] - want).abs().max() <= 1e-12, value


SCALED = {"temperature": lambda z, p: z / p, "scale": lambda z, p: z * p, "shift": lambda z, p: z + p}


def _scaled_softmax(kind: str, dtype: torch.dtype, through: torch.dtype = D, function: str = "softmax"):
    """(forward(W, p), W, p): the softmax (or ``function``) of X @ W divided by a 0-dim temperature, multiplied
    by a 0-dim scale or shifted by a bias per class, weighted and summed; logits (and logits / T) past 88, where
    exp overflows in float32 and torch's softmax kernel does not. The values are rounded to ``through`` first
    (float32 gives the float64 truth of a float32 chain)."""
    def tensor(*shape, seed, scale=1.0):
        return (torch.randn(*shape, dtype=D, generator=_gen(seed)) * scale).to(through).to(dtype)

    X, weight, W = tensor(8, 4, seed=30), tensor(8, 5, seed=31), tensor(4, 5, seed=32, scale=30)
    p = tensor(5, seed=33, scale=50) if kind == "shift" else torch.tensor(0.5 if kind == "temperature" else 2.0,
                                                                           dtype=dtype)

    def forward(W, p):
        return (getattr(SCALED[kind](X @ W, p), function)(-1) * weight).sum()

    assert float(SCALED[kind](X @ W, p).abs().max()) > 88
    return forward, W, p


def _autograd_of(forward, W):
    leaf = W.detach().clone().requires_grad_()
    return torch.autograd.grad(forward(leaf), leaf)[0]


def _torch_grads(forward, W, p):
    leaves = [t.detach().clone().requires_grad_() for t in (W, p)]
    return torch.autograd.grad(forward(*leaves), leaves)


@pytest.mark.parametrize("function", ["softmax", "log_softmax"])
@pytest.mark.parametrize("kind", SCALED)
def test_the_softmax_of_a_scaled_or_shifted_input_is_stable_and_fused(kind, function):
    """softmax(x / T), softmax(x * s), softmax(x + b): the gradient of T, s or b (and for s that of x) came out
    as sums of x*exp(x/T) over sum(exp(x/T)), nan once x/T passes ~88 in float32, so the chains were left
    atomic. The exponentials the saved softmax normalises are written through it: dT reads
    -(1/T)*sum_j z*p*(g - sum_k g*p), no exp. Fused from the logits (auto_fuse, tg.compile) and from the
    temperature, scale or bias (graph.fuse), with torch autograd's gradients."""
    forward, W, p = _scaled_softmax(kind, D, function=function)
    with tg.record() as graph:
        loss = forward(W, p)
    for wrt in ("z", p):  # from the logits z = X @ W, and from the temperature, scale or bias
        d = symbolic.derive(graph, output=loss, wrt=wrt)
        assert not d.unstable, d.unstable
        saved = {d.symbols[function + "_1"]}  # exp of the saved log-softmax: at most 1
        assert all(e.args[0].free_symbols <= saved for f in d.gradients.values() for e in f.atoms(sp.exp)), d.gradients
    if kind == "temperature" and function == "softmax":  # the textbook form, with z = x / T and the saved p
        d = symbolic.derive(graph, output=loss, wrt="z")
        s = d.symbols
        z, out, w = s["div_1"], s["softmax_1"], s["weight"]
        assert d.prove(-s["dloss"] / s["p"] * d.sum(d.sum(z * out * (w - d.sum(w * out, "j")), "j"), "i"), wrt="p")
    assert [graph._nodes[i]["name"] for _, i in symbolic.find_fusable(graph, loss)] == ["z"]
    want = _torch_grads(forward, W, p)
    step = tg.compile(lambda: forward(W, p), fuse=True)
    for grads in (symbolic.auto_fuse(graph, loss).backward(loss), graph.fuse(loss, p).backward(loss), step()[1]):
        for tensor, expected in zip((W, p), want):
            assert (grads[tensor] - expected).abs().max() <= 1e-9 * expected.abs().max()
    assert step.fused


def test_a_softmax_after_a_piecewise_op_is_stable_and_fused():
    """The saved output of a piecewise op is never substituted back (no inverse), so a softmax after one read
    exp of the piecewise value, unshifted, and was left atomic; written with the saved softmax it is fused."""
    X, W = torch.randn(8, 4, dtype=D, generator=_gen(30)), torch.randn(4, 5, dtype=D, generator=_gen(32)) * 30
    weight, mask = torch.randn(8, 5, dtype=D, generator=_gen(31)), torch.rand(8, 5, generator=_gen(33)) > 0.3
    for after in (F.elu, lambda z: torch.where(mask, z, -1e9)):
        def forward(W, after=after):
            logits = X @ W
            return (F.softmax(after(logits), 1) * weight).sum()

        with tg.record() as graph:
            loss = forward(W)
        assert float((X @ W).abs().max()) > 88
        want = _autograd_of(forward, W)
        assert not symbolic.derive(graph, output=loss, wrt="logits").unstable
        assert [graph._nodes[i]["name"] for _, i in symbolic.find_fusable(graph, loss)] == ["logits"]
        got = symbolic.auto_fuse(graph, loss).backward(loss)[W]
        assert (got - want).abs().max() <= 1e-9 * want.abs().max()


@pytest.mark.parametrize("kind", SCALED)
def test_the_fused_scaled_softmax_is_finite_at_float32_logits_past_88(kind):
    """The same chains recorded in float32: the fused backward stays finite where exp(logits) overflows, as torch
    autograd's does, and is as close to the float64 gradients as torch's float32 kernel."""
    forward, W, p = _scaled_softmax(kind, torch.float32)
    with tg.record() as graph:
        loss = forward(W, p)
    want32, want64 = _torch_grads(forward, W, p), _torch_grads(*_scaled_softmax(kind, D, through=torch.float32))
    for grads in (symbolic.auto_fuse(graph, loss).backward(loss), graph.fuse(loss, p).backward(loss)):
        for tensor, expected, exact in zip((W, p), want32, want64):
            assert bool(torch.isfinite(grads[tensor]).all()) and bool(torch.isfinite(expected).all())
            # no further from the float64 truth than torch's float32 kernel (a saturated softmax loses digits)
            assert (grads[tensor].double() - exact).abs().max() <= \
                2 * (expected.double() - exact).abs().max() + 1e-5 * exact.abs().max()


def test_cross_entropy_with_a_temperature_is_stable_and_fused():
    """F.cross_entropy(logits / T): d/dT read exp(logprob) * exp(-logit) * sum(logit * exp(logit)) (nan past
    ~88 in float32); written with the saved log-probabilities, and each exponential kept whole, it is stable, so
    auto_fuse and tg.compile use it, with torch's gradients."""
    X, Y = torch.randn(8, 4, generator=_gen(30)), torch.randint(0, 5, (8,), generator=_gen(31))
    W, T = torch.randn(4, 5, generator=_gen(32)) * 15, torch.tensor(0.5)

    def forward(W, T):
        return F.cross_entropy((X @ W) / T, Y)

    with tg.record() as graph:
        loss = forward(W, T)
    assert float(((X @ W) / T).abs().max()) > 88
    d = symbolic.derive(graph, output=loss, wrt="matmul_1")
    assert not d.unstable, d.unstable
    assert [graph._nodes[i]["name"] for _, i in symbolic.find_fusable(graph, loss)] == ["matmul_1"]
    leaves = [W.clone().requires_grad_(), T.clone().requires_grad_()]
    want = torch.autograd.grad(forward(*leaves), leaves)
    step = tg.compile(lambda: forward(W, T), fuse=True)
    for grads in (symbolic.auto_fuse(graph, loss).backward(loss), step()[1]):
        assert torch.isfinite(grads[T]) and (grads[T] - want[1]).abs() <= 1e-5 * want[1].abs()
        assert (grads[W] - want[0]).abs().max() <= 1e-5 * want[0].abs().max()
    assert step.fused


SHARPENED = {  # a softmax p raised to a learnable power T (sharpening), and losses read from it
    "weighted": lambda p, T, y, w: (p ** T * w).sum(),
    "renormalised nll": lambda p, T, y, w: -(p ** T / (p ** T).sum(1, keepdim=True)).log()[range(len(y)), y].mean(),
    "log of the power": lambda p, T, y, w: -(p ** T).log()[range(len(y)), y].mean(),
    "distillation": lambda p, T, y, w: -(p ** T * w.softmax(1)).sum(1).log().mean(),
    "a power per class": lambda p, T, y, w: (p ** T * w).sum(),
}


def _sharpened(kind: str, dtype: torch.dtype, top: float, through: torch.dtype = D):
    """(forward(W, T), W, T): a loss of softmax(X @ W) ** T (T 0-dim, or one per class), the logits scaled to
    magnitude ``top``, the values rounded to ``through`` first (float32 gives the float64 truth of a float32
    chain). The picked class is drawn at random, or past logits of 88 the row's largest (whose sharpened
    probability torch's float64 chain keeps finite)."""
    def tensor(*shape, seed, scale=1.0):
        return (torch.randn(*shape, dtype=D, generator=_gen(seed)) * scale).to(through).to(dtype)

    X, w = tensor(8, 4, seed=30), tensor(8, 5, seed=31)
    W = tensor(4, 5, seed=32)
    W = (W * (top / (X @ W).abs().max())).to(through).to(dtype)
    T = (torch.rand(5, dtype=D, generator=_gen(34)) + 1.5).to(dtype) if kind == "a power per class" else \
        torch.tensor(2.0, dtype=dtype)
    y = (X @ W).argmax(1) if top > 88 else torch.randint(0, 5, (8,), generator=_gen(35))

    def forward(W, T):
        logits = X @ W
        return SHARPENED[kind](logits.softmax(1), T, y, w)

    return forward, W, T


@pytest.mark.parametrize("kind", SHARPENED)
def test_a_sharpened_softmax_is_stable_and_fused(kind):
    """softmax(x) ** T: the gradients read exp(T*x) over Sum(exp(x))**T, which overflow past logits of ~88 in
    float32, so the stability check left these chains atomic. Written through the saved softmax (x as
    log(p*Sum(exp(x))), exp(T*log(p*S)) as p**T*S**T, whose S**T cancels) they read p**T and log(p) only:
    dlogits = T*dout*(w*p**T - p*Sum(w*p**T)), dT = Sum(w*p**T*log(p)), with torch's gradients, fused."""
    forward, W, T = _sharpened(kind, D, top=30)
    with tg.record() as graph:
        loss = forward(W, T)
    d = symbolic.derive(graph, output=loss, wrt="logits")
    assert not d.unstable, d.unstable
    logits = d.symbols["logits"]
    assert not any(logits in e.free_symbols for f in d.gradients.values() for e in f.atoms(sp.exp)), d.gradients
    if kind == "weighted":  # the textbook form, with the saved softmax p and its power q
        s = d.symbols
        p, q, w, dout = s["p"], s["pow_1"], s["w"], s["dloss"]
        assert d.prove(s["T"] * dout * (w * q - p * d.sum(w * q, "j")))
        assert d.prove(dout * d.sum(d.sum(w * q * sp.log(p), "j"), "i"), wrt="T")
    assert "logits" in [graph._nodes[i]["name"] for _, i in symbolic.find_fusable(graph, loss)]
    want = _torch_grads(forward, W, T)
    step = tg.compile(lambda: forward(W, T), fuse=True)
    for grads in (symbolic.auto_fuse(graph, loss).backward(loss), graph.fuse(loss, "logits").backward(loss),
                  step()[1]):
        for tensor, expected in zip((W, T), want):
            assert (grads[tensor] - expected).abs().max() <= 1e-9 * expected.abs().max()
    assert step.fused


@pytest.mark.parametrize("kind", SHARPENED)
def test_the_fused_sharpened_softmax_is_finite_at_float32_logits_near_1000(kind):
    """The same chains recorded in float32 with logits near 1,000 (150 where a log reads every p**T: past that
    torch's own float64 chain divides 0 by 0): fused (auto_fuse, graph.fuse), the backward is finite where torch
    autograd's float64 one is, and no further from it than torch's float32 kernels (where those are finite)."""
    top = 150 if "nll" in kind or "log" in kind else 1000
    forward, W, T = _sharpened(kind, torch.float32, top=top)
    with tg.record() as graph:
        loss = forward(W, T)
    assert "logits" in [graph._nodes[i]["name"] for _, i in symbolic.find_fusable(graph, loss)]
    want32, want64 = _torch_grads(forward, W, T), _torch_grads(*_sharpened(kind, D, top, through=torch.float32))
    for grads in (symbolic.auto_fuse(graph, loss).backward(loss), graph.fuse(loss, "logits").backward(loss)):
        for tensor, expected, exact in zip((W, T), want32, want64):
            assert bool(torch.isfinite(exact).all())
            assert bool(torch.isfinite(grads[tensor]).all()), grads[tensor]
            theirs = torch.nan_to_num((expected.double() - exact).abs(), nan=0.0, posinf=0.0).max()
            assert (grads[tensor].double() - exact).abs().max() <= 2 * theirs + 1e-5 * exact.abs().max()


def test_cross_entropy_with_a_learnable_scale_reads_the_saved_log_probabilities():
    """F.cross_entropy(x * s, y), s a learnable logit scale: x cannot be written through x*s (that divides by s,
    which may be 0), so the gradients read exp(picked + s*x - s*Sum(x*delta, j)), the log-probabilities spelled
    out from the picked one. Joined into one exponential, that sum of terms is the saved log-probabilities: the
    gradients read exp(logprobs), as torch's do."""
    X, Y = torch.randn(8, 4, dtype=D, generator=_gen(30)), torch.randint(0, 5, (8,), generator=_gen(31))
    W, scale = torch.randn(4, 5, dtype=D, generator=_gen(32)) * 15, torch.tensor(2.0, dtype=D)

    def forward(W, scale):
        return F.cross_entropy((X @ W) * scale, Y)

    with tg.record() as graph:
        loss = forward(W, scale)
    assert float(((X @ W) * scale).abs().max()) > 88
    for wrt in ("matmul_1", scale):
        d = symbolic.derive(graph, output=loss, wrt=wrt)
        assert not d.unstable, d.unstable
        s = d.symbols
        logprobs, delta = s["loss_logprobs"], sp.KroneckerDelta(s["Y"], s["j"])
        assert all(e == sp.exp(logprobs) for f in d.gradients.values() for e in f.atoms(sp.exp)), d.gradients
        form = s["dloss"] * (sp.exp(logprobs) - delta) / s["n"]
        assert sp.simplify(d.gradients["matmul_1"] - s["scale"] * form) == 0, d.gradients
        assert d.prove(d.sum(d.sum(s["matmul_1"] * form, "j"), "i"), wrt="scale")
        assert "torch.exp(loss_logprobs)" in d.source
    want = _torch_grads(forward, W, scale)
    step = tg.compile(lambda: forward(W, scale), fuse=True)
    for grads in (symbolic.auto_fuse(graph, loss).backward(loss), step()[1]):
        for tensor, expected in zip((W, scale), want):
            assert (grads[tensor] - expected).abs().max() <= 1e-9 * expected.abs().max()
    assert step.fused


OF_A_LOGSUMEXP = {  # a softmax (or exp) of a logsumexp, weighted: over another axis, or normalising its input
    "softmax of a logsumexp": lambda x, w: x.logsumexp(2).softmax(1) * w,
    "log_softmax of a logsumexp": lambda x, w: x.logsumexp(2).log_softmax(1) * w,
    "softmax of a kept logsumexp": lambda x, w: x.logsumexp(2, keepdim=True).softmax(1) * w[:, :, None],
    "softmax of a logsumexp / T": lambda x, w: (x.logsumexp(2) / torch.tensor(0.4, dtype=x.dtype)).softmax(1) * w,
    "softmax of a logsumexp / 0.4": lambda x, w: (x.logsumexp(2) / 0.4).softmax(1) * w,
    "softmax after subtracting it": lambda x, w: (x - x.logsumexp(1, keepdim=True)).softmax(1) * w,
    "exp after subtracting it": lambda x, w: (x - x.logsumexp(1, keepdim=True)).exp() * w,
}


def _of_a_logsumexp(kind: str, dtype: torch.dtype, top: float, through: torch.dtype = D):
    """(forward(x), x): the weighted sum of ``OF_A_LOGSUMEXP[kind]`` of a 6x4x3 tensor (6x4 where the logsumexp
    normalises its own input) near ``top`` (spread by 3: the softmax is not saturated), rounded to ``through``."""
    shape = (6, 4) if "subtracting" in kind else (6, 4, 3)
    x = (top + 3 * torch.randn(*shape, dtype=D, generator=_gen(40))).to(through).to(dtype)
    weight = torch.randn(6, 4, dtype=D, generator=_gen(41)).to(through).to(dtype)

    def forward(x):
        return OF_A_LOGSUMEXP[kind](x, weight).sum()

    return forward, x


@pytest.mark.parametrize("kind", OF_A_LOGSUMEXP)
def test_a_softmax_of_a_logsumexp_is_stable_and_fused(kind):
    """softmax(x.logsumexp(2), 1): the gradient read exp(x)/Sum(exp(r), j), r the logsumexp, whose exponentials
    overflow past ~88 in float32 (the stability check, scaling x to magnitude 1,000 as recorded, met only
    negative values there, so it was fused and gave NaN). exp(x) is written exp(x - r)*exp(r), and exp(r)
    through the saved softmax: p*exp(x - r)*(w - Sum(p*w)), as torch computes it (of r / 0.4 = b:
    exp(x - 0.4*b)*exp(0.4*b), and exp(0.4*b) joins the exp(0.6*b) beside it into the normaliser's exp(b)).
    In float64 the fused gradients are torch autograd's; in float32 with values near 1,000 they are finite and
    as close to the float64 truth as torch's own. (The softmax or exp of x - x.logsumexp(1) were stable
    already.)"""
    forward, x = _of_a_logsumexp(kind, D, top=30)
    with tg.record() as graph:
        loss = forward(x)
    d = symbolic.derive(graph, output=loss, wrt=x)
    assert not d.unstable, d.unstable
    assert sp.exp(d.symbols["x"]) not in d.gradients["x"].atoms(sp.exp), d.gradients  # no exp(x) unshifted
    assert [graph._nodes[i]["name"] for _, i in symbolic.find_fusable(graph, loss)] == ["x"]
    want = _autograd_of(forward, x)
    for got in (symbolic.auto_fuse(graph, loss).backward(loss)[x], tg.compile(lambda: forward(x), fuse=True)()[1][x]):
        assert (got - want).abs().max() <= 1e-9 * want.abs().max()
    forward, x = _of_a_logsumexp(kind, torch.float32, top=1000)
    with tg.record() as graph:
        loss = forward(x)
    got = symbolic.auto_fuse(graph, loss).backward(loss)[x]
    exact, theirs = _autograd_of(*_of_a_logsumexp(kind, D, 1000, through=torch.float32)), _autograd_of(forward, x)
    assert bool(torch.isfinite(exact).all()) and bool(torch.isfinite(got).all()), got
    # exp(x - 0.4*div_1) for exp(x - r): div_1 = r/0.4 rounded in float32 costs ~1.5e-5 there
    assert (got.double() - exact).abs().max() <= \
        2 * (theirs.double() - exact).abs().max() + 5e-5 * exact.abs().max()


def test_a_gelu_after_a_normalisation_is_stable_and_fused():
    """exp(-(b + g*r)**2/2) was split into three exponentials, one of them moved out of a sum: NaN for a large
    gain where torch is finite, so a batch or layer norm followed by the exact gelu was never fused."""
    w, b = torch.randn(5, dtype=D, generator=_gen(4)) + 1, torch.randn(5, dtype=D, generator=_gen(5))
    for fn in (lambda x, w, b: F.gelu(F.batch_norm(x, None, None, w, b, training=True)),
               lambda x, w, b: F.gelu(F.layer_norm(x, (5,), w, b))):
        d = derive(fn, _x(), w, b)  # fused (refused before), every gradient equal to torch's
        assert not d.unstable


def test_a_rule_cached_unchecked_is_checked_before_it_is_fused():
    """derive(..., check=False) caches its rule; a later fuse or auto_fuse of the same chain checks it first."""
    X, Y = torch.randn(8, 4, generator=_gen(30)), torch.randint(0, 5, (8,), generator=_gen(31))
    W, T = torch.randn(4, 5, generator=_gen(32)) * 15, torch.tensor(0.5)
    with tg.record() as graph:
        loss = F.cross_entropy((X @ W) / T, Y)
    symbolic.clear_cache()
    symbolic.derive(graph, output=loss, wrt="matmul_1", check=False)
    leaves = [W.clone().requires_grad_(), T.clone().requires_grad_()]
    want = torch.autograd.grad(F.cross_entropy((X @ leaves[0]) / leaves[1], Y), leaves)
    grads = symbolic.auto_fuse(graph, loss).backward(loss)
    assert torch.isfinite(grads[T]) and (grads[T] - want[1]).abs() <= 1e-5 * want[1].abs()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (torch built "
                    f"{'with' if torch.version.cuda else 'without'} CUDA); the same derivation runs on CPU above")
def test_a_chain_recorded_on_cuda_derives_and_fuses():
    """verify() drew its random output gradient on the CPU, whatever the graph's device."""
    x, y = (t.cuda() for t in _ce_inputs())
    graph, out, loss = record(lambda x, y: lecture_cross_entropy(x, y, "mean"), x, y, weight=torch.ones((), dtype=D,
                                                                                                        device="cuda"))
    symbolic.derive(graph, output=out, wrt=x)
    fused = graph.fuse(output=out, inputs=[x])
    leaf = x.detach().clone().requires_grad_()
    expected, = torch.autograd.grad(lecture_cross_entropy(leaf, y, "mean"), leaf)
    torch.testing.assert_close(fused.backward(loss)[x], expected, rtol=1e-10, atol=1e-12)


def test_a_chain_longer_than_the_fusion_limit_keeps_its_atomic_rules(monkeypatch):
    """A long elementwise chain is not derived as one closed form (sympy took minutes for 2,000 ops); a short one
    at its end still is. Its gradients are torch's."""
    from tensorgraph.symbolic import fusion

    derived = []
    monkeypatch.setattr(fusion, "_derive", lambda graph, output, source, **kw: derived.append(output) or _derive(
        graph, output, source, **kw))
    x, w = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def forward(w):
        h = x * w
        for _ in range(fusion.MAX_FUSED_OPS):
            h = h * 1.0001 + 0.1
        return h.sum()

    with tg.record() as graph:
        loss = forward(w)
    assert symbolic.find_fusable(graph, loss) == [] and derived == []
    leaf = w.clone().requires_grad_()
    torch.testing.assert_close(tg.compile(lambda: forward(w))()[1][w], torch.autograd.grad(forward(leaf), leaf)[0],
                               rtol=1e-10, atol=1e-12)
    with tg.record() as short:
        loss = (x * w * 1.0001 + 0.1).sum()
    assert len(symbolic.find_fusable(short, loss)) == 1


def _finite_differences(fn, x, *rest, h=1e-6):
    """Central differences of the scalar ``fn(x, *rest)`` with respect to every element of ``x``."""
    grad = torch.zeros_like(x)
    for k in range(x.numel()):
        step = torch.zeros_like(x).view(-1)
        step[k] = h
        step = step.view_as(x)
        grad.view(-1)[k] = (fn(x + step, *rest) - fn(x - step, *rest)) / (2 * h)
    return grad


def _softmax_then_pick(x, y):
    probs = F.softmax(x, 1)
    return -probs[torch.arange(x.shape[0]), y].log().mean()


def test_the_pick_then_log_cross_entropy_reads_softmax_minus_onehot():
    """-log(softmax(x)[range(n), y]).mean(), the pick before the log, reads (probs - onehot(y))/n like the lecture's
    chain (it read probs*(1 - exp(-log_1)*delta)/n, with log_1 never defined for the reader): the one-hot term
    delta*exp(x) is read through the pick a rule knows, and the pick in the denominator cancels."""
    x, y = _ce_inputs()
    cases = {"pick then log": lambda x, y: -F.softmax(x, 1)[range(x.shape[0]), y].log().mean(),
             "torch.log of the pick": lambda x, y: -torch.log(F.softmax(x, 1)[range(x.shape[0]), y]).mean(),
             "named probs, arange": _softmax_then_pick}
    for case, fn in cases.items():
        d = derive(fn, x, y)  # fused: the same gradients as the engine and torch autograd (float64)
        s = d.symbols
        saved = s["probs"] if "probs" in s else s["softmax_1"]
        delta = sp.KroneckerDelta(s["j"], s["y"])
        assert d.textbook.free_symbols == {s["dout"], saved, s["y"], s["j"], s["n"]}, (case, d.textbook)
        assert sp.simplify(d.textbook - s["dout"] * (saved - delta) / s["n"]) == 0, case
        assert d.prove(s["dout"] * (saved - delta) / s["n"])
        softmax = sp.exp(s["x"]) / d.sum(sp.exp(s["x"]), "j")
        assert d.prove(s["dout"] * (softmax - delta) / s["n"])
        assert not d.prove(s["dout"] * (saved - delta))
        params = [y if p.name == "y" else torch.arange(x.shape[0]) for p in d.chain.params]  # y, arange's rows
        dx, *rest = d.backward(torch.tensor(1.0, dtype=D), x, *params)
        assert all(g is None for g in rest)
        torch.testing.assert_close(dx, _finite_differences(fn, x, y), rtol=1e-6, atol=1e-8)
    W = torch.randn(4, 5, dtype=D, generator=_gen(5))
    X = torch.randn(7, 4, dtype=D, generator=_gen(6))
    _assert_auto_fused_dW_is_torchs(lambda logits: _softmax_then_pick(logits, y), X, W)


def _assert_auto_fused_dW_is_torchs(loss_of, X, W):
    """auto_fuse finds a chain in ``loss_of(X @ W)``, and the fused graph's dW is torch autograd's."""
    with tg.record() as graph:
        loss = loss_of(X @ W)
    fused = symbolic.auto_fuse(graph, loss)
    assert any(data["op"] == "fused" for data in fused._nodes)
    leaf = W.clone().requires_grad_()
    expected, = torch.autograd.grad(loss_of(X @ leaf), leaf)
    torch.testing.assert_close(fused.backward(loss)[W], expected, rtol=1e-10, atol=1e-12)


def _bce_by_hand(x, t, one=1.0):
    p = torch.sigmoid(x)
    return -(t * p.log() + (one - t) * (1 - p).log()).mean()


def test_a_parameter_computed_from_parameters_is_written_as_what_it_is():
    """Binary cross-entropy by hand: 1 - t enters the chain as a parameter of its own (computed outside it), and
    read as an opaque sub_1 the gradient was p*sub_1 + p*t - t. Written as 1 - t it is the textbook (p - t)/n;
    the fused node still takes x, t and 1 - t, and the stability check scales t and 1 - t together."""
    x = torch.randn(6, 3, dtype=D, generator=_gen(8))
    t = torch.rand(6, 3, dtype=D, generator=_gen(9))
    symbolic.clear_cache()
    d = derive(_bce_by_hand, x, t)  # fused: the same gradients as the engine and torch autograd, dt through 1 - t
    s = d.symbols
    size = s["n"] * s["n_j"]
    assert d.textbook.free_symbols == {s["dout"], s["p"], s["t"], s["n"], s["n_j"]}, d.textbook
    assert sp.simplify(d.textbook - s["dout"] * (s["p"] - s["t"]) / size) == 0
    assert d.prove(s["dout"] * (s["p"] - s["t"]) / size)
    assert d.prove(s["dout"] * (Sigmoid(s["x"]) - s["t"]) / size)
    assert not d.prove(s["dout"] * (s["p"] - s["t"]) / s["n"])
    assert not d.unstable and "1 - \\mathrm{t}" in d.steps
    assert "(dout, x, t, sub_1)" in d.source  # the fused node's inputs are unchanged
    dx, dt, dsub = d.backward(torch.tensor(1.0, dtype=D), x, t, 1 - t)
    torch.testing.assert_close(dx, _finite_differences(_bce_by_hand, x, t), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(dsub, _finite_differences(lambda s: -((1 - torch.sigmoid(x)).log() * s).mean(), 1 - t))
    # the same structure with 0.5 - t is another chain (not the cached one): its gradient keeps the half
    half = derive(lambda x, t: _bce_by_hand(x, t, 0.5), x, t)
    s = half.symbols
    assert half.prove(s["dout"] * (s["p"] / 2 - s["t"]) / (s["n"] * s["n_j"]))
    W = torch.randn(4, 3, dtype=D, generator=_gen(10))
    X = torch.randn(6, 4, dtype=D, generator=_gen(11))
    _assert_auto_fused_dW_is_torchs(lambda logits: _bce_by_hand(logits, t), X, W)


# ---------------------------------------------------------------------- piecewise ops: where, clamp, leaky relu ...


def _with_kinks(kinks, seed, away=False):
    """A 6x5 float64 input: its first row holds the kinks exactly (``away``: every element at least 0.01 from one)."""
    x = torch.randn(6, 5, dtype=D, generator=_gen(seed)) * 1.5
    if away:
        for kink in kinks:
            near = (x - kink).abs() < 0.01
            x = torch.where(near, x + 0.05, x)
    else:
        x[0, :len(kinks)] = torch.tensor(kinks, dtype=D)
    return x


_T = torch.randn(6, 5, dtype=D, generator=_gen(40))


def _huber_by_hand(x, delta=1.0):
    d = x - _T
    return torch.where(d.abs() < delta, 0.5 * d**2, delta * (d.abs() - 0.5 * delta)).mean()


# name: (the chain from x, its kinks); the kink values sit in x itself (the Huber cases: at _T + kink)
PIECEWISE = {
    "where": (lambda x: torch.where(x > 0, x * 2, x.exp()), [0.0]),
    "where with a number": (lambda x: torch.where(x > 0, x.tanh(), 0.0), [0.0]),
    "where, the method": (lambda x: x.exp().where(x > 0, x * 3), [0.0]),  # recorded as (x.exp(), x > 0, x * 3)
    "clamp": (lambda x: x.clamp(-0.5, 0.5).tanh(), [-0.5, 0.5]),
    "clip, min only": (lambda x: torch.clip(x, min=-0.5), [-0.5]),
    "clamp_max": (lambda x: x.clamp_max(0.5), [0.5]),
    "hardtanh": (lambda x: F.hardtanh(x, -0.5, 0.5), [-0.5, 0.5]),
    "relu6": (lambda x: F.relu6(x * 4), [0.0, 1.5]),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.1), [0.0]),
    "elu": (lambda x: F.elu(x, 0.7), [0.0]),
    "relu": (lambda x: F.relu(x), [0.0]),
    "smooth_l1_loss": (lambda x: F.smooth_l1_loss(x, _T, beta=0.5), [-0.5, 0.0, 0.5]),
    "huber_loss": (lambda x: F.huber_loss(x, _T, reduction="sum", delta=0.5), [-0.5, 0.0, 0.5]),
    "Huber by hand": (_huber_by_hand, [-1.0, 0.0, 1.0]),
}


def _kink_input(name, kinks, away=False):
    x = _with_kinks(kinks, seed=42, away=away)
    return _T + x if name in ("smooth_l1_loss", "huber_loss", "Huber by hand") else x  # a loss's kinks: at x - t


def _fused_grad(fn, x, weight):
    """The gradient of ``(fn(x) * weight).sum()`` by the graph with the chain from x fused."""
    graph, out, loss = record(fn, x, weight=weight)
    fused = graph.fuse(output=out, inputs=[x])
    assert any(data["op"] == "fused" for data in fused._nodes)
    return fused.backward(loss)[x]


@pytest.mark.parametrize("name", PIECEWISE)
def test_piecewise_ops_have_torchs_gradient_at_their_kinks_and_finite_differences_elsewhere(name):
    """Each derives a Piecewise (torch.where in the code, cases in LaTeX) whose branch at the kink is the one torch
    takes: with the kinks in the input, the fused backward is torch autograd's (float64) and the engine's; away
    from them it is the finite differences too. The differences to torch autograd are measured in the report."""
    fn, kinks = PIECEWISE[name]
    x = _kink_input(name, kinks)
    d = derive(fn, x, tol=1e-10)  # fused: torch autograd's and the engine's gradients, kinks included
    if name != "relu":
        assert d.expr.has(sp.Piecewise) and "torch.where" in d.source and r"\begin{cases}" in d.latex, d.expr
    else:
        assert "torch.relu" not in d.source and "> 0" in d.source  # relu keeps its Step, 0 at 0 as in torch
    away = _kink_input(name, kinks, away=True)
    weight = torch.randn(fn(away).shape, dtype=D, generator=_gen(7))
    ours = _fused_grad(fn, away, weight)
    torch.testing.assert_close(ours, _finite_differences(lambda v: (fn(v) * weight).sum(), away),
                               rtol=1e-6, atol=1e-8)
    leaf = away.clone().requires_grad_()
    expected, = torch.autograd.grad((fn(leaf) * weight).sum(), leaf)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["where", "clamp", "hardtanh", "leaky_relu", "elu", "huber_loss", "Huber by hand"])
def test_piecewise_chains_auto_fuse_and_compile_to_torchs_gradient(name):
    fn, _ = PIECEWISE[name]
    W = torch.randn(4, 5, dtype=D, generator=_gen(43))
    X = torch.randn(6, 4, dtype=D, generator=_gen(44))
    weight = torch.randn(6, 5, dtype=D, generator=_gen(45))

    def loss_of(logits):
        out = fn(logits * 1.5)  # a chain of two ops at least (auto_fuse leaves a single op to its atomic rule)
        return out if out.dim() == 0 else (out * weight).sum()

    _assert_auto_fused_dW_is_torchs(loss_of, X, W)
    step = tg.compile(lambda X: loss_of(X @ W), fuse=True)
    _, grads = step(X)
    assert step.fused
    leaf = W.clone().requires_grad_()
    expected, = torch.autograd.grad(loss_of(X @ leaf), leaf)
    torch.testing.assert_close(grads[W], expected, rtol=1e-10, atol=1e-12)


def test_clamp_to_tensor_bounds_gives_each_bound_its_gradient_as_torch():
    """x.clamp(lo, hi) with tensor bounds: x gets the gradient within [lo, hi] (bounds included), lo where x < lo,
    hi where x > hi or where lo > hi (torch's output is then hi), all checked against torch autograd in float64,
    with elements exactly at the bounds; and against finite differences away from them."""
    lo = torch.randn(6, 1, dtype=D, generator=_gen(41)) - 0.5
    hi = lo + torch.rand(6, 1, dtype=D, generator=_gen(42)) + 0.2
    hi[5] = lo[5] - 0.1  # lo > hi: the output is hi everywhere in that row
    x = torch.randn(6, 5, dtype=D, generator=_gen(43))
    x[:, 0], x[:, 1] = lo[:, 0], hi[:, 0]
    d = derive(lambda x, lo, hi: x.clamp(lo, hi), x, lo, hi, tol=1e-10)
    assert set(d.gradients) == {"x", "lo", "hi"} and d.expr.has(sp.Piecewise)
    d = derive(lambda x, lo: x.clamp(min=lo).exp(), x, lo, tol=1e-10)  # a keyword bound
    away = torch.randn(6, 5, dtype=D, generator=_gen(44)) + 0.05 * torch.sign(x - lo)
    away = torch.where((away - lo).abs() < 0.01, away + 0.05, away)
    weight = torch.randn(6, 5, dtype=D, generator=_gen(7))
    ours = _fused_grad(lambda x: x.clamp(min=lo).exp(), away, weight)
    torch.testing.assert_close(ours, _finite_differences(lambda v: (v.clamp(min=lo).exp() * weight).sum(), away),
                               rtol=1e-6, atol=1e-8)


def test_huber_proves_its_textbook_gradient_and_not_a_wrong_one():
    """F.huber_loss reads (x - t)/N inside the band, delta*sign(x - t)/N outside, with its saved difference; a
    formula with another slope outside the band does not prove."""
    x = _kink_input("huber_loss", [-0.5, 0.0, 0.5])
    d = derive(lambda x, t: F.huber_loss(x, t, delta=0.5), x, _T, tol=1e-10)  # dt too
    s = d.symbols
    diff, size = s["x"] - s["t"], s["n"] * s["n_j"]
    half = sp.Rational(1, 2)
    assert d.prove(s["dout"] * sp.Piecewise((diff, sp.Abs(diff) < half), (half * sp.sign(diff), True)) / size)
    assert not d.prove(s["dout"] * sp.Piecewise((diff, sp.Abs(diff) < half), (sp.sign(diff), True)) / size)
    assert s["out_diff"] in d.textbook.free_symbols, d.textbook


def test_a_folded_piecewise_keeps_only_the_pieces_it_can_reach():
    """log(sigmoid(x).clamp(lo, hi)): the clamp's gradient times log's 1/clamp folds into pieces under conditions
    such as (s > hi) & ((s > hi) | (s < lo)) and pieces never reached; tidied, two pieces remain: 0 outside
    [lo, hi], and the textbook dout*w*(1 - sigmoid(x)) inside."""
    x = _with_kinks([], seed=50) * 10  # some probabilities past the clamp
    w = torch.randn(6, 5, dtype=D, generator=_gen(51))
    d = derive(lambda x, w: torch.sigmoid(x).clamp(1e-7, 1 - 1e-7).log() * w, x, w, tol=1e-10)
    s = d.symbols
    (outside, condition), (inside, otherwise) = d.expr.args
    assert outside == 0 and otherwise == sp.true and isinstance(condition, sp.Or) and len(condition.args) == 2
    assert inside == s["dout"] * s["w"] * (1 - Sigmoid(s["x"])), d.expr


def test_a_piecewise_of_numbers_prints_in_the_gradients_dtype():
    """torch.where of two Python floats is float32 (0.1 off by 1.5e-9): a piecewise whose branches are all numbers
    takes the gradient's dtype; an indicator is its condition cast to that dtype."""
    from tensorgraph.symbolic.printing import TorchPrinter

    x = sp.Symbol("x", real=True)
    printer = TorchPrinter({x: "x"}, {}, {x}, like="dout")
    values = {"x": torch.tensor([-1.0, 0.0, 2.0], dtype=D), "dout": torch.ones(3, dtype=D), "torch": torch}
    slopes = eval(printer.doprint(sp.Piecewise((1, x > 0), (sp.Rational(1, 10), True))), values)
    assert slopes.dtype == D and slopes.tolist() == [0.1, 0.1, 1.0]
    indicator = eval(printer.doprint(sp.Piecewise((1, x >= 0), (0, True))), values)
    assert indicator.dtype == D and indicator.tolist() == [0.0, 1.0, 1.0]


def test_the_check_refuses_a_piecewise_rule_with_the_wrong_kink():
    """hardtanh with clamp's rule (the gradient passed at the bounds, not stopped there) differs only at the kinks:
    recorded with inputs at the bounds, the built-in check refuses it."""
    if not CLAMP_PASSES_AT_BOUND:
        pytest.skip("this torch (2.14 on) stops clamp's gradient at number bounds as hardtanh does: no wrong kink")
    x = _kink_input("hardtanh", [-0.5, 0.5])
    weight = torch.randn(6, 5, dtype=D, generator=_gen(7))
    graphs = {}
    for name in ("hardtanh", "clamp"):
        fn = {"hardtanh": lambda x: F.hardtanh(x, -0.5, 0.5), "clamp": lambda x: x.clamp(-0.5, 0.5)}[name]
        graph, out, _ = record(fn, x, weight=weight)
        graphs[name] = (graph, *_derive(graph, graph.node_id(out), graph.node_id(x)))
    graph, d, binding = graphs["hardtanh"]
    verify(d, graph, binding)
    honest = d.backward
    d.backward = graphs["clamp"][1].backward
    try:
        with pytest.raises(SymbolicError, match="disagrees with torch autograd"):
            verify(d, graph, binding)
    finally:
        d.backward = honest


def test_normalize_clamps_the_norm_at_eps_as_torch_does():
    """F.normalize is x / max(|x|, eps): rows with the norm below eps (a zero row), exactly at it (the clamp passes
    the gradient there up to torch 2.13, not from 2.14) and above it get torch's gradient; the zero row reads its
    branch, not 0/0."""
    x = torch.randn(6, 5, dtype=D, generator=_gen(46))
    x[0] = 0.0
    x[1] = torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0], dtype=D)  # norm exactly eps = 2
    x[2] = torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0], dtype=D)
    for dim, eps in ((1, 2.0), (1, 1e-12), (0, 1e-3)):
        d = derive(lambda x, dim=dim, eps=eps: F.normalize(x, dim=dim, eps=eps), x, tol=1e-10)
        assert isinstance(d.expr, sp.Piecewise) and "torch.where" in d.source, d.expr
        s = d.symbols
        norm = sp.sqrt(d.sum(s["x"] ** 2, "j" if dim == 1 else "i"))
        (below, condition), _ = d.expr.args  # below eps: dout*weight/eps, with no norm (no 0/0 at a zero row)
        assert condition.lhs == norm and float(condition.rhs) == eps and s["x"] not in below.free_symbols
    weight = torch.randn(6, 5, dtype=D, generator=_gen(7))
    away = torch.randn(6, 5, dtype=D, generator=_gen(47))
    ours = _fused_grad(lambda x: F.normalize(x, dim=1, eps=0.5), away, weight)
    torch.testing.assert_close(ours, _finite_differences(lambda v: (F.normalize(v, dim=1, eps=0.5) * weight).sum(),
                                                         away), rtol=1e-6, atol=1e-8)
    W = torch.randn(4, 5, dtype=D, generator=_gen(48))
    X = torch.randn(6, 4, dtype=D, generator=_gen(49))
    _assert_auto_fused_dW_is_torchs(lambda z: (F.normalize(z, dim=1) * weight).sum(), X, W)


def test_cosine_similarity_is_refused_by_name():
    """torch clamps cosine_similarity's norms at eps outside the gradient, which flows through the unclamped norm:
    no derivative of a closed form is that, so the chain is refused (naming the op) rather than derived wrong."""
    x, t = torch.randn(6, 5, dtype=D), torch.randn(6, 5, dtype=D)
    with tg.record() as g:
        y = F.cosine_similarity(x, t).sum()
    with pytest.raises(SymbolicError, match=r"cosine_similarity.*eps.*F.normalize"):
        symbolic.derive(g, output=y, wrt=x)


def test_a_cast_to_a_narrower_dtype_is_not_fused_away():
    """Found by the fuse fuzzer: ``x.float().double()`` fused into one float64 closed form (the casts read as the
    identity), so the gradient missed the float32 rounding that torch autograd (and the engine) give it:
    1.6e-8 off. A narrowing cast keeps its atomic rule; the rest of the chain still fuses."""
    x = torch.randn(3, 4, dtype=D, generator=_gen(21))
    w = torch.randn(3, 4, dtype=D, generator=_gen(22))

    def forward(t):
        return ((t.tanh() * 3).float().double().exp() * w).sum()

    with tg.record() as graph:
        loss = forward(x)
    fused = symbolic.auto_fuse(graph, loss)
    reference = x.clone().requires_grad_()
    want, = torch.autograd.grad(forward(reference), [reference])
    got = fused.backward(loss)[x]
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14), (got - want).abs().max()
    assert any(data["op"] == "fused" for data in fused._nodes)  # (tanh * 3 and exp * w fuse on either side)
    with tg.record() as graph:
        loss = (x.float().double() * w).sum()
    assert torch.equal(symbolic.auto_fuse(graph, loss).backward(loss)[x], w.float().double())
    with pytest.raises(symbolic.SymbolicError, match=r"casts to a less precise dtype at .*float"):
        symbolic.fuse(graph, loss, x)


@pytest.mark.parametrize("beta,threshold", [(2.0, 1.0), (1.0, 20.0)])
def test_softplus_is_its_input_past_the_threshold_as_in_torch(beta, threshold):
    """Found by the compile fuzzer: softplus's symbolic form ignored ``threshold`` (torch returns x where
    beta*x > threshold, gradient 1 there, not sigmoid(beta*x)). A rule derived on values below the threshold
    passed its check, was cached, and was reused for values above it: 0.17 off torch at threshold=1."""
    w0, w1, w2 = torch.randn(3, 12, dtype=D, generator=_gen(1))
    below = torch.linspace(-1.0, 0.9, 12, dtype=D) * threshold / beta
    for values in (below, below + threshold / beta):  # the first derives the rule; the second reuses it
        x = values.clone()

        def loss_of(x):
            y = F.softplus(x, beta=beta, threshold=threshold)
            return (x * w0).sum() + (y * w1).sum() + (y.view(-1) * w2).sum()

        step = tg.compile(lambda: loss_of(x), params=[x], fuse=True)  # noqa: B023 - run in this iteration
        _, grads = step()
        assert step.fused
        ref = x.clone().requires_grad_()
        loss_of(ref).backward()
        torch.testing.assert_close(grads[x], ref.grad, rtol=1e-12, atol=1e-12)
