"""The tensor values a compiled forward reads into Python, and the checks that re-read them at every call.

A tracing compiler replays torch calls, not Python: in ::

    h = x @ W
    if h.sum() > 0:          # bool(h.sum() > 0): Python reads a tensor value
        return (h * 2).sum()
    return (h * -3).sum()

the branch is decided once, at the recording. ``tg.compile`` therefore notes every call that
reads tensor values into Python (``bool(t)``, ``t.item()``, ``int(t)``, ``float(t)``,
``t.tolist()``, ``t.numpy()``, ``print(t)`` ...: the recorder's ``_VALUE_READS``): where it
happened, which recorded tensors it read, and what Python got. The generated step makes the
same read at the same point of the forward and compares: a bool, int, float or complex result
by value (a NaN equals a NaN, ``-0.0`` is not ``0.0``), anything else (a list, a numpy array, a
string) by the bytes of the tensors it read. A read that differs raises :class:`Diverged`
before the step returns anything; the step then runs that call by another recorded version,
a new recording, or the engine (see :mod:`tensorgraph.compiler`). The size of an output that
depends on values (``x.masked_select(mask)``, ``x[mask]``, ``nonzero``, ``unique`` ...) is such a
read too (``out.numel()``): the step's code holds the recording's shapes.

A read cannot be checked when what it read is no node of the recording: a tensor computed under
``torch.no_grad()`` inside the forward (the step replays such work, but its checks re-read
recorded nodes only), or returned by a call the recorder did not record. Such a read is kept
with the reason (``problem``).
"""

from __future__ import annotations

import linecache
import math
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .graph import Ref
from .record import _VALUE_READS, _Bookkeeping, _busy, _is_internal, _where

_NUMBERS = (bool, int, float, complex)  # results compared by value; anything else by the tensors read


@dataclass
class Read:
    """One call of the forward that read tensor values into Python, as recorded."""

    func: Any  # Tensor.__bool__, Tensor.item, torch.equal ...
    args: tuple  # the call's arguments, tensors as Refs to their nodes
    kwargs: dict
    nodes: list[int]  # the nodes it read, in argument order
    position: int  # how many nodes the graph had: the check goes before the statement of this node
    where: str  # the user's file:line and code
    value: Any  # the Python result when it is a number (by_value), else None
    by_value: bool  # a bool, int, float or complex result: checked by value, else by the bytes of the tensors read
    saved: tuple[Tensor, ...] = ()  # the bytes of the tensors it read
    problem: str | None = None  # why the compiled step cannot re-check it

    def agrees(self, other: Read) -> bool:
        """The same read at the same place giving the same result (a version's reads, compared with another's)."""
        return (self.where == other.where and self.func is other.func and self.by_value == other.by_value
                and (same_number(self.value, other.value) if self.by_value else
                     len(self.saved) == len(other.saved) and all(map(torch.equal, self.saved, other.saved))))

    def admits(self, value: Any) -> bool:
        """Whether this read's recorded result is ``value`` (a value a check found; None: not known)."""
        return value is None or not self.by_value or same_number(self.value, value)

    def change(self, value: Any) -> str:
        """What changed, for a warning: ``the value read at file:line (if h.sum() > 0:) is now False (the
        recording read True)``."""
        read = f"the value read at {self.where}"
        if self.func is Tensor.numel and not self.kwargs:  # (see ReadWatcher._note_sizes)
            read = f"the count of elements selected at {self.where}"
        if self.by_value and value is not None:
            return f"{read} is now {value!r} (the recording read {self.value!r})"
        return f"{read} changed"


class Diverged(Exception):  # a signal, not an error: it never reaches the user
    """Raised by generated code when a read differs from the recording's, before the step returns anything.

    ``undo`` holds (tensor, its value at the start of the call) for memory outliving the step that the
    step had already changed in place (BatchNorm's running statistics, a counter): :meth:`restore` puts it back.
    """

    def __init__(self, index: int, value: Any = None, undo: tuple = ()) -> None:
        super().__init__(index)
        self.index = index
        self.value = value
        self.undo = undo

    def restore(self) -> None:
        """Put the memory in ``undo`` back as it was at the start of the call."""
        with torch.no_grad():
            for tensor, before in self.undo:
                tensor.copy_(before)


