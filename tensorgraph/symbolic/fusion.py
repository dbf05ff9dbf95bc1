"""Derive once, check, and fuse: the cache, the safety net, ``fuse`` and ``auto_fuse``.

A derivation is keyed on the chain's structure (ops, attributes, constants, shapes,
dtypes, names), never on its values, so a training loop that records the same forward
every step derives once. Every new derivation is checked numerically, in float64 on the
recorded values, against torch autograd and against tensorgraph's own engine running the
atomic chain: a rule that disagrees raises, it is never used.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..graph import _NODE_DEFAULTS, Graph, Ref, is_float, require_graph, substitute
from .chain import (
    ELEMENTWISE,
    IDENTITY,
    LOWERINGS,
    RESHAPES,
    ChainTooLong,
    SymbolicError,
    chain_members,
    lower,
    only_unit_dims,
    where,
)
from .derivation import Derivation, build

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterator, Sequence

_CACHE: OrderedDict[tuple, Derivation] = OrderedDict()
_CACHE_SIZE = 256
# chains refused for their size: a training loop calling auto_fuse every step pays the attempt once
_TOO_LONG: OrderedDict[tuple, ChainTooLong] = OrderedDict()
STATS = {"derived": 0, "cached": 0}


def clear_cache() -> None:
    """Forget every derived rule (the next derivation of each chain starts from scratch)."""
    _CACHE.clear()
    _TOO_LONG.clear()


# ---------------------------------------------------------------------- keys and bindings


def node_id(graph: Graph, key: Any, what: str) -> int:
    """The node of a tensor, name or id, with an error that says which argument was wrong."""
    require_graph(graph, "tg.symbolic")
    if isinstance(key, Tensor):
        live = graph._live.get(id(key))
        if live is None or live[2] is not key:
            raise SymbolicError(f"the {what} tensor is not in this graph: {graph.owner_message(key)}")
        return live[0]
    accepted = f"the {what} must be a tensor recorded in this graph, its name or its node id"
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        text = repr(key)
        if len(text) > 60 or "\n" in text:  # an array's or a list of tensors' text: thousands of characters
            got = f"a {type(key).__name__}"
        else:
            got = text + (f" (a {type(key).__name__})" if key is not None else "")
        hint = f"; give one tensor, not a {type(key).__name__}" if isinstance(key, (list, tuple)) else ""
        raise SymbolicError(f"{accepted}; got {got}{hint}")
    if isinstance(key, int) and not 0 <= key < len(graph._nodes):
        raise SymbolicError(f"{accepted}; there is no node {key} (its node ids run from 0 to {len(graph._nodes) - 1})")
    try:
        return graph.node_id(key)
    except KeyError as err:
        raise SymbolicError(f"the {what}: {err.args[0] if err.args else key}") from None


@dataclass
class Binding:
    """Where a derivation's chain lies in one particular graph (node ids)."""

    output: int
    input: int
    ops: list[int]  # the recorded ops the chain replaces, in order (the output last)
    params: list[int]  # tensors entering the chain, in the derivation's parameter order


def signature(graph: Graph, output: int, wrt: int) -> tuple[tuple, list[int], dict[int, int]]:
    """The structural key of the chain, its member nodes, and the role number of every outside tensor."""
    members = chain_members(graph, output, wrt)
    nodes = graph._nodes
    # the nodes the chain computes; any other tensor its calls read (a dropout mask too) is a parameter
    index = {node: k for k, node in enumerate(members)
             if node == wrt or (nodes[node]["kind"] == "op" and nodes[node]["dtype"].is_floating_point)}
    roles: dict[int, int] = {}

    def norm(value: Any, grow: bool = True) -> Any:
        if isinstance(value, Ref):
            if value.node in index:
                return ("chain", index[value.node])
            if not grow and value.node not in roles:
                return ("outside",)
            role = roles.setdefault(value.node, len(roles))
            data = nodes[value.node]
            return ("param", role, tuple(data["shape"]), str(data["dtype"]), data["kind"], data["name"])
        if isinstance(value, (tuple, list)):
            return (type(value).__name__,) + tuple(norm(v, grow) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, norm(v, grow)) for k, v in value.items()))
        if isinstance(value, range):
            return ("range", value.start, value.stop, value.step)
        if isinstance(value, float):
            return ("float", repr(value))
        if isinstance(value, Tensor):
            return ("tensor", tuple(value.shape), str(value.dtype))
        return repr(value)

    parts = []
    for node in members:
        data = nodes[node]
        part = (data["op"], data["kind"], tuple(data["shape"]), str(data["dtype"]), data["output_index"],
                data["inplace"], data["name"], norm(data["bargs"]), norm(data["bkwargs"]))
        parts.append(part + _value_facts(graph, data))
        for source in data["inputs"]:
            if source not in index:
                roles.setdefault(source, len(roles))
    # a parameter computed elementwise from others (1 - t beside t): the derivation may write it as that
    computed = tuple((role, nodes[node]["op"], norm(nodes[node]["bargs"], False), norm(nodes[node]["bkwargs"], False))
                     for node, role in list(roles.items())
                     if nodes[node]["kind"] == "op" and nodes[node]["op"] in ELEMENTWISE)
    return (tuple(parts), index[wrt] if wrt in index else -1, computed), members, roles


