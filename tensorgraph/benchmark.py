"""The measurements behind ``tensorgraph bench`` (issue 7): step ratios, per-node overheads, scaling, memory.

Every comparison is made inside one process, side by side: each repetition runs a block of
steps of every variant in turn (in a new random order each time), and a ratio is the median over
repetitions of the per-repetition ratio, so that a busy neighbour slows both sides of it.

The training step is the lecture's exercise-4 step (hidden 200, batch 32): forward,
backward, and the SGD update ``p -= lr * grad`` in place, on a new batch each step (a pool
of batches drawn once, so that drawing costs nothing). The variants:

- ``torch``: torch autograd on the lecture's atomic forward (:func:`tensorgraph.lecture.forward`,
  the explicit cross-entropy chain): the baseline of both targets;
- ``engine``: the same forward under ``tg.record()``, gradients from ``graph.backward`` (target <= 1.3);
- ``engine_opt_out``: the engine with the two guarantees a training loop can do without switched
  off: no search for variable names, no leaf snapshot (not the target's row: its default is on);
- ``compiled``: ``tg.compile`` of the same forward (target <= 0.8);
- ``torch_ex4`` / ``engine_ex4`` / ``compiled_ex4``: the exercise-4 forward the training command
  runs (:func:`tensorgraph.makemore.model.forward`: ``mean``/``var`` batchnorm, ``F.cross_entropy``);
- ``torch_fused``: torch autograd with ``F.batch_norm`` and ``F.cross_entropy`` (torch at its fastest;
  note that ``F.batch_norm`` normalises with the biased variance);
- ``floor``: not a usable engine but its lower bound: the atomic forward under a torch function mode
  that only passes calls through, then the kernels of the engine's cached backward plan, then the
  update. What the engine's step would cost if its bookkeeping (matching, naming, checks, the leaf
  guard) were free; the difference to ``engine`` is that bookkeeping.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

import tensorgraph as tg

from . import replay
from .lecture import forward as atomic_forward
from .makemore.model import forward as exercise4_forward

LR = 0.1
TARGETS = {"engine": 1.3, "compiled": 0.8}
LABELS = {
    "torch": "torch autograd, atomic forward",
    "engine": "tensorgraph engine (tg.record + graph.backward)",
    "engine_opt_out": "engine, tg.record(names=False, check_leaves=False)",
    "compiled": "tg.compile",
    "torch_ex4": "torch autograd, exercise-4 forward",
    "engine_ex4": "tensorgraph engine, exercise-4 forward",
    "compiled_ex4": "tg.compile, exercise-4 forward",
    "torch_fused": "torch autograd, F.batch_norm + F.cross_entropy",
    "floor": "floor: interception + plan kernels, no bookkeeping",
}


def fused_forward(C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb):  # noqa: N803 - the lecture's names
    """The same network with torch's fused kernels: ``F.batch_norm`` (biased variance) and ``F.cross_entropy``."""
    emb = C[Xb]
    embcat = emb.view(emb.shape[0], -1)
    hprebn = embcat @ W1 + b1
    hpreact = F.batch_norm(hprebn, None, None, bngain.view(-1), bnbias.view(-1), training=True, eps=1e-5)
    h = torch.tanh(hpreact)
    logits = h @ W2 + b2
    return F.cross_entropy(logits, Yb)


# ---------------------------------------------------------------- the network and its data


@dataclass
class Exercise:
    """The lecture's parameters (hidden 200) and a pool of training batches, on one device."""

    params: list[Tensor]
    batches: list[tuple[Tensor, Tensor]]

    def copy(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.params]

    def stream(self) -> Iterator[tuple[Tensor, Tensor]]:
        return itertools.cycle(self.batches)


def exercise(device: str = "cpu", *, n_hidden: int = 200, batch_size: int = 32, pool: int = 64,
             seed: int = 2147483647) -> Exercise:
    from .lecture import setup
    from .makemore.data import load_splits

    ex = setup(n_hidden=n_hidden, batch_size=batch_size, seed=seed)
    Xtr, Ytr = load_splits().train
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(pool):
        ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
        batches.append((Xtr[ix].to(device), Ytr[ix].to(device)))
    return Exercise([p.to(device) for p in ex.parameters], batches)


# ---------------------------------------------------------------- one training step per variant


def torch_step(ex: Exercise, forward: Callable[..., Tensor]) -> Callable[[], Tensor]:
    params = [p.requires_grad_() for p in ex.copy()]
    batches = ex.stream()

    def step() -> Tensor:
        Xb, Yb = next(batches)
        loss = forward(*params, Xb, Yb)
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-LR)
        return loss

    return step