def same_number(now: Any, then: Any) -> bool:
    """Python numbers equal as Python code can tell: a NaN equals a NaN, ``-0.0`` is not ``0.0``, types match."""
    if type(now) is not type(then):
        return False
    if isinstance(now, complex):
        return same_number(now.real, then.real) and same_number(now.imag, then.imag)
    if isinstance(now, float):
        if now != now:  # a NaN
            return then != then
        return now == then and math.copysign(1.0, now) == math.copysign(1.0, then)
    return now == then


def tensor_bytes(tensor: Tensor) -> Tensor:
    """A tensor's values as bytes (a copy): equal bytes, equal values for any dtype, NaN and -0.0 included."""
    return tensor.detach().reshape(-1).view(torch.uint8).clone()


def same_bytes(tensors: tuple[Tensor, ...], saved: tuple[Tensor, ...]) -> bool:
    """Whether each tensor holds the bytes saved from the recording's."""
    for tensor, then in zip(tensors, saved):
        flat = tensor.detach().reshape(-1)
        if flat.numel() * flat.element_size() != then.numel() or not torch.equal(flat.view(torch.uint8), then):
            return False
    return True


def is_simple_number(value: Any) -> bool:
    """A number whose ``repr`` is a Python literal that ``!=`` compares exactly (no NaN, inf or zero)."""
    if type(value) is bool or type(value) is int:
        return True
    return type(value) is float and math.isfinite(value) and value != 0.0


# ---------------------------------------------------------------- recording the reads


class ReadWatcher(TorchFunctionMode):
    """Above the recorder: notes each call that reads tensor values into Python, with what it read and got.

    It also notes what the compiled step does not replay, whose values it would keep forever: the tensors
    torch calls returned that the recorder did not record (computed under ``torch.no_grad()``), and the
    nodes made by updates under ``torch.no_grad()``. A read of them, or of anything computed from them,
    cannot be checked (see :func:`frozen_nodes`).
    """

    def __init__(self, recorder: Any) -> None:
        super().__init__()
        self.recorder = recorder  # the record module's _Recorder mode below this one
        self.reads: list[Read] = []
        # id -> a tensor a call returned that has no node; weakly held, so that the compiler can tell which of
        # them outlive the forward (a dead one's id may be reused: the reference then no longer gives the tensor)
        self.unrecorded: dict[int, weakref.ref] = {}
        self.untracked: set[int] = set()  # nodes made by calls under torch.no_grad() (not replayed)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        nodes = self.recorder.graph._nodes
        before = len(nodes)
        result = func(*args, **kwargs)
        if _busy():
            return result
        if len(nodes) != before and self.recorder.grad_at_entry and not torch.is_grad_enabled():
            self.untracked.update(n for n in range(before, len(nodes)) if nodes[n]["kind"] != "leaf")
        name = getattr(func, "__name__", None)
        if name in _VALUE_READS:
            self._note(func, args, kwargs, result)
            return result
        if _value_shaped(name, args, kwargs):
            self._note_sizes(result)
        if isinstance(result, (Tensor, tuple, list)):
            live = self.recorder.graph._live
            for out in (result,) if isinstance(result, Tensor) else result:
                if isinstance(out, Tensor) and id(out) not in live and not any(out is a for a in args):
                    # (an input returned as is, x.to(x.dtype), is no new value)
                    self.unrecorded[id(out)] = weakref.ref(out)
        return result

    def _note(self, func: Any, args: tuple, kwargs: dict, result: Any) -> None:
        where = user_line()
        nodes: list[int] = []
        tensors: list[Tensor] = []
        saved: tuple[Tensor, ...] = ()
        problem = None
        with _Bookkeeping():
            try:
                call_args = tuple(self._refs(a, nodes, tensors) for a in args)
                call_kwargs = {k: self._refs(v, nodes, tensors) for k, v in kwargs.items()}
                saved = tuple(tensor_bytes(t) for t in tensors)
            except _Unrepeatable as err:
                call_args, call_kwargs, problem = args, kwargs, str(err)
            except Exception as err:  # noqa: BLE001 - a read the step cannot repeat: every call goes to the engine
                call_args, call_kwargs, problem = args, kwargs, f"{type(err).__name__}: {err}"
        by_value = type(result) in _NUMBERS
        self.reads.append(Read(func, call_args, call_kwargs, nodes, len(self.recorder.graph._nodes), where,
                               result if by_value else None, by_value, saved, problem))

    def _note_sizes(self, result: Any) -> None:
        """A call whose output's size depends on its inputs' values (``x.masked_select(x > 0)``, ``x[mask]``): its
        size (``out.numel()``) is a read, so that a call with another count of selected elements never runs code
        written for the recording's (its shapes are printed into the step as numbers)."""
        live = self.recorder.graph._live
        for out in (result,) if isinstance(result, Tensor) else result if isinstance(result, (tuple, list)) else ():
            if isinstance(out, Tensor) and id(out) in live:
                self._note(Tensor.numel, (out,), {}, out.numel())

    def _refs(self, value: Any, nodes: list[int], tensors: list[Tensor]) -> Any:
        """Tensors (top level or in lists and tuples) as Refs to the nodes of their current versions."""
        if isinstance(value, Tensor):
            node = self._node(value)
            nodes.append(node)
            tensors.append(value)
            return Ref(node)
        if isinstance(value, (list, tuple)) and any(isinstance(v, (Tensor, list, tuple)) for v in value):
            return type(value)(self._refs(v, nodes, tensors) for v in value)
        return value

    def _node(self, tensor: Tensor) -> int:
        recorder = self.recorder
        live = recorder.graph._live.get(id(tensor))
        if live is not None and live[2] is tensor:
            if tensor._version != live[1] or id(tensor) in recorder.view_written:
                raise _Unrepeatable("it reads a tensor changed in place by an operation tensorgraph did not see")
            return live[0]
        if _holds(self.unrecorded, tensor):
            raise _Unrepeatable(FROZEN)
        return recorder._node_of(tensor, check=False)  # a tensor from outside the forward: a new leaf