def _value_facts(graph: Graph, data: dict[str, Any]) -> tuple:
    """The few facts about values that change what a chain means (index patterns, ignored targets)."""
    facts: list[Any] = []
    for fact in _candidate_facts(data):
        value = graph._nodes[fact.tensor]["value"]
        if fact.kind == "no_ignored":
            facts.append(fact.holds(value) is False if not value.is_floating_point() else None)
        else:
            facts.append(fact.holds(value))
    return tuple(facts)


@dataclass(frozen=True)
class ValueFact:
    """A fact about a tensor's values that a fused rule was derived under: it must hold wherever the rule runs.

    ``op`` (the recorded op whose symbolic form needs it) and ``tensor`` are node ids of the
    graph the chain was fused from. ``kind`` is ``"arange"`` (the pick's rows equal
    ``torch.arange(n)``) or ``"no_ignored"`` (no target equals ``ignore_index``).
    """

    op: int
    tensor: int
    kind: str
    ignore_index: int = -100

    def holds(self, value: Tensor) -> bool:
        """Whether ``value`` (the tensor's value now) satisfies the fact."""
        if self.kind == "arange":
            return value.dim() == 1 and torch.equal(value, torch.arange(value.shape[0], device=value.device))
        return not bool((value == self.ignore_index).any())

    def describe(self) -> str:
        """The fact in words, for a message: ``equals torch.arange(n)``."""
        return "equals torch.arange(n)" if self.kind == "arange" else \
            f"has no target equal to ignore_index={self.ignore_index}"


def _candidate_facts(data: dict[str, Any], node: int = -1) -> list[ValueFact]:
    """The value facts the symbolic form of one recorded op depends on (whether they hold or not)."""
    if data["op"] == "getitem":
        idx = data["bargs"][1] if len(data["bargs"]) > 1 else None
        if isinstance(idx, tuple) and idx and isinstance(idx[0], Ref):
            return [ValueFact(node, idx[0].node, "arange")]
    if data["op"] in ("cross_entropy", "nll_loss") and len(data["bargs"]) > 1 and isinstance(data["bargs"][1], Ref):
        ignore = dict(zip(("x", "target", "weight", "size_average", "ignore_index"), data["bargs"])).get(
            "ignore_index", data["bkwargs"].get("ignore_index", -100))
        return [ValueFact(node, data["bargs"][1].node, "no_ignored", ignore)]
    return []


def value_facts(graph: Graph, ops: Sequence[int]) -> tuple[ValueFact, ...]:
    """The facts about values a derivation of these recorded ops relies on (all held when it was derived)."""
    nodes = graph._nodes
    facts = [fact for op in ops for fact in _candidate_facts(nodes[op], op)]
    return tuple(f for f in facts if not (f.kind == "no_ignored" and nodes[f.tensor]["value"].is_floating_point()))


# ---------------------------------------------------------------------- derive


def derive(graph: Graph, output: Any, wrt: Any, *, check: bool = True) -> Derivation:
    """The closed-form gradient of ``output`` with respect to ``wrt`` (tensors, names or node ids).

    The chain between them must consist of elementwise ops and reductions along
    dimensions (sum, mean, var, std, max, amax, logsumexp, softmax, log_softmax, the pick
    ``x[range(n), targets]``, and the composites cross_entropy, nll_loss, mse_loss,
    layer_norm, batch_norm in training); other tensors may enter it as parameters. A node
    outside that set raises :class:`SymbolicError` naming it. Results are cached on the
    chain's structure; a new derivation is checked numerically (``check``) before use.
    """
    out_id, wrt_id = node_id(graph, output, "output"), node_id(graph, wrt, "wrt")
    derivation, _ = _derive(graph, out_id, wrt_id, check=check)
    return derivation


