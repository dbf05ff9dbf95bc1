"""``tg.compile``: record a training step once, then run it as straight-line torch code.

::

    step = tg.compile(forward)     # forward(Xb, Yb) -> loss, closing over its parameters
    loss, grads = step(Xb, Yb)     # the first call records and generates; later calls run the code
    print(step.source)             # the generated forward + backward, with the user's names

The first call records ``forward`` with :func:`tensorgraph.record`, runs the engine's
backward pass once while recording it (:func:`tensorgraph.trace`: the adjoint graph of
the rules' own torch calls), and prints both graphs as the body of one Python function,
which it compiles with ``exec``. Later calls run that function: the same torch kernels the
engine runs, with no graph to walk, no rule lookups, no dictionaries per node.

On the way the generator

- keeps only what the loss and the parameters' gradients need (dead-gradient elimination:
  no gradient for integer inputs, data, constants, or branches that lead to no parameter),
  and every in-place update of memory that outlives the step (a captured tensor, an input,
  their views: ``counter.add_(1)``, BatchNorm's ``num_batches_tracked``);
- adds a tensor's further gradient branches in place (``dh += ...``) when the first branch
  is a fresh tensor nothing else reads or shares memory with;
- uses fused closed-form rules for cross-entropy and batchnorm chains when
  :mod:`tensorgraph.symbolic` provides ``auto_fuse`` (the rules' torch calls are traced like
  any other rule's);
- inlines temporaries used once, so the code reads like the lecture's (at most
  :data:`printer.MAX_NESTING` calls deep: a long chain gets a variable every so many levels).

The parameters are the floating-point tensors the forward reads without receiving them as
arguments (its closure, globals, or objects), captured by identity: updating them in place
(``p.data -= lr * grad``, ``p.sub_(...)``) is seen by the next call. Tensors passed as
arguments (directly, or in lists and tuples) are data; a step that would compute no
gradient at all (parameters passed as arguments) raises instead of returning empty grads.

A guard re-records, and says why in a :class:`RecompileWarning`, when

- an input's shape, dtype or device changes (item by item in a list or tuple), another
  non-tensor input's value changes, or the inputs alias each other differently;
- what the forward read changed (:mod:`tensorgraph.guards`): a global or closure variable it,
  its helper functions or the user's functions that ran while recording load, rebound or holding
  another int, float, bool, str or None (a loss weight ``beta``); a ``training`` flag of an
  ``nn.Module`` (any submodule) or of the user's own objects reached from those names, up to
  three levels down (``layers[1].training``, the lecture's hand-written ``BatchNorm1d``); an
  attribute of those objects that their code loads (``layers[1].eps``, ``model.act``), a public
  atom of those modules (torch's ``eps``, ``momentum``; of a module of the user's own class, the
  atoms some code that ran loads); an item of the lists and dicts on the way (``layers``
  appended, ``cfg['scale']``; of a list or dict that all the code that ran reads only by
  constant keys, ``cfg["scale"]``, only those items; of a list it only appends to, none); a
  module's submodules, parameters or buffers; a tensor the loss depends on, held in such an
  attribute, now another one;
- a fused rule was derived under a fact about values (no target equals ``ignore_index``;
  pick rows equal ``torch.arange(n)``) that the inputs or captured tensors it reads no
  longer satisfy: that chain then keeps its atomic rules. A chain whose fact is about a
  tensor computed inside the forward is not fused (rows made by ``torch.arange`` aside).

A forward that draws random numbers outside torch (``random``, ``numpy.random``) runs every call
through the engine, and so does one that changes Python state it reads at every call (below).
Not guarded: objects deeper than three levels, attributes read through a computed ``getattr``
name, objects with ``__slots__``, and other Python state. Each input signature keeps versions
for its last two states of these flags and Python values, so switching between ``train()`` and
``eval()`` (or two values of an attribute) records each once.

Tensor values the forward reads into Python (``if h.sum() > 0:``, ``t.item()``, ``int(t)``,
``t.tolist()``, ``print(t)``: see :mod:`tensorgraph.reads`) are checked inside the generated
step, where the forward read them: a call whose values differ from the recording's never
returns the replayed result. It runs by another version recorded for the same input signature
whose reads agree (a branch that alternates: up to four versions per signature, two branches
in each of two modes), or records again with a ``RecompileWarning``; after
``_VALUE_RECORDINGS`` such recordings (a value that changes at every call: a scale factor
``x / x.std().item()``, a logged loss) the step stops compiling and runs every call through
the engine (``tg.record()`` + ``graph.backward``), with one warning naming the line
(:attr:`CompiledStep.fallback`). So does a step whose read cannot be re-checked (a tensor
computed under ``torch.no_grad()`` inside the forward). Memory outliving the step that the
step changed in place before a failing check (a counter, BatchNorm's running statistics) is
put back first. A forward that reads no values gets no checks.

Work done under ``torch.no_grad()`` inside the forward is replayed at its place, on each
call's values: in-place updates (``self.running_mean.mul_(0.9)``, ``counter.add_(1)``), and
values rebound into a place the step can reach (an attribute of the user's objects found as
the guards find them, ``layers[1].running_mean``; a global of the forward's module; a closure
cell; an nn.Module's buffer), which the step reads at its start and stores at its end (see :func:`_side_plan`). A
``no_grad`` value the loss depends on is refused.

Like any tracing compiler, it replays torch calls, not Python: Python side effects are not
re-run. The recording warns, naming the attributes of the user's objects that hold a tensor
the forward computed (``layers[0].out``, which keep the recording's values), the lists the
forward only appends to (``acts.append(h)``: later calls add nothing), and a value made
under ``no_grad`` that outlives the forward where the step cannot reach it. A forward that
changes, while recorded, Python state the guard watches (``n = len(hist); hist.append(1.0)``,
``self.step += 1``, ``cache["k"] = ...``, ``stack.pop()``, ``global n; n += 1``, a module's
``train()``): the guard holds the state after the recording, which replaying would never
change again, so that version is not kept (:meth:`CompiledStep._unreplayable`, found by
:meth:`guards._References.changed_by_forward` against a copy made before the recording,
:class:`guards._StateBefore`). The next call records again: if the forward changes that
state again, every call runs through the engine from then on (it runs the forward's Python
code: eager torch's results; cheaper than recording every call); if it leaves it as it
found it (``self.ready = True``, ``model.train()``), that version is compiled.
"""

from __future__ import annotations

import bisect
import builtins
import importlib
import itertools
import linecache
import types
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from . import printer
from .engine import BackwardTrace, hook_where, trace
from .graph import Graph, Ref, identifier, is_float, refs_in
from .guards import (
    _CodeThatRuns,
    _direct_references,
    _drew_from,
    _flat_tensors,
    _name_references,
    _Place,
    _random_states,
    _References,
    _spec,
    _StateBefore,
    _tensor_places,
)
from .naming import unique_name
from .ops import OPS, func_name
from .printer import Expr
from .reads import (
    FROZEN,
    Diverged,
    Read,
    ReadWatcher,
    frozen_nodes,
    is_simple_number,
    same_bytes,
    same_number,
    user_line,
)
from .record import _Bookkeeping, _where, record

__all__ = ["CompiledGradients", "CompiledStep", "RecompileWarning", "compile"]

_COUNTER = itertools.count(1)  # each generated function gets its own file name (tracebacks, linecache)


class RecompileWarning(UserWarning):
    """``tg.compile`` recorded the forward again (an input changed shape, dtype or device ...)."""


def compile(forward: Callable[..., Tensor], *, params: Sequence[Tensor] | None = None, fuse: bool | None = None,
            cache_size: int = 8) -> CompiledStep:
    """Compile ``forward(*inputs) -> loss`` into a step returning ``(loss, grads)``; see the module docstring.

    ``params`` restricts the gradients to these tensors (by identity; default: every
    floating-point tensor the forward reads but does not receive as an argument): a list of
    floating-point tensors, of which the loss must read at least one.
    ``fuse``: by default the closed-form rules of :func:`tensorgraph.symbolic.auto_fuse` replace
    the atomic ones where the generated step then makes fewer torch calls; ``True`` uses
    them wherever they exist, ``False`` never (the first derivation of a chain takes sympy
    seconds; later ones come from its cache). ``cache_size``
    bounds how many recorded versions (per input signature, flag state and branch) are kept.
    """
    if not callable(forward):
        raise TypeError(f"tg.compile: expected a function forward(*inputs) -> loss, got {type(forward).__name__}")
    return CompiledStep(forward, params=params, fuse=fuse, cache_size=cache_size)


# ---------------------------------------------------------------- what a step returns


def _param_name(graph: Graph, param: Tensor) -> str:
    """A parameter's name in the recorded graph (``'W1'``), or ``a parameter`` where it has none."""
    try:
        return repr(graph.name_of(param))
    except KeyError:
        return "a parameter"


class _Layout:
    """Where each parameter's gradient sits in the generated function's result (shared by every call)."""

    def __init__(self, tensors: Sequence[Tensor], names: Sequence[str]) -> None:
        self.tensors = tuple(tensors)
        self.names = tuple(names)
        self.by_id = {id(t): i for i, t in enumerate(self.tensors)}
        self.incomplete: dict[int, tuple[Tensor, str]] = {}  # id -> (tensor, why it has no gradient): Gradients'
        self.by_name: dict[str, int] = {}
        for i, name in enumerate(self.names):
            self.by_name.setdefault(name, i)
        for i, name in enumerate(self.names):
            self.by_name.setdefault("d" + name, i)


class CompiledGradients(Mapping):
    """The gradients of one compiled step: index by parameter tensor, by name, or by ``"d"``-name.

    Iterating gives the parameters' names. Only parameters have gradients here (the
    compiled code computes no others); ``graph.backward`` gives every intermediate's.
    """

    __slots__ = ("_layout", "_values")

    def __init__(self, layout: _Layout, values: Sequence[Tensor]) -> None:
        self._layout = layout
        self._values = values

    def __getitem__(self, key: Any) -> Tensor:
        layout = self._layout
        if isinstance(key, Tensor):
            index = layout.by_id.get(id(key))
            if index is not None and layout.tensors[index] is key:
                return self._values[index]
            incomplete = layout.incomplete.get(id(key))
            if incomplete is not None and incomplete[0] is key:
                raise KeyError(f"no gradient for this tensor: the loss depends on it through {incomplete[1]}: its "
                               f"gradient would be incomplete")
            raise KeyError("this tensor is not a parameter of the compiled step (the loss does not depend on it, "
                           "or the forward receives it as an argument)")
        if isinstance(key, str):
            index = layout.by_name.get(key)
            if index is not None:
                return self._values[index]
            raise KeyError(f"no parameter named {key!r} in the compiled step (parameters: {', '.join(layout.names)}); "
                           f"intermediate gradients are not computed by compiled code: use graph.backward for those")
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout.names)

    def __len__(self) -> int:
        return len(self._layout.names)

    def __repr__(self) -> str:
        return f"<CompiledGradients w.r.t. {', '.join(self._layout.names)}>"


# ---------------------------------------------------------------- the step


