"""Recording: intercept every torch call in a ``with tg.record()`` block into a Graph.

The recorder is a ``TorchFunctionMode``: operators, Tensor methods, ``torch.*`` and
``torch.nn.functional.*`` all reach it as one call each. Every call that returns a tensor
becomes a node holding the op, its arguments (tensors replaced by :class:`Ref` to their
nodes), the value, and the user's file:line. Tensors seen for the first time become leaves.
At the end of the block, nodes are named after the variables that hold them.

In-place ops make a new version of their tensor; the old version keeps a copy of the
value it had, so rules that need it (tanh needs its output) still get it right. A tensor
changed behind the recorder's back (through a view, ``.data``, or after recording) is
caught by torch's version counter and reported, never used silently.
"""

from __future__ import annotations

import inspect
import linecache
import math
import os
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import replay as _replay
from . import rules  # noqa: F401  (fills the op table)
from .attention import multi_head_attention, refused_argument
from .engine import NO_STAMPS, LeafStamps
from .graph import Graph, Ref, _short_path, substitute
from .naming import StoredValues
from .ops import FUNCS, OPS, Op, UnsupportedCall, func_name, lookup

_NO_SEQUENCE = 1 << 62  # (a torch without the counter: nothing counts as made in the block)
_sequence_nr = getattr(torch._C._autograd, "_get_sequence_nr", lambda: _NO_SEQUENCE)


def made_in_block(tensor: Tensor, sequence_at_entry: int) -> bool:
    """Whether autograd made this tensor's grad_fn after the block began (it is not a leaf made before)."""
    grad_fn = tensor.grad_fn
    return grad_fn is not None and grad_fn._sequence_nr() >= sequence_at_entry


class _State(threading.local):
    """Per-thread recorder state. Class-level defaults: a missing attribute would make every getattr raise."""

    busy = False  # a recorder of this thread is doing its own bookkeeping
    scope: tuple[str, ...] = ()  # the tg.scope() names around the current op


_state = _State()
_TORCH_DIR = os.path.dirname(torch.__file__)
_PACKAGE_DIR = os.path.dirname(__file__)
_USER_SUBPACKAGES = (os.path.join(_PACKAGE_DIR, "makemore"), os.path.join(_PACKAGE_DIR, "lecture.py"))
_internal_code: dict[Any, bool] = {}
# the dropouts, recorded as input * mask (+ shift, for alpha dropout) with the mask a constant: by function, whether it
# drops whole channels, whether it is alpha dropout, and the rank of an unbatched input (one sample) if it takes one
_DROPOUT = {
    torch.nn.functional.dropout: (False, False, None), torch.dropout: (False, False, None),
    torch.nn.functional.dropout1d: (True, False, 2), torch.nn.functional.dropout2d: (True, False, None),
    torch.nn.functional.dropout3d: (True, False, 4), torch.feature_dropout: (True, False, None),
    torch.nn.functional.alpha_dropout: (False, True, None), torch.alpha_dropout: (False, True, None),
    torch.nn.functional.feature_alpha_dropout: (True, True, None), torch.feature_alpha_dropout: (True, True, None),
}
_ATTENTION = torch.nn.functional.scaled_dot_product_attention
_MULTI_HEAD_ATTENTION = torch.nn.functional.multi_head_attention_forward
_TRIPLET_WITH_DISTANCE = torch.nn.functional.triplet_margin_with_distance_loss
# the fractional max pools by their spatial dims: their random samples are drawn here, as torch draws them, so that
# a rule sees them (drawn inside torch's function, none could)
_FRACTIONAL = {torch.nn.functional.fractional_max_pool2d: 2, torch.nn.functional.fractional_max_pool2d_with_indices: 2,
               torch.nn.functional.fractional_max_pool3d: 3, torch.nn.functional.fractional_max_pool3d_with_indices: 3}
_GUMBEL_SOFTMAX = torch.nn.functional.gumbel_softmax
_EMBEDDING = torch.nn.functional.embedding
_RENORM = (Op("embedding_renorm", None, constant=True), False, True)  # torch.embedding_renorm_'s entry: in place
# the multi-layer recurrent calls of nn.LSTM/GRU/RNN: with dropout between the layers in training, whose masks
# torch draws inside its kernel, they are recorded layer by layer with the dropout between them
_RECURRENT = frozenset({torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu})
_CHOOSING = frozenset({_ATTENTION, _MULTI_HEAD_ATTENTION, _EMBEDDING, *_RECURRENT})  # arguments may choose their path
# torch.autograd.Function.apply runs the Function's forward with grad disabled: its ops reach the recorder's
# no-grad path; a frame running this code above such an op marks it as part of a custom Function's forward.
# Up to torch 2.13 apply is a Python classmethod; from 2.14 it is torch's C method, which leaves no frame of its
# own, and the Function's forward frame itself is recognised instead (see _function_of_forward).
_FUNCTION_APPLY: types.CodeType | None = getattr(getattr(torch.autograd.Function.apply, "__func__", None),
                                                 "__code__", None)
_CONTEXT = getattr(torch.autograd.function, "BackwardCFunction", ())  # the ctx a forward(ctx, ...) is given
# An input the forward returns as it is comes back as a view apply makes with grad disabled (x.view_as(x)), after
# the forward's frame is gone: with a C apply, nothing on the stack shows it then, but torch marks the view's
# creation once apply has set it up (so the mark is read when the view is first used)
_creation_meta = getattr(torch._C._autograd, "_get_creation_meta", None)
_IN_CUSTOM_FUNCTION = getattr(getattr(torch._C._autograd, "CreationMeta", None), "IN_CUSTOM_FUNCTION", None)
# A module's full backward hook passes its inputs and outputs through BackwardHookFunction, which returns them as
# they are: while apply makes their views, this torch function's frame (which knows the module) is still up
_BACKWARD_HOOK = torch.nn.modules._functions.BackwardHookFunction
_HOOK_APPLY: types.CodeType | None = getattr(
    getattr(getattr(torch.utils.hooks, "BackwardHook", None), "_apply_on_tensors", None), "__code__", None)
# calls that only read metadata (never a tensor): passed straight through, as cheaply as possible
# (``emb.shape[0]`` and ``x.size(0)`` are everywhere in user code). Property getters compare equal per descriptor.
_METADATA = frozenset(
    [getattr(Tensor, name).__get__ for name in ("shape", "dtype", "device", "ndim", "is_cuda", "layout",
                                                  "requires_grad", "is_leaf")]
    + [getattr(Tensor, name) for name in ("size", "dim", "numel", "nelement", "stride", "is_floating_point",
                                          "is_complex", "is_contiguous", "element_size", "storage_offset",
                                          "data_ptr", "__len__", "get_device")])
# calls that read tensor values into Python: a graph that saw one is flagged (graph._reads_values), so that
# no straight-line plan is cached from a backward whose Python control flow may depend on the values
_VALUE_READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "numpy",
                          "__array__", "__repr__", "__str__", "__format__", "is_nonzero", "equal", "allclose",
                          "__contains__", "__reduce_ex__", "__dlpack__"})


# torch autograd's entry points: in a block, they usually mean micrograd's ``loss.backward()`` (see _autograd_call)
_AUTOGRAD_CALLS = frozenset({Tensor.backward, torch.autograd.backward, torch.autograd.grad})


def _is_internal(code: types.CodeType) -> bool:
    known = _internal_code.get(code)
    if known is None:
        path = code.co_filename
        known = (path.startswith(_TORCH_DIR) or (path.startswith(_PACKAGE_DIR) and not path.startswith(
            _USER_SUBPACKAGES)) or path.endswith(("contextlib.py", "threading.py")))
        _internal_code[code] = known
    return known


def _busy() -> bool:
    return getattr(_state, "busy", False)


def _show_at_the_users_line(show: Any) -> Any:
    """``warnings.showwarning``, with torch's warnings from a recorded call shown at the user's line.

    torch warns from C++ at the innermost Python frame, which inside a block is the recorder's
    (``record.py:198: UserWarning: ...``), and so does a torch function that warns at its caller's line
    (``F.mse_loss``'s broadcasting warning); the user's own frame is still on the stack while it is shown.
    The warning is issued again there, with the user's module and registry, so that the filters and
    "once per line" apply to the user's line as without the recorder: a second line, or a second notebook
    cell, with the same warning shows it too; a loop shows it once.
    """
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if filename == __file__:
            frame = sys._getframe(1)
            while frame is not None and (_is_internal(frame.f_code) or frame.f_code.co_filename == warnings.__file__):
                frame = frame.f_back
            if frame is not None:
                _forget_warning(message, category, lineno)
                user = frame.f_globals
                warnings.warn_explicit(message, category, frame.f_code.co_filename, frame.f_lineno,
                                       module=user.get("__name__", "<string>"),
                                       registry=user.setdefault("__warningregistry__", {}), module_globals=user)
                return None
        return show(message, category, filename, lineno, file, line)

    showwarning.wrapped = show
    return showwarning


def _forget_warning(message: Any, category: type, lineno: int) -> None:
    """Undo what the warnings module noted for a warning from the recorder's own ``lineno`` before showing it.

    Kept, it would silence every later warning of the same text from any user line ("default": once per
    line, and the line was the recorder's). The action is the one the filters chose for this module.
    """
    text = str(message)
    action = next((action for action, pattern, kind, module, line in warnings.filters
                   if (pattern is None or pattern.match(text)) and issubclass(category, kind)
                   and (module is None or module.match(__name__)) and line in (0, lineno)), warnings.defaultaction)
    if action == "once":
        warnings.onceregistry.pop((text, category), None)
    elif action in ("default", "module"):
        globals().get("__warningregistry__", {}).pop((text, category, lineno if action == "default" else 0), None)