def _derive(graph: Graph, out_id: int, wrt_id: int, *, check: bool = True) -> tuple[Derivation, Binding]:
    key, members, roles = signature(graph, out_id, wrt_id)
    derivation = _CACHE.get(key)
    if derivation is not None:
        _CACHE.move_to_end(key)
        STATS["cached"] += 1
        binding = _binding(derivation, members, roles, out_id, wrt_id)
        if check and not derivation.checked:  # cached by derive(..., check=False): checked before its first use
            derivation.checked = verify(derivation, graph, binding)
        return derivation, binding
    refused = _TOO_LONG.get(key)
    if refused is not None:
        raise refused
    try:
        derivation, binding = _derive_new(graph, members, roles, out_id, wrt_id, check=check)
    except ChainTooLong as err:
        _TOO_LONG[key] = err
        if len(_TOO_LONG) > _CACHE_SIZE:
            _TOO_LONG.popitem(last=False)
        raise
    except SymbolicError:
        raise
    except Exception as err:  # a case the layer does not foresee: refused by name, never an internal error
        nodes = graph._nodes
        raise SymbolicError(f"could not derive {where(nodes[out_id])} with respect to {where(nodes[wrt_id])}: "
                            f"{type(err).__name__}: {err} (the chain is outside what the symbolic layer "
                            f"handles; the engine's atomic rules still apply)") from err
    STATS["derived"] += 1
    _CACHE[key] = derivation
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return derivation, binding


def _derive_new(graph: Graph, members: list[int], roles: dict[int, int], out_id: int, wrt_id: int, *,
                check: bool) -> tuple[Derivation, Binding]:
    chain = lower(graph, out_id, wrt_id)
    derivation = build(chain)
    derivation._roles = [roles[p.graph_node] for p in chain.params]  # type: ignore[attr-defined]
    derivation._positions = [members.index(n) for n in chain.members]  # type: ignore[attr-defined]
    binding = _binding(derivation, members, roles, out_id, wrt_id)
    chain.graph = None  # type: ignore[assignment]  (the cache must not keep a user's recorded tensors alive)
    if check:
        derivation.checked = verify(derivation, graph, binding)
    return derivation, binding


def _binding(derivation: Derivation, members: list[int], roles: dict[int, int], out_id: int, wrt_id: int) -> Binding:
    by_role = {role: node for node, role in roles.items()}
    params = [by_role[role] for role in derivation._roles]  # type: ignore[attr-defined]
    ops = [members[k] for k in derivation._positions]  # type: ignore[attr-defined]
    return Binding(out_id, wrt_id, ops, params)


# ---------------------------------------------------------------------- the forward of a fused node


class ChainForward:
    """Recomputes a fused chain's output from its input and parameters by replaying the recorded calls."""

    def __init__(self, graph: Graph, binding: Binding) -> None:
        nodes = graph._nodes
        self.inputs = [binding.input] + binding.params
        self.calls = [(node, nodes[node]["func"], nodes[node]["args"], nodes[node]["kwargs"], nodes[node]["inplace"],
                       nodes[node]["output_index"]) for node in binding.ops]
        self.output = binding.output
        self.names = [nodes[node]["name"] for node in binding.ops]

    def __call__(self, *tensors: Any) -> Tensor:
        values: dict[int, Any] = dict(zip(self.inputs, tensors))

        for node, func, args, kwargs, inplace, output_index in self.calls:
            call_args = tuple(substitute(a, values) for a in args)
            call_kwargs = {k: substitute(v, values) for k, v in kwargs.items()}
            if inplace:
                target = call_args[0].clone()
                func(target, *call_args[1:], **call_kwargs)
                values[node] = target
            elif output_index is not None:
                values[node] = func(*call_args, **call_kwargs)[output_index]
            else:
                values[node] = func(*call_args, **call_kwargs)
        return values[self.output]

    def __repr__(self) -> str:
        return f"<fused forward: {' -> '.join(self.names)}>"


class FusedRule:
    """The vector-Jacobian rule of a fused node: the derivation's compiled closed form."""

    def __init__(self, derivation: Derivation) -> None:
        self.derivation = derivation
        self.source = derivation.source

    def __call__(self, g: Tensor, out: Tensor, *args: Any) -> tuple:
        return self.derivation.backward(g, *args)

    def __repr__(self) -> str:
        return f"<fused rule d{self.derivation.output}/d{self.derivation.wrt}>"


