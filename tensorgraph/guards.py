"""What a compiled step specialised on, and its guard: re-checked on every call of ``tg.compile``'s step.

A recording bakes in more than its tensors' shapes: the Python values its forward read (numbers,
flags, strings), the objects it reached (a list of layers, ``model.act``, a module's submodules,
parameters and buffers), the functions it called. :func:`_direct_references` finds them, starting
from what the forward's code loads (its bytecode, the user's helper functions it names, the user's
code that ran while recording, and the methods and properties of the user's classes those name),
and :class:`_References` checks them at every call, by identity first and in a few C-level passes
(``_Attributes``, ``_Contents``); a change is described by the place and both values (``layers now
has 3 items (the recording's had 2)``). A list or dict that all the code that ran while recording
(:class:`_CodeThatRuns`) reads only by constant keys (``cfg["scale"]``) is guarded on those items
only, and one it only appends to not at all, unless something else holds it (:func:`_unaliased`).
Also here: where the forward's objects hold tensors (``_tensor_places``, for the ``torch.no_grad()``
work the step replays), the names the forward reaches its leaves by, the random number
generators outside torch, and the state within the guard's reach as it was before the recording
(:class:`_StateBefore`), against which :meth:`_References.changed_by_forward` finds the Python
state the forward itself changes (``hist.append`` in a forward reading ``len(hist)``): a guard
holding the state after the recording would pass at every call while replaying a stale loss.
"""

from __future__ import annotations

import dis
import functools
import gc
import inspect
import random
import sys
import types
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import getitem, is_, itemgetter
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .graph import Graph
from .naming import _MAX_ITEMS, _USER_MODULES, _WALKABLE, _from_a_library, _Namer, set_names
from .reads import same_number

_MISSING = object()
_UNKNOWN = object()  # a place :class:`_StateBefore` did not copy
_ATOMS = (int, float, bool, str, type(None))  # Python values a forward may read and the recording bakes in


class _Attributes:
    """The public attributes of one of the user's objects or modules, as recorded, but tensors (guarded by
    :attr:`_References.attributes` when the loss reads them): atoms (int, float, bool, str, None) by value,
    anything else by identity (``layers[1].eps``, ``layers[1].training``, ``model.act``, ``net.layers``). One
    C-level look-up of them all per call (``itemgetter``), compared by identity."""

    __slots__ = ("path", "attrs", "names", "get", "values", "single")

    def __init__(self, path: str, attrs: Mapping[str, Any], names: tuple[str, ...]) -> None:
        self.path, self.attrs, self.names = path, attrs, names
        self.get = itemgetter(*names)  # one name: its value; several: a tuple of them
        self.values = self.get(attrs)
        self.single = len(names) == 1

    def same(self) -> bool:
        """Whether every attribute still holds the very object it held (the check made on every call)."""
        try:
            now = self.get(self.attrs)
        except KeyError:  # an attribute was deleted
            return False
        return now is self.values or (not self.single and all(map(is_, now, self.values)))

    def change(self) -> str | None:
        """What changed (an atom compared as Python code can tell: same type and value, a NaN equals a NaN), or
        None: then the values are equal atoms in new objects, kept so that the next call's check is by identity."""
        for name, then in zip(self.names, (self.values,) if self.single else self.values):
            why = _replaced(f"{self.path}.{name}", then, self.attrs.get(name, _MISSING))
            if why is not None:
                return why
        self.values = self.get(self.attrs)
        return None


def _attributes(path: str, attrs: dict, *, module: bool = False, atoms: bool = False, loaded: Collection[str] = (),
                private: Collection[str] = ()) -> _Attributes | None:
    """The guard on the attributes of an object's ``__dict__``, or None if it has none: those but tensors whose
    names the forward's code loads (``loaded``: ``model.act``, ``layer.eps``; not a ``self.losses`` or a step
    counter that only the training loop changes), and with ``atoms`` its atoms whatever their names (of a module
    whose class is torch's or a library's: that code reads ``eps``, ``momentum``). Of a module: not ``training``
    (guarded with the module's mode) nor torch's internal ``_`` names (its submodules, parameters and buffers
    are guarded as :class:`_Contents`) but those in ``private`` (the user's code loads ``self._scale``)."""
    names = tuple(name for name, value in attrs.items() if isinstance(name, str) and not isinstance(value, Tensor)
                  and (name in loaded or (atoms and type(value) in _ATOMS))
                  and not (module and (name == "training" or (name.startswith("_") and name not in private))))
    return _Attributes(path, attrs, names) if names else None


def _replaced(path: str, then: Any, now: Any, read: Mapping[int, Tensor] | None = None) -> str | None:
    """Why ``now`` in place of ``then`` (what the recording found at ``path``) makes the recording wrong, or None
    for an equal atom (a number is compared as Python code can tell) or, given ``read``, a tensor the loss did
    not read."""
    if now is then:
        return None
    if now is _MISSING:
        return f"{path} was deleted (the recording ran with {_shown(then)})"
    if type(then) in _ATOMS:
        return None if same_number(now, then) else f"{path} is now {_shown(now)} (the recording ran with {then!r})"
    if isinstance(then, Tensor):
        if read is not None and read.get(id(then)) is not then:
            return None
        return f"{path} now refers to a different tensor"
    return f"{path} now refers to a different object ({_shown(now)})"


def _shown(value: Any) -> str:
    """A value as a guard's message shows it: an atom as its repr, anything else by its type."""
    if type(value) in _ATOMS:
        return repr(value)
    if isinstance(value, Tensor):
        return "a tensor"
    if callable(value) and isinstance(getattr(value, "__name__", None), str) and not isinstance(value, torch.nn.Module):
        return value.__name__  # a function, a class
    return f"a {type(value).__name__}"