class _Bookkeeping:
    """Marks this thread's recorders busy, so their own helper ops are not recorded anywhere."""

    def __enter__(self) -> None:
        self.prev = _busy()
        _state.busy = True

    def __exit__(self, *exc: Any) -> None:
        _state.busy = self.prev


def _scope_stack() -> tuple[str, ...]:
    return getattr(_state, "scope", ())


@contextmanager
def scope(name: str) -> Iterator[None]:
    """Group the ops recorded inside the block under ``name`` (for rendering clusters)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"tg.scope: the name must be a non-empty string, got {name!r}")
    previous = _scope_stack()
    _state.scope = previous + (name,)
    try:
        yield
    finally:
        _state.scope = previous


def _attention_dropout(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                       is_causal: bool = False, scale: Any = None, *, enable_gqa: bool = False) -> bool:
    """Whether an F.scaled_dot_product_attention call is recorded as its parts: with dropout (no rule can see
    the kernel's mask), on strided tensors."""
    return bool(dropout_p) and not (is_causal and attn_mask is not None) and all(
        isinstance(t, Tensor) and t.layout is torch.strided for t in (query, key, value))  # (torch refuses both masks)


def _chooses_own_path(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether this call of one of the functions the recorder records its own way (_CHOOSING) takes that way: not
    the common path a template may replay (attention with dropout, nn.MultiheadAttention, an embedding with
    max_norm)."""
    if func is _ATTENTION:
        return _attention_dropout_call(args, kwargs)
    if func is _EMBEDDING:
        return kwargs.get("max_norm") is not None or (len(args) > 3 and args[3] is not None)
    if func in _RECURRENT:
        return _recurrent_dropout(args, kwargs)
    return True


def _recurrent_dropout(args: tuple, kwargs: dict) -> bool:
    """Whether a torch.lstm/gru/rnn_* call applies dropout between its layers: (input, hx, params, has_biases,
    num_layers, dropout, train, ...), or the PackedSequence overload with batch_sizes second (one place on)."""
    if kwargs or len(args) < 9:
        return False
    shift = isinstance(args[3], (list, tuple))  # the packed overload: args[3] is the parameters
    num_layers, dropout, train = args[4 + shift:7 + shift]
    return bool(dropout) and bool(train) and isinstance(num_layers, int) and num_layers > 1


def _attention_dropout_call(args: tuple, kwargs: dict) -> bool:
    try:
        return _attention_dropout(*args, **kwargs)
    except TypeError:  # arguments torch itself refuses: its own error, from the call
        return False


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: Graph, anomaly: bool) -> None:
        super().__init__()
        self.graph = graph
        self.anomaly = anomaly
        self.grad_at_entry = torch.is_grad_enabled()
        self.frames: dict[int, types.FrameType] = {}
        self.frame_order: list[types.FrameType] = []  # the same frames in order of first use (a node's "call")
        # id(user frame) -> (the frame below it that made its last recorded call, that call's instruction, the
        # number of that execution of the instruction): see _source
        self.executions: dict[int, tuple[types.FrameType | None, int, int]] = {}
        self.execution_count = 0
        # id(user frame) -> (the user frame that called it, that frame's instruction making the call), for the
        # frames that ran ops and the user frames between them and the block's (None: the block's): _link_callers
        self.callers: dict[int, tuple[types.FrameType, int] | None] = {}
        # what the statements that made recorded calls stored (for the names of rebound variables; first
        # recordings only, and only where names are wanted)
        self.stored = StoredValues()
        self.watching: StoredValues | None = self.stored if graph._user_names else None  # (None: not watched)
        self.view_written: dict[int, tuple] = {}  # id(tensor) -> source of a write through memory it shares
        self.views: dict[int, list[Tensor]] = {}  # id(base) -> recorded views of it
        self.data_of: dict[int, Tensor] = {}  # id(x.data or x.detach()) -> x: same memory, not a view
        self.replay: _replay.Session | None = None  # matches the ops against the last recording from the same line
        self.nested = False  # entered while another torch function mode was active
        self.last_frame: types.FrameType | None = None  # the user's frame _source found last
        self.entry_frame: types.FrameType | None = None  # the frame of the ``with tg.record()`` statement
        # autograd's node counter when the block began: a tensor with a later grad_fn that the recorder did
        # not see was computed inside the block by something it cannot intercept (a torch.jit.script function)
        self.sequence_at_entry = _NO_SEQUENCE
        # custom torch.autograd.Function calls: id(frame of Function.apply, or of the Function's forward where
        # apply has no Python frame) -> (that frame, _CustomCall)
        self.custom_calls: dict[int, tuple[types.FrameType, _CustomCall]] = {}
        # the code of a forward(...) without ctx -> its Function class, or None for another forward (a module's)
        self.forward_classes: dict[types.CodeType, Any] = {}
        # tensors made inside a custom Function's forward: id -> (weak reference, the call); they become
        # the call's node (with no rule) when used, or at the end of the block if still alive
        self.custom_outputs: dict[int, tuple[weakref.ref, _CustomCall]] = {}
        # with a C Function.apply: x.view_as(x) made with grad disabled outside any known frame, possibly an input a
        # custom Function's forward returned: id -> (weak reference, to x too, the user's source, scope)
        self.self_views: dict[int, tuple[weakref.ref, Tensor, tuple, tuple[str, ...]]] = {}

    # ---------------------------------------------------------------- interception

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # NOTE: this runs for every torch call in the block; its common path (an out-of-place op returning
        # one new tensor) is kept free of helper calls, generators and temporary objects
        replay = self.replay
        if replay is not None and replay.expected is func and not _state.busy and (
                not self.grad_at_entry or torch.is_grad_enabled()) and not _any_autocast() and (
                not kwargs or (kwargs.get("out") is None and kwargs.get("inplace") is not True)) and (
                func not in _CHOOSING or not _chooses_own_path(func, args, kwargs or {})):
            # the call the template made at this position: it took the common path then, so it does now
            # (its callable is no metadata, dropout or in-place op; grad mode is as at entry; no autocast, whose
            # ops the full path marks; see tensorgraph.replay). Where the full path chooses by the arguments
            # (out=, inplace=True, attention with dropout, an embedding's max_norm), these arguments must choose
            # the common path too:
            # the template's F.relu(h) does not make this call's F.relu(h, inplace=True) a new tensor, nor its
            # attention without dropout this call's attention with dropout an op with a rule
            result = func(*args, **kwargs) if kwargs else func(*args)
            if not self.nested:  # no recorder below this one can see the checks' metadata calls
                fast = replay.fast  # the generated checks of this call (the common case), then the generic ones
                if fast is not None and fast(replay, self, args, kwargs, result):
                    return result
                if replay.match(self, func, args, kwargs or {}, result):
                    return result
            else:
                _state.busy = True
                try:
                    if replay.match(self, func, args, kwargs or {}, result):
                        return result
                finally:
                    _state.busy = False
            entry = FUNCS.get(func)
            return self._after_call(func, entry if entry is not None else lookup(func), args, kwargs or {}, result)
        if kwargs is None:
            kwargs = {}
        state = _state
        if getattr(state, "busy", False) or func in _METADATA:
            return func(*args, **kwargs)
        entry = FUNCS.get(func)
        if entry is None:
            entry = lookup(func)
            if entry is None and getattr(func, "__name__", None) == "__set__" and args and (
                    getattr(func.__self__, "__name__", None) == "data" and id(args[0]) in self.graph._live):
                return self._set_data(func, args)
            if entry is None and func in _AUTOGRAD_CALLS:
                return self._autograd_call(func, args, kwargs)
        if self.grad_at_entry and not torch.is_grad_enabled():
            return self._no_grad_call(func, entry, args, kwargs)
        if func in _DROPOUT:
            return self._dropout(func, *args, **kwargs)
        if func is _GUMBEL_SOFTMAX:
            return self._gumbel_softmax(*args, **kwargs)
        if kwargs and kwargs.get("out") is not None:
            return self._out_call(func, entry, args, kwargs)
        if func is _ATTENTION and _attention_dropout_call(args, kwargs):
            return self._attention_with_dropout(*args, **kwargs)
        if func is _MULTI_HEAD_ATTENTION:
            return self._multi_head_attention(func, entry, args, kwargs)
        if func in _RECURRENT and _recurrent_dropout(args, kwargs):
            return self._recurrent_with_dropout(func, args)
        if func is _TRIPLET_WITH_DISTANCE:
            return self._triplet_with_distance(*args, **kwargs)
        if func is _EMBEDDING and _chooses_own_path(func, args, kwargs):
            return self._embedding_with_max_norm(types, *args, **kwargs)
        if func in _FRACTIONAL and kwargs.get("_random_samples") is None and len(args) < 6 and args:
            return self._fractional_max_pool(func, types, args, kwargs)
        if entry is not None:
            if entry[2]:
                return self._inplace_call(func, entry, args, kwargs)
            if entry[0].mutates:
                return self._mutating_call(func, entry, args, kwargs)
        if kwargs and kwargs.get("inplace") is True:
            return self._inplace_call(func, entry, args, kwargs)
        return self._after_call(func, entry, args, kwargs, func(*args, **kwargs))

    def _after_call(self, func, entry, args, kwargs, result):
        """The common path: a call that returned new tensors becomes their nodes."""
        if isinstance(result, Tensor):
            for a in args:
                if a is result:
                    break
            else:
                if not kwargs or all(v is not result for v in kwargs.values()):
                    outputs = [result]
                    replay = self.replay
                    _state.busy = True
                    try:
                        if replay is None or not replay.matching or not replay.match(self, func, args, kwargs,
                                                                                      result):
                            self._record_op(func, entry, args, kwargs, outputs, result)
                    finally:
                        _state.busy = False
                    return result
            self._check_alias(func, args, kwargs, result)
            return result  # an alias of an input (contiguous(), .to(same dtype)): not a new value
        if isinstance(result, (tuple, list)) and any(isinstance(r, Tensor) for r in result) and all(
                isinstance(r, Tensor) or r is None for r in result):  # (grad_x, grad_w, None) from a backward op
            with _Bookkeeping():
                replay = self.replay
                if replay is None or not replay.matching or not replay.match(self, func, args, kwargs, result):
                    self._record_op(func, entry, args, kwargs, list(result), result)
        elif getattr(func, "__name__", None) in _VALUE_READS:
            self.graph._reads_values = True
        return result

    def _record_op(self, func, entry, args, kwargs, outputs, result) -> None:
        """The full path for a call returning new tensors; logged for the next recording's template."""
        first = len(self.graph._nodes)
        call = self._refs_of_call(args, kwargs)
        source = self._source()
        self._add_op(func, entry, call, outputs, result, source, previous=None)
        if self.replay is not None:
            self.replay.log(func, first, len(self.graph._nodes), self.last_frame, source, _state.scope)

    def _autograd_call(self, func, args, kwargs):
        """``loss.backward()`` (or ``torch.autograd.grad``) in the block: micrograd's habit. It is torch autograd's
        call, passed through; where torch refuses it because nothing requires grad, say what to call instead."""
        try:
            return func(*args, **kwargs)
        except RuntimeError as error:
            if "does not require grad" not in str(error):
                raise
            with _Bookkeeping():
                message = self._autograd_hint(func, args, kwargs, str(error))
            raise RuntimeError(message) from error

    def _autograd_hint(self, func, args, kwargs, error: str) -> str:
        where = _where(self._source())
        frame = self.last_frame
        names = {**frame.f_globals, **frame.f_locals} if frame is not None else {}
        outputs = args[0] if args else kwargs.get("tensors", kwargs.get("outputs"))
        tensor = outputs[0] if isinstance(outputs, (tuple, list)) and outputs else outputs
        loss = next((k for k, v in names.items() if v is tensor and not k.startswith("_")), "loss")
        graph = next((k for k, v in names.items() if v is self.graph and not k.startswith("_")), None)
        call = f"{loss}.backward()" if func is Tensor.backward else f"torch.autograd.{func.__name__}(...)"
        use = (f"after the block, grads = {graph}.backward({loss})" if graph is not None else
               f"name the graph (with tg.record() as graph:) and, after the block, grads = graph.backward({loss})")
        return (f"{call} at {where}: torch autograd refuses it ({error}): the tensors of a tg.record() block need "
                f"no requires_grad, and tensorgraph backpropagates with its own engine: {use}, then "
                f"grads[x] or grads[\"x\"] for each tensor's gradient")

    def _set_data(self, func, args):
        """``y.data = t``: y now holds t's values, detached: a new constant version of y (its old value is kept)."""
        target = args[0]
        with _Bookkeeping():
            previous = self.graph._live[id(target)][0]
            self._snapshot(target)
            source = self._source()
        func(*args)
        with _Bookkeeping():
            self._add_constant_version(target, "set_data", source, previous)

    def _mutating_call(self, func, entry, args, kwargs):
        """Ops that update some inputs as a side effect (batch_norm's running statistics)."""
        with _Bookkeeping():
            source = self._source()
            call = self._refs_of_call(args, kwargs)
            op = entry[0]
            watched = [(a, a._version) for i, a in enumerate(args) if i in op.mutates and isinstance(a, Tensor)]
        result = func(*args, **kwargs)
        with _Bookkeeping():
            self._add_op(func, entry, call, [result], result, source, previous=None)
            for tensor, before in watched:
                if tensor._version != before:
                    self._add_constant_version(tensor, op.name, source, self.graph._live[id(tensor)][0])
        return result

    def _inplace_call(self, func, entry, args, kwargs):
        """``x.add_(y)``, ``x += y``, ``x[i] = v``: a new version of x; the old one keeps a copy of its value."""
        target = args[0]
        replay = self.replay
        if replay is not None and replay.matching:
            with _Bookkeeping():
                matched = replay.before_inplace(self, func, args, kwargs)
            if matched:  # the template's call: its leaves and the old value are kept as below
                func(*args, **kwargs)
                with _Bookkeeping():
                    replay.after_inplace(self, target)
                return target
        with _Bookkeeping():
            first = len(self.graph._nodes)
            source = self._source()
            setitem = entry is not None and entry[0].name == "setitem"
            call = self._refs_of_call(args, kwargs, allow_view_write=setitem)
            previous = call[2][0]
            self._snapshot(target)
            self._keep_hooks(target)
            self._mark_aliases(target, source, keep_hooks=True)
            frame = self.last_frame
        func(*args, **kwargs)
        with _Bookkeeping():
            self._add_op(func, entry, call, [target], target, source, previous=previous)
            if replay is not None:
                replay.log(func, first, len(self.graph._nodes), frame, source, _state.scope)
        return target

    def _out_call(self, func, entry, args, kwargs):
        """``torch.mul(x, y, out=o)``: o's new value is a node without a rule (torch refuses out= with autograd too).

        Without it, an ``o`` made before the block was taken for a leaf: the gradient stopped there, silently.
        """
        targets = _out_tensors(kwargs["out"])
        with _Bookkeeping():
            source = self._source()
            call = self._refs_of_call(args, {k: v for k, v in kwargs.items() if k != "out"})
            for target in targets:
                if id(target) in self.graph._live:
                    self._snapshot(target)
        result = func(*args, **kwargs)
        with _Bookkeeping():
            name = _op_name(func, entry)
            for target in targets:
                live = self.graph._live.get(id(target))
                previous = live[0] if live is not None else None
                node = self.graph._add_node(
                    op=name, kind="op", value=target, version=target._version, func=func, args=call[0],
                    kwargs=call[1], source=source, scope=_scope_stack(), inplace=previous is not None,
                    previous=previous, inputs=list(call[2]),
                    unsupported=f"{name}(..., out=...) has no rule (torch does not differentiate out= either); "
                                f"assign the result instead: o = {name}(...)")
                self.graph._live[id(target)] = (node, target._version, target)
        return result

    def _dropout(self, func: Any, input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
                 train: bool | None = None) -> Tensor:
        """F.dropout becomes ``input * mask`` with the mask a recorded constant: replays reuse the same mask.

        The feature dropouts (dropout1d/2d/3d) draw one mask element per sample and channel, as torch; alpha
        dropout adds a shift drawn with its mask. torch.dropout and its kin name ``training`` ``train``.
        """
        feature, alpha, unbatched = _DROPOUT[func]
        if train is not None:
            training = train
        if not 0 <= p <= 1 or (unbatched is not None and input.dim() not in (unbatched, unbatched + 1)):
            return func(input, p, training)  # torch's own error
        if not training or p == 0 or input.numel() == 0:
            return input
        shape = None
        if feature:
            kept = 1 if input.dim() == unbatched else 2  # (the channel dimension of an unbatched input is its first)
            shape = tuple(input.shape[:kept]) + (1,) * (input.dim() - kept)
        call = self.__torch_function__
        if not alpha:
            mask = call(rules.dropout_mask, (), (input, p, shape))
            return call(Tensor.mul_ if inplace else Tensor.mul, (), (input, mask))
        noise = call(rules.alpha_dropout_noise, (), (input, p, shape))
        scale, shift = call(rules.alpha_dropout_scale, (), (noise, p)), call(rules.alpha_dropout_shift, (), (noise, p))
        scaled = call(Tensor.mul_ if inplace else Tensor.mul, (), (input, scale))
        return call(Tensor.add_ if inplace else Tensor.add, (), (scaled, shift))

    def _gumbel_softmax(self, logits: Tensor, tau: float = 1.0, hard: bool = False, eps: float = 1e-10,
                        dim: int = -1) -> Tensor:
        """F.gumbel_softmax recorded as the calls torch's function makes, its noise a recorded constant (drawn as
        torch draws it, so the same seed gives torch's values); hard=True is the straight-through one-hot."""
        if eps != 1e-10:
            warnings.warn("`eps` parameter is deprecated and has no effect.", stacklevel=3)
        call = self.__torch_function__
        noisy = call(Tensor.div, (), (call(Tensor.add, (), (logits, call(rules.gumbel_noise, (), (logits,)))), tau))
        y_soft = call(Tensor.softmax, (), (noisy, dim))
        if not hard:
            return y_soft
        index = call(Tensor.max, (), (y_soft, dim), {"keepdim": True})[1]
        zeros = call(torch.zeros_like, (), (logits,), {"memory_format": torch.legacy_contiguous_format})
        y_hard = call(Tensor.scatter, (), (zeros, dim, index, 1.0))
        return call(Tensor.add, (), (call(Tensor.sub, (), (y_hard, call(Tensor.detach, (), (y_soft,)))), y_soft))

    def _attention_with_dropout(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                *, enable_gqa: bool = False) -> Tensor:
        """F.scaled_dot_product_attention with dropout, recorded as the ops of torch's math backend.

        Its dropout mask is drawn inside the kernel, out of a rule's reach; recorded as these ops (the
        CPU kernel's, in its order: on CPU the same values bit for bit, from the same draws of the
        generator), the mask is a recorded constant, as for F.dropout.
        """
        call = self.__torch_function__
        groups = query.shape[-3] // key.shape[-3] if enable_gqa and key.dim() >= 3 else 1
        if groups > 1:  # each key/value head serves a group of query heads, repeated as torch's math backend does
            key = call(Tensor.repeat_interleave, (), (key, groups, -3))
            value = call(Tensor.repeat_interleave, (), (value, groups, -3))
        factor = math.sqrt(abs(scale) if scale is not None else 1.0 / math.sqrt(query.shape[-1]))
        query = call(Tensor.mul, (), (query, -factor if scale is not None and scale < 0 else factor))
        scores = call(torch.matmul, (), (query, call(Tensor.mul, (), (call(Tensor.transpose, (), (key, -2, -1)),
                                                                     factor))))
        if is_causal:
            size = (query.shape[-2], key.shape[-2])
            attn_mask = call(Tensor.tril, (), (call(torch.ones, (), (size,), {"dtype": torch.bool,
                                                                            "device": query.device}),))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            scores = call(Tensor.masked_fill, (), (scores, call(Tensor.logical_not, (), (attn_mask,)), -math.inf))
        elif attn_mask is not None:
            scores = call(Tensor.add, (), (scores, attn_mask))
        if attn_mask is not None and not is_causal:  # torch's safe softmax: a row with every key masked is 0
            hidden = call(Tensor.all, (), (call(Tensor.eq, (), (scores, -math.inf)), -1), {"keepdim": True})
            scores = call(Tensor.masked_fill, (), (scores, hidden, 0.0))  # (not NaN: its gradient stays finite)
            weights = call(Tensor.masked_fill, (), (call(torch.softmax, (), (scores, -1)), hidden, 0.0))
        else:
            weights = call(torch.softmax, (), (scores, -1))
        weights = call(Tensor.mul, (), (weights, call(rules.dropout_mask, (), (weights, dropout_p))))
        return call(torch.matmul, (), (weights, value))

    def _recurrent_with_dropout(self, func: Any, args: tuple) -> tuple:
        """A multi-layer nn.LSTM/GRU/RNN call with dropout between its layers, recorded as one call per layer
        (num_layers=1) with F.dropout's mask between them, as torch's kernel runs it: on CPU the same values bit
        for bit, from the same draws of the generator. The mask, drawn inside the kernel, is out of a rule's reach.
        """
        call = self.__torch_function__
        packed = isinstance(args[3], (list, tuple))
        if packed:
            x, sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional = args
        else:
            x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first = args
            if batch_first:  # torch's kernel runs time first, and draws the masks on time-first outputs
                x = call(Tensor.transpose, (), (x, 0, 1))
        directions = 2 if bidirectional else 1
        per_layer = len(params) // num_layers
        states = tuple(hx) if func is torch.lstm else (hx,)
        finals: list[list[Tensor]] = [[] for _ in states]
        for layer in range(num_layers):
            rows = slice(layer * directions, (layer + 1) * directions)
            initial = tuple(call(Tensor.__getitem__, (), (state, rows)) for state in states)
            state = initial if func is torch.lstm else initial[0]
            weights = list(params[layer * per_layer:(layer + 1) * per_layer])
            rest = (has_biases, 1, 0.0, train, bidirectional)
            out = call(func, (), (x, sizes, state, weights, *rest) if packed else (x, state, weights, *rest, False))
            x = out[0]
            for final, value in zip(finals, out[1:]):
                final.append(value)
            if layer < num_layers - 1:
                x = call(torch.dropout, (), (x, dropout, train))
        if not packed and batch_first:
            x = call(Tensor.transpose, (), (x, 0, 1))
        return (x, *(call(torch.cat, (), (final,)) for final in finals))

    def _multi_head_attention(self, func, entry, args, kwargs):
        """nn.MultiheadAttention's one call, recorded as the calls it makes (tensorgraph.attention); with an
        argument that has no rule there, one node that says which, when a gradient needs it."""
        refused = refused_argument(args, kwargs)
        if refused is None:
            return multi_head_attention(lambda f, *a, **k: self.__torch_function__(f, (), a, k), args, kwargs)
        result = self._after_call(func, entry, args, kwargs, func(*args, **kwargs))
        with _Bookkeeping():
            for out in result:
                if isinstance(out, Tensor) and id(out) in self.graph._live:
                    self.graph._nodes[self.graph._live[id(out)][0]]["unsupported"] = (
                        f"multi_head_attention_forward with {refused} (precomputed keys or values) has no rule")
        return result

    def _triplet_with_distance(self, anchor: Tensor, positive: Tensor, negative: Tensor, *,
                               distance_function: Any = None, margin: float = 1.0, swap: bool = False,
                               reduction: str = "mean") -> Tensor:
        """F.triplet_margin_with_distance_loss, recorded as its parts: its distance is the user's Python function,
        whose torch calls have rules (torch took this mode off its stack for the call: it goes back on for it)."""
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"{reduction} is not a valid value for reduction")
        if margin <= 0:
            raise ValueError(f"margin must be greater than 0, got {margin}")
        if not anchor.ndim == positive.ndim == negative.ndim:
            raise RuntimeError(f"The anchor, positive, and negative tensors are expected to have the same number of "
                               f"dimensions, but got: anchor {anchor.ndim}D, positive {positive.ndim}D, and negative "
                               f"{negative.ndim}D inputs")
        distance = distance_function if distance_function is not None else torch.pairwise_distance
        with self:
            to_positive, to_negative = distance(anchor, positive), distance(anchor, negative)
            if swap:  # the positive example closer to the negative than the anchor is: that distance instead
                to_negative = torch.minimum(to_negative, distance(positive, negative))
            loss = torch.clamp_min(margin + to_positive - to_negative, 0)
            return loss.sum() if reduction == "sum" else loss.mean() if reduction == "mean" else loss

    def _embedding_with_max_norm(self, types: Any, input: Tensor, weight: Tensor, padding_idx: int | None = None,
                                 max_norm: float | None = None, norm_type: float = 2.0,
                                 scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
        """F.embedding(max_norm=...) (nn.Embedding(max_norm=...)): torch first rescales, in place and under no_grad,
        the rows of ``weight`` it looks up to norms of at most ``max_norm``, then looks them up. Recorded so: the
        rescaling as a no-grad update of ``weight`` (a new version of it), then the plain lookup of that version,
        whose gradient goes to ``weight`` as torch's does."""
        with torch.no_grad():  # (as an in-place call: a weight already recorded gets a new version, as when clipped)
            self._no_grad_call(torch.embedding_renorm_, _RENORM, (weight, input.contiguous(), max_norm, norm_type), {})
        return self.__torch_function__(_EMBEDDING, types, (input, weight, padding_idx, None, norm_type,
                                                           scale_grad_by_freq, sparse), {})

    def _fractional_max_pool(self, func, types, args, kwargs):
        """F.fractional_max_pool2d/3d with the random samples drawn here, exactly as torch draws them (the same
        values for the same seed), and passed in: a recorded constant the rule reads."""
        x, spatial = args[0], _FRACTIONAL[func]
        batched = x.dim() == spatial + 2
        shape = (x.size(0) if batched else 1, x.size(-spatial - 1), spatial)
        samples = self.__torch_function__(torch.rand, (), shape, {"dtype": x.dtype, "device": x.device})
        return self.__torch_function__(func, types, args, {**kwargs, "_random_samples": samples})

    def _no_grad_call(self, func, entry, args, kwargs):
        """Inside torch.no_grad() in the block: not differentiated.

        A new tensor is a leaf. An in-place update (or ``out=``) of a recorded tensor makes a new version of it:
        a constant one for a leaf or constant (weight clipping: torch's leaf keeps no history either), and for
        an intermediate a ``no_grad_update`` whose gradient passes to the earlier version unchanged, as torch
        autograd, which does not see the update, keeps the tensor's history.
        """
        inplace = bool(entry is not None and entry[2]) or kwargs.get("inplace") is True
        targets = [args[0]] if inplace and args and isinstance(args[0], Tensor) else []
        if kwargs.get("out") is not None:
            targets += _out_tensors(kwargs["out"])
        live = self.graph._live
        targets = [t for t in targets if id(t) in live]
        if not targets:
            result = func(*args, **kwargs)
            if isinstance(result, (Tensor, tuple, list)):
                custom = self._custom_call()
                if custom is not None:  # made by a custom Function's forward: not a constant
                    for out in (result,) if isinstance(result, Tensor) else result:
                        if isinstance(out, Tensor):
                            self.custom_outputs[id(out)] = (weakref.ref(out), custom)
                elif (_FUNCTION_APPLY is None and len(args) == 2 and args[0] is args[1]
                      and getattr(func, "__name__", None) == "view_as"):
                    with _Bookkeeping():
                        self.self_views[id(result)] = (weakref.ref(result), args[0], self._source(),
                                                       _scope_stack())
            elif getattr(func, "__name__", None) in _VALUE_READS:
                self.graph._reads_values = True
            return result
        with _Bookkeeping():
            source = self._source()
            previous = [live[id(t)][0] for t in targets]
            history = [self.graph._nodes[node]["kind"] == "op" for node in previous]  # intermediates keep theirs
            call = self._refs_of_call(args, kwargs) if any(history) else None
            for target in targets:
                self._snapshot(target)
                self._mark_aliases(target, source)
        result = func(*args, **kwargs)
        with _Bookkeeping():
            name = _op_name(func, entry)
            for target, before, kept in zip(targets, previous, history):
                if not kept:
                    self._add_constant_version(target, name, source, before)
                else:
                    update = f"{name}_" if inplace and target is args[0] else name  # h.mul_(2), torch.mul(..., out=h)
                    self._add_no_grad_update(func, update, call, target, before, source)
        return result

    def _mark_aliases(self, target: Tensor, source: tuple, *, keep_hooks: bool = False) -> None:
        """Before an in-place update of ``target``: everything sharing its memory changes too; their old values
        are kept, and a later use of one reads the write at ``source`` (allowed only as ``x[i] += v``)."""
        for alias in self._live_aliases(target):
            self._snapshot(alias)
            if keep_hooks:
                self._keep_hooks(alias)
            self.view_written[id(alias)] = source

    def _live_aliases(self, target: Tensor) -> list[Tensor]:
        """The recorded tensors other than ``target`` that share its memory: its base, the base's recorded views,
        the tensor behind a ``.data`` or ``.detach()``."""
        base = target._base if target._base is not None else self.data_of.get(id(target), target)
        if base._base is not None:
            base = base._base
        live = self.graph._live
        return [alias for alias in [base] + self.views.get(id(base), []) if alias is not target and id(alias) in live]

    def _add_no_grad_update(self, func, name: str, call: tuple, target: Tensor, previous: int, source: tuple) -> None:
        """The new version of an intermediate updated under no_grad: the gradient passes through to ``previous``."""
        graph = self.graph
        args, kwargs, inputs = call
        node = graph._add_node(
            op="no_grad_update", kind="op", value=target, version=target._version, func=func, args=args,
            kwargs=kwargs, bargs=(Ref(previous),), attrs={"update": name}, source=source, scope=_scope_stack(),
            inplace=True, previous=previous, inputs=[previous] + [i for i in inputs if i != previous])
        graph._live[id(target)] = (node, target._version, target)
        self._refuse_saved(target, previous, source)

    def _refuse_saved(self, target: Tensor, previous: int, source: tuple) -> None:
        """Ops that saved the updated value for their backward (its producer, earlier users) cannot be differentiated.

        torch autograd raises there ("modified by an inplace operation"): each such op gets the same refusal, asked
        of torch itself by running the op again on fresh tensors and watching what it saves.
        """
        nodes = self.graph._nodes
        users = [n for n in range(previous + 1, len(nodes) - 1)
                 if previous in nodes[n]["inputs"] and nodes[n]["kind"] == "op" and nodes[n]["op"] != "no_grad_update"]
        producer = [previous] if nodes[previous]["kind"] == "op" and nodes[previous]["op"] != "no_grad_update" else []
        for node in producer + users:
            if nodes[node]["unsupported"] is None and _saves(nodes, node, previous):
                what = "its own output" if node == previous else "its input"
                tensor = _guess_name(target, self.frames) or f"the output of {nodes[previous]['op']}"
                nodes[node]["unsupported"] = (
                    f"{nodes[node]['op']} saved {what} {tensor!r} for its gradient, which was then modified in "
                    f"place under torch.no_grad() at {_where(source)}; torch autograd raises here too (\"modified by "
                    f"an inplace operation\"). Update a clone instead ({tensor} = {tensor}.clone() before the no_grad "
                    f"block) or detach it")

    def _custom_call(self) -> _CustomCall | None:
        """The custom ``torch.autograd.Function`` whose forward made the current no-grad call, if any.

        Its forward runs with grad disabled, like a ``torch.no_grad()`` block, but its outputs are not
        constants: torch differentiates them with the Function's own backward, which tensorgraph cannot
        use. Only the no-grad path pays for this look at the frames between the call and the block.
        """
        frame = sys._getframe(2)
        stop = self.entry_frame
        while frame is not None and frame is not stop:
            code = frame.f_code
            if code is _FUNCTION_APPLY or (_FUNCTION_APPLY is None and (code is _HOOK_APPLY or (
                    code.co_name == "forward" and self.forward_classes.get(code, True) is not None))):
                known = self.custom_calls.get(id(frame))
                if known is not None and known[0] is frame:
                    return known[1]
                with _Bookkeeping():
                    custom = self._custom_call_of(frame)
                if custom is not None:  # (another forward, a module's, is not kept: its code is, in forward_classes)
                    self.custom_calls[id(frame)] = (frame, custom)
                    if self.replay is not None:  # templates do not replay custom Functions
                        self.replay._stop()
                    return custom
            frame = frame.f_back
        return None

    def _custom_call_of(self, frame: types.FrameType) -> _CustomCall | None:
        """The call ``cls.apply(*args, **kwargs)`` running in ``frame`` (apply's frame, or the Function's forward
        frame where apply is torch's C method), its tensor arguments as Refs; None for another ``forward``."""
        if frame.f_code is _FUNCTION_APPLY:
            local = frame.f_locals
            cls, call_args, call_kwargs = local.get("cls"), local.get("args", ()), local.get("kwargs") or {}
        elif frame.f_code is _HOOK_APPLY:
            cls, call_args, call_kwargs = _BACKWARD_HOOK, tuple(frame.f_locals.get("tensors", ())), {}
        else:
            found = self._function_of_forward(frame)
            if found is None:
                return None
            cls, call_args, call_kwargs = found
        return self._make_custom_call(cls, call_args, call_kwargs, frame)

    def _make_custom_call(self, cls: Any, call_args: tuple, call_kwargs: dict, frame: types.FrameType | None,
                          source: tuple | None = None, scope: tuple[str, ...] | None = None) -> _CustomCall:
        """The _CustomCall of ``cls.apply(*call_args, **call_kwargs)`` (``cls`` None: a Function not known), made
        below ``frame`` (the frames from there up give the user's line, unless ``source`` is given, and the module
        that set up a backward hook)."""
        inputs: list[int] = []
        args = tuple(self._refs_unchecked(a, inputs) for a in call_args)
        kwargs = {k: self._refs_unchecked(v, inputs) for k, v in call_kwargs.items()}
        if source is None:
            user = frame.f_back if frame is not None else None
            while user is not None and _is_internal(user.f_code):
                user = user.f_back
            source = ("<unknown>", 0, "", 0) if user is None else (
                user.f_code.co_filename, user.f_lineno, _qualname(user.f_code), id(user))
            if user is not None:
                self.keep_frame(user)
        name = ((getattr(cls, "__qualname__", None) or func_name(cls)) if cls is not None else
                "(one whose forward returned its input as it is)")
        reason = (f"the custom torch.autograd.Function {name} has no gradient rule (tensorgraph sees its "
                  f"forward as a no-grad block and cannot use its backward); write its forward as torch ops "
                  f"in the recorded code, or .detach() its output if no gradient should flow through it")
        if getattr(cls, "__module__", None) == "torch.utils.checkpoint" and name == "CheckpointFunction":
            reason = ("torch.utils.checkpoint.checkpoint(use_reentrant=True) runs its function as the custom "
                      "torch.autograd.Function CheckpointFunction, whose backward tensorgraph cannot use; pass "
                      "use_reentrant=False, which records as the plain code it runs (the same gradients)")
        if getattr(cls, "__module__", None) == "torch.nn.modules._functions" and name == "BackwardHookFunction":
            reason = (f"the module {_hooked_module(frame)} has a backward hook (register_full_backward_hook or "
                      f"register_full_backward_pre_hook, on it or global), which graph.backward cannot run; remove "
                      f"it (handle.remove()), use tensor hooks (output.register_hook(fn): graph.backward runs "
                      f"them), or use torch autograd")
        return _CustomCall(cls, args, kwargs, inputs, source, _scope_stack() if scope is None else scope, reason)

    def _function_of_forward(self, frame: types.FrameType) -> tuple[Any, tuple, dict] | None:
        """The custom Function whose ``forward`` runs in ``frame``, with the arguments it was given; None when the
        frame runs some other ``forward`` (a module's).

        A ``forward(ctx, ...)`` is given a context whose class knows its Function; a ``forward(...)`` with a
        separate ``setup_context`` is found among the Function classes by its code (once per code and block).
        The arguments are read from the frame's parameters: keyword arguments of the call come back positional.
        """
        code = frame.f_code
        local = frame.f_locals
        params = code.co_varnames[:code.co_argcount]
        first = local.get(params[0]) if params else None
        if isinstance(first, _CONTEXT):
            cls, params = getattr(type(first), "_forward_cls", None), params[1:]
        else:
            if code not in self.forward_classes:
                self.forward_classes[code] = _function_with_forward(code)
            cls = self.forward_classes[code]
        if cls is None:
            return None
        args = tuple(local.get(name) for name in params)
        rest = code.co_argcount + code.co_kwonlyargcount
        kwonly = {name: local.get(name) for name in code.co_varnames[code.co_argcount:rest]}
        if code.co_flags & inspect.CO_VARARGS:
            args += tuple(local.get(code.co_varnames[rest], ()))
            rest += 1
        if code.co_flags & inspect.CO_VARKEYWORDS:
            kwonly.update(local.get(code.co_varnames[rest]) or {})
        return cls, args, kwonly

    def _add_custom_node(self, tensor: Tensor, custom: _CustomCall) -> int:
        """The node of an output of a custom Function: its call, with no rule (a gradient through it raises)."""
        graph = self.graph
        cls = custom.cls
        node = graph._add_node(
            op=getattr(cls, "__name__", "Function"), kind="op", value=tensor, version=tensor._version,
            func=getattr(cls, "apply", None), args=custom.args, kwargs=custom.kwargs, source=custom.source,
            scope=custom.scope, inputs=custom.inputs, unsupported=custom.reason)
        graph._live[id(tensor)] = (node, tensor._version, tensor)
        return node

    def _add_custom_outputs(self) -> None:
        """At the end of the block: custom Function outputs never used in it (the loss itself) get their nodes."""
        for ref, custom in self.custom_outputs.values():
            tensor = ref()
            if tensor is not None and id(tensor) not in self.graph._live:
                self._add_custom_node(tensor, custom)
        for ref, *_ in list(self.self_views.values()):
            tensor = ref()
            if tensor is not None and id(tensor) not in self.graph._live:
                self._returned_input(tensor)

    def _returned_input(self, tensor: Tensor) -> int | None:
        """The node of ``tensor`` if it is an input a custom Function's forward returned as it is, else None.

        Such an output is a view apply made of the input (see self_views), marked by torch as made in a custom
        Function; its Function is known where the output has a grad_fn (an input required grad)."""
        ref, returned, source, scope = self.self_views.pop(id(tensor))
        if ref() is not tensor or _creation_meta is None or _creation_meta(tensor) != _IN_CUSTOM_FUNCTION:
            return None
        grad_fn = tensor.grad_fn
        cls = getattr(type(grad_fn), "_forward_cls", None) if isinstance(grad_fn, _CONTEXT) else None
        with _Bookkeeping():
            custom = self._make_custom_call(cls, (returned,), {}, None, source, scope)
        if self.replay is not None:  # templates do not replay custom Functions
            self.replay._stop()
        return self._add_custom_node(tensor, custom)

    # ---------------------------------------------------------------- bookkeeping

    def _source(self) -> tuple[str, int, str, int, int, int]:
        """The user's file, line and function (qualified: ``Linear.__call__``) of the current call, the id of
        their frame (tells calls apart), the instruction of that frame making the call, and which execution of
        that instruction it is (naming reads the last two: see tensorgraph.naming.statement_values)."""
        frame = sys._getframe(1)
        known = _internal_code.get
        child = None
        while frame is not None:
            internal = known(frame.f_code)
            if internal is None:
                internal = _is_internal(frame.f_code)
            if not internal:
                break
            child = frame
            frame = frame.f_back
        self.last_frame = frame
        if frame is None:
            return ("<unknown>", 0, "", 0, -1, 0)
        key = id(frame)
        if key not in self.frames:  # (keep_frame, inlined: this runs for every op)
            self.frames[key] = frame
            self.frame_order.append(frame)
        if key not in self.callers:  # (also a frame first seen by a replay's matched calls, still running here)
            self._link_callers(frame)
        # the calls one execution of the user's instruction makes (nn.Sequential's layers, F.dropout's mask and
        # product) run below the same frame, kept alive here so that another execution's frame is never mistaken
        # for it (a loop's ``x = layer(x)``)
        lasti = frame.f_lasti
        last = self.executions.get(key)
        if last is None or last[0] is not child or last[1] != lasti:
            self.execution_count += 1
            last = self.executions[key] = (child, lasti, self.execution_count)
            if self.watching is not None:
                self._moved(frame, lasti)
        return (frame.f_code.co_filename, frame.f_lineno, _qualname(frame.f_code), key, lasti, last[2])

    def keep_frame(self, frame: types.FrameType) -> None:
        """Keep a user frame that made a recorded call to the end of the block (its id is that call's alone), in
        order of first use: a node's ``call`` is its rank."""
        if id(frame) not in self.frames:
            self.frames[id(frame)] = frame
            self.frame_order.append(frame)

    def _link_callers(self, frame: types.FrameType) -> None:
        """Remember the instruction of the user frame that called a new user frame (the nearest one up the stack),
        and so on up to the block's frame for those not linked yet: naming follows a returned value to the caller's
        variable (``x = block(x)``: see tensorgraph.naming.statement_values). Once per call, at its first op; the
        instruction is the caller's while the call runs, not after."""
        links, entry, limit = self.callers, self.entry_frame, _MAX_CALL_DEPTH
        steps = 0
        while id(frame) not in links:  # (the block's frame is in it from the start)
            caller = frame.f_back
            while caller is not None and caller is not entry and _is_internal(caller.f_code) and steps < limit:
                caller = caller.f_back
                steps += 1
            if caller is None or steps >= limit:  # (not below the block: a generator's frame, a callback)
                links[id(frame)] = None  # (looked for once)
                return
            links[id(frame)] = (caller, caller.f_lasti)
            if self.watching is not None:
                self._moved(caller, caller.f_lasti)
            frame = caller

    def _moved(self, frame: types.FrameType, instruction: int) -> None:
        """A user frame makes a new recorded call: see what its earlier statements stored (StoredValues.moved)."""
        try:
            self.stored.moved(self.graph, frame, instruction)
        except Exception:  # noqa: BLE001 - it reads CPython's bytecode and the frame's locals: names are best-effort
            self.stored.failed = True  # (no rebound names from this recording's statements)
            self.watching = None

    def _snapshot(self, tensor: Tensor) -> None:
        """Keep the value a tensor has before an in-place change, for the rules of the ops that used it."""
        nodes = self.graph._nodes
        node = self._node_of(tensor, check=False)
        data = nodes[node]
        if data["value"] is not tensor:
            return
        kept = data["value"] = tensor.clone()
        data["version"] = kept._version
        together = data["result"]
        if together is not None:  # one output of a multi-output call: its siblings' rules read it from "result"
            for sibling in range(max(node - len(together), 0), min(node + len(together), len(nodes))):
                other = nodes[sibling]
                if other["args"] is data["args"] and other["result"] is not None:
                    other["result"] = tuple(kept if t is tensor else t for t in other["result"])

    def _keep_hooks(self, tensor: Tensor) -> None:
        """Before a recorded in-place op: the tensor's gradient hooks so far belong to its current version.

        torch keeps them on that version's grad_fn: they see the gradient of the value before the update.
        """
        hooks = tensor._backward_hooks
        if not hooks:
            return
        claimed = {key for known, keys in self.graph._version_hooks.values() if known is hooks for key in keys}
        keys = tuple(key for key in hooks if key not in claimed)
        if keys:
            self.graph._version_hooks[self.graph._live[id(tensor)][0]] = (hooks, keys)

    def _node_of(self, tensor: Tensor, *, check: bool = True, allow_view_write: bool = False) -> int:
        """The node of the tensor's current version; unknown tensors become leaves."""
        graph = self.graph
        live = graph._live.get(id(tensor))
        if live is not None:
            # .data shares memory but not the version counter: a write through it only shows in view_written
            if check and (tensor._version != live[1] or id(tensor) in self.view_written):
                self._untracked_change(tensor, live, allow_view_write)
            return live[0]
        if self.custom_outputs:
            custom = self.custom_outputs.get(id(tensor))
            if custom is not None and custom[0]() is tensor:
                return self._add_custom_node(tensor, custom[1])
        if tensor.is_inference():
            raise RuntimeError(
                f"tensorgraph: an input of the call at {_where(self._source())} was created under "
                f"torch.inference_mode(); such tensors keep no version counter, so tensorgraph cannot record them. "
                f"Create it outside inference_mode (or .clone() it there).")
        if torch._C._functorch.is_functorch_wrapped_tensor(tensor):
            # the transform's results would enter the graph as new leaves, the gradient through it cut off
            raise RuntimeError(
                f"tensorgraph: the call at {_where(self._source())} runs inside a torch.func transform "
                f"(grad, vmap, jacrev, ...), which tg.record() cannot record. Call the transform outside "
                f"the block, or write the computation as plain torch ops.")
        if self.self_views and id(tensor) in self.self_views:
            node = self._returned_input(tensor)
            if node is not None:
                return node
        if made_in_block(tensor, self.sequence_at_entry):
            self._unrecorded_input(tensor)
        node = graph._add_node(op="leaf", kind="leaf", value=tensor, version=tensor._version, source=None)
        graph._live[id(tensor)] = (node, tensor._version, tensor)
        return node

    def _unrecorded_input(self, tensor: Tensor) -> None:
        where = _where(self._source())  # (first: it adds the user's frame to self.frames)
        name = _guess_name(tensor, self.frames)
        what = f"tensor '{name}'" if name else "a tensor"
        raise RuntimeError(
            f"tensorgraph: {what}, an input of the call at {where}, was computed inside the "
            f"block by code tensorgraph cannot record (a torch.jit.script or torch.jit.trace function, a C++ "
            f"extension, or ops under torch._C.DisableTorchFunction); as a leaf it would cut off the gradient "
            f"of everything it was computed from. Call that code with plain torch ops (the undecorated Python "
            f"function), or compute the tensor before the block.")

    def _untracked_change(self, tensor: Tensor, live: tuple, allow_view_write: bool) -> None:
        written = self.view_written.pop(id(tensor), None)
        if written is not None and allow_view_write:
            return  # x[i] += v: the view was updated in place, now written back into x
        source = self._source()
        name = _guess_name(tensor, self.frames) or f"the output of {self.graph._nodes[live[0]]['op']}"
        how = (f"through memory it shares with a view, .data or .detach() at {_where(written)}" if written else
               "by an operation tensorgraph did not see (a write through a view or .data, or an op that "
               "updates its input)")
        raise RuntimeError(
            f"tensorgraph: tensor '{name}' was modified in place {how} before its use at {_where(source)}; "
            f"its recorded value is stale, so gradients through it would be wrong. Write the update as a "
            f"recorded op (x = x + ..., or x[idx] = ... on the tensor itself) or clone() the view first.")

    def _refs(self, value: Any, inputs: list[int], allow_view_write: bool = False) -> Any:
        """Replace tensors (top level or inside a list or tuple) by Refs to their nodes."""
        if isinstance(value, Tensor):
            node = self._node_of(value, allow_view_write=allow_view_write)
            inputs.append(node)
            return Ref(node)
        if isinstance(value, (tuple, list)):
            for item in value:
                if isinstance(item, Tensor):
                    break
            else:
                return value  # no tensor at this level: kept as it is (x.view((2, 3)), x[0, 1:])
            return type(value)([self._refs(v, inputs) for v in value])
        return value

    def _refs_of_call(self, args, kwargs, allow_view_write=False) -> tuple[tuple, dict, list[int]]:
        """The call with tensors replaced by Refs, and the input nodes in argument order."""
        inputs: list[int] = []
        live = self.graph._live
        written = self.view_written
        refs = []
        for a in args:
            if isinstance(a, Tensor):
                known = live.get(id(a))
                if known is not None and a._version == known[1] and id(a) not in written:
                    node = known[0]  # the common case of _node_of: a tensor recorded and unchanged since
                else:
                    node = self._node_of(a, allow_view_write=allow_view_write)
                inputs.append(node)
                refs.append(Ref(node))
            elif isinstance(a, (tuple, list)):
                refs.append(self._refs(a, inputs, allow_view_write))
            else:
                refs.append(a)
        call_kwargs = {k: self._refs(v, inputs) for k, v in kwargs.items()} if kwargs else {}
        return tuple(refs), call_kwargs, inputs

    def _add_op(self, func, entry, call, outputs, result, source, previous) -> None:
        graph = self.graph
        call_args, call_kwargs, inputs = call
        op: Op | None = entry[0] if entry else None
        name = op.name if op is not None else func_name(func)
        kind = "constant" if op is not None and op.constant else "op"
        bound_args, bound_kwargs, attrs, unsupported = call_args, call_kwargs, {}, None
        floating = outputs[0].dtype.is_floating_point if len(outputs) == 1 else any(
            o is not None and o.dtype.is_floating_point for o in outputs)
        if kind == "op" and op is not None and floating:
            swapped = call_args[1::-1] + call_args[2:] if entry[1] else call_args
            try:
                bound_args, bound_kwargs = op.bind(swapped, call_kwargs)
                attrs = _attrs(op, bound_args, bound_kwargs)
            except UnsupportedCall as err:
                unsupported = str(err)
        elif op is None and name in OPS:  # (torch.lu_solve(b, LU, pivots) is not linalg.lu_solve's "lu_solve")
            unsupported = (f"no gradient rule for the op {name!r} as called here: tensorgraph's rule of that name is "
                           f"for another function of the same name")
        if kind == "op" and (outputs[0].dtype.is_complex if len(outputs) == 1 else any(
                o is not None and o.dtype.is_complex for o in outputs)):
            unsupported = f"{name} produced a complex tensor; tensorgraph's rules are for real tensors"
        elif kind == "op" and floating and _autocast_on(next(o for o in outputs if o is not None).device.type):
            unsupported = (f"{name} was recorded under torch.autocast, whose casts happen below the calls "
                           f"tensorgraph records (its rules would get other dtypes than the op computed in); record "
                           f"without autocast, casting explicitly (model.to(torch.bfloat16), x.to(torch.bfloat16))")
        multi = not isinstance(result, Tensor)
        stack = getattr(_state, "scope", ())
        nodes, live = graph._nodes, graph._live
        for index, out in enumerate(outputs):
            if out is None:
                continue
            node = len(nodes)
            version = out._version
            # Graph._add_node's dict written out in one literal (a helper call alone would cost ~1 us per op);
            # every key of graph._NODE_DEFAULTS must be here: tests/test_compile.py checks it
            nodes.append({
                "name": None, "named": False, "op": name, "kind": kind, "attrs": attrs, "source": source,
                "scope": stack, "func": func, "args": call_args, "kwargs": call_kwargs, "bargs": bound_args,
                "bkwargs": bound_kwargs, "inplace": previous is not None, "previous": previous,
                "output_index": index if multi else None, "result": tuple(outputs) if multi else None,
                "unsupported": unsupported, "version": version, "rule": None, "value": out,
                "inputs": list(inputs) if multi else inputs, "shape": tuple(out.shape), "dtype": out.dtype})
            live[id(out)] = (node, version, out)
            if out._base is not None:
                self.views.setdefault(id(out._base), []).append(out)
            elif name == "detach" and inputs and op is not None:  # x.data, x.detach(): x's memory, not a view
                origin = nodes[inputs[0]]["value"]
                base = origin._base if origin._base is not None else origin
                self.data_of[id(out)] = base
                self.views.setdefault(id(base), []).append(out)
            if self.anomaly and out.is_floating_point() and not torch.isfinite(out).all():
                raise FloatingPointError(
                    f"tensorgraph anomaly: {name} at {_where(source)} produced a non-finite value (nan or inf)"
                    f"{_line_text(source)}")

    def _add_constant_version(self, tensor: Tensor, op: str, source: tuple, previous: int) -> None:
        node = self.graph._add_node(op=op, kind="constant", value=tensor, version=tensor._version, source=source,
                                    scope=_scope_stack(), inplace=True, previous=previous)
        self.graph._live[id(tensor)] = (node, tensor._version, tensor)

    def _check_alias(self, func, args, kwargs, result: Tensor) -> None:
        """A call that returned its own input changed: an in-place op without a rule.

        Its old value is gone, so the new version is recorded with no rule: a gradient that
        needs to flow through it raises instead of coming out wrong.
        """
        live = self.graph._live.get(id(result))
        if live is None or result._version == live[1]:
            return
        if getattr(func, "__module__", None) == "torch.nn.init":  # re-initialised: a new constant
            with _Bookkeeping():
                self._add_constant_version(result, func_name(func), self._source(), live[0])
            return
        with _Bookkeeping():
            source = self._source()
            inputs: list[int] = []
            refs = tuple(Ref(live[0]) if a is result else self._refs_unchecked(a, inputs) for a in args)
            kwrefs = {k: Ref(live[0]) if v is result else self._refs_unchecked(v, inputs) for k, v in kwargs.items()}
            inputs.insert(0, live[0])
            name = func_name(func)
            node = self.graph._add_node(
                op=name, kind="op", value=result, version=result._version, func=func, args=refs, kwargs=kwrefs,
                source=source, scope=_scope_stack(), inplace=True, previous=live[0], inputs=inputs,
                unsupported=f"the in-place op {name} has no rule (use its out-of-place form)")
            self.graph._live[id(result)] = (node, result._version, result)

    def _refs_unchecked(self, value: Any, inputs: list[int]) -> Any:
        if isinstance(value, Tensor):
            node = self._node_of(value, check=False)
            inputs.append(node)
            return Ref(node)
        if isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) for v in value):
            return type(value)(self._refs_unchecked(v, inputs) for v in value)
        return value