# ---------------------------------------------------------------------- the safety net


def verify(derivation: Derivation, graph: Graph, binding: Binding) -> str:
    """Compare the generated backward with torch autograd and with the engine on the atomic chain.

    Runs in float64 on the recorded values with a random output gradient; raises
    :class:`SymbolicError` when any gradient differs by more than 1e-7 relative.
    """
    from ..record import record

    nodes = graph._nodes
    tensors = [nodes[node]["value"].detach() for node in [binding.input] + binding.params]
    values = [t.to(torch.float64) if t.is_floating_point() else t for t in tensors]
    # the tensors with a gradient; others (targets, running statistics) only ride along
    differentiable = [n.differentiable for n in [derivation.chain.input] + derivation.chain.params]
    forward = ChainForward(graph, binding)

    def fresh() -> list[Tensor]:  # each replay gets copies: a call may update its arguments (running statistics)
        return [v.clone() for v in values]

    leaves = [v.requires_grad_() if wanted else v for v, wanted in zip(fresh(), differentiable)]
    out = forward(*leaves)
    seed = torch.Generator().manual_seed(0)
    g = torch.randn(out.shape, dtype=torch.float64, generator=seed).to(out.device)  # (CPU draws: any device)
    reference = torch.autograd.grad(out, [v for v in leaves if v.requires_grad], g, allow_unused=True)
    replay_values = fresh()
    with record() as replay:
        replay_out = forward(*replay_values)
    engine = replay.backward(replay_out, g)
    mine = derivation.backward(g, *fresh())
    worst = 0.0
    ref_iter = iter(reference)
    names = [nodes[node]["name"] for node in [binding.input] + binding.params]
    for name, value, got, wanted in zip(names, replay_values, mine, differentiable):
        if not wanted:
            continue
        theirs = next(ref_iter)
        theirs = torch.zeros_like(value) if theirs is None else theirs
        ours_engine = engine[value] if value in engine else torch.zeros_like(value)
        for label, expected in (("torch autograd", theirs), ("the engine", ours_engine)):
            if got is None or tuple(got.shape) != tuple(expected.shape):
                raise SymbolicError(f"the derived rule for d{derivation.output}/d{name} returned shape "
                                    f"{None if got is None else tuple(got.shape)}, expected {tuple(expected.shape)}")
            scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
            diff = float((got - expected).abs().max()) if expected.numel() else 0.0
            worst = max(worst, diff / scale)
            if not diff <= 1e-7 * scale:
                raise SymbolicError(
                    f"the derived rule for d{derivation.output}/d{name} disagrees with {label} on the atomic chain "
                    f"(max |difference| {diff:.3g}); refusing to use it")
    derivation.unstable = unstable(derivation, forward, values, differentiable, names,
                                   _recompute_derived(derivation, graph, binding))
    checked = f"checked against torch autograd and the engine in float64: max relative difference {worst:.2g}"
    return checked + (f"; {derivation.unstable}" if derivation.unstable else "")


STRESS = 1000.0  # the magnitude each tensor is scaled to by the stability check, with its signs and flipped


def _recompute_derived(derivation: Derivation, graph: Graph, binding: Binding) -> Callable[[list[Tensor]], set[int]]:
    """Recomputes, in place in a list of the fused node's inputs, the parameters the derivation reads as computed
    from other parameters (``sub_1`` is ``1 - t``), by their recorded calls; returns their positions. A stress
    test that scales ``t`` must scale ``1 - t`` with it: the derived rule is written with ``t`` alone."""
    chain, nodes = derivation.chain, graph._nodes
    inputs = [binding.input] + binding.params
    calls = [(1 + k, nodes[binding.params[k]]) for k, param in enumerate(chain.params) if param in chain.derived]

    def recompute(tensors: list[Tensor]) -> set[int]:
        values = dict(zip(inputs, tensors))
        for position, data in calls:
            kwargs = {k: substitute(v, values) for k, v in (data["kwargs"] or {}).items()}
            tensors[position] = values[inputs[position]] = data["func"](*substitute(data["args"], values), **kwargs)
        return {position for position, _ in calls}

    return recompute