# calls whose output's size depends on the values of their inputs (not only on their shapes)
_VALUE_SHAPED = frozenset({"masked_select", "nonzero", "argwhere", "unique", "_unique", "_unique2", "unique_dim",
                           "unique_consecutive", "bincount"})


def _value_shaped(name: str | None, args: tuple, kwargs: dict) -> bool:
    """Whether the call's output size depends on tensor values: a selection (``masked_select``, ``nonzero``,
    ``unique`` ...), a boolean-mask index (``x[mask]``), ``torch.where(cond)``, tensor ``repeats``."""
    if name in _VALUE_SHAPED:
        return True
    if name == "__getitem__" and len(args) == 2:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in index)
    if name == "where":
        return len(args) + len(kwargs) == 1
    if name == "repeat_interleave":
        return any(isinstance(a, Tensor) for a in (*args[1:], *kwargs.values()))
    return False


class _Unrepeatable(Exception):
    """A read the compiled step cannot make again (its message says why)."""


FROZEN = ("it reads a tensor computed under torch.no_grad() inside the forward (or by a call tensorgraph does not "
          "record), which the compiled step's checks cannot re-read")


def _holds(refs: dict[int, weakref.ref], tensor: Tensor) -> bool:
    """Whether ``refs`` holds a weak reference to this very tensor (by id, then identity)."""
    ref = refs.get(id(tensor))
    return ref is not None and ref() is tensor


def user_line() -> str:
    """``file:line (code)`` of the user's frame that made the current call."""
    frame = sys._getframe(1)
    while frame is not None and _is_internal(frame.f_code):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    where = _where((frame.f_code.co_filename, frame.f_lineno))
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"{where} ({line})" if line else where


def frozen_nodes(nodes: list[dict[str, Any]], watcher: ReadWatcher, live: dict[int, Tensor]) -> set[int]:
    """The nodes whose values the compiled step does not recompute from its inputs and captured tensors: leaves
    made inside the forward by calls the recorder did not record, nodes of ``torch.no_grad()`` updates, and
    everything computed from them. ``live``: the tensor each leaf changed in place is (see the compiler)."""
    frozen = set(watcher.untracked)
    unrecorded = watcher.unrecorded
    for node, data in enumerate(nodes):
        if data["kind"] == "leaf":
            value = live.get(node, data["value"])
            if _holds(unrecorded, value):
                frozen.add(node)
        elif any(i in frozen for i in data["inputs"]) or data["previous"] in frozen:
            frozen.add(node)
    return frozen
