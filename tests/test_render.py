"""Rendering: the lecture graph in all three views, clusters and collapse, depth, errors, the CLI.

Expected names, shapes, branch counts and broadcasts are the lecture's own (written out
by hand below); expected gradient norms come from torch autograd. The SVG is read back
node by node (each node's <title> is its DOT id) and the DOT source is parsed back by
Graphviz itself (``dot -Tjson0``), so a check can only pass if Graphviz drew it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import graphviz
import pytest
import torch

import tensorgraph as tg
from tensorgraph.cli import main
from tensorgraph.lecture import LECTURE_ROWS, forward, record_exercise
from tensorgraph.render import COLORS, GraphvizNotFoundError, RenderTimeoutError, expression

# the lecture's tensors and their shapes (batch 32, 3 characters of context, 10-d embeddings, 64 hidden, 27 chars)
LECTURE_SHAPES = {
    "C": "27×10", "Xb": "32×3", "emb": "32×3×10", "embcat": "32×30", "W1": "30×64", "b1": "64", "hprebn": "32×64",
    "bnmeani": "1×64", "bndiff": "32×64", "bndiff2": "32×64", "bnvar": "1×64", "bnvar_inv": "1×64", "bnraw": "32×64",
    "bngain": "1×64", "bnbias": "1×64", "hpreact": "32×64", "h": "32×64", "W2": "64×27", "b2": "27",
    "logits": "32×27", "logit_maxes": "32×1", "norm_logits": "32×27", "counts": "32×27", "counts_sum": "32×1",
    "counts_sum_inv": "32×1", "probs": "32×27", "logprobs": "32×27", "Yb": "32", "loss": "scalar",
}
# the lecture's broadcasts: each gradient that must be summed back to its tensor's shape
BROADCAST_UNDO = {
    "dcounts_sum_inv": "sum dim=1: 32×27 → 32×1", "dlogit_maxes": "sum dim=1: 32×27 → 32×1",
    "db2": "sum dim=0: 32×27 → 27", "dbnbias": "sum dim=0: 32×64 → 1×64", "dbngain": "sum dim=0: 32×64 → 1×64",
    "dbnvar_inv": "sum dim=0: 32×64 → 1×64", "dbnmeani": "sum dim=0: 32×64 → 1×64", "db1": "sum dim=0: 32×64 → 64",
}
# the lecture's tensors used by two ops: their gradients add two branches
TWO_BRANCHES = ["dcounts", "dlogits", "dbndiff", "dhprebn"]
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def lecture():
    graph, loss, ex = record_exercise()
    return graph, loss, ex, graph.backward(loss)


def svg_nodes(svg: str) -> dict[str, str]:
    """Each drawn node's DOT id -> all the text drawn in it."""
    found = {}
    for group in ET.fromstring(svg).iter(f"{SVG}g"):
        if group.get("class") == "node":
            title = group.find(f"{SVG}title").text
            found[title] = " ".join(t.text or "" for t in group.iter(f"{SVG}text"))
    return found


def layout(dot: graphviz.Digraph) -> dict:
    """Graphviz parses the DOT source back: nodes, clusters and edges as JSON."""
    return json.loads(dot.pipe(format="json0", encoding="utf-8"))


def clusters_of(parsed: dict) -> dict[str, set[str]]:
    """Cluster label -> names of the nodes inside it (nested ones included)."""
    objects = parsed.get("objects", [])
    return {o["label"]: {objects[i]["name"] for i in o.get("nodes", [])} for o in objects if "nodes" in o}


def node_attrs(parsed: dict) -> dict[str, dict]:
    return {o["name"]: o for o in parsed.get("objects", []) if "nodes" not in o and "subgraphs" not in o}


def box_with(nodes: dict[str, str], *words: str) -> str:
    """The one drawn node whose text contains all the words."""
    hits = [key for key, text in nodes.items() if all(w in text.split() for w in words)]
    assert len(hits) == 1, f"{words}: {len(hits)} nodes match: {[nodes[h] for h in hits]}"
    return nodes[hits[0]]


def torch_gradients(ex) -> dict[str, torch.Tensor]:
    """Independent truth: the parameters' gradients from torch autograd."""
    params = {name: getattr(ex, name).detach().clone().requires_grad_() for name in
              ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")}
    loss = forward(params["C"], params["W1"], params["b1"], params["W2"], params["b2"], params["bngain"],
                   params["bnbias"], ex.Xb, ex.Yb)
    loss.backward()
    return {name: p.grad for name, p in params.items()}


# ---------------------------------------------------------------------------------------------- forward view


def test_forward_svg_names_every_tensor_with_its_shape(lecture, tmp_path):
    graph, loss, _, _ = lecture
    path = graph.render(tmp_path / "mlp.svg")
    assert path == tmp_path / "mlp.svg"
    nodes = svg_nodes(path.read_text(encoding="utf-8"))
    for name, shape in LECTURE_SHAPES.items():
        node = f"n{graph.node_id(name)}"
        assert node in nodes, name
        words = nodes[node].split()
        assert name in words and shape in words, (name, nodes[node])
    assert set(LECTURE_ROWS) <= set(LECTURE_SHAPES)
    # integer inputs show their dtype; float32 tensors do not
    assert "int64" in nodes[f"n{graph.node_id('Xb')}"] and "float32" not in nodes[f"n{graph.node_id('h')}"]


def test_forward_op_labels_read_like_the_lecture(lecture):
    graph, *_ = lecture
    nodes = svg_nodes(graph.render().pipe(format="svg", encoding="utf-8"))
    at = lambda name: nodes[f"n{graph.node_id(name)}"]  # noqa: E731
    assert at("matmul_1").startswith("embcat @ W1 matmul_1")
    assert at("hprebn").startswith("matmul_1 + b1 hprebn")
    assert at("sum_1").startswith("sum(hprebn, dim=0, keepdim) sum_1")
    # 1/n and 1/(n-1) as the fractions they are, not 0.03125 and 0.03226 (which is not 1/31)
    assert at("bnmeani").startswith("sum_1 * (1/32) bnmeani")
    assert at("bnvar").startswith("sum_2 * (1/31) bnvar")
    assert at("bnvar_inv").startswith("add_1 ** -0.5 bnvar_inv")
    assert at("logit_maxes").startswith("max(logits, dim=1, keepdim).values logit_maxes")
    assert at("getitem_1").startswith("logprobs[range(32), Yb] getitem_1")
    assert at("loss").startswith("-mean_1 loss")
    # the unused indices of logits.max(1) are not drawn
    assert not any("max_1" in text.split() for text in nodes.values())


def test_leaves_inputs_and_loss_are_drawn_distinctly(lecture):
    graph, *_ = lecture
    attrs = node_attrs(layout(graph.render()))
    fill = lambda name: attrs[f"n{graph.node_id(name)}"]["fillcolor"]  # noqa: E731
    assert fill("W1") == fill("bngain") == COLORS["leaf"]
    assert fill("Xb") == fill("Yb") == COLORS["input"]
    assert fill("loss") == COLORS["loss"] and attrs[f"n{graph.node_id('loss')}"]["peripheries"] == "2"
    assert fill("hprebn") == COLORS["op"]
    assert len({fill("W1"), fill("Xb"), fill("loss"), fill("hprebn")}) == 4


def test_gradient_overlay_shows_torch_autograd_norms(lecture):
    graph, loss, ex, grads = lecture
    nodes = svg_nodes(graph.render(grads=grads).pipe(format="svg", encoding="utf-8"))
    truth = torch_gradients(ex)
    for name, grad in truth.items():
        text = nodes[f"n{graph.node_id(name)}"]
        norm = f"{grad.double().norm().item():.3g}"
        biggest = f"{grad.double().abs().max().item():.3g}"
        assert f"grad norm {norm}" in text and f"max|g| {biggest}" in text, (name, text)
    # intermediates too, against torch autograd replaying the graph
    from tensorgraph.compare import replay

    values = replay(graph, graph.node_id(loss))
    values[graph.node_id(loss)].backward()
    for name in ("hprebn", "bndiff", "logits", "probs"):
        norm = values[graph.node_id(name)].grad.double().norm().item()
        assert f"grad norm {norm:.3g}" in nodes[f"n{graph.node_id(name)}"]
    # integer inputs have no gradient
    assert "grad" not in nodes[f"n{graph.node_id('Xb')}"]


def test_scalar_gradients_are_drawn_with_their_sign():
    """micrograd's first example on 0-dim tensors: a norm drew dL/db = -4 as 'grad norm 4'."""
    a, b, c, f = (torch.tensor(v) for v in (2.0, -3.0, 10.0, -2.0))
    with tg.record() as graph:
        e = a * b
        d = e + c
        L = d * f
    nodes = svg_nodes(graph.render(grads=graph.backward(L)).pipe(format="svg", encoding="utf-8"))
    leaves = {"a": a, "b": b, "c": c, "f": f}
    truth = {name: t.double().requires_grad_() for name, t in leaves.items()}
    ((truth["a"] * truth["b"] + truth["c"]) * truth["f"]).backward()
    for name, leaf in truth.items():
        text = nodes[f"n{graph.node_id(name)}"]
        assert f"grad {leaf.grad.item():.3g}" in text and "norm" not in text, (name, text)
    assert "grad -4 " in nodes[f"n{graph.node_id('b')}"] + " "


def test_value_summary(lecture):
    graph, *_ = lecture
    nodes = svg_nodes(graph.render(values=True).pipe(format="svg", encoding="utf-8"))
    h = graph.value("h").double()
    text = nodes[f"n{graph.node_id('h')}"]
    assert f"mean {h.mean().item():.3g}" in text and f"max {h.max().item():.3g}" in text
    assert f"std {h.std(correction=0).item():.3g}" in text and f"min {h.min().item():.3g}" in text
    assert f"value {graph.value('loss').item():.3g}" in nodes[f"n{graph.node_id('loss')}"]


def test_non_finite_values_and_gradients_are_counted_not_averaged():
    """A tensor with one nan was drawn 'mean nan std nan min nan max nan', hiding where the nan is and the rest."""
    x = torch.tensor([float("nan"), float("inf"), -0.0, 1e30, 2.0])
    w = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0])  # (5 entries: a tensor of at most 4 shows each of them)
    with tg.record() as graph:
        s = (x * 0).sum()         # nan: 0 * nan and 0 * inf
        y = w * s                 # all nan
        loss = (y * w).sum() + (w * w).sum()
    grads = graph.backward(loss)
    nodes = svg_nodes(graph.render(grads=grads, values=True).pipe(format="svg", encoding="utf-8"))
    finite = x[x.isfinite()].double()
    text = " ".join(nodes[f"n{graph.node_id('x')}"].split())
    assert f"mean {finite.mean().item():.3g}" in text and f"max {finite.max().item():.3g}" in text
    assert "(of 3 finite; 1 nan, 1 inf)" in text
    assert "value: 5 nan" not in nodes[f"n{graph.node_id('y')}"] and "5 nan" in nodes[f"n{graph.node_id('y')}"]
    # gradients: torch autograd's, nan where torch has nan
    wt = w.double().requires_grad_()
    xt = x.double()
    yt = wt * (xt * 0).sum()
    ((yt * wt).sum() + (wt * wt).sum()).backward()
    assert wt.grad.isnan().all()
    assert f"grad: {int(wt.grad.isnan().sum())} nan" in nodes[f"n{graph.node_id('w')}"]