def _stress_probes(values: list[Tensor], computed: set[int]) -> Iterator[tuple[int, float, str]]:
    """(position, factor, how) for each probe of the stability check: each floating-point tensor scaled to
    magnitude :data:`STRESS` with its recorded signs, then with them flipped (a negative factor). Scaling alone
    keeps the signs: a form that overflows only for large positive values (``exp(a)`` over an unshifted
    normaliser) would pass on a tensor recorded with its largest magnitude negative."""
    for position, value in enumerate(values):
        top = float(value.abs().max()) if value.is_floating_point() and value.numel() else 0.0
        if top == 0.0 or not math.isfinite(top) or position in computed:
            continue
        yield position, STRESS / top, f"scaled to magnitude {STRESS:g}"
        yield position, -STRESS / top, f"scaled to magnitude {STRESS:g} with its signs flipped"


def _stressed_gradients(derivation: Derivation, forward: ChainForward, tensors: list[Tensor],
                        differentiable: list[bool], flipped: bool) -> tuple[Sequence[Any], Sequence[Any]] | None:
    """(torch autograd's gradients, the rule's) at ``tensors`` with an all-ones output gradient; None where
    the forward (or the rule) fails at that scale, which says nothing about the rule's stability, and where
    signs were ``flipped`` and the forward's value is not finite: flipping can leave the forward's domain
    (the log of a sum of probabilities), where torch's ``1/x`` is finite and a rule reading ``exp(-log(x))``
    is not, and no step computes there."""
    leaves = [t.requires_grad_() if wanted else t for t, wanted in zip(tensors, differentiable)]
    try:
        out = forward(*leaves)
        if flipped and not bool(torch.isfinite(out).all()):
            return None
        g = torch.ones(out.shape, dtype=torch.float64, device=out.device)
        reference = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g, allow_unused=True)
        return reference, derivation.backward(g, *[t.detach() for t in leaves])
    except Exception:  # noqa: BLE001 - see the docstring
        return None


def unstable(derivation: Derivation, forward: ChainForward, values: list[Tensor], differentiable: list[bool],
             names: list[str], recompute: Callable[[list[Tensor]], set[int]] = lambda tensors: set()) -> str:
    """Why the derived rule must not replace the atomic chain: at large magnitudes it loses what torch keeps.

    A closed form that is right can still be unstable: ``exp(x/T)`` summed unshifted overflows once
    ``x/T`` passes ~709 (~88 in float32), and ``exp(logprob) * exp(-x) * sum(x * exp(x))`` underflows
    to 0 where each factor alone is fine, where torch's softmax kernel and the recorded chain stay
    exact. Each floating-point tensor in turn is scaled to magnitude :data:`STRESS`, keeping its signs and
    then flipping them (the others as recorded; a parameter computed from others, ``1 - t``, follows them:
    ``recompute``); a gradient that torch computes finite and the rule gets non-finite, or off by more than
    1e-6 of its largest element, is reported (with flipped signs, only where the forward's value is finite).
    "" when none is.
    """
    for stressed, factor, how in _stress_probes(values, recompute([v.clone() for v in values])):
        tensors = [v.clone() for v in values]
        tensors[stressed] = tensors[stressed] * factor
        recompute(tensors)
        gradients = _stressed_gradients(derivation, forward, tensors, differentiable, factor < 0)
        if gradients is None:
            continue
        theirs = iter(gradients[0])
        for name, got, wanted in zip(names, gradients[1], differentiable):
            expected = next(theirs) if wanted else None
            if expected is None or got is None or not bool(torch.isfinite(expected).all()) or not expected.numel():
                continue
            scale = max(1.0, float(expected.abs().max()))
            diff = float((got - expected).abs().max())
            if not diff <= 1e-6 * scale:  # nan too
                finite = math.isfinite(diff)
                why = ("its closed form departs from torch's rule there" if finite else
                       "its closed form combines exponentials that the forward computed shifted")
                return (f"its d{name} is {'off by ' + format(diff, '.3g') if finite else 'not finite'} where torch "
                        f"autograd's is finite (with '{names[stressed]}' {how}): {why}, so graph.fuse, auto_fuse "
                        f"and tg.compile leave this chain to the atomic rules")
    return ""


# ---------------------------------------------------------------------- fuse