@dataclass
class _Program:
    """One compiled version of the step: for one input signature."""

    fn: Callable[..., tuple[Tensor, tuple[Tensor, ...]]]
    source: str
    layout: _Layout
    graph: Graph
    watched: _References  # what the forward reads directly (globals, closure): re-checked on every call
    first: tuple[Tensor, tuple[Tensor, ...]] | None  # the recording's own results, returned by the first call
    notes: list[str] = field(default_factory=list)
    fused: bool = False  # the backward uses closed-form rules from tensorgraph.symbolic
    no_grad: bool = False  # some leaf requires grad: run under torch.no_grad() (tensorgraph needs no autograd)
    facts: list[_FactGuard] = field(default_factory=list)  # what the fused rules assume about values
    reads: list[Read] = field(default_factory=list)  # the values the forward reads into Python, re-checked
    unchecked: str | None = None  # why no call may replay it (a value it reads cannot be re-checked): the engine runs
    changes: str | None = None  # Python state the guard watches that the forward changed while recorded: not replayed

    def stale(self) -> str | None:
        """Why the recorded references no longer hold (a rebound global or closure variable ...), or None."""
        return self.watched.changed()


@dataclass
class _FactGuard:
    """A fact about values a fused rule was derived under, re-checked on every call (see ``ValueFact``)."""

    fact: Any  # tensorgraph.symbolic.fusion.ValueFact
    path: tuple[int, ...] | None  # where the tensor is among the inputs (nested lists); None: a captured tensor
    tensor: Tensor | None  # the captured tensor (path None)
    name: str  # the tensor's name in the recording
    op: str  # the name of the op whose fused rule assumes the fact

    def broken(self, inputs: tuple) -> str | None:
        """Why the fused rule no longer applies to these inputs, or None."""
        value = self.tensor if self.path is None else _item(inputs, self.path)
        if self.fact.holds(value):
            return None
        return (f"the fused rule for {self.op!r} was derived assuming {self.name!r} {self.fact.describe()}, "
                f"which no longer holds; that chain keeps its atomic rules from now on")


def _checked_params(params: Any) -> tuple[Tensor, ...] | None:
    """``params=`` as a tuple: floating-point tensors only (another value would get no gradient, silently)."""
    if params is None:
        return None
    if isinstance(params, Tensor):
        raise TypeError("tg.compile: params must be a list of tensors; a single tensor W is params=[W]")
    try:
        if hasattr(params, "__array__"):  # a numpy array iterates as numbers
            raise TypeError
        items = tuple(params)
    except TypeError:
        raise TypeError(f"tg.compile: params must be a list of tensors, not {type(params).__name__}") from None
    for index, p in enumerate(items):
        if not isinstance(p, Tensor):
            raise TypeError(f"tg.compile: params[{index}] is a {type(p).__name__}, not a tensor")
        if not p.is_floating_point():
            raise ValueError(f"tg.compile: params[{index}] has dtype {p.dtype}; only floating-point tensors have "
                             f"gradients")
    return items


class CompiledStep:
    """A compiled training step: ``loss, grads = step(*inputs)``. Create with :func:`tensorgraph.compile`."""

    def __init__(self, forward: Callable[..., Tensor], *, params: Sequence[Tensor] | None = None,
                 fuse: bool | None = None, cache_size: int = 8) -> None:
        if fuse not in (None, True, False):
            raise TypeError(f"tg.compile: fuse must be None (the default: fused rules where they make fewer calls), "
                            f"True or False, not {fuse!r}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"tg.compile: cache_size must be an integer >= 1 (recorded versions kept), "
                             f"not {cache_size!r}")
        self.forward = forward
        self.params = _checked_params(params)
        self.fuse = fuse
        self.cache_size = cache_size
        self.recordings = 0
        self._programs: dict[tuple, _Program] = {}
        self._last_key: tuple | None = None
        self._last: _Program | None = None
        self._distrusted: set[str] = set()  # ops whose fused rule's value facts failed once: never fused again
        self._value_recordings = 0  # recordings made because a value the forward reads into Python changed
        self._fallback: str | None = None  # why every call now runs through the engine
        self._changed: str | None = None  # the Python state the last recording changed (see _unreplayable)
        self._engine_layout: _Layout | None = None
        self.__doc__ = getattr(forward, "__doc__", None)
        self.__name__ = getattr(forward, "__name__", "step")

    # ------------------------------------------------------------ calling

    def __call__(self, *inputs: Any) -> tuple[Tensor, CompiledGradients]:
        key = _signature(inputs)
        program = self._last if key == self._last_key else None
        if program is None or program.facts or program.stale() is not None:
            if self._fallback is not None:
                return self._engine(inputs)
            program, reason = self._find(key, inputs)
            if program is None:
                program = self._compile(inputs, key, reason)
                if program.unchecked is not None or program.changes is not None:
                    return self._unreplayable(inputs, program)
            else:
                self._changed = None  # a kept version runs the call: it leaves the state as it finds it
        self._last_key, self._last = key, program
        for tensor in program.layout.tensors:  # a hook registered on a parameter since the recording
            if tensor._backward_hooks or tensor._post_accumulate_grad_hooks:
                self._refuse_hook(program, tensor)
        first, program.first = program.first, None
        try:
            if first is not None:
                loss, grads = first
            elif program.no_grad:  # parameters that require grad: keep torch autograd from recording the step
                with torch.no_grad():
                    loss, grads = program.fn(*inputs)
            else:
                loss, grads = program.fn(*inputs)
        except Diverged as diverged:  # a value the forward reads into Python is not the recording's
            return self._diverged(program, key, inputs, diverged)
        return loss, CompiledGradients(program.layout, grads)

    def _refuse_hook(self, program: _Program, tensor: Tensor) -> None:
        name = program.layout.names[program.layout.by_id[id(tensor)]]
        hooks = tensor._backward_hooks or tensor._post_accumulate_grad_hooks
        raise NotImplementedError(
            f"tg.compile: parameter {name!r} has a gradient hook ({hook_where(next(iter(hooks.values())))}); the "
            f"compiled step is straight-line torch code and cannot run a Python hook. Remove it (handle.remove()), "
            f"apply it to grads[{name!r}] yourself, or use graph.backward, which runs tensor hooks as torch does.")

    # ------------------------------------------------------------ values read into Python

    def _diverged(self, program: _Program, key: tuple, inputs: tuple, diverged: Diverged
                  ) -> tuple[Tensor, CompiledGradients]:
        """A check failed (``if h.sum() > 0`` takes the other branch): run the call by another version recorded
        for this signature whose reads agree so far, or record it again; past ``_VALUE_RECORDINGS`` such
        recordings, give up compiling and run every call through the engine. Never the replayed result."""
        tried = {id(program)}
        while True:
            diverged.restore()
            candidate = self._agreeing(key, inputs, program, diverged, tried)
            if candidate is None:
                break
            tried.add(id(candidate))
            try:
                result = self._run(candidate, inputs)
            except Diverged as again:
                program, diverged = candidate, again
                continue
            self._use(key, candidate)
            return result
        reason = program.reads[diverged.index].change(diverged.value)
        self._value_recordings += 1
        if self._value_recordings > _VALUE_RECORDINGS:
            return self._give_up(inputs, None, f"{reason}, after {_VALUE_RECORDINGS} recordings for values the "
                                               f"forward reads into Python that changed", stacklevel=4)
        program = self._compile(inputs, key, reason, stacklevel=4)
        if program.unchecked is not None or program.changes is not None:
            return self._unreplayable(inputs, program, stacklevel=5)
        self._last_key, self._last = key, program
        return self._recorded(program)

    def _agreeing(self, key: tuple, inputs: tuple, failed: _Program, diverged: Diverged, tried: set[int]
                  ) -> _Program | None:
        """Another valid version for this signature that read what ``failed`` read before the read that
        differed, and there what this call found: it takes the path this call takes, as far as is known."""
        index = diverged.index
        for program in self._programs.get(key, []):
            if id(program) in tried or program.stale() is not None or len(program.reads) <= index:
                continue
            if program.facts and any(guard.broken(inputs) for guard in program.facts):
                continue
            reads, before = program.reads, failed.reads
            if all(a.agrees(b) for a, b in zip(reads[:index], before[:index])) and \
                    reads[index].where == before[index].where and reads[index].admits(diverged.value):
                return program
        return None

    def _run(self, program: _Program, inputs: tuple) -> tuple[Tensor, CompiledGradients]:
        """Run a recorded version (raises :class:`Diverged` when a read differs)."""
        self._check_hooks(program)
        if program.no_grad:
            with torch.no_grad():
                loss, grads = program.fn(*inputs)
        else:
            loss, grads = program.fn(*inputs)
        return loss, CompiledGradients(program.layout, grads)

    def _recorded(self, program: _Program) -> tuple[Tensor, CompiledGradients]:
        """The loss and gradients the recording of ``program`` computed, for the call it was recorded in."""
        self._check_hooks(program)
        loss, grads = program.first
        program.first = None
        return loss, CompiledGradients(program.layout, grads)

    def _check_hooks(self, program: _Program) -> None:
        for tensor in program.layout.tensors:
            if tensor._backward_hooks or tensor._post_accumulate_grad_hooks:
                self._refuse_hook(program, tensor)

    def _use(self, key: tuple, program: _Program) -> None:
        versions = self._programs.get(key, [])
        if program in versions:
            versions.remove(program)
            versions.insert(0, program)  # most recently used first
        self._last_key, self._last = key, program

    def _unreplayable(self, inputs: tuple, program: _Program, stacklevel: int = 4) -> tuple[Tensor, CompiledGradients]:
        """A version just recorded that no later call may replay: its own result for this call. A value read that
        cannot be re-checked, or random numbers drawn outside torch: every call runs through the engine. Python
        state the guard watches changed by the forward while recorded (``hist.append`` in a forward reading
        ``len(hist)``, ``self.step += 1``): its guard holds the state after, which the compiled step would never
        change again, so it is not kept and the next call records again (:meth:`_compile`); a forward that changes
        that state again (a counter, a list it appends to) runs every call through the engine from then on, one
        that leaves it as the last call left it (``self.built = True``, ``model.train()``) is compiled."""
        if program.unchecked is not None:
            return self._give_up(inputs, program, program.unchecked, stacklevel)
        self._last_key, self._last = None, program  # (the next call looks for a kept version, or records)
        return self._recorded(program)

    def _give_up(self, inputs: tuple, program: _Program | None, reason: str, stacklevel: int = 3
                 ) -> tuple[Tensor, CompiledGradients]:
        """From now on every call runs through the engine (tg.record + graph.backward): same results, no replay.
        Returns this call's result: the recording's own when ``program`` was just recorded for it."""
        self._fallback = reason
        self._programs.clear()
        self._last_key = _ENGINE
        warnings.warn(f"tg.compile: {self.__name__} is no longer compiled: {reason}. Every call now runs through "
                      f"the engine (tg.record() + graph.backward), which runs the forward's Python code: the same "
                      f"losses and gradients, at the engine's speed. To keep the compiled speed, read such values "
                      f"outside the step (it returns the loss) or pass them in as arguments.", RecompileWarning,
                      stacklevel=stacklevel)
        if program is None or program.first is None:
            return self._engine(inputs)
        return self._recorded(program)

    def _engine(self, inputs: tuple) -> tuple[Tensor, CompiledGradients]:
        """One call through the engine: the forward recorded as written, ``graph.backward``'s gradients of the
        parameters (the tensors the loss reads without receiving them, or those of ``params=``)."""
        graph, loss = _run_engine(self.forward, inputs)
        grads = graph.backward(loss)
        nodes = graph._nodes
        live = _live_values(graph)
        inputs_ = _input_places(inputs)
        wanted = None if self.params is None else {id(p) for p in self.params}
        found = [(n, live.get(n, d["value"])) for n, d in enumerate(nodes) if d["kind"] == "leaf"
                 and n in grads.by_node]
        found = [(n, t) for n, t in found if id(t) not in inputs_ and (wanted is None or id(t) in wanted)]
        layout = self._engine_layout
        if layout is None or len(layout.tensors) != len(found) or any(
                a is not t for a, (_, t) in zip(layout.tensors, found)):
            _name_references(graph, self.forward)
            layout = self._engine_layout = _Layout([t for _, t in found], [nodes[n]["name"] for n, _ in found])
        return loss, CompiledGradients(layout, [grads.by_node[n] for n, _ in found])

    @property
    def fallback(self) -> str | None:
        """Why every call runs through the engine instead of compiled code (a value the forward reads into Python
        that changes at every call, or that the compiled step cannot re-check; random numbers drawn outside torch;
        Python state the forward reads and changes at every call), or None while it is compiled."""
        return self._fallback

    @property
    def source(self) -> str:
        """The generated Python source of the step last run (forward, then backward)."""
        if self._last is None:
            raise RuntimeError("tg.compile: the step has not run yet; the first call records the forward and "
                               "generates the code")
        return self._last.source

    @property
    def graph(self) -> Graph:
        """The forward graph recorded for the step last run."""
        if self._last is None:
            raise RuntimeError("tg.compile: the step has not run yet")
        return self._last.graph

    @property
    def parameters(self) -> tuple[Tensor, ...]:
        """The tensors the step computes gradients for, in the order of :attr:`names`."""
        return self._last.layout.tensors if self._last is not None else ()

    @property
    def names(self) -> tuple[str, ...]:
        """The parameters' names (their gradients are also found under ``"d" + name``)."""
        return self._last.layout.names if self._last is not None else ()

    @property
    def fused(self) -> bool:
        """Whether the step last run uses closed-form (fused) rules from :mod:`tensorgraph.symbolic`."""
        return self._last is not None and self._last.fused

    def __repr__(self) -> str:
        state = f"{len(self._programs)} compiled version(s)" if self._programs else "not compiled yet"
        return f"<tensorgraph.compile of {self.__name__}: {state}>"

    # ------------------------------------------------------------ compiling

    def _broken_fact(self, program: _Program, inputs: tuple) -> str | None:
        """The first fused rule whose assumption about values these inputs break (that op is never fused again)."""
        for guard in program.facts:
            reason = guard.broken(inputs)
            if reason is not None:
                self._distrusted.add(guard.op)
                return reason
        return None

    def _find(self, key: tuple, inputs: tuple) -> tuple[_Program | None, str | None]:
        """A recorded version for this input signature that is still valid (the guarded training flags and
        Python values are the recording's), or None and why the step must be recorded again. Versions whose
        captured tensors were rebound are dropped: they can never run again."""
        reason = None
        versions = self._programs.get(key, [])
        for program in list(versions):
            why = program.stale()
            if why is None and program.facts:
                why = self._broken_fact(program, inputs)
                if why is not None:
                    versions.remove(program)
            if why is None:
                versions.remove(program)
                versions.insert(0, program)  # most recently used first
                return program, None
            reason = reason or why
            if program.watched.rebound():
                self._drop_rebound()
        if reason is None and self._last_key is not None:
            reason = _what_changed(self._last_key, key, inputs)
        return None, reason

    def _drop_rebound(self) -> None:
        """Forget every version that reads a tensor the user has since rebound (``W1 = W1 - lr * dW1``)."""
        for key, versions in list(self._programs.items()):
            versions[:] = [p for p in versions if not p.watched.rebound()]
            if not versions:
                del self._programs[key]

    def _compile(self, inputs: tuple, key: tuple, reason: str | None, stacklevel: int = 3) -> _Program:
        """Record a new version (not kept where no call may replay it: see :meth:`_unreplayable`)."""
        again = self._changed  # the last recording changed Python state: this one tells whether it always does
        if again is not None:
            reason = (f"the forward changed {again} while it was recorded, Python state that it also reads: "
                      f"recording it again to see whether it changes it at every call")
        if reason is not None:
            warnings.warn(f"tg.compile: re-recording {self.__name__}: {reason}", RecompileWarning,
                          stacklevel=stacklevel)
        program = _build(self.forward, inputs, self.params, self.fuse, self._distrusted)
        if program.unchecked is None and program.changes is None:  # (notes on a step the engine will run mislead)
            for note in program.notes:
                warnings.warn(f"tg.compile: {note}", stacklevel=stacklevel)
        self.recordings += 1
        self._changed = program.changes
        if program.changes is not None:
            if again is not None and program.unchecked is None:
                program.unchecked = (
                    f"the forward changes {program.changes} at every call, Python state that it also reads; the "
                    f"compiled step replays torch calls, not Python code, so it would not change it again (every "
                    f"call would compute the recording's loss)")
            return program
        if sum(map(len, self._programs.values())) >= self.cache_size:  # the oldest signature's oldest version
            oldest = next(iter(self._programs))
            self._programs[oldest].pop()
            if not self._programs[oldest]:
                del self._programs[oldest]
        versions = self._programs.setdefault(key, [])
        versions.insert(0, program)
        # a value annealed at every step would otherwise fill the cache with dead versions
        del versions[_VERSIONS_WITH_READS if program.reads else _VERSIONS:]
        return program