_any_autocast = torch._C._is_any_autocast_enabled  # (~70 ns: checked for every op a template replays)


def _autocast_on(device_type: str) -> bool:
    """Whether torch.autocast is on for this device type; False for one autocast does not know ("meta")."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # torch raises for a device type without an autocast dispatch key
        return False


def _out_tensors(out: Any) -> list[Tensor]:
    """The tensors an ``out=`` argument names: one, or a tuple of them (``torch.max(x, 1, out=(values, indices))``)."""
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, Tensor)]


def _op_name(func: Any, entry: Any) -> str:
    """The op table's name for a call (its ``FUNCS`` entry), else the callable's own name."""
    return entry[0].name if entry is not None else func_name(func)


def _saves(nodes: list[dict[str, Any]], node: int, tensor: int) -> bool:
    """Whether torch autograd's backward of ``node``'s op keeps the value of node ``tensor`` (an input or its output).

    The op runs again under torch autograd on fresh copies of its float inputs; a saved-tensors hook sees what
    it keeps. A call that cannot run again this way counts as saving it (the refusal names it).
    """
    data = nodes[node]
    fresh: dict[int, Any] = {}
    for source in data["inputs"]:
        value = nodes[source]["value"].detach().clone()
        fresh[source] = value.requires_grad_() if value.is_floating_point() else value
    saved: list[Tensor] = []
    try:
        # (fork_rng: a random op run again here must not move the user's random stream)
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t) or t, lambda t: t):
            args = tuple(substitute(a, fresh) for a in data["args"])
            kwargs = {k: substitute(v, fresh) for k, v in data["kwargs"].items()}
            if data["inplace"]:
                args = (args[0].clone(),) + args[1:]
            result = data["func"](*args, **kwargs)
    except Exception:  # noqa: BLE001 - an op that cannot be re-run here: refused rather than guessed
        return True
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    if tensor == node:
        index = data["output_index"] or 0
        wanted = outputs[index] if data["inplace"] is False else args[0]
    else:
        wanted = fresh[tensor]
    return any(t is wanted for t in saved)


def _function_with_forward(code: types.CodeType) -> Any:
    """The ``torch.autograd.Function`` subclass whose staticmethod ``forward`` has this code, or None."""
    pending = [torch.autograd.Function]
    while pending:
        cls = pending.pop()
        forward = cls.__dict__.get("forward")
        if getattr(getattr(forward, "__func__", forward), "__code__", None) is code:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def _hooked_module(frame: types.FrameType | None) -> str:
    """The module whose call set up a backward hook, from the frames above its BackwardHookFunction."""
    while frame is not None:
        module = frame.f_locals.get("self") if frame.f_code.co_name == "_call_impl" else None
        if isinstance(module, torch.nn.Module):
            return type(module).__name__
        frame = frame.f_back
    return "<unknown>"


class _CustomCall(NamedTuple):
    """One call of a custom ``torch.autograd.Function`` in the block, as its output nodes record it."""

    cls: Any
    args: tuple
    kwargs: dict
    inputs: list[int]
    source: tuple[str, int, str, int]
    scope: tuple[str, ...]
    reason: str  # the error a gradient through it raises


def _attrs(op: Op, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``op.attrs(args, kwargs)`` without the tensor arguments (Refs), in one pass: the recorder's hot path."""
    params = op.params
    attrs = {}
    for position in range(1, min(len(params), len(args))):
        value = args[position]
        if not isinstance(value, Ref):
            attrs[params[position]] = value
    if kwargs:
        for key, value in kwargs.items():
            if not isinstance(value, Ref):
                attrs[key] = value
    if op.varargs and len(args) > len(params):
        attrs["args"] = args[max(1, len(params)):]
    return attrs