def fuse(graph: Graph, output: Any, inputs: Any, *, check: bool = True) -> Graph:
    """A new graph where the chain between the one input and ``output`` is a single fused node.

    The fused node (op ``"fused"``, named after the output) takes the input and every
    tensor entering the chain (parameters such as ``bngain``, targets such as ``Yb``); its
    rule is the derived closed form, which returns the gradients of all of them, and its
    ``func`` replays the chain's recorded calls (so ``compare`` works). The original graph
    is not changed. Raises :class:`SymbolicError` for a chain it cannot derive, for more
    than one input, or when a tensor inside the chain is also used outside it or has a
    gradient hook (which would never run).
    """
    items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if len(items) != 1:
        raise SymbolicError(f"fuse derives the chain from one input tensor; got {len(items)} inputs (other tensors "
                            f"entering the chain are found by themselves and become parameters)")
    out_id, wrt_id = node_id(graph, output, "output"), node_id(graph, items[0], "input")
    derivation, binding = _derive(graph, out_id, wrt_id, check=check)
    narrowing = [n for n in binding.ops if _narrows(graph, graph._nodes[n])]
    if narrowing:
        raise SymbolicError(f"the chain to {where(graph._nodes[out_id])} casts to a less precise dtype at "
                            f"{where(graph._nodes[narrowing[0]])}: its rule rounds the gradient to that dtype, "
                            f"which the closed form would not (fuse the chains on either side of the cast)")
    if derivation.unstable:
        raise SymbolicError(f"the closed form of d{derivation.output}/d{derivation.wrt} is not used: "
                            f"{derivation.unstable}")
    return rebuild(graph, [(derivation, binding)])


def hooked(graph: Graph) -> dict[int, Any]:
    """The nodes whose gradient a tensor hook (``t.register_hook(fn)``) sees, each with its first hook.

    A fused chain has no gradient for the tensors inside it: a hook there would never run, and
    the gradients after it would silently lose what it changes.
    """
    from ..engine import gradient_hooks

    return {node: hooks[0] for node, hooks in (gradient_hooks(graph, len(graph._nodes)) or {}).items()}


def rebuild(graph: Graph, fusions: Sequence[tuple[Derivation, Binding]]) -> Graph:
    """A copy of ``graph`` with each fusion's ops replaced by one fused node."""
    from ..engine import hook_where

    nodes = graph._nodes
    removed: set[int] = set()
    outputs: dict[int, tuple[Derivation, Binding]] = {}
    for derivation, binding in fusions:
        removed |= set(binding.ops) - {binding.output}
        outputs[binding.output] = (derivation, binding)
    hooks = hooked(graph)
    first = min(removed & set(hooks), default=None)
    if first is not None:
        raise SymbolicError(f"{where(nodes[first])} has a gradient hook ({hook_where(hooks[first])}); fusing the "
                            f"chain would skip it and the gradients it changes (fuse a chain that ends there, or "
                            f"remove the hook with handle.remove())")
    inside = removed | set(outputs)
    snapshots = set()
    for node in removed:
        for consumer in graph.nx.successors(node):
            if consumer in inside:
                continue
            data = nodes[consumer]
            if data["kind"] == "op" and is_float(data):
                raise SymbolicError(f"{where(nodes[node])} is also used by {where(data)}, outside the chain; "
                                    f"fusing would lose the gradient through it (fuse a chain that ends there)")
            snapshots.add(node)
    new = Graph()
    new.anomaly = graph.anomaly
    new._calls = graph._calls  # (nodes keep their "call": the same calls, drawn nested the same way)
    mapping: dict[int, int] = {}
    for old, data in enumerate(nodes):
        if old in removed and old not in snapshots:
            continue
        if old in outputs:
            copy = _fused_node(graph, *outputs[old], mapping)
        elif old in snapshots:
            copy = _snapshot(data)
        else:
            copy = _remap(data, mapping)
        mapping[old] = len(new._nodes)
        new._nodes.append(copy)
    for node, version, tensor in graph._live.values():
        if node in mapping:
            new._live[id(tensor)] = (mapping[node], version, tensor)
    # the hooks of tensors' earlier versions (replaced by a recorded in-place op) stay with those versions
    new._version_hooks = {mapping[node]: hooks for node, hooks in graph._version_hooks.items() if node in mapping}
    new._names = {data["name"]: node for node, data in enumerate(new._nodes)}
    owners = {node: mapping[binding.output] for _, binding in fusions for node in binding.ops}
    _carry_fingerprints(graph, new, {**owners, **mapping})
    return new


def _carry_fingerprints(graph: Graph, new: Graph, mapping: dict[int, int]) -> None:
    """Keep the recorded checksums (the engine's guard against ``p.data -= ...`` after recording).

    A fused-away tensor (stamped in anomaly mode) is reported as its fused node.
    """
    stamps = getattr(graph, "_fingerprints", None)
    if not stamps:
        return
    if isinstance(stamps, dict):
        new._fingerprints = {mapping[node]: value for node, value in stamps.items() if node in mapping}
    elif hasattr(stamps, "groups"):
        carried = copy.copy(stamps)
        carried.groups = [([mapping[node] for node in nodes], *rest) for nodes, *rest in stamps.groups]
        new._fingerprints = carried


