"""The fuzzer: random programs over every op of the rule table, engine vs torch autograd in float64.

``tests/fuzz_programs.py`` builds the programs (random broadcast-compatible shapes from 0-d
to 3-d, size-1 dimensions, fan-out and reuse of intermediates, in-place updates, ties). Each
program runs twice: recorded by tensorgraph and differentiated by its engine, and replayed
on fresh leaves under torch autograd (``torch.autograd.grad``). Every leaf and every live
intermediate must get the same gradient (same shape, same dtype, allclose in float64).

Normal runs try a few hundred programs (derandomised, so the suite is stable). The long
run draws fresh ones::

    pytest -m fuzz tests/test_fuzz.py                 # 10,000 programs
    TENSORGRAPH_FUZZ_EXAMPLES=50000 pytest -m fuzz tests/test_fuzz.py
    TENSORGRAPH_FUZZ_REPORT=fuzz.json ...             # also write per-op counts

``TENSORGRAPH_FUZZ_EXAMPLES`` also sets the count of the normal test.
"""

from __future__ import annotations

import collections
import json
import os
import time
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from fuzz_programs import BINARY, FIXED, GENERATORS, UNARY, HypothesisChooser, Program, RandomChooser, build
from helpers import (
    _same_tensor,
    assert_matches_torch,
    assert_same_gradients,
    assert_same_graph,
    off_the_common_path,
    walk,
)
from hypothesis import HealthCheck, given, note, reject, settings
from hypothesis import strategies as st
from op_cases import LEGACY_QR

import tensorgraph as tg
from tensorgraph import codegen, replay, symbolic

NORMAL_EXAMPLES = int(os.environ.get("TENSORGRAPH_FUZZ_EXAMPLES") or 300)
LONG_EXAMPLES = int(os.environ.get("TENSORGRAPH_FUZZ_EXAMPLES") or 10_000)