_VERSIONS = 2  # versions kept per input signature: the training and the eval mode (each holds its graph's values)
_VERSIONS_WITH_READS = 4  # ... when the forward reads values into Python: two branches in each mode
_VALUE_RECORDINGS = 4  # recordings for changed values before a step gives up compiling (values that change always)
_ENGINE = object()  # the last signature of a step that runs through the engine: equal to no signature


def _run_engine(forward: Callable[..., Tensor], inputs: tuple) -> tuple[Graph, Tensor]:
    with record() as graph:  # one line for every step run by the engine: its recording template is reused
        loss = forward(*inputs)
    return graph, loss


def _signature(inputs: tuple) -> tuple:
    """What the generated code is specialised to: each tensor input's shape, dtype, device (lists and tuples of
    them item by item); other inputs' values; and which tensor inputs are the same tensor."""
    key = []
    ids = []
    for x in inputs:  # every call: written out for speed
        if isinstance(x, Tensor):
            key.append((x.shape, x.dtype, x.device))
            ids.append(id(x))
        else:
            key.append(_part(x))
            if isinstance(x, (list, tuple)):
                ids.extend(id(t) for _, t in _tensors(x))
    key.append(("aliases", None if len(set(ids)) == len(ids) else _aliases(ids)))
    return tuple(key)


def _aliases(ids: list[int]) -> tuple[int, ...]:
    """For each tensor input (in :func:`_tensors` order), the position of the first one that is the same tensor."""
    first: dict[int, int] = {}
    return tuple(first.setdefault(i, position) for position, i in enumerate(ids))


def _part(x: Any) -> tuple:
    if isinstance(x, Tensor):
        return (x.shape, x.dtype, x.device)
    if isinstance(x, (list, tuple)):
        return ("items", type(x), tuple(_part(v) for v in x))
    try:
        hash(x)
        return ("value", type(x), x)
    except TypeError:
        return ("object", id(x))


def _tensors(inputs: Sequence[Any], prefix: tuple[int, ...] = ()) -> Iterator[tuple[tuple[int, ...], Tensor]]:
    """Every tensor among the inputs (inside lists and tuples too), with where it sits: (index, item index ...)."""
    for index, x in enumerate(inputs):
        if isinstance(x, Tensor):
            yield prefix + (index,), x
        elif isinstance(x, (list, tuple)):
            yield from _tensors(x, prefix + (index,))


def _place(path: tuple[int, ...]) -> str:
    return f"input {path[0]}" + "".join(f"[{i}]" for i in path[1:])


def _what_changed(old: tuple | None, new: tuple, inputs: tuple) -> str:
    if old is None or len(old) != len(new):
        return f"it is called with {len(new) - 1} inputs"
    for index, (a, b) in enumerate(zip(old[:-1], new[:-1])):
        if a != b:
            return _difference(a, b, (index,))
    paths = [path for path, _ in _tensors(inputs)]
    distinct = tuple(range(len(paths)))
    for position, (a, b) in enumerate(zip(old[-1][1] or distinct, new[-1][1] or distinct)):
        if a != b:
            if b != position:
                return f"{_place(paths[position])} is now the same tensor as {_place(paths[b])}"
            return f"{_place(paths[position])} is no longer the same tensor as {_place(paths[a])}"
    return "the inputs alias each other differently"


def _difference(a: tuple, b: tuple, path: tuple[int, ...]) -> str:
    if isinstance(a[0], torch.Size) and isinstance(b[0], torch.Size):
        for what, x, y in zip(("shape", "dtype", "device"), a, b):
            if x != y:
                shown = (tuple(x), tuple(y)) if what == "shape" else (x, y)
                return f"{_place(path)} changed {what} from {shown[0]} to {shown[1]}"
    if a[0] == b[0] == "items" and a[1] is b[1] and len(a[2]) == len(b[2]):
        for index, (x, y) in enumerate(zip(a[2], b[2])):
            if x != y:
                return _difference(x, y, path + (index,))
    if b[0] == "items":
        return f"{_place(path)} is now a {b[1].__name__} of {len(b[2])} items"
    return f"{_place(path)} changed"


# ---------------------------------------------------------------- recording


@dataclass
class _Recording:
    graph: Graph
    loss: Tensor
    snapshots: list[tuple[int, int]]  # (node whose value was saved, the in-place node about to change it)
    reads: ReadWatcher  # the tensor values the forward read into Python (bool(t), t.item() ...)
    side: _SideLog  # the torch calls the forward made under torch.no_grad(), replayed by the step
    versions: dict[int, int]  # leaf -> its version when recorded, for leaves a snapshot replaced by a copy
    places: dict[tuple[int, str], tuple[_Place, Tensor]]  # where the forward's objects held tensors before it ran
    code: list[tuple[types.CodeType, dict]]  # the code (and globals) of the user's functions that called torch
    ran: _CodeThatRuns  # the code of every function that ran while recording
    before: _StateBefore  # the Python state within the forward's reach before it ran
    drew: str | None = None  # the random number generator outside torch the forward drew from, if any


def _record(forward: Callable[..., Tensor], inputs: tuple) -> _Recording:
    """Run the forward under the recorder, watching what the generated code could not replay."""
    recorder = record()
    mode = recorder._mode
    graph = recorder.graph
    snapshots: list[tuple[int, int]] = []
    versions: dict[int, int] = {}
    take_snapshot, no_grad_call = mode._snapshot, mode._no_grad_call

    def snapshot(tensor: Tensor) -> None:
        node = mode._node_of(tensor, check=False)
        data = graph._nodes[node]
        if data["value"] is tensor:
            snapshots.append((node, len(graph._nodes)))
            if data["kind"] == "leaf":
                versions.setdefault(node, data["version"])
        take_snapshot(tensor)

    reads = ReadWatcher(mode)
    side = _SideLog(mode, reads, no_grad_call)
    mode._snapshot, mode._no_grad_call = snapshot, side.call
    places = _tensor_places(forward)
    before = _StateBefore(forward)
    run = _bind(forward, inputs)  # a closure: the inputs are named by the forward's own parameters
    code: list[tuple[types.CodeType, dict]] = []
    ran = _CodeThatRuns(before.enter)  # (the globals of the user's code that runs: copied before it runs)
    generators = _random_states()
    try:
        loss = _run_recorded(recorder, reads, run,
                             lambda frames: code.extend((frame.f_code, frame.f_globals) for frame in frames), ran)
    finally:
        # the user's frames hold the forward's locals: let the values made under no_grad that nothing keeps die
        mode.frames.clear()
        mode.frame_order.clear()
        mode.last_frame = mode.entry_frame = None
        mode._snapshot, mode._no_grad_call = take_snapshot, no_grad_call
    if not isinstance(loss, Tensor):
        raise TypeError(f"tg.compile: the forward must return the loss (a scalar tensor), got {type(loss).__name__}")
    reads.untracked -= side.replayed  # the constant versions of captured tensors updated in place: replayed
    return _Recording(graph, loss, snapshots, reads, side, versions, places, code, ran, before,
                      _drew_from(generators))