class _Contents:
    """The items of the lists and dicts the forward reaches (``layers``, ``cfg``, modules' submodules and
    parameters), as recorded: all of them checked by identity in a few C-level passes per call, however many
    there are. A replaced item is compared by :func:`_replaced` (an equal atom, or a tensor the loss did not
    read, is accepted); another length, or other keys or another order of them (a loop over them would run
    differently), is a change. Of a list or dict that the user's code only reads items of by constant keys
    (``cfg["scale"]``, ``log[-1]``), only the items at those keys are guarded (their presence too: a key the
    code reads with ``cfg.get`` may come or go); of a list it only appends to, nothing (:func:`_keys_read`)."""

    __slots__ = ("parts", "read", "containers", "lists", "dicts", "sizes", "list_items", "dict_keys",
                 "dict_values", "recorded", "keyed", "keyed_lists", "list_indices", "keyed_dicts",
                 "dict_keys_read", "list_values", "dict_values_read", "appended")

    def __init__(self, merged: Sequence[tuple[str, list | dict, str, frozenset | None]],
                 read: Mapping[int, Tensor]) -> None:
        """``merged``: each list or dict once (:func:`_merged`, :func:`_unaliased`)."""
        self.read = read
        self.parts = [(path, container, form) for path, container, form, keys in merged if keys is None]
        # (path, container, how a key is shown: "[{!r}]", ".{}")
        self.keyed = sorted(((path, container, form, key) for path, container, form, keys in merged
                             if keys is not None for key in keys),
                            key=lambda part: isinstance(part[1], dict))  # one item each: the lists' first
        self.appended = [path for path, _, _, keys in merged if keys == frozenset()]
        self.containers = [container for _, container, _ in self.parts]
        self.lists = [c for c in self.containers if not isinstance(c, dict)]
        self.dicts = [c for c in self.containers if isinstance(c, dict)]
        self.keyed_lists = [c for _, c, _, _ in self.keyed if not isinstance(c, dict)]
        self.list_indices = [key for _, c, _, key in self.keyed if not isinstance(c, dict)]
        self.keyed_dicts = [c for _, c, _, _ in self.keyed if isinstance(c, dict)]
        self.dict_keys_read = [key for _, c, _, key in self.keyed if isinstance(c, dict)]
        self._take()

    def _take(self) -> None:
        self.sizes = tuple(map(len, self.containers))
        self.list_items = tuple(chain.from_iterable(self.lists))
        self.dict_keys = tuple(chain.from_iterable(self.dicts))
        self.dict_values = tuple(chain.from_iterable(map(dict.values, self.dicts)))
        self.recorded = [_items(container) for container in self.containers]
        self.list_values = tuple(map(_item_at, self.keyed_lists, self.list_indices))
        self.dict_values_read = tuple(map(dict.get, self.keyed_dicts, self.dict_keys_read, repeat(_MISSING)))

    def __bool__(self) -> bool:
        return bool(self.parts or self.keyed)

    def same(self) -> bool:
        """Whether they hold the very same items (and keys), in the same order (the check made on every call)."""
        return ((not self.containers
                 or (tuple(map(len, self.containers)) == self.sizes  # (then the identity passes compare equal lengths)
                     and all(map(is_, chain.from_iterable(self.lists), self.list_items))
                     and all(map(is_, chain.from_iterable(map(dict.values, self.dicts)), self.dict_values))
                     and all(map(is_, chain.from_iterable(self.dicts), self.dict_keys))))
                and (not self.keyed or self._same_keyed()))

    def _same_keyed(self) -> bool:
        """Whether the items at the keys read are the very same (a key read by ``cfg.get`` still missing)."""
        try:
            return (all(map(is_, map(dict.get, self.keyed_dicts, self.dict_keys_read, repeat(_MISSING)),
                            self.dict_values_read))
                    and all(map(is_, map(getitem, self.keyed_lists, self.list_indices), self.list_values)))
        except IndexError:  # a list the code reads ``log[3]`` of is shorter
            return False

    def change(self) -> str | None:
        """What changed, or None (equal atoms, or tensors the loss did not read, in new objects: kept)."""
        for (path, container, form), (keys, items) in zip(self.parts, self.recorded):
            why = _container_change(path, form, keys, items, *_items(container), self.read)
            if why is not None:
                return why
        for (path, container, form, key), then in zip(self.keyed, self.list_values + self.dict_values_read):
            why = _item_change(f"{path}{form.format(key)}", then, _item_at(container, key), self.read)
            if why is not None:
                return why
        self._take()
        return None

    def changed_by_forward(self, before: _StateBefore, read: Mapping[int, Tensor],
                           rebound: Collection[tuple[int, Any]]) -> str | None:
        """The first list or dict guarded here (or item read by a constant key) that the forward itself changed
        while it was recorded (see :meth:`_References.changed_by_forward`), or None."""
        for (path, container, _), (keys, items) in zip(self.parts, self.recorded):
            then = before.copy_of(container)
            if then is None:
                continue
            keys_then = tuple(then) if keys is not None else None
            items_then = tuple(then.values()) if keys is not None else tuple(then)
            if keys_then != keys or len(items_then) != len(items) or any(
                    _differs(b, a, read) for key, b, a in zip(keys or range(len(items)), items_then, items)
                    if (id(container), key) not in rebound):
                return f"{path} (a {type(container).__name__})"
        for (path, container, form, key), value in zip(self.keyed, self.list_values + self.dict_values_read):
            then = before.copy_of(container)
            if then is not None and _differs(_item_at(then, key), value, read):
                return f"{path}{form.format(key)}"
        return None


def _differs(then: Any, now: Any, read: Mapping[int, Tensor]) -> bool:
    """Whether ``now`` in place of ``then`` (a place's value before the forward ran, and after) is a change the
    guard would see: not the same object, nor an equal atom (compared as :func:`_replaced` compares), nor, both
    tensors, one the loss does not read in place of another it does not read either. ``then`` may be
    ``_UNKNOWN`` (not copied before the recording): no change known."""
    if then is now or then is _UNKNOWN:
        return False
    if type(then) in _ATOMS and type(now) in _ATOMS:
        return not same_number(now, then)
    if isinstance(then, Tensor) and isinstance(now, Tensor):
        return read.get(id(then)) is then or read.get(id(now)) is now
    return True


def _merged(parts: Sequence[tuple[str, list | dict, str, frozenset | None, Any]]
            ) -> list[tuple[str, list | dict, str, frozenset | None, list]]:
    """Each list or dict once, as the first path found to it names it, with the keys that all the paths to it
    read (None, all of it, where one path reads all of it) and what holds it on those paths."""
    merged: dict[int, tuple[str, list | dict, str, frozenset | None, list]] = {}
    for path, container, form, keys, holder in parts:
        first = merged.get(id(container))
        holders = [holder]
        if first is not None:
            keys = None if first[3] is None or keys is None else first[3] | keys
            path, form, holders = first[0], first[2], first[4] + holders
        merged[id(container)] = (path, container, form, keys, holders)
    return list(merged.values())


def _unaliased(parts: list[tuple[str, list | dict, str, frozenset | None, list]], internal: Iterable[Any]
               ) -> list[tuple[str, list | dict, str, frozenset | None]]:
    """The parts, each list or dict guarded by keys (:func:`_keys_read`) guarded whole instead where something
    other than what holds it by the names the code reads it by refers to it (``gc.get_referrers``): an object the
    walk does not reach (deeper than three levels, a library's), a list or tuple, a suspended generator. Code
    reaching it that way, by a name the guard did not follow or by no name, may read any item. ``internal``:
    the guard's own records of the objects it found (the tuples and guards holding them); the frames running now
    (the training loop above the step) do not count."""
    narrowed = [part for part in parts if part[3] is not None]
    if not narrowed:
        return [part[:4] for part in parts]
    known = set(map(id, internal))
    known.update(id(holder) for part in narrowed for holder in part[4])
    known.update(map(id, parts))
    frame: types.FrameType | None = sys._getframe()
    while frame is not None:
        known.add(id(frame))
        frame = frame.f_back
    containers = [part[1] for part in narrowed]
    known.update((id(containers), id(narrowed)))
    held_elsewhere: set[int] = set()
    for referrer in gc.get_referrers(*containers):
        if id(referrer) not in known:
            held_elsewhere.update(map(id, gc.get_referents(referrer)))
    return [(path, container, form, None if id(container) in held_elsewhere else keys)
            for path, container, form, keys, _ in parts]


def _item_at(container: list | dict, key: Any) -> Any:
    """The item at ``key``, or ``_MISSING``."""
    try:
        return container[key]
    except (IndexError, KeyError):
        return _MISSING


def _item_change(path: str, then: Any, now: Any, read: Mapping[int, Tensor]) -> str | None:
    """Why the item the code reads by a constant key (:class:`_Contents`) makes the recording wrong, or None."""
    if then is _MISSING and now is not _MISSING:
        return f"{path} was added (the recording ran without it)"
    return _replaced(path, then, now, read)


def _items(container: list | dict) -> tuple[tuple | None, tuple]:
    """A list's items (no keys), or a dict's keys and values."""
    if isinstance(container, dict):
        return tuple(container), tuple(container.values())
    return None, tuple(container)


def _container_change(path: str, form: str, keys: tuple | None, items: tuple, keys_now: tuple | None,
                      items_now: tuple, read: Mapping[int, Tensor]) -> str | None:
    """What changed in one list or dict since the recording (:class:`_Contents`), or None."""
    if keys is None and len(items_now) != len(items):
        return f"{path} now has {len(items_now)} items (the recording's had {len(items)})"
    if keys is not None and keys_now != keys:
        gone = [key for key in keys if key not in keys_now]
        if gone:
            return f"{path}{form.format(gone[0])} was deleted"
        added = [key for key in keys_now if key not in keys]
        if added:
            return f"{path}{form.format(added[0])} was added"
        return f"the keys of {path} are in another order (the recording's: {list(keys)})"
    for key, then, now in zip(keys if keys is not None else range(len(items)), items, items_now):
        why = _replaced(f"{path}{form.format(key)}", then, now, read)
        if why is not None:
            return why
    return None


