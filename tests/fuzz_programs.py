"""Random tensor programs for the fuzzer (tests/test_fuzz.py).

A :class:`Builder` grows a program one step at a time. Each step is one generator of
:data:`GENERATORS`: it picks inputs among the program's live tensors (so intermediates
fan out and are reused) or makes new leaves of random broadcast-compatible shapes (0-d
to 3-d, size-1 dimensions often), draws the op's arguments, and runs the op eagerly to
learn its output. Steps whose output is not finite or is huge are dropped, so programs
stay where gradients are meaningful.

Every step has two spellings: ``run`` (what the recorded program executes, in-place
updates included) and ``replay`` (a functional twin for torch autograd, which refuses
in-place updates of tensors it saved). An in-place step retires the tensor it updates,
so both spellings mean the same program.

All random choices go through a :class:`Chooser`: hypothesis draws (the fuzzer, which
shrinks failures to a minimal program) or a seeded ``random.Random`` (the coverage test).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from op_cases import LEGACY_QR
from torch import Tensor

D = torch.float64
LIMIT = 1e6  # steps with a larger |value| are dropped: far from where float64 gradients are meaningful


# ---------------------------------------------------------------- choices


class Chooser:
    """The source of every random choice."""

    def integer(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self.integer(0, len(options) - 1)]

    def boolean(self) -> bool:
        return bool(self.integer(0, 1))


class RandomChooser(Chooser):
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


class HypothesisChooser(Chooser):
    """Draws through hypothesis, which shrinks each choice toward ``lo`` (the simplest option first)."""

    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self.data = data
        self.st = st

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))


# ---------------------------------------------------------------- programs


@dataclass
class Step:
    code: str  # for failure reports: "t4 = t1.clamp(min=-0.5)"
    inputs: tuple[int, ...]
    run: Callable[..., Tensor]
    replay: Callable[..., Tensor]
    inplace: bool = False


@dataclass
class Entry:
    value: Tensor  # leaves: the leaf itself; steps: the value computed while building
    step: Step | None = None
    dead: bool = False  # updated in place by a later step: no later step may read it

    @property
    def leaf(self) -> bool:
        return self.step is None


@dataclass
class Program:
    entries: list[Entry] = field(default_factory=list)
    weights: dict[int, Tensor] = field(default_factory=dict)  # the loss: sum of (t_i * w_i).sum()

    def leaves(self) -> list[int]:
        return [i for i, e in enumerate(self.entries) if e.leaf]

    def execute(self, leaves: dict[int, Tensor], replay: bool) -> list[Tensor]:
        env: list[Tensor] = []
        for i, entry in enumerate(self.entries):
            if entry.leaf:
                env.append(leaves[i])
            else:
                step = entry.step
                fn = step.replay if replay else step.run
                env.append(fn(*[env[k] for k in step.inputs]))
        return env

    def loss(self, env: list[Tensor]) -> Tensor:
        total = None
        for i, w in self.weights.items():
            term = (env[i] * w).sum()
            total = term if total is None else total + term
        return total

    def source(self) -> str:
        lines = []
        for i, e in enumerate(self.entries):
            if e.leaf:
                lines.append(f"t{i} = leaf {tuple(e.value.shape)} {e.value.dtype}")
            else:
                lines.append(e.step.code.format(*[f"t{k}" for k in e.step.inputs], out=f"t{i}")
                             + ("   # in place" if e.step.inplace else ""))
        lines.append("loss = " + " + ".join(f"(t{i} * w{i}).sum()" for i in self.weights))
        return "\n".join(lines)


class Reject(Exception):
    """The generator cannot make a valid step from what it drew."""


class Builder:
    def __init__(self, choose: Chooser, dtype: torch.dtype = D) -> None:
        self.choose = choose
        self.dtype = dtype
        self.program = Program()
        self.seed = choose.integer(0, 2**31 - 1)
        self.counter = 0

    @property
    def entries(self) -> list[Entry]:
        return self.program.entries

    # -- random pieces

    def generator(self) -> torch.Generator:
        self.counter += 1
        return torch.Generator().manual_seed(self.seed * 1009 + self.counter)

    def size(self, lo: int = 1) -> int:
        return self.choose.choice([1, 1, 2, 3, 4][lo - 1:] if lo <= 1 else list(range(lo, 5)))

    def shape(self, min_dim: int = 0, max_dim: int = 3, lo: int = 1) -> tuple[int, ...]:
        return tuple(self.size(lo) for _ in range(self.choose.integer(min_dim, max_dim)))

    def partner(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A shape that broadcasts with ``shape``: dims kept or set to 1, leading dims dropped or added."""
        dims = [s if self.choose.integer(0, 2) else 1 for s in shape]
        if self.choose.boolean():
            return tuple(dims[self.choose.integer(0, len(dims)):])
        while len(dims) < 3 and self.choose.integer(0, 3) == 0:
            dims.insert(0, self.size())
        return tuple(dims)

    def scalar(self, options: Sequence[float] = (-1.5, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0)) -> float:
        return self.choose.choice(list(options))

    def leaf(self, shape: tuple[int, ...], kind: str | None = None, dtype: torch.dtype | None = None) -> int:
        """A new input: "normal" values, "ties" (small integers: ties and zeros) or "positive"."""
        kind = kind or self.choose.choice(["normal", "normal", "normal", "ties"])
        dtype = dtype or (torch.float32 if self.choose.integer(0, 9) == 0 else self.dtype)
        gen = self.generator()
        if kind == "ties":
            value = torch.randint(-2, 3, shape, generator=gen).to(dtype)
        elif kind == "positive":
            value = (torch.rand(shape, generator=gen, dtype=D) + 0.5).to(dtype)
        else:
            value = torch.randn(shape, generator=gen, dtype=D).to(dtype)
        self.entries.append(Entry(value))
        return len(self.entries) - 1

    def index(self, high: int, shape: tuple[int, ...], unique: bool = False) -> list:
        """Integer index values below ``high`` (a nested list, for torch.tensor inside the step)."""
        n = math.prod(shape)
        if unique:
            if n > high:
                raise Reject("not enough distinct indices")
            flat = torch.randperm(high, generator=self.generator())[:n]
        else:
            flat = torch.randint(0, max(high, 1), (n,), generator=self.generator())
        return flat.view(shape).tolist()

    # -- picking inputs

    def live(self, pred: Callable[[Tensor], bool] | None = None) -> list[int]:
        found = []
        for i, e in enumerate(self.entries):
            v = e.value
            if e.dead or not v.is_floating_point() or v.dtype in (torch.float16, torch.bfloat16):
                continue
            if pred is None or pred(v):
                found.append(i)
        return found

    def pick(self, min_dim: int = 0, max_dim: int = 3, *, positive: bool = False, bounded: float | None = None,
             min_size: int = 1, nonempty: bool = True, shape: tuple[int, ...] | None = None) -> int:
        """An existing live tensor (fan-out and reuse) or, sometimes, a new leaf meeting the constraints."""

        def ok(v: Tensor) -> bool:
            if shape is not None:
                return tuple(v.shape) == shape
            if not min_dim <= v.dim() <= max_dim or (nonempty and v.numel() == 0):
                return False
            if any(s < min_size for s in v.shape):
                return False
            if positive and (v.numel() == 0 or v.min() <= 0.05):
                return False
            return bounded is None or v.numel() == 0 or bool(v.abs().max() <= bounded)

        found = self.live(ok)
        if found and self.choose.integer(0, 3):
            # recent tensors more often: programs grow deep rather than wide
            return found[-1 - min(self.choose.integer(0, 3), len(found) - 1)]
        if shape is None:
            shape = self.shape(min_dim, max_dim, lo=min_size)
        return self.leaf(shape, "positive" if positive else ("normal" if bounded else None))

    def pick_broadcast(self, shape: tuple[int, ...], **kwargs: Any) -> int:
        """A tensor whose shape broadcasts with ``shape``."""

        def fits(v: Tensor) -> bool:
            try:
                torch.broadcast_shapes(tuple(v.shape), shape)
            except RuntimeError:
                return False
            return v.dim() <= 3

        found = self.live(fits)
        if found and self.choose.integer(0, 2) == 0:
            return self.choose.choice(found)
        return self.leaf(self.partner(shape), **kwargs)

    def value(self, i: int) -> Tensor:
        return self.entries[i].value

    # -- adding steps

    def emit(self, code: str, inputs: Sequence[int], run: Callable[..., Tensor],
             replay: Callable[..., Tensor] | None = None, inplace: bool = False) -> int:
        """Run the step on the current values; keep it if its output is usable."""
        inputs = tuple(inputs)
        if inplace and not self._owns_memory(inputs[0]):
            raise Reject("in-place target shares memory with another live tensor")
        args = [self.entries[i].value for i in inputs]
        if inplace:  # building must not disturb the value other steps saw
            args[0] = args[0].clone()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecations and degrees-of-freedom warnings of odd draws
                out = run(*args)
        except (RuntimeError, IndexError, ValueError, TypeError) as err:
            raise Reject(str(err)) from None
        if not isinstance(out, Tensor) or not out.is_floating_point():
            raise Reject("no float output")
        if out.numel() and not (torch.isfinite(out).all() and out.abs().max() < LIMIT):
            raise Reject("output not finite or too large")
        if inplace:
            self.entries[inputs[0]].dead = True
        self.entries.append(Entry(out, Step(code, inputs, run, replay or run, inplace)))
        return len(self.entries) - 1

    def _owns_memory(self, i: int) -> bool:
        entry = self.entries[i]
        if entry.leaf:
            return False  # the user's inputs are not updated: their gradients are what we compare
        ptr = entry.value.untyped_storage().data_ptr()
        return not any(j != i and not e.dead and e.value.untyped_storage().data_ptr() == ptr
                       for j, e in enumerate(self.entries))

    def finish(self) -> Program:
        for i in self.live():
            w = torch.randn(self.entries[i].value.shape, generator=self.generator(), dtype=D)
            self.program.weights[i] = w
        return self.program


# ---------------------------------------------------------------- the generators

GENERATORS: dict[str, Callable[[Builder], int]] = {}


def gen(fn: Callable[[Builder], int]) -> Callable[[Builder], int]:
    GENERATORS[fn.__name__] = fn
    return fn


# (name, function, domain): domain None (any real), "positive", or a bound on |x|
UNARY: list[tuple[str, Callable[[Tensor], Tensor], Any]] = [
    ("{0}.neg()", torch.neg, None), ("-{0}", lambda x: -x, None), ("{0}.negative()", lambda x: x.negative(), None),
    ("abs({0})", abs, None), ("torch.absolute({0})", torch.absolute, None),
    ("{0}.exp()", torch.exp, 10.0), ("{0}.expm1()", torch.expm1, 10.0),
    ("{0}.log()", torch.log, "positive"), ("torch.log2({0})", torch.log2, "positive"),
    ("torch.log10({0})", torch.log10, "positive"), ("{0}.log1p()", torch.log1p, "positive"),
    ("{0}.sqrt()", torch.sqrt, "positive"), ("{0}.rsqrt()", torch.rsqrt, "positive"),
    ("{0}.reciprocal()", torch.reciprocal, "positive"),
    ("{0}.sin()", torch.sin, None), ("torch.cos({0})", torch.cos, None),
    ("torch.erf({0})", torch.erf, None), ("torch.special.erf({0})", torch.special.erf, None),
    ("torch.tanh({0})", torch.tanh, None), ("{0}.sigmoid()", torch.sigmoid, None),
    ("torch.special.expit({0})", torch.special.expit, None),
    ("F.relu({0})", F.relu, None), ("{0}.relu()", torch.relu, None),
    ("F.gelu({0})", F.gelu, None), ("F.gelu({0}, approximate='tanh')", lambda x: F.gelu(x, approximate="tanh"), None),
    ("F.silu({0})", F.silu, None), ("F.softplus({0})", F.softplus, None),
    ("F.softplus({0}, beta=2.0, threshold=1.0)", lambda x: F.softplus(x, beta=2.0, threshold=1.0), None),
    ("F.leaky_relu({0}, 0.2)", lambda x: F.leaky_relu(x, 0.2), None),
    ("F.elu({0}, alpha=0.7)", lambda x: F.elu(x, alpha=0.7), None),
    ("{0}.sign()", torch.sign, None), ("torch.sgn({0})", torch.sgn, None), ("{0}.floor()", torch.floor, None),
    ("{0}.ceil()", torch.ceil, None), ("{0}.round()", torch.round, None), ("torch.trunc({0})", torch.trunc, None),
    ("{0}.square()", torch.square, 100.0), ("{0} ** 2", lambda x: x**2, 100.0),
    ("{0}.pow(3)", lambda x: x.pow(3), 50.0),
    ("{0} ** -1", lambda x: x**-1, "positive"), ("{0} ** 0.5", lambda x: x**0.5, "positive"),
    ("{0} ** -1.5", lambda x: x**-1.5, "positive"), ("{0} ** 0", lambda x: x**0, None),
    ("2 ** {0}", lambda x: 2**x, 10.0), ("torch.pow(1.5, {0})", lambda x: torch.pow(1.5, x), 10.0),
    ("1 / {0}", lambda x: 1 / x, "positive"), ("2.5 / {0}", lambda x: 2.5 / x, "positive"),
    ("3 * {0}", lambda x: 3 * x, None), ("{0} * 0.5", lambda x: x * 0.5, None), ("{0} + 1.5", lambda x: x + 1.5, None),
    ("2 + {0}", lambda x: 2 + x, None), ("{0} - 0.5", lambda x: x - 0.5, None), ("1.5 - {0}", lambda x: 1.5 - x, None),
    ("{0} / 4", lambda x: x / 4, None), ("torch.div({0}, 2.0, rounding_mode='floor')",
                                       lambda x: torch.div(x, 2.0, rounding_mode="floor"), None),
    ("{0}.clone()", torch.clone, None),
    ("F.hardtanh({0})", F.hardtanh, None), ("F.hardtanh({0}, -0.5, 2.0)", lambda x: F.hardtanh(x, -0.5, 2.0), None),
    ("F.relu6({0} * 3)", lambda x: F.relu6(x * 3), None), ("F.mish({0})", F.mish, None),
    ("F.hardswish({0} * 3)", lambda x: F.hardswish(x * 3), None),
    ("F.hardsigmoid({0} * 3)", lambda x: F.hardsigmoid(x * 3), None),
    ("{0}.tan()", torch.tan, 1.0), ("{0}.asin()", torch.asin, 0.9), ("torch.acos({0})", torch.acos, 0.9),
    ("torch.atan({0})", torch.atan, None), ("{0}.sinh()", torch.sinh, 10.0), ("torch.cosh({0})", torch.cosh, 10.0),
    ("{0}.asinh()", torch.asinh, None), ("({0} + 1).acosh()", lambda x: (x + 1).acosh(), "positive"),
    ("{0}.atanh()", torch.atanh, 0.9),
    ("F.logsigmoid({0})", F.logsigmoid, None), ("F.selu({0})", F.selu, None),
    ("F.celu({0}, 0.5)", lambda x: F.celu(x, 0.5), None), ("F.softsign({0})", F.softsign, None),
    ("F.tanhshrink({0})", F.tanhshrink, None), ("F.hardshrink({0})", F.hardshrink, None),
    ("F.softshrink({0}, 1.0)", lambda x: F.softshrink(x, 1.0), None),
    ("F.threshold({0}, 0.0, -1.0)", lambda x: F.threshold(x, 0.0, -1.0), None), ("F.rrelu({0})", F.rrelu, None),
    ("{0}.sigmoid().logit()", lambda x: x.sigmoid().logit(), 10.0),
    ("torch.special.logit({0}.sigmoid(), eps=0.1)", lambda x: torch.special.logit(x.sigmoid(), eps=0.1), None),
    ("torch.erfc({0})", torch.erfc, None), ("torch.special.erfc({0})", torch.special.erfc, None),
    ("{0}.erfinv()", torch.erfinv, 0.9), ("torch.special.erfinv({0})", torch.special.erfinv, 0.9),
    ("{0}.lgamma()", torch.lgamma, "positive"), ("torch.special.gammaln({0})", torch.special.gammaln, "positive"),
    ("{0}.digamma()", torch.digamma, "positive"), ("torch.special.psi({0})", torch.special.psi, "positive"),
    ("torch.polygamma(1, {0})", lambda x: torch.polygamma(1, x), "positive"),
    ("torch.mvlgamma({0} + 1, 2)", lambda x: torch.mvlgamma(x + 1, 2), "positive"),
    ("torch.special.multigammaln({0} + 1, 2)", lambda x: torch.special.multigammaln(x + 1, 2), "positive"),
    ("{0}.exp2()", torch.exp2, 10.0), ("torch.special.exp2({0})", torch.special.exp2, 10.0),
    ("{0}.deg2rad()", torch.deg2rad, None), ("torch.rad2deg({0})", torch.rad2deg, None),
    ("{0}.frac()", torch.frac, None), ("{0}.nan_to_num()", torch.nan_to_num, None),
    ("torch.sinc({0})", torch.sinc, None), ("torch.special.sinc({0})", torch.special.sinc, None),
    ("torch.special.ndtr({0})", torch.special.ndtr, None),
    ("torch.special.log_ndtr({0})", torch.special.log_ndtr, None),
    ("torch.special.ndtri({0}.sigmoid())", lambda x: torch.special.ndtri(x.sigmoid()), 10.0),
    ("{0}.i0()", torch.i0, 10.0), ("torch.special.i0e({0})", torch.special.i0e, None),
    ("torch.special.i1({0})", torch.special.i1, 10.0), ("torch.special.i1e({0})", torch.special.i1e, None),
    ("torch.special.entr({0})", torch.special.entr, "positive"),
    ("torch.special.expm1({0})", torch.special.expm1, 10.0),
    ("torch.special.log1p({0})", torch.special.log1p, "positive"),
    ("torch.special.round({0})", torch.special.round, None),
    ("torch.special.erfcx({0})", torch.special.erfcx, 3.0), ("{0}.fix() + {0}", lambda x: x.fix() + x, None),
    ("torch.angle({0}) * {0}", lambda x: torch.angle(x) * x, None),
    ("torch.frexp({0}).mantissa", lambda x: torch.frexp(x).mantissa, None),
    ("torch.ldexp({0}, torch.tensor(2))", lambda x: torch.ldexp(x, torch.tensor(2)), None),
    ("F.softmin({0}, -1)", lambda x: F.softmin(x, -1), None),
    ("torch.special.gammainc(torch.tensor(1.5), {0})",
     lambda x: torch.special.gammainc(torch.tensor(1.5, dtype=x.dtype), x), "positive"),
    ("torch.igammac(torch.tensor(0.7), {0})", lambda x: torch.igammac(torch.tensor(0.7, dtype=x.dtype), x), "positive"),
    ("torch.special.zeta(torch.tensor(2.5), {0})",
     lambda x: torch.special.zeta(torch.tensor(2.5, dtype=x.dtype), x), "positive"),
]


