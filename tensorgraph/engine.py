"""The engine: reverse-mode autodiff over a recorded graph, without torch.autograd.

For each node, latest first, the engine looks up the op's rule in the table, calls it
with the gradient of the node's output, then, for each input, undoes broadcasting
(``sum_to_size``) and adds the result to that input's gradient (fan-out sums). Gradients
live in a dict keyed by node id; nothing is stored on tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .graph import Ref, _short_path, is_float, require_graph, shown
from .ops import OPS, SHARED, UNDERIVED, UnsupportedCall

if TYPE_CHECKING:
    from .graph import Graph


class Gradients(Mapping):
    """Gradients from ``graph.backward(loss)``: index by tensor, by name, or by node id.

    Iterating gives names. A tensor the loss does not depend on has no entry (KeyError),
    as torch gives it no ``.grad``.
    """

    def __init__(self, graph: Graph, grads: dict[int, Tensor], root: int,
                 incomplete: dict[int, str] | None = None) -> None:
        self.graph = graph
        self.by_node = grads
        self.root = root
        # tensors whose gradient would lack a part torch defines no derivative for: why, instead of a gradient
        self.incomplete = incomplete or {}
        for node in self.incomplete:
            grads.pop(node, None)

    def __getitem__(self, key: Any) -> Tensor:
        if isinstance(key, Tensor):  # the training loop's grads[p]: straight to the node
            live = self.graph._live.get(id(key))
            if live is not None and live[2] is key:
                grad = self.by_node.get(live[0])
                if grad is not None:
                    return grad
        names = self.graph._names
        if isinstance(key, str) and key not in names and key.startswith("d") and key[1:] in names:
            node = names[key[1:]]  # grads["dhprebn"], the lecture's name for the gradient of hprebn
        else:
            node = self.graph.node_id(key)
        if node not in self.by_node:
            data = self.graph._nodes[node]
            name = data["name"]
            if not is_float(data):  # torch.tensor(2), micrograd's Value(2): the loss may well depend on it
                raise KeyError(f"{name!r} has dtype {data['dtype']}: only floating-point tensors have gradients "
                               f"(an index or a class label has none; a number you differentiate must be a float: "
                               f"torch.tensor(2.0), not torch.tensor(2); or x.float())")
            root = self.graph._nodes[self.root]["name"]
            if node in self.incomplete:
                raise KeyError(f"no gradient for {name!r}: {root!r} depends on it through "
                               f"{self.incomplete[node]}: its gradient would be incomplete")
            raise KeyError(f"{root!r} does not depend on {name!r} (no gradient flows to it){self._earlier(node)}")
        return self.by_node[node]

    def _earlier(self, node: int) -> str:
        """Where an earlier version of the tensor has a gradient (changed in place after the loss used it)."""
        nodes = self.graph._nodes
        previous = nodes[node]["previous"]
        while previous is not None:
            if previous in self.by_node:
                name = nodes[previous]["name"]
                return (f"; it was changed in place at {nodes[node]['source'] or '<unknown>'}, after the loss used "
                        f"it: the version the loss depends on is {name!r}: grads[{name!r}]")
            previous = nodes[previous]["previous"]
        return ""

    def __iter__(self) -> Iterator[str]:
        names = self.graph._nodes
        return (names[node]["name"] for node in sorted(self.by_node, reverse=True))

    def __len__(self) -> int:
        return len(self.by_node)

    def __repr__(self) -> str:
        nodes = self.graph._nodes
        shown = sorted(self.by_node, reverse=True)[:_REPR_ENTRIES]
        entries = ", ".join(nodes[node]["name"] + _grad_text(self.by_node[node]) for node in shown)
        more = f", ... ({len(self) - len(shown)} more)" if len(self) > len(shown) else ""
        return f"<Gradients of {nodes[self.root]['name']!r} w.r.t. {len(self)} tensors: {entries}{more}>"


_REPR_ENTRIES = 12  # gradients a repr lists


def _grad_text(grad: Tensor) -> str:
    """After a name in a repr: a scalar's gradient as its value (micrograd's ``grad=-4.0``), a vector of at most 4
    entries' as them (softmax of 3 numbers: ``x=[-0.91, 0.2447, 0.6652]``), a tensor's shape."""
    if grad.dim() == 0:
        return f"={grad.item():.4g}"
    if grad.dim() == 1 and 0 < grad.numel() <= 4 and not grad.is_meta:
        return "=[" + ", ".join(f"{v + 0.0:.4g}" for v in grad.tolist()) + "]"  # (+ 0.0: no "-0")
    return " (" + "×".join(map(str, grad.shape)) + ")"


def root_node(graph: Graph, loss: Any, caller: str = "graph.backward") -> int:
    """The node of ``loss``, with the errors a user should see when it is not in ``graph``.

    ``caller`` is the function the user called (``graph.check``), which the errors name.
    """
    require_graph(graph, caller)
    if isinstance(loss, Tensor):
        live = graph._live.get(id(loss))
        if live is None or live[2] is not loss:
            raise ValueError(f"{caller}: the tensor passed as loss is not in this graph: "
                             f"{graph.owner_message(loss)}")
        return live[0]
    if not isinstance(loss, (str, int)) or isinstance(loss, bool):
        raise ValueError(f"{caller}: the loss must be a tensor recorded in this graph, its name or its node id, "
                         f"not {shown(loss)}{_loss_hint(loss, caller)}")
    try:
        return graph.node_id(loss)
    except KeyError as err:
        message = err.args[0] if isinstance(loss, str) else f"no node {loss} (the graph has {len(graph)} nodes)"
        raise ValueError(f"{caller}: {message}") from None


def _loss_hint(loss: Any, caller: str) -> str:
    if isinstance(loss, float):
        return ("; a Python number carries no graph: it was computed outside torch (math.exp(x), float(x), "
                "x.item()); compute the loss with tensor ops (torch.exp(x), x.exp()), which tg.record() records")
    if isinstance(loss, Mapping) and caller == "graph.check":
        return "; the gradients come first: graph.check(manual, loss)"
    if isinstance(loss, Mapping) and caller == "graph.compare":  # a learner's own gradients
        return ("; graph.compare(loss) takes the loss alone (it judges the engine's gradients against torch); your "
                "own gradients go to graph.check(manual, loss)")
    return ""


def seed_gradient(graph: Graph, root: int, grad: Tensor | None, caller: str = "graph.backward") -> Tensor:
    """The gradient the backward starts from: ones for a scalar loss, else ``grad``, checked and cast."""
    data = graph._nodes[root]
    if not is_float(data):
        raise ValueError(f"{caller}: {data['name']!r} has dtype {data['dtype']}; only floating-point "
                         f"tensors have gradients")
    if grad is None:
        if data["value"].numel() != 1:
            raise ValueError(f"{caller}: the loss must be a scalar, but {data['name']!r} has shape "
                             f"{tuple(data['shape'])}; pass grad= (a tensor of that shape) for a non-scalar output")
        return torch.ones_like(data["value"])
    if not isinstance(grad, Tensor):
        raise ValueError(f"{caller}: grad must be a tensor of shape {data['shape']} (the shape of "
                         f"{data['name']!r}), not {type(grad).__name__}")
    if tuple(grad.shape) != data["shape"]:
        raise ValueError(f"{caller}: grad has shape {tuple(grad.shape)} but {data['name']!r} has shape "
                         f"{data['shape']}")
    device = data["value"].device
    if grad.device != device and device.type != "meta":
        raise ValueError(f"{caller}: grad is on {grad.device} but {data['name']!r} is on {device}")
    if grad.dtype != data["dtype"]:  # as torch autograd does: the seed is cast to the loss's dtype first
        if grad.is_complex():
            raise ValueError(f"{caller}: grad has dtype {grad.dtype} but {data['name']!r} is real "
                             f"({data['dtype']})")
        grad = grad.to(data["dtype"])
    return grad


def require_values(graph: Graph, root: int, caller: str) -> None:
    """Comparing and checking read gradient values: a graph recorded on the "meta" device has none."""
    if graph._nodes[root]["value"].is_meta:
        raise ValueError(f"{caller}: the graph was recorded on the 'meta' device, which keeps shapes but no values; "
                         f"there are no gradient values to compare (graph.backward gives their shapes). Record on "
                         f"a real device (cpu, cuda) for this")


def _value(arg: Any, nodes: list[dict[str, Any]]) -> Any:
    """A bound argument with its Refs (top level or in a tuple or list) replaced by recorded values."""
    if arg.__class__ is Ref:
        return nodes[arg.node]["value"]
    if isinstance(arg, (tuple, list)) and any(isinstance(a, Ref) for a in arg):
        return type(arg)(_value(a, nodes) for a in arg)
    return arg


def rule_inputs(data: dict[str, Any], nodes: list[dict[str, Any]]) -> tuple[tuple, dict]:
    """The op's bound arguments with every Ref replaced by the recorded value."""
    # a module-level helper, not a recursive closure: that closure was a reference cycle holding
    # every recorded tensor until the cyclic garbage collector ran
    args = tuple([_value(a, nodes) for a in data["bargs"]])
    kwargs = {k: _value(v, nodes) for k, v in data["bkwargs"].items()} if data["bkwargs"] else {}
    if data["output_index"] is not None:
        kwargs["output_index"] = data["output_index"]
    return args, kwargs