def quick(default: int) -> Callable:
    """Settings of a default-suite fuzz test: the same programs every time (derandomised, no database),
    ``default`` of them unless TENSORGRAPH_FUZZ_EXAMPLES says how many."""
    return settings(max_examples=int(os.environ.get("TENSORGRAPH_FUZZ_EXAMPLES") or default), deadline=None,
                    derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def long_run(examples: int) -> Callable:
    """Settings of an opt-in long fuzz test (``-m fuzz``): new programs each run, a failure printed with its blob."""
    return settings(max_examples=examples, deadline=None, print_blob=True, suppress_health_check=list(HealthCheck))


# ops with a rule that the fuzzer cannot produce on this machine, and why
EXCLUDED = {
    "cuda": "needs a CUDA device; the rule is the same dtype/device cast as .to()",
    "cpu": ".cpu() of a CPU tensor returns the tensor itself, so nothing is recorded (an alias, tested as such)",
    "no_grad_update": "an in-place update under torch.no_grad(), which the programs never make; tested against torch "
                      "autograd in test_engine (test_no_grad_in_place_updates_match_torch)",
    "vander": "torch 2.13's autograd fails on torch.vander itself (no truth to compare with); torch.linalg.vander, "
              "the same powers, is generated, and test_ops checks vander against finite differences",
}
if not LEGACY_QR:
    EXCLUDED["qr"] = "torch.qr and Tensor.qr (torch.linalg.qr is the op linalg_qr) were removed in torch 2.14"

OP_COUNTS: collections.Counter[str] = collections.Counter()
TORCH_FAILURES: collections.Counter[str] = collections.Counter()  # programs torch autograd cannot run
RUNS: collections.Counter[str] = collections.Counter()  # programs per check (the long runs' figures, reliability.md)


def run_engine(program: Program, anomaly: bool = False) -> tuple[tg.Graph, torch.Tensor, list[torch.Tensor]]:
    leaves = {i: program.entries[i].value for i in program.leaves()}
    with tg.record(anomaly=anomaly) as graph:
        env = program.execute(leaves, replay=False)
        loss = program.loss(env)
    return graph, loss, env


class TorchCannot(Exception):
    """torch autograd itself fails on the program (its own bugs): there is no truth to compare with."""


def run_torch(program: Program) -> tuple[torch.Tensor, dict[int, torch.Tensor | None]]:
    leaves = {i: program.entries[i].value.detach().clone().requires_grad_() for i in program.leaves()}
    env = program.execute(leaves, replay=True)
    loss = program.loss(env)
    targets = [i for i in program.weights if env[i].requires_grad]
    try:
        grads = torch.autograd.grad(loss, [env[i] for i in targets], allow_unused=True)
    except RuntimeError as err:
        raise TorchCannot(str(err)) from err
    return loss, dict(zip(targets, grads))


def check_program(program: Program) -> tg.Graph:
    """Engine gradients of every leaf and live intermediate == torch autograd's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, loss, env = run_engine(program)
        ours = graph.backward(loss)
        their_loss, theirs = run_torch(program)
    low_precision = any(e.value.dtype != torch.float64 for e in program.entries)
    rtol, atol = (2e-4, 2e-5) if low_precision else (1e-7, 1e-9)
    # NOTE: not bit for bit in float32: torch's matmul folds a batched product into one 2-d product only when
    # the first operand does not require grad, so torch's run (leaves that require grad) rounds differently
    torch.testing.assert_close(loss, their_loss.detach(), rtol=rtol if low_precision else 1e-12,
                               atol=atol if low_precision else 0, msg="the two runs disagree on the loss")
    scale = max([1.0] + [g.abs().max().item() for g in theirs.values() if g is not None and g.numel()])
    for i, expected in theirs.items():
        tensor = env[i]
        got = ours[tensor] if tensor in ours else None
        where = f"t{i} ({graph.name_of(tensor) if tensor in graph else '?'})"
        if expected is None or got is None:
            other = got if expected is None else expected
            assert other is None or not torch.count_nonzero(other), (
                f"{where}: {'torch' if expected is None else 'tensorgraph'} has no gradient, the other a non-zero one")
            continue
        assert got.shape == expected.shape, f"{where}: shape {tuple(got.shape)} != torch's {tuple(expected.shape)}"
        assert got.dtype == expected.dtype, f"{where}: dtype {got.dtype} != torch's {expected.dtype}"
        if not torch.allclose(got, expected, rtol=rtol, atol=atol * scale, equal_nan=True):  # fast path first
            torch.testing.assert_close(got, expected, rtol=rtol, atol=atol * scale, equal_nan=True,
                                       msg=lambda m, where=where: f"{where}: {m}")
    return graph


def _fuzz(data: st.DataObject, max_steps: int) -> None:
    program = build(HypothesisChooser(data), max_steps=max_steps)
    note(program.source())
    try:
        graph = check_program(program)
    except TorchCannot as err:
        TORCH_FAILURES[str(err).splitlines()[0][:100]] += 1
        reject()
    RUNS["programs"] += 1
    OP_COUNTS.update({node["op"] for node in graph._nodes if node["kind"] == "op"})


@settings(max_examples=NORMAL_EXAMPLES, deadline=None, derandomize=True, print_blob=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_programs_match_torch_autograd(data):
    _fuzz(data, max_steps=5)


@pytest.mark.fuzz
@long_run(LONG_EXAMPLES)
@given(st.data())
def test_fuzz_long(data):
    _fuzz(data, max_steps=8)


def _replayed(data: st.DataObject, max_steps: int) -> None:
    """One program recorded again and again from one line: every template path is the full path, bit for bit."""
    program = build(HypothesisChooser(data), max_steps=max_steps)
    note(program.source())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        replay.templates().clear()
        reference, ref_loss, _ = run_engine(program)  # the line's first recording: the recorder's full path
        expected = walk(reference, ref_loss)
        # template, matched twice (matchers generated), then the generated matchers; backward: the rule
        # walk, traced, then the plan
        for _ in range(3 + replay.GENERATE_AFTER):
            graph, loss, _ = run_engine(program)
            assert_same_graph(graph, reference)
            assert_same_gradients(graph.backward(loss), expected)
    if not off_the_common_path(graph):
        assert graph._replay.matchers is not None, "a repeated program on the common path got no matchers"
    RUNS["replayed"] += 1


@quick(150)
@given(st.data())
def test_random_programs_replay_bit_identically(data):
    """Templates, generated matchers and backward plans change nothing on any program the fuzzer writes."""
    _replayed(data, max_steps=5)


@pytest.mark.fuzz
@long_run(LONG_EXAMPLES // 4)
@given(st.data())
def test_replay_fuzz_long(data):
    _replayed(data, max_steps=8)


@pytest.fixture(scope="module", autouse=True)
def _report():
    OP_COUNTS.clear()
    TORCH_FAILURES.clear()
    RUNS.clear()
    start = time.perf_counter()
    yield
    path = os.environ.get("TENSORGRAPH_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"seconds": round(time.perf_counter() - start, 1), "programs": RUNS["programs"],
                       "replayed_programs": RUNS["replayed"],
                       "compiled_programs": RUNS["compiled"], "compiled_one_recording": RUNS["compiled_one_recording"],
                       "answer_keys": RUNS["answer_keys"],
                       "fused_programs": RUNS["fused"], "fused_chains": RUNS["fused_chains"],
                       "torch_failures": dict(TORCH_FAILURES), "op_programs": dict(OP_COUNTS.most_common())},
                      f, indent=1)


@quick(100)
@given(st.data())
def test_graph_compare_agrees_on_random_programs(data):
    """graph.compare replays the recorded calls under torch autograd: it must run and agree on every program."""
    program = build(HypothesisChooser(data), max_steps=5)
    note(program.source())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, loss, _ = run_engine(program)
        try:
            report = graph.compare(loss)
        except RuntimeError as err:
            if "doesn't match the broadcast shape" not in str(err):  # torch's clamp backward bug, as above
                raise
            reject()
    assert report.ok, str(report)


@quick(40)
@given(st.data())
def test_trace_codegen_render_and_save_load_on_random_programs(tmp_path_factory, data):
    """The features built on a recorded graph run on every program; a saved and loaded graph backpropagates
    bit for bit the same and renders the same picture."""
    program = build(HypothesisChooser(data), max_steps=5)
    note(program.source())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, loss, _ = run_engine(program)
        grads = graph.backward(loss)
        traced = tg.trace(graph, loss)
        assert all(torch.equal(traced.grads[name], grads[name]) for name in grads)
        assert graph.backward_source(loss)
        forward_picture = graph.render().source
        assert graph.render(view="backward", loss=loss).source
        path = tmp_path_factory.mktemp("graphs") / "g.json"
        graph.save(path, values=True)
        loaded = tg.load_graph(path)
        again = loaded.backward(graph.name_of(loss))
    assert set(again) == set(grads) and all(torch.equal(again[name], grads[name]) for name in grads)
    assert loaded.render().source == forward_picture


# ------------------------------------------------------- changed after recording: an error, never a wrong gradient

CHANGES = ("add_", "view", "data", "data_assign")


def _change(tensor: torch.Tensor, how: str) -> None:
    if how == "add_":
        tensor.add_(1.0)
    elif how == "view":
        tensor.view(-1)[:1].mul_(3.0) if tensor.is_contiguous() else tensor.transpose(0, -1).mul_(3.0)
    elif how == "data":
        tensor.data.add_(1.0)
    else:
        tensor.data = tensor.data * 2 + 1


@quick(100)
@given(st.data())
def test_a_tensor_changed_after_recording_raises_or_does_not_matter(data):
    """Random program, then a random recorded tensor changed in place (directly, through a view, through .data):
    backward must raise RuntimeError saying so, or give torch's gradients of the program as recorded."""
    program = build(HypothesisChooser(data), max_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _, expected = run_torch(program)  # on copies of the leaves, before anything changes
        except TorchCannot:
            reject()
        how = data.draw(st.sampled_from(CHANGES))
        targets = [i for i in program.weights if program.entries[i].value.numel()]
        target = data.draw(st.sampled_from(targets))
        # .data writes bump no version counter: leaves are checksummed always, intermediates in anomaly mode
        anomaly = how.startswith("data") and not program.entries[target].leaf
        graph, loss, env = run_engine(program, anomaly=anomaly)
        note(f"{program.source()}\nchange t{target} by {how} (anomaly mode: {anomaly})")
        try:
            _change(env[target], how)
        except RuntimeError:  # torch refuses the change itself (an expanded tensor written in place)
            reject()
        try:
            grads = graph.backward(loss)
        except RuntimeError as err:
            assert "modified in place" in str(err), str(err)
            return
    for i, their in expected.items():
        if their is None or program.entries[i].dead:
            continue
        ours = grads[env[i]] if env[i] in grads else torch.zeros_like(their)
        torch.testing.assert_close(ours, their, rtol=2e-4, atol=1e-6, msg=lambda m, i=i: f"t{i}: {m}")


# ------------------------------------------------------- tg.compile, the generated answer key, symbolic fusion


def _tolerances(program: Program, tight: float, graph: tg.Graph | None = None) -> tuple[float, float]:
    """(rtol, atol relative to the largest gradient): ``tight`` in float64, check_program's in float32.

    With ``graph``: a float64 program whose graph holds a lower-precision tensor inside a step
    (``t0.float().double()``) gets float32's rounding of a gradient through it, 1e-6: a fused rule
    computes that gradient in another order in float64, and its cast can round to the next float32.
    """
    if any(e.value.dtype != torch.float64 for e in program.entries):
        return 2e-4, 2e-5
    if graph is not None and any(data["dtype"] in _NARROW for data in graph._nodes):
        return max(tight, 1e-6), max(tight, 1e-6)
    return tight, tight


_NARROW = (torch.float32, torch.float16, torch.bfloat16)


def _assert_grads_close(got: dict, expected: dict, rtol: float, atol: float, what: str) -> None:
    """got[key] allclose expected[key] (None or missing: no gradient, so torch's must be zero)."""
    scale = max([1.0] + [g.abs().max().item() for g in expected.values() if g is not None and g.numel()])
    for key, want in expected.items():
        have = got.get(key)
        if want is None or have is None:
            other = have if want is None else want
            assert other is None or not torch.count_nonzero(other), f"{what} {key}: one side has no gradient"
            continue
        assert have.shape == want.shape and have.dtype == want.dtype, (
            f"{what} {key}: {tuple(have.shape)} {have.dtype} != {tuple(want.shape)} {want.dtype}")
        torch.testing.assert_close(have, want, rtol=rtol, atol=atol * scale, equal_nan=True,
                                   msg=lambda m, key=key: f"{what} {key}: {m}")


def _torch_leaf_grads(program: Program, values: dict[int, torch.Tensor], wrt: list[int]
                      ) -> tuple[torch.Tensor, dict[int, torch.Tensor | None]]:
    """torch autograd's loss and gradients of the leaves ``wrt`` on leaf ``values`` (the replay spelling)."""
    leaves = {i: v.detach().clone().requires_grad_(i in wrt) for i, v in values.items()}
    try:
        loss = program.loss(program.execute(leaves, replay=True))
    except RuntimeError as err:  # new values select another count (x[mask]) than the loss's weights have
        raise TorchCannot(str(err)) from err
    try:
        grads = torch.autograd.grad(loss, [leaves[i] for i in wrt], allow_unused=True)
    except RuntimeError as err:
        raise TorchCannot(str(err)) from err
    return loss.detach(), dict(zip(wrt, grads))


def _nudged(value: torch.Tensor, seed: int) -> torch.Tensor:
    """New values for an input of the compiled step: near the old ones (the programs stay in their domains)."""
    noise = torch.randn(value.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (value.double() + 0.01 * noise).to(value.dtype)


def _compiled(data: st.DataObject, max_steps: int, fuse: bool | None) -> None:
    """A program as a training step: some leaves parameters (closed over), the others the step's inputs. Three
    calls (recorded; new input values: the generated code; parameters updated in place): the loss and the
    parameters' gradients equal torch autograd's, and with ``fuse=False`` the engine's bit for bit."""
    program = build(HypothesisChooser(data), max_steps=max_steps)
    leaves = program.leaves()
    params = [i for i in leaves if data.draw(st.booleans(), label=f"t{i} is a parameter")] or leaves[:1]
    inputs = [i for i in leaves if i not in params]
    note(f"{program.source()}\nparameters {[f't{i}' for i in params]}, inputs {[f't{i}' for i in inputs]}")
    values = {i: program.entries[i].value.clone() for i in leaves}
    param_values = {i: values[i] for i in params}

    def forward(*args: torch.Tensor) -> torch.Tensor:
        env = program.execute({**param_values, **dict(zip(inputs, args))}, replay=False)
        return program.loss(env)

    step = tg.compile(forward, params=[param_values[i] for i in params], fuse=fuse)
    rtol, atol = _tolerances(program, 1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call in range(3):
            if call == 1:
                for i in inputs:
                    values[i] = _nudged(values[i], call * 100 + i)
            if call == 2:
                with torch.no_grad():
                    for i in params:
                        param_values[i].sub_(0.01 * _nudged(torch.zeros_like(param_values[i]), i))
            args = [values[i] for i in inputs]
            try:
                their_loss, theirs = _torch_leaf_grads(program, {**values, **param_values}, params)
            except TorchCannot:
                reject()
            if not torch.isfinite(their_loss):
                reject()  # the new values left an op's domain
            loss, grads = step(*args)
            torch.testing.assert_close(loss, their_loss, rtol=rtol, atol=atol * max(1.0, their_loss.abs().item()),
                                       msg=lambda m, call=call: f"call {call}: loss: {m}")
            ours = {i: _compiled_grad(grads, param_values[i]) for i in params}
            _assert_grads_close(ours, theirs, rtol, atol, f"call {call}: t")
            if fuse is False:
                with tg.record() as graph:
                    engine_loss = forward(*args)
                engine = graph.backward(engine_loss)
                for i in params:
                    if ours[i] is not None and param_values[i] in engine:
                        assert _same_tensor(ours[i], engine[param_values[i]]), f"call {call}: t{i}: not the engine's"
    RUNS["compiled"] += 1
    RUNS["compiled_one_recording"] += step.recordings == 1  # calls 2 and 3 ran the generated code


def _compiled_grad(grads: tg.compiler.CompiledGradients, param: torch.Tensor) -> torch.Tensor | None:
    """The step's gradient of ``param``; None where it has none (the loss does not reach it)."""
    try:
        return grads[param]
    except KeyError:
        return None


@quick(50)
@given(st.data(), st.sampled_from([False, None]))
def test_random_programs_compile_to_torch_and_engine_gradients(data, fuse):
    _compiled(data, max_steps=4, fuse=fuse)


@pytest.mark.fuzz
@long_run(LONG_EXAMPLES // 4)
@given(st.data(), st.sampled_from([False, None]))
def test_compile_fuzz_long(data, fuse):
    _compiled(data, max_steps=8, fuse=fuse)


ROUNDED_CONSTANTS = frozenset({"hardsigmoid", "celu"})


def _answer_key(data: st.DataObject, max_steps: int) -> None:
    """graph.backward_source, executed: every gradient variable is the engine's bit for bit; textbook=True's
    within 1e-9 (float64)."""
    program = build(HypothesisChooser(data), max_steps=max_steps)
    note(program.source())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, loss, _ = run_engine(program)
        engine = graph.backward(loss).by_node
        rtol, atol = _tolerances(program, 1e-9)
        if any(data["op"] in ROUNDED_CONSTANTS for data in graph._nodes):
            # torch's backward kernels round a constant through float32 (hardsigmoid's 1/6, celu's 1/alpha):
            # 3e-8 relative; the textbook formula has the exact constant (tested against autograd of the
            # forward written out in test_codegen.py)
            rtol, atol = max(rtol, 1e-6), max(atol, 1e-6)
        for textbook in (False, True):
            generated = codegen.generate(graph, loss, textbook=textbook)
            namespace = codegen.run(generated.text(), graph)
            got = {variable: namespace[variable] for variable in generated.variables.values()}
            want = {variable: engine[node] for node, variable in generated.variables.items()}
            if textbook:
                _assert_grads_close(got, want, rtol, atol, "textbook")
            else:
                for variable in want:
                    assert _same_tensor(got[variable], want[variable]), f"{variable}: not the engine's bit for bit"
    RUNS["answer_keys"] += 1


@quick(100)
@given(st.data())
def test_random_programs_answer_key_runs_to_the_engine_gradients(data):
    _answer_key(data, max_steps=5)


@pytest.mark.fuzz
@long_run(LONG_EXAMPLES // 4)
@given(st.data())
def test_answer_key_fuzz_long(data):
    _answer_key(data, max_steps=8)


def _fused(data: st.DataObject, max_steps: int) -> None:
    """tg.symbolic.auto_fuse on the program's graph: the leaves' gradients still equal torch autograd's."""
    program = build(HypothesisChooser(data), max_steps=max_steps)
    note(program.source())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, loss, env = run_engine(program)
        leaves = program.leaves()
        try:
            _, theirs = _torch_leaf_grads(program, {i: program.entries[i].value for i in leaves}, leaves)
        except TorchCannot:
            reject()
        fused = symbolic.auto_fuse(graph, loss)
        grads = fused.backward(loss)
    chains = sum(node["op"] == "fused" for node in fused._nodes)
    note(f"{chains} fused chains")
    ours = {i: grads[env[i]] if env[i] in grads else None for i in leaves}
    rtol, atol = _tolerances(program, 1e-9, graph)
    _assert_grads_close(ours, theirs, rtol, atol, "fused: t")
    RUNS["fused"] += 1
    RUNS["fused_chains"] += chains


@quick(25)
@given(st.data())
def test_random_programs_fuse_to_torch_gradients(data):
    _fused(data, max_steps=4)


@pytest.mark.fuzz
@long_run(LONG_EXAMPLES // 10)
@given(st.data())
def test_fuse_fuzz_long(data):
    _fused(data, max_steps=8)


# ---------------------------------------------------------------- every generator, every op

SEEDS_PER_GENERATOR = 4


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_each_generator_matches_torch(name):
    for seed in range(SEEDS_PER_GENERATOR):
        program = build(RandomChooser(seed), max_steps=3, only=name)
        try:
            check_program(program)
        except TorchCannot:
            continue
        except Exception as err:
            detail = f"{type(err).__name__}: {err}"
            raise AssertionError(f"generator {name}, seed {seed}:\n{program.source()}\n{detail}") from err


def recorded_ops(seeds: int = 25) -> set[str]:
    """The ops the generators produce: each generator with a few seeds, each row of the unary, binary and fixed-shape
    tables."""
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(GENERATORS):
            for seed in range(seeds):
                graph, _, _ = run_engine(build(RandomChooser(1000 + seed), max_steps=1, only=name))
                seen |= {node["op"] for node in graph._nodes if node["kind"] == "op"}
        x, y = torch.rand(3, dtype=torch.float64) + 0.5, torch.rand(3, dtype=torch.float64)
        for _, fn, _ in UNARY:
            with tg.record() as graph:
                fn(x)
            seen |= {node["op"] for node in graph._nodes if node["kind"] == "op"}
        for _, fn in BINARY:
            with tg.record() as graph:
                fn(x, y)
            seen |= {node["op"] for node in graph._nodes if node["kind"] == "op"}
        for rows in FIXED.values():
            for _, fn, shapes in rows:
                operands = [torch.rand(shape, dtype=torch.float64) + 0.5 for shape in shapes]
                with tg.record() as graph:
                    fn(*operands)
                seen |= {node["op"] for node in graph._nodes if node["kind"] == "op"}
    return seen


def test_fuzzer_covers_every_op_with_a_rule():
    """A rule-bearing op the generators never produce fails here, unless EXCLUDED says why."""
    from tensorgraph.ops import OPS  # not a module global: record() walks the caller's globals for names

    rules = {name for name, op in OPS.items() if op.rule is not None}
    missing = rules - recorded_ops() - set(EXCLUDED)
    assert not missing, f"ops with a rule that the fuzzer never generates: {sorted(missing)}"
    assert set(EXCLUDED) <= rules, "EXCLUDED names an op that has no rule any more"


# ---------------------------------------------------------------- bugs the fuzzer found (fixed in rules.py)

D = torch.float64


def _r(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_regression_clamp_with_tensor_bounds_follows_torch_when_min_exceeds_max():
    x = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0], dtype=D)
    low = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.0], dtype=D)
    high = torch.tensor([2.0, 0.0, 1.0, 1.0, 2.0], dtype=D)  # min > max at 1 and 3: the output is max there
    assert_matches_torch(lambda a, b, c: torch.clamp(a, b, c), [x, low, high])
    assert_matches_torch(lambda a, b: a.clamp(min=b), [x, low])
    assert_matches_torch(lambda a, c: a.clamp(max=c), [x, high])


def test_regression_inner_contracts_last_dims():
    assert_matches_torch(torch.inner, [_r(2, 3, 4), _r(5, 4, seed=1)])
    assert_matches_torch(torch.inner, [_r(4), _r(4, seed=1)])
    assert_matches_torch(torch.inner, [_r(2, 4), _r(), ])


def test_regression_outer_of_mixed_dtypes():
    assert_matches_torch(torch.outer, [_r(3), _r(4, seed=1).float()], rtol=1e-5, atol=1e-6)


def test_regression_transpose_and_permute_of_0d():
    assert_matches_torch(lambda x: torch.permute(x, ()) * x.mT.T if x.dim() else torch.permute(x, ()) * 2, [_r()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Tensor.T of a 0-d tensor is deprecated, and the identity
        assert_matches_torch(lambda x: x.T * 3, [_r()])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_regression_binary_cross_entropy_target_gradients(reduction):
    x, t = _r(3, 4), _r(3, 4, seed=1)
    w = torch.rand(3, 4, dtype=D) + 0.5
    assert_matches_torch(lambda a, b: F.binary_cross_entropy(a.sigmoid(), b.sigmoid(), reduction=reduction,
                                                             weight=w), [x, t])
    assert_matches_torch(lambda a, b: F.binary_cross_entropy_with_logits(a, b.sigmoid(), reduction=reduction), [x, t])
    assert_matches_torch(lambda a, b: F.binary_cross_entropy_with_logits(
        a, b.sigmoid(), weight=w, pos_weight=torch.full((4,), 1.5, dtype=D), reduction=reduction), [x, t])


def test_regression_cross_entropy_with_a_wider_class_weight():
    x, t = _r(3, 4).float(), _r(3, 4, seed=1).float()
    w = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=D)  # float64 weight, float32 logits: torch accepts it
    assert_matches_torch(lambda a, b: F.cross_entropy(a, b.softmax(1), weight=w), [x, t], rtol=1e-5, atol=1e-6)


def test_regression_fmax_fmin_give_ties_and_nans_as_torch_does():
    """fmax/fmin were maximum/minimum's aliases: a tie split the gradient; torch gives it all to the first input."""
    a = torch.tensor([1.0, 2.0, 3.0, float("nan"), 1.0], dtype=D)
    b = torch.tensor([1.0, 3.0, 2.0, 1.0, float("nan")], dtype=D)
    for fn in (torch.fmax, torch.fmin):
        assert_matches_torch(fn, [a, b])
        assert_matches_torch(fn, [a[:3, None], b[:3]])  # broadcasting


def test_regression_compare_with_batchnorm_statistics_and_class_weights():
    """compare's replay made every float leaf require grad: torch refuses that for running statistics and class
    weights, so compare crashed on any model with nn.BatchNorm in training mode or a class-weighted loss."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    x, y = _r(8, 4), torch.randint(0, 3, (8,))
    with tg.record() as graph:
        loss = F.cross_entropy(model(x), y, weight=torch.tensor([1.0, 2.0, 3.0], dtype=D))
    report = graph.compare(loss)
    assert report.ok and {"model.0.weight", "model.1.weight", "model.3.bias"} <= {row.name for row in report.rows}