def test_a_tensor_of_a_few_entries_shows_each_value_and_gradient():
    """softmax of 3 numbers: the picture said 'mean 2 std 0.816 min 1 max 3' and 'grad norm 1.15 max|g| 0.91'
    where a slide needs x = [1, 2, 3] and its gradient, p - onehot(0), entry by entry, signs included."""
    x = torch.tensor([1.0, 2.0, 3.0])
    W = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    with tg.record() as graph:
        p = torch.softmax(x, 0)
        loss = -p[0].log() + (W * W).sum()
    nodes = svg_nodes(graph.render(grads=graph.backward(loss), values=True).pipe(format="svg", encoding="utf-8"))
    xt, Wt = x.double().requires_grad_(), W.double().requires_grad_()
    (-torch.softmax(xt, 0)[0].log() + (Wt * Wt).sum()).backward()
    entries = lambda t: ", ".join(f"{v:.3g}" for v in t.tolist())  # noqa: E731
    text = " ".join(nodes[f"n{graph.node_id('x')}"].split())
    assert "values [1, 2, 3]" in text and f"grad [{entries(xt.grad)}]" in text, text
    assert xt.grad[0] < 0 < xt.grad[2]  # the signs a norm would have dropped
    text = " ".join(nodes[f"n{graph.node_id('W')}"].split())
    assert "values [[0.5, -1], [2, 0.25]]" in text
    assert f"grad [[{entries(Wt.grad[0])}], [{entries(Wt.grad[1])}]]" in text, text
    assert "grad [-11.1, 0, 0]" in " ".join(nodes[f"n{graph.node_id('p')}"].split())  # 0, not -0


def test_values_of_complex_tensors():
    """A complex scalar's value raised TypeError; a complex tensor's |z| statistics were labelled as its mean."""
    c = torch.tensor(1.0 - 2.0j)
    zs = torch.tensor([1.0 + 1.0j, -0.5j])
    with tg.record() as graph:
        z = c * 2
        loss = z.abs() + (zs * 2).abs().sum()  # noqa: F841 (named: the graph records the name)
    nodes = svg_nodes(graph.render(values=True).pipe(format="svg", encoding="utf-8"))
    assert "value 2-4j" in nodes[f"n{graph.node_id('z')}"]
    doubled = (zs * 2).abs().double()
    assert f"|z| mean {doubled.mean().item():.3g}" in nodes[f"n{graph.node_id('mul_1')}"]


def test_values_of_a_graph_loaded_without_values(tmp_path):
    """values=True on a graph loaded without values raised 'Tensor.item() cannot be called on meta tensors'."""
    x = torch.randn(3)
    with tg.record() as graph:
        loss = (x * x).sum()  # noqa: F841 (named: the graph records the name)
    graph.save(tmp_path / "g.json")
    loaded = tg.load_graph(tmp_path / "g.json")
    nodes = svg_nodes(loaded.render(values=True).pipe(format="svg", encoding="utf-8"))
    assert "saved without values=True" in nodes[f"n{loaded.node_id('loss')}"]

def test_compare_report_colours_each_gradient(lecture):
    graph, loss, _, grads = lecture
    report = graph.compare(loss)
    attrs = node_attrs(layout(graph.render(grads=grads, compare=report)))
    assert report.exact_count == len(report.rows) == 26  # the lecture's exercise 1 is bit-exact
    for name in LECTURE_ROWS:
        assert attrs[f"n{graph.node_id(name)}"]["fillcolor"] == COLORS["exact"], name

    @dataclass
    class Row:
        name: str
        exact: bool
        approximate: bool
        maxdiff: float = 0.0
        ok: bool = False

    stand_in = type("Report", (), {"rows": [Row("h", False, False, 0.5), Row("W2", False, True, 1e-9),
                                            Row("b2", True, True), Row("b1", False, False, 3e-8, ok=True)]})()
    svg = graph.render(compare=stand_in).pipe(format="svg", encoding="utf-8")
    attrs = node_attrs(layout(graph.render(compare=stand_in)))
    assert attrs[f"n{graph.node_id('h')}"]["fillcolor"] == COLORS["wrong"]
    assert attrs[f"n{graph.node_id('W2')}"]["fillcolor"] == COLORS["approximate"]
    assert attrs[f"n{graph.node_id('b2')}"]["fillcolor"] == COLORS["exact"]
    assert "WRONG, maxdiff 0.5" in svg_nodes(svg)[f"n{graph.node_id('h')}"]
    # past allclose only by rounding where terms cancel (report.ok): not wrong
    assert attrs[f"n{graph.node_id('b1')}"]["fillcolor"] == COLORS["approximate"]
    assert "within rounding, maxdiff 3e-08" in svg_nodes(svg)[f"n{graph.node_id('b1')}"]


@dataclass
class CheckRow:
    name: str
    kind: str
    message: str = ""


@dataclass
class CheckReport:
    first_error: str | None
    rows: list[CheckRow] = field(default_factory=list)


def test_each_colour_of_the_legend_means_one_thing(lecture):
    """A check render's legend drew 'ok' and 'leaf (parameter or input)' in the same green."""
    import re

    graph, _, _, grads = lecture
    rows = [CheckRow("d" + name, "ok") for name in LECTURE_ROWS]
    rows[LECTURE_ROWS.index("bnvar")] = CheckRow("dbnvar", "sign", "dbnvar has the wrong sign")
    compare = graph.compare(grads.root)
    for options in ({"check": CheckReport("dbnvar", rows)}, {"compare": compare}):
        source = graph.render(grads=grads, **options).source
        legend = re.findall(r'<td bgcolor="(#[0-9a-f]{6})" border="1" cellpadding="3">([^<]*)</td>', source)
        assert len(legend) >= 5, legend
        assert len({color for color, _ in legend}) == len(legend), legend


def test_check_report_marks_first_error_and_what_it_feeds(lecture):
    graph, _, _, grads = lecture
    rows = [CheckRow("d" + name, "ok") for name in LECTURE_ROWS]
    rows[LECTURE_ROWS.index("bnvar")] = CheckRow("dbnvar", "sign", "dbnvar has the wrong sign")
    report = CheckReport("dbnvar", rows)
    dot = graph.render(grads=grads, check=report)
    attrs = node_attrs(layout(dot))
    fill = lambda name: attrs[f"n{graph.node_id(name)}"]["fillcolor"]  # noqa: E731
    assert fill("bnvar") == COLORS["first error"]
    # bnvar's gradient feeds the gradients of everything bnvar was computed from
    for name in ("sum_2", "bndiff2", "bndiff", "bnmeani", "sum_1", "hprebn", "matmul_1", "b1", "embcat", "W1",
                 "emb", "C"):
        assert fill(name) == COLORS["downstream of the error"], name
    # ... and nothing computed after it, nor the integer inputs
    for name in ("bnvar_inv", "bnraw", "hpreact", "h", "logits", "probs", "W2", "bngain"):
        assert fill(name) == COLORS["ok"], name
    assert fill("Xb") == COLORS["input"]
    text = svg_nodes(dot.pipe(format="svg", encoding="utf-8"))[f"n{graph.node_id('bnvar')}"]
    assert "first error: sign" in text and "wrong sign" in text


# ---------------------------------------------------------------------------------------------- backward view