class _SideRef(Ref):
    """An argument of a call made under ``torch.no_grad()``: the tensor an earlier such call made (``node``: its
    index in :attr:`_SideLog.calls`)."""

    __slots__ = ()


@dataclass
class _SideCall:
    """One torch call the forward made under ``torch.no_grad()``, as the step replays it (one per output)."""

    func: Any
    args: tuple  # tensors as Refs: graph nodes (captured tensors and inputs become leaves), or _SideRefs
    kwargs: dict
    name: str  # the op's name: a variable name for its result
    position: int  # nodes in the graph when it ran: the step makes it before that node's statement
    reads: int  # values the forward had read into Python before it: their checks come first
    where: str  # the user's file:line (code)
    value: weakref.ref | None  # its output (weakly: the compiler asks which outputs outlive the forward)
    output_index: int | None = None
    result: tuple | None = None  # for a call with several outputs: one object per output, shared by them
    inplace: bool = False  # it changed its first argument in place (``running.mul_(0.9)``, ``x[i] = v``)
    mutates: bool = False  # it changed one of its arguments (in place, ``out=``, a kernel's side effect)
    pure: bool = True  # deterministic and without side effects: may be inlined into its user


class _SideLog:
    """The torch calls the forward makes under ``torch.no_grad()``, logged for the step to replay.

    Installed as the recorder's ``_no_grad_call``: each call still runs as the recorder runs it. Its tensor
    arguments are logged as Refs: a tensor an earlier such call made as that call, any other as the recorder's
    node for it (a captured tensor or an input seen first here becomes a leaf, so that the step reads the same
    tensor and the recording names it). An update of an intermediate is the recorder's (``no_grad_update``).
    """

    def __init__(self, mode: Any, reads: ReadWatcher, no_grad_call: Callable[..., Any]) -> None:
        self.mode = mode
        self.reads = reads
        self.no_grad_call = no_grad_call
        self.calls: list[_SideCall] = []
        self.made: dict[int, tuple[weakref.ref, int]] = {}  # id(tensor) -> (the tensor, the call of its version)
        self.replayed: set[int] = set()  # nodes the recorder made for logged calls (constant versions)

    def index_of(self, tensor: Tensor) -> int | None:
        """The logged call whose output this tensor is (its latest version), or None."""
        made = self.made.get(id(tensor))
        return made[1] if made is not None and made[0]() is tensor else None

    def call(self, func: Any, entry: Any, args: tuple, kwargs: dict) -> Any:
        mode = self.mode
        nodes = mode.graph._nodes
        with _Bookkeeping():
            tensors: list[Tensor] = []
            try:
                call = (tuple(self._convert(a, tensors) for a in args),
                        {k: self._convert(v, tensors) for k, v in kwargs.items()})
            except RuntimeError:  # a tensor the recorder refuses (an inference tensor ...): its own error, later
                call = None
            versions = [t._version for t in tensors]
            position, reads = len(nodes), len(self.reads.reads)
        result = self.no_grad_call(func, entry, args, kwargs)
        if call is None:
            return result
        with _Bookkeeping():
            self._log(func, entry, args, call, result, tensors, versions, position, reads)
        return result

    def _convert(self, value: Any, tensors: list[Tensor]) -> Any:
        if isinstance(value, Tensor):
            tensors.append(value)
            index = self.index_of(value)
            return _SideRef(index) if index is not None else Ref(self.mode._node_of(value, check=False))
        if type(value) in (tuple, list) and any(isinstance(v, (Tensor, tuple, list)) for v in value):
            return type(value)(self._convert(v, tensors) for v in value)
        return value

    def _log(self, func: Any, entry: Any, args: tuple, call: tuple, result: Any, tensors: list[Tensor],
             versions: list[int], position: int, reads: int) -> None:
        mode = self.mode
        nodes = mode.graph._nodes
        if any(nodes[n]["op"] == "no_grad_update" for n in range(position, len(nodes))):
            return  # an intermediate updated in place: the recorder's node is the step's statement
        op = entry[0] if entry is not None else None
        mutated = [t for t, v in zip(tensors, versions) if t._version != v]
        kernel = bool(op is not None and op.mutates)  # batch_norm's running statistics: no version bump
        outputs = [result] if isinstance(result, Tensor) else list(result) if isinstance(result, (tuple, list)) \
            and all(isinstance(r, Tensor) or r is None for r in result) else []
        fresh = [o for o in outputs if o is not None and not any(o is t for t in tensors)]
        if any(id(o) in mode.custom_outputs for o in fresh):
            return  # made inside a custom autograd.Function's forward: its node, not a replayed call
        if not mutated and not kernel and not fresh:
            return  # a read into Python, or an input returned as is: nothing to replay
        receiver = args[0] if args and isinstance(args[0], Tensor) else None
        inplace = receiver is not None and any(receiver is t for t in mutated)
        changes = bool(mutated) or kernel
        where = user_line()
        name = op.name if op is not None else func_name(func)
        pure = op is not None and not op.constant and not changes
        group = tuple(object() for _ in outputs) if isinstance(result, (tuple, list)) and outputs else None
        shown = outputs if outputs else [None]
        for index, out in enumerate(shown):
            if group is not None and out is None:
                continue
            logged = len(self.calls)
            self.calls.append(_SideCall(
                func, call[0], call[1], name, position, reads, where,
                weakref.ref(out) if isinstance(out, Tensor) else None,
                index if group is not None else None, group, inplace, changes, pure))
            if isinstance(out, Tensor) and (self.index_of(out) is not None or not any(out is t for t in tensors)):
                self.made[id(out)] = (weakref.ref(out), logged)  # a new tensor, or a new version of one made here
        if inplace and not outputs and self.index_of(receiver) is not None:  # ``x[i] = v``: x's new version
            self.made[id(receiver)] = (weakref.ref(receiver), len(self.calls) - 1)
        self.replayed.update(range(position, len(nodes)))


def _bind(forward: Callable[..., Tensor], inputs: tuple) -> Callable[[], Any]:
    return lambda: forward(*inputs)


def _run_recorded(recorder: record, reads: ReadWatcher, run: Callable[[], Any],
                  seen: Callable[[Iterable[types.FrameType]], None], ran: _CodeThatRuns) -> Any:
    """``run()`` recorded; ``seen`` is given the frames of the user's functions that called torch, ``ran`` the
    code of every function that ran."""
    # NOTE: the names of this frame's variables are searched when the block ends (naming): only a callable here,
    # no list of what the frames hold
    with recorder:
        try:
            with reads, ran:
                loss = run()
        finally:
            seen(recorder._mode.frames.values())
    return loss


# ---------------------------------------------------------------- building one program


def _build(forward: Callable[..., Tensor], inputs: tuple, params: Sequence[Tensor] | None,
           fuse: bool | None, distrusted: Collection[str] = ()) -> _Program:
    _refuse_dicts(inputs)
    rec = _record(forward, inputs)
    graph, loss = rec.graph, rec.loss
    nodes = graph._nodes
    root = graph._live.get(id(loss))
    if root is None or root[2] is not loss:
        raise ValueError("tg.compile: the forward returned a tensor it did not compute from recorded torch calls")
    root_node = root[0]
    if not is_float(nodes[root_node]) or loss.numel() != 1:
        raise ValueError(f"tg.compile: the forward must return a scalar floating-point loss, got shape "
                         f"{tuple(loss.shape)} and dtype {loss.dtype}")
    input_ids = set(_input_places(inputs))  # tensors passed in, inside lists and tuples too
    leaves = [n for n, d in enumerate(nodes) if d["kind"] == "leaf"]
    live = _live_values(graph)
    value_of = {n: live.get(n, nodes[n]["value"]) for n in leaves}  # the tensors themselves, not copies
    ancestors = graph.ancestors(root_node)
    read = {id(value_of[n]): value_of[n] for n in leaves if n in ancestors}  # the tensors the loss depends on
    made = {id(t): t for n, _, t in graph._live.values() if nodes[n]["kind"] != "leaf"}
    for value in value_of.values():  # a captured tensor updated in place (``stats.total += ...``) is not new
        made.pop(id(value), None)
    side = _side_plan(rec, forward, value_of)
    captured = {id(value): value for n, value in value_of.items() if n not in side.loads}  # (loads: read anew)
    watched = _direct_references(forward, captured, read, made, rec.code, rec.ran, rec.before)
    watched.loaded = [(place, _spec(value_of[n])) for n, place in side.loads.items()]
    _name_references(graph, forward, [(place.path, value_of[n]) for n, place in side.loads.items()])
    for n in leaves:
        index = rec.side.index_of(value_of[n])
        if index is not None:
            where = rec.side.calls[index].where
            raise ValueError(f"tg.compile: the loss uses {nodes[n]['name']!r}, computed under torch.no_grad() at "
                             f"{where}; compiled code replays recorded calls only, so it would keep this value "
                             f"forever. Compute it outside the forward and pass it in, or use the dynamic engine.")
    updated = {n for n, d in enumerate(nodes) if d["op"] == "no_grad_update"}
    used = updated & ancestors
    if used:
        data = nodes[min(used)]
        raise ValueError(f"tg.compile: the loss uses {data['name']!r}, updated in place under torch.no_grad() at "
                         f"{data['source']}; compiled code replays recorded calls only, so it would not redo this "
                         f"update. Move the update out of the forward, or use the dynamic engine (graph.backward).")
    if params is None:
        wanted = [n for n in leaves if is_float(nodes[n]) and id(value_of[n]) not in input_ids]
    else:
        by_id = {id(value_of[n]): n for n in leaves}
        wanted = []
        for p in params:
            if id(p) in input_ids:
                raise ValueError("tg.compile: params= names a tensor the forward receives as an input; gradients "
                                 "are computed for tensors the forward closes over")
            if id(p) in by_id and is_float(nodes[by_id[id(p)]]):
                wanted.append(by_id[id(p)])
    notes: list[str] = []
    reads, unchecked = _checked_reads(rec, live)
    if unchecked is None and rec.drew is not None:
        unchecked = (f"the forward draws random numbers from {rec.drew}, which the compiled step would not draw "
                     f"again (every call would reuse the recording's numbers: the same batch, the same mask); draw "
                     f"them with torch (torch.randint, torch.randperm, torch.rand)")
    changes = watched.changed_by_forward(rec.before, read)
    undo = _changed_leaves(graph, rec.versions, live) if reads else []
    try:
        chosen = _generate(forward, graph, graph, rec, inputs, wanted, root_node, reads, undo, side)
    except ValueError as err:  # a call under torch.no_grad() printed code cannot spell: not replayed, as before
        if not side.calls:
            raise
        notes.append(f"the forward's torch.no_grad() work cannot be compiled ({err}); the compiled step does not "
                     f"replay it")
        side = _SidePlan(lost=[f"{side.calls[0].name!r} at {side.calls[0].where}"])
        watched.loaded = []
        chosen = _generate(forward, graph, graph, rec, inputs, wanted, root_node, reads, undo, side)
    facts: list[_FactGuard] = []
    if fuse is not False:
        exclude = {graph._names[name] for name in distrusted if name in graph._names}
        fused_graph, why, facts = _fused(graph, loss, inputs, exclude)
        if why:
            notes.append(why)
        elif fused_graph is not graph:
            try:
                fused = _generate(forward, graph, fused_graph, rec, inputs, wanted, root_node, reads, undo, side)
            except NotImplementedError as err:
                notes.append(f"the fused rules could not be compiled ({err}); using the atomic rules")
            else:
                if fuse is True or fused.calls < chosen.calls:
                    chosen = fused
    traced, pairs, source, fn_name, namespace = chosen.traced, chosen.pairs, chosen.source, chosen.name, \
        chosen.namespace
    reached = [n for n, _ in pairs]
    backward_nodes = traced.grads.graph._nodes
    incomplete = {id(backward_nodes[n]["value"]): (backward_nodes[n]["value"], why)
                  for n, why in traced.grads.incomplete.items()}
    for param in params or ():  # a parameter asked for by name whose gradient cannot be complete: say so now
        if incomplete.get(id(param), (None,))[0] is param:
            raise ValueError(f"tg.compile: no gradient for {_param_name(graph, param)}: the loss depends on it "
                             f"through {incomplete[id(param)][1]}: its gradient would be incomplete")
    if params is None and not reached and incomplete:
        tensor, why = next(iter(incomplete.values()))
        raise ValueError(f"tg.compile: the step would compute no gradient: the loss depends on "
                         f"{_param_name(graph, tensor)} through {why}: its gradient would be incomplete")
    if params is None and not reached:
        raise ValueError(_no_parameters(graph, root_node, inputs))
    if params and not reached:
        raise ValueError(f"tg.compile: the loss depends on no tensor in params= ({len(params)} given), so the step "
                         f"would compute no gradient; pass the tensors the forward reads (the very objects, "
                         f"not copies), or params=[] for a step without gradients")
    filename = f"<tg.compile {next(_COUNTER)}: {_title(forward)}>"
    code = builtins.compile(source, filename, "exec")
    exec(code, namespace)  # noqa: S102 - running the generated code is the point
    fn = namespace[fn_name]
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show the line
    last = _last_versions(graph)  # (a parameter clipped in place is named as its last version is: ``W``, not ``W_v0``)
    layout = _Layout([value_of[n] for n in reached], [nodes[last.get(n, n)]["name"] for n in reached])
    layout.incomplete = incomplete
    first_grads = tuple(traced.grads.by_node[b] for _, b in pairs)
    if watched.stored:
        more = len(watched.stored) - 3
        shown = ", ".join(watched.stored[:3]) + (f" and {more} more" if more > 0 else "")
        notes.append(f"the forward stores tensors it computes in attributes ({shown}); the compiled step does not "
                     f"update them: after each call they still hold the recording's values (return what you need "
                     f"from the forward, or use tg.record() to inspect a step)")
    if watched.appended:
        notes.append(f"the forward appends to {', '.join(watched.appended)}; the compiled step does not: it replays "
                     f"torch calls, not Python code, so later calls add nothing to "
                     f"{'it' if len(watched.appended) == 1 else 'them'} (return what you need from the forward and "
                     f"append it outside, or use tg.record())")
    if side.lost:
        notes.append(f"the forward keeps a tensor it computes under torch.no_grad() ({side.lost[0]}) "
                     f"where the compiled step cannot reach it (not in an attribute of the objects it names, up to "
                     f"three levels down, nor in a global or closure variable): later calls do not update it "
                     f"(store it there, or return it from the forward)")
    no_grad = any(value_of[n].requires_grad for n in leaves)
    return _Program(fn, source, layout, graph, watched, (loss, first_grads), notes, fused=chosen.fused,
                    no_grad=no_grad, facts=facts if chosen.fused else [], reads=reads, unchecked=unchecked,
                    changes=changes)