@gen
def unary(b: Builder) -> int:
    code, fn, domain = b.choose.choice(UNARY)
    if domain == "positive":
        x = b.pick(positive=True)
    else:
        x = b.pick(bounded=domain)
    return b.emit("{out} = " + code, [x], fn)


@gen
def clamp(b: Builder) -> int:
    x = b.pick()
    low = b.choose.choice([None, -1.0, -0.5, 0.0, 0.3])
    high = b.choose.choice([None, 0.0, 0.5, 1.0, 2.0])
    form = b.choose.integer(0, 5)
    if form == 0 and (low is not None or high is not None):
        return b.emit(f"{{out}} = {{0}}.clamp({low}, {high})", [x], lambda t: t.clamp(low, high))
    if form == 1:
        lo = 0.0 if low is None else low
        return b.emit(f"{{out}} = torch.clamp_min({{0}}, {lo})", [x], lambda t: torch.clamp_min(t, lo))
    if form == 2:
        hi = 1.0 if high is None else high
        return b.emit(f"{{out}} = {{0}}.clamp_max({hi})", [x], lambda t: t.clamp_max(hi))
    if form == 3:
        return b.emit(f"{{out}} = torch.clip({{0}}, min={low}, max={high if low is None else None})",
                      [x], lambda t: torch.clip(t, min=low, max=high if low is None else None) if (
                          low is not None or high is not None) else t.clip(min=0.0))
    shape = tuple(b.value(x).shape)
    lo_t = b.pick_broadcast(shape)
    if form == 4:  # tensor bounds
        return b.emit("{out} = {0}.clamp(min={1})", [x, lo_t], lambda t, m: t.clamp(min=m))
    hi_t = b.pick_broadcast(shape)
    return b.emit("{out} = torch.clamp({0}, {1}, {2})", [x, lo_t, hi_t], lambda t, m, n: torch.clamp(t, m, n))


BINARY: list[tuple[str, Callable[[Tensor, Tensor], Tensor]]] = [
    ("{0} + {1}", lambda a, c: a + c), ("torch.add({0}, {1}, alpha=2.0)", lambda a, c: torch.add(a, c, alpha=2.0)),
    ("{0} - {1}", lambda a, c: a - c), ("{0}.sub({1}, alpha=0.5)", lambda a, c: a.sub(c, alpha=0.5)),
    ("torch.subtract({0}, {1})", torch.subtract),
    ("torch.rsub({0}, {1})", torch.rsub), ("torch.rsub({0}, {1}, alpha=3)", lambda a, c: torch.rsub(a, c, alpha=3)),
    ("{0} * {1}", lambda a, c: a * c), ("torch.mul({0}, {1})", torch.mul), ("{0}.multiply({1})", torch.multiply),
    ("torch.maximum({0}, {1})", torch.maximum), ("torch.minimum({0}, {1})", torch.minimum),
    ("torch.max({0}, {1})", torch.max), ("{0}.min({1})", lambda a, c: a.min(c)),
    ("torch.fmax({0}, {1})", torch.fmax), ("torch.fmin({0}, {1})", torch.fmin),
    ("torch.where({0} > {1}, {0}, {1})", lambda a, c: torch.where(a > c, a, c)),
    ("torch.where({1} > 0, {0}, {1})", lambda a, c: torch.where(c > 0, a, c)),
    ("torch.where({0} < 0.5, {0}, 1.0)", lambda a, c: torch.where(a < 0.5, a, 1.0) * c),
    ("{0}.masked_fill({1} > 0, -1.0) * {1}", lambda a, c: a.masked_fill(c > 0, -1.0) * c),
    ("torch.atan2({0}, {1})", torch.atan2), ("{0}.arctan2({1})", lambda a, c: a.arctan2(c)),
    ("torch.lerp({0}, {1}, 0.3)", lambda a, c: torch.lerp(a, c, 0.3)),
    ("{0}.lerp({1}, {1})", lambda a, c: a.lerp(c, c)),
    ("torch.addcmul({0}, {0}, {1}, value=0.5)", lambda a, c: torch.addcmul(a, a, c, value=0.5)),
    ("torch.addcdiv({1}, {0}, {1}.abs() + 0.5, value=-2)", lambda a, c: torch.addcdiv(c, a, c.abs() + 0.5, value=-2)),
    ("torch.logaddexp({0}, {1})", torch.logaddexp), ("torch.logaddexp2({0}, {1})", torch.logaddexp2),
    ("torch.hypot({0}, {1})", torch.hypot), ("torch.copysign({0}, {1})", torch.copysign),
    ("torch.xlogy({0}, {1}.abs() + 0.5)", lambda a, c: torch.xlogy(a, c.abs() + 0.5)),
    ("torch.special.xlogy({0}, 2.0) * {1}", lambda a, c: torch.special.xlogy(a, 2.0) * c),
    ("torch.special.xlog1py({0}, {1}.abs())", lambda a, c: torch.special.xlog1py(a, c.abs())),
    ("{0} % ({1}.abs() + 0.5)", lambda a, c: a % (c.abs() + 0.5)),
    ("torch.fmod({0}, {1}.abs() + 0.5)", lambda a, c: torch.fmod(a, c.abs() + 0.5)),
    ("torch.float_power({0}.abs() + 0.5, {1})", lambda a, c: torch.float_power(a.abs() + 0.5, c)),
]


@gen
def binary(b: Builder) -> int:
    code, fn = b.choose.choice(BINARY)
    x = b.pick()
    y = b.pick_broadcast(tuple(b.value(x).shape))
    if b.choose.boolean():
        x, y = y, x
    return b.emit("{out} = " + code, [x, y], fn)


@gen
def division(b: Builder) -> int:
    x = b.pick()
    y = b.pick_broadcast(tuple(b.value(x).shape), kind="positive")
    form = b.choose.integer(0, 4)
    if not bool((b.value(y).abs() > 0.05).all()):
        return b.emit("{out} = {0} / ({1}.abs() + 0.5)", [x, y], lambda a, c: a / (c.abs() + 0.5))
    if form == 0:
        return b.emit("{out} = {0} / {1}", [x, y], lambda a, c: a / c)
    if form == 1:
        return b.emit("{out} = torch.true_divide({0}, {1})", [x, y], torch.true_divide)
    if form == 2:
        return b.emit("{out} = {0}.divide({1})", [x, y], lambda a, c: a.divide(c))
    if form == 3:
        return b.emit("{out} = torch.div({0}, {1}, rounding_mode='trunc') + {0}", [x, y],
                      lambda a, c: torch.div(a, c, rounding_mode="trunc") + a)
    return b.emit("{out} = {1} / {0}", [y, x], lambda a, c: c / a)


@gen
def power(b: Builder) -> int:
    base = b.pick(positive=True)
    exponent = b.pick_broadcast(tuple(b.value(base).shape))
    if bool((b.value(exponent).abs() > 4).any()):
        raise Reject("exponent too large")
    if b.choose.boolean():
        return b.emit("{out} = {0} ** {1}", [base, exponent], lambda a, e: a**e)
    return b.emit("{out} = torch.pow({0}, {1})", [base, exponent], torch.pow)


@gen
def masked_fill(b: Builder) -> int:
    x = b.pick()
    m = b.pick_broadcast(tuple(b.value(x).shape))
    out_shape = torch.broadcast_shapes(b.value(x).shape, b.value(m).shape)
    if tuple(out_shape) != tuple(b.value(x).shape):
        raise Reject("mask must broadcast to x")
    if b.choose.boolean():
        value = b.pick(0, 0)
        if b.choose.integer(0, 3) == 0:  # the whole tensor filled: only the value gets a gradient
            return b.emit("{out} = torch.fill({0}, {1})", [x, value], torch.fill)
        return b.emit("{out} = {0}.masked_fill({1} > 0, {2})", [x, m, value],
                      lambda t, k, v: t.masked_fill(k > 0, v))
    fill = b.scalar()
    return b.emit(f"{{out}} = {{0}}.masked_fill({{1}} < 0.5, {fill})", [x, m],
                  lambda t, k: t.masked_fill(k < 0.5, fill))


# ---------------------------------------------------------------- matrix products


@gen
def matmul(b: Builder) -> int:
    x = b.pick(1, 3)
    xs = tuple(b.value(x).shape)
    k = xs[-1]
    form = b.choose.integer(0, 6)
    if form == 0 and len(xs) == 2:
        y = b.pick(shape=(k, b.size()))
        return b.emit("{out} = torch.mm({0}, {1})", [x, y], torch.mm)
    if form == 1 and len(xs) == 3:
        y = b.pick(shape=(xs[0], k, b.size()))
        return b.emit("{out} = {0}.bmm({1})", [x, y], torch.bmm)
    if form == 2 and len(xs) == 2:
        y = b.pick(shape=(k,))
        return b.emit("{out} = torch.mv({0}, {1})", [x, y], torch.mv)
    if form == 3 and len(xs) == 1:
        y = b.pick(shape=(k,))
        return b.emit("{out} = torch.dot({0}, {1})", [x, y], torch.dot)
    if form == 4:
        shape = b.partner(xs[:-1])[-1:] + (k,)  # inner: contract the last dims
        y = b.pick(shape=shape if len(xs) > 1 else (k,))
        return b.emit("{out} = torch.inner({0}, {1})", [x, y], torch.inner)
    # general matmul: (k) or (..., k, m), with broadcasting batch dims
    rank = b.choose.integer(1, 3)
    if rank == 1:
        shape = (k,)
    else:
        batch = b.partner(xs[:-2])[-(rank - 2):] if rank == 3 and len(xs) > 2 else (
            (b.size(),) if rank == 3 else ())
        shape = batch + (k, b.size())
    y = b.pick(shape=shape)
    if b.choose.boolean():
        return b.emit("{out} = {0} @ {1}", [x, y], lambda p, q: p @ q)
    return b.emit("{out} = torch.matmul({0}, {1})", [x, y], torch.matmul)


@gen
def outer(b: Builder) -> int:
    x, y = b.pick(1, 1), b.pick(1, 1)
    if b.choose.boolean():
        return b.emit("{out} = torch.outer({0}, {1})", [x, y], torch.outer)
    return b.emit("{out} = {0}.ger({1})", [x, y], lambda p, q: p.ger(q))


@gen
def linear(b: Builder) -> int:
    x = b.pick(1, 3)
    k = b.value(x).shape[-1]
    n = b.size()
    w = b.pick(shape=(n, k))
    if b.choose.boolean():
        return b.emit("{out} = F.linear({0}, {1})", [x, w], F.linear)
    bias = b.pick(shape=b.choose.choice([(n,), (), (1,)]))
    return b.emit("{out} = F.linear({0}, {1}, {2})", [x, w, bias], F.linear)


@gen
def addmm(b: Builder) -> int:
    if b.choose.integer(0, 2) == 0:
        return _baddbmm(b)
    m1 = b.pick(2, 2)
    n, k = b.value(m1).shape
    m = b.size()
    m2 = b.pick(shape=(k, m))
    bias = b.pick(shape=b.choose.choice([(n, m), (m,), (), (1, m), (n, 1)]))
    beta, alpha = b.choose.choice([(1, 1), (0.5, 2.0), (1, -1.0)])
    return b.emit(f"{{out}} = torch.addmm({{0}}, {{1}}, {{2}}, beta={beta}, alpha={alpha})", [bias, m1, m2],
                  lambda c, p, q: torch.addmm(c, p, q, beta=beta, alpha=alpha))


def _baddbmm(b: Builder) -> int:
    m1 = b.pick(3, 3)
    batch, n, k = b.value(m1).shape
    m = b.size()
    m2 = b.pick(shape=(batch, k, m))
    bias = b.pick(shape=b.choose.choice([(batch, n, m), (n, m), (m,), (), (1, n, 1)]))
    beta, alpha = b.choose.choice([(1, 1), (0.5, 2.0), (1, -1.0)])
    return b.emit(f"{{out}} = torch.baddbmm({{0}}, {{1}}, {{2}}, beta={beta}, alpha={alpha})", [bias, m1, m2],
                  lambda c, p, q: torch.baddbmm(c, p, q, beta=beta, alpha=alpha))


@gen
def addbmm(b: Builder) -> int:
    m1 = b.pick(3, 3)
    batch, n, k = b.value(m1).shape
    m = b.size()
    m2 = b.pick(shape=(batch, k, m))
    bias = b.pick(shape=b.choose.choice([(n, m), (m,), (), (n, 1)]))
    beta, alpha = b.choose.choice([(1, 1), (0.5, 2.0), (1, -1.0)])
    return b.emit(f"{{out}} = torch.addbmm({{0}}, {{1}}, {{2}}, beta={beta}, alpha={alpha})", [bias, m1, m2],
                  lambda c, p, q: torch.addbmm(c, p, q, beta=beta, alpha=alpha))


# ---------------------------------------------------------------- reductions


def _dims(b: Builder, ndim: int, allow_none: bool = True, allow_tuple: bool = True) -> Any:
    options = ["int"] + (["none"] if allow_none else []) + (["tuple"] if allow_tuple and ndim > 1 else [])
    kind = b.choose.choice(options) if ndim else "none"
    if kind == "none":
        return None
    if kind == "int":
        return b.choose.integer(-ndim, ndim - 1)
    picked = sorted({b.choose.integer(0, ndim - 1) for _ in range(b.choose.integer(1, ndim))})
    return tuple(picked)


@gen
def reduce_sum_mean(b: Builder) -> int:
    x = b.pick()
    nd = b.value(x).dim()
    dim = _dims(b, nd)
    keepdim = b.choose.boolean()
    name = b.choose.choice(["sum", "mean"])
    if dim is None:
        if b.choose.boolean():
            return b.emit(f"{{out}} = {{0}}.{name}()", [x], lambda t: getattr(t, name)())
        dim = tuple(range(nd)) if nd else None
    if dim is None:
        return b.emit(f"{{out}} = torch.{name}({{0}})", [x], lambda t: getattr(torch, name)(t))
    if b.choose.boolean():
        return b.emit(f"{{out}} = {{0}}.{name}({dim}, keepdims={keepdim})", [x],
                      lambda t: getattr(t, name)(dim, keepdims=keepdim))
    return b.emit(f"{{out}} = torch.{name}({{0}}, dim={dim}, keepdim={keepdim})", [x],
                  lambda t: getattr(torch, name)(t, dim=dim, keepdim=keepdim))