def engine_step(ex: Exercise, forward: Callable[..., Tensor], *, opt_out: bool = False) -> Callable[[], Tensor]:
    """The engine's step; with ``opt_out``, recorded with ``names=False, check_leaves=False``.

    Each setting records from its own ``with`` line, as a training loop would (a line's template
    made by one setting would make the other re-name every step).
    """
    params = ex.copy()
    batches = ex.stream()

    def step() -> Tensor:
        Xb, Yb = next(batches)
        if opt_out:
            with tg.record(names=False, check_leaves=False) as graph:
                loss = forward(*params, Xb, Yb)
        else:
            with tg.record() as graph:
                loss = forward(*params, Xb, Yb)
        grads = graph.backward(loss)
        for p in params:
            p.add_(grads[p], alpha=-LR)
        return loss

    return step


def compiled_step(ex: Exercise, forward: Callable[..., Tensor], **options: Any) -> Callable[[], Tensor]:
    params = ex.copy()
    batches = ex.stream()
    C, W1, b1, W2, b2, bngain, bnbias = params  # noqa: N806 - the lecture's names

    def training_step(Xb: Tensor, Yb: Tensor) -> Tensor:
        return forward(C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb)

    compiled = tg.compile(training_step, **options)

    def step() -> Tensor:
        loss, grads = compiled(*next(batches))
        for p in params:
            p.add_(grads[p], alpha=-LR)
        return loss

    step.compiled = compiled  # type: ignore[attr-defined]
    return step


class _PassThrough(TorchFunctionMode):
    """A torch function mode that only passes each call on: the interception any recorder pays."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        return func(*args, **kwargs) if kwargs else func(*args)


def floor_step(ex: Exercise, forward: Callable[..., Tensor]) -> Callable[[], Tensor] | None:
    """The engine's step with its bookkeeping taken out (see the module docstring); None without a plan."""
    params = ex.copy()
    batches = ex.stream()
    for _ in range(3 + replay.GENERATE_AFTER):  # template, traced backward, plan
        Xb, Yb = next(batches)
        with tg.record() as graph:
            loss = forward(*params, Xb, Yb)
        graph.backward(loss)
    plan = graph._replay.plans.get((graph.node_id(loss), None)) if graph._replay is not None else None
    if plan is None:
        return None
    nodes = graph._nodes  # the plan reads this graph's values: the same kernels on the same shapes
    leaves = [graph.node_id(p) for p in params]

    def step() -> Tensor:
        Xb, Yb = next(batches)
        with _PassThrough():
            loss = forward(*params, Xb, Yb)
        grads = plan.fn(nodes, torch.ones_like(loss))
        for p, node in zip(params, leaves):
            p.add_(grads[node], alpha=-LR)
        return loss

    return step


def variants(ex: Exercise) -> dict[str, Callable[[], Tensor]]:
    floor = floor_step(ex, atomic_forward)
    return {
        "torch": torch_step(ex, atomic_forward),
        "engine": engine_step(ex, atomic_forward),
        "engine_opt_out": engine_step(ex, atomic_forward, opt_out=True),
        "compiled": compiled_step(ex, atomic_forward),
        "torch_ex4": torch_step(ex, exercise4_forward),
        "engine_ex4": engine_step(ex, exercise4_forward),
        "compiled_ex4": compiled_step(ex, exercise4_forward),
        "torch_fused": torch_step(ex, fused_forward),
    } | ({"floor": floor} if floor is not None else {})