def test_backward_view_shows_the_two_rules(lecture):
    graph, loss, _, grads = lecture
    dot = graph.render(view="backward", grads=grads)
    labels = {key: box["label"] for key, box in node_attrs(layout(dot)).items()}

    def boxes(name: str, *notes: str) -> list[str]:
        return [key for key, label in labels.items() if f"<b>{name}</b>" in label and all(n in label for n in notes)]

    def gradient(name: str) -> str:
        """The box holding the final gradient ``name``, drawn once."""
        final = [key for key in boxes(name) if "part from" not in labels[key] and "running sum" not in labels[key]]
        assert len(final) == 1, (name, [labels[key] for key in boxes(name)])
        return labels[final[0]]

    # every gradient the lecture asks for, named the lecture's way, with its shape
    for name in LECTURE_ROWS:
        assert LECTURE_SHAPES[name] in gradient(f"d{name}"), name
    # rule 1: undo the broadcast, as an explicit sum
    for grad, label in BROADCAST_UNDO.items():
        assert label in gradient(grad) and "undo the broadcast" in gradient(grad), grad
    assert sum("undo the broadcast" in label for label in labels.values()) == len(BROADCAST_UNDO)
    # rule 2: add the branches, as an explicit accumulation fed by one partial gradient per branch
    for grad in TWO_BRANCHES:
        assert "+= from 2 consumers" in gradient(grad)
        parts = boxes(grad, "part from") + [key for key, label in labels.items() if f"part of {grad} from" in label]
        assert len(parts) == 2, grad
    assert sum("+=" in label for label in labels.values()) == len(TWO_BRANCHES)
    # gradient overlay from the engine's gradients, drawn in the SVG
    nodes = svg_nodes(dot.pipe(format="svg", encoding="utf-8"))
    dh = [key for key in boxes("dh") if key in nodes]
    assert len(dh) == 1 and f"grad norm {grads['h'].double().norm().item():.3g}" in nodes[dh[0]]


def test_backward_view_groups_each_rule_under_its_forward_op(lecture):
    graph, loss, _, _ = lecture
    parsed = layout(graph.render(view="backward", loss=loss))
    attrs = node_attrs(parsed)
    clusters = clusters_of(parsed)
    labels = {key: value["label"] for key, value in attrs.items()}
    bnraw = clusters["<b>backward of bnraw = bndiff * bnvar_inv</b>"]
    inside = " ".join(labels[node] for node in bnraw)
    assert "dbnvar_inv" in inside and "<b>dbndiff</b>" in inside and "part from bnraw" in inside
    assert "backward of hprebn = matmul_1 + b1" in " ".join(clusters)
    # one cluster per forward op the loss depends on (every op except the unused max indices)
    ops = [n for n in graph if graph.node(n)["kind"] == "op" and n in graph.ancestors(loss)]
    assert len([c for c in clusters if c.startswith("<b>backward of")]) == len(ops) - 1


def test_an_assignment_into_a_tensor_is_not_labelled_as_a_chained_assignment():
    """y[0] = 0 made version y of y_v0: its rule's cluster read 'backward of y = y_v0[0] = 0', which as Python
    assigns 0 to y; the tooltips too."""
    x = torch.randn(3)
    with tg.record() as graph:
        y = x * 2
        y[0] = 0.0
        loss = (y * x).sum()
    parsed = layout(graph.render(view="backward", loss=loss))
    assert "<b>backward of y: y_v0[0] = 0</b>" in clusters_of(parsed)
    svg = graph.render(loss=loss).pipe(format="svg", encoding="utf-8")
    tooltips = [a.get("{http://www.w3.org/1999/xlink}title") for a in ET.fromstring(svg).iter(f"{SVG}a")]
    assert any(t.startswith("y: y_v0[0] = 0: 3 float32") for t in tooltips), tooltips
    assert not any("= y_v0[0] = 0" in t for t in tooltips)


def test_backward_view_needs_the_loss(lecture):
    graph, *_ = lecture
    with pytest.raises(ValueError, match="needs the loss"):
        graph.render(view="backward")
    with pytest.raises(ValueError, match="unknown view"):
        graph.render(view="sideways")


# the ops of F.cross_entropy's rule drawn with textbook=True: the lecture's (softmax(logits) - one_hot(Yb)) / n * dloss
TEXTBOOK_CROSS_ENTROPY = ["softmax(logits, dim=1)", "one_hot(Yb, 27)", "softmax_1 - one_hot_1", "sub_2 / 32",
                          "div_1 * dloss"]
CROSS_ENTROPY_RULE = "<b>backward of loss = cross_entropy(logits, "


def exercise4_forward(ex, **cross_entropy):
    """Exercise 4's forward pass (the lecture's network, F.cross_entropy at the end) in float64; returns
    (graph, loss, the parameters, logits)."""
    params = [t.double().requires_grad_() for t in ex.parameters]
    C, W1, b1, W2, b2, bngain, bnbias = params
    Xb, Yb = ex.Xb, ex.Yb
    with tg.record() as graph:
        emb = C[Xb]
        embcat = emb.view(emb.shape[0], -1)
        hprebn = embcat @ W1 + b1
        bnmean = hprebn.mean(0, keepdim=True)
        bnvar = hprebn.var(0, keepdim=True, unbiased=True)
        bnraw = (hprebn - bnmean) * (bnvar + 1e-5) ** -0.5
        hpreact = bngain * bnraw + bnbias
        h = torch.tanh(hpreact)
        logits = h @ W2 + b2
        loss = torch.nn.functional.cross_entropy(logits, Yb, **cross_entropy)
    return graph, loss, params, logits


def rule_ops(graph, loss, **options) -> tuple[list[str], dict[str, str]]:
    """The op rows of the boxes in F.cross_entropy's rule cluster, and every drawn box's text by DOT id."""
    parsed = layout(graph.render(view="backward", loss=loss, **options))
    attrs = node_attrs(parsed)
    [inside] = [nodes for label, nodes in clusters_of(parsed).items() if label.startswith(CROSS_ENTROPY_RULE)]
    inside = sorted(inside, key=lambda key: int(key[1:]))
    rows = [ET.fromstring(f"<x>{attrs[key]['label']}</x>").itertext() for key in inside]
    return [next(iter(r)).strip() for r in rows], {key: value["label"] for key, value in attrs.items()}


def test_textbook_backward_view_draws_cross_entropy_as_softmax_minus_one_hot():
    """The backward view drew F.cross_entropy's general closed form (~25 ops: ne, __invert__, masked_fill,
    remainder, scatter, clamp_min ...) where the lecture writes (softmax(logits) - one_hot(Yb)) / n * dloss;
    textbook=True draws those 5 ops, with torch's gradient."""
    from tensorgraph.lecture import setup

    ex = setup()
    graph, loss, params, logits = exercise4_forward(ex)
    ops, labels = rule_ops(graph, loss, textbook=True)
    assert ops == TEXTBOOK_CROSS_ENTROPY
    assert any("<b>dlogits</b>" in label and "div_1 * dloss" in label for label in labels.values())
    # the fused kernels read as their formulas, as backward_source(textbook=True) prints them
    assert any("(1 - h**2) * dh" in label and "<b>dhpreact</b>" in label for label in labels.values())
    # the default draws what the engine runs: the general closed form, and the kernel by name
    general, labels = rule_ops(graph, loss)
    assert len(general) > 20 and any(op.startswith("remainder(") for op in general)
    assert any("tanh_backward(dh, h)" in label for label in labels.values())
    # the values the view shows are torch's gradient (float64)
    from tensorgraph.engine import traced
    from tensorgraph.render_backward import _textbook_rules

    root = graph.node_id("loss")
    drawn = traced(graph, root, None, "render", _textbook_rules(graph, root)).grads
    logits.retain_grad()
    loss.backward()
    torch.testing.assert_close(drawn["logits"], logits.grad, rtol=1e-12, atol=1e-15)
    for name, param in zip(("C", "W1", "b1", "W2", "b2", "bngain", "bnbias"), params):
        torch.testing.assert_close(drawn[name], param.grad, rtol=1e-10, atol=1e-13)
    nodes = svg_nodes(graph.render(view="backward", loss=loss, textbook=True, grads=graph.backward(loss))
                      .pipe(format="svg", encoding="utf-8"))
    assert f"grad norm {logits.grad.norm().item():.3g}" in box_with(nodes, "dlogits", "dloss")


@pytest.mark.parametrize("options", [{"ignore_index": "hit"}, {"weight": True}, {"label_smoothing": 0.1},
                                     {"reduction": "sum"}])