def input_gradients(data: dict[str, Any], grads: Any) -> Iterator[tuple[int, Tensor]]:
    """Pair the rule's returned gradients with the input nodes, by argument position."""
    if not isinstance(grads, (tuple, list)):
        grads = (grads,)
    for position, arg in enumerate(data["bargs"]):
        grad = grads[position] if position < len(grads) else None
        if grad is None:
            continue
        if isinstance(arg, Ref):
            yield arg.node, grad
        elif isinstance(arg, (tuple, list)):
            for item, item_grad in zip(arg, grad):
                if isinstance(item, Ref) and item_grad is not None:
                    yield item.node, item_grad


def check_version(data: dict[str, Any], user: dict[str, Any]) -> None:
    value = data["value"]
    if value._version != data["version"]:
        raise RuntimeError(
            f"tensorgraph: tensor {data['name']!r} was modified in place after it was recorded "
            f"(version {value._version}, recorded at version {data['version']}); the gradient of "
            f"{user['op']} at {user['source']} needs its recorded value. Clone it before changing it, "
            f"or record the change inside the block.")


def fingerprint(value: Any) -> int | None:
    """A hash of a tensor's contents (None where it cannot be taken): catches writes that skip the version counter."""
    hash_tensor = getattr(torch, "hash_tensor", None)
    if hash_tensor is None or not isinstance(value, Tensor) or value.is_meta or value.is_sparse:
        return None
    try:
        return int(hash_tensor(value.detach()).item())
    except (RuntimeError, TypeError):
        return None


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class LeafStamps:
    """The leaves' contents at the end of recording, kept in a few batched torch calls.

    Leaves of one dtype and device are flattened into one buffer of their bit patterns by
    one call. A group of up to ``COPY_LIMIT`` elements keeps that buffer itself (a
    snapshot); a backward pass flattens the leaves again and compares the two buffers bit
    for bit. A bigger group keeps each leaf's checksum instead, the sum of its bit patterns
    as 64-bit integers (as exact as ``torch.hash_tensor``'s xor, at a fraction of the cost),
    taken with one cumulative sum; a backward pass compares one total. Only on a mismatch
    does it look for the leaf that changed.
    """

    __slots__ = ("groups",)
    COPY_LIMIT = 1 << 20  # elements: a snapshot of a group up to 4 MB (float32) lives as long as its graph

    def __init__(self, leaves: list[tuple[int, Tensor]]) -> None:
        grouped: dict[tuple, list[tuple[int, Tensor]]] = {}
        for node, value in leaves:
            if value.numel() and not value.is_sparse and not value.is_meta and value.element_size() in _BITS:
                grouped.setdefault((value.dtype, value.device), []).append((node, value))
        self.groups = []
        for (_, device), members in grouped.items():
            tensors = [value for _, value in members]
            sizes = tuple(value.numel() for value in tensors)
            ends = _ends(sizes, device) if sum(sizes) > self.COPY_LIMIT else None
            self.groups.append(_group([node for node, _ in members], tensors, sizes, ends))

    @classmethod
    def from_layout(cls, layout: list[tuple[list[int], tuple[int, ...], Tensor | None]],
                    nodes: list[dict[str, Any]]) -> LeafStamps:
        """Stamps of a graph whose leaves are laid out like the ``layout()`` one's (same ids, shapes, dtypes)."""
        stamps = cls.__new__(cls)
        stamps.groups = [_group(members, [nodes[node]["value"] for node in members], sizes, ends)
                         for members, sizes, ends in layout]
        return stamps

    def layout(self) -> list[tuple[list[int], tuple[int, ...], Tensor | None]]:
        """The grouping of the leaves (node ids, sizes, checksum offsets), reusable by :meth:`from_layout`."""
        return [(nodes, sizes, ends) for nodes, _, sizes, ends, _ in self.groups]

    def changed(self) -> list[int]:
        """The leaves whose contents differ from the recorded ones."""
        found: list[int] = []
        for nodes, tensors, sizes, ends, kept in self.groups:
            if ends is None:  # a snapshot of the bits
                now = _bits(tensors)
                if not torch.equal(now, kept):
                    found.extend(node for node, a, b in zip(nodes, now.split(sizes), kept.split(sizes))
                                 if not torch.equal(a, b))
            elif not torch.equal(_bits(tensors).sum(dtype=torch.int64), kept[-1]):
                now = _running_sums(tensors, ends)
                zero = now.new_zeros(1)
                differs = (now.diff(prepend=zero) != kept.diff(prepend=zero)).tolist()
                found.extend(node for node, changed in zip(nodes, differs) if changed)
        return found

    def __bool__(self) -> bool:
        return bool(self.groups)