@gen
def reduce_var_std(b: Builder) -> int:
    x = b.pick(0, 3)
    nd = b.value(x).dim()
    name = b.choose.choice(["var", "std"])
    dim = _dims(b, nd)
    keepdim = b.choose.boolean()
    form = b.choose.integer(0, 3)
    if form == 3:  # both statistics in one call: var_mean / std_mean, either output
        correction, k = b.choose.choice([0, 1]), b.choose.integer(0, 1)
        return b.emit(f"{{out}} = torch.{name}_mean({{0}}, dim={dim}, correction={correction}, keepdim={keepdim})[{k}]",
                      [x], lambda t: getattr(torch, name + "_mean")(t, dim=dim, correction=correction,
                                                                    keepdim=keepdim)[k])
    if form == 0:
        unbiased = b.choose.boolean()
        if dim is None:
            return b.emit(f"{{out}} = {{0}}.{name}(unbiased={unbiased})", [x],
                          lambda t: getattr(t, name)(unbiased=unbiased))
        return b.emit(f"{{out}} = {{0}}.{name}({dim}, unbiased={unbiased}, keepdim={keepdim})", [x],
                      lambda t: getattr(t, name)(dim, unbiased=unbiased, keepdim=keepdim))
    correction = b.choose.choice([0, 1, 2])
    return b.emit(f"{{out}} = torch.{name}({{0}}, dim={dim}, correction={correction}, keepdim={keepdim})", [x],
                  lambda t: getattr(torch, name)(t, dim=dim, correction=correction, keepdim=keepdim))


@gen
def reduce_select(b: Builder) -> int:
    x = b.pick()
    nd = b.value(x).dim()
    name = b.choose.choice(["max", "min"])
    form = b.choose.integer(0, 3)
    if form == 0 or nd == 0:
        return b.emit(f"{{out}} = {{0}}.{name}()", [x], lambda t: getattr(t, name)())
    dim = b.choose.integer(-nd, nd - 1)
    keepdim = b.choose.boolean()
    if form == 1:
        return b.emit(f"{{out}} = {{0}}.{name}({dim}, keepdim={keepdim}).values", [x],
                      lambda t: getattr(t, name)(dim, keepdim=keepdim).values)
    if form == 2:
        return b.emit(f"{{out}} = torch.{name}({{0}}, dim={dim})[0]", [x],
                      lambda t: getattr(torch, name)(t, dim=dim)[0])
    dims = _dims(b, nd, allow_none=False)
    return b.emit(f"{{out}} = {{0}}.a{name}({dims}, keepdim={keepdim})", [x],
                  lambda t: getattr(t, "a" + name)(dims, keepdim=keepdim))


@gen
def reduce_other(b: Builder) -> int:
    x = b.pick()
    nd = b.value(x).dim()
    form = b.choose.integer(0, 8)
    keepdim = b.choose.boolean()
    if form >= 5:
        return _order_statistics(b, x, nd, form, keepdim)
    if form == 0:
        dim = _dims(b, nd, allow_none=False) if nd else 0
        return b.emit(f"{{out}} = {{0}}.logsumexp({dim}, keepdim={keepdim})", [x],
                      lambda t: t.logsumexp(dim, keepdim=keepdim))
    if form == 1:
        dim = b.choose.integer(-nd, nd - 1) if nd else 0
        return b.emit(f"{{out}} = {{0}}.cumsum({dim})", [x], lambda t: t.cumsum(dim))
    if form == 2:
        return b.emit("{out} = {0}.norm()", [x], lambda t: t.norm())
    dim = _dims(b, nd, allow_none=True)
    if form == 3:
        return b.emit(f"{{out}} = torch.norm({{0}}, dim={dim}, keepdim={keepdim})", [x],
                      lambda t: torch.norm(t, dim=dim, keepdim=keepdim))
    return b.emit(f"{{out}} = torch.linalg.vector_norm({{0}}, 2, dim={dim}, keepdim={keepdim})", [x],
                  lambda t: torch.linalg.vector_norm(t, 2, dim=dim, keepdim=keepdim))


def _order_statistics(b: Builder, x: int, nd: int, form: int, keepdim: bool) -> int:
    """prod (zeros included), sort and topk."""
    if form == 5:
        if nd == 0 or b.choose.boolean():
            return b.emit("{out} = {0}.prod()", [x], lambda t: t.prod())
        dim = b.choose.integer(-nd, nd - 1)
        return b.emit(f"{{out}} = torch.prod({{0}}, {dim}, keepdim={keepdim})", [x],
                      lambda t: torch.prod(t, dim, keepdim=keepdim))
    dim = b.choose.integer(-nd, nd - 1) if nd else 0
    if form == 6:
        descending = b.choose.boolean()
        return b.emit(f"{{out}} = {{0}}.sort({dim}, descending={descending}).values", [x],
                      lambda t: t.sort(dim, descending=descending).values)
    size = b.value(x).shape[dim] if nd else 1
    k = b.choose.integer(0, size) if size else 0
    largest = b.choose.boolean()
    if form == 7 and nd:
        return b.emit(f"{{out}} = {{0}}.topk({k}, dim={dim}, largest={largest})[0]", [x],
                      lambda t: t.topk(k, dim=dim, largest=largest)[0])
    return b.emit("{out} = torch.msort({0})", [x], lambda t: torch.msort(t))


@gen
def reduce_median(b: Builder) -> int:
    """median / nanmedian (in full: ties share the gradient; along a dim: the returned index), kthvalue, mode."""
    x = b.pick()
    nd = b.value(x).dim()
    name = b.choose.choice(["median", "nanmedian"])
    form = b.choose.integer(0, 3)
    if form == 0:
        return b.emit(f"{{out}} = {{0}}.{name}()", [x], lambda t: getattr(t, name)())
    dim = b.choose.integer(-nd, nd - 1) if nd else 0
    keepdim = b.choose.boolean()
    if form == 1:
        return b.emit(f"{{out}} = torch.{name}({{0}}, {dim}, keepdim={keepdim}).values", [x],
                      lambda t: getattr(torch, name)(t, dim, keepdim=keepdim).values)
    if form == 2:
        k = b.choose.integer(1, b.value(x).shape[dim] if nd else 1)
        return b.emit(f"{{out}} = {{0}}.kthvalue({k}, {dim}, keepdim={keepdim})[0]", [x],
                      lambda t: t.kthvalue(k, dim, keepdim=keepdim)[0])
    return b.emit(f"{{out}} = torch.mode({{0}}, {dim}, keepdim={keepdim}).values", [x],
                  lambda t: torch.mode(t, dim, keepdim=keepdim).values)


@gen
def normalize(b: Builder) -> int:
    """F.normalize (any p; zero vectors from tied values) and F.cosine_similarity (broadcasting)."""
    x = b.pick(1, 3)
    shape = tuple(b.value(x).shape)
    if b.choose.boolean():
        p = b.choose.choice([2.0, 2.0, 1.0, 3.0, 1.5, 0.5])
        dim = b.choose.integer(-len(shape), len(shape) - 1)
        return b.emit(f"{{out}} = F.normalize({{0}}, p={p}, dim={dim})", [x], lambda t: F.normalize(t, p=p, dim=dim))
    y = b.pick_broadcast(shape)
    if b.choose.boolean():
        x, y = y, x
    return b.emit("{out} = F.cosine_similarity({0}, {1}, dim=-1)", [x, y],
                  lambda t, u: F.cosine_similarity(t, u, dim=-1))


@gen
def weight_norm(b: Builder) -> int:
    """torch._weight_norm (nn.utils.parametrizations.weight_norm): v * (g / |v|), the norm over every dim but dim
    (all of them for -1); v positive, so that no norm is 0."""
    v = b.pick(1, 3, positive=True)
    shape = tuple(b.value(v).shape)
    dim = b.choose.integer(-1, len(shape) - 1)
    g = b.pick(shape=() if dim == -1 else tuple(s if i == dim else 1 for i, s in enumerate(shape)))
    return b.emit(f"{{out}} = torch._weight_norm({{0}}, {{1}}, {dim})", [v, g],
                  lambda t, u: torch._weight_norm(t, u, dim))


@gen
def einsum(b: Builder) -> int:
    """Contractions, transposes, sums and outer products spelled as einsum equations."""
    x = b.pick()
    v = b.value(x)
    letters = "ijk"[: v.dim()]
    form = b.choose.integer(0, 2)
    if form == 0 or not letters:  # reduce or permute one operand
        out = "".join(c for c in letters[::-1] if b.choose.boolean())
        return b.emit(f"{{out}} = torch.einsum('{letters}->{out}', {{0}})", [x],
                      lambda t: torch.einsum(f"{letters}->{out}", t))
    shape = tuple(v.shape[letters.index(c)] for c in letters[-1:]) + (b.choose.integer(1, 3),)
    y = b.leaf(shape)
    other = letters[-1] + "z"
    out = letters[:-1] + "z" if form == 1 else ""
    equation = f"{letters},{other}->{out}" if form == 1 else f"{letters},{other}"
    return b.emit(f"{{out}} = torch.einsum('{equation}', {{0}}, {{1}})", [x, y],
                  lambda t, u: torch.einsum(equation, t, u))


@gen
def attention(b: Builder) -> int:
    """F.scaled_dot_product_attention with and without a causal or additive mask."""
    q = b.pick(min_dim=2, max_dim=3)
    shape = tuple(b.value(q).shape)
    length = b.choose.integer(1, 4)
    k = b.leaf(shape[:-2] + (length, shape[-1]))
    v = b.leaf(shape[:-2] + (length, b.choose.integer(1, 3)))
    form = b.choose.integer(0, 2)
    if form == 0:
        return b.emit("{out} = F.scaled_dot_product_attention({0}, {1}, {2})", [q, k, v],
                      lambda a, c, d: F.scaled_dot_product_attention(a, c, d))
    if form == 1:
        return b.emit("{out} = F.scaled_dot_product_attention({0}, {1}, {2}, is_causal=True)", [q, k, v],
                      lambda a, c, d: F.scaled_dot_product_attention(a, c, d, is_causal=True))
    m = b.leaf((shape[-2], length))
    return b.emit("{out} = F.scaled_dot_product_attention({0}, {1}, {2}, attn_mask={3})", [q, k, v, m],
                  lambda a, c, d, e: F.scaled_dot_product_attention(a, c, d, attn_mask=e))


# ---------------------------------------------------------------- shapes and views


def _factor(b: Builder, n: int, parts: int) -> list[int]:
    """``parts`` positive sizes whose product is ``n``."""
    sizes = []
    for _ in range(parts - 1):
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        d = b.choose.choice(divisors)
        sizes.append(d)
        n //= d
    return sizes + [n]