def _qualname(code: types.CodeType) -> str:
    """A code object's qualified name (``Linear.__call__``, ``main.<locals>.block``): render labels clusters with
    it; Python 3.10 has only the plain name."""
    return getattr(code, "co_qualname", code.co_name)


def _call_tree(frames: list[types.FrameType], caller: types.FrameType
               ) -> tuple[list[tuple[str, int | None]], list[types.FrameType]]:
    """Each call of the block (a node's ``call`` indexes ``frames``): its function, and the call it was made
    from, so that render nests ``Head`` inside ``MultiHeadAttention`` inside ``Block``; and the calls' frames,
    ``frames`` followed by those that ran no op themselves.

    The parent is the nearest user frame up the stack; one that ran no op itself is appended as a call of its
    own. Calls made by the block's own code have no parent (nor does the block's own frame).
    """
    index = {id(frame): i for i, frame in enumerate(frames)}
    order = list(frames)
    calls: list[tuple[str, int | None]] = []
    for frame in order:  # (grows: user frames between a call and the block that ran no op)
        parent = frame.f_back if frame is not caller else None
        steps = 0
        while parent is not None and parent is not caller and id(parent) not in index and steps < _MAX_CALL_DEPTH:
            if not _is_internal(parent.f_code):
                index[id(parent)] = len(order)
                order.append(parent)
                break
            parent = parent.f_back
            steps += 1
        up = index.get(id(parent)) if parent is not None and parent is not caller else None
        calls.append((_qualname(frame.f_code), up))
    return calls, order