@dataclass
class _References:
    """What the forward reads directly from its globals and closure, as recorded: tensors (by identity),
    atoms (int, float, bool, str, None: by value), anything else by identity (a function, a module, a list of
    layers), nn.Modules (their and their submodules' ``training``, submodules and parameters), the attributes of
    the user's own objects and of modules reachable from them (``layers[1].training``, ``layers[1].eps``,
    ``model.0.p``, ``model.act``), and the items of the lists and dicts among them (``layers[2]``,
    ``cfg['scale']``)."""

    tensors: list[tuple[str, Any, str, Tensor]] = field(default_factory=list)  # (kind, owner, name, tensor)
    atoms: list[tuple[str, Any, str, Any]] = field(default_factory=list)  # (kind, owner, name, value)
    bindings: list[tuple[str, Any, str, Any]] = field(default_factory=list)  # (kind, owner, name, object)
    modules: list[tuple[str, list[tuple[str, Any]], tuple[bool, ...]]] = field(default_factory=list)
    objects: list[_Attributes] = field(default_factory=list)  # the attributes of objects and modules
    contents: list[tuple[str, list | dict, str, frozenset | None, Any]] = field(default_factory=list)  # (path,
    # container, key form, the keys the forward reads: None for all of it, what holds it by name: see _keys_read)
    held: _Contents | None = None  # what ``contents`` hold (their guard: made when the search is done)
    attributes: list[tuple[str, dict, str, Tensor]] = field(default_factory=list)  # (path, __dict__, name, tensor)
    shadowed: list[tuple[str, dict, frozenset[str]]] = field(default_factory=list)  # (path, __dict__, class names)
    stored: list[str] = field(default_factory=list)  # attributes holding a tensor the forward made: ``layers[0].out``
    appended: list[str] = field(default_factory=list)  # lists the forward only appends to (unguarded): ``acts``
    loaded: list[tuple[_Place, tuple]] = field(default_factory=list)  # places the step reads and rebinds: (shape ...)

    def changed(self) -> str | None:
        """What changed since the recording, or None."""
        for kind, owner, name, tensor in self.tensors:  # every call: written out for speed
            if (owner.get(name) if kind == "global" else owner.cell_contents) is not tensor:
                return f"{name!r} now refers to a different tensor"
        for path, attrs, name, tensor in self.attributes:
            if attrs.get(name) is not tensor:
                return f"{path}.{name} now refers to a different tensor"
        for place, spec in self.loaded:  # rebound by the step itself: any tensor of the recording's kind will do
            value = place.get()
            if not isinstance(value, Tensor) or _spec(value) != spec:
                now = f"a tensor of shape {tuple(value.shape)}, {value.dtype}" if isinstance(value, Tensor) else \
                    "no tensor"
                return f"{place.path} now holds {now} (the recording's held shape {tuple(spec[0])}, {spec[1]})"
        for guard in self.objects:  # by identity; a new object is compared by value when it is an atom
            if not guard.same():
                why = guard.change()
                if why is not None:
                    return why
        for path, attrs, names in self.shadowed:  # an instance attribute set over the class's: one C-level test
            if not attrs.keys().isdisjoint(names):
                name = min(names & attrs.keys())
                return f"{path}.{name} was set on the object (the recording read its class's {name})"
        held = self.held
        if held is not None and not held.same():
            why = held.change()
            if why is not None:
                return why
        if self.atoms or self.modules or self.bindings:
            return self._changed_python()
        return None

    def rebound(self) -> bool:
        """Whether a tensor the recording captured was replaced: then that recording can never run again."""
        return any((owner.get(name) if kind == "global" else _current(kind, owner, name)) is not tensor
                   for kind, owner, name, tensor in self.tensors) or \
            any(attrs.get(name) is not tensor for _, attrs, name, tensor in self.attributes)

    def _changed_python(self) -> str | None:
        for kind, owner, name, value in self.bindings:
            current = _current(kind, owner, name)
            if current is not value:
                return _replaced(repr(name), value, current) or f"{name!r} now refers to a different object"
        for kind, owner, name, value in self.atoms:
            current = _current(kind, owner, name)
            if current is not value and not same_number(current, value):
                now = "is no longer defined" if current is _MISSING else f"changed from {value!r} to {current!r}"
                return f"{name!r} {now} (the recording used its value)"
        for name, modules, flags in self.modules:
            for (path, module), flag in zip(modules, flags):
                if module.training is not flag:
                    mode = "training" if module.training else "eval"
                    return f"{name}{'.' + path if path else ''} was switched to {mode} mode (.training is now " \
                           f"{module.training})"
        return None

    def changed_by_forward(self, before: _StateBefore, read: Mapping[int, Tensor]) -> str | None:
        """The first place watched here that the forward itself changed while it was recorded (``hist.append``
        in a forward that reads ``len(hist)``, ``self.step += 1``, ``global n; n += 1``), named as the guard names
        it (``hist (a list)``, ``self.step``, ``the global 'n'``), or None. The guard holds the state after the
        recording, which the compiled step, running no Python code, would never change again: it would replay that
        state's loss at every call. ``before``: the state before the recording (a place it did not copy is not
        compared); ``read``: the tensors the loss depends on (another tensor in place of one it does not read is no
        change, as for the guard). Not the places the step itself reads and rebinds (:attr:`loaded`: a running
        statistic rebound under no_grad)."""
        rebound = {key for place, _ in self.loaded for key in _place_keys(place)}
        for kind, owner, name, value in chain(self.tensors, self.atoms, self.bindings):
            then = before.value(kind, owner, name)
            if (id(owner), name) not in rebound and _differs(then, value, {id(value): value}):
                return f"the {'global' if kind == 'global' else 'closure variable'} {name!r}"
        for path, attrs, name, tensor in self.attributes:
            if (id(attrs), name) not in rebound and _differs(before.item(attrs, name), tensor, {id(tensor): tensor}):
                return f"{path}.{name}"
        for guard in self.objects:
            for name, value in zip(guard.names, (guard.values,) if guard.single else guard.values):
                if (id(guard.attrs), name) not in rebound and _differs(before.item(guard.attrs, name), value, read):
                    return f"{guard.path}.{name}"
        for name, modules, flags in self.modules:
            for (path, module), flag in zip(modules, flags):
                if before.training(module) not in (None, flag):
                    return f"the training mode of {name}{'.' + path if path else ''}"
        return self.held.changed_by_forward(before, read, rebound) if self.held is not None else None


def _spec(tensor: Tensor) -> tuple:
    return tensor.shape, tensor.dtype, tensor.device


def _current(kind: str, owner: Any, name: str) -> Any:
    if kind == "global":
        return owner.get(name, _MISSING)
    try:
        return owner.cell_contents
    except ValueError:  # an emptied cell
        return _MISSING


def _random_states() -> list[tuple[str, Callable[[], Any], Any]]:
    """The global random number generators outside torch that a forward may draw from (``random.sample``,
    ``np.random.randint``), each with its state now."""
    getters: list[tuple[str, Callable[[], Any]]] = [("Python's random module", random.getstate)]
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        getters.append(("numpy.random", numpy.random.get_state))
    return [(name, get, get()) for name, get in getters]


def _drew_from(states: list[tuple[str, Callable[[], Any], Any]]) -> str | None:
    """The first of these generators whose state is no longer the one recorded, or None."""
    return next((name for name, get, before in states if not _same_state(get(), before)), None)


def _same_state(now: Any, then: Any) -> bool:
    if isinstance(now, tuple):
        return isinstance(then, tuple) and len(now) == len(then) and all(map(_same_state, now, then))
    if hasattr(now, "tobytes"):  # numpy's key array
        return hasattr(then, "tobytes") and now.tobytes() == then.tobytes()
    return now == then