# ---------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int, inner: int, device: str = "cpu",
                warmup: int = 5) -> dict[str, list[float]]:
    """Seconds per call of each function, one list entry per repetition, in a new random order each repetition.

    A shuffled order, not a rotation: with a rotation each variant always follows the same one, and the
    caches and allocator state that neighbour leaves behind bias its time (by ~0.03 of a torch step here).
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    rng = random.Random(0)  # the same orders at every run
    for _ in range(repeats):
        order = rng.sample(names, len(names))
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) / inner)
    return times


def median_ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


# ---------------------------------------------------------------- the measurements


@dataclass
class Report:
    """Everything ``tensorgraph bench`` prints, as numbers (``--json`` dumps :meth:`as_dict`)."""

    machine: dict[str, Any]
    steps: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> us, ratio
    overhead: dict[str, float] = field(default_factory=dict)
    scaling: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "steps": self.steps, "targets": TARGETS, "overhead": self.overhead,
                "scaling": self.scaling, "memory": self.memory, "notes": self.notes}


def machine(device: str, threads: int) -> dict[str, Any]:
    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "threads": threads, "device": device,
            "torch": torch.__version__, "python": platform.python_version(), "tensorgraph": tg.__version__}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        info["load_average"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_steps(report: Report, ex: Exercise, *, repeats: int, inner: int, device: str) -> None:
    """The step table: microseconds per step and the ratio to torch autograd on the atomic forward."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tg.compile's notes about fused rules; the source says what ran
        fns = variants(ex)
        for fn in fns.values():
            fn()  # the compiled variants record and generate here, outside the timing
    times = interleaved(fns, repeats=repeats, inner=inner, device=device)
    for name in fns:
        report.steps[name] = {"us": statistics.median(times[name]) * 1e6,
                              "ratio": median_ratio(times, name, "torch"), "label": LABELS[name]}
        if name in TARGETS:
            report.steps[name]["target"] = TARGETS[name]
    if "floor" in fns:
        report.notes.append("the floor row is not a usable engine: the forward under a pass-through torch function "
                            "mode, then the engine's backward plan on an earlier graph's values; its distance to the "
                            "engine row is the engine's own bookkeeping (docs/performance.md)")
    report.notes.append("the opt-out row is the engine with names=False, check_leaves=False: no variable names and "
                        "no guard against leaves changed through .data; the target is for the engine's defaults")
    compiled = fns["compiled"].compiled  # type: ignore[attr-defined]
    report.notes.append(f"tg.compile used the {'fused (tensorgraph.symbolic)' if compiled.fused else 'atomic'} "
                        f"rules; its generated step is {compiled.source.count(chr(10))} lines (print step.source)")


def measure_overhead(report: Report, ex: Exercise, *, repeats: int, inner: int, device: str) -> None:
    """Per-node cost of recording and of the engine's backward, beyond the torch kernels themselves.

    recording: (record the forward - run it plainly) / recorded ops;
    backward: (graph.backward - the same backward kernels in compiled straight-line code) / recorded ops,
    where the kernels' time is (compiled step without fusion - plain forward); each a median over
    repetitions of the difference within the repetition.
    Both for a repeated structure (a recording template, a backward plan: see :mod:`tensorgraph.replay`) and
    for the first recording of a structure (the recorder's full path, the rule walk).
    """
    params = ex.copy()
    Xb, Yb = ex.batches[0]

    def plain() -> None:
        atomic_forward(*params, Xb, Yb)

    def recorded() -> None:
        with tg.record():
            atomic_forward(*params, Xb, Yb)

    def first_recording() -> None:
        for key in [key for key in replay.templates() if key[0] is first_recording.__code__]:
            del replay.templates()[key]  # each recording from this line is its first (other lines keep theirs)
        with tg.record():
            atomic_forward(*params, Xb, Yb)

    graphs = []
    for _ in range(2):  # the second recording is a template: its backward runs a plan from its second call
        with tg.record() as graph:
            loss = atomic_forward(*params, Xb, Yb)
        graphs.append((graph, loss))
    (walked, walked_loss), (graph, loss) = graphs  # the first has no template: the rule walk, always
    C, W1, b1, W2, b2, bngain, bnbias = params  # noqa: N806
    compiled = tg.compile(lambda Xb, Yb: atomic_forward(C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb), fuse=False)
    compiled(Xb, Yb)
    fns = {"plain": plain, "record": recorded, "record_first": first_recording,
           "backward": lambda: graph.backward(loss), "walk": lambda: walked.backward(walked_loss),
           "compiled": lambda: compiled(Xb, Yb)}
    times = interleaved(fns, repeats=repeats, inner=inner, device=device)
    t = {name: statistics.median(v) for name, v in times.items()}
    ops = sum(1 for d in graph._nodes if d["kind"] != "leaf")

    def per_node(name: str, *baseline: tuple[str, int]) -> float:
        """Median over repetitions of (name - the baseline's terms) / ops: paired, so a busy moment cancels."""
        return statistics.median(
            (times[name][r] - sum(sign * times[base][r] for base, sign in baseline)) / ops
            for r in range(len(times[name]))) * 1e6

    kernels = (("compiled", 1), ("plain", -1))
    report.overhead = {
        "ops": ops,
        "forward_us": t["plain"] * 1e6,
        "record_us": t["record"] * 1e6,
        "record_first_us": t["record_first"] * 1e6,
        "backward_us": t["backward"] * 1e6,
        "walk_us": t["walk"] * 1e6,
        "compiled_us": t["compiled"] * 1e6,
        "record_per_node_us": per_node("record", ("plain", 1)),
        "record_first_per_node_us": per_node("record_first", ("plain", 1)),
        "backward_per_node_us": per_node("backward", *kernels),
        "walk_per_node_us": per_node("walk", *kernels),
    }