_MAX_CALL_DEPTH = 200  # frames walked up from a call to find its caller (a generator's may lead elsewhere)


def _where(source: tuple | None) -> str:
    if not source:
        return "<unknown>"
    return f"{_short_path(source[0])}:{source[1]}"


def _line_text(source: tuple) -> str:
    line = linecache.getline(source[0], source[1]).strip()
    return f": {line}" if line else ""


def _guess_name(tensor: Tensor, frames: dict[int, types.FrameType]) -> str | None:
    for frame in reversed(list(frames.values())):
        for name, value in frame.f_locals.items():
            if value is tensor:
                return name
    return None


def _leave_mode_stack(mode: TorchFunctionMode) -> bool:
    """Take ``mode`` off torch's function-mode stack, wherever it is (on top, unless something went wrong);
    whether it was there.

    A KeyboardInterrupt at the wrong moment can leave a recorder off the stack, or on it after its block:
    inside torch's own ``_pop_mode_temporarily`` (run for every Python-level torch function in a block,
    ``F.cross_entropy``: it pushes the recorder back only when its suspended generator is collected, later)
    or just before the block's end took it off. Popping blindly then raised "trying to pop from empty mode
    stack" instead of the KeyboardInterrupt, or left the recorder intercepting every later torch call.
    """
    above = []
    try:
        while torch._C._len_torch_function_stack():
            top = torch._C._pop_torch_function_stack()
            if top is mode:
                return True
            above.append(top)
        return False
    finally:
        for other in reversed(above):
            torch._C._push_on_torch_function_stack(other)


