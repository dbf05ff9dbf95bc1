"""graph.save / tg.load_graph: JSON and GraphML round trips, values optional, clear errors on bad files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tensorgraph as tg
from tensorgraph import serialize
from tensorgraph.lecture import record_exercise

D = torch.float64
KEYS = ("name", "named", "op", "kind", "shape", "dtype", "inputs", "attrs", "source", "function", "scope", "inplace",
        "previous", "output_index", "args", "kwargs", "bargs", "bkwargs")


def kitchen_sink():
    """A program touching what the saved call must carry: slices, ranges, Ellipsis, None, tensors as
    indices, dtypes, tuples of dims, keyword arguments, several outputs, in-place versions, scopes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g, dtype=D)
    w = torch.randn(5, 3, generator=g, dtype=D)
    idx = torch.tensor([0, 2, 2])
    with tg.record() as graph:
        with tg.scope("layer"):
            h = torch.tanh(x @ w)
            h += 1.0
        picked = h[idx][..., None, 1:3:1] * h[range(3), idx].unsqueeze(-1).unsqueeze(-1)
        top = h.max(dim=1, keepdim=True).values
        low = h.float().to(torch.float64).sum((0, 1), keepdim=True)
        y = h.clone()
        y[0] = 0.5
        pad = F.pad(y, (1, 0), value=-1.0)
        loss = picked.sum() + top.mean() + low.squeeze() + pad.std(correction=0)
    return graph, loss


@pytest.fixture(params=[".json", ".graphml"])
def suffix(request):
    return request.param


def assert_same_structure(a: tg.Graph, b: tg.Graph, values: bool = False) -> None:
    assert len(a) == len(b) and a.names == b.names
    for node, (x, y) in enumerate(zip(a._nodes, b._nodes)):
        for key in KEYS + (("unsupported",) if values else ()):
            assert _plain(x[key]) == _plain(y[key]), f"node {node} ({x['name']}): {key} {x[key]!r} != {y[key]!r}"
        assert tuple(y["value"].shape) == x["shape"] and y["value"].dtype == x["dtype"]
        assert (x["func"] is None) == (y["func"] is None)
        if x["func"] is not None and not isinstance(y["func"], serialize.Uncallable):
            assert y["func"] is x["func"] or y["func"] == x["func"], f"node {node}: callable {y['func']!r}"
    assert sorted(a.nx.edges(keys=True)) == sorted(b.nx.edges(keys=True))
    assert all(a.nx.edges[e]["position"] == b.nx.edges[e]["position"] for e in a.nx.edges(keys=True))