def _checked_reads(rec: _Recording, live: dict[int, Tensor]) -> tuple[list[Read], str | None]:
    """The values the forward read into Python, for the generated step to re-check; or none, and why one of them
    cannot be re-checked (it read a tensor that is no node of the recording: made under ``torch.no_grad()`` ...)."""
    reads = rec.reads.reads
    if not reads:
        return [], None
    frozen = frozen_nodes(rec.graph._nodes, rec.reads, live)
    for read in reads:
        why = read.problem
        if why is None and any(node in frozen for node in read.nodes):
            why = FROZEN
        if why is not None:
            return [], f"the value read at {read.where} cannot be re-checked by the compiled step: {why}"
    return list(reads), None


def _changed_leaves(graph: Graph, versions: dict[int, int], live: dict[int, Tensor]) -> list[int]:
    """The inputs and captured tensors the forward changes in place (a counter, through views too; BatchNorm's
    running statistics): a call whose reads differ puts them back before it runs again by other code."""
    nodes = graph._nodes
    changed = set()
    for node, data in enumerate(nodes):
        if data["kind"] == "leaf":
            tensor = live.get(node, data["value"])
            if tensor._version != versions.get(node, data["version"]):
                changed.add(node)
        elif data["func"] is not None and data["op"] in OPS and OPS[data["op"]].mutates:
            # batch_norm's kernel updates the running statistics without a version bump
            for position in OPS[data["op"]].mutates:
                arg = data["bargs"][position] if position < len(data["bargs"]) else None
                if isinstance(arg, Ref) and nodes[arg.node]["kind"] == "leaf":
                    changed.add(arg.node)
    return sorted(changed)


def _refuse_dicts(inputs: Sequence[Any], prefix: tuple[int, ...] = ()) -> None:
    """Tensors in a dict input would be captured as constants of the generated code: say so at the first call."""
    for index, x in enumerate(inputs):
        if isinstance(x, (list, tuple)):
            _refuse_dicts(x, prefix + (index,))
        elif isinstance(x, Mapping) and next(_tensors(list(x.values())), None) is not None:
            raise TypeError(f"tg.compile: {_place(prefix + (index,))} is a {type(x).__name__} holding tensors; the "
                            f"compiled step follows tensors passed directly or in lists and tuples, not in dicts (it "
                            f"would keep this call's tensors): pass them as arguments, or as a list or tuple")


def _no_parameters(graph: Graph, root: int, inputs: tuple) -> str:
    """Why a step with no gradient at all is refused (an empty ``grads`` would train nothing, silently)."""
    nodes = graph._nodes
    places = _input_places(inputs)
    used = sorted((places[id(nodes[n]["value"])], nodes[n]["name"]) for n in graph.ancestors(root)
                  if nodes[n]["kind"] == "leaf" and is_float(nodes[n]) and id(nodes[n]["value"]) in places)
    names = ", ".join(repr(name) for _, name in used)
    found = (f"the loss depends only on tensors it receives as arguments ({names}), which are data to tg.compile"
             if used else "the loss depends on no floating-point tensor the forward reads")
    return (f"tg.compile: the step would compute no gradient: {found}. Gradients are computed for the tensors the "
            f"forward closes over (its closure, globals or objects); close over the parameters, e.g. "
            f"tg.compile(lambda X, Y: forward(W, X, Y)), or pass params=[] for a step without gradients")


@dataclass
class _Generated:
    traced: BackwardTrace
    pairs: list[tuple[int, int]]  # (parameter's node in the forward graph, in the graph the backward ran on)
    source: str
    name: str
    namespace: dict[str, Any]
    calls: int  # torch calls the step makes: the cost model that decides whether fused rules pay
    fused: bool = False


def _generate(forward: Callable[..., Any], graph: Graph, backward_graph: Graph, rec: _Recording, inputs: tuple,
              wanted: list[int], root: int, reads: Sequence[Read] = (), undo: Sequence[int] = (),
              side: _SidePlan | None = None) -> _Generated:
    """Trace the backward on ``backward_graph`` and print it after ``graph``'s forward, re-checking ``reads``
    (putting the leaves ``undo`` back as they were when one differs) and replaying ``side``'s calls."""
    traced = trace(backward_graph, rec.loss)
    # the parameters' nodes in the graph the backward ran on (a fused graph numbers its nodes anew); a parameter
    # changed in place under no_grad before the loss read it (weight clipping) takes its last version's gradient
    in_backward = {id(d["value"]): n for n, d in enumerate(backward_graph._nodes)
                   if d["kind"] == "leaf" or _is_constant_version(d)}
    last = _last_versions(graph)
    pairs = [(n, in_backward.get(id(graph._nodes[last.get(n, n)]["value"]))) for n in wanted]
    pairs = [(n, b) for n, b in pairs if b is not None and b in traced.grads.by_node]
    generator = _Generator(graph, traced, inputs, [b for _, b in pairs], root, rec.snapshots, reads, undo, side)
    generator.title = _title(forward)
    source, name, namespace = generator.run()
    return _Generated(traced, pairs, source, name, namespace, len(generator.order), backward_graph is not graph)


def _is_constant_version(data: dict[str, Any]) -> bool:
    """Whether a node is the new version of a leaf (or constant) that a call changed in place under no_grad."""
    return data["func"] is None and data["previous"] is not None


def _last_versions(graph: Graph) -> dict[int, int]:
    """Each leaf changed in place under no_grad -> its last version."""
    following = {d["previous"]: n for n, d in enumerate(graph._nodes) if _is_constant_version(d)}
    last = {}
    for node in following:
        if graph._nodes[node]["kind"] == "leaf":
            version = node
            while version in following:
                version = following[version]
            last[node] = version
    return last


def _title(forward: Callable[..., Any]) -> str:
    code = getattr(forward, "__code__", None)
    name = getattr(forward, "__qualname__", None) or getattr(forward, "__name__", None) or type(forward).__name__
    if code is None:
        return name
    return f"{name} ({_where((code.co_filename, code.co_firstlineno))})"


def _fused(graph: Graph, loss: Tensor, inputs: tuple, exclude: set[int]
           ) -> tuple[Graph, str | None, list[_FactGuard]]:
    """The graph with closed-form rules for the chains :mod:`tensorgraph.symbolic` recognises, when it can.

    Returns the graph to run the backward on, why it is the atomic one when fusion failed,
    and the guards of the facts about values its fused rules assume. A chain whose fact is
    about a tensor the step cannot re-check cheaply (computed inside the forward, other than
    ``torch.arange``) is not fused.
    """
    try:
        symbolic = importlib.import_module("tensorgraph.symbolic")
        auto_fuse = getattr(symbolic, "auto_fuse", None)
        if auto_fuse is None:
            return graph, None, []
        while True:
            fused = auto_fuse(graph, loss, exclude=exclude) if exclude else auto_fuse(graph, loss)
            guards, unsafe = _fact_guards(graph, fused, inputs)
            if not unsafe:
                return fused, None, guards
            exclude = exclude | unsafe
    except Exception as err:  # noqa: BLE001 - fusion is an optimisation: without it the atomic rules are exact
        return graph, f"fused rules unavailable ({type(err).__name__}: {err}); using the atomic rules", []


# ops that keep a tensor's elements (their multiset): "no target equals ignore_index" holds for the result
# exactly when it holds for the operand
_SAME_ELEMENTS = frozenset({"view", "reshape", "flatten", "ravel", "contiguous", "clone", "detach", "squeeze",
                            "unsqueeze", "view_as", "reshape_as", "t", "transpose", "permute"})