class _EndedRecorder(_Recorder):
    """A recorder whose block ended while torch held it off the mode stack (see :func:`_leave_mode_stack`).

    torch pushes it back when its suspended generator is collected, at any later time: it then passes every
    call through, recording nothing, until the next block takes it off the stack.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


_GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def _recover_from_interrupts() -> None:
    """At the start of a block: undo what a KeyboardInterrupt in an earlier block's bookkeeping left behind.

    Recorders still on torch's mode stack whose block is over (its ``with`` statement's frame is no longer
    running) are taken off it, and with no recorder left, this thread's recorders cannot be busy. A learner
    interrupts a notebook's training loop often; an unlucky interrupt would otherwise leave every later torch
    call of the kernel recorded into a dead graph, or nothing recorded at all.
    """
    if not torch._C._len_torch_function_stack():
        _state.busy = False
        return
    running = set()
    frame = sys._getframe(1)
    while frame is not None:
        running.add(id(frame))
        frame = frame.f_back
    stack = [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]
    active = False
    for mode in stack:
        if not isinstance(mode, _Recorder):
            continue
        entry = mode.entry_frame
        if not mode.graph._recording or entry is None or (
                id(entry) not in running and not entry.f_code.co_flags & _GENERATOR_FLAGS):  # (a suspended block)
            _leave_mode_stack(mode)
        else:
            active = True
    if not active:
        _state.busy = False


class record:
    """Record the torch calls of a block as a :class:`Graph`.

    ``anomaly=True`` raises ``FloatingPointError`` at the first op whose output (when
    recording) or gradient (in ``graph.backward``) is not finite.

    Two guarantees can be switched off for long training loops, where they cost ~0.2 and
    ~0.1 of a torch step (``docs/performance.md``): ``names=False`` skips the search for the
    user's variable names (every node gets its op-based name, ``tanh_1``, ``leaf_1``);
    ``check_leaves=False`` skips the snapshot that lets ``graph.backward`` catch a leaf
    changed without a version bump (``p.data -= ...``, a write through ``p.numpy()``) between
    the block and the backward; like torch autograd, it then uses the changed values.
    In-place ops that bump the version counter are still caught. Gradients are the same.
    """

    def __init__(self, *, anomaly: bool = False, names: bool = True, check_leaves: bool = True) -> None:
        if anomaly and not check_leaves:
            raise ValueError("tg.record: anomaly=True checks every recorded value, leaves included; it cannot be "
                             "combined with check_leaves=False")
        self.anomaly, self.names, self.check_leaves = anomaly, names, check_leaves
        self._entered = False
        self._new_graph()

    def __getattr__(self, name: str) -> Any:
        """``graph = tg.record()`` without ``with``, then ``graph.backward(loss)``: say how to record."""
        if name.startswith("_") or not hasattr(Graph, name):
            raise AttributeError(f"'record' object has no attribute {name!r}")
        raise AttributeError(f"tg.record() is not a graph: record the forward pass in a block, `with tg.record() as "
                             f"graph:` with the forward indented under it, then call graph.{name}")

    def _new_graph(self) -> None:
        self.graph = Graph()
        self.graph.anomaly = self.anomaly
        self.graph._user_names = self.names
        self._mode = _Recorder(self.graph, self.anomaly)

    def __enter__(self) -> Graph:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("tensorgraph: tg.record() cannot record inside torch.inference_mode() (its tensors "
                               "keep no version counter); use torch.no_grad() instead")
        if self.graph._recording:
            raise RuntimeError("tensorgraph: this tg.record() object is already recording; an inner block needs "
                               "its own tg.record()")
        if self._entered:  # a record object reused across a loop: every block is its own graph, as with a new one
            self._new_graph()
        self._entered = True
        if not self.graph.anomaly:  # the last recording from this line is this one's template (tensorgraph.replay)
            self._mode.replay = _replay.session(sys._getframe(1), self.graph)
        self._mode.entry_frame = sys._getframe(1)
        self._mode.callers[id(self._mode.entry_frame)] = None  # (calls are followed up to the block, not beyond)
        self._mode.sequence_at_entry = _sequence_nr()
        if self._mode.replay is not None:
            self._mode.replay.sequence_at_entry = self._mode.sequence_at_entry
        if not hasattr(warnings.showwarning, "wrapped"):
            warnings.showwarning = _show_at_the_users_line(warnings.showwarning)
        _recover_from_interrupts()
        self._mode.nested = torch._C._len_torch_function_stack() > 0
        try:
            self._mode.__enter__()
        except BaseException:  # a KeyboardInterrupt just after torch pushed it: the block never starts
            _leave_mode_stack(self._mode)
            raise
        self.graph._recording = True
        return self.graph

    def __exit__(self, exc_type, exc, tb) -> None:
        self.graph._recording = False
        if not _leave_mode_stack(self._mode):
            self._mode.__class__ = _EndedRecorder
        with _Bookkeeping():
            if self._mode.custom_outputs or self._mode.self_views:
                self._mode._add_custom_outputs()
            caller = sys._getframe(1)
            ran = len(self._mode.frames)
            # naming reads the variables of the calls that ran no op themselves too (``h = block(x)``, then
            # ``return h``), after the others' (a node's "call" is its frame's place among those that ran ops)
            self.graph._calls, frames = _call_tree(list(self._mode.frames.values()), caller)
            session, self._mode.replay = self._mode.replay, None
            names = self.graph._user_names
            if session is None or exc_type is not None or not session.finish(caller, frames, names=names,
                                                                             check_leaves=self.check_leaves):
                found = self.graph._finish(caller, frames, start=session.count if session is not None else 0,
                                           names=names, callers=self._mode.callers, stored=self._mode.stored,
                                           ran=ran)
                # leaves can change without a version bump (p.data -= ...): backward compares these first;
                # anomaly mode stamps every node, so that intermediates changed through .data are caught too
                every = self.graph.anomaly
                stamps = LeafStamps([(node, data["value"]) for node, data in enumerate(self.graph._nodes)
                                     if every or data["kind"] == "leaf"])
                self.graph._fingerprints = stamps if self.check_leaves else NO_STAMPS
                if session is not None and exc_type is None:
                    session.remember(found, stamps.layout())  # (a template serves either setting)
        self._mode.frames.clear()
        self._mode.frame_order.clear()
        self._mode.executions.clear()
        self._mode.callers.clear()
        self._mode.stored.clear()
        self._mode.data_of.clear()
        self._mode.custom_calls.clear()
        self._mode.custom_outputs.clear()
        self._mode.self_views.clear()
        self._mode.last_frame = self._mode.entry_frame = None