def _plain(value):
    """Tuples and lists compare alike (JSON has one sequence type in attributes); Refs by node."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, torch.dtype):
        return str(value)
    return value


@pytest.mark.parametrize("program", ["lecture", "kitchen_sink"])
def test_round_trip_without_values(tmp_path, suffix, program):
    graph, loss = record_exercise()[:2] if program == "lecture" else kitchen_sink()
    path = tmp_path / f"graph{suffix}"
    assert graph.save(path) == path and path.exists()  # the path, as serialize.save returns it
    loaded = tg.load_graph(path)
    assert_same_structure(graph, loaded)
    assert all(data["value"].is_meta for data in loaded._nodes)
    assert loaded.node("h")["scope"] == graph.node("h")["scope"]
    assert loaded.ancestors("loss") == graph.ancestors(graph.name_of(loss))
    with pytest.raises(NotImplementedError, match=r"loaded without values \(save it with values=True"):
        loaded.backward("loss")


def test_round_trip_with_values_backpropagates_the_same(tmp_path, suffix):
    graph, loss = kitchen_sink()
    path = tmp_path / f"graph{suffix}"
    graph.save(path, values=True)
    loaded = tg.load_graph(path)
    assert_same_structure(graph, loaded, values=True)
    for a, b in zip(graph._nodes, loaded._nodes):
        assert torch.equal(a["value"], b["value"]), a["name"]
    ours, theirs = graph.backward(loss), loaded.backward("loss")
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert loaded.compare("loss").ok


def test_factorisations_round_trip_and_backpropagate_bit_for_bit(tmp_path):
    """LAPACK returns column-major factors, a loaded graph row-major values: the same gradients all the same."""
    a = torch.randn(2, 4, 4, dtype=D, generator=torch.Generator().manual_seed(3)) + 4 * torch.eye(4, dtype=D)
    with tg.record() as graph:
        chol = torch.linalg.cholesky(a @ a.mT)
        q, r = torch.linalg.qr(a)
        lu = torch.linalg.lu_factor(a).LU
        loss = (chol * r * lu).sum() + (q * torch.cholesky_solve(a, chol)).sum() + torch.linalg.pinv(a).sum()
    path = tmp_path / "graph.json"
    graph.save(path, values=True)
    ours, theirs = graph.backward(loss), tg.load_graph(path).backward("loss")
    assert set(ours) == set(theirs) and all(torch.equal(ours[name], theirs[name]) for name in ours)


@pytest.mark.parametrize("suffix", [".json", ".graphml"])
def test_a_recurrent_module_with_parameters_round_trips_bit_for_bit(tmp_path, suffix):
    """An nn.GRU's loaded graph differentiated one ulp off the recorded one: its values were plain tensors (and
    views of themselves, from reshape), where the recorded ones are parameters and what was computed from them,
    and torch.matmul picks its kernel path by requires_grad, also under no_grad where the rules run."""
    torch.manual_seed(4)
    gru = torch.nn.GRU(4, 5, num_layers=2, bidirectional=True, batch_first=True).double()
    x = torch.randn(3, 6, 4, dtype=D)
    with tg.record() as graph:
        out, h_n = gru(x)
        loss = out.pow(2).mean() + h_n.sum()
    path = tmp_path / f"graph{suffix}"
    graph.save(path, values=True)
    loaded = tg.load_graph(path)
    ours, theirs = graph.backward(loss), loaded.backward("loss")
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    for parameter in gru.parameters():
        assert loaded.node(graph.node_id(parameter))["value"].requires_grad
    assert loaded.compare("loss").ok


def test_inverse_and_determinants_of_lapack_results_round_trip_bit_for_bit(tmp_path):
    """det, slogdet, logdet, inv and solve of a column-major LAPACK result (inv's): after save and load the
    values are row-major, and the gradients must still be the same bits."""
    for seed, shape, suffix in ((0, (4, 4), ".json"), (1, (6, 6), ".graphml"), (2, (3, 4, 4), ".json")):
        a = torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))
        a = a + 4 * torch.eye(shape[-1], dtype=D)
        with tg.record() as graph:
            inv = torch.linalg.inv(a)
            loss = (torch.linalg.det(inv) + torch.linalg.slogdet(inv).logabsdet + torch.logdet(inv @ inv.mT)).sum()
            loss = loss + torch.linalg.inv(inv).sum() + torch.linalg.solve(inv, a).sum()
        path = tmp_path / f"graph{suffix}"
        graph.save(path, values=True)
        loaded = tg.load_graph(path)
        assert loaded.value("inv").stride() == inv.stride() != inv.contiguous().stride()
        ours, theirs = graph.backward(loss), loaded.backward("loss")
        assert set(ours) == set(theirs) and all(torch.equal(ours[name], theirs[name]) for name in ours), shape


def test_lecture_with_values_in_both_formats(tmp_path):
    graph, loss, _ = record_exercise()
    expected = graph.backward(loss)
    for suffix in (".json", ".graphml"):
        path = tmp_path / f"lecture{suffix}"
        graph.save(str(path), values=True)
        grads = tg.load_graph(str(path)).backward("loss")
        assert all(torch.equal(expected[name], grads[name]) for name in expected)


def test_non_finite_values_and_all_dtypes_survive(tmp_path, suffix):
    values = {
        "f64": torch.tensor([1.5, float("nan"), float("inf"), -float("inf"), 1e-300], dtype=D),
        "f32": torch.tensor([0.1, 2.5], dtype=torch.float32),
        "f16": torch.tensor([0.1, 65504.0], dtype=torch.float16),
        "bf16": torch.tensor([0.1, 3.0e38], dtype=torch.bfloat16),
        "ints": torch.tensor([[1, -2], [3, 2**40]]),
        "flags": torch.tensor([True, False]),
        "empty": torch.empty(0, 3, dtype=D),
        "scalar": torch.tensor(2.0, dtype=D),
    }
    with tg.record() as graph:
        outs = [t * 1 if t.dtype != torch.bool else ~t for t in values.values()]
    assert len(outs) == len(values)
    path = tmp_path / f"dtypes{suffix}"
    graph.save(path, values=True)
    loaded = tg.load_graph(path)
    for a, b in zip(graph._nodes, loaded._nodes):
        assert b["value"].dtype == a["value"].dtype and b["value"].shape == a["value"].shape
        assert torch.equal(a["value"], b["value"]) or torch.allclose(a["value"], b["value"], equal_nan=True)


def test_complex_values_survive_and_the_loaded_graph_gets_torchs_gradient(tmp_path, suffix):
    """save(values=True) of a graph with a complex tensor raised JSON's 'complex is not serializable'."""
    z = torch.tensor([[1 + 2j, 3 - 1j], [-0.5j, 2.0]], dtype=torch.complex128, requires_grad=True)
    with tg.record() as graph:
        z.conj() * 1  # a complex result (no rule, off the loss's path) with its conjugate bit set
        loss = z.abs().sum() + torch.empty(0, 2, dtype=torch.complex64).abs().sum()
    path = tmp_path / f"complex{suffix}"
    graph.save(path, values=True)
    loaded = tg.load_graph(path)
    for a, b in zip(graph._nodes, loaded._nodes):
        assert b["value"].dtype == a["value"].dtype and torch.equal(b["value"], a["value"].resolve_conj())
    expected, = torch.autograd.grad(z.abs().sum(), z)
    torch.testing.assert_close(loaded.backward(graph.node_id(loss))["z"], expected)


def test_a_transposed_complex_value_round_trips_with_its_layout(tmp_path, suffix):
    """A complex value's layout was taken of its real view (one more dim): the file saved could not be loaded."""
    z = torch.randn(4, 3, dtype=torch.complex128, generator=torch.Generator().manual_seed(5))
    with tg.record() as graph:
        zt = z.mT * 1  # (mul keeps its input's column-major layout)
        zt.abs().sum()
    assert not zt.is_contiguous()
    path = tmp_path / f"complex{suffix}"
    graph.save(path, values=True)
    loaded = tg.load_graph(path)
    assert torch.equal(loaded.value("zt"), zt) and loaded.value("zt").stride() == zt.stride()


def test_a_control_character_graphml_cannot_hold_is_refused_at_save(tmp_path):
    """GraphML (XML 1.0) cannot hold one even escaped: the file was written, then load_graph could not read it."""
    x = torch.randn(3, dtype=D, requires_grad=True)
    with tg.record() as graph:
        with tg.scope("layer\x01"):
            x.sin().sum()
    with pytest.raises(ValueError, match=r"the scope of node 'sin_1' \('layer\\x01'\) has a control character, "
                                         r"which GraphML cannot hold; save the graph as .json instead"):
        graph.save(tmp_path / "g.graphml")
    assert not (tmp_path / "g.graphml").exists()
    graph.save(tmp_path / "g.json")
    assert tg.load_graph(tmp_path / "g.json").node("sin_1")["scope"] == "layer\x01"


def test_loaded_graph_renders_and_prints_as_the_original(tmp_path, suffix):
    graph, _ = kitchen_sink()
    path = tmp_path / f"graph{suffix}"
    graph.save(path)
    loaded = tg.load_graph(path)
    assert loaded.render().source == graph.render().source
    out = loaded.render(tmp_path / "loaded.dot")
    assert Path(out).read_text().startswith("digraph")
    assert isinstance(loaded.nx.nodes[loaded.node_id("top")]["attrs"], dict)
    assert "loaded_from" in vars(loaded) and loaded.anomaly is False


def test_anomaly_flag_round_trips(tmp_path):
    x = torch.ones(2, dtype=D)
    with tg.record(anomaly=True) as graph:
        (x * 2).sum()
    graph.save(tmp_path / "a.json")
    assert tg.load_graph(tmp_path / "a.json").anomaly is True


# ---------------------------------------------------------------- errors


def test_unknown_suffix(tmp_path):
    graph, _ = kitchen_sink()
    with pytest.raises(ValueError, match=r"graph\.pkl: unknown graph file type '\.pkl'; use \.json .* or \.graphml"):
        graph.save(tmp_path / "graph.pkl")
    (tmp_path / "graph.txt").write_text("{}")
    with pytest.raises(ValueError, match=r"graph\.txt: unknown graph file type"):
        tg.load_graph(tmp_path / "graph.txt")


def test_save_inside_the_block_is_refused(tmp_path):
    x = torch.ones(2)
    with tg.record() as graph:
        y = x * 2
        with pytest.raises(ValueError, match="still being recorded"):
            graph.save(tmp_path / "g.json")
    assert y.shape == (2,)


def _saved(tmp_path, values=False) -> tuple[Path, dict]:
    graph, _ = kitchen_sink()
    path = tmp_path / "g.json"
    graph.save(path, values=values)
    return path, json.loads(path.read_text())


def _rewrite(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_malformed_json_files_name_the_file_and_the_problem(tmp_path):
    path, data = _saved(tmp_path)
    cases = []

    def case(mutate, message):
        copy = json.loads(json.dumps(data))
        mutate(copy)
        cases.append((copy, message))

    case(lambda d: d["graph"].pop("format"), "not a tensorgraph graph")
    case(lambda d: d["graph"].update(version=99), "graph format version 99; this tensorgraph reads version 1")
    case(lambda d: d["nodes"][3].pop("op"), "node 3: missing op")
    case(lambda d: d["nodes"][3].update(dtype="float128"), "node 3: unknown dtype 'float128'")
    case(lambda d: d["nodes"][3].update(shape=[2, -1]), "node 3: shape must be a list of sizes")
    case(lambda d: d["nodes"][3].update(inputs=[7]), r"node 3: inputs must be ids of earlier nodes, got \[7\]")
    case(lambda d: d["nodes"][3].update(kind="tensor"), "node 3: unknown kind 'tensor'")
    case(lambda d: d["nodes"][3].update(bargs={"$weird": 1}), "node 3: malformed call arguments")
    case(lambda d: d["nodes"][4].update(name=d["nodes"][3]["name"]), "node names are not unique")
    case(lambda d: d["edges"].pop(), "the edges do not match the nodes' inputs")
    case(lambda d: d["nodes"][-1].update(id=100), r"node ids must be 0\.\.")
    case(lambda d: d.pop("nodes"), "not a readable node-link JSON graph file")
    # hand edits that loaded and then crashed backward, compare or render with a TypeError or IndexError
    case(lambda d: d["nodes"][3].update(bargs=-1), "node 3: bargs must be a sequence, got -1")
    case(lambda d: d["nodes"][3].update(kwargs={"$tuple": []}), r"node 3: kwargs must be a mapping, got \(\)")
    case(lambda d: d["nodes"][2].update(bargs=None), r"node 2: the call's tensor arguments \(\$ref\) do not match "
                                                     r"its inputs \[0, 1\]")
    case(lambda d: d["nodes"][2].update(args={"$tuple": [{"$ref": 0}, {"$ref": 999}]}), "do not match its inputs")
    case(lambda d: d["nodes"][0].update(inputs=[], func="torch.tanh"), "node 0: a leaf has no inputs and no call")
    case(lambda d: d["nodes"][3].update(func=7), "node 3: func must be a dotted name, got 7")
    case(lambda d: d["nodes"][4].update(previous=9), "node 4: previous .* must be an earlier node's id, got 9")
    case(lambda d: d["nodes"][3].update(inplace=True), r"node 3: an in-place node \(inplace: true\) names")
    case(lambda d: d["nodes"][3].update(named="yes"), "node 3: named must be true or false")
    case(lambda d: d["nodes"][12].update(output_index=5), r"node 12: result must list the ids of its call's outputs")
    case(lambda d: d["nodes"][12].update(output_index=1.5), "node 12: result must list")
    case(lambda d: d["nodes"][2].update(output_index=0), "node 2: output_index and result come together")
    case(lambda d: d["nodes"][12].update(result=[12, 10**6]), r"node 12: result \[12, 1000000\] must list nodes of "
                                                             "the same call")
    case(lambda d: d["nodes"][0].update(id="x"), r"node ids must be 0\.\.")
    case(lambda d: d.update(graph=[]), "not a tensorgraph graph")
    case(lambda d: d["edges"][0].update(key="zz"), "an edge's key is not its argument position")
    for copy, message in cases:
        with pytest.raises(ValueError, match=rf"g\.json: .*{message}"):
            tg.load_graph(_rewrite(path, copy))
    for text, message in [("{not json", "not a readable node-link JSON"), ("", "not a readable node-link JSON"),
                          (path.read_text()[: len(path.read_text()) // 2], "not a readable"),
                          ("[1, 2]", "not a readable"), ("null", "not a readable"),
                          ("[" * 100_000 + "]" * 100_000, r"not a readable .*RecursionError"),
                          ("\udcff{}", r"not a readable .*UnicodeDecodeError")]:
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(ValueError, match=rf"g\.json: {message}"):
            tg.load_graph(path)


def test_malformed_values_and_graphml(tmp_path):
    path, data = _saved(tmp_path, values=True)
    for layout in ([0], [1, 1], [0, 1, 2], "10", [True, False], [0, "a"], [None, 1]):
        edited = json.loads(json.dumps(data))
        edited["nodes"][3].update(value=[[1.0, 2.0], [3.0, 4.0]], shape=[2, 2], layout=layout)
        with pytest.raises(ValueError, match=r"g\.json: node 3: layout must be an order of the value's 2 dims"):
            tg.load_graph(_rewrite(path, edited))
    data["nodes"][2]["value"] = [1.0, 2.0]
    with pytest.raises(ValueError, match=r"g\.json: node 2: its value does not fit shape"):
        tg.load_graph(_rewrite(path, data))
    data["nodes"][2].pop("value")
    with pytest.raises(ValueError, match=r"node 2: the file says it has values, but this node has none"):
        tg.load_graph(_rewrite(path, data))
    broken = tmp_path / "g.graphml"
    broken.write_text("<graphml><graph><node id='0'>")
    with pytest.raises(ValueError, match=r"g\.graphml: not a readable GraphML graph file"):
        tg.load_graph(broken)
    graph, _ = kitchen_sink()
    graph.save(broken)
    broken.write_text(broken.read_text().replace('"[4, 5]"', '"[4, 5"', 1).replace("[4, 5]", "[4, 5", 1))
    with pytest.raises(ValueError, match=r"g\.graphml: node \d+: attribute 'shape' is not valid JSON"):
        tg.load_graph(broken)


def test_a_graph_loaded_without_values_cannot_be_saved_with_values(tmp_path):
    path, _ = _saved(tmp_path)
    with pytest.raises(ValueError, match=r"values=True\): the graph was loaded from .*g\.json without values"):
        tg.load_graph(path).save(tmp_path / "again.json", values=True)


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        tg.load_graph(tmp_path / "nope.json")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(IsADirectoryError):
        tg.load_graph(tmp_path / "folder.json")


def test_save_where_it_cannot_write_names_the_path_not_a_temporary_file(tmp_path):
    graph, _ = kitchen_sink()
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "file").write_text("")
    with pytest.raises(IsADirectoryError, match=r"cannot write '.*folder\.json': it is a folder$"):
        graph.save(tmp_path / "folder.json")
    with pytest.raises(FileNotFoundError, match=r"graph\.save: cannot write '.*g\.json': the folder '.*nope' does not "
                                                r"exist$"):
        graph.save(tmp_path / "nope" / "g.json")
    with pytest.raises(FileNotFoundError, match=r"the folder '.*file' is a file, not a folder$"):
        graph.save(tmp_path / "file" / "g.graphml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.json"]


def test_a_file_cannot_make_a_loaded_graph_call_arbitrary_code(tmp_path, monkeypatch):
    """Callables resolve by attribute lookup inside torch/tensorgraph only; outside the op table they never run."""
    path, data = _saved(tmp_path, values=True)
    called = []
    monkeypatch.setattr(torch, "save", lambda *a, **k: called.append(a))
    op_node = next(i for i, n in enumerate(data["nodes"]) if n["kind"] == "op")
    data["nodes"][op_node]["func"] = "torch.save"
    data["nodes"][op_node + 1]["func"] = "os.system"
    loaded = tg.load_graph(_rewrite(path, data))
    assert isinstance(loaded._nodes[op_node]["func"], serialize.Uncallable)
    with pytest.raises(NotImplementedError, match="does not call torch.save"):
        loaded._nodes[op_node]["func"]("x", "y")
    assert loaded._nodes[op_node + 1]["func"] is None
    assert "'os.system' names no callable of this torch" in loaded._nodes[op_node + 1]["unsupported"]
    with pytest.raises((NotImplementedError, TypeError)):
        loaded.compare("loss")
    assert not called
    with pytest.raises(ValueError, match="not a name inside torch or tensorgraph"):
        serialize.resolve("builtins.eval")


def test_a_file_cannot_make_compare_open_a_file_through_an_aten_op(tmp_path):
    """aten holds from_file (a path, and shared=True maps it writable): only the rules' own kernels run."""
    y = torch.randn(3, dtype=D)
    with tg.record() as graph:
        made = torch.zeros(1, dtype=D)
        loss = (y * 2).sum() + made.exp().sum()
    path = tmp_path / "g.json"
    graph.save(path, values=True)
    data = json.loads(path.read_text())
    node = next(n for n in data["nodes"] if n["op"] == "zeros")
    assert graph.name_of(loss) == "loss"
    target = tmp_path / "victim.bin"
    node["func"], node["kind"] = "torch.ops.aten.from_file", "op"
    node["args"] = node["bargs"] = {"$tuple": [str(target), True, 1]}
    node["kwargs"] = node["bkwargs"] = {"$dict": {"dtype": {"$dtype": "float64"}}}
    loaded = tg.load_graph(_rewrite(path, data))
    assert isinstance(loaded.node("made")["func"], serialize.Uncallable)
    with pytest.raises(NotImplementedError, match="does not call torch.ops.aten.from_file"):
        loaded.compare("loss")
    assert not target.exists()
    data["nodes"][0]["func"], data["nodes"][0]["kind"] = "torch.__builtins__", "op"  # not callable at all
    assert "names no callable" in tg.load_graph(_rewrite(path, data))._nodes[0]["unsupported"]


def test_every_aten_kernel_the_rules_call_is_listed_in_kernels():
    """rules.aten holds only rules.KERNELS (what a loaded graph may run): a rule calling another fails at run time."""
    import re
    from pathlib import Path

    from tensorgraph import rules

    called = set(re.findall(r"\baten\.(\w+)", Path(rules.__file__).read_text()))
    assert called <= rules.KERNELS, f"called by rules, not in rules.KERNELS: {sorted(called - rules.KERNELS)}"


def test_every_table_callable_has_a_name_that_resolves_back():
    from tensorgraph.ops import FUNCS

    unnamed = [f for f in FUNCS if callable(f) and not isinstance(f, (torch.dtype, type(torch)))
               and serialize.func_path(f) is None]
    assert not unnamed, f"callables without a saved name: {unnamed[:5]}"


def test_save_is_atomic(tmp_path, monkeypatch):
    graph, _ = kitchen_sink()
    path = tmp_path / "g.json"
    graph.save(path)
    before = path.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        graph.save(path, values=True)
    assert path.read_bytes() == before, "a failed save must leave the old file intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json"], "no temporary file may be left behind"


def test_a_traced_backward_graph_round_trips_with_its_aten_kernels(tmp_path):
    x = torch.randn(3, 4, dtype=D)
    with tg.record() as graph:
        loss = torch.softmax(torch.tanh(x), 1).sum()
    adjoint = tg.trace(graph, loss).adjoint
    adjoint.save(tmp_path / "adjoint.graphml", values=True)
    loaded = tg.load_graph(tmp_path / "adjoint.graphml")
    assert_same_structure(adjoint, loaded, values=True)
    kernels = [d["func"] for d in loaded._nodes if isinstance(d["func"], torch._ops.OpOverloadPacket)]
    assert {k._qualified_op_name for k in kernels} == {"aten::tanh_backward", "aten::_softmax_backward_data"}
    assert loaded.render().source == adjoint.render().source


def test_a_call_returning_none_keeps_each_output_at_its_index(tmp_path, suffix):
    """(None, dw, db) from aten's convolution_backward: the loaded call's results stay where torch put them."""
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(shape, generator=g, dtype=D) for shape in [(1, 2, 5, 5), (3, 2, 3, 3), (1, 3, 3, 3)])
    call = (dy, x, w, [3], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, True])
    with tg.record() as graph:
        _, dw, db = torch.ops.aten.convolution_backward(*call)
    graph.save(tmp_path / f"g{suffix}", values=True)
    loaded = tg.load_graph(tmp_path / f"g{suffix}")
    expected = torch.ops.aten.convolution_backward(*call)
    for name in ("dw", "db"):
        data = loaded.node(name)
        assert data["result"][0] is None and len(data["result"]) == 3
        assert torch.equal(data["result"][data["output_index"]], expected[data["output_index"]]), name
        assert data["result"][data["output_index"]] is data["value"]