def _fact_guards(graph: Graph, fused: Graph, inputs: tuple) -> tuple[list[_FactGuard], set[int]]:
    """Guards for the value facts of ``fused``'s fused nodes, and the ops whose facts cannot be guarded."""
    guards: list[_FactGuard] = []
    unsafe: set[int] = set()
    places = _input_places(inputs)
    live = _live_values(graph)
    for data in fused._nodes:
        for fact in data["attrs"].get("assumes", ()) if data["op"] == "fused" else ():
            guard = _fact_guard(graph, fact, places, live)
            if guard is None:
                unsafe.add(fact.op)
            elif isinstance(guard, _FactGuard):
                guards.append(guard)
    return guards, unsafe


def _fact_guard(graph: Graph, fact: Any, places: dict[int, tuple[int, ...]], live: dict[int, Tensor]
                ) -> _FactGuard | bool | None:
    """How to re-check one fact: a guard on an input or a captured tensor, True when the forward's own
    code guarantees it (rows made by ``torch.arange``), None when it cannot be re-checked cheaply."""
    nodes = graph._nodes
    node = fact.tensor
    if fact.kind == "arange":
        data = nodes[node]
        if data["op"] == "arange" and data["kind"] == "constant" and not _refs(data["args"]) and \
                not _refs(list(data["kwargs"].values())):
            return True  # replayed with the same constant arguments on every call
    else:
        while nodes[node]["kind"] == "op" and nodes[node]["op"] in _SAME_ELEMENTS and not nodes[node]["inplace"] \
                and len(set(nodes[node]["inputs"])) == 1:
            node = nodes[node]["inputs"][0]
    data = nodes[node]
    if data["kind"] != "leaf":
        return None
    value = live.get(node, data["value"])
    path = places.get(id(value))
    return _FactGuard(fact, path, value if path is None else None, data["name"], nodes[fact.op]["name"])


def _input_places(inputs: Sequence[Any]) -> dict[int, tuple[int, ...]]:
    """Where each tensor sits among the inputs (by id, its first place): its index, then its index in a list."""
    places: dict[int, tuple[int, ...]] = {}
    for place, tensor in _tensors(inputs):
        places.setdefault(id(tensor), place)
    return places


def _item(inputs: Sequence[Any], path: tuple[int, ...]) -> Any:
    value: Any = inputs
    for index in path:
        value = value[index]
    return value


def _live_values(graph: Graph) -> dict[int, Tensor]:
    """The tensor each leaf is, for leaves the forward changed in place (their recorded value is a copy)."""
    nodes = graph._nodes
    live: dict[int, Tensor] = {}
    for node, _, tensor in graph._live.values():
        while nodes[node]["inplace"] and nodes[node]["previous"] is not None:
            node = nodes[node]["previous"]
        if nodes[node]["kind"] == "leaf" and nodes[node]["value"] is not tensor:
            live[node] = tensor
    return live


@dataclass
class _SidePlan:
    """What the step replays of the forward's ``torch.no_grad()`` work (see :func:`_side_plan`)."""

    calls: list[_SideCall] = field(default_factory=list)
    stores: list[tuple[_Place, int]] = field(default_factory=list)  # a place -> the call whose output it holds
    loads: dict[int, _Place] = field(default_factory=dict)  # leaf -> the place the step reads it from
    lost: list[str] = field(default_factory=list)  # where values were made that end out of the step's reach


def _side_plan(rec: _Recording, forward: Callable[..., Any], value_of: dict[int, Tensor]) -> _SidePlan:
    """The calls made under ``torch.no_grad()``, where their results ended (``self.running_mean = ...``,
    ``global bnmean_running``): the step stores them there, and reads the tensor such a place held before
    from the place at each call instead of capturing it (the step itself rebinds it). A result that outlives
    the forward anywhere else is ``lost``: the step cannot redo that."""
    side = rec.side
    if not side.calls:
        return _SidePlan()
    stores = []
    reached: dict[int, Tensor] = {}
    for place, tensor in _tensor_places(forward).values():
        index = side.index_of(tensor)
        if index is not None:
            stores.append((place, index))
            reached[id(tensor)] = tensor
    leaf_of = {id(value): n for n, value in value_of.items()}
    loads = {}
    for place, _ in stores:
        old = rec.places.get(place.key)
        node = leaf_of.get(id(old[1])) if old is not None else None
        if node is not None and value_of[node] is old[1]:
            loads[node] = place
    alive = [(ref(), index) for ref, index in side.made.values()]
    alive = [(tensor, index) for tensor, index in alive if tensor is not None]
    held = [tensor for tensor, _ in alive] + list(value_of.values())
    kept = {id(t._base) for t in held if t._base is not None}  # a view keeps its base alive
    for read in rec.reads.reads:  # a read the step cannot re-check keeps what it read (it says so itself)
        kept.update(id(t) for t in _flat_tensors((read.args, read.kwargs)))
    lost = [f"{side.calls[index].name!r} at {side.calls[index].where}" for tensor, index in alive
            if id(tensor) not in reached and id(tensor) not in leaf_of and id(tensor) not in kept]
    return _SidePlan(side.calls, stores, loads, lost)


# ---------------------------------------------------------------- code generation


@dataclass
class _Stmt:
    """One torch call of the generated function (a forward node, a backward node, or a saved copy)."""

    func: Any
    args: tuple
    kwargs: dict
    name: str  # preferred variable name
    value: Tensor | None
    output_index: int | None = None
    result: tuple | None = None  # the outputs of a call with several (each output's node has its own copy)
    inplace: bool = False
    previous: int | None = None
    pure: bool = True  # deterministic: may be inlined into its user
    pinned: bool = False  # keeps a variable of its own (a user's name, a gradient, an output)
    backward: bool = False
    mutates: bool = False  # changes an argument (not its first in place: then ``inplace``)