# ---------------------------------------------------------------- scaling


def chain_graph(n: int, device: str) -> tuple[Tensor, Callable[[], Tensor]]:
    """A deep chain of n ops: x -> tanh -> tanh -> ... (no recursion anywhere, however deep)."""
    x = torch.randn(8, device=device)

    def build() -> Tensor:
        h = x
        for _ in range(n - 1):
            h = torch.tanh(h)
        return h.sum()

    return x, build


def fanout_graph(n: int, device: str) -> tuple[Tensor, Callable[[], Tensor]]:
    """Wide fan-out: one tensor read by n - 2 ops whose results are stacked and summed."""
    x = torch.randn(8, device=device)

    def build() -> Tensor:
        return torch.stack([x * float(k) for k in range(max(n - 2, 1))]).sum()

    return x, build


def measure_scaling(report: Report, sizes: list[int], device: str, *, budget_s: float = 2.0) -> None:
    """Time per node of recording and of backward, for each graph size and shape.

    Every graph is recorded as the first of its structure (no recording template, the rule walk:
    the engine's full path, whose cost must grow linearly). Each repetition is timed twice,
    alternately: as users run it, and with Python's cyclic garbage collector paused. A graph
    of n nodes holds ~10 n Python objects; the collector's full passes over the heap show up
    in the first column, the engine's own cost in the second.
    """
    for shape, make in (("chain", chain_graph), ("fan-out", fanout_graph)):
        for n in sizes:
            x, build = make(n, device)
            timings: dict[bool, tuple[list[float], list[float]]] = {True: ([], []), False: ([], [])}
            repeats = max(3, min(50, int(budget_s / max(n * 40e-6, 1e-4))))
            nodes = 0
            gc.collect()  # each size starts from the same heap: only the collections its own graphs cause count
            for k in range(2 * repeats):
                collector = k % 2 == 0
                replay.templates().clear()  # each graph the first of its structure: the full path and the walk
                if not collector:
                    gc.disable()
                try:
                    start = time.perf_counter()
                    with tg.record() as graph:
                        loss = build()
                    mid = time.perf_counter()
                    grads = graph.backward(loss)
                    _sync(device)
                    end = time.perf_counter()
                finally:
                    gc.enable()
                assert x in grads
                nodes = len(graph)
                timings[collector][0].append(mid - start)
                timings[collector][1].append(end - mid)
                del graph, loss, grads
            per_node = {key: [statistics.median(v) / nodes * 1e6 for v in pair] for key, pair in timings.items()}
            report.scaling.append({
                "shape": shape, "nodes": nodes, "repeats": repeats,
                "record_us_per_node": per_node[True][0], "backward_us_per_node": per_node[True][1],
                "record_us_per_node_gc_paused": per_node[False][0],
                "backward_us_per_node_gc_paused": per_node[False][1],
            })


# ---------------------------------------------------------------- memory