def _name_references(graph: Graph, forward: Callable[..., Any],
                     earlier: Sequence[tuple[str, Tensor]] = ()) -> None:
    """Leaves the recorder could not name take the names the forward reaches them by: a global or closure
    variable (``W1``), or a path through an object it names (``model.0.weight``), as ``tg.record`` names them.
    ``earlier``: tensors by where the forward found them before it rebound that place (``layers[1].running_mean``)."""
    named = {n: d["name"] for n, d in enumerate(graph._nodes) if d["named"]}
    namer = _Namer(graph)
    namer.named, namer.used = dict(named), set(named.values())
    for name, value in earlier:
        namer.offer(name, value)
    references = _read_directly(forward)
    for _, _, name, value in references:
        if isinstance(value, Tensor):
            namer.offer(name, value)
    for _, _, name, value in references:
        if not isinstance(value, Tensor) and type(value) not in _ATOMS:
            namer.walk(name, value, depth=3)
    if len(namer.named) > len(named):
        set_names(graph, namer.named)


class _CodeThatRuns:
    """The code of every Python function that runs while the forward is recorded, with its globals: a profile
    hook (``sys.setprofile``) for the time of the ``with`` block. What the guard narrows to the keys the code
    reads (:func:`_loaded_names`) must be read so by all of it, not only by the code it finds from the forward's
    names (a method that calls no torch function, a helper four calls down, a function held in a dict).
    ``complete`` is False where another profile hook was installed (a profiler, an enclosing recording): then
    what ran is not known. ``first_call`` is told each function's code and globals when it first runs (before
    its first line: :meth:`_StateBefore.enter`)."""

    def __init__(self, first_call: Callable[[types.CodeType, dict], None] | None = None) -> None:
        self.code: dict[types.CodeType, dict] = {}
        self.complete = False
        self._hook: Callable[..., None] | None = None
        self._first_call = first_call

    def __enter__(self) -> _CodeThatRuns:
        if sys.getprofile() is not None:
            return self
        code, first_call = self.code, self._first_call

        def hook(frame: types.FrameType, event: str, arg: Any) -> None:
            if event == "call" and frame.f_code not in code:
                code[frame.f_code] = frame.f_globals
                if first_call is not None:
                    first_call(frame.f_code, frame.f_globals)

        self._hook = hook
        sys.setprofile(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hook is not None:
            self.complete = sys.getprofile() is self._hook
            if self.complete:  # (else the forward set a hook of its own: left to it)
                sys.setprofile(None)
            self._hook = None

    def users(self) -> list[tuple[types.CodeType, dict]]:
        """The user's code among it (not a library's, nor tensorgraph's), with its globals."""
        return [(code, globals_) for code, globals_ in self.code.items() if _users_module(globals_.get("__name__"))]

    def but_tensorgraphs(self) -> list[types.CodeType]:
        """All of it but tensorgraph's own (the recorder's, which reaches no object by the user's names)."""
        return [code for code, globals_ in self.code.items() if not _tensorgraphs(globals_.get("__name__"))]


def _tensorgraphs(module: Any) -> bool:
    return isinstance(module, str) and module.startswith("tensorgraph") and not module.startswith(_USER_MODULES)


def _read_by(code: Sequence[tuple[types.CodeType, dict]], seen: set[tuple[int, str]]
             ) -> list[tuple[str, Any, str, Any]]:
    """The globals that these code objects of the user's (and the code nested in them) read, as
    :func:`_read_directly` gives them, but those in ``seen``."""
    found = []
    for body, globals_ in code:
        if _users_module(globals_.get("__name__")):
            found.extend(_globals_read(body, globals_, seen))
    return found


def _globals_read(code: types.CodeType, globals_: dict, seen: set[tuple[int, str]]
                  ) -> list[tuple[str, Any, str, Any]]:
    """The globals ``code`` loads that ``globals_`` defines, as ``("global", globals_, name, value)``, but those
    in ``seen`` (which gets these)."""
    found = [("global", globals_, name, globals_[name]) for name in _code_names(code).globals
             if name in globals_ and (id(globals_), name) not in seen]
    seen.update((id(globals_), name) for _, _, name, _ in found)
    return found


_CALL_DEPTH = 3  # how many calls down the guard follows the user's functions a forward names (helpers of helpers)


def _read_directly(forward: Callable[..., Any], depth: int = _CALL_DEPTH, seen: set[tuple[int, str]] | None = None,
                   code_read: list[types.CodeType] | None = None) -> list[tuple[str, Any, str, Any]]:
    """Every global and closure variable the forward's own code reads (its comprehensions and lambdas too), and
    those of the user's functions it names, ``depth`` calls down (``mlp(x)`` reading ``layers``):
    (kind, owner, name, value), each place once. ``code_read`` gets the code objects read."""
    while isinstance(forward, functools.partial):
        forward = forward.func
    code = getattr(forward, "__code__", None)
    if code is None:
        return []
    seen = set() if seen is None else seen
    if code_read is not None:
        code_read.append(code)
    found = _globals_read(code, getattr(forward, "__globals__", {}), seen)
    for name, cell in zip(code.co_freevars, getattr(forward, "__closure__", None) or ()):
        value = _current("cell", cell, name)
        if value is not _MISSING and (id(cell), name) not in seen:
            seen.add((id(cell), name))
            found.append(("cell", cell, name, value))
    if depth > 0:
        for *_, value in list(found):
            if isinstance(value, types.FunctionType) and _users_function(value):
                found.extend(_read_directly(value, depth - 1, seen, code_read))
    return found


class _CodeNames(NamedTuple):
    """The names a code object and the code nested in it (comprehensions, lambdas) use, by its bytecode
    (``co_names`` holds both kinds: ``self.out`` is not the global ``out``)."""

    globals: tuple[str, ...]  # loaded as globals (LOAD_GLOBAL, LOAD_NAME), in order
    attributes: frozenset[str]  # loaded as attributes (``self.layers``, ``model.act(x)``), and the strings that
    # could name one (``getattr(self, "layers")``)
    uses: Mapping[str, frozenset | None]  # how each name loaded (a global, closure variable or attribute) is used:
    # see _use_of
    generic: bool  # it may reach attributes or variables by names it computes: see _is_generic


@functools.lru_cache(maxsize=4096)  # (the code of torch's functions that ran too)
def _code_names(code: types.CodeType) -> _CodeNames:
    global_names: list[str] = []
    attributes: set[str] = set()
    uses: dict[str, frozenset | None] = {}
    instructions = [i for i in dis.get_instructions(code) if i.opname not in ("EXTENDED_ARG", "NOP")]
    generic = any(_is_generic(instructions, index) for index in range(len(instructions)))
    for index, instruction in enumerate(instructions):
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            global_names.append(instruction.argval)
        elif instruction.opname in ("LOAD_ATTR", "LOAD_METHOD"):
            attributes.add(instruction.argval)
        if instruction.opname in _LOADS:
            _add_use(uses, instruction.argval, _use_of(instructions, index))
        elif instruction.opname in _STORES:
            uses[instruction.argval] = None  # the code rebinds it (a Python side effect the step does not replay)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            nested = _code_names(const)
            global_names.extend(nested.globals)
            attributes |= nested.attributes
            for name, use in nested.uses.items():
                _add_use(uses, name, use)
            generic = generic or nested.generic
        elif isinstance(const, str) and const.isidentifier():
            attributes.add(const)
            uses[const] = None  # ``getattr(self, "layers")``: what it reads of the object is not known
    return _CodeNames(tuple(dict.fromkeys(global_names)), frozenset(attributes), uses, generic)


_BY_NAME = frozenset({"vars", "globals", "locals", "eval", "exec", "dir", "attrgetter", "getmembers", "__dict__",
                      "getattr"})


def _is_generic(instructions: Sequence[dis.Instruction], index: int) -> bool:
    """Whether the instruction at ``index`` may reach an object's attributes or a module's variables by names the
    code computes (``vars(self)``, ``self.__dict__``, ``globals()``, ``getattr(self, name)``): then what the
    code reads of a list or dict is not known by the names it loads. ``getattr(obj, "name")`` and
    ``getattr(self.block, "name", None)`` name what they read."""
    instruction = instructions[index]
    if instruction.opname not in _LOADS or instruction.argval not in _BY_NAME:
        return False
    if instruction.argval != "getattr":
        return True
    after = iter(instructions[index + 1:index + 12])
    step = next(after, None)  # the object: a variable, and the attributes on it
    if step is None or step.opname not in ("LOAD_FAST", "LOAD_DEREF", "LOAD_GLOBAL", "LOAD_NAME"):
        return True
    step = next(after, None)
    while step is not None and step.opname == "LOAD_ATTR" and not _is_method(step):
        step = next(after, None)
    if step is None or step.opname not in _CONSTANTS or not isinstance(step.argval, str):
        return True  # a name it computes
    step = next(after, None)
    if step is not None and step.opname in _CONSTANTS:  # a constant default
        step = next(after, None)
    if step is not None and step.opname == "PRECALL":
        step = next(after, None)
    return step is None or step.opname not in ("CALL", "CALL_FUNCTION")


# the loads of a name whose use _use_of looks at (not LOAD_FAST: a local is no place the guard reaches objects by)
_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLASSDEREF", "LOAD_FROM_DICT_OR_DEREF",
                    "LOAD_FROM_DICT_OR_GLOBALS", "LOAD_ATTR", "LOAD_METHOD", "LOAD_SUPER_ATTR"})