class _Generator:
    """Prints the forward graph and the traced backward as one straight-line Python function."""

    def __init__(self, graph: Graph, traced: BackwardTrace, inputs: tuple, params: list[int], root: int,
                 snapshots: list[tuple[int, int]], reads: Sequence[Read] = (), undo: Sequence[int] = (),
                 side: _SidePlan | None = None) -> None:
        """``params``: the parameters' node ids in ``traced.graph`` (the graph the backward ran on); ``reads``:
        the values the forward read into Python, checked where it read them; ``undo``: the leaves to put back
        when a check fails (memory outliving the step that the step changes in place); ``side``: the calls made
        under ``torch.no_grad()``, replayed where the forward made them, and where their results go."""
        self.graph = graph
        self.fwd = graph._nodes
        self.traced = traced
        self.inputs = inputs
        self.params = params
        self.root = root
        self.snapshots = snapshots
        self.stmts: dict[int, _Stmt] = {}
        self.order: list[int] = []
        self.var: dict[int, str] = {}  # statement or leaf -> variable
        self.namespace: dict[str, Any] = {**printer.NAMESPACE}
        self.used: set[str] = set(self.namespace) | {"tensorgraph"}
        self.leaf_of_input: dict[tuple[int, ...], int] = {}  # where a tensor sits among the inputs -> its leaf
        self.var_alias: dict[int, int] = {}  # a constant version made by a mutating call -> the tensor it changed
        self.consts = 0
        self.title = "forward"
        self.groups: dict[tuple, dict[int, int]] | None = None
        self.live = _live_values(graph)  # leaves the forward changes in place: the tensor itself, not its copy
        self.reads = list(reads)
        self.undo = list(undo)
        self.undo_name = ""  # the variable holding the undo list, when there is one
        self.helpers: dict[str, str] = {}  # a runtime helper (Diverged, same_number ...) -> its name in the namespace
        self.unpacked: set[int] = set()  # the outputs of multi-output calls already emitted
        self.side = side or _SidePlan()
        self.side_key: list[int] = []  # the statement of each call made under no_grad
        self.side_call: dict[int, _SideCall] = {}  # its statement -> the call
        self.extra = itertools.count(-1, -1)  # keys of the statements that are no forward node: saved copies, no_grad
        self.owners: dict[int, str] = {}  # id of an object holding a place the step stores to -> its name
        self.latest_name: dict[int, str] = {}  # a captured tensor changed in place -> the name of its last version

    # ------------------------------------------------------------ assembling the statements

    def run(self) -> tuple[str, str, dict[str, Any]]:
        fn_name = self._unique("step")
        self._forward()
        outputs = self._backward()
        read_nodes = [node for read in self.reads for node in read.nodes]
        needed = self.needed = self._needed([self.root, *outputs, *self._lasting_mutations(), *read_nodes,
                                             *self.undo, *self._side_effects()])
        self.order = [k for k in self.order if k in needed]
        self.uses = self._count_uses(outputs)
        self.position = {k: i for i, k in enumerate(self.order)}
        self._decide_accumulations(self.position)
        self.inlined = self._inlinable()
        args, unpack = self._arguments()
        body = unpack + self._load_lines() + self._undo_line() + self._emit() + self._store_lines()
        grads = ", ".join(self.var[k] for k in outputs)
        lines = [f"def {fn_name}({', '.join(args)}):",
                 f'    """tg.compile of {self.title}: the forward, then the backward, as straight-line torch code."""']
        lines += ["    " + line for line in body]
        lines.append(f"    return {self.var[self.root]}, ({grads}{',' if len(outputs) == 1 else ''})")
        return "\n".join(lines) + "\n", fn_name, self.namespace

    def _forward(self) -> None:
        inputs_by_id = _input_places(self.inputs)
        saved_before: dict[int, list[int]] = {}
        for node, before in self.snapshots:
            saved_before.setdefault(before, []).append(node)
        self.saved: dict[int, int] = {}  # forward node -> statement holding its value before an in-place change
        calls = self.side.calls
        at: dict[int, list[int]] = {}
        for index, call in enumerate(calls):
            at.setdefault(call.position, []).append(index)
        self.side_key = [next(self.extra) for _ in calls]
        for node, data in enumerate([*self.fwd, None]):
            for old in saved_before.get(node, ()):
                key = next(self.extra)
                self.stmts[key] = _Stmt(torch.Tensor.clone, (Ref(old),), {}, self.fwd[old]["name"] + "_saved",
                                        self.fwd[old]["value"])
                self.order.append(key)
                self.saved[old] = key
            for index in at.get(node, ()):
                self._side_statement(index)
            if data is None:  # (calls made under no_grad after the last node)
                break
            if data["kind"] == "leaf":
                index = inputs_by_id.get(id(self.live.get(node, data["value"])))
                if index is not None:
                    self.leaf_of_input.setdefault(index, node)
                continue
            if data["func"] is None:  # a constant version made by a mutating call (running statistics)
                self.var_alias[node] = data["previous"]
                self.latest_name[self._resolve(node)] = data["name"]  # ``counter``, not ``counter_v0``
                continue
            self.stmts[node] = _Stmt(
                data["func"], data["args"], data["kwargs"], data["name"], data["value"], data["output_index"],
                data["result"], data["inplace"], data["previous"], pure=data["kind"] == "op",
                pinned=data["named"] or node == self.root)
            self.order.append(node)

    def _side_statement(self, index: int) -> None:
        """The statement replaying the ``index``-th call made under ``torch.no_grad()``."""
        call = self.side.calls[index]
        key = self.side_key[index]

        def remap(value: Any) -> Any:
            if isinstance(value, _SideRef):
                return Ref(self.side_key[value.node])
            if isinstance(value, (tuple, list)) and any(isinstance(v, (Ref, tuple, list)) for v in value):
                return type(value)(remap(v) for v in value)
            return value

        args = remap(call.args)
        receiver = _refs(args[:1])
        stored = [place for place, i in self.side.stores if i == index]
        name = stored[0].name if stored else call.name
        self.stmts[key] = _Stmt(call.func, args, {k: remap(v) for k, v in call.kwargs.items()}, name,
                                call.value() if call.value is not None else None, call.output_index, call.result,
                                call.inplace, receiver[0] if call.inplace and receiver else None, pure=call.pure,
                                mutates=call.mutates and not call.inplace)
        self.order.append(key)
        self.side_call[key] = call

    def _side_effects(self) -> list[int]:
        """The calls under no_grad the step must make though nothing reads them: updates (``running.mul_(0.9)``,
        ``counter.add_(1)``) and the values the forward stored (``self.running_mean = ...``)."""
        keys = [key for key, call in self.side_call.items() if call.mutates]
        return keys + [self.side_key[index] for _, index in self.side.stores]

    def _backward(self) -> list[int]:
        """Adjoint statements, numbered after the forward's; returns the statements holding the parameters' grads."""
        traced, adj = self.traced, self.traced.adjoint._nodes
        base = len(self.fwd)
        forward_of: dict[int, int] = {}
        value_node = {id(d["value"]): n for n, d in enumerate(self.fwd)}
        for j, data in enumerate(adj):
            if data["kind"] == "leaf":
                node = value_node.get(id(data["value"]))
                if node is None or self.fwd[node]["value"] is not data["value"]:
                    raise NotImplementedError(
                        f"tg.compile: a gradient rule used a tensor ({data['name']!r}) that is neither a forward value "
                        f"nor computed by a recorded torch call; this graph cannot be compiled (use graph.backward)")
                forward_of[j] = self.saved.get(node, node)

        def remap(value: Any) -> Any:
            if isinstance(value, Ref):
                return Ref(forward_of[value.node]) if value.node in forward_of else Ref(base + value.node)
            if isinstance(value, (tuple, list)) and any(isinstance(v, (Ref, tuple, list)) for v in value):
                return type(value)(remap(v) for v in value)
            return value

        bnodes = traced.graph._nodes
        final = {id(g): node for node, g in traced.grads.by_node.items()}
        for j, data in enumerate(adj):
            if data["kind"] == "leaf":
                continue
            if data["func"] is None:
                raise NotImplementedError(f"tg.compile: the backward pass changed {data['name']!r} in a way that was "
                                          f"not recorded; use graph.backward")
            grad_of = final.get(id(data["value"]))
            named = grad_of is not None and data["name"].startswith("d") and (
                bnodes[grad_of]["named"] or grad_of in self.params)
            args = remap(data["args"])
            kwargs = {k: remap(v) for k, v in data["kwargs"].items()}
            self.stmts[base + j] = _Stmt(
                data["func"], args, kwargs, data["name"], data["value"], data["output_index"], data["result"],
                data["inplace"], None if data["previous"] is None else remap(Ref(data["previous"])).node,
                pure=True, pinned=named, backward=True)
            self.order.append(base + j)
        outputs = []
        for node in self.params:
            j = traced.node_of(traced.grads.by_node[node])
            if j is None:
                raise NotImplementedError(f"tg.compile: the gradient of {bnodes[node]['name']!r} was not computed "
                                          f"by recorded torch calls")
            key = forward_of.get(j, base + j)
            outputs.append(key)
        self._accumulations(base)
        return outputs

    def _accumulations(self, base: int) -> None:
        """Mark the fan-out sums ``total + branch`` that may add in place: ``dX += branch``."""
        self.accumulate: dict[int, int] = {}  # add statement -> the statement it adds into
        for step in self.traced.steps:
            if step.first:
                continue
            j = self.traced.node_of(step.total)
            if j is not None:
                self.accumulate[base + j] = -1  # candidates; decided once uses are known

    # ------------------------------------------------------------ analysis

    def _lasting_mutations(self) -> list[int]:
        """In-place forward statements on memory that outlives the step (an input's, a captured tensor's, their
        views'): ``counter.add_(1)``, ``num_batches_tracked``. Kept even when nothing downstream reads them."""
        lasting = set()
        for node, data in enumerate(self.fwd):
            if data["kind"] == "leaf":
                value = self.live.get(node, data["value"])
                if value.numel():
                    lasting.add(value.untyped_storage().data_ptr())
        return [key for key in self.order if key >= 0 and self.stmts[key].inplace and not self.stmts[key].backward
                and self.stmts[key].value is not None and self.stmts[key].value.numel()
                and self.stmts[key].value.untyped_storage().data_ptr() in lasting]

    def _needed(self, outputs: list[int]) -> set[int]:
        needed: set[int] = set()
        stack = list(outputs)
        while stack:
            key = stack.pop()
            if key in needed:
                continue
            needed.add(key)
            key = self._resolve(key)
            needed.add(key)
            stmt = self.stmts.get(key)
            if stmt is None:
                continue
            stack.extend(_refs(stmt.args))
            stack.extend(_refs(list(stmt.kwargs.values())))
            if stmt.result is not None:  # every output of a multi-output call comes from the same call
                stack.extend(self._siblings(key))
        return needed

    def _siblings(self, key: int) -> list[int]:
        return [k for k in self._group(key).values() if k != key]

    def _group(self, key: int) -> dict[int, int]:
        """The statements of every output of one multi-output call, by output index."""
        if self.groups is None:
            self.groups = {}
            for k, s in self.stmts.items():
                if s.result is not None:
                    self.groups.setdefault(_call_id(s.result), {})[s.output_index] = k
        return self.groups[_call_id(self.stmts[key].result)]

    def _resolve(self, key: int) -> int:
        alias = self.var_alias
        while key in alias:
            key = alias[key]
        return key

    def _count_uses(self, outputs: list[int]) -> Counter:
        uses: Counter = Counter()
        for key in self.order:
            stmt = self.stmts[key]
            for ref in _refs(stmt.args) + _refs(list(stmt.kwargs.values())):
                uses[self._resolve(ref)] += 1
        for key in outputs + [self.root]:
            uses[self._resolve(key)] += 2  # an output is never inlined or changed in place
        for read in self.reads:
            for node in read.nodes:
                uses[self._resolve(node)] += 2  # a checked value gets a variable of its own
        for _, index in self.side.stores:
            uses[self.side_key[index]] += 2  # stored at the end: a variable of its own
        return uses

    def _inlinable(self) -> set[int]:
        """Statements printed inside their single user's expression instead of on a line of their own; not one
        whose expression already nests :data:`printer.MAX_NESTING` calls (a long chain gets a variable every so
        many levels, so that the code compiles and printing it recurses no deeper)."""
        position = self.position
        users: dict[int, int] = {}
        for key in self.order:
            stmt = self.stmts[key]
            for ref in _refs(stmt.args) + _refs(list(stmt.kwargs.values())):
                users[self._resolve(ref)] = key
        # in-place statements, the fan-out sums made in place included: nothing is inlined across one
        mutations = sorted({position[k] for k in self.order if self.stmts[k].inplace or self.stmts[k].mutates} |
                           {position[k] for k in self.accumulate})
        inlined: set[int] = set()
        nesting: dict[int, int] = {}  # an inlined statement -> how many calls its expression nests
        for key in self.order:
            stmt = self.stmts[key]
            depth = 1 + max((nesting.get(self._resolve(ref), 0) for ref in _refs(stmt.args) +
                             _refs(list(stmt.kwargs.values()))), default=0)
            if depth >= printer.MAX_NESTING:
                continue
            if (stmt.pinned or not stmt.pure or stmt.inplace or stmt.result is not None or self.uses[key] != 1
                    or key in self.accumulate_targets or key in self.saved.values()):
                continue
            user = users.get(key)
            if user is None:
                continue
            after = bisect.bisect_right(mutations, position[key])
            if after < len(mutations) and mutations[after] < position[user]:
                continue  # something in between changes memory in place: keep the order
            user_stmt = self.stmts[user]
            if user_stmt.inplace and _refs(user_stmt.args[:1]) == [key] and not _method_inplace(user_stmt):
                continue  # ``x += y`` and ``x[i] = v`` need x to be a variable
            inlined.add(key)
            nesting[key] = depth
        return inlined

    def _decide_accumulations(self, position: dict[int, int]) -> None:
        """Which fan-out sums add into their first operand in place (see :func:`_may_add_into`)."""
        candidates = self.accumulate
        self.accumulate = {}
        self.accumulate_targets: set[int] = set()
        storage: dict[int, list[int]] = {}
        for key in self.order:
            value = self.stmts[key].value
            if isinstance(value, Tensor) and value.numel():
                storage.setdefault(value.untyped_storage().data_ptr(), []).append(key)
        for node, data in enumerate(self.fwd):
            value = data["value"]
            if isinstance(value, Tensor) and value.numel():
                storage.setdefault(value.untyped_storage().data_ptr(), []).append(node)
        for key in candidates:
            if key not in position:
                continue
            stmt = self.stmts[key]
            refs = _refs(stmt.args)
            if len(refs) != 2 or stmt.kwargs:
                continue
            target = self._resolve(refs[0])
            if self._may_add_into(target, stmt, storage):
                self.accumulate[key] = target
                self.accumulate_targets.add(target)
        for key in self.accumulate:  # the first branch's variable takes the name of the finished sum: dh
            if key in self.accumulate_targets:
                continue
            first = self.accumulate[key]
            while first in self.accumulate:
                first = self.accumulate[first]
            self.stmts[first].name = self.stmts[key].name

    def _may_add_into(self, target: int, add: _Stmt, storage: dict[int, list[int]]) -> bool:
        """``total + branch`` may become ``total += branch`` when nothing else can see ``total``'s memory."""
        stmt = self.stmts.get(target)
        if stmt is None or not stmt.backward or self.uses[target] != 1 or stmt.result is not None:
            return False
        value, out = stmt.value, add.value
        if value is None or out is None or value.shape != out.shape or value.dtype != out.dtype:
            return False
        if value._base is not None or 0 in value.stride():
            return False
        chain = {target}
        current = stmt
        while current.inplace and current.previous is not None:  # torch.zeros_like(x).index_put_(...)
            if self.uses[current.previous] != 1:
                return False
            chain.add(current.previous)
            current = self.stmts.get(current.previous)
            if current is None:
                return False
        sharing = set(storage.get(value.untyped_storage().data_ptr(), ()))
        return sharing <= chain

    # ------------------------------------------------------------ printing

    def _arguments(self) -> tuple[list[str], list[str]]:
        """The function's parameters, and the lines taking the tensors out of list and tuple inputs."""
        names = []
        for index in range(len(self.inputs)):
            leaf = self.leaf_of_input.get((index,))
            if leaf is not None and leaf not in self.var:
                name = self._unique(identifier(self.fwd[leaf]["name"]))
                self.var[leaf] = name
            else:
                name = self._unique(f"_input{index}")
            names.append(name)
        unpack = []
        for path, leaf in self.leaf_of_input.items():
            if len(path) > 1 and leaf not in self.var and leaf in self.needed:
                self.var[leaf] = self._unique(identifier(self.fwd[leaf]["name"]))
                unpack.append(f"{self.var[leaf]} = {names[path[0]]}{''.join(f'[{i}]' for i in path[1:])}")
        return names, unpack

    def _emit(self) -> list[str]:
        lines: list[str] = []
        section = None
        checks = list(reversed(range(len(self.reads))))  # in the order the forward read them (their positions too)
        end = len(self.fwd)
        where = None
        for key in self.order:
            stmt = self.stmts[key]
            if stmt.backward != section:
                if stmt.backward:
                    lines.extend(self._checks(checks, end))
                section = stmt.backward
                lines.append("# backward" if section else "# forward")
            if key >= 0 and not stmt.backward:
                lines.extend(self._checks(checks, key))  # where the forward read the values: before this node
            call = self.side_call.get(key)
            if call is not None:
                lines.extend(self._checks(checks, call.position, call.reads))  # the reads made before this call
            if key in self.inlined:
                continue
            if call is not None and call.where != where:
                where = call.where
                lines.append(f"# under torch.no_grad() at {where.split(' (', 1)[0]}: replayed")
            elif key >= 0:
                where = None
            if stmt.result is not None:
                lines.extend(self._emit_multi(key))
                continue
            if key in self.accumulate:
                target = self.accumulate[key]
                branch = self._branch(_refs(stmt.args)[1], stmt)
                lines.append(f"{self._name(target)} += {branch.text}")
                self.var[key] = self._name(target)
                continue
            if stmt.inplace:
                receiver = _refs(stmt.args[:1])
                if receiver and receiver[0] not in self.inlined:
                    # ``x += y`` would make a captured tensor (a name of the namespace) a local: x.add_(y)
                    captured = self._name(receiver[0]) in self.namespace
                    code = self._call(stmt, statement=not captured or printer._name_of(stmt.func) == "__setitem__")
                    lines.append(code.text)
                    self.var[key] = self._name(receiver[0])
                    continue
            target = self._new_name(key)
            lines.append(f"{target} = {self._call(stmt).text}")
        lines.extend(self._checks(checks, end))  # (a step without a backward)
        return lines

    def _checks(self, pending: list[int], before: int, count: int | None = None) -> list[str]:
        """The checks of the reads made before node ``before`` was recorded (taken from the end of ``pending``);
        with ``count``, only of the first ``count`` reads (those made before a call under no_grad)."""
        lines: list[str] = []
        while pending and self.reads[pending[-1]].position <= before and (count is None or pending[-1] < count):
            index = pending.pop()
            lines.extend(self._check(index, self.reads[index]))
        return lines

    def _check(self, index: int, read: Read) -> list[str]:
        """``if bool(gt_1) is not True:  # file:line (code)`` then ``raise Diverged(index, bool(gt_1))``."""
        undo = f", {self.undo_name}" if self.undo_name else ""
        expr = self._read_expr(read) if read.by_value else None
        if expr is None:  # a list, an array, a string: the tensors it read hold the recording's bytes
            saved = self._unique(f"_read{index}")
            self.namespace[saved] = read.saved
            tensors = "".join(f"{self._expr(node).text}, " for node in read.nodes)
            condition = f"not {self._helper('same_bytes', same_bytes)}(({tensors}), {saved})"
            value = "None"
        elif type(read.value) is bool:
            condition, value = f"{expr} is not {read.value!r}", expr
        elif is_simple_number(read.value):
            condition, value = f"{expr} != {read.value!r}", expr
        else:  # NaN, inf, a zero (its sign), a complex number
            expected = self._unique(f"_read{index}")
            self.namespace[expected] = read.value
            condition, value = f"not {self._helper('same_number', same_number)}({expr}, {expected})", expr
        return [f"if {condition}:  # {read.where}",
                f"    raise {self._helper('Diverged', Diverged)}({index}, {value}{undo})"]

    def _read_expr(self, read: Read) -> str | None:
        """The read as code (``bool(gt_1)``, ``std_1.item()``), or None when the printer cannot spell it."""
        name = printer._name_of(read.func)
        if name in _BUILTIN_READS and len(read.args) == 1 and not read.kwargs and isinstance(read.args[0], Ref):
            return f"{_BUILTIN_READS[name]}({self._expr(read.args[0].node).text})"
        try:
            return self._call(_Stmt(read.func, read.args, read.kwargs, "read", None)).text
        except ValueError:
            return None

    def _helper(self, name: str, value: Any) -> str:
        """The namespace name of a runtime helper of the checks."""
        if name not in self.helpers:
            self.helpers[name] = self._unique(f"_{name}")
            self.namespace[self.helpers[name]] = value
        return self.helpers[name]

    def _undo_line(self) -> list[str]:
        """``_undo = ((counter, counter.clone()), ...)``: what a failing check puts back (see :class:`Diverged`)."""
        if not self.reads or not self.undo:
            return []
        self.undo_name = self._unique("_undo")
        pairs = "".join(f"({name}, {name}.clone()), " for name in (self._name(node) for node in self.undo))
        return [f"{self.undo_name} = ({pairs.rstrip()})  # changed in place below: put back if a read differs"]

    def _load_lines(self) -> list[str]:
        """``bnmean_running = _globals['bnmean_running']``: the tensors the step rebinds (a running statistic
        rebound under no_grad) are read from their places at each call, not captured."""
        lines = []
        for node, place in self.side.loads.items():
            if node in self.needed:
                self.var[node] = self._unique(identifier(self.latest_name.get(node, self.fwd[node]["name"])))
                lines.append(f"{self.var[node]} = {self._place(place)}  # rebound under torch.no_grad() below")
        return lines

    def _store_lines(self) -> list[str]:
        """``layers_1.running_mean = running_mean``: where the forward left what it computed under no_grad;
        at the end, when no check can fail any more (nothing to put back)."""
        return [f"{self._place(place)} = {self._name(self.side_key[index])}" for place, index in self.side.stores]

    def _place(self, place: _Place) -> str:
        """The place as code: ``layers_1.running_mean``, ``_globals['bnmean_running']``, ``_cell.cell_contents``."""
        if place.kind == "global":
            return f"{self._helper('globals', place.owner)}[{place.name!r}]"
        owner = self._owner(place)
        return f"{owner}.{place.name if place.kind == 'attr' else 'cell_contents'}"

    def _owner(self, place: _Place) -> str:
        """The namespace name of the object (or closure cell) holding a place: ``layers[1]`` is ``layers_1``."""
        owners = self.owners
        if id(place.owner) not in owners:
            base = place.path.rsplit(".", 1)[0] if place.kind == "attr" else f"{place.name}_cell"
            owners[id(place.owner)] = name = self._unique(identifier(base))
            self.namespace[name] = place.owner
        return owners[id(place.owner)]

    def _emit_multi(self, key: int) -> list[str]:
        stmt = self.stmts[key]
        if key in self.var or key in self.unpacked:  # already unpacked with a sibling (an unread one gets no name)
            return []
        group = {i: k for i, k in self._group(key).items() if k in self.needed}
        self.unpacked.update(group.values())
        unread = {i for i, k in group.items() if not self.uses[self._resolve(k)]}
        if unread and printer._name_of(stmt.func) in _OUTPUT_MASKED:
            stmt = self._masked(stmt, unread)
        targets = []
        for index in range(len(stmt.result)):
            k = group.get(index)
            targets.append(self._new_name(k) if k is not None and index not in unread else "_")
        unpack = ", ".join(targets) + ("," if len(targets) == 1 else "")  # (x.split(n) of n elements: a 1-tuple)
        return [f"{unpack} = {self._call(stmt).text}"]

    @staticmethod
    def _masked(stmt: _Stmt, unread: set[int]) -> _Stmt:
        """The call with ``output_mask`` off for the outputs nothing reads (the data's gradient of a first
        convolution layer): the kernel skips that work, and the other outputs are unchanged."""
        mask = stmt.args[-1]
        if not (isinstance(mask, (list, tuple)) and len(mask) == len(stmt.result)
                and all(type(m) is bool for m in mask)):
            return stmt
        mask = [m and i not in unread for i, m in enumerate(mask)]
        return replace(stmt, args=(*stmt.args[:-1], mask))

    def _branch(self, key: int, add: _Stmt) -> Expr:
        """The added branch; ``g.expand(shape)`` is just ``g`` in ``dx += g`` (in-place addition broadcasts)."""
        key = self._resolve(key)
        stmt = self.stmts.get(key)
        if stmt is not None and key in self.inlined and printer._name_of(stmt.func) in ("expand", "expand_as"):
            inner = _refs(stmt.args[:1])
            if inner:
                return self._expr(inner[0])
        return self._expr(key)

    def _call(self, stmt: _Stmt, statement: bool = False) -> Expr:
        args = self._constants(stmt.args)
        kwargs = {k: self._constants(v) for k, v in stmt.kwargs.items()}
        self._import_for(stmt.func)
        return printer.call(stmt.func, args, kwargs, self._expr, statement=statement)

    def _expr(self, key: Any) -> Expr | str:
        if isinstance(key, str):  # a _ConstRef
            return Expr(key)
        key = self._resolve(key)
        if key in self.inlined:
            return self._call(self.stmts[key])
        return Expr(self._name(key))

    def _name(self, key: int) -> str:
        key = self._resolve(key)
        if key not in self.var:
            if key in self.stmts:  # a statement used before it was printed cannot happen in a topological order
                raise AssertionError(f"tg.compile: statement {key} used before it is computed")
            data = self.fwd[key]  # a leaf the forward closes over: a parameter or a constant
            name = self._unique(identifier(self.latest_name.get(key, data["name"])))
            self.namespace[name] = self.live.get(key, data["value"])
            self.var[key] = name
        return self.var[key]

    def _new_name(self, key: int) -> str:
        stmt = self.stmts[key]
        name = self._unique(identifier(stmt.name))
        self.var[key] = name
        return name

    def _unique(self, name: str) -> str:
        return unique_name(name, self.used)

    def _constants(self, value: Any) -> Any:
        """Arguments printed code cannot spell (a generator, a numpy array) become names in the namespace."""
        if isinstance(value, Ref):
            return value
        if isinstance(value, (tuple, list)):
            items = [self._constants(v) for v in value]
            return type(value)(items) if not isinstance(value, torch.Size) else torch.Size(items)
        try:
            printer.literal(value)
            return value
        except ValueError:
            self.consts += 1
            name = self._unique(f"_const{self.consts}")
            self.namespace[name] = value
            return _ConstRef(name)  # type: ignore[arg-type]

    def _import_for(self, func: Any) -> None:
        """Make the module a printed function name starts with available to the generated code."""
        try:
            qualified = printer.qualified_name(func)
        except ValueError:
            return
        root = qualified.split(".")[0]
        if root not in self.namespace and not printer._is_method(func) and not printer._is_property(func):
            try:
                self.namespace[root] = importlib.import_module(root)
            except ImportError:
                pass