def _group(nodes: list[int], tensors: list[Tensor], sizes: tuple[int, ...], ends: Tensor | None) -> tuple:
    """One dtype's leaves: (nodes, tensors, sizes, checksum offsets or None, the snapshot or the running checksums)."""
    if ends is not None:
        return nodes, tensors, sizes, ends, _running_sums(tensors, ends)
    snapshot = _bits(tensors)
    if len(tensors) == 1:  # flattening one contiguous tensor returns a view of it, not a copy
        snapshot = snapshot.clone()
    return nodes, tensors, sizes, None, snapshot


NO_STAMPS = LeafStamps([])  # tg.record(check_leaves=False): nothing to compare


_ENDS: dict[tuple, Tensor] = {}


def _ends(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """Index of each leaf's last element in the group's flat buffer (cached: a training loop has few layouts)."""
    key = (sizes, device)
    ends = _ENDS.get(key)
    if ends is None:
        if len(_ENDS) > 256:
            _ENDS.clear()
        ends = _ENDS[key] = torch.tensor(sizes, device=device).cumsum(0) - 1
    return ends


def _bits(tensors: list[Tensor]) -> Tensor:
    flat = torch._C._nn.flatten_dense_tensors(tensors)  # one call for the whole group
    return flat.view(_BITS[flat.element_size()])


def _running_sums(tensors: list[Tensor], ends: Tensor) -> Tensor:
    """The checksum of the group's leaves up to and including each leaf."""
    return _bits(tensors).cumsum(0, dtype=torch.int64).index_select(0, ends)


def check_unchanged(graph: Graph, root: int, advice: str = "Call backward before updating it, or record again."
                    ) -> None:
    """Leaves the loss depends on must still hold their recorded values (``W.data -= ...`` bumps no version).

    ``advice`` ends the error: what the caller's user should do instead (``graph.check`` says check first).
    """
    stamps = graph._fingerprints
    changed = stamps.changed() if isinstance(stamps, LeafStamps) else [
        node for node, expected in stamps.items() if fingerprint(graph._nodes[node]["value"]) != expected]
    changed = [node for node in changed if node <= root]
    if not changed:
        return
    ancestors = _dependencies(graph, root)  # only on this error path
    for node in changed:
        if node in ancestors:
            data = graph._nodes[node]
            raise RuntimeError(
                f"tensorgraph: tensor {data['name']!r} was modified in place after it was recorded (its values "
                f"changed, e.g. through .data or under torch.no_grad()); the gradients of "
                f"{graph._nodes[root]['name']!r} need its recorded value. {advice}")


def _dependencies(graph: Graph, root: int) -> set[int]:
    """The nodes ``root``'s value depends on (itself included): its ancestors, less inputs an op ignores.

    ``F.batch_norm`` in training mode takes the running statistics as inputs but only writes them:
    a later training-mode call updating them in place changes nothing ``root`` was computed from.
    """
    nodes = graph._nodes
    seen = {root}
    todo = [root]
    while todo:
        data = nodes[todo.pop()]
        ignored = _ignored_inputs(data) if data["inputs"] else ()
        for source in data["inputs"]:
            if source not in seen and source not in ignored:
                seen.add(source)
                todo.append(source)
    return seen


def incomplete_gradients(graph: Graph, root: int) -> dict[int, str]:
    """The float tensors ``root`` depends on through an input torch defines no derivative for (``Op.underived``:
    gammainc's ``a``), each with that input (``'a', argument 1 of igamma at f.py:3, which ...``): their
    gradients would be incomplete. Empty for almost every graph: one pass over the ops' names finds none."""
    nodes = graph._nodes
    if UNDERIVED.keys().isdisjoint([data["op"] for data in nodes[:root + 1]]):
        return {}
    found: dict[int, str] = {}
    for node in sorted(_dependencies(graph, root), reverse=True):
        data = nodes[node]
        positions = UNDERIVED.get(data["op"]) if data["kind"] == "op" else None
        for position in positions or ():
            arg = data["bargs"][position] if position < len(data["bargs"]) else None
            if arg.__class__ is not Ref or not is_float(nodes[arg.node]):
                continue
            param = OPS[data["op"]].params[position]
            which = f"argument {position + 1}" if param in ("x", "input", "other") else f"the {param!r} argument"
            why = (f"{nodes[arg.node]['name']!r}, {which} of {data['op']} at {data['source'] or '<unknown>'}, "
                   f"which has no derivative (torch defines none either, and raises when it requires grad)")
            for ancestor in _dependencies(graph, arg.node):
                if is_float(nodes[ancestor]):
                    found.setdefault(ancestor, why)
    return found


def _ignored_inputs(data: dict[str, Any]) -> set[int]:
    """The input nodes a node's value does not depend on (its op's ``ignores``), unless also passed elsewhere."""
    op = OPS.get(data["op"])
    if op is None or op.ignores is None:
        return set()
    positions = op.ignores(data["attrs"])
    refs = [(position, arg.node) for position, arg in enumerate(data["bargs"]) if isinstance(arg, Ref)]
    return {node for position, node in refs if position in positions} - {
        node for position, node in refs if position not in positions}


# composites without a rule whose parts have rules: how to write them so that they record as those parts
_REWRITES = {
    "multi_head_attention_forward": (
        "; without static_k and static_v, nn.MultiheadAttention is recorded as its parts, which have rules; "
        "with them, write the attention with nn.Linear projections and F.scaled_dot_product_attention"),
}


def gradient_hooks(graph: Graph, root: int) -> dict[int, list[Callable]] | None:
    """The tensor hooks (``t.register_hook(fn)``) on the graph's tensors, by the node whose gradient they see.

    Only nodes up to ``root`` (the loss) count: a later one cannot be on its path.

    A hook belongs to the version of its tensor that was current when it was registered: the latest one,
    unless a recorded in-place op replaced that version since (``graph._version_hooks``). The hooks are read
    from the tensors' own hook dicts at every backward, so ``handle.remove()`` is respected. None: no hooks
    (the common case, checked with two attribute reads per tensor). A post-accumulate-grad hook raises:
    the engine accumulates no ``.grad``, so it has no moment to call it.
    """
    found: dict[int, dict] | None = None
    for node, _, tensor in graph._live.values():
        if tensor._backward_hooks or tensor._post_accumulate_grad_hooks:
            if tensor._post_accumulate_grad_hooks:
                hook = next(iter(tensor._post_accumulate_grad_hooks.values()))
                raise NotImplementedError(
                    f"tensorgraph: tensor {graph._nodes[node]['name']!r} has a post-accumulate-grad hook "
                    f"({hook_where(hook)}); graph.backward fills no .grad, so it cannot run it. Remove it "
                    f"(handle.remove()) and apply it to grads[tensor] after graph.backward, or use torch autograd.")
            if found is None:
                found = {}
            found[node] = tensor._backward_hooks
    earlier = getattr(graph, "_version_hooks", None)
    if found is None and not earlier:
        return None
    result: dict[int, list[Callable]] = {}
    claimed: set[tuple[int, Any]] = set()
    for node, (hooks, keys) in (earlier or {}).items():
        claimed.update((id(hooks), key) for key in keys)
        kept = [hooks[key] for key in keys if key in hooks]
        if kept:
            result.setdefault(_history(graph, node), []).extend(kept)
    for node, hooks in (found or {}).items():
        kept = [hook for key, hook in hooks.items() if (id(hooks), key) not in claimed]
        if kept:
            result.setdefault(_history(graph, node), []).extend(kept)
    return {node: found for node, found in result.items() if node <= root} or None


def _history(graph: Graph, node: int) -> int:
    """The version whose gradient torch's hook sees: updates under no_grad keep the tensor's history (its grad_fn),
    so a hook on any of them sees the gradient of the version before them, which adds up every use."""
    nodes = graph._nodes
    while nodes[node]["op"] == "no_grad_update":
        node = nodes[node]["previous"]
    return node


def hook_where(hook: Any) -> str:
    """Where a hook function was defined (file:line), for error messages."""
    code = getattr(getattr(hook, "func", hook), "__code__", None)
    if code is None:
        return f"hook {hook!r}"
    name = getattr(hook, "__qualname__", code.co_name)
    return f"hook {name} defined at {_short_path(code.co_filename)}:{code.co_firstlineno}"


def run_hooks(graph: Graph, node: int, hooks: list[Callable], grad: Tensor) -> Tensor:
    """Call a tensor's hooks in registration order with its complete gradient; a returned tensor replaces it."""
    data = graph._nodes[node]
    for hook in hooks:
        result = hook(grad)
        if result is None:
            continue
        if not isinstance(result, Tensor) or result.shape != grad.shape or result.dtype != grad.dtype:
            what = (type(result).__name__ if not isinstance(result, Tensor)
                    else f"a tensor of shape {tuple(result.shape)}, {result.dtype}")
            raise RuntimeError(f"tensorgraph: the gradient hook on {data['name']!r} ({hook_where(hook)}) returned "
                               f"{what}; a hook must return None or a tensor of the gradient's shape "
                               f"{tuple(grad.shape)} and dtype {grad.dtype} (torch refuses it too)")
        grad = result
    return grad


def call_rule(graph: Graph, node: int, grad: Tensor, rule: Callable | None = None) -> Any:
    """Run the op's rule for one node (or ``rule`` in its place): the gradients of its inputs, by argument
    position."""
    nodes = graph._nodes
    data = nodes[node]
    rule = rule or data.get("rule")  # a node may carry its own rule (fused nodes); otherwise the op's
    if rule is None:
        op = OPS.get(data["op"])
        rule = op.rule if op is not None else None
    if rule is None or data.get("unsupported"):
        if not any(is_float(nodes[source]) for source in data["inputs"]):
            return ()
        reason = data.get("unsupported") or f"no gradient rule for the op {data['op']!r}"
        raise NotImplementedError(f"tensorgraph: {reason} (called at {data['source'] or '<unknown>'}, "
                                  f"producing {data['name']!r}){_REWRITES.get(data['op'], '')}")
    if data["value"]._version != data["version"]:
        check_version(data, data)
    for source in data["inputs"]:
        source_data = nodes[source]
        if source_data["value"]._version != source_data["version"] and source not in _ignored_inputs(data):
            check_version(source_data, data)
    # rule_inputs() inlined for the common arguments (a Ref, a plain value): once per node, on the hot path
    args = [nodes[a.node]["value"] if a.__class__ is Ref else (
        _value(a, nodes) if isinstance(a, (tuple, list)) else a) for a in data["bargs"]]
    bkwargs = data["bkwargs"]
    kwargs = {k: _value(v, nodes) for k, v in bkwargs.items()} if bkwargs else {}
    if data["output_index"] is not None:
        kwargs["output_index"] = data["output_index"]
        out = data["result"]
    else:
        out = data["value"]
    try:
        return rule(grad, out, *args, **kwargs)
    except UnsupportedCall as err:  # an argument the rule cannot handle: say where the call was made
        raise UnsupportedCall(f"tensorgraph: {err} (called at {data['source'] or '<unknown>'}, "
                              f"producing {data['name']!r})") from None


def accumulate(grads: dict[int, Tensor], source: int, grad: Tensor, data: dict[str, Any]) -> Tensor:
    """Undo broadcasting (once, here) and add to the gradients from other consumers."""
    shape = data["shape"]
    if grad.shape != shape:
        try:
            grad = grad.sum_to_size(shape)
        except RuntimeError:
            raise RuntimeError(f"tensorgraph: a rule returned a gradient of shape {tuple(grad.shape)} for "
                               f"{data['name']!r} of shape {shape}") from None
    if grad.dtype != data["dtype"]:
        grad = grad.to(data["dtype"])
    grads[source] = grads[source] + grad if source in grads else grad
    return grad


def backward(graph: Graph, loss: Any, grad: Tensor | None = None, *, tape: list | None = None,
             rules: dict[int, Callable] | None = None) -> Gradients:
    """Backpropagate from ``loss`` through ``graph``; see :class:`Gradients`.

    With ``tape`` (a list), every contribution is appended to it as a
    :class:`Contribution`, for :func:`trace`. ``rules`` (node -> rule) runs those nodes with other rules
    than their ops' (the backward view's textbook form of a cross-entropy).
    """
    # NOTE: parameters that require grad (the lecture's habit) would make torch autograd record every
    # rule's kernels: twice the time, and gradients attached to a graph (``.numpy()`` refuses them).
    # trace() (a tape) records the rules' calls with tg.record, which takes no-grad calls for constants
    shared = SHARED.set({})  # the rules of a call's several outputs share its work (an RNN's re-run) in this pass
    try:
        if tape is not None:
            return _backward(graph, loss, grad, tape, rules)
        with torch.no_grad():
            return _backward(graph, loss, grad, tape, rules)
    finally:
        SHARED.reset(shared)


def _backward(graph: Graph, loss: Any, grad: Tensor | None, tape: list | None,
              rules: dict[int, Callable] | None = None) -> Gradients:
    if getattr(graph, "_recording", False):
        raise RuntimeError("tensorgraph: graph.backward() was called inside the graph's own tg.record() block; "
                           "call it after the with-block ends (names are given and the graph is complete there)")
    root = root_node(graph, loss)
    hooks = gradient_hooks(graph, root)
    if hooks is not None and tape is not None:
        node = max(hooks)
        raise NotImplementedError(
            f"tensorgraph: tensor {graph._nodes[node]['name']!r} has a gradient hook ({hook_where(hooks[node][0])}); "
            f"backward_source, the backward view and tg.compile print the rules' torch calls as code and cannot "
            f"include a Python hook. graph.backward and graph.compare run hooks as torch does; remove the hook "
            f"(handle.remove()) for these.")
    template = getattr(graph, "_replay", None)
    # a repeated structure: its cached straight-line plan, if it has one (a plan has no place for hooks)
    if template is not None and tape is None and hooks is None:
        replayed = template.backward(graph, root, grad)
        if replayed is not None:
            return replayed
    if getattr(graph, "_fingerprints", None) and tape is None:  # (trace() checks before it starts recording)
        check_unchanged(graph, root)
    nodes = graph._nodes
    grads: dict[int, Tensor] = {root: seed_gradient(graph, root, grad)}
    anomaly = graph.anomaly
    for node in range(root, -1, -1):  # creation order reversed: a reverse topological order
        g = grads.get(node)
        if g is None:
            continue
        if hooks is not None and node in hooks:  # its gradient is complete here: before it flows on, as in torch
            g = grads[node] = run_hooks(graph, node, hooks[node], g)
        data = nodes[node]
        if not data["inputs"] or data["kind"] != "op":
            continue
        input_grads = call_rule(graph, node, g, rules.get(node) if rules else None)
        if input_grads.__class__ is not tuple and not isinstance(input_grads, (tuple, list)):
            input_grads = (input_grads,)
        count = len(input_grads)
        # input_gradients() inlined: this loop runs once per node and its overhead is the engine's own cost
        for position, arg in enumerate(data["bargs"]):
            if position >= count:
                break
            input_grad = input_grads[position]
            if input_grad is None:
                continue
            if arg.__class__ is Ref:
                source = arg.node
                source_data = nodes[source]
                if (tape is None and not anomaly and input_grad.dtype == source_data["dtype"]
                        and input_grad.dtype.is_floating_point and input_grad.shape == source_data["shape"]):
                    total = grads.get(source)  # _send's common case, inlined
                    grads[source] = input_grad if total is None else total + input_grad
                else:
                    _send(grads, node, data, source, input_grad, nodes, tape, anomaly)
            elif isinstance(arg, (tuple, list)):
                for item, item_grad in zip(arg, input_grad):
                    if isinstance(item, Ref) and item_grad is not None:
                        _send(grads, node, data, item.node, item_grad, nodes, tape, anomaly)
    return Gradients(graph, grads, root, incomplete_gradients(graph, root))


def _send(grads: dict[int, Tensor], node: int, data: dict[str, Any], source: int, grad: Tensor,
          nodes: list[dict[str, Any]], tape: list | None, anomaly: bool) -> None:
    """One contribution from ``node``'s rule to its input ``source``."""
    source_data = nodes[source]
    dtype = source_data["dtype"]
    if not (dtype.is_floating_point or dtype.is_complex):
        return
    if tape is None and grad.dtype == dtype and grad.shape == source_data["shape"]:  # the common case
        total = grads.get(source)
        grads[source] = grad if total is None else total + grad
    else:
        first = source not in grads
        summed = accumulate(grads, source, grad, source_data)
        if tape is not None:
            tape.append(Contribution(node, source, grad, summed, grads[source], first))
    if anomaly:
        _check_finite(grads[source], data, source_data)


@dataclass
class Contribution:
    """One step of the backward pass: ``consumer``'s rule sent ``grad`` to its input ``source``.

    ``summed`` is ``grad`` after broadcast-undo (the same object when no sum was needed)
    and ``total`` the gradient of ``source`` after adding it (``summed`` when ``first``).
    """

    consumer: int
    source: int
    grad: Tensor
    summed: Tensor
    total: Tensor
    first: bool


@dataclass
class BackwardTrace:
    """The backward pass the engine ran, itself recorded as a graph (the adjoint graph).

    ``graph`` is the forward graph, ``adjoint`` the recorded backward (its leaves are
    forward values and the seed; its nodes are the rules' torch calls, the broadcast-undo
    sums and the fan-out additions), ``grads`` the result, and ``steps`` the
    contributions in the order they were made.
    """

    graph: Graph
    adjoint: Graph
    grads: Gradients
    steps: list[Contribution]

    def node_of(self, tensor: Tensor) -> int | None:
        """The adjoint-graph node holding a tensor of the backward pass (None for forward values)."""
        live = self.adjoint._live.get(id(tensor))
        return live[0] if live is not None and live[2] is tensor else None


def trace(graph: Graph, loss: Any, grad: Tensor | None = None) -> BackwardTrace:
    """Run the backward pass while recording it: the input of backward_source and the backward view."""
    return traced(graph, loss, grad, "tg.trace")


def traced(graph: Graph, loss: Any, grad: Tensor | None, caller: str,
           rules: dict[int, Callable] | None = None) -> BackwardTrace:
    """:func:`trace`, its errors naming ``caller``, the function the user called (``graph.backward_source``);
    ``rules``: see :func:`backward`."""
    from .naming import set_names
    from .record import record

    steps: list[Contribution] = []
    root = root_node(graph, loss, caller)
    if getattr(graph, "_fingerprints", None):
        check_unchanged(graph, root)
    seed = seed_gradient(graph, root, grad, caller)  # checked here, so that its errors name the caller
    if grad is not None:  # cast outside the recording: a given seed stays a leaf of the adjoint graph
        grad = seed
    with record() as adjoint:
        grads = backward(graph, loss, grad, tape=steps, rules=rules)
    result = BackwardTrace(graph, adjoint, grads, steps)
    names: dict[int, str] = {}
    for data in graph._nodes:  # forward values keep their names
        adjoint_node = result.node_of(data["value"])
        if adjoint_node is not None:
            names[adjoint_node] = data["name"]
    named_by_user: set[int] = set()
    for node, g in grads.by_node.items():  # the lecture's convention: dhprebn
        adjoint_node = result.node_of(g)
        # one gradient tensor can serve several nodes (an add passes dlogits on as dmatmul_2 unchanged):
        # the user's name wins over an op-based one
        if adjoint_node is not None and adjoint_node not in named_by_user:
            names[adjoint_node] = "d" + graph._nodes[node]["name"]
            if graph._nodes[node]["named"]:
                named_by_user.add(adjoint_node)
    set_names(adjoint, names)
    return result


def _check_finite(grad: Tensor, user: dict[str, Any], data: dict[str, Any]) -> None:
    if not torch.isfinite(grad).all():
        raise FloatingPointError(
            f"tensorgraph anomaly: the gradient of {data['name']!r} from {user['op']} "
            f"({user['name']!r} at {user['source']}) is not finite (nan or inf)")