def _remap_value(value: Any, mapping: dict[int, int]) -> Any:
    if isinstance(value, Ref):
        return Ref(mapping[value.node])
    if isinstance(value, (tuple, list)) and any(isinstance(v, (Ref, tuple, list)) for v in value):
        return type(value)(_remap_value(v, mapping) for v in value)
    return value


def _remap(data: dict[str, Any], mapping: dict[int, int]) -> dict[str, Any]:
    copy = dict(data)
    copy["inputs"] = [mapping[i] for i in data["inputs"]]
    for key in ("args", "bargs"):
        copy[key] = _remap_value(data[key], mapping)
    for key in ("kwargs", "bkwargs"):
        copy[key] = {k: _remap_value(v, mapping) for k, v in data[key].items()} if data[key] else data[key]
    copy["previous"] = mapping.get(data["previous"]) if data["previous"] is not None else None
    return copy


def _snapshot(data: dict[str, Any]) -> dict[str, Any]:
    """A fused-away tensor still read by a constant outside the chain: its recorded value, no gradient."""
    copy = dict(_NODE_DEFAULTS)
    for key in ("name", "named", "shape", "dtype", "source", "function", "scope", "value", "version"):
        if key in data:
            copy[key] = data[key]
    copy.update(op="saved", kind="constant", inputs=[], attrs={"fused_away": True})
    return copy


def _fused_node(graph: Graph, derivation: Derivation, binding: Binding, mapping: dict[int, int]) -> dict[str, Any]:
    base = graph._nodes[binding.output]
    refs = tuple(Ref(mapping[node]) for node in [binding.input] + binding.params)
    copy = dict(_NODE_DEFAULTS)
    for key in ("name", "named", "shape", "dtype", "source", "function", "call", "scope", "value", "version"):
        if key in base:
            copy[key] = base[key]
    copy.update(
        op="fused", kind="op", inputs=[r.node for r in refs], args=refs, kwargs={}, bargs=refs, bkwargs={},
        attrs={"input": graph._nodes[binding.input]["name"],
               "fused": tuple(graph._nodes[node]["name"] for node in binding.ops),
               "assumes": value_facts(graph, binding.ops)},
        func=ChainForward(graph, binding), rule=FusedRule(derivation), inplace=False, previous=None,
        output_index=None, result=None, unsupported=None)
    return copy


# ---------------------------------------------------------------------- auto_fuse


def _maybe_fusable(graph: Graph, node: int) -> bool:
    """A cheap first look: could this recorded op have a symbolic form?"""
    data = graph._nodes[node]
    if data["kind"] != "op" or not is_float(data) or data.get("unsupported") or data["op"] not in LOWERINGS:
        return False
    if data.get("rule") is not None:
        return False  # already fused
    if _narrows(graph, data):
        return False  # the closed form would not round the gradient to the narrower dtype as its rule does
    if data["op"] == "getitem":
        idx = data["bargs"][1] if len(data["bargs"]) > 1 else None
        return only_unit_dims(idx) or isinstance(idx, tuple) and len(idx) == 2 and isinstance(idx[1], Ref) and len(
            graph._nodes[data["inputs"][0]]["shape"]) == 2
    if data["op"] in RESHAPES:
        source = graph._nodes[data["inputs"][0]]["shape"]
        return [s for s in source if s != 1] == [s for s in data["shape"] if s != 1]
    return True


def _narrows(graph: Graph, data: dict[str, Any]) -> bool:
    """Whether the op casts a floating-point input to a less precise floating-point dtype (``x.float()`` of a
    float64 ``x``): its rule rounds the gradient to that dtype, which the symbolic identity would not."""
    if data["op"] not in IDENTITY or not data["inputs"]:
        return False
    source = graph._nodes[data["inputs"][0]]["dtype"]
    return source.is_floating_point and torch.finfo(data["dtype"]).eps > torch.finfo(source).eps