_STORES = frozenset({"STORE_GLOBAL", "STORE_NAME", "STORE_DEREF", "STORE_ATTR", "DELETE_GLOBAL", "DELETE_NAME",
                     "DELETE_DEREF", "DELETE_ATTR"})
_APPENDS = object()  # in a use: the name's list is appended to (``acts.append(h)``)


def _add_use(uses: dict[str, frozenset | None], name: str, use: frozenset | None) -> None:
    """Merge one more use of ``name`` (None, any use but a constant key or an append, wins)."""
    if name in uses:
        then = uses[name]
        use = None if then is None or use is None else then | use
    uses[name] = use


def _use_of(instructions: Sequence[dis.Instruction], index: int) -> frozenset | None:
    """What the code does with the value the instruction at ``index`` loads: subscripts it with a constant
    key (``cfg["scale"]``, ``log[-1]``, ``cfg.get("scale")``, ``cfg.get("scale", 1.0)``): that key; appends to
    it (``acts.append(h)``): ``_APPENDS``; anything else (iterates it, passes it on, stores it, writes an item):
    None. The bytecode of another Python version that these patterns do not match reads as None."""
    after = instructions[index + 1:index + 6]
    if len(after) >= 2 and after[0].opname in _CONSTANTS and _is_subscript(after[1]) and _is_key(after[0].argval):
        return frozenset({after[0].argval})
    if not after or not _is_method(after[0]):
        return None
    if after[0].argval == "append":  # a method load is always called: the list is only appended to
        return frozenset({_APPENDS})
    if after[0].argval == "get" and len(after) >= 3 and after[1].opname in _CONSTANTS and _is_key(after[1].argval):
        constants = 2 if after[2].opname in _CONSTANTS else 1  # the key, and a constant default
        call = [i for i in after[1 + constants:] if i.opname != "PRECALL"][:1]
        if call and call[0].opname in ("CALL", "CALL_METHOD") and call[0].arg == constants:
            return frozenset({after[1].argval})
    return None


_CONSTANTS = ("LOAD_CONST", "LOAD_SMALL_INT")


def _is_subscript(instruction: dis.Instruction) -> bool:
    """``BINARY_SUBSCR`` (``BINARY_OP []`` from Python 3.14): an item read, not written."""
    return instruction.opname == "BINARY_SUBSCR" or (instruction.opname == "BINARY_OP" and instruction.argrepr == "[]")


def _is_method(instruction: dis.Instruction) -> bool:
    """A method loaded to be called at once (``LOAD_METHOD``; from Python 3.12, ``LOAD_ATTR`` with its low bit)."""
    return instruction.opname == "LOAD_METHOD" or (
        instruction.opname == "LOAD_ATTR" and sys.version_info >= (3, 12) and bool(instruction.arg & 1))


def _is_key(value: Any) -> bool:
    """A constant key whose item the guard can look up as the code does (not a slice, a float, None)."""
    if isinstance(value, tuple):
        return all(map(_is_key, value))
    return type(value) in (str, int, bool, bytes)


class _CodeReads(NamedTuple):
    """What the forward's code may read of the objects it reaches (:func:`_loaded_names`)."""

    attributes: frozenset[str]  # the attribute names it loads
    keys: Mapping[str, frozenset]  # the names (globals, closure variables, attributes) whose lists and dicts it
    # only reads items of by constant keys (``cfg["scale"]``): those keys; or only appends to (``acts.append``): none
    by_any: frozenset[str] | None  # the attribute names that any code that ran while recording loads (a library's
    # too), None where what ran is not known


def _loaded_names(code: list[types.CodeType], classes: Collection[type], ran: _CodeThatRuns | None = None
                  ) -> _CodeReads:
    """The attribute names that ``code`` loads, and the methods and properties of ``classes`` it names in turn
    (``self.activation()`` returning ``self.act``), and what calling one of their objects runs (``__call__``,
    an nn.Module's ``forward``: ``model(x)`` in a forward whose own code loads no attribute): what the forward
    may read of the objects it reaches; and how all that code, and all the code that ``ran`` while recording
    (a library's too), uses the names it loads (:func:`_use_of`). No keys are known unless ``ran`` is
    complete, nor where the user's code reaches attributes or variables by names it computes (_is_generic)."""
    loaded: set[str] = set()
    uses: dict[str, frozenset | None] = {}
    by_any: set[str] = set()
    if ran is not None and ran.complete:
        for body in ran.but_tensorgraphs():
            names = _code_names(body)
            by_any |= names.attributes
            for name, use in names.uses.items():
                _add_use(uses, name, use)
    pending, done = list(code), set()
    for cls in classes:
        for name in _CALLED:
            pending.extend(_code_of(inspect.getattr_static(cls, name, None)))
    while pending:
        body = pending.pop()
        if body in done:
            continue
        done.add(body)
        names = _code_names(body)
        loaded |= names.attributes
        for name, use in names.uses.items():
            _add_use(uses, name, use)
        for cls in classes:
            for name in names.attributes:
                pending.extend(_code_of(inspect.getattr_static(cls, name, None)))
    keys = {name: use - {_APPENDS} for name, use in uses.items()
            if use is not None and (_APPENDS not in use or len(use) == 1)}  # (appended and read: whole)
    complete = ran is not None and ran.complete
    known = complete and not any(_code_names(body).generic for body in done)
    return _CodeReads(frozenset(loaded), keys if known else {}, frozenset(by_any | loaded) if complete else None)


_CALLED = ("__call__", "forward")  # what calling an object runs (an nn.Module's __call__ runs its forward)


def _code_of(member: Any) -> Iterator[types.CodeType]:
    """The code of a class member: a method's, a static or class method's, a property's getter and setter."""
    if isinstance(member, (staticmethod, classmethod)):
        member = member.__func__
    if isinstance(member, property):
        yield from (f.__code__ for f in (member.fget, member.fset) if isinstance(f, types.FunctionType))
    elif isinstance(member, types.FunctionType):
        yield member.__code__


def _users_classes(roots: Iterable[tuple[str, Any]]) -> set[type]:
    """The user's own classes among the objects within the guard's reach of these (and their modules')."""
    classes: set[type] = set()
    seen: dict[int, bool] = {}
    for path, value in roots:
        for _, obj, attrs, _ in _objects_within_reach(path, value, _FLAG_DEPTH, seen):
            objects = [module for module in obj.modules()] if attrs is None else [obj]
            classes.update(type(o) for o in objects if _users_module(type(o).__module__))
    return classes


def _users_function(function: types.FunctionType) -> bool:
    """Whether a function is the user's own (a script's, a notebook's, the lecture's), not a library's."""
    return _users_module(getattr(function, "__module__", None))