def test_textbook_backward_view_keeps_the_general_cross_entropy_where_the_lecture_form_is_wrong(options):
    """An ignored target, class weights or label smoothing: (softmax - one_hot) / n is not the gradient, so the
    general form stays; reduction="sum" is the lecture's form without / n."""
    from tensorgraph.lecture import setup

    ex = setup()
    if options.get("ignore_index") == "hit":
        options = {"ignore_index": int(ex.Yb[3])}  # row 3 (and any other of that class) is ignored
    if options.get("weight"):
        options = {"weight": torch.rand(27, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5}
    graph, loss, params, logits = exercise4_forward(ex, **options)
    ops, _ = rule_ops(graph, loss, textbook=True)
    if "reduction" in options:
        assert ops == [op for op in TEXTBOOK_CROSS_ENTROPY if op != "sub_2 / 32"][:3] + ["sub_2 * dloss"]
    else:
        assert len(ops) > 10 and "one_hot(Yb, 27)" not in ops
    from tensorgraph.engine import traced
    from tensorgraph.render_backward import _textbook_rules

    root = graph.node_id("loss")
    drawn = traced(graph, root, None, "render", _textbook_rules(graph, root)).grads
    logits.retain_grad()
    loss.backward()
    torch.testing.assert_close(drawn["logits"], logits.grad, rtol=1e-12, atol=1e-15)


def test_textbook_is_an_option_of_the_backward_view(lecture):
    graph, loss, *_ = lecture
    with pytest.raises(ValueError, match="textbook=True .*view='backward'"):
        graph.render(loss=loss, textbook=True)


def test_backward_view_of_a_non_scalar_output_says_how_to_seed_it():
    """loss='h' (32×64) raised graph.backward's advice to 'pass grad=', an option render does not have."""
    x, w = torch.randn(4, 3), torch.randn(3)
    with tg.record() as graph:
        h = torch.tanh(x * w)
    with pytest.raises(ValueError, match=r"render: .*'h' has shape \(4, 3\).*grads=graph\.backward\('h', grad="):
        graph.render(view="backward", loss=h)
    seed = torch.randn(4, 3)
    nodes = svg_nodes(graph.render(view="backward", grads=graph.backward("h", grad=seed))
                      .pipe(format="svg", encoding="utf-8"))
    wt = w.double().requires_grad_()
    torch.tanh(x.double() * wt).backward(seed.double())
    assert f"grad [{', '.join(f'{v:.3g}' for v in wt.grad.tolist())}]" in box_with(nodes, "dw")  # (3 entries: each)
    source = graph.render(view="backward", grads=graph.backward("h", grad=seed)).source
    assert "seed (dh = the grad= given)" in source and "= 1)" not in source  # the legend: not 'd loss = 1'


def test_a_gradient_passed_on_unchanged_names_every_tensor_it_is_the_gradient_of():
    """micrograd's example: d = e + c passes dd on unchanged, so dd, de and dc are one box. It named two of
    them (dc was nowhere), and the expressions reading it said 'dd = de * b', which reads as an assignment."""
    a, b, c, f = (torch.tensor(v) for v in (2.0, -3.0, 10.0, -2.0))
    with tg.record() as graph:
        e = a * b
        d = e + c
        L = d * f
    dot = graph.render(view="backward", grads=graph.backward(L))
    nodes = svg_nodes(dot.pipe(format="svg", encoding="utf-8"))
    truth = {name: t.double().requires_grad_() for name, t in {"a": a, "b": b, "c": c, "f": f}.items()}
    ((truth["a"] * truth["b"] + truth["c"]) * truth["f"]).backward()
    assert "seed (dL = 1)" in dot.source and "d loss" not in dot.source  # the legend names micrograd's L
    shared = box_with(nodes, "dd", "=", "de", "dc")
    assert f"grad {truth['c'].grad.item():.3g} " in shared + " "
    assert f"dd * b da scalar grad {truth['a'].grad.item():.3g}" in " ".join(box_with(nodes, "da").split())
    assert f"dd * a db scalar grad {truth['b'].grad.item():.3g}" in " ".join(box_with(nodes, "db").split())
    # many tensors sharing one gradient: the first names, then how many more
    xs = [torch.randn(3) for _ in range(7)]
    with tg.record() as graph:
        total = xs[0] + xs[1] + xs[2] + xs[3] + xs[4] + xs[5] + xs[6]
        loss = total.sum()
    nodes = svg_nodes(graph.render(view="backward", loss=loss).pipe(format="svg", encoding="utf-8"))
    assert "(4 more)" in box_with(nodes, "dtotal")


def test_a_tensor_an_op_reads_twice_is_summed_from_two_uses_not_two_consumers():
    """``z = x * x``: one consumer reads x twice; the accumulation box said '+= from 2 consumers'."""
    x = torch.tensor(3.0)
    with tg.record() as graph:
        z = x * x
        w = z * x  # x again, in another consumer: three uses, two consumers
    nodes = svg_nodes(graph.render(view="backward", loss=z).pipe(format="svg", encoding="utf-8"))
    assert "+= from 2 uses in z dx scalar" in " ".join(box_with(nodes, "uses").split())
    parts = sorted(" ".join(text.split()) for text in nodes.values() if "(part" in text)
    assert parts == ["dz * x dx (part 1 of 2 from z) scalar", "dz * x dx (part 2 of 2 from z) scalar"], parts
    assert not any("consumers" in text for text in nodes.values())
    grads = graph.backward(w)
    nodes = svg_nodes(graph.render(view="backward", grads=grads).pipe(format="svg", encoding="utf-8"))
    truth = x.double().requires_grad_()
    (dx,) = torch.autograd.grad(truth * truth * truth, truth)  # 3 x**2 = 27
    box = " ".join(box_with(nodes, "from", "uses").split())
    assert box == f"+= from 3 uses in 2 consumers dx scalar grad {dx.item():.3g}", box
    assert "+= (2 of 3 uses in 2 consumers) dx (running sum) scalar" == " ".join(box_with(nodes, "(2").split())


def test_the_backward_of_an_int_pick_is_zeros_and_one_assignment():
    """softmax of 3 numbers, ``-probs[0].log()``: the rule of ``probs[0]`` is two boxes, ``zeros_like(probs)`` and
    ``[0] = dgetitem_1``; it was seven (arange, view, [0], two reshapes, zeros, index_add_) for one number."""
    x = torch.tensor([1.0, 2.0, 3.0])
    with tg.record() as graph:
        counts = x.exp()
        probs = counts / counts.sum()
        loss = -probs[0].log()
    source = graph.render(view="backward", grads=graph.backward(loss)).source
    assert "arange" not in source and "index_add_" not in source
    nodes = svg_nodes(graph.render(view="backward", grads=graph.backward(loss)).pipe(format="svg", encoding="utf-8"))
    assert "dprobs_v0" in box_with(nodes, "zeros_like(probs)").split()
    truth = x.double().requires_grad_()
    c = truth.exp()
    (dx,) = torch.autograd.grad(-(c / c.sum())[0].log(), truth)
    box = " ".join(box_with(nodes, "dprobs_v0[0]").split())
    assert box.startswith("dprobs_v0[0] = dgetitem_1 dprobs 3")
    assert f"grad [{(-1 / (c / c.sum())[0]).item():.3g}, 0, 0]" in box  # dprobs is -1/p0 at 0, zero elsewhere
    assert f"grad [{', '.join(f'{v:.3g}' for v in dx.tolist())}]" in " ".join(box_with(nodes, "dx").split())
# ---------------------------------------------------------------------------------------------- output formats


def test_a_bitmap_graphviz_had_to_shrink_comes_with_a_warning(tmp_path):
    """A PNG taller than 32,767 pixels was shrunk by Graphviz (its text unreadable), which said so only on a
    stderr render threw away."""
    from tensorgraph.render import RenderWarning

    x = torch.randn(2)
    with tg.record() as graph:
        h = x
        for _ in range(500):
            h = h.tanh()
    with pytest.warns(RenderWarning, match=r"tall\.png' is too large for a bitmap.*shrank it to \d+%.*\.svg") as got:
        graph.render(tmp_path / "tall.png")
    assert got[0].filename == __file__  # the warning points at the caller's line
    height = int.from_bytes((tmp_path / "tall.png").read_bytes()[20:24], "big")  # PNG IHDR: width, then height
    assert height == 32767
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph.render(tmp_path / "tall.svg")  # a vector picture is never shrunk


def test_png_pdf_and_dot_outputs(lecture, tmp_path):
    graph, loss, _, grads = lecture
    png = graph.render(str(tmp_path / "mlp.png"), grads=grads)
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pdf = graph.render(tmp_path / "mlp.PDF", view="backward", grads=grads)
    assert Path(pdf).read_bytes()[:5] == b"%PDF-"
    source = graph.render(tmp_path / "mlp.dot", view="backward", grads=grads)
    text = Path(source).read_text(encoding="utf-8")
    assert text.startswith("digraph")
    # the source parses back: Graphviz itself lays it out
    drawn = subprocess.run(["dot", "-Tjson0", str(source)], capture_output=True, text=True, check=True)
    parsed = json.loads(drawn.stdout)
    boxes = [o for o in parsed["objects"] if "nodes" not in o]
    assert len(boxes) == text.count("[label=<")
    assert len(boxes) > len(graph)  # the backward pass has more ops than the forward


def test_graph_displays_inline(lecture):
    graph, *_ = lecture
    assert isinstance(graph.render(), graphviz.Digraph)
    bundle = graph._repr_mimebundle_()
    assert "<svg" in bundle["image/svg+xml"] and "hprebn" in bundle["image/svg+xml"]
    assert bundle["text/plain"].startswith("<tensorgraph.Graph")
    svg = graph._repr_svg_()  # for front ends that ask for SVG alone
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "hprebn" in svg


def test_a_bad_dpi_is_refused_before_graphviz_runs(tmp_path):
    """dpi=-5 made dot spin until the timeout, which then blamed the graph's size; dpi=0 was silently dropped."""
    x = torch.randn(3)
    with tg.record() as graph:
        loss = (x * x).sum()
    for dpi in (-5, 0, float("nan"), "300", True):
        with pytest.raises(ValueError, match=r"render: dpi must be a positive number"):
            graph.render(tmp_path / "x.png", loss=loss, dpi=dpi, timeout=3)
    assert not (tmp_path / "x.png").exists()
    png = graph.render(tmp_path / "x.png", loss=loss, dpi=36.5).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_graph_too_big_to_draw_inline_shows_its_summary_and_how_to_draw_it():
    """A notebook kept the whole picture: a 3,002-node chain gave a 4.2 MB SVG, 30,002 nodes 43 MB after 10 s."""
    import tensorgraph.render as render_module

    x = torch.randn(4)
    with tg.record() as graph:
        h = x
        for _ in range(render_module.INLINE_NODES // 3 + 1):
            h = torch.tanh(h * 1.01 + 0.1)
        h.sum()
    assert len(graph) > render_module.INLINE_NODES
    bundle = graph._repr_mimebundle_()
    assert "image/svg+xml" not in bundle and graph._repr_svg_() is None
    assert bundle["text/plain"].startswith(repr(graph)) and "graph.render('graph.svg')" in bundle["text/plain"]


def test_bad_paths_and_options(lecture, tmp_path):
    graph, *_ = lecture
    with pytest.raises(ValueError, match=r"mlp\.jpeg.*\.svg"):
        graph.render(tmp_path / "mlp.jpeg")
    with pytest.raises(ValueError, match="suffix"):
        graph.render(tmp_path / "mlp")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        graph.render(tmp_path / "nowhere" / "mlp.svg")
    with pytest.raises(ValueError, match="rankdir"):
        graph.render(rankdir="sideways")
    with pytest.raises(ValueError, match="depth"):
        graph.render(depth=-1)
    with pytest.raises(ValueError, match="no tensor named 'nope'"):
        graph.render(loss="nope")
    with pytest.raises(TypeError, match="Gradients"):
        graph.render(grads={"h": 1})


def test_reports_and_paths_of_the_wrong_kind_are_refused(lecture, tmp_path):
    """compare=True (as the CLI's --compare) and check=True coloured nothing, silently; a tensor or a folder as
    the path failed inside pathlib, or said only that the suffix was unknown."""
    graph, loss, *_ = lecture
    with pytest.raises(TypeError, match=r"render: compare must be the report graph.compare\(loss\) returns.*not bool"):
        graph.render(tmp_path / "mlp.svg", compare=True)
    with pytest.raises(TypeError, match=r"render: check must be the report graph.check\(manual, loss\) returns"):
        graph.render(tmp_path / "mlp.svg", check="dlogits")
    with pytest.raises(TypeError, match=r"render: the path must be a file name such as 'graph.svg'.*not Tensor"):
        graph.render(loss)
    with pytest.raises(ValueError, match="render: the path is empty"):
        graph.render("")
    with pytest.raises(IsADirectoryError, match=r"render: '.*' is a folder; give a file name in it, such as "
                                                r"'.*graph.svg'"):
        graph.render(tmp_path)
    assert not list(tmp_path.iterdir())
    assert graph.render(tmp_path / "mlp.dot", compare=graph.compare(loss)).exists()


def test_a_report_of_another_graph_is_refused(lecture, tmp_path):
    """A check report of another network coloured the nodes that shared its rows' names, silently."""
    graph, loss, ex, _ = lecture
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(3, 2, dtype=torch.float64)
    with tg.record() as other:
        logits = x @ w
        h = torch.tanh(logits)
        small = h.sum()
    truth = w.clone().requires_grad_()
    torch.tanh(x @ truth).sum().backward()
    dlogits = 1 - torch.tanh(x @ w) ** 2  # right for `other`, whose logits are 4 x 2
    report = other.check({"dlogits": dlogits, "dw": truth.grad}, small)
    assert report.ok
    with pytest.raises(ValueError, match=r"render: the check report is not this graph's: its row 'h' is for a "
                                         r"tensor of shape \(4, 2\), and this graph has 'h' of shape \(32, 64\)"):
        graph.render(tmp_path / "mlp.svg", check=report)
    with pytest.raises(ValueError, match=r"render: the compare report is not this graph's: its row 'h'"):
        graph.render(tmp_path / "mlp.svg", compare=other.compare(small))
    with tg.record() as third:
        total = (x @ w).sum()
    with pytest.raises(ValueError, match=r"its row 'w' is for a tensor of shape \(3, 2\), and this graph has no "
                                         r"such tensor"):
        graph.render(tmp_path / "mlp.svg", compare=third.compare(total))
    again, loss_again, _ = record_exercise()  # the same code recorded again: its reports still apply
    assert graph.render(tmp_path / "mlp.dot", check=again.check({}, loss_again),
                        compare=again.compare(loss_again)).exists()


def test_missing_dot_writes_the_source_and_says_how_to_install(lecture, tmp_path, monkeypatch):
    graph, *_ = lecture
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert shutil.which("dot") is None
    with pytest.raises(GraphvizNotFoundError) as err:
        graph.render(tmp_path / "mlp.png")
    message = str(err.value)
    assert "`dot`" in message and "apt-get install graphviz" in message and "brew install graphviz" in message
    assert str(tmp_path / "mlp.dot") in message
    assert (tmp_path / "mlp.dot").read_text(encoding="utf-8").startswith("digraph")
    assert not (tmp_path / "mlp.png").exists()
    # .dot needs no Graphviz; the notebook display falls back to text
    assert graph.render(tmp_path / "only.dot").exists()
    bundle = graph._repr_mimebundle_()
    assert "image/svg+xml" not in bundle and "apt-get install graphviz" in bundle["text/plain"]
    assert graph._repr_svg_() is None


# ---------------------------------------------------------------------------------------------- labels


def test_expressions_of_common_ops():
    x = torch.randn(4, 3)
    idx = torch.tensor([0, 2])
    with tg.record() as graph:
        a = 2 - x
        b = 1 / x
        c = x.view(3, 4)
        d = x[1:, idx]
        e = torch.cat([x, a], dim=1)
        f = x.mean()
        g = x.max(1).indices
        k = x.sum(dim=(0, 1))
    assert len({id(t) for t in (a, b, c, d, e, f, g, k)}) == 8
    nodes = graph._nodes
    name = lambda node: nodes[node]["name"]  # noqa: E731
    text = {key: expression(graph.node(key), name) for key in "abcdefgk"}
    assert text == {"a": "2 - x", "b": "1 / x", "c": "view(x, 3, 4)", "d": "x[1:, idx]",
                    "e": "cat([x, a], dim=1)", "f": "mean(x)", "g": "max(x, dim=1).indices",
                    "k": "sum(x, dim=(0, 1))"}



def test_a_value_changed_without_history_is_labelled_with_what_it_was():
    """w -= lr under no_grad (an SGD step recorded with the forward) was drawn 'sub_()': a call of nothing."""
    x, w, v, u = torch.randn(4, 3), torch.randn(3), torch.randn(3), torch.randn(3)
    with tg.record() as graph:
        loss = (x * w * v * u).sum()
        with torch.no_grad():
            w -= 0.1
        v.data = torch.zeros(3)
        torch.nn.init.normal_(u)
        after = (x * w * v * u).sum()  # noqa: F841 (named: the graph records the name)
    nodes = svg_nodes(graph.render(loss=loss).pipe(format="svg", encoding="utf-8"))
    assert "sub_(w_v0, …)" in nodes[f"n{graph.node_id('w')}"]
    assert "v_v0.data = …" in nodes[f"n{graph.node_id('v')}"]
    assert "normal_(u_v0, …)" in nodes[f"n{graph.node_id('u')}"]

# ---------------------------------------------------------------------------------------------- large graphs


def scoped_mlp(layers: int, width: int = 16, batch: int = 8):
    """A deep MLP with a batchnorm in every layer: 16 nodes a layer, clustered by tg.scope."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, width, generator=g)
    params = [(torch.randn(width, width, generator=g) * 0.3, torch.zeros(width), torch.ones(1, width),
               torch.zeros(1, width)) for _ in range(layers)]
    with tg.record() as graph:
        h = x
        for i, (W, b, gain, bias) in enumerate(params):
            with tg.scope(f"layer{i}"):
                pre = h @ W + b
                with tg.scope("batchnorm"):
                    mean = pre.mean(0, keepdim=True)
                    diff = pre - mean
                    var = (diff**2).mean(0, keepdim=True)
                    pre = gain * diff * (var + 1e-5) ** -0.5 + bias
                h = torch.tanh(pre)
        loss = h.square().mean()
    return graph, loss


def test_a_collapsed_cluster_names_the_results_inside_it():
    """Collapsing a layer in the backward view hid its parameters' final gradients (dW, db: nothing reads them,
    so no edge left the box); collapsing the scope that computes the loss hid the loss."""
    x, W, b = torch.randn(4, 3), torch.randn(3, 3), torch.randn(3)
    with tg.record() as graph:
        with tg.scope("layer1"):
            h = torch.relu(x @ W + b)
        with tg.scope("head"):
            loss = (h * h).mean()
    backward = svg_nodes(graph.render(view="backward", loss=loss, collapse="layer1")
                         .pipe(format="svg", encoding="utf-8"))
    layer = box_with(backward, "layer1")
    assert all(f"→ {name}" in layer for name in ("dW 3×3", "db 3", "dx 4×3")), layer
    forward = svg_nodes(graph.render(loss=loss, collapse="head").pipe(format="svg", encoding="utf-8"))
    assert "→ loss scalar" in box_with(forward, "head")


def test_clusters_follow_scopes_and_collapse():
    graph, loss = scoped_mlp(2)
    parsed = layout(graph.render(loss=loss))
    clusters = clusters_of(parsed)
    assert set(clusters) == {"<b>layer0</b>", "<b>layer1</b>", "<b>batchnorm</b>"}
    # layer0's parameters sit in layer0's cluster (they are used nowhere else); its batchnorm is nested inside it
    layer0 = clusters["<b>layer0</b>"]
    assert {f"n{node}" for node in graph.ancestors("pre_v0") if not graph.node(node)["inputs"]} - {"n0"} <= layer0
    nested = [o for o in parsed["objects"] if o.get("label") == "<b>layer0</b>"][0]
    assert len(nested.get("subgraphs", [])) == 1
    # collapse=["batchnorm"]: one box per layer's batchnorm, nothing inside it drawn
    collapsed = graph.render(loss=loss, collapse=["batchnorm"])
    parsed = layout(collapsed)
    boxes = [o for o in node_attrs(parsed).values() if o.get("shape") == "box3d"]
    assert len(boxes) == 2 and all("batchnorm" in box["label"] and "collapsed" in box["label"] for box in boxes)
    assert set(clusters_of(parsed)) == {"<b>layer0</b>", "<b>layer1</b>"}
    svg = svg_nodes(collapsed.pipe(format="svg", encoding="utf-8"))
    assert not any(text.split()[-2:-1] == ["diff"] or " var " in f" {text} " for text in svg.values())
    # the box is wired like the cluster: the matmul feeds it, it feeds tanh
    names = {o["_gvid"]: o for o in parsed["objects"]}
    heads = {(names[e["tail"]]["name"], names[e["head"]]["name"]) for e in parsed["edges"]}
    pre0 = f"n{graph.node_id('pre_v0')}"  # layer0's h @ W + b: the first value of ``pre``
    box0 = [key for key, o in node_attrs(parsed).items() if o.get("shape") == "box3d" and "layer0" in o.get(
        "tooltip", "")][0]
    assert (pre0, box0) in heads
    assert any(tail == box0 and "tanh" in node_attrs(parsed)[head]["label"] for tail, head in heads)
    # collapsing a whole path, and a name that is no cluster
    assert len([o for o in node_attrs(layout(graph.render(collapse="layer1"))).values()
                if o.get("shape") == "box3d"]) == 1
    with pytest.raises(ValueError, match=r"no cluster named 'attention'.*layer0/batchnorm"):
        graph.render(collapse=["attention"])


def test_cluster_modes():
    graph, loss = scoped_mlp(1)
    assert clusters_of(layout(graph.render(cluster=None))) == {}
    # by function: the ops of this test file's scoped_mlp, leaves joining them
    by_function = clusters_of(layout(graph.render(cluster="function")))
    assert list(by_function) == ["<b>scoped_mlp</b>"] and len(by_function["<b>scoped_mlp</b>"]) == len(graph)
    with pytest.raises(ValueError, match="cluster mode"):
        graph.render(cluster="module")
    with pytest.raises(ValueError, match="tg.scope"):
        graph.render(cluster=None, collapse=["layer0"])


def _block(h, W):
    """A helper called once per layer: each call is a cluster of its own."""
    return torch.tanh(_scale(h @ W))


def _scale(h):
    return h * 0.5


def test_each_call_of_a_function_is_its_own_cluster(tmp_path):
    """Three calls of one helper were one cluster: collapse=["_block"] collapsed the whole network."""
    g = torch.Generator().manual_seed(0)
    Ws = [torch.randn(4, 4, generator=g) for _ in range(3)]  # noqa: N806
    x = torch.randn(2, 4, generator=g)
    for _ in range(4):  # the same recording again: templates copy the nodes' calls with them
        with tg.record() as graph:
            h = x
            for W in Ws:
                h = _block(h, W)
            loss = h.sum()
        clusters = clusters_of(layout(graph.render(loss=loss, cluster="function")))
        for k, label in enumerate(["_block", "_block#2", "_block#3"]):
            # its W, h @ W and tanh (x too, in the first: used nowhere else), and the cluster of the _scale call
            # it made, nested inside it
            drawn = {f"n{graph.node_id(t)}" for t in [Ws[k]] + ([x] if k == 0 else [])}
            matmul, scaled, tanh = [node for node in graph if graph.node(node)["inputs"]][3 * k:3 * k + 3]
            assert clusters[f"<b>{label}</b>"] == drawn | {f"n{matmul}", f"n{scaled}", f"n{tanh}"}
            assert clusters[f"<b>_scale{'#' + str(k + 1) if k else ''}</b>"] == {f"n{scaled}"}
    # collapse=["_block"]: every call of it, each one box; "_block#2" names one call
    boxes = [o for o in node_attrs(layout(graph.render(loss=loss, collapse=["_block"]))).values()
             if o.get("shape") == "box3d"]
    assert sorted(box["tooltip"] for box in boxes) == ["_block", "_block#2", "_block#3"]
    one = [o for o in node_attrs(layout(graph.render(loss=loss, collapse="_block#2"))).values()
           if o.get("shape") == "box3d"]
    assert [box["tooltip"] for box in one] == ["_block#2"]
    back = clusters_of(layout(graph.render(view="backward", loss=loss, cluster="function")))
    assert {"<b>_block</b>", "<b>_block#2</b>", "<b>_block#3</b>"} <= set(back)
    # a saved graph keeps its calls apart
    graph.save(tmp_path / "g.json")
    loaded = clusters_of(layout(tg.load_graph(tmp_path / "g.json").render(cluster="function")))
    assert {"<b>_block</b>", "<b>_block#2</b>", "<b>_block#3</b>"} <= set(loaded)


class _Linear:
    """The lecture's layers: objects of user classes called through __call__ (or nn.Module-like forward)."""

    def __init__(self, fan_in: int, fan_out: int, generator: torch.Generator):
        self.weight = torch.randn(fan_in, fan_out, generator=generator)

    def __call__(self, x):
        return x @ self.weight


class _Tanh:
    def forward(self, x):
        return torch.tanh(x)

    def __call__(self, x):
        return self.forward(x)


_CLASS_NET = """
with tg.record() as graph:
    h = x * 1.0
    for layer in layers:
        h = layer(h)
    loss = h.sum()
"""


def test_class_based_layers_are_clustered_by_their_class(tmp_path):
    """Every layer's cluster was labelled __call__, __call__#2 ...; top-level code was a near-empty <module> box."""
    g = torch.Generator().manual_seed(0)
    layers = [_Linear(4, 4, g), _Tanh(), _Linear(4, 3, g), _Tanh()]
    namespace = {"tg": tg, "x": torch.randn(2, 4, generator=g), "layers": layers}
    exec(compile(_CLASS_NET, "net.py", "exec"), namespace)  # a script's top level: its code is <module>
    graph, loss = namespace["graph"], namespace["loss"]
    labels = lambda drawn: sorted(clusters_of(layout(drawn)))  # noqa: E731
    # _Tanh.__call__ runs no op itself: its forward's ops are the Tanh's cluster
    expected = ["<b>_Linear#2</b>", "<b>_Linear</b>", "<b>_Tanh#2</b>", "<b>_Tanh</b>"]
    assert labels(graph.render(loss=loss)) == expected
    first = clusters_of(layout(graph.render(loss=loss)))["<b>_Linear</b>"]
    matmul = next(node for node in graph if graph.node(node)["op"] == "matmul")
    assert first == {f"n{matmul}", f"n{graph.node_id(layers[0].weight)}"}
    assert {"<b>_Linear</b>", "<b>_Tanh#2</b>"} <= set(labels(graph.render(view="backward", loss=loss)))
    # collapse= by class (every call), by one call, or by the qualified or plain method name
    for names, tooltips in [(["_Linear"], ["_Linear", "_Linear#2"]), ("_Tanh#2", ["_Tanh#2"]),
                            (["_Linear.__call__"], ["_Linear", "_Linear#2"]),
                            # (a _Tanh's __call__ runs its forward: the two are one cluster, named by either)
                            (["__call__"], ["_Linear", "_Linear#2", "_Tanh", "_Tanh#2"]),
                            (["_Tanh.forward"], ["_Tanh", "_Tanh#2"])]:
        boxes = [o for o in node_attrs(layout(graph.render(loss=loss, collapse=names))).values()
                 if o.get("shape") == "box3d"]
        assert sorted(box["tooltip"] for box in boxes) == tooltips, names
    with pytest.raises(ValueError, match="no cluster named '<module>'"):
        graph.render(loss=loss, collapse=["<module>"])
    # a saved graph keeps the labels
    graph.save(tmp_path / "g.json")
    assert labels(tg.load_graph(tmp_path / "g.json").render(cluster="function")) == expected


def test_a_cluster_whose_rules_draw_no_op_collapses_in_the_backward_view_too():
    """nanoGPT's Block.forward only adds the residuals (x + attn(ln(x))): the add's rule passes the gradient on
    unchanged and draws no op, so the backward view knew no cluster 'Block' and collapse=["Block"], which the
    forward view takes, raised ValueError ("no cluster named 'Block'")."""
    torch.manual_seed(0)

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.tanh(self.fc(x))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attn()

        def forward(self, x):
            return x + self.attn(x)

    blocks = torch.nn.Sequential(Block(), Block())
    x = torch.randn(3, 4)
    with tg.record() as graph:
        loss = blocks(x).pow(2).sum()
    for view in ("forward", "backward"):
        graph.render(view=view, loss=loss, collapse=["Block"])  # raised in the backward view
        graph.render(view=view, loss=loss, collapse=["Block#2", "Attn"])
    with pytest.raises(ValueError, match="no cluster named 'Blok'"):
        graph.render(view="backward", loss=loss, collapse=["Blok"])


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.key = torch.nn.Linear(4, 2, bias=False)

    def forward(self, x):
        k = self.key(x)
        return torch.softmax(k @ k.transpose(-2, -1), dim=-1) @ k


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = torch.nn.ModuleList([_Head(), _Head()])
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(torch.cat([head(x) for head in self.heads], dim=-1))  # (3.11: the list is a frame)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _Attention()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        self.ln = torch.nn.LayerNorm(4)

    def forward(self, x):
        x = x + self.attn(self.ln(x))
        return x + self.mlp(x)


def _nested_clusters(parsed: dict) -> dict[str, list[str]]:
    """Cluster label -> the labels of the clusters directly inside it."""
    objects = parsed.get("objects", [])
    return {o["label"]: sorted(objects[i]["label"] for i in o.get("subgraphs", [])) for o in objects
            if "nodes" in o}


def test_function_clusters_nest_like_the_calls(tmp_path):
    """Function clusters were flat: a transformer block's cluster held only the residual adds its own forward
    ran, its attention layer and heads were clusters beside it, and collapse=["Block"] hid only those adds."""
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(_Block(), _Block())
    x = torch.randn(2, 3, 4)
    for _ in range(3):  # the first recording, the one that makes a template, and one copied from it
        with tg.record() as graph:
            loss = blocks(x).pow(2).sum()
        parsed = layout(graph.render(loss=loss, cluster="function"))
        assert _nested_clusters(parsed) == {
            "<b>_Block</b>": ["<b>_Attention</b>"], "<b>_Attention</b>": ["<b>_Head#2</b>", "<b>_Head</b>"],
            "<b>_Head</b>": [], "<b>_Head#2</b>": [],
            "<b>_Block#2</b>": ["<b>_Attention#2</b>"], "<b>_Attention#2</b>": ["<b>_Head#3</b>", "<b>_Head#4</b>"],
            "<b>_Head#3</b>": [], "<b>_Head#4</b>": [],
            # the block's own code, in this test's function (pow, sum): calls made from it are not inside it
            "<b>test_function_clusters_nest_like_the_calls</b>": []}
        # each head's own ops are inside its block's cluster (nn.Linear and nn.LayerNorm are torch's code: their
        # ops belong to the user's function that called them)
        clusters = clusters_of(parsed)
        softmaxes = [f"n{node}" for node in graph if graph.node(node)["op"] == "softmax"]
        assert [s in clusters["<b>_Block</b>"] for s in softmaxes] == [True, True, False, False]
        assert [s in clusters["<b>_Head#3</b>"] for s in softmaxes] == [False, False, True, False]
    for view in ("forward", "backward"):  # one box per block, nothing of its heads drawn
        drawn = node_attrs(layout(graph.render(view=view, loss=loss, collapse=["_Block"])))
        boxes = sorted(o["tooltip"] for o in drawn.values() if o.get("shape") == "box3d")
        assert boxes == ["_Block", "_Block#2"], view
        assert not any("softmax" in o.get("label", "") for o in drawn.values()), view
        heads = [o for o in node_attrs(layout(graph.render(view=view, loss=loss, collapse=["_Head"]))).values()
                 if o.get("shape") == "box3d"]
        assert len(heads) == 4, view
    # a saved graph keeps the nesting; a file written before the call tree was kept draws flat clusters
    graph.save(tmp_path / "g.json")
    assert _nested_clusters(layout(tg.load_graph(tmp_path / "g.json").render(cluster="function"))) == \
        _nested_clusters(parsed)
    data = json.loads((tmp_path / "g.json").read_text())
    del data["graph"]["calls"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    flat = _nested_clusters(layout(tg.load_graph(tmp_path / "old.json").render(cluster="function")))
    assert set(flat) == set(_nested_clusters(parsed)) and not any(flat.values())


@pytest.mark.parametrize("calls, problem", [
    ("[[\"f\", 1], [\"g\", 0]]", "cycle"), ("[[\"f\", 5]]", "pairs"), ("{}", "pairs"), ("[[1, null]]", "pairs")])
def test_a_malformed_call_tree_is_refused_by_name(tmp_path, calls, problem):
    with tg.record() as graph:
        (torch.randn(2, requires_grad=True) * 2).sum()
    graph.save(tmp_path / "g.json")
    data = json.loads((tmp_path / "g.json").read_text())
    data["graph"]["calls"] = calls
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"bad.json: 'calls' .*{problem}"):
        tg.load_graph(tmp_path / "bad.json")


def test_depth_limits_the_drawing(lecture):
    graph, loss, _, _ = lecture
    nodes = svg_nodes(graph.render(loss=loss, depth=2).pipe(format="svg", encoding="utf-8"))
    # loss = -mean_1, mean_1 = mean(getitem_1), getitem_1 = logprobs[range(32), Yb]: 2 ops below the loss
    assert {f"n{graph.node_id(n)}" for n in ("loss", "mean_1", "getitem_1")} <= set(nodes)
    assert len(nodes) == 4 and "earlier nodes not drawn" in nodes["cut"]
    back = svg_nodes(graph.render(view="backward", loss=loss, depth=3).pipe(format="svg", encoding="utf-8"))
    assert any("dlogprobs" in text for text in back.values())
    assert not any("dprobs" in text.split() for text in back.values())
    assert "continues" in back["cut"]


def test_two_thousand_node_graph_renders_in_seconds(tmp_path):
    graph, loss = scoped_mlp(120)
    assert len(graph) > 1900
    timings = {}
    for label, options in [("forward", {}), ("forward, collapse=['batchnorm']", {"collapse": ["batchnorm"]}),
                           ("forward, depth=20", {"depth": 20})]:
        start = time.perf_counter()
        path = graph.render(tmp_path / "deep.svg", loss=loss, **options)
        timings[label] = time.perf_counter() - start
        nodes = svg_nodes(path.read_text(encoding="utf-8"))
        if not options:
            assert len(nodes) == len(graph)
    listing = ", ".join(f"{label}: {seconds:.2f} s" for label, seconds in timings.items())
    print(f"\nrender time, {len(graph)}-node graph: {listing}")


@pytest.mark.slow
def test_two_thousand_node_backward_view(tmp_path):
    graph, loss = scoped_mlp(120)
    start = time.perf_counter()
    path = graph.render(tmp_path / "deep_backward.svg", view="backward", loss=loss)
    elapsed = time.perf_counter() - start
    nodes = svg_nodes(path.read_text(encoding="utf-8"))
    print(f"\nrender time, backward view of a {len(graph)}-node graph ({len(nodes)} boxes): {elapsed:.2f} s")
    assert any("dlayer0" in text or "dW" in text or "+=" in text for text in nodes.values())


def unrolled_rnn(steps: int):
    """A vanilla RNN unrolled ``steps`` times: the same four weights (and xs, ys) used at every step."""
    g = torch.Generator().manual_seed(0)
    Wxh, Whh, Why = (torch.randn(shape, generator=g) * 0.3 for shape in ((3, 8), (8, 8), (8, 3)))  # noqa: N806
    bh, xs, ys = torch.zeros(8), torch.randn(steps, 2, 3, generator=g), torch.randint(0, 3, (steps, 2), generator=g)
    with tg.record() as graph:
        h = torch.zeros(2, 8)
        loss = 0
        for t in range(steps):
            h = torch.tanh(xs[t] @ Wxh + h @ Whh + bh)
            loss = loss + torch.nn.functional.cross_entropy(h @ Why, ys[t])
        loss = loss / steps
    return graph, loss


def test_weights_shared_across_an_unrolled_loop_are_drawn_at_each_use(tmp_path):
    """One box per weight made edges across the whole picture: dot took 136 s at 40 steps, never ended at 50."""
    graph, loss = unrolled_rnn(40)
    grads = graph.backward(loss)
    start = time.perf_counter()
    path = graph.render(tmp_path / "rnn.svg", grads=grads, timeout=120)
    elapsed = time.perf_counter() - start
    print(f"\nrender time, a 40-step RNN ({len(graph)} nodes): {elapsed:.2f} s")
    texts = list(svg_nodes(path.read_text(encoding="utf-8")).values())
    for weight in ("Wxh", "Whh", "Why", "bh"):
        drawn = [text for text in texts if text.split()[0] == weight]
        assert len(drawn) == 40 and all("drawn at each use" in text and "grad norm" in text for text in drawn)
    assert sum("use 40 of 40" in text for text in texts) == 6  # the four weights, xs and ys
    # graphs whose layout is cheap keep one box per tensor (the lecture's, a short loop)
    lecture_graph, lecture_loss, _ = record_exercise()
    assert "drawn at each use" not in lecture_graph.render(loss=lecture_loss).source
    short, short_loss = unrolled_rnn(3)
    assert "drawn at each use" not in short.render(loss=short_loss).source


def test_the_backward_of_a_two_layer_lstm_draws_in_seconds(tmp_path):
    """The rule of nn.LSTM replays the recurrence: each step's gates are read steps later, and dot's placement of
    the 480 boxes of a 2-layer LSTM's backward over 6 steps ran for minutes (past the 60 s timeout, whose advice,
    depth=k, did not help). Its placement passes are now capped; the gradients drawn are torch's."""
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(11, 6).double(), torch.nn.Linear(7, 11).double()
    rnn = torch.nn.LSTM(6, 7, num_layers=2, batch_first=True).double()
    tokens = torch.randint(0, 11, (3, 6))
    with tg.record() as graph:
        out, _ = rnn(emb(tokens))
        loss = torch.nn.functional.cross_entropy(head(out).flatten(0, 1), tokens.flatten())
    grads = graph.backward(loss)
    loss.backward()
    for p in rnn.parameters():
        torch.testing.assert_close(grads[p], p.grad)
    start = time.perf_counter()
    path = graph.render(tmp_path / "lstm.svg", grads=grads, view="backward", timeout=60)
    print(f"\nrender time, a 2-layer LSTM's backward: {time.perf_counter() - start:.2f} s")
    assert path.exists()


def test_a_layout_past_the_timeout_is_stopped_with_advice(lecture, tmp_path, monkeypatch):
    graph, *_ = lecture
    with pytest.raises(RenderTimeoutError, match=r"did not finish laying out .*mlp.svg.* in 0.001 s.*depth=k.*"
                                                 r"collapse=.*timeout=None"):
        graph.render(tmp_path / "mlp.svg", timeout=0.001)
    assert (tmp_path / "mlp.dot").read_text(encoding="utf-8").startswith("digraph")
    assert not (tmp_path / "mlp.svg").exists()
    for bad in (0, -1, "10", True):
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds or None"):
            graph.render(tmp_path / "mlp.svg", timeout=bad)
    assert graph.render(tmp_path / "mlp.svg", timeout=None).exists()
    # a notebook waits no longer than render does: the text summary says how to draw less
    import tensorgraph.render as render_module

    monkeypatch.setattr(render_module, "TIMEOUT", 0.001)
    bundle = graph._repr_mimebundle_()
    assert "image/svg+xml" not in bundle and "did not lay this graph out" in bundle["text/plain"]


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_render(tmp_path, capsys):
    out = tmp_path / "mlp.svg"
    assert main(["render", "--out", str(out), "--grads"]) == 0
    text = out.read_text(encoding="utf-8")
    assert "dhprebn" not in text and "grad norm" in text and "hprebn" in text
    assert str(out) in capsys.readouterr().out
    out = tmp_path / "backward.dot"
    assert main(["render", "--out", str(out), "--view", "backward"]) == 0
    assert "dhprebn" in out.read_text(encoding="utf-8")
    assert "tanh_backward(dh, h)" in out.read_text(encoding="utf-8")
    assert main(["render", "--out", str(out), "--view", "backward", "--textbook"]) == 0
    assert "(1 - h**2) * dh" in out.read_text(encoding="utf-8")
    capsys.readouterr()
    assert main(["render", "--out", str(out), "--textbook"]) == 2
    assert "--textbook draws the backward view; add --view backward" in capsys.readouterr().err


TOY = """
import torch
import tensorgraph as tg
x = torch.tensor([1.0, 2.0, 3.0])
with tg.record() as graph:
    probs = torch.softmax(x, 0)
    L = -probs[0].log()
"""


def test_cli_render_draws_a_script_of_ones_own(tmp_path, capsys):
    """A teacher's own toy for a slide could be drawn only from Python: the command drew the lecture's MLP alone."""
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    out = tmp_path / "toy.svg"
    assert main(["render", str(script), "--out", str(out), "--grads", "--values", "--loss", "L"]) == 0
    assert f"wrote {out}: the forward view of {script} (5 recorded tensors)" in capsys.readouterr().out
    nodes = svg_nodes(out.read_text(encoding="utf-8"))
    truth = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    (-torch.softmax(truth, 0)[0].log()).backward()
    assert f"grad [{', '.join(f'{v:.3g}' for v in truth.grad.tolist())}]" in " ".join(box_with(nodes, "x").split())
    out = tmp_path / "toy_backward.dot"
    assert main(["render", str(script), "--out", str(out), "--view", "backward", "--loss", "L"]) == 0
    assert "seed (dL = 1)" in out.read_text(encoding="utf-8")
    assert main(["render", str(script), "--out", str(tmp_path / "fw.svg")]) == 0  # the forward view needs no loss
    assert main(["render", str(script), "--out", str(out), "--grads"]) == 2  # gradients of what?
    err = capsys.readouterr().err
    assert err.endswith("toy.py defines no 'loss' (the tensor your gradients are of; --loss NAME names another)\n")
    script.write_text(TOY + "raise ValueError('oops')\n")
    assert main(["render", str(script), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"tensorgraph render: error: {script}:8: ValueError: oops\n"


@pytest.mark.parametrize("suffix", [".svg", ".dot"])
def test_a_folder_that_refuses_the_file_is_named(tmp_path, capsys, monkeypatch, suffix):
    """A folder that refuses the write (no permission, /proc) printed a bare ``[Errno 13] Permission denied``."""
    def refuse(self, data):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", refuse)
    out = tmp_path / f"mlp{suffix}"
    graph, loss, _ = record_exercise()
    with pytest.raises(PermissionError, match=rf"^render: cannot write '.*mlp\{suffix}': Permission denied$"):
        graph.render(out)
    assert main(["render", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"tensorgraph render: error: --out: cannot write {str(out)!r}: Permission denied\n", err


@pytest.mark.parametrize("argv, words", [
    (["render", "--out", "mlp.gif"], ["mlp.gif", ".svg"]),
    (["render", "--out", "no/such/folder/mlp.svg"], ["no/such/folder", "does not exist"]),
    (["render", "--out", "conftest.py/mlp.svg"], ["'conftest.py' is a file, not a folder"]),
    (["render", "--out", "mlp.svg", "--view", "sideways"], ["--view", "sideways"]),
    (["render"], ["--out"]),
    (["render", "--out", "."], ["tensorgraph render: error: --out: '.' is a folder"]),
    (["render", "--out", ""], ["tensorgraph render: error: --out: the path is empty"]),
    (["check", "conftest.py", "--render", "mlp.gif"], ["tensorgraph check: error: --render: ", "mlp.gif", ".svg"]),
])
def test_cli_errors_are_one_line(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conftest.py").write_text("")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(word in err for word in words), err


def test_cli_without_dot(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["render", "--out", str(tmp_path / "mlp.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install graphviz" in err
    assert (tmp_path / "mlp.dot").exists()


def test_cli_says_in_one_line_that_a_bitmap_was_shrunk(tmp_path, capsys, monkeypatch):
    import tensorgraph.lecture

    x = torch.randn(2)
    with tg.record() as graph:
        h = x
        for _ in range(500):
            h = h.tanh()
        loss = h.sum()
    monkeypatch.setattr(tensorgraph.lecture, "record_exercise", lambda: (graph, loss, None))
    assert main(["render", "--out", str(tmp_path / "tall.png")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tensorgraph render: warning: ") and "shrank it to" in err, err


# ---------------------------------------------------------------------------------------------- every op


@pytest.mark.filterwarnings("ignore:Tensor.mT is deprecated")
def test_every_op_of_the_table_draws_in_both_views():
    """One case per op pattern of the coverage table: both views build, each tensor named with its shape."""
    from op_cases import CASES

    from tensorgraph.render import shape_text

    seen = set()
    for name, fn, inputs in CASES:
        pattern = name.split("-(")[0]
        if pattern in seen:
            continue
        seen.add(pattern)
        with tg.record() as graph:
            out = fn(*inputs)
            loss = out.sum() if out.is_floating_point() else out.float().sum()
        forward_source = graph.render(loss=loss, values=True).source
        for data in graph._nodes:
            drawn = f"<b>{data['name']}</b>" if data["named"] else f"<i>{data['name']}</i>"
            assert drawn in forward_source or data["output_index"] is not None, (name, data["name"])
        assert shape_text(inputs[0].shape) in forward_source, name
        backward_source = graph.render(view="backward", grads=graph.backward(loss)).source
        assert "dloss" in backward_source, name
    assert len(seen) > 100


def test_names_with_markup_characters_are_escaped():
    x = torch.randn(3)
    odd = {"a<b>&'c\"": torch.randn(3)}
    with tg.record() as graph:
        loss = (x * odd["a<b>&'c\""]).sum()
    parsed = layout(graph.render(view="backward", loss=loss))
    labels = " ".join(o.get("label", "") for o in parsed["objects"])
    assert "a&lt;b&gt;&amp;" in labels


def test_control_characters_in_scope_names_and_titles_are_drawn_visibly(tmp_path):
    """tg.scope("s\\x01cope") made dot fail ('in label of graph cluster_0'); in a tooltip, a control character
    wrote an SVG that is not XML (no browser opens it)."""
    x = torch.randn(3)
    with tg.record() as graph:
        with tg.scope("s\x01cope"), tg.scope("two\nlines"):
            y = x * 2
        loss = y.sum()
    for view in ("forward", "backward"):
        path = graph.render(tmp_path / f"{view}.svg", view=view, loss=loss, title="t\x02itle",
                            collapse="two\nlines" if view == "forward" else None)
        root = ET.parse(path).getroot()  # well-formed XML
        text = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
        tooltips = " ".join(a.get("{http://www.w3.org/1999/xlink}title") or "" for a in root.iter(f"{SVG}a"))
        assert "s\\x01cope" in text and "t\\x02itle" in text, text
        assert "two\\nlines" in text + tooltips, (text, tooltips)