class _ConstRef(Ref):
    """An argument printed code cannot spell (a generator, a numpy array): a name bound in the namespace.

    A :class:`Ref` whose ``node`` is that name, so the printer hands it to the namer.
    """

    __slots__ = ()


def _refs(value: Any) -> list[int]:
    """The nodes of the tensor arguments in ``value`` (not the names of :class:`_ConstRef`)."""
    return [ref.node for ref in refs_in(value) if not isinstance(ref, _ConstRef)]


# reads printed as the builtins that make them: bool(t), not t.__bool__()
_BUILTIN_READS = {"__bool__": "bool", "__int__": "int", "__float__": "float", "__complex__": "complex"}

# aten backward kernels whose last argument says which of their outputs to compute
_OUTPUT_MASKED = frozenset({"convolution_backward", "native_layer_norm_backward", "native_batch_norm_backward",
                            "native_group_norm_backward"})


def _call_id(result: tuple) -> tuple[int, ...]:
    return tuple(id(t) for t in result)


def _method_inplace(stmt: _Stmt) -> bool:
    """In-place methods with an expression form (``t.index_put_(...)`` returns t); not ``x += y``, ``x[i] = v``."""
    name = printer._name_of(stmt.func)
    return name.endswith("_") and not name.startswith("__") and name not in ("add_", "sub_", "mul_", "div_")