@gen
def reshape(b: Builder) -> int:
    x = b.pick()
    v = b.value(x)
    n = v.numel()
    parts = b.choose.integer(0 if n == 1 else 1, 3)
    shape = _factor(b, n, parts) if parts else []
    if shape and b.choose.boolean():
        shape[b.choose.integer(0, len(shape) - 1)] = -1
    shape = tuple(shape)
    form = b.choose.integer(0, 5)
    if form == 0:
        return b.emit(f"{{out}} = {{0}}.view({shape})", [x], lambda t: t.view(shape))
    if form == 1:
        return b.emit(f"{{out}} = {{0}}.reshape{shape if len(shape) != 1 else '(' + str(shape[0]) + ')'}",
                      [x], lambda t: t.reshape(*shape) if shape else t.reshape(()))
    if form == 2:
        return b.emit(f"{{out}} = torch.reshape({{0}}, {shape})", [x], lambda t: torch.reshape(t, shape))
    template = tuple(abs(s) if s != -1 else n // max(1, math.prod(abs(z) for z in shape if z != -1)) for s in shape)
    other = b.pick(shape=template)
    name = "view_as" if form == 3 else "reshape_as"
    return b.emit(f"{{out}} = {{0}}.{name}({{1}})", [x, other], lambda t, o: getattr(t, name)(o))


@gen
def flatten_squeeze(b: Builder) -> int:
    x = b.pick()
    v = b.value(x)
    nd = v.dim()
    form = b.choose.integer(0, 6)
    if form == 0:
        start = b.choose.integer(0, max(nd - 1, 0))
        end = b.choose.integer(start, max(nd - 1, 0))
        return b.emit(f"{{out}} = {{0}}.flatten({start}, {end})", [x], lambda t: t.flatten(start, end))
    if form == 1:
        return b.emit("{out} = torch.ravel({0})", [x], torch.ravel)
    if form == 2 and nd:
        dim = b.choose.integer(-nd, nd - 1)
        sizes = tuple(_factor(b, v.shape[dim], b.choose.integer(1, 2)))
        return b.emit(f"{{out}} = {{0}}.unflatten({dim}, {sizes})", [x], lambda t: t.unflatten(dim, sizes))
    if form == 3:
        return b.emit("{out} = {0}.squeeze()", [x], lambda t: t.squeeze())
    if form == 4 and nd:
        dim = b.choose.integer(-nd, nd - 1)
        return b.emit(f"{{out}} = torch.squeeze({{0}}, {dim})", [x], lambda t: torch.squeeze(t, dim))
    dim = b.choose.integer(-nd - 1, nd)
    return b.emit(f"{{out}} = {{0}}.unsqueeze({dim})", [x], lambda t: t.unsqueeze(dim))


@gen
def transpose(b: Builder) -> int:
    x = b.pick()
    nd = b.value(x).dim()
    form = b.choose.integer(0, 7)
    if form == 0 and nd <= 2:
        return b.emit("{out} = {0}.t()", [x], lambda t: t.t())
    if form == 1 and nd in (0, 2):
        return b.emit("{out} = {0}.T", [x], lambda t: t.T)
    if form == 2 and nd >= 2:
        return b.emit("{out} = {0}.mT", [x], lambda t: t.mT)
    if form == 3 and nd >= 2:
        return b.emit("{out} = {0}.mH", [x], lambda t: t.mH)
    if form == 4 and nd == 2:
        return b.emit("{out} = {0}.H", [x], lambda t: t.H)
    if form == 5 and nd >= 2:
        return b.emit("{out} = {0}.adjoint()", [x], lambda t: t.adjoint())
    if nd == 0:
        return b.emit("{out} = {0}.transpose(0, -1)", [x], lambda t: t.transpose(0, -1))
    d0, d1 = b.choose.integer(-nd, nd - 1), b.choose.integer(-nd, nd - 1)
    name = b.choose.choice(["transpose", "swapaxes", "swapdims"])
    return b.emit(f"{{out}} = {{0}}.{name}({d0}, {d1})", [x], lambda t: getattr(t, name)(d0, d1))


@gen
def permute(b: Builder) -> int:
    x = b.pick()
    nd = b.value(x).dim()
    if b.choose.boolean() or nd == 0:
        perm = tuple(torch.randperm(nd, generator=b.generator()).tolist())
        if b.choose.boolean():
            return b.emit(f"{{out}} = {{0}}.permute{perm if nd != 1 else (perm[0],)}", [x], lambda t: t.permute(*perm))
        return b.emit(f"{{out}} = torch.permute({{0}}, {perm})", [x], lambda t: torch.permute(t, perm))
    src, dst = b.choose.integer(-nd, nd - 1), b.choose.integer(-nd, nd - 1)
    if b.choose.boolean():
        return b.emit(f"{{out}} = {{0}}.movedim({src}, {dst})", [x], lambda t: t.movedim(src, dst))
    return b.emit(f"{{out}} = torch.moveaxis({{0}}, ({src},), ({dst},))", [x],
                  lambda t: torch.moveaxis(t, (src,), (dst,)))


@gen
def contiguous_clone(b: Builder) -> int:
    x = b.pick()
    nd = b.value(x).dim()
    if nd >= 2 and b.choose.boolean():
        return b.emit("{out} = {0}.mT.contiguous()", [x], lambda t: t.mT.contiguous())
    if b.choose.boolean():
        return b.emit("{out} = {0}.clone()", [x], lambda t: t.clone())
    return b.emit("{out} = {0}.contiguous()", [x], lambda t: t.contiguous())  # an alias when contiguous


@gen
def expand(b: Builder) -> int:
    x = b.pick()
    shape = tuple(b.value(x).shape)
    target = tuple(s if s != 1 else b.size() for s in shape)
    while len(target) < 3 and b.choose.boolean():
        target = (b.size(),) + target
    form = b.choose.integer(0, 3)
    if form == 0:
        return b.emit(f"{{out}} = {{0}}.expand{target if len(target) != 1 else f'({target[0]})'}", [x],
                      lambda t: t.expand(*target) if target else t.expand(()))
    if form == 1:
        return b.emit(f"{{out}} = torch.broadcast_to({{0}}, {target})", [x], lambda t: torch.broadcast_to(t, target))
    if form == 2:
        other = b.pick(shape=target)
        return b.emit("{out} = {0}.expand_as({1})", [x, other], lambda t, o: t.expand_as(o))
    # sum_to_size: the reverse of expand
    small = tuple(s if b.choose.boolean() else 1 for s in shape)[b.choose.integer(0, len(shape)):]
    return b.emit(f"{{out}} = {{0}}.sum_to_size({small})", [x], lambda t: t.sum_to_size(small))


@gen
def casts(b: Builder) -> int:
    x = b.pick()
    form = b.choose.integer(0, 8)
    if form == 0:
        return b.emit("{out} = {0}.to(torch.float32)", [x], lambda t: t.to(torch.float32))
    if form == 1:
        return b.emit("{out} = {0}.float()", [x], lambda t: t.float())
    if form == 2:
        return b.emit("{out} = {0}.float().double()", [x], lambda t: t.float().double())
    if form == 3:
        return b.emit("{out} = {0}.half().to({0}.dtype)", [x], lambda t: t.half().to(t.dtype))
    if form == 4:
        return b.emit("{out} = {0}.bfloat16().to(dtype={0}.dtype)", [x], lambda t: t.bfloat16().to(dtype=t.dtype))
    if form == 5:
        return b.emit("{out} = {0}.type(torch.float32)", [x], lambda t: t.type(torch.float32))
    if form == 6:
        other = b.pick()
        return b.emit("{out} = {0}.float().type_as({1})", [x, other], lambda t, o: t.float().type_as(o))
    if form == 7:
        if b.choose.boolean():
            return b.emit("{out} = torch.as_tensor({0}, dtype=torch.float32)", [x],
                          lambda t: torch.as_tensor(t, dtype=torch.float32))
        return b.emit("{out} = {0}.to(torch.float64) * 1.0", [x], lambda t: t.to(torch.float64) * 1.0)
    return b.emit("{out} = {0}.cpu() * 2.0", [x], lambda t: t.cpu() * 2.0)  # .cpu() of a CPU tensor is itself


@gen
def repeat(b: Builder) -> int:
    x = b.pick()
    nd = b.value(x).dim()
    sizes = tuple(b.choose.choice([1, 2, 3]) for _ in range(b.choose.integer(nd, 3)))
    if b.choose.boolean() and sizes:
        return b.emit(f"{{out}} = {{0}}.repeat({sizes})", [x], lambda t: t.repeat(sizes))
    return b.emit(f"{{out}} = {{0}}.repeat(*{sizes})", [x], lambda t: t.repeat(*sizes))


@gen
def cat_stack(b: Builder) -> int:
    x = b.pick(1, 3) if b.choose.integer(0, 3) else b.pick(0, 3)
    shape = tuple(b.value(x).shape)
    nd = len(shape)
    parts = [x]
    stack = b.choose.boolean() or nd == 0
    dim = b.choose.integer(-nd - 1, nd) if stack else b.choose.integer(-nd, nd - 1)
    for _ in range(b.choose.integer(1, 2)):
        if b.choose.boolean():
            parts.append(b.choose.choice(parts))  # the same tensor twice
        elif stack:
            parts.append(b.pick(shape=shape))
        else:
            other = list(shape)
            other[dim] = b.size()
            parts.append(b.pick(shape=tuple(other)))
    names = ", ".join(f"{{{i}}}" for i in range(len(parts)))
    if stack:
        return b.emit(f"{{out}} = torch.stack([{names}], {dim})", parts, lambda *ts: torch.stack(list(ts), dim))
    fn = b.choose.choice([torch.cat, torch.concat, torch.concatenate])
    return b.emit(f"{{out}} = torch.{fn.__name__}(({names}), dim={dim})", parts, lambda *ts: fn(ts, dim=dim))


@gen
def split_chunk(b: Builder) -> int:
    x = b.pick(1, 3)
    shape = b.value(x).shape
    nd = len(shape)
    dim = b.choose.integer(-nd, nd - 1)
    form = b.choose.integer(0, 3)
    if form == 0:
        size = b.choose.integer(1, shape[dim])
        pieces = -(-shape[dim] // size)
        k = b.choose.integer(0, pieces - 1)
        return b.emit(f"{{out}} = {{0}}.split({size}, {dim})[{k}]", [x], lambda t: t.split(size, dim)[k])
    if form == 1:
        sections = _factor(b, shape[dim], 2) if shape[dim] > 1 else [1]
        k = b.choose.integer(0, len(sections) - 1)
        return b.emit(f"{{out}} = torch.split({{0}}, {sections}, dim={dim})[{k}]", [x],
                      lambda t: torch.split(t, sections, dim=dim)[k])
    if form == 2:
        chunks = b.choose.integer(1, 3)
        k = b.choose.integer(0, len(torch.empty(shape).chunk(chunks, dim)) - 1)
        return b.emit(f"{{out}} = {{0}}.chunk({chunks}, {dim})[{k}]", [x], lambda t: t.chunk(chunks, dim)[k])
    k = b.choose.integer(0, shape[dim] - 1)
    if shape[dim] > 1 and b.choose.boolean():  # two outputs of one call, both used
        return b.emit(f"{{out}} = {{0}}.unbind({dim})[{k}] * {{0}}.unbind({dim})[0]", [x],
                      lambda t: t.unbind(dim)[k] * t.unbind(dim)[0])
    return b.emit(f"{{out}} = torch.unbind({{0}}, {dim})[{k}]", [x], lambda t: torch.unbind(t, dim)[k])


# ---------------------------------------------------------------- indexing


def _index_expr(b: Builder, shape: tuple[int, ...]) -> tuple[str, Callable[[Tensor], Any]]:
    """A random index for a tensor of ``shape``, as text and as a function building it."""
    nd = len(shape)
    form = b.choose.integer(0, 9)
    if form == 0 and nd:
        i = b.choose.integer(-shape[0], shape[0] - 1)
        return f"{i}", lambda t: i
    if form == 1 and nd:
        start = b.choose.integer(0, shape[0] - 1)
        step = b.choose.choice([1, 1, 2])
        return f"{start}::{step}", lambda t: slice(start, None, step)
    if form == 2:
        return "..., None", lambda t: (Ellipsis, None)
    if form == 3 and nd:
        idx = b.index(shape[0], (b.choose.integer(1, 4),))
        return f"torch.tensor({idx})", lambda t: torch.tensor(idx)
    if form == 4 and nd:
        idx = b.index(shape[0], (b.choose.integer(1, 3),))
        return f"{idx}", lambda t: list(idx)
    if form == 5:
        return "{0} > 0", lambda t: t > 0
    if form == 6 and nd >= 2:
        n = min(shape[0], shape[1])
        cols = b.index(shape[1], (n,))
        return f"range({n}), torch.tensor({cols})", lambda t: (range(n), torch.tensor(cols))
    if form == 7 and nd >= 2:
        j = b.choose.integer(-shape[-1], shape[-1] - 1)
        return f"..., {j}", lambda t: (Ellipsis, j)
    if form == 8 and nd >= 2:
        rows = b.index(shape[1], (b.choose.integer(1, 3),))
        return f"1:, torch.tensor({rows})", lambda t: (slice(1, None), torch.tensor(rows))
    if nd:
        idx = b.index(shape[0], (2, 2))
        return f"torch.tensor({idx})", lambda t: torch.tensor(idx)
    return "None", lambda t: None


@gen
def getitem(b: Builder) -> int:
    x = b.pick()
    text, make = _index_expr(b, tuple(b.value(x).shape))
    return b.emit(f"{{out}} = {{0}}[{text}]", [x], lambda t: t[make(t)])


@gen
def setitem(b: Builder) -> int:
    """On a fresh copy: ``y = x.clone(); y[idx] = v`` (or ``+=``), which torch autograd also accepts."""
    x = b.pick()
    shape = tuple(b.value(x).shape)
    text, make = _index_expr(b, shape)
    target_shape = tuple(b.value(x)[make(b.value(x))].shape)
    if "> 0" in text:
        raise Reject("a data-dependent mask on a changing tensor")
    form = b.choose.integer(0, 2)
    if form == 0:
        fill = b.scalar()

        def run(t: Tensor) -> Tensor:
            y = t.clone()
            y[make(y)] = fill
            return y

        return b.emit(f"{{out}} = {{0}}.clone(); {{out}}[{text}] = {fill}", [x], run)
    v = b.pick(shape=b.partner(target_shape)[-len(target_shape):] if target_shape else ())
    try:
        torch.broadcast_shapes(tuple(b.value(v).shape), target_shape)
    except RuntimeError:
        raise Reject("value does not broadcast") from None
    if form == 1 and "torch.tensor" in text and ("[[" in text or text.count(",") > 0):
        form = 1  # duplicate positions with plain assignment: the last write wins in both runs

    def run2(t: Tensor, value: Tensor) -> Tensor:
        y = t * 1.0
        if form == 1:
            y[make(y)] = value
        else:
            y[make(y)] += value
        return y

    op = "=" if form == 1 else "+="
    if form == 2 and ("torch.tensor" in text or "[" in text or "range" in text):
        raise Reject("+= through an advanced index copies: not a write-back")
    return b.emit(f"{{out}} = {{0}} * 1.0; {{out}}[{text}] {op} {{1}}", [x, v], run2)


@gen
def copy_(b: Builder) -> int:
    x = b.pick()
    src = b.pick_broadcast(tuple(b.value(x).shape))
    if tuple(torch.broadcast_shapes(b.value(x).shape, b.value(src).shape)) != tuple(b.value(x).shape):
        raise Reject("src must broadcast to the target")

    def run(t: Tensor, s: Tensor) -> Tensor:
        y = t.clone()
        y.copy_(s)
        return y * t

    return b.emit("{out} = {0}.clone(); {out}.copy_({1}); {out} = {out} * {0}", [x, src], run)


@gen
def index_put(b: Builder) -> int:
    x = b.pick(1, 3)
    shape = tuple(b.value(x).shape)
    accumulate = b.choose.boolean()
    idx = b.index(shape[0], (b.choose.integer(1, 3),), unique=not accumulate)
    values = b.pick(shape=b.partner((len(idx),) + shape[1:])[-len(shape):])
    try:
        torch.broadcast_shapes(tuple(b.value(values).shape), (len(idx),) + shape[1:])
    except RuntimeError:
        raise Reject("values do not broadcast") from None
    if b.choose.boolean():
        return b.emit(f"{{out}} = {{0}}.index_put((torch.tensor({idx}),), {{1}}, accumulate={accumulate})",
                      [x, values], lambda t, v: t.index_put((torch.tensor(idx),), v, accumulate=accumulate))

    def run(t: Tensor, v: Tensor) -> Tensor:
        y = t.clone()
        y.index_put_((torch.tensor(idx),), v, accumulate=accumulate)
        return y

    return b.emit(f"{{out}} = {{0}}.clone(); {{out}}.index_put_((torch.tensor({idx}),), {{1}}, "
                  f"accumulate={accumulate})", [x, values], run)


@gen
def index_add(b: Builder) -> int:
    x = b.pick(1, 3)
    shape = list(b.value(x).shape)
    dim = b.choose.integer(0, len(shape) - 1)
    idx = b.index(shape[dim], (b.choose.integer(1, 4),))
    src_shape = list(shape)
    src_shape[dim] = len(idx)
    src = b.pick(shape=tuple(src_shape))
    alpha = b.choose.choice([1, 2.0, -0.5])
    return b.emit(f"{{out}} = {{0}}.index_add({dim}, torch.tensor({idx}), {{1}}, alpha={alpha})", [x, src],
                  lambda t, s: t.index_add(dim, torch.tensor(idx), s, alpha=alpha))


def _scatter_index(b: Builder, shape: tuple[int, ...], dim: int, unique: bool) -> list:
    index_shape = tuple(b.choose.integer(1, s) if d != dim else b.choose.integer(1, s if unique else 4)
                        for d, s in enumerate(shape))
    if not unique:
        return b.index(shape[dim], index_shape)
    # along dim, distinct positions for every other coordinate: each element is written once
    moved = list(index_shape)
    moved.pop(dim)
    rows = []
    for _ in range(math.prod(moved)):
        rows.append(torch.randperm(shape[dim], generator=b.generator())[:index_shape[dim]])
    stacked = torch.stack(rows, -1).reshape((index_shape[dim],) + tuple(moved))
    return stacked.movedim(0, dim).tolist()


@gen
def scatter_gather(b: Builder) -> int:
    x = b.pick(1, 3)
    shape = tuple(b.value(x).shape)
    nd = len(shape)
    dim = b.choose.integer(0, nd - 1)
    form = b.choose.integer(0, 4)
    if form == 0:
        idx = b.index(shape[dim], (b.choose.integer(1, 4),))
        return b.emit(f"{{out}} = {{0}}.index_select({dim}, torch.tensor({idx}))", [x],
                      lambda t: t.index_select(dim, torch.tensor(idx)))
    if form == 1:
        index_shape = tuple(b.choose.integer(1, s) if d != dim else b.choose.integer(1, 4) for d, s in enumerate(shape))
        idx = b.index(shape[dim], index_shape)
        return b.emit(f"{{out}} = {{0}}.gather({dim}, torch.tensor({idx}))", [x],
                      lambda t: t.gather(dim, torch.tensor(idx)))
    idx = _scatter_index(b, shape, dim, unique=form != 2)
    src_shape = tuple(torch.tensor(idx).shape)
    if form == 2:
        src = b.pick(shape=src_shape)
        return b.emit(f"{{out}} = {{0}}.scatter_add({dim}, torch.tensor({idx}), {{1}})", [x, src],
                      lambda t, s: t.scatter_add(dim, torch.tensor(idx), s))
    if form == 3:
        src = b.pick(shape=src_shape)
        return b.emit(f"{{out}} = {{0}}.scatter({dim}, torch.tensor({idx}), {{1}})", [x, src],
                      lambda t, s: t.scatter(dim, torch.tensor(idx), s))
    fill = b.scalar()
    return b.emit(f"{{out}} = torch.scatter({{0}}, {dim}, torch.tensor({idx}), value={fill})", [x],
                  lambda t: torch.scatter(t, dim, torch.tensor(idx), value=fill))


@gen
def slicing(b: Builder) -> int:
    x = b.pick(1, 3)
    shape = tuple(b.value(x).shape)
    nd = len(shape)
    dim = b.choose.integer(-nd, nd - 1)
    form = b.choose.integer(0, 4)
    if form == 0:
        start = b.choose.integer(0, shape[dim] - 1)
        length = b.choose.integer(1, shape[dim] - start)
        return b.emit(f"{{out}} = {{0}}.narrow({dim}, {start}, {length})", [x], lambda t: t.narrow(dim, start, length))
    if form == 1:
        i = b.choose.integer(-shape[dim], shape[dim] - 1)
        return b.emit(f"{{out}} = torch.select({{0}}, {dim}, {i})", [x], lambda t: torch.select(t, dim, i))
    if form == 2 and nd >= 2:
        offset = b.choose.integer(-1, 1)
        d1, d2 = b.choose.choice([(0, 1), (1, 0), (-2, -1), (0, nd - 1)])
        return b.emit(f"{{out}} = {{0}}.diagonal({offset}, {d1}, {d2})", [x], lambda t: t.diagonal(offset, d1, d2))
    if form == 3:
        m = b.pick_broadcast(shape)
        if tuple(torch.broadcast_shapes(shape, b.value(m).shape)) != shape:
            raise Reject("mask must broadcast to x")
        return b.emit("{out} = {0}.masked_select({1} > 0)", [x, m], lambda t, k: t.masked_select(k > 0))
    if nd >= 2:
        k = b.choose.integer(-1, 1)
        name = b.choose.choice(["tril", "triu"])
        return b.emit(f"{{out}} = torch.{name}({{0}}, {k})", [x], lambda t: getattr(torch, name)(t, k))
    return b.emit("{out} = {0}.narrow(0, 0, 1)", [x], lambda t: t.narrow(0, 0, 1))


@gen
def flip_roll_pad(b: Builder) -> int:
    x = b.pick(1, 3)
    shape = tuple(b.value(x).shape)
    nd = len(shape)
    form = b.choose.integer(0, 3)
    if form == 0:
        dims = tuple(sorted({b.choose.integer(0, nd - 1) for _ in range(b.choose.integer(1, nd))}))
        return b.emit(f"{{out}} = {{0}}.flip({dims})", [x], lambda t: t.flip(dims))
    if form == 1:
        shift = b.choose.integer(-3, 3)
        if b.choose.boolean():
            return b.emit(f"{{out}} = {{0}}.roll({shift})", [x], lambda t: t.roll(shift))
        dim = b.choose.integer(-nd, nd - 1)
        return b.emit(f"{{out}} = torch.roll({{0}}, {shift}, {dim})", [x], lambda t: torch.roll(t, shift, dim))
    if form == 2 and nd >= 2:
        shifts, dims = (1, -2), (0, 1)
        return b.emit("{out} = {0}.roll((1, -2), (0, 1))", [x], lambda t: t.roll(shifts, dims))
    pads: list[int] = []
    for d in range(b.choose.integer(1, nd)):
        size = shape[nd - 1 - d]
        pads += [b.choose.integer(-(size - 1) // 2, 2), b.choose.integer(-(size - 1) // 2, 2)]
    value = b.scalar((0.0, 1.0, -0.5))
    return b.emit(f"{{out}} = F.pad({{0}}, {tuple(pads)}, value={value})", [x],
                  lambda t: F.pad(t, tuple(pads), value=value))


# ---------------------------------------------------------------- neural-network ops


@gen
def softmax(b: Builder) -> int:
    x = b.pick()
    nd = b.value(x).dim()
    dim = b.choose.integer(-nd, nd - 1) if nd else 0
    form = b.choose.integer(0, 4)
    if form == 0:
        return b.emit(f"{{out}} = F.softmax({{0}}, dim={dim})", [x], lambda t: F.softmax(t, dim=dim))
    if form == 1:
        return b.emit(f"{{out}} = {{0}}.log_softmax({dim})", [x], lambda t: t.log_softmax(dim))
    if form == 2:
        return b.emit(f"{{out}} = torch.softmax({{0}}, {dim})", [x], lambda t: torch.softmax(t, dim))
    if form == 3:
        return b.emit(f"{{out}} = torch.special.log_softmax({{0}}, {dim})", [x],
                      lambda t: torch.special.log_softmax(t, dim))
    return b.emit(f"{{out}} = F.log_softmax({{0}}, {dim})", [x], lambda t: F.log_softmax(t, dim))


def _class_target(b: Builder, shape: tuple[int, ...]) -> tuple[list, tuple[int, ...], int]:
    class_dim = 1 if len(shape) >= 2 else 0
    target_shape = shape[:class_dim] + shape[class_dim + 1:]
    return b.index(shape[class_dim], target_shape) if target_shape else b.index(shape[0], ()), target_shape, class_dim


@gen
def classification_loss(b: Builder) -> int:
    x = b.pick(1, 3)
    shape = tuple(b.value(x).shape)
    target, _, class_dim = _class_target(b, shape)
    n_classes = shape[class_dim]
    reduction = b.choose.choice(["mean", "sum", "none"])
    weight = [0.5 + 0.25 * i for i in range(n_classes)] if b.choose.boolean() else None
    ignore = b.choose.choice([-100, 0])
    form = b.choose.integer(0, 2)
    args = f"reduction={reduction!r}, weight={weight}, ignore_index={ignore}"

    def w() -> Tensor | None:
        return torch.tensor(weight, dtype=D) if weight is not None else None

    if form == 0:
        return b.emit(f"{{out}} = F.nll_loss(F.log_softmax({{0}}, {class_dim}), torch.tensor({target}), {args})", [x],
                      lambda t: F.nll_loss(F.log_softmax(t, class_dim), torch.tensor(target), weight=w(),
                                           ignore_index=ignore, reduction=reduction))
    smoothing = b.choose.choice([0.0, 0.1])
    if form == 1:
        return b.emit(f"{{out}} = F.cross_entropy({{0}}, torch.tensor({target}), {args}, label_smoothing={smoothing})",
                      [x], lambda t: F.cross_entropy(t, torch.tensor(target), weight=w(), ignore_index=ignore,
                                                     reduction=reduction, label_smoothing=smoothing))
    probs = b.pick(shape=shape)  # class probabilities: a differentiable target
    return b.emit(f"{{out}} = F.cross_entropy({{0}}, {{1}}.softmax({class_dim}), reduction={reduction!r}, "
                  f"weight={weight}, label_smoothing={smoothing})", [x, probs],
                  lambda t, p: F.cross_entropy(t, p.softmax(class_dim), weight=w(), reduction=reduction,
                                               label_smoothing=smoothing))


def _loss_operands(b: Builder) -> tuple[int, int, tuple[int, ...], str]:
    """An elementwise loss's input, a target of its shape (both differentiable), the shape and a reduction."""
    x = b.pick()
    shape = tuple(b.value(x).shape)
    return x, b.pick(shape=shape), shape, b.choose.choice(["mean", "sum", "none"])


@gen
def regression_loss(b: Builder) -> int:
    x, y, shape, reduction = _loss_operands(b)
    form = b.choose.integer(0, 3)
    if form == 0:
        return b.emit(f"{{out}} = F.mse_loss({{0}}, {{1}}, reduction={reduction!r})", [x, y],
                      lambda p, q: F.mse_loss(p, q, reduction=reduction))
    if form == 1:
        return b.emit(f"{{out}} = F.l1_loss({{0}}, {{1}}, reduction={reduction!r})", [x, y],
                      lambda p, q: F.l1_loss(p, q, reduction=reduction))
    weighted = b.choose.boolean()
    pos = b.choose.boolean()
    if form == 2:
        def bce_logits(p: Tensor, q: Tensor) -> Tensor:
            weight = torch.full(shape, 0.7, dtype=p.dtype) if weighted else None
            pos_weight = torch.full(shape[-1:], 1.5, dtype=p.dtype) if pos else None
            return F.binary_cross_entropy_with_logits(p, q.sigmoid(), weight=weight, pos_weight=pos_weight,
                                                      reduction=reduction)

        return b.emit(f"{{out}} = F.binary_cross_entropy_with_logits({{0}}, {{1}}.sigmoid(), reduction={reduction!r}, "
                      f"weight={'0.7' if weighted else None}, pos_weight={'1.5' if pos else None})", [x, y], bce_logits)

    def bce(p: Tensor, q: Tensor) -> Tensor:
        weight = torch.full(shape, 0.7, dtype=p.dtype) if weighted else None
        return F.binary_cross_entropy(p.sigmoid(), q.sigmoid(), weight=weight, reduction=reduction)

    return b.emit(f"{{out}} = F.binary_cross_entropy({{0}}.sigmoid(), {{1}}.sigmoid(), reduction={reduction!r}, "
                  f"weight={'0.7' if weighted else None})", [x, y], bce)


@gen
def robust_loss(b: Builder) -> int:
    """F.smooth_l1_loss, F.huber_loss, F.kl_div at each reduction."""
    x, y, _, reduction = _loss_operands(b)
    form = b.choose.integer(0, 2)
    if form == 0:
        beta = b.choose.choice([1.0, 0.5, 0.0])
        return b.emit(f"{{out}} = F.smooth_l1_loss({{0}}, {{1}}, reduction={reduction!r}, beta={beta})", [x, y],
                      lambda p, q: F.smooth_l1_loss(p, q, reduction=reduction, beta=beta))
    if form == 1:
        delta = b.choose.choice([1.0, 0.3])
        return b.emit(f"{{out}} = F.huber_loss({{0}}, {{1}}.to({{0}}.dtype), reduction={reduction!r}, delta={delta})",
                      [x, y],
                      # (torch's own backward fails on mixed dtypes: tests/test_dtypes.py checks the engine there)
                      lambda p, q: F.huber_loss(p, q.to(p.dtype), reduction=reduction, delta=delta))
    reduction = b.choose.choice([reduction, "batchmean"])
    if b.choose.boolean():
        return b.emit(f"{{out}} = F.kl_div({{0}}, {{1}}, reduction={reduction!r}, log_target=True)", [x, y],
                      lambda p, q: F.kl_div(p, q, reduction=reduction, log_target=True))
    return b.emit(f"{{out}} = F.kl_div({{0}}, {{1}}.sigmoid(), reduction={reduction!r})", [x, y],
                  lambda p, q: F.kl_div(p, q.sigmoid(), reduction=reduction))


@gen
def embedding(b: Builder) -> int:
    w = b.pick(2, 2)
    rows = b.value(w).shape[0]
    idx = b.index(rows, b.shape(1, 2))
    padding = b.choose.choice([None, 0])
    by_freq = b.choose.boolean()
    return b.emit(f"{{out}} = F.embedding(torch.tensor({idx}), {{0}}, padding_idx={padding}, "
                  f"scale_grad_by_freq={by_freq})", [w],
                  lambda t: F.embedding(torch.tensor(idx), t, padding_idx=padding, scale_grad_by_freq=by_freq))


@gen
def layer_norm(b: Builder) -> int:
    x = b.pick(1, 3)
    shape = tuple(b.value(x).shape)
    k = b.choose.integer(1, len(shape))
    normalized = shape[-k:]
    if math.prod(normalized) < 2 and b.choose.boolean():
        raise Reject("normalising a single element")
    form = b.choose.integer(0, 2)
    if form == 0:
        return b.emit(f"{{out}} = F.layer_norm({{0}}, {normalized})", [x], lambda t: F.layer_norm(t, normalized))
    w = b.pick(shape=normalized)
    if form == 1:
        return b.emit(f"{{out}} = F.layer_norm({{0}}, {normalized}, {{1}})", [x, w],
                      lambda t, g: F.layer_norm(t, normalized, g))
    bias = b.pick(shape=normalized)
    return b.emit(f"{{out}} = F.layer_norm({{0}}, {normalized}, {{1}}, {{2}}, eps=1e-3)", [x, w, bias],
                  lambda t, g, c: F.layer_norm(t, normalized, g, c, eps=1e-3))


@gen
def other_norms(b: Builder) -> int:
    """F.rms_norm (last dims), F.group_norm and F.instance_norm ((N, C, ...) inputs)."""
    x = b.pick(1, 3)
    shape = tuple(b.value(x).shape)
    form = b.choose.integer(0, 2)
    if form == 0 or len(shape) < 2:
        normalized = shape[-b.choose.integer(1, len(shape)):]
        if b.choose.boolean():
            return b.emit(f"{{out}} = F.rms_norm({{0}}, {normalized})", [x], lambda t: F.rms_norm(t, normalized))
        w = b.pick(shape=normalized)
        return b.emit(f"{{out}} = F.rms_norm({{0}}, {normalized}, {{1}}, eps=1e-3)", [x, w],
                      lambda t, g: F.rms_norm(t, normalized, g, eps=1e-3))
    channels = shape[1]
    affine = [b.pick(shape=(channels,)), b.pick(shape=(channels,))] if b.choose.boolean() else []
    extra = ", {1}, {2}" if affine else ""
    if form == 1:
        groups = b.choose.choice([d for d in range(1, channels + 1) if channels % d == 0])
        return b.emit(f"{{out}} = F.group_norm({{0}}, {groups}{extra}, eps=1e-3)", [x] + affine,
                      lambda t, *wb: F.group_norm(t, groups, *wb, eps=1e-3))
    if len(shape) < 3:
        raise Reject("instance_norm needs spatial dimensions")
    use_input_stats = b.choose.boolean()

    def run(t: Tensor, *wb: Tensor) -> Tensor:
        mean, var = torch.zeros(channels, dtype=t.dtype) + 0.1, torch.ones(channels, dtype=t.dtype) * 1.5
        stats = (None, None) if use_input_stats else (mean, var)
        return F.instance_norm(t, *stats, *(wb or (None, None)), use_input_stats=use_input_stats)

    return b.emit(f"{{out}} = F.instance_norm({{0}}, <stats: {use_input_stats}>{extra})", [x] + affine, run)


@gen
def batch_norm(b: Builder) -> int:
    x = b.pick(2, 3, min_size=2)
    channels = b.value(x).shape[1]
    form = b.choose.integer(0, 2)
    affine = b.choose.boolean()
    inputs = [x]
    if affine:
        inputs += [b.pick(shape=(channels,)), b.pick(shape=(channels,))]

    def run(t: Tensor, *wb: Tensor) -> Tensor:
        # NOTE: torch 2.13's batch_norm backward is wrong when weight or bias is a view of the input (its
        # other columns' gradients change) or an expanded tensor (stride 0: it reads uninitialised memory);
        # the engine is right there (test_finite_differences checks both against central differences), so
        # the fuzzer, whose truth is torch, passes such tensors as copies
        same_memory = t.untyped_storage().data_ptr()
        weight, bias = (w.clone() if w.untyped_storage().data_ptr() == same_memory or 0 in w.stride() else w
                        for w in wb) if wb else (None, None)
        if form == 0:
            return F.batch_norm(t, None, None, weight, bias, training=True)
        mean = torch.zeros(channels, dtype=t.dtype) + 0.1
        var = torch.ones(channels, dtype=t.dtype) * 1.5
        return F.batch_norm(t, mean, var, weight, bias, training=form == 1, momentum=0.2)

    extra = ", {1}, {2}" if affine else ""
    return b.emit(f"{{out}} = F.batch_norm({{0}}, <running stats: {form}>{extra})", inputs, run)


@gen
def convolution(b: Builder) -> int:
    x = b.pick()
    n = b.value(x).numel()
    two_d = b.choose.boolean()
    groups = b.choose.choice([1, 1, 2])
    cin = groups * b.choose.integer(1, 2)
    if n % cin:
        raise Reject("channels do not divide the tensor")
    k = b.choose.integer(1, 3)
    cout = groups * b.choose.integer(1, 2)
    stride, padding, dilation = b.choose.integer(1, 2), b.choose.integer(0, 1), b.choose.integer(1, 2)
    use_bias = b.choose.boolean()
    if two_d:
        h = b.choose.choice([d for d in range(1, n // cin + 1) if (n // cin) % d == 0])
        shape = (1, cin, h, n // cin // h)
        weight = b.pick(shape=(cout, cin // groups, k, k))
    else:
        shape = (1, cin, n // cin)
        weight = b.pick(shape=(cout, cin // groups, k))
    inputs = [x, weight] + ([b.pick(shape=(cout,))] if use_bias else [])
    conv = F.conv2d if two_d else F.conv1d

    def run(t: Tensor, w: Tensor, *bias: Tensor) -> Tensor:
        return conv(t.reshape(shape), w, bias[0] if bias else None, stride=stride, padding=padding,
                    dilation=dilation, groups=groups)

    return b.emit(f"{{out}} = F.{conv.__name__}({{0}}.reshape({shape}), {{1}}, {'{2}' if use_bias else None}, "
                  f"stride={stride}, padding={padding}, dilation={dilation}, groups={groups})", inputs, run)


@gen
def transposed_convolution(b: Builder) -> int:
    """F.conv_transpose1d/2d/3d (strides, output padding, groups, dilation) and F.conv3d."""
    x = b.pick()
    n = b.value(x).numel()
    conv = b.choose.choice([F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.conv3d])
    spatial, transposed = int(conv.__name__[-2]), conv is not F.conv3d
    groups = b.choose.choice([1, 1, 2])
    cin, cout = groups * b.choose.integer(1, 2), groups * b.choose.integer(1, 2)
    if n % cin:
        raise Reject("channels do not divide the tensor")
    length = n // cin
    h = b.choose.choice([d for d in range(1, length + 1) if length % d == 0])
    shape = (1, cin) + ((length,), (h, length // h), (1, h, length // h))[spatial - 1]
    k = b.choose.integer(1, 2)
    stride, padding, dilation = b.choose.integer(1, 2), b.choose.integer(0, 1), b.choose.integer(1, 2)
    kernel = (k,) * spatial
    options = {"stride": stride, "padding": padding, "groups": groups, "dilation": dilation}
    if transposed:
        options["output_padding"] = b.choose.integer(0, max(stride, dilation) - 1)
        weight = b.pick(shape=(cin, cout // groups) + kernel)
    else:
        weight = b.pick(shape=(cout, cin // groups) + kernel)
    inputs = [x, weight] + ([b.pick(shape=(cout,))] if b.choose.boolean() else [])

    def run(t: Tensor, w: Tensor, *bias: Tensor) -> Tensor:
        return conv(t.reshape(shape), w, bias[0] if bias else None, **options)

    keywords = ", ".join(f"{key}={value}" for key, value in options.items())
    return b.emit(f"{{out}} = F.{conv.__name__}({{0}}.reshape({shape}), {{1}}, {'{2}' if len(inputs) == 3 else None}, "
                  f"{keywords})", inputs, run)


@gen
def interpolate(b: Builder) -> int:
    """F.interpolate in each mode, by size or scale factor (fractional: the forward's scales matter)."""
    x = b.pick()
    n = b.value(x).numel()
    spatial = b.choose.integer(1, 3)
    h = b.choose.choice([d for d in range(1, n + 1) if n % d == 0])
    shape = (1, 1) + ((n,), (h, n // h), (1, h, n // h))[spatial - 1]
    mode = b.choose.choice(["nearest", "nearest-exact", ("linear", "bilinear", "trilinear")[spatial - 1]]
                           + (["bicubic"] if spatial == 2 else []))
    corners = b.choose.choice([None, True]) if mode not in ("nearest", "nearest-exact") else None
    if b.choose.boolean():
        how = {"scale_factor": b.choose.choice([2, 1.5, 0.7, 2.5])}
    else:
        how = {"size": tuple(b.choose.integer(1, 5) for _ in range(spatial))}
    how.update(mode=mode, align_corners=corners)
    keywords = ", ".join(f"{key}={value!r}" for key, value in how.items())
    return b.emit(f"{{out}} = F.interpolate({{0}}.reshape({shape}), {keywords})", [x],
                  lambda t: F.interpolate(t.reshape(shape), **how))


@gen
def pooling(b: Builder) -> int:
    x = b.pick(2, 3, min_size=2)
    v = b.value(x)
    shape = tuple(v.shape) if v.dim() == 3 else (1,) + tuple(v.shape)
    k = b.choose.integer(1, min(shape[-2:]))
    stride = b.choose.choice([None, 1, 2])
    padding = b.choose.integer(0, k // 2)
    form = b.choose.integer(0, 3)
    if form == 0:
        ceil = b.choose.boolean()
        return b.emit(f"{{out}} = F.max_pool2d({{0}}.reshape({shape}), {k}, {stride}, {padding}, ceil_mode={ceil})",
                      [x], lambda t: F.max_pool2d(t.reshape(shape), k, stride, padding, ceil_mode=ceil))
    if form == 1:
        return b.emit(f"{{out}} = torch.max_pool2d({{0}}.reshape({shape}), {k})", [x],
                      lambda t: torch.max_pool2d(t.reshape(shape), k))
    if form == 2:
        include = b.choose.boolean()
        return b.emit(f"{{out}} = F.avg_pool2d({{0}}.reshape({shape}), {k}, {stride}, {padding}, "
                      f"count_include_pad={include})", [x],
                      lambda t: F.avg_pool2d(t.reshape(shape), k, stride, padding, count_include_pad=include))
    size = (b.choose.integer(1, shape[-2]), b.choose.integer(1, shape[-1]))
    return b.emit(f"{{out}} = F.adaptive_avg_pool2d({{0}}.reshape({shape}), {size})", [x],
                  lambda t: F.adaptive_avg_pool2d(t.reshape(shape), size))


# ---------------------------------------------------------------- scans, linear algebra, distances, shapes, pooling,
# losses: the ops of fixed-shape operands, drawn from one table each (inputs of exactly these shapes)

@gen
def scans(b: Builder) -> int:
    """cumprod (zeros from tied leaves), cummax/cummin (ties), logcumsumexp, nansum/nanmean, diff, trace, diag."""
    x = b.pick()
    nd = b.value(x).dim()
    dim = b.choose.integer(-nd, nd - 1) if nd else 0
    form = b.choose.integer(0, 8)
    if form == 0:
        return b.emit(f"{{out}} = {{0}}.cumprod({dim})", [x], lambda t: t.cumprod(dim))
    if form == 1:
        return b.emit(f"{{out}} = {{0}}.cummax({dim}).values + torch.cummin({{0}}, {dim})[0]", [x],
                      lambda t: t.cummax(dim).values + torch.cummin(t, dim)[0])
    if form == 2:
        return b.emit(f"{{out}} = {{0}}.logcumsumexp({dim})", [x], lambda t: t.logcumsumexp(dim))
    if form == 3:
        name, keepdim = b.choose.choice(["nansum", "nanmean"]), b.choose.boolean()
        dims = _dims(b, nd)
        return b.emit(f"{{out}} = torch.{name}({{0}}, {dims}, keepdim={keepdim})", [x],
                      lambda t: getattr(torch, name)(t, dims, keepdim=keepdim))
    if form == 4 and nd:
        n = b.choose.integer(1, 2)
        return b.emit(f"{{out}} = torch.diff({{0}}, {n}, {dim}, prepend={{0}}.narrow({dim}, 0, 1))", [x],
                      lambda t: torch.diff(t, n, dim, prepend=t.narrow(dim, 0, 1)))
    m = b.pick(2, 2)
    if form == 5:
        return b.emit("{out} = {0}.trace()", [m], lambda t: t.trace())
    offset = b.choose.integer(-1, 1)
    if form == 6:
        return b.emit(f"{{out}} = torch.diag({{0}}, {offset})", [m], lambda t: torch.diag(t, offset))
    v = b.pick(1, 2)
    if form == 7:
        return b.emit(f"{{out}} = torch.diag_embed({{0}}, {offset})", [v], lambda t: torch.diag_embed(t, offset))
    return b.emit(f"{{out}} = torch.diagflat({{0}}, {offset})", [v], lambda t: torch.diagflat(t, offset))


def _well_conditioned(t: Tensor) -> Tensor:
    """Diagonally dominant with a positive diagonal: invertible, positive determinant."""
    return 4 * torch.eye(t.shape[-1], dtype=t.dtype) + t.tanh()


M = "(4 * torch.eye({n}) + {i}.tanh())"  # how _well_conditioned prints


def _spd(t: Tensor) -> Tensor:
    """Symmetric positive definite, and well conditioned."""
    return _well_conditioned(t) @ _well_conditioned(t).mT


_SPD = f"{M.format(n=3, i='{0}')} @ {M.format(n=3, i='{0}')}.mT"  # how _spd prints

# (code, function, input shapes): operands of exactly these shapes, live tensors or new leaves
FIXED: dict[str, list[tuple[str, Callable[..., Tensor], list[tuple[int, ...]]]]] = {
    "linear_algebra": [
        (f"torch.linalg.det({M.format(n=3, i='{0}')})", lambda a: torch.linalg.det(_well_conditioned(a)), [(3, 3)]),
        (f"torch.det({M.format(n=2, i='{0}')})", lambda a: torch.det(_well_conditioned(a)), [(2, 2, 2)]),
        (f"torch.linalg.slogdet({M.format(n=3, i='{0}')}).logabsdet",
         lambda a: torch.linalg.slogdet(_well_conditioned(a)).logabsdet, [(3, 3)]),
        (f"torch.logdet({M.format(n=2, i='{0}')})", lambda a: torch.logdet(_well_conditioned(a)), [(3, 2, 2)]),
        (f"torch.linalg.inv({M.format(n=3, i='{0}')})", lambda a: torch.linalg.inv(_well_conditioned(a)), [(3, 3)]),
        (f"{M.format(n=2, i='{0}')}.inverse()", lambda a: _well_conditioned(a).inverse(), [(2, 2, 2)]),
        (f"torch.linalg.solve({M.format(n=3, i='{0}')}, {{1}})", lambda a, c: torch.linalg.solve(
            _well_conditioned(a), c), [(3, 3), (3, 2)]),
        (f"torch.linalg.solve({M.format(n=3, i='{0}')}, {{1}})", lambda a, c: torch.linalg.solve(
            _well_conditioned(a), c), [(2, 3, 3), (3,)]),
        (f"torch.linalg.solve({M.format(n=3, i='{0}')}, {{1}}, left=False)", lambda a, c: torch.linalg.solve(
            _well_conditioned(a), c, left=False), [(3, 3), (2, 3)]),
        ("torch.addmv({0}, {1}, {2}, beta=0.5)", lambda i, m, v: torch.addmv(i, m, v, beta=0.5), [(4,), (4, 3), (3,)]),
        ("{0}.addr({1}, {2}, alpha=2)", lambda i, u, v: i.addr(u, v, alpha=2), [(4, 3), (4,), (3,)]),
        ("torch.tensordot({0}, {1}, dims=([2, 0], [0, 1]))", lambda a, c: torch.tensordot(a, c, dims=([2, 0], [0, 1])),
         [(3, 2, 4), (4, 3, 2)]),
        ("torch.tensordot({0}, {1}, 1)", lambda a, c: torch.tensordot(a, c, 1), [(2, 3), (3, 4)]),
        ("torch.linalg.cross({0}, {1})", torch.linalg.cross, [(4, 3), (1, 3)]),
        ("torch.cross({0}, {1}, dim=0)", lambda a, c: torch.cross(a, c, dim=0), [(3, 2), (3, 2)]),
        ("F.bilinear({0}, {1}, {2}, {3})", F.bilinear, [(4, 3), (4, 2), (2, 3, 2), (2,)]),
        (f"torch.linalg.cholesky({M.format(n=3, i='{0}')} @ {M.format(n=3, i='{0}')}.mT)",
         lambda a: torch.linalg.cholesky(_well_conditioned(a) @ _well_conditioned(a).mT), [(2, 3, 3)]),
        # values-only ops in float64: with a float32 input that requires grad torch computes them with the vectors,
        # another LAPACK path whose rounding differs from the engine's forward run
        ("torch.linalg.eigvalsh(({0} + {0}.mT).double())", lambda a: torch.linalg.eigvalsh((a + a.mT).double()),
         [(3, 3)]),
        ("torch.linalg.svdvals({0}.double())", lambda a: torch.linalg.svdvals(a.double()), [(4, 3)]),
        ("torch.linalg.matrix_norm({0}.double(), 'nuc')", lambda a: torch.linalg.matrix_norm(a.double(), "nuc"),
         [(2, 3, 4)]),
        (f"torch.linalg.qr({M.format(n=3, i='{0}')}).R", lambda a: torch.linalg.qr(_well_conditioned(a)).R, [(3, 3)]),
        (f"torch.linalg.pinv({M.format(n=3, i='{0}')})", lambda a: torch.linalg.pinv(_well_conditioned(a)), [(3, 3)]),
        ("torch.linalg.matrix_exp({0}.tanh())", lambda a: torch.linalg.matrix_exp(a.tanh()), [(2, 3, 3)]),
        (f"torch.linalg.solve_triangular({M.format(n=3, i='{0}')}, {{1}}, upper=True)",
         lambda a, c: torch.linalg.solve_triangular(_well_conditioned(a), c, upper=True), [(3, 3), (3, 2)]),
        (f"torch.linalg.cholesky_ex({_SPD}).L", lambda a: torch.linalg.cholesky_ex(_spd(a)).L, [(3, 3)]),
        (f"torch.cholesky_solve({{1}}, torch.linalg.cholesky({_SPD}))",
         lambda a, c: torch.cholesky_solve(c, torch.linalg.cholesky(_spd(a))), [(3, 3), (3, 2)]),
        (f"torch.cholesky_inverse(torch.linalg.cholesky({_SPD}))",
         lambda a: torch.cholesky_inverse(torch.linalg.cholesky(_spd(a))), [(2, 3, 3)]),
        # values only: the vectors' gradients divide by the gaps between values, which random inputs may close
        ("torch.linalg.eigh({0} + {0}.mT).eigenvalues", lambda a: torch.linalg.eigh(a + a.mT).eigenvalues, [(3, 3)]),
        ("torch.linalg.svd({0}).S", lambda a: torch.linalg.svd(a).S, [(2, 4, 3)]),
        ("torch.svd({0}).S", lambda a: torch.svd(a).S, [(3, 4)]),
        (f"torch.linalg.cond({M.format(n=3, i='{0}')}.double())",
         lambda a: torch.linalg.cond(_well_conditioned(a).double()), [(3, 3)]),
        (f"torch.linalg.lstsq({M.format(n=3, i='{0}')}, {{1}}, driver='gels').solution",
         lambda a, c: torch.linalg.lstsq(_well_conditioned(a), c, driver="gels").solution, [(3, 3), (3, 2)]),
        (f"torch.linalg.lu({M.format(n=3, i='{0}')}).U", lambda a: torch.linalg.lu(_well_conditioned(a)).U, [(3, 3)]),
        (f"torch.linalg.lu_factor({M.format(n=3, i='{0}')}).LU",
         lambda a: torch.linalg.lu_factor(_well_conditioned(a)).LU, [(2, 3, 3)]),
        (f"torch.linalg.lu_solve(*torch.linalg.lu_factor({M.format(n=3, i='{0}')}), {{1}})",
         lambda a, c: torch.linalg.lu_solve(*torch.linalg.lu_factor(_well_conditioned(a)), c), [(3, 3), (3, 2)]),
        (f"{M.format(n=3, i='{0}')}.pinverse()", lambda a: _well_conditioned(a).pinverse(), [(3, 3)]),
        ("torch.linalg.vecdot({0}, {1})", torch.linalg.vecdot, [(2, 3), (3,)]),
        ("torch.linalg.multi_dot([{0}, {1}, {2}])", lambda a, c, d: torch.linalg.multi_dot([a, c, d]),
         [(3,), (3, 2), (2, 2)]),
        ("torch.chain_matmul({0}, {1})", torch.chain_matmul, [(2, 3), (3, 2)]),
        (f"torch.linalg.matrix_power({M.format(n=3, i='{0}')}, -2)",
         lambda a: torch.linalg.matrix_power(_well_conditioned(a), -2), [(3, 3)]),
        ("{0}.matrix_power(3)", lambda a: a.matrix_power(3), [(2, 2, 2)]),
        (f"torch.linalg.inv_ex({M.format(n=3, i='{0}')}).inverse",
         lambda a: torch.linalg.inv_ex(_well_conditioned(a)).inverse, [(3, 3)]),
        (f"torch.linalg.solve_ex({M.format(n=3, i='{0}')}, {{1}}).result",
         lambda a, c: torch.linalg.solve_ex(_well_conditioned(a), c).result, [(3, 3), (3, 2)]),
        ("torch.linalg.diagonal({0}, offset=-1)", lambda a: torch.linalg.diagonal(a, offset=-1), [(2, 3, 3)]),
        ("torch.nuclear_norm({0}.double()) + torch.frobenius_norm({0}, (0, 1))",
         lambda a: torch.nuclear_norm(a.double()) + torch.frobenius_norm(a, (0, 1)), [(3, 2)]),
        ("{0}.renorm(2, 0, 1.0)", lambda a: a.renorm(2, 0, 1.0), [(3, 2)]),
        ("torch.linalg.householder_product({0}, {1})", torch.linalg.householder_product, [(4, 3), (2,)]),
        ("torch.ormqr({0}, {1}, {2}, left=False)", lambda a, t, c: torch.ormqr(a, t, c, left=False),
         [(3, 2), (2,), (2, 3)]),
        ("torch.linalg.lu({0}).L", lambda a: torch.linalg.lu(a).L, [(4, 3)]),
        ("torch.linalg.lu_factor({0}).LU", lambda a: torch.linalg.lu_factor(a).LU, [(2, 3, 4)]),
        ("torch.lu_unpack(*torch.linalg.lu_factor({0})).U", lambda a: torch.lu_unpack(*torch.linalg.lu_factor(a)).U,
         [(2, 3)]),
        (f"torch.lu({M.format(n=3, i='{0}')})[0]", lambda a: torch.lu(_well_conditioned(a))[0], [(3, 3)]),
        (f"torch.lu_solve({{1}}, *torch.lu({M.format(n=3, i='{0}')}))",
         lambda a, c: torch.lu_solve(c, *torch.lu(_well_conditioned(a))), [(3, 3), (3, 2)]),
        (f"torch.linalg.tensorinv({M.format(n=4, i='{0}')}.reshape(4, 2, 2), ind=1)",
         lambda a: torch.linalg.tensorinv(_well_conditioned(a).reshape(4, 2, 2), ind=1), [(4, 4)]),
        (f"torch.linalg.tensorsolve({M.format(n=4, i='{0}')}.reshape(2, 2, 4), {{1}})",
         lambda a, c: torch.linalg.tensorsolve(_well_conditioned(a).reshape(2, 2, 4), c), [(4, 4), (2, 2)]),
        (f"{M.format(n=3, i='{0}')}.qr(some=False).Q", lambda a: _well_conditioned(a).qr(some=False).Q, [(3, 3)])
        if LEGACY_QR else  # (removed in torch 2.14: op_cases.LEGACY_QR)
        (f"torch.linalg.qr({M.format(n=3, i='{0}')}, 'complete').Q",
         lambda a: torch.linalg.qr(_well_conditioned(a), "complete").Q, [(3, 3)]),
        (f"torch.triangular_solve({{1}}, {M.format(n=3, i='{0}')}).solution",
         lambda a, c: torch.triangular_solve(c, _well_conditioned(a)).solution, [(3, 3), (3, 2)]),
    ],
    "distances": [
        ("torch.linalg.vector_norm({0}, 1, dim=1)", lambda t: torch.linalg.vector_norm(t, 1, dim=1), [(4, 3)]),
        ("torch.linalg.vector_norm({0}, 3)", lambda t: torch.linalg.vector_norm(t, 3), [(2, 3)]),
        ("torch.linalg.vector_norm({0}, 0.5, dim=0)", lambda t: torch.linalg.vector_norm(t, 0.5, dim=0), [(4, 3)]),
        ("{0}.norm(float('inf'), dim=-1)", lambda t: t.norm(float("inf"), dim=-1), [(3, 4)]),
        ("{0}.norm(p=1.5, dim=(0, 1), keepdim=True)", lambda t: t.norm(p=1.5, dim=(0, 1), keepdim=True), [(2, 3)]),
        ("torch.linalg.norm({0}, 3, dim=0)", lambda t: torch.linalg.norm(t, 3, dim=0), [(4, 3)]),
        ("torch.linalg.matrix_norm({0})", torch.linalg.matrix_norm, [(2, 3, 3)]),
        ("torch.dist({0}, {1}, 1.5)", lambda a, c: torch.dist(a, c, 1.5), [(4, 3), (3,)]),
        ("F.pairwise_distance({0}, {1})", F.pairwise_distance, [(4, 3), (1, 3)]),
        ("F.pairwise_distance({0}, {1}, 1.0, keepdim=True)", lambda a, c: F.pairwise_distance(a, c, 1.0, keepdim=True),
         [(4, 3), (4, 3)]),
        ("torch.cdist({0}, {1})", torch.cdist, [(4, 3), (2, 3)]),
        ("torch.cdist({0}, {1}, p=1.5)", lambda a, c: torch.cdist(a, c, p=1.5), [(2, 4, 3), (2, 3)]),
        ("torch.cdist({0}, {1}, p=float('inf'))", lambda a, c: torch.cdist(a, c, p=float("inf")), [(3, 2), (3, 2)]),
        ("F.pdist({0})", F.pdist, [(4, 3)]),
        ("F.pdist({0}, 0.5)", lambda t: F.pdist(t, 0.5), [(3, 2)]),
    ],
    "shapes": [
        ("{0}.tile(2, 1)", lambda t: t.tile(2, 1), [(3, 2)]),
        ("torch.tile({0}, (2,))", lambda t: torch.tile(t, (2,)), [(2, 3)]),
        ("{0}.repeat_interleave(2, dim=1)", lambda t: t.repeat_interleave(2, dim=1), [(3, 2)]),
        ("torch.repeat_interleave({0}, torch.tensor([2, 0, 1]), dim=0)",
         lambda t: torch.repeat_interleave(t, torch.tensor([2, 0, 1]), dim=0), [(3, 2)]),
        ("torch.repeat_interleave({0}, 2)", lambda t: torch.repeat_interleave(t, 2), [(2, 2)]),
        ("torch.take_along_dim({0}, torch.tensor([[0, 2, 2], [1, 1, 0]]), 1)",
         lambda t: torch.take_along_dim(t, torch.tensor([[0, 2, 2], [1, 1, 0]]), 1), [(2, 3)]),
        ("{0}.take(torch.tensor([0, 5, 5]))", lambda t: t.take(torch.tensor([0, 5, 5])), [(2, 3)]),
        ("{0}.unfold(1, 2, 1)", lambda t: t.unfold(1, 2, 1), [(2, 4)]),
        ("{0}.rot90(1, (0, 1))", lambda t: t.rot90(1, (0, 1)), [(2, 3)]),
        ("{0}.fliplr() + {0}.flipud()", lambda t: t.fliplr() + t.flipud(), [(3, 3)]),
        ("{0}.narrow_copy(0, 1, 2)", lambda t: t.narrow_copy(0, 1, 2), [(3, 2)]),
        ("torch.atleast_2d({0}) + torch.atleast_1d({0}) + torch.atleast_3d({0})",
         lambda t: torch.atleast_2d(t) + torch.atleast_1d(t) + torch.atleast_3d(t), [()]),
        ("torch.hstack([{0}, {1}])", lambda a, c: torch.hstack([a, c]), [(2, 3), (2, 1)]),
        ("torch.vstack([{0}, {1}])", lambda a, c: torch.vstack([a, c]), [(3,), (2, 3)]),
        ("torch.row_stack([{0}, {0}])", lambda a: torch.row_stack([a, a]), [(2, 3)]),
        ("torch.dstack([{0}, {1}])", lambda a, c: torch.dstack([a, c]), [(2, 3), (2, 3)]),
        ("torch.column_stack([{0}, {1}])", lambda a, c: torch.column_stack([a, c]), [(3,), (3, 2)]),
        ("{0}.tensor_split(2, dim=1)[1]", lambda t: t.tensor_split(2, dim=1)[1], [(2, 3)]),
        ("torch.hsplit({0}, [1])[1]", lambda t: torch.hsplit(t, [1])[1], [(2, 3)]),
        ("torch.vsplit({0}, 2)[0]", lambda t: torch.vsplit(t, 2)[0], [(4, 3)]),
        ("torch.dsplit({0}, [1])[0]", lambda t: torch.dsplit(t, [1])[0], [(2, 2, 3)]),
        ("{0}.index_fill(1, torch.tensor([0, 2]), {1})", lambda t, v: t.index_fill(1, torch.tensor([0, 2]), v),
         [(2, 3), ()]),
        ("{0}.index_copy(0, torch.tensor([2, 0]), {1})", lambda t, s: t.index_copy(0, torch.tensor([2, 0]), s),
         [(3, 2), (2, 2)]),
        ("{0}.masked_scatter(torch.tensor([True, False, True]), {1})",
         lambda t, s: t.masked_scatter(torch.tensor([True, False, True]), s), [(2, 3), (3, 2)]),
        ("F.prelu({0}, {1})", F.prelu, [(2, 3, 2), (3,)]),
        ("F.prelu({0}, {1})", F.prelu, [(4,), (1,)]),
        ("F.glu({0}, 0)", lambda t: F.glu(t, 0), [(4, 3)]),
        ("F.glu({0})", F.glu, [(3, 2)]),
        ("torch.select_scatter({0}, {1}, 0, 1)", lambda t, s: torch.select_scatter(t, s, 0, 1), [(3, 2), (2,)]),
        ("{0}.slice_scatter({1}, 1, 0, 3, 2)", lambda t, s: t.slice_scatter(s, 1, 0, 3, 2), [(2, 3), (2, 2)]),
        ("torch.diagonal_scatter({0}, {1}, 1)", lambda t, s: torch.diagonal_scatter(t, s, 1), [(3, 3), (2,)]),
        ("{0}.put(torch.tensor([4, 0]), {1}, accumulate=True)",
         lambda t, s: t.put(torch.tensor([4, 0]), s, accumulate=True), [(2, 3), (2,)]),
        ("{0}.contiguous().as_strided((2, 2), (1, 2))", lambda t: t.contiguous().as_strided((2, 2), (1, 2)), [(2, 3)]),
        ("torch.broadcast_tensors({0}, {1})[1]", lambda a, c: torch.broadcast_tensors(a, c)[1], [(2, 1), (3,)]),
        ("torch.meshgrid({0}, {1}, indexing='xy')[0]", lambda a, c: torch.meshgrid(a, c, indexing="xy")[0],
         [(3,), (2,)]),
        ("torch.unsafe_split({0}, 2)[1] + {0}.unsafe_chunk(2)[0]",
         lambda t: torch.unsafe_split(t, 2)[1] + t.unsafe_chunk(2)[0], [(4, 2)]),
        ("torch.constant_pad_nd({0}, (1, 0, 0, 2), 0.5)", lambda t: torch.constant_pad_nd(t, (1, 0, 0, 2), 0.5),
         [(2, 3)]),
        ("{0}.scatter_reduce(1, torch.tensor([[0, 0, 2]]), {1}, 'amax')",
         lambda t, s: t.scatter_reduce(1, torch.tensor([[0, 0, 2]]), s, "amax"), [(1, 3), (1, 3)]),
        ("torch.scatter_reduce({0}, 0, torch.tensor([1, 1, 0]), {1}, 'mean', include_self=False)",
         lambda t, s: torch.scatter_reduce(t, 0, torch.tensor([1, 1, 0]), s, "mean", include_self=False),
         [(3,), (3,)]),
        ("{0}.index_reduce(0, torch.tensor([0, 0]), {1}, 'prod')",
         lambda t, s: t.index_reduce(0, torch.tensor([0, 0]), s, "prod"), [(2, 3), (2, 3)]),
        ("torch.trapezoid({0}) + torch.trapz({0}, dx=0.5)", lambda t: torch.trapezoid(t) + torch.trapz(t, dx=0.5),
         [(2, 3)]),
        ("torch.trapezoid({0}, {1}, dim=0)", lambda t, c: torch.trapezoid(t, c, dim=0), [(3, 2), (3,)]),
        ("torch.cumulative_trapezoid({0}, {1})", lambda t, c: torch.cumulative_trapezoid(t, c), [(2, 4), (2, 4)]),
        ("torch.gradient({0}, spacing=2.0)[1]", lambda t: torch.gradient(t, spacing=2.0)[1], [(3, 3)]),
        ("torch.aminmax({0}, dim=0).max", lambda t: torch.aminmax(t, dim=0).max, [(3, 2)]),
        ("torch.quantile({0}, 0.3, dim=1)", lambda t: torch.quantile(t, 0.3, dim=1), [(2, 4)]),
        ("{0}.nanquantile(torch.tensor([0.2, 0.9]))", lambda t: t.nanquantile(torch.tensor([0.2, 0.9], dtype=t.dtype)),
         [(5,)]),
    ],
    "image": [
        ("F.max_pool1d({0}, 2, 1)", lambda t: F.max_pool1d(t, 2, 1), [(2, 2, 4)]),
        ("F.max_pool1d({0}, 3, padding=1, ceil_mode=True)", lambda t: F.max_pool1d(t, 3, padding=1, ceil_mode=True),
         [(1, 2, 5)]),
        ("F.avg_pool1d({0}, 2, padding=1)", lambda t: F.avg_pool1d(t, 2, padding=1), [(2, 2, 4)]),
        ("F.adaptive_avg_pool1d({0}, 3)", lambda t: F.adaptive_avg_pool1d(t, 3), [(1, 2, 5)]),
        ("F.adaptive_max_pool1d({0}, 2)", lambda t: F.adaptive_max_pool1d(t, 2), [(2, 2, 4)]),
        ("F.adaptive_max_pool2d({0}, (2, 1))", lambda t: F.adaptive_max_pool2d(t, (2, 1)), [(1, 2, 3, 3)]),
        ("F.max_pool3d({0}, 2)", lambda t: F.max_pool3d(t, 2), [(1, 1, 2, 2, 4)]),
        ("F.avg_pool3d({0}, 2, 1)", lambda t: F.avg_pool3d(t, 2, 1), [(1, 1, 2, 3, 3)]),
        ("F.adaptive_avg_pool3d({0}, (1, 2, 2))", lambda t: F.adaptive_avg_pool3d(t, (1, 2, 2)), [(1, 2, 2, 3, 3)]),
        ("F.unfold({0}, 2, padding=1)", lambda t: F.unfold(t, 2, padding=1), [(1, 2, 3, 3)]),
        ("F.fold({0}, (3, 3), 2)", lambda t: F.fold(t, (3, 3), 2), [(1, 8, 4)]),
        ("F.pixel_shuffle({0}, 2)", lambda t: F.pixel_shuffle(t, 2), [(1, 4, 2, 3)]),
        ("F.pixel_unshuffle({0}, 2)", lambda t: F.pixel_unshuffle(t, 2), [(1, 1, 2, 4)]),
        ("F.channel_shuffle({0}, 2)", lambda t: F.channel_shuffle(t, 2), [(1, 4, 2, 1)]),
        ("F.pad({0}, (1, 2), mode='reflect')", lambda t: F.pad(t, (1, 2), mode="reflect"), [(2, 2, 3)]),
        ("F.pad({0}, (1, 0, 2, 1), mode='replicate')", lambda t: F.pad(t, (1, 0, 2, 1), mode="replicate"),
         [(1, 2, 2, 3)]),
        ("F.pad({0}, (2, 1), mode='circular')", lambda t: F.pad(t, (2, 1), mode="circular"), [(1, 2, 3)]),
        ("F.max_pool1d({0}, 2, return_indices=True)[0]", lambda t: F.max_pool1d(t, 2, return_indices=True)[0],
         [(2, 2, 4)]),
        ("F.max_pool2d({0}, 2, 1, return_indices=True)[0]", lambda t: F.max_pool2d(t, 2, 1, return_indices=True)[0],
         [(1, 2, 3, 3)]),
        ("F.max_pool3d({0}, 2, return_indices=True)[0]", lambda t: F.max_pool3d(t, 2, return_indices=True)[0],
         [(1, 1, 2, 2, 4)]),
        ("F.adaptive_max_pool1d({0}, 2, return_indices=True)[0]",
         lambda t: F.adaptive_max_pool1d(t, 2, return_indices=True)[0], [(2, 2, 5)]),
        ("F.adaptive_max_pool2d({0}, (2, 1), return_indices=True)[0]",
         lambda t: F.adaptive_max_pool2d(t, (2, 1), return_indices=True)[0], [(1, 2, 3, 3)]),
        ("F.max_unpool1d({0}, torch.tensor([[[1, 2]], [[0, 3]]]), 2)",
         lambda t: F.max_unpool1d(t, torch.tensor([[[1, 2]], [[0, 3]]]), 2), [(2, 1, 2)]),
        ("F.max_unpool2d({0}, torch.tensor([[[[0, 3], [9, 14]]]]), 2)",
         lambda t: F.max_unpool2d(t, torch.tensor([[[[0, 3], [9, 14]]]]), 2), [(1, 1, 2, 2)]),
        ("F.max_unpool3d({0}, torch.tensor([[[[[1, 6]]]]]), 2)",
         lambda t: F.max_unpool3d(t, torch.tensor([[[[[1, 6]]]]]), 2), [(1, 1, 1, 1, 2)]),
        ("F.grid_sample({0}, {1}.tanh(), align_corners=False)",
         lambda t, g: F.grid_sample(t, g.tanh(), align_corners=False), [(1, 2, 3, 3), (1, 2, 2, 2)]),
        ("F.grid_sample({0}, {1}.tanh() * 1.2, 'bicubic', 'reflection', align_corners=True)",
         lambda t, g: F.grid_sample(t, g.tanh() * 1.2, "bicubic", "reflection", align_corners=True),
         [(1, 1, 3, 4), (1, 2, 1, 2)]),
        ("F.affine_grid({0}, [1, 1, 2, 3], align_corners=False)",
         lambda t: F.affine_grid(t, [1, 1, 2, 3], align_corners=False), [(1, 2, 3)]),
        ("F.adaptive_max_pool3d({0}, 2) + F.adaptive_max_pool3d({0}, 2, return_indices=True)[0]",
         lambda t: F.adaptive_max_pool3d(t, 2) + F.adaptive_max_pool3d(t, 2, return_indices=True)[0],
         [(1, 1, 2, 3, 3)]),
        ("F.fractional_max_pool2d({0}, 2, output_size=2, _random_samples=torch.full((1, 2, 2), 0.3).to({0}))",
         lambda t: F.fractional_max_pool2d(t, 2, output_size=2, _random_samples=torch.full((1, 2, 2), 0.3).to(t)),
         [(1, 2, 4, 3)]),
        ("F.fractional_max_pool2d({0}, 2, output_size=2, return_indices=True, "
         "_random_samples=torch.full((1, 2, 2), 0.7).to({0}))[0]",
         lambda t: F.fractional_max_pool2d(t, 2, output_size=2, return_indices=True,
                                           _random_samples=torch.full((1, 2, 2), 0.7).to(t))[0], [(1, 2, 4, 3)]),
        ("F.fractional_max_pool3d({0}, 2, output_size=(1, 2, 1), _random_samples=torch.full((1, 1, 3), 0.2).to({0}))",
         lambda t: F.fractional_max_pool3d(t, 2, output_size=(1, 2, 1),
                                           _random_samples=torch.full((1, 1, 3), 0.2).to(t)), [(1, 1, 3, 4, 3)]),
        ("F.fractional_max_pool3d({0}, 2, output_size=(1, 2, 1), return_indices=True, "
         "_random_samples=torch.full((1, 1, 3), 0.6).to({0}))[0]",
         lambda t: F.fractional_max_pool3d(t, 2, output_size=(1, 2, 1), return_indices=True,
                                           _random_samples=torch.full((1, 1, 3), 0.6).to(t))[0], [(1, 1, 3, 4, 3)]),
        ("F.lp_pool1d({0}, 2, 2)", lambda t: F.lp_pool1d(t, 2, 2), [(1, 2, 4)]),
        ("F.lp_pool2d({0}, 2, 2)", lambda t: F.lp_pool2d(t, 2, 2), [(1, 1, 2, 4)]),
        ("F.lp_pool3d({0}, 2, 2)", lambda t: F.lp_pool3d(t, 2, 2), [(1, 1, 2, 2, 2)]),
        ("F.local_response_norm({0}, 2)", lambda t: F.local_response_norm(t, 2), [(1, 3, 2, 2)]),
        ("F.interpolate({0}, size=2, mode='area')", lambda t: F.interpolate(t, size=2, mode="area"), [(1, 2, 5)]),
        ("F.embedding_bag(torch.tensor([0, 2, 2, 1]), {0}, torch.tensor([0, 1]), mode='max')",
         lambda w: F.embedding_bag(torch.tensor([0, 2, 2, 1]), w, torch.tensor([0, 1]), mode="max"), [(3, 2)]),
        ("F.embedding_bag(torch.tensor([[0, 2], [1, 1]]), {0}, per_sample_weights={1}, mode='sum')",
         lambda w, p: F.embedding_bag(torch.tensor([[0, 2], [1, 1]]), w, per_sample_weights=p, mode="sum"),
         [(3, 2), (2, 2)]),
        ("torch.convolution({0}, {1}, None, [1], [0], [1], False, [0], 1)",
         lambda t, w: torch.convolution(t, w, None, [1], [0], [1], False, [0], 1), [(1, 2, 4), (2, 2, 2)]),
        ("torch.conv_tbc({0}, {1}, {2}, 1)", lambda t, w, c: torch.conv_tbc(t, w, c, 1), [(3, 1, 2), (2, 2, 2), (2,)]),
    ],
    "products": [
        ("torch.kron({0}, {1})", torch.kron, [(2, 3), (2,)]),
        ("torch.cov({0}, aweights={1}.abs() + 0.1)", lambda a, w: torch.cov(a, aweights=w.abs() + 0.1),
         [(2, 4), (4,)]),
        ("{0}.cov(correction=0, fweights=torch.tensor([1, 2, 1]))",
         lambda a: a.cov(correction=0, fweights=torch.tensor([1, 2, 1])), [(3, 3)]),
        ("torch.corrcoef({0})", torch.corrcoef, [(3, 4)]),
        ("torch.block_diag({0}, {1})", lambda a, c: torch.block_diag(a, c), [(2, 3), (2,)]),
        ("torch.cartesian_prod({0}, {1})", lambda a, c: torch.cartesian_prod(a, c), [(3,), (2,)]),
        ("torch.combinations({0}, 2)", lambda t: torch.combinations(t, 2), [(4,)]),
        ("torch.linalg.vander({0}, N=3)", lambda t: torch.linalg.vander(t, N=3), [(2, 3)]),
    ],
    "margin_losses": [
        (f"F.multi_margin_loss({{0}}, torch.tensor([0, 2, 2, 1]), p={p}, reduction={red!r})",
         lambda t, p=p, red=red: F.multi_margin_loss(t, torch.tensor([0, 2, 2, 1]), p=p, reduction=red), [(4, 3)])
        for p, red in ((1, "mean"), (2, "none"))
    ] + [
        ("F.multilabel_margin_loss({0}, torch.tensor([[2, 0, -1], [1, -1, 0]]))",
         lambda t: F.multilabel_margin_loss(t, torch.tensor([[2, 0, -1], [1, -1, 0]])), [(2, 3)]),
        ("F.soft_margin_loss({0}, torch.tensor([1.0, -1.0, 1.0]), reduction='sum')",  # (torch: no target gradient)
         lambda t: F.soft_margin_loss(t, torch.tensor([1.0, -1.0, 1.0], dtype=t.dtype), reduction="sum"), [(2, 3)]),
        ("F.hinge_embedding_loss({0}, torch.tensor([1.0, -1.0, -1.0]), reduction='none')",
         lambda t: F.hinge_embedding_loss(t, torch.tensor([1.0, -1.0, -1.0], dtype=t.dtype), reduction="none"),
         [(2, 3)]),
        ("F.margin_ranking_loss({0}, {1}, {2})", F.margin_ranking_loss, [(4,), (4,), (4,)]),
        ("F.cosine_embedding_loss({0}, {1}, torch.tensor([1.0, -1.0]), 0.1)",
         lambda a, c: F.cosine_embedding_loss(a, c, torch.tensor([1.0, -1.0], dtype=a.dtype), 0.1), [(2, 3), (2, 3)]),
        ("F.poisson_nll_loss({0}, {1}.abs(), reduction='sum')",
         lambda a, c: F.poisson_nll_loss(a, c.abs(), reduction="sum"), [(2, 3), (2, 3)]),
        ("F.poisson_nll_loss({0}.abs() + 0.5, {1}.abs() * 2, log_input=False, full=True)",
         lambda a, c: F.poisson_nll_loss(a.abs() + 0.5, c.abs() * 2, log_input=False, full=True), [(2, 3), (2, 3)]),
        ("F.gaussian_nll_loss({0}, {1}, {2}.abs() + 0.1)", lambda a, c, v: F.gaussian_nll_loss(a, c, v.abs() + 0.1),
         [(2, 3), (2, 3), (2, 3)]),
        ("F.gaussian_nll_loss({0}, {1}, {2}.abs() + 0.1, reduction='none')",
         lambda a, c, v: F.gaussian_nll_loss(a, c, v.abs() + 0.1, reduction="none"), [(2, 3), (2, 3), (2,)]),
        ("F.multilabel_soft_margin_loss({0}, {1}.sigmoid())",
         lambda a, c: F.multilabel_soft_margin_loss(a, c.sigmoid()), [(2, 3), (2, 3)]),
        ("F.triplet_margin_loss({0}, {1}, {2}, swap=True)",
         lambda a, c, d: F.triplet_margin_loss(a, c, d, swap=True), [(2, 3), (2, 3), (2, 3)]),
        ("F.triplet_margin_loss({0}, {1}, {2}, p=1, reduction='none')",
         lambda a, c, d: F.triplet_margin_loss(a, c, d, p=1, reduction="none"), [(2, 3), (2, 3), (2, 3)]),
        ("F.linear_cross_entropy({0}, {1}, torch.tensor([2, 0]), linear_bias={2})",
         lambda x, w, c: F.linear_cross_entropy(x, w, torch.tensor([2, 0]), linear_bias=c), [(2, 3), (4, 3), (4,)]),
        ("F.ctc_loss({0}.log_softmax(2), torch.tensor([[1, 2], [2, 2]]), torch.tensor([4, 4]), torch.tensor([2, 2]))",
         lambda t: F.ctc_loss(t.log_softmax(2), torch.tensor([[1, 2], [2, 2]]), torch.tensor([4, 4]),
                              torch.tensor([2, 2])), [(4, 2, 3)]),
    ],
}

# the recurrent ops on their weights as operands: several outputs joined into one (torch.cat of the flattened ones)
_LSTM = "torch.lstm({0}, ({1}, {2}), [{3}, {4}, {5}, {6}], True, 1, 0.0, False, False, False)"
FIXED["recurrent"] = [
    ("torch.cat(torch.lstm_cell({0}, ({1}, {2}), {3}, {4}, {5}, {6}), -1)",
     lambda x, h, c, *w: torch.cat(torch.lstm_cell(x, (h, c), *w), -1), [(2, 3), (2, 2), (2, 2), (8, 3), (8, 2),
                                                                          (8,), (8,)]),
    ("torch.lstm_cell({0}, ({1}, {2}), {3}, {4})[1]", lambda x, h, c, *w: torch.lstm_cell(x, (h, c), *w)[1],
     [(2, 3), (2, 2), (2, 2), (8, 3), (8, 2)]),
    ("torch.gru_cell({0}, {1}, {2}, {3}, {4}, {5})", torch.gru_cell, [(2, 3), (2, 2), (6, 3), (6, 2), (6,), (6,)]),
    ("torch.rnn_tanh_cell({0}, {1}, {2}, {3})", torch.rnn_tanh_cell, [(1, 3), (1, 2), (2, 3), (2, 2)]),
    ("torch.rnn_relu_cell({0}, {1}, {2}, {3}, {4}, {5})", torch.rnn_relu_cell, [(2, 3), (2, 2), (2, 3), (2, 2), (2,),
                                                                               (2,)]),
    (f"{_LSTM}[0]", lambda x, h, c, *w: torch.lstm(x, (h, c), list(w), True, 1, 0.0, False, False, False)[0],
     [(3, 2, 2), (1, 2, 2), (1, 2, 2), (8, 2), (8, 2), (8,), (8,)]),
    (f"{_LSTM}[2]", lambda x, h, c, *w: torch.lstm(x, (h, c), list(w), True, 1, 0.0, False, False, False)[2],
     [(3, 2, 2), (1, 2, 2), (1, 2, 2), (8, 2), (8, 2), (8,), (8,)]),
    ("torch.gru({0}, {1}, [{2}, {3}], False, 1, 0.0, False, True, True)[0]",
     lambda x, h, *w: torch.gru(x, h, list(w), False, 1, 0.0, False, True, True)[0],
     [(2, 3, 2), (2, 2, 2), (6, 2), (6, 2), (6, 2), (6, 2)]),
    ("torch.rnn_tanh({0}, {1}, [{2}, {3}, {4}, {5}], False, 2, 0.0, False, False, False)[1]",
     lambda x, h, *w: torch.rnn_tanh(x, h, list(w), False, 2, 0.0, False, False, False)[1],
     [(3, 1, 2), (2, 1, 2), (2, 2), (2, 2), (2, 2), (2, 2)]),
    ("torch.rnn_relu({0}, {1}, [{2}, {3}, {4}, {5}], True, 1, 0.0, False, False, False)[0]",
     lambda x, h, *w: torch.rnn_relu(x, h, list(w), True, 1, 0.0, False, False, False)[0],
     [(3, 2, 2), (1, 2, 2), (2, 2), (2, 2), (2,), (2,)]),
    ("_padded(torch.gru(_packed({0}), torch.tensor([2, 1]), {1}, [{2}, {3}], False, 1, 0.0, False, False)[0])",
     lambda x, h, *w: _padded(torch.gru(_packed(x), torch.tensor([2, 1]), h, list(w), False, 1, 0.0, False, False)[0]),
     [(2, 2, 2), (1, 2, 2), (6, 2), (6, 2)]),
    ("torch.nn.utils.rnn.pad_sequence([{0}, {1}], True, 0.5, 'left')",
     lambda a, b: torch.nn.utils.rnn.pad_sequence([a, b], True, 0.5, "left"), [(3, 2), (1, 2)]),
]


def _packed(x: Tensor) -> Tensor:
    """The data of pack_padded_sequence(x, [2, 1]) (the first sequence two steps long, the second one)."""
    return torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([2, 1])).data


def _padded(data: Tensor) -> Tensor:
    """pad_packed_sequence of packed data with batch sizes [2, 1]."""
    return torch.nn.utils.rnn.pad_packed_sequence(torch.nn.utils.rnn.PackedSequence(data, torch.tensor([2, 1])))[0]


def _fixed(table: str) -> Callable[[Builder], int]:
    def generate(b: Builder) -> int:
        code, fn, shapes = b.choose.choice(FIXED[table])
        inputs = [b.pick(shape=shape) for shape in shapes]
        return b.emit("{out} = " + code, inputs, fn)

    generate.__name__ = table
    generate.__doc__ = f"One op of FIXED[{table!r}], on operands of its shapes."
    return gen(generate)


for _table in FIXED:
    _fixed(_table)


# ---------------------------------------------------------------- in-place updates of intermediates

INPLACE: list[tuple[str, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = [
    ("{0}.mul_(2.0)", lambda t: t.mul_(2.0), lambda t: t.mul(2.0)),
    ("{0} += 1.5", lambda t: t.__iadd__(1.5), lambda t: t + 1.5),
    ("{0}.sub_(0.5)", lambda t: t.sub_(0.5), lambda t: t - 0.5),
    ("{0} /= 4", lambda t: t.__itruediv__(4), lambda t: t / 4),
    ("{0}.tanh_()", lambda t: t.tanh_(), torch.tanh),
    ("{0}.sigmoid_()", lambda t: t.sigmoid_(), torch.sigmoid),
    ("{0}.exp_()", lambda t: t.clamp_(max=5.0).exp_(), lambda t: t.clamp(max=5.0).exp()),
    ("F.relu({0}, inplace=True)", lambda t: F.relu(t, inplace=True), F.relu),
    ("{0}.clamp_(-1, 1)", lambda t: t.clamp_(-1, 1), lambda t: t.clamp(-1, 1)),
    ("{0}.neg_()", lambda t: t.neg_(), torch.neg),
    ("{0}.abs_()", lambda t: t.abs_(), torch.abs),
    ("{0} **= 2", lambda t: t.__ipow__(2), lambda t: t**2),
    ("{0}.masked_fill_({0} > 0.5, 0.0)", lambda t: t.masked_fill_(t > 0.5, 0.0),
     lambda t: t.masked_fill(t > 0.5, 0.0)),
]


@gen
def inplace(b: Builder) -> int:
    """An in-place update of an intermediate others have used (the recorder keeps their saved values)."""
    candidates = [i for i in b.live() if not b.entries[i].leaf and b._owns_memory(i)]
    if not candidates:
        raise Reject("no intermediate to update")
    x = b.choose.choice(candidates)
    if b.choose.integer(0, 3) == 0:
        y = b.pick_broadcast(tuple(b.value(x).shape))
        if tuple(torch.broadcast_shapes(b.value(x).shape, b.value(y).shape)) != tuple(b.value(x).shape):
            raise Reject("update must keep the shape")
        name = b.choose.choice(["add_", "mul_", "sub_"])
        functional = name[:-1]
        return b.emit(f"{{0}}.{name}({{1}}); {{out}} = {{0}}", [x, y],
                      lambda t, o: getattr(t, name)(o), lambda t, o: getattr(t, functional)(o).to(t.dtype),
                      inplace=True)  # in place keeps the target's dtype; the functional twin would promote
    code, run, replay = b.choose.choice(INPLACE)
    return b.emit(code + "; {out} = {0}", [x], run, replay, inplace=True)


# ---------------------------------------------------------------- whole programs


# generators that cover many ops (table rows, call forms) are drawn more often, so each op gets its share
WEIGHTS = {"unary": 12, "binary": 5, "inplace": 3, "reduce_select": 2, "reduce_other": 2, "transpose": 2,
           "casts": 2, "scatter_gather": 2, "slicing": 2, "regression_loss": 2, "classification_loss": 2,
           "pooling": 2, "matmul": 2, "clamp": 2, "shapes": 2, "image": 2, "margin_losses": 2}


def build(choose: Chooser, max_steps: int = 6, only: str | None = None) -> Program:
    """A random program: a few leaves, then up to ``max_steps`` steps (``only``: one generator)."""
    b = Builder(choose)
    for _ in range(choose.integer(1, 2)):
        b.leaf(b.shape())
    names = [n for n in sorted(GENERATORS) for _ in range(WEIGHTS.get(n, 1))] if only is None else [only]
    steps, attempts = choose.integer(1, max_steps), 0
    while steps and attempts < 4 * max_steps:
        attempts += 1
        before = len(b.entries)
        try:
            GENERATORS[choose.choice(names)](b)
        except Reject:
            for entry in b.entries[before:]:
                assert entry.leaf
            continue
        steps -= 1
    return b.finish()