@functools.lru_cache(maxsize=1024)
def _users_module(module: Any) -> bool:
    """Whether code of the module of this name is the user's own, not a library's (nor tensorgraph's)."""
    if not isinstance(module, str):
        return True  # code made by exec() with globals of its own: the user's
    if module.startswith(_USER_MODULES):
        return True
    return not module.startswith("tensorgraph") and not _from_a_library(module)


def _direct_references(forward: Callable[..., Any], leaves: dict[int, Tensor], read: dict[int, Tensor],
                       made: dict[int, Tensor], code: Sequence[tuple[types.CodeType, dict]] = (),
                       ran: _CodeThatRuns | None = None, before: _StateBefore | None = None) -> _References:
    """What the forward names directly (globals, closure cells) that the guard re-checks: recorded tensors,
    Python atoms, other objects by identity, modules (their ``training`` flags, submodules and parameters; the
    object of a bound method, or the forward, too), the attributes of user objects within reach
    (``layers[1].training``, ``model.layers[3].eps``, ``net.act``) and those holding a tensor of ``read`` (the
    leaves the loss depends on: ``layers[1].gamma``), and the items of the lists and dicts on the way.
    Attributes holding a tensor of ``made`` (computed by the forward: ``layers[0].out``) are listed in ``stored``.
    The globals read by ``code`` (the user's functions that called torch while recording: a method of the
    user's class reading a global) and by the user's code that ``ran`` while recording (a method that calls no
    torch function) count as the forward's own; a list or dict is guarded only on the keys all the code that ran
    reads it by (:func:`_loaded_names`). ``before``: the state copied before the recording (its copies hold the
    lists and dicts too: not another holder of them)."""
    found = _References()
    seen: set[tuple[int, str]] = set()
    code_read: list[types.CodeType] = []
    code = list(code) + (ran.users() if ran is not None else [])
    references = _read_directly(forward, seen=seen, code_read=code_read) + _read_by(code, seen)
    roots = list(_owners(forward)) + [(name, value) for _, _, name, value in references]
    classes = _users_classes(roots)
    loaded = _loaded_names(code_read + [body for body, _ in code], classes, ran)
    walk = _Walk({}, read, made, loaded.attributes, loaded.keys, loaded.by_any)
    for path, owner in _owners(forward):
        _watch_flags(found, path, owner, _FLAG_DEPTH, walk)
    _watch_classes(found, classes, walk)
    for kind, owner, name, value in references:
        if isinstance(value, Tensor):
            if id(value) in leaves:
                found.tensors.append((kind, owner, name, value))
        elif type(value) in _ATOMS:
            found.atoms.append((kind, owner, name, value))
        else:
            found.bindings.append((kind, owner, name, value))
            if _WALKABLE[type(value)]:
                users = kind == "cell" or _users_module(owner.get("__name__"))  # (a library's code may read it)
                _watch_flags(found, name, value, _FLAG_DEPTH, walk, _NamedBy(name, owner) if users else None)
    if found.contents:
        internal = chain(found.contents, references, found.bindings, roots, found.objects,
                         (guard.values for guard in found.objects if not guard.single),  # (their tuples)
                         before.holders() if before is not None else ())
        parts = _unaliased(_merged(found.contents), internal)
        held = _Contents(parts, read)
        found.held, found.appended = held or None, held.appended
    return found


def _watch_classes(found: _References, classes: Iterable[type], walk: _Walk) -> None:
    """Watch the class attributes of the user's classes (and of the user's classes they derive from) whose names
    the forward's code loads: ``Model.scale = 2.0``, a method or staticmethod replaced, a list of layers held
    by the class (its items too), read through ``self.scale`` as the objects' own attributes are."""
    done: set[type] = set()
    for cls in classes:
        for owner in cls.__mro__:
            if owner in done or owner is object or not _users_module(owner.__module__):
                continue
            done.add(owner)
            attrs = owner.__dict__
            names = tuple(name for name in attrs if name in walk.loaded and not name.startswith("__"))
            if not names:
                continue
            found.objects.append(_Attributes(owner.__qualname__, attrs, names))
            for name in names:
                value = attrs[name]
                if type(value) not in _ATOMS and not isinstance(value, Tensor) and _WALKABLE[type(value)]:
                    _watch_flags(found, f"{owner.__qualname__}.{name}", value, _FLAG_DEPTH - 1, walk)


def _owners(forward: Callable[..., Any]) -> Iterator[tuple[str, Any]]:
    """The objects a forward is part of, as the guards name them: a bound method's ``self``, the forward itself
    when it is an object (an nn.Module, a callable instance), and a ``functools.partial``'s arguments (by the
    names of the parameters they fill) and function's owners."""
    if isinstance(forward, functools.partial):
        try:
            names = list(inspect.signature(forward.func).parameters)
        except (TypeError, ValueError):  # no signature (a builtin)
            names = []
        for index, arg in enumerate(forward.args):
            if _WALKABLE[type(arg)]:
                yield (names[index] if index < len(names) else f"args[{index}]"), arg
        yield from ((name, arg) for name, arg in forward.keywords.items() if _WALKABLE[type(arg)])
        yield from _owners(forward.func)
        return
    for owner in (getattr(forward, "__self__", None), forward):
        if owner is not None and _WALKABLE[type(owner)]:
            yield ("self" if owner is not forward else type(owner).__name__), owner


class _Walk(NamedTuple):
    """What one search of the forward's objects carries along: the objects seen, and the tensors to look for."""

    seen: dict[int, bool]  # the objects walked, and whether as read (see _objects_within_reach)
    read: dict[int, Tensor]  # the leaves the loss depends on: an attribute holding one is guarded
    made: dict[int, Tensor]  # the tensors the forward computed: an attribute holding one is named in a warning
    loaded: frozenset[str] = frozenset()  # the attribute names the forward's code loads: those it may read
    keys: Mapping[str, frozenset] = {}  # names whose lists and dicts it reads by constant keys only (_CodeReads)
    by_any: frozenset[str] | None = None  # the attribute names any code that ran loads (_CodeReads)


_FLAG_DEPTH = 3  # ``model.layers[3].norm``: how far below a name the guard looks for flags and attributes


def _watch_flags(found: _References, path: str, value: Any, depth: int, walk: _Walk,
                 named_by: _NamedBy | None = None) -> None:
    """Watch the ``training`` flags and other atom attributes of ``value`` and of the objects in its items and
    attributes, ``depth`` levels down: nn.Modules (all their submodules) and the user's own classes, whose
    atoms are in the object's ``__dict__`` (the lecture's hand-written ``BatchNorm1d``: ``training``, ``eps``,
    ``momentum``). Walks what naming walks. ``named_by``: the name the user's code loads ``value`` by (a global
    or closure variable of the user's), if it does."""
    containers: list[tuple[str, Any, frozenset | None, Any]] = []
    for object_path, obj, attrs, read in _objects_within_reach(path, value, depth, walk.seen, containers,
                                                               walk.loaded, keys=walk.keys, named_by=named_by):
        if attrs is None:
            _watch_module(found, object_path, obj, walk.read, walk.loaded if read else None, walk.by_any)
            continue
        guard = _attributes(object_path, attrs, loaded=walk.loaded if read else ())
        if guard is not None:
            found.objects.append(guard)
        if read:
            classes = [vars(owner) for owner in type(obj).__mro__ if owner is not object]
            shadowed = frozenset(name for name in walk.loaded
                                 if name not in attrs and any(name in members for members in classes))
            if shadowed:
                found.shadowed.append((object_path, attrs, shadowed))
        for attr, item in attrs.items():
            if isinstance(item, Tensor):
                if walk.read.get(id(item)) is item:
                    found.attributes.append((object_path, attrs, attr, item))
                elif walk.made.get(id(item)) is item:
                    found.stored.append(f"{object_path}.{attr}")
    found.contents.extend((container_path, container, "[{!r}]", keys, holder) for container_path, container, keys,
                          holder in containers if isinstance(container, (list, dict)))