def rss_mb() -> float:
    """The process's resident memory now (Linux /proc), else its peak (resource)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory(report: Report, ex: Exercise, steps: int, device: str) -> None:
    """RSS before and after ``steps`` training steps of the engine and of the compiled step (graphs not kept)."""
    for name, make in (("engine", engine_step), ("compiled", compiled_step)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step = make(ex, atomic_forward)
            for _ in range(min(200, steps)):  # allocator pools and caches reach their working size first
                step()
        gc.collect()
        before = rss_mb()
        mid = None
        for k in range(steps):
            step()
            if k == steps // 2:
                mid = rss_mb()
        _sync(device)
        gc.collect()
        after = rss_mb()
        report.memory[name] = {"steps": steps, "rss_before_mb": before, "rss_middle_mb": mid or before,
                               "rss_after_mb": after, "growth_mb": after - before}


# ---------------------------------------------------------------- all of it


def run(*, device: str = "cpu", threads: int = 2, repeats: int = 30, inner: int = 20,
        sizes: tuple[int, ...] = (100, 1_000, 10_000, 100_000), memory_steps: int = 10_000,
        parts: tuple[str, ...] = ("steps", "overhead", "scaling", "memory"),
        progress: Callable[[str], None] | None = None) -> Report:
    """Run the benchmark; ``parts`` selects what to measure."""
    say = progress or (lambda message: None)
    torch.set_num_threads(threads)
    report = Report(machine(device, threads))
    ex = exercise(device)
    if "steps" in parts:
        say("timing training steps ...")
        measure_steps(report, ex, repeats=repeats, inner=inner, device=device)
    if "overhead" in parts:
        say("measuring per-node overhead ...")
        measure_overhead(report, ex, repeats=repeats, inner=inner, device=device)
    if "scaling" in parts:
        say(f"scaling: graphs of {', '.join(f'{n:,}' for n in sizes)} nodes ...")
        measure_scaling(report, list(sizes), device)
    if "memory" in parts:
        say(f"memory: {memory_steps:,} training steps per backend ...")
        measure_memory(report, ex, memory_steps, device)
    return report


def _overhead(us: float) -> str:
    """A per-node overhead; below zero, the difference of two timings is within their noise."""
    return f"{us:.1f}" if us >= 0 else f"~0 ({us:.1f}, within noise)"


def format_report(report: Report) -> str:
    """The tables ``tensorgraph bench`` prints."""
    m = report.machine
    lines = [f"tensorgraph bench: {m['cpu']} ({m['cores']} cores), {m['threads']} threads, device {m['device']}"
             + (f" ({m['gpu']})" if "gpu" in m else "") + f", torch {m['torch']}, python {m['python']}"
             + (f", load average {m['load_average']}" if "load_average" in m else "")]
    if report.steps:
        lines += ["", "Training step of the lecture's exercise-4 MLP (hidden 200, batch 32): forward + backward + SGD",
                  "update; median of interleaved repetitions, ratio to torch autograd on the same atomic forward",
                  "", f"  {'variant':<50} {'us/step':>8} {'ratio':>7}  target"]
        for row in report.steps.values():
            target = row.get("target")
            verdict = "" if target is None else f"<= {target}  {'met' if row['ratio'] <= target else 'NOT MET'}"
            lines.append(f"  {row['label']:<50} {row['us']:>8.0f} {row['ratio']:>7.2f}  {verdict}")
    if report.overhead:
        o = report.overhead
        lines += ["", f"Per-node overhead on the lecture's atomic forward ({o['ops']} recorded ops), for a repeated",
                  "structure (a recording template, a backward plan) and for a structure's first recording and walk:",
                  f"  recording: {o['record_per_node_us']:.1f} us/node repeated, "
                  f"{o.get('record_first_per_node_us', 0):.1f} first (record {o['record_us']:.0f} and "
                  f"{o.get('record_first_us', 0):.0f} us vs plain forward {o['forward_us']:.0f} us)",
                  f"  backward:  {_overhead(o['backward_per_node_us'])} us/node plan, "
                  f"{_overhead(o.get('walk_per_node_us', 0))} rule "
                  f"walk (graph.backward {o['backward_us']:.0f} and {o.get('walk_us', 0):.0f} us vs the same "
                  f"kernels compiled {o['compiled_us'] - o['forward_us']:.0f} us)"]
    if report.scaling:
        lines += ["", "Scaling: record + backward, time per node (should stay flat as graphs grow); the last two",
                  "columns with Python's cyclic garbage collector paused (its full passes grow with the heap)", "",
                  f"  {'shape':<8} {'nodes':>8} {'record us/node':>15} {'backward us/node':>17} "
                  f"{'record, no gc':>14} {'backward, no gc':>16}"]
        for row in report.scaling:
            lines.append(f"  {row['shape']:<8} {row['nodes']:>8,} {row['record_us_per_node']:>15.1f} "
                         f"{row['backward_us_per_node']:>17.1f} {row.get('record_us_per_node_gc_paused', 0):>14.1f} "
                         f"{row.get('backward_us_per_node_gc_paused', 0):>16.1f}")
        for shape in dict.fromkeys(r["shape"] for r in report.scaling):
            rows = [r for r in report.scaling if r["shape"] == shape]
            if len(rows) > 1:
                growth = max((r["record_us_per_node"] + r["backward_us_per_node"]) for r in rows) / min(
                    (r["record_us_per_node"] + r["backward_us_per_node"]) for r in rows)
                lines.append(f"  {shape}: largest / smallest time per node = {growth:.2f}x over "
                             f"{rows[0]['nodes']:,}..{rows[-1]['nodes']:,} nodes "
                             f"({math.log10(rows[-1]['nodes'] / rows[0]['nodes']):.0f} decades)")
    if report.memory:
        lines += ["", "Memory: resident set size around N training steps (graphs are not kept)"]
        for name, row in report.memory.items():
            lines.append(f"  {name:<9} {row['steps']:,} steps: {row['rss_before_mb']:.1f} MB -> "
                         f"{row['rss_middle_mb']:.1f} MB (halfway) -> {row['rss_after_mb']:.1f} MB "
                         f"({row['growth_mb']:+.1f} MB)")
    if report.notes:
        lines += [""] + [f"note: {note}" for note in report.notes]
    return "\n".join(lines)