def _grow(graph: Graph, output: int, taken: set[int], hooks: Collection[int] = ()) -> set[int]:
    """The largest set of fusable ops ending at ``output`` whose values are used only inside it (and whose
    gradients no hook in ``hooks`` needs: only the output's may have one)."""
    nx_graph, nodes = graph.nx, graph._nodes
    region = {output}
    heap = [-i for i in set(nodes[output]["inputs"])]
    heapq.heapify(heap)
    seen = set()
    while heap:
        node = -heapq.heappop(heap)
        if node in seen or node in taken:
            continue
        seen.add(node)
        if node in hooks or not _maybe_fusable(graph, node):
            continue
        consumers = set(nx_graph.successors(node))
        outside = [c for c in consumers - region if nodes[c]["kind"] == "op" and is_float(nodes[c])]
        if outside:
            continue
        region.add(node)
        for source in set(nodes[node]["inputs"]):
            heapq.heappush(heap, -source)
    return region


# the most ops a fused chain may hold: the lecture's chains have 8 (cross-entropy) to 17 (batchnorm); deriving one
# closed form for a long elementwise chain costs sympy far more than its rules save (x = x * 1.0001 + 0.1 repeated
# 400 times: 2.7 s; 800 times: 6.4 s; 2,000 times: unfinished after 12 min)
MAX_FUSED_OPS = 64


def find_fusable(graph: Graph, loss: Any, *, check: bool = True, exclude: Collection[int] = ()
                 ) -> list[tuple[int, int]]:
    """The chains of ``graph`` that can be fused, as (output node id, input node id) pairs.

    Walking back from ``loss``, each chain is the largest run of ops with a symbolic form
    (elementwise ops and reductions, see :func:`derive`) whose intermediate values are used
    only inside it and have no gradient hook; its input is the outside tensor it depends on
    most (the others become parameters). Only chains of at least two ops, and at most :data:`MAX_FUSED_OPS`, that
    derive (and pass the numerical check) are returned; chains do not overlap, and leave out the ops (node ids)
    in ``exclude``.
    """
    root = node_id(graph, loss, "loss")
    nodes = graph._nodes
    taken: set[int] = set(exclude)
    found: list[tuple[int, int]] = []
    hooks = hooked(graph)
    for output in sorted(graph.ancestors(root), reverse=True):
        if output in taken or not _maybe_fusable(graph, output):
            continue
        region = _grow(graph, output, taken, hooks)
        if len(region) < 2:
            continue
        if len(region) > MAX_FUSED_OPS:  # its ops keep their atomic rules (and are not tried again one by one)
            taken |= region
            continue
        boundary = sorted({i for n in region for i in nodes[n]["inputs"]} - region)
        options = []
        for source in boundary:
            if not is_float(nodes[source]):
                continue
            try:
                members = set(chain_members(graph, output, source))
            except SymbolicError:
                continue
            ops = {n for n in members if nodes[n]["kind"] == "op" and is_float(nodes[n])} - {source}
            if ops <= region and len(ops) >= 2:
                options.append((len(ops), source, ops))
        too_long: list[set[int]] = []
        for _, source, ops in sorted(options, key=lambda o: (-o[0], o[1])):
            if ops in too_long:
                continue  # the same ops from another of their inputs: the same gradients, as long
            try:
                derivation, _ = _derive(graph, output, source, check=check)
            except ChainTooLong:
                too_long.append(ops)
                continue
            except SymbolicError:
                continue
            if derivation.unstable:
                continue
            found.append((output, source))
            taken |= ops
            break
    return found


def auto_fuse(graph: Graph, loss: Any, *, check: bool = True, exclude: Collection[int] = ()) -> Graph:
    """``graph`` with every chain :func:`find_fusable` finds replaced by one fused node.

    For ``tg.compile`` and friends: on the lecture's network this fuses the cross-entropy
    chain (from ``h @ W2`` to ``loss``) and the batchnorm chain (from ``embcat @ W1`` to
    ``h``), each with the closed form derived from the recorded ops. Derivations are
    cached, so calling it on every step of a training loop derives once. Returns a new
    graph (the same gradients, fewer nodes); ``graph`` itself is not changed. Ops in ``exclude``
    (node ids) keep their atomic rules.

    A fused node's ``attrs["assumes"]`` lists the :class:`ValueFact` s its rule was derived
    under (node ids of ``graph``): targets without ``ignore_index``, pick rows equal to
    ``torch.arange(n)``. They are checked on ``graph``'s values only: whoever runs the rule on
    other values (``tg.compile``) must check them again.
    """
    pairs = find_fusable(graph, loss, check=check, exclude=exclude)
    fusions = [_derive(graph, output, source, check=check) for output, source in pairs]
    return rebuild(graph, fusions)