def _objects_within_reach(path: str, value: Any, depth: int, seen: dict[int, bool],
                          containers: list[tuple[str, Any, frozenset | None, Any]] | None = None,
                          loaded: Collection[str] | None = None, read: bool = True, *,
                          keys: Mapping[str, frozenset] | None = None, named_by: _NamedBy | None = None
                          ) -> Iterator[tuple[str, Any, dict | None, bool]]:
    """``value`` and the objects in its items and attributes, ``depth`` levels down, each once, as
    ``(path, object, its __dict__, read)``: the user's own objects with their attributes, an nn.Module with None
    (its submodules are its own; the lists, dicts and user objects in their plain attributes are walked on: a
    ``self.blocks = [...]`` of modules), lists, tuples and dicts only walked through (added to ``containers``
    when given, up to ``_MAX_ITEMS`` items, if read, with the keys it reads by, see :func:`_keys_read`, and what
    holds it under its name). With
    ``loaded`` (the attribute names the forward's code loads), ``read`` says whether the path to an object may
    be the forward's own reads: every attribute on it loaded (``net.layers[0]``, not ``trainer.losses``), every
    item on it one the code may read (``cfg['scale']``, not ``cfg['step']`` where ``keys`` says the code reads
    only ``cfg["scale"]``). ``named_by``: the name the user's code loads ``value`` by (an attribute or variable
    of the user's; None for an item, or the forward's own object). ``seen``: the objects walked, and whether as
    read; one walked as not read (a list or dict: not wholly) is walked again when a path the forward reads
    reaches it (``self.backup`` and ``self.model`` holding the same model), and a list or dict walked as read
    is added to ``containers`` again for each path the forward reads it by."""
    key = id(value)
    if not _WALKABLE[type(value)]:
        return
    walked = seen.get(key)
    if walked is not None and (walked or not read):
        if walked and read and containers is not None and isinstance(value, (list, dict)):
            containers.append((path, value, *_keys_read(value, keys, named_by)))
        return
    seen[key] = read
    if isinstance(value, torch.nn.Module):
        yield path, value, None, read
        items = _module_attributes(path, value, loaded, read)
    elif isinstance(value, (list, tuple, dict)):
        if len(value) > _MAX_ITEMS:
            return
        narrow, holder = _keys_read(value, keys, named_by)
        if containers is not None and read:
            containers.append((path, value, narrow, holder))
            seen[key] = narrow is None
        if isinstance(value, dict):
            items = [(f"{path}[{index!r}]", item, read and (narrow is None or index in narrow), None)
                     for index, item in value.items()]
        else:
            items = [(f"{path}[{index}]", item, read and (narrow is None or index in narrow
                                                         or index - len(value) in narrow), None)
                     for index, item in enumerate(value)]
    else:
        try:
            attrs = vars(value)
        except Exception:  # noqa: BLE001 - a user class's __getattr__ may raise anything
            return
        if not isinstance(attrs, dict):
            return
        yield path, value, attrs, read
        items = [(f"{path}.{attr}", item, read and (loaded is None or attr in loaded), _NamedBy(attr, attrs))
                 for attr, item in attrs.items() if isinstance(attr, str) and _public_or_loaded(attr, loaded)]
    if depth > 0:
        for item_path, item, item_read, item_named_by in items:
            if not isinstance(item, Tensor) and type(item) not in _ATOMS:
                yield from _objects_within_reach(item_path, item, depth - 1, seen, containers, loaded, item_read,
                                                 keys=keys, named_by=item_named_by)


class _NamedBy(NamedTuple):
    """The name the user's code loads an object by, and what holds it under that name."""

    name: str
    holder: Any  # a module's globals, a closure cell, an object's ``__dict__``


def _keys_read(container: Any, keys: Mapping[str, frozenset] | None, named_by: _NamedBy | None
               ) -> tuple[frozenset | None, Any]:
    """The keys of a list or dict that the user's code reads, if it loads it by its name only to read items by
    these constant keys (or, none, only to append to it): see :class:`_CodeReads`; or None: all of it. Only of a
    plain list or dict (a subclass's ``__getitem__`` or ``append`` may read any item). And what holds it under
    that name, if keys."""
    if keys is None or named_by is None or type(container) not in (list, dict):
        return None, None
    narrow = keys.get(named_by.name)
    return narrow, (None if narrow is None else named_by.holder)


def _module_attributes(path: str, module: torch.nn.Module, loaded: Collection[str] | None, read: bool
                       ) -> list[tuple[str, Any, bool, str | None]]:
    """The public plain attributes of a module and its submodules that may hold more of the forward's
    structure (a list of layers, a dict, a user's object; not submodules, parameters, buffers, tensors or
    atoms, which :func:`_watch_module` guards), as ``(path, value, read, named_by)``: ``named_by`` None where
    code other than the user's may read it (a module of torch's or a library's class)."""
    items = []
    for sub_path, submodule in module.named_modules():
        prefix = f"{path}.{sub_path}" if sub_path else path
        attrs = vars(submodule)
        users = not _library_reads(submodule)
        items.extend((f"{prefix}.{name}", item, read and (loaded is None or name in loaded),
                      _NamedBy(name, attrs) if users else None)
                     for name, item in attrs.items()
                     if isinstance(name, str) and _public_or_loaded(name, loaded) and type(item) not in _ATOMS
                     and not isinstance(item, (Tensor, torch.nn.Module)))
    return items


def _public_or_loaded(name: str, loaded: Collection[str] | None) -> bool:
    """Whether the walk goes on through an attribute: a public one, or a ``_`` one the user's code loads
    (``self._layers``)."""
    return not name.startswith("_") or (loaded is not None and name in loaded)


def _library_reads(module: torch.nn.Module) -> bool:
    """Whether code other than the user's may read the module's public attributes: its class, or a class it
    derives from, is torch's or a library's (nn.Linear's ``in_features``, BatchNorm's ``eps`` and ``momentum``),
    not only the user's own classes on nn.Module."""
    return any(cls is not torch.nn.Module and cls is not object and not _users_module(cls.__module__)
               for cls in type(module).__mro__)


def _watch_module(found: _References, name: str, module: torch.nn.Module, read: Mapping[int, Tensor],
                  loaded: Collection[str] | None, by_any: frozenset[str] | None = None) -> None:
    """Watch the ``training`` flags of a module and its submodules, their public attributes (of torch's and
    libraries' modules, every atom: ``eps``, ``momentum``, ``p``; of the user's own classes on nn.Module, those
    that code loads: ``self.temperature``, ``self.act``, not a ``self.last_loss`` that only the loop sets; a
    tensor of ``read`` in a plain attribute), and which submodules, parameters and buffers they hold
    (``model.fc = nn.Linear(...)``, ``layers.append(...)``, ``fc.weight = nn.Parameter(...)``,
    ``bn.running_mean = ...`` in eval mode). ``loaded``: the attribute names the forward's code loads, None for
    a module it may not read (reached through an attribute it does not load): then only its flags and atoms.
    ``by_any``: the attribute names any code that ran while recording loads (a library's too), None if not
    known: then every atom of the user's modules too."""
    modules = list(module.named_modules())
    found.modules.append((name, modules, tuple(m.training for _, m in modules)))
    for path, submodule in modules:
        where = f"{name}.{path}" if path else name
        attrs = vars(submodule)
        library = by_any is None or _library_reads(submodule)
        names = frozenset(loaded or ()) | (frozenset() if library else by_any)
        guard = _attributes(where, attrs, module=True, atoms=library, loaded=names, private=loaded or ())
        if guard is not None:
            found.objects.append(guard)
        found.attributes.extend((where, attrs, attr, item) for attr, item in attrs.items()
                                if isinstance(item, Tensor) and read.get(id(item)) is item)
        if loaded is None:
            continue
        for held in (submodule._modules, submodule._parameters, submodule._buffers):
            if held:
                found.contents.append((where, held, ".{}", None, None))


class _Place(NamedTuple):
    """Where the forward's Python objects hold a tensor: an attribute of a user object reached from the
    forward's globals and closure (``layers[1].running_mean``) or a module's buffer, a global of its module,
    or a closure cell."""

    path: str  # as the user reaches it: ``layers[1].running_mean``, ``bnmean_running``
    kind: str  # "attr", "global" or "cell"
    owner: Any  # the object, the module's globals dict, the cell
    name: str  # the attribute's or variable's name

    @property
    def key(self) -> tuple[int, str]:
        return id(self.owner), self.name

    def get(self) -> Any:
        """What it holds now (``_MISSING`` when nothing)."""
        if self.kind == "attr":
            return getattr(self.owner, self.name, _MISSING)
        return _current(self.kind, self.owner, self.name)


def _tensor_places(forward: Callable[..., Any]) -> dict[tuple[int, str], tuple[_Place, Tensor]]:
    """Every place within the forward's reach holding a tensor: the globals of its module, its closure cells,
    and the attributes of the user's objects it names (``layers[1].running_mean``; three levels down, as the
    guards look), by :attr:`_Place.key`."""
    found: dict[tuple[int, str], tuple[_Place, Tensor]] = {}
    globals_ = getattr(forward, "__globals__", None)
    if isinstance(globals_, dict):
        for name, value in globals_.items():
            if isinstance(value, Tensor):
                found[(id(globals_), name)] = (_Place(name, "global", globals_, name), value)
    seen: dict[int, bool] = {}
    for path, owner in _owners(forward):
        _walk_places(found, path, owner, _FLAG_DEPTH, seen)
    for kind, owner, name, value in _read_directly(forward):
        if kind == "cell" and isinstance(value, Tensor):
            found[(id(owner), name)] = (_Place(name, "cell", owner, name), value)
        elif not isinstance(value, Tensor) and type(value) not in _ATOMS:
            _walk_places(found, name, value, _FLAG_DEPTH, seen)
    return found


class _StateBefore:
    """The Python state within the forward's reach before it is recorded, as shallow copies: the globals of its
    module, of the user's functions it names (three calls down, as :func:`_read_directly` follows them) and of the
    user's classes of the objects it reaches; its and their closure cells; the ``__dict__`` of the objects and
    modules reached from those names (three levels down, as the guard looks: :func:`_objects_within_reach`), the
    lists and dicts on the way, the modules' dicts of submodules, parameters and buffers, and their ``training``
    flags. :meth:`_References.changed_by_forward` compares the guard's state, taken after the recording, with it.
    Each object copied is kept alive with its copy, so that its id names it while this lives."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self._copies: dict[int, tuple[Any, Any]] = {}  # id -> (a dict or list, its copy)
        self._cells: dict[int, tuple[Any, Any]] = {}  # id -> (a closure cell, what it held)
        self._flags: dict[int, tuple[torch.nn.Module, bool]] = {}
        function = forward
        while isinstance(function, functools.partial):
            function = function.func
        globals_ = getattr(function, "__globals__", None)
        if isinstance(globals_, dict):
            self._copy(globals_)
        self._seen: dict[int, bool] = {}
        for kind, owner, name, value in _read_directly(forward):
            if kind == "global":
                self._copy(owner)
            else:
                self._cells.setdefault(id(owner), (owner, value))
            self._walk(name, value)
        for path, owner in _owners(forward):
            self._walk(path, owner)

    def enter(self, code: types.CodeType, globals_: dict) -> None:
        """A function runs for the first time while the forward is recorded (:class:`_CodeThatRuns`): copy, if
        not yet copied, the globals its code loads (the user's code only; a method reading a global list), as
        they are before it runs."""
        if not _users_module(globals_.get("__name__")):
            return
        self._copy(globals_)
        for name in _code_names(code).globals:
            self._walk(name, globals_.get(name))

    def _walk(self, path: str, value: Any) -> None:
        if isinstance(value, Tensor) or type(value) in _ATOMS:
            return
        containers: list[tuple[str, Any, frozenset | None, Any]] = []
        for _, obj, attrs, _ in _objects_within_reach(path, value, _FLAG_DEPTH, self._seen, containers):
            if attrs is None:  # a module: its submodules' too
                objects = list(obj.modules())
                for module in objects:
                    self._flags.setdefault(id(module), (module, module.training))
                    for held in (vars(module), module._modules, module._parameters, module._buffers):
                        self._copy(held)
            else:
                objects = [obj]
                self._copy(attrs)
            for cls in {type(o) for o in objects}:  # the module globals its methods read and write
                module_of = sys.modules.get(cls.__module__)
                if module_of is not None and _users_module(cls.__module__):
                    self._copy(vars(module_of))
        for _, container, _, _ in containers:
            if isinstance(container, (list, dict)):
                self._copy(container)

    def _copy(self, container: list | dict) -> None:
        if id(container) not in self._copies:  # (not a subclass's own copy(), which may do anything)
            copied = dict.copy(container) if isinstance(container, dict) else list.copy(container)
            self._copies[id(container)] = (container, copied)

    def holders(self) -> Iterator[Any]:
        """The objects by which this holds what it copied (its dicts, their tuples, the copies): not other holders
        of the user's lists and dicts for :func:`_unaliased`."""
        yield from (self._copies, self._cells)
        for entry in self._copies.values():
            yield from (entry, entry[1])  # (the tuple, the copy: not the object copied)
        yield from self._cells.values()  # (the tuples: not what the cells hold)

    def copy_of(self, container: Any) -> Any:
        """The copy of a list or dict (a ``__dict__``, a module's globals) made before the recording, or None."""
        copied = self._copies.get(id(container))
        return copied[1] if copied is not None and copied[0] is container else None

    def item(self, container: dict, key: Any) -> Any:
        """What the dict held at ``key`` before the recording: ``_MISSING`` if nothing, ``_UNKNOWN`` if not
        copied."""
        then = self.copy_of(container)
        return _UNKNOWN if then is None else then.get(key, _MISSING)

    def value(self, kind: str, owner: Any, name: str) -> Any:
        """What a global (``owner``: its module's globals) or a closure cell held before the recording."""
        if kind == "global":
            return self.item(owner, name)
        held = self._cells.get(id(owner))
        return held[1] if held is not None and held[0] is owner else _UNKNOWN

    def training(self, module: torch.nn.Module) -> bool | None:
        """A module's ``training`` flag before the recording, or None if not seen."""
        flag = self._flags.get(id(module))
        return flag[1] if flag is not None and flag[0] is module else None


def _place_keys(place: _Place) -> list[tuple[int, str]]:
    """Where the guard finds a place, as (id of the dict or cell, key): an attribute in its object's
    ``__dict__`` (a module's buffer also in its ``_buffers``), a global in its module's globals, a cell."""
    if place.kind != "attr":
        return [(id(place.owner), place.name)]
    keys = [(id(getattr(place.owner, "__dict__", None)), place.name)]
    if isinstance(place.owner, torch.nn.Module):
        keys.append((id(place.owner._buffers), place.name))
    return keys


def _walk_places(found: dict, path: str, value: Any, depth: int, seen: dict[int, bool]) -> None:
    """The tensor attributes of ``value`` and of the objects in its items and attributes, ``depth`` levels down
    (the user's own objects; of an nn.Module, its buffers)."""
    for object_path, obj, attrs, _ in _objects_within_reach(path, value, depth, seen):
        if attrs is None:
            _buffer_places(found, object_path, obj)
            continue
        for name, item in attrs.items():
            if isinstance(item, Tensor) and isinstance(name, str) and name.isidentifier():
                found[(id(obj), name)] = (_Place(f"{object_path}.{name}", "attr", obj, name), item)


def _buffer_places(found: dict, path: str, module: torch.nn.Module) -> None:
    """A module's buffers at any depth (``model.bn.running_mean``): rebinding one (``self.running_mean = ...``)
    sets the buffer of the submodule holding it."""
    for name, buffer in module.named_buffers():
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path)
        found[(id(owner), attr)] = (_Place(f"{path}.{name}", "attr", owner, attr), buffer)


def _flat_tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _flat_tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flat_tensors(item)
