"""Fusion rules: each is a function `rule(graph, node, uses) -> replacement | None`.

A rule looks at one node (the root of its pattern) and, when the pattern matches, builds
the replacement with the graph's builder; `apply_rules` substitutes it for the root.
Rules are grouped in ordered stages (`FUSION_RULES`) because some patterns only appear
after earlier rewrites (e.g. swiglu over the halves of a merged gate|up projection).
"""

from __future__ import annotations


from ..graph import Graph, Node
from .core import PassReport, consumers, substitute


def _plain_linear(n: Node) -> bool:
    return n.op == "linear" and not any(n.attrs[k] for k in ("bias", "residual", "norm", "gated", "gelu", "float_out"))


def linear_operands(n: Node) -> dict:
    """The optional operands of a linear node by name: bias, residual, norm (None if absent)."""
    rest = iter(n.inputs[2:])
    return {k: next(rest) if n.attrs[k] else None for k in ("bias", "residual", "norm")}


def _relink(g: Graph, n: Node, x: Node, **changes) -> Node:
    """A copy of linear node n reading x, with some attributes or operands changed."""
    kw = {**linear_operands(n), **{k: n.attrs[k] for k in ("eps", "gated", "gelu", "float_out")}, **changes}
    return g.linear(x, n.inputs[1], **kw)


def fuse_bias_into_linear(g: Graph, n: Node, uses) -> Node | None:
    """bias_add(linear(x, w), b) -> linear(x, w, b)"""
    if n.op != "bias_add":
        return None
    lin, bias = n.inputs
    if not _plain_linear(lin) or uses[lin] != 1:
        return None
    return g.linear(lin.inputs[0], lin.inputs[1], bias=bias)


def fuse_gelu_into_linear(g: Graph, n: Node, uses) -> Node | None:
    """gelu(linear(x, w, b)) -> linear(x, w, b, gelu=True): the GELU rides on the product."""
    if n.op != "gelu":
        return None
    lin = n.inputs[0]
    if lin.op != "linear" or lin.attrs["residual"] or lin.attrs["gelu"] or uses[lin] != 1:
        return None
    return _relink(g, lin, lin.inputs[0], gelu=True)


def fuse_add_into_layer_norm(g: Graph, n: Node, uses) -> Node | None:
    """layer_norm(add(a, b)) -> halves of add_layer_norm(a, b): one pass writes the residual
    sum and its norm, and the add's other readers (the residual stream) take the sum half."""
    if n.op != "layer_norm" or n.inputs[0].op != "add" or len(n.shape) != 2:
        return None
    add, weight, bias = n.inputs
    d = n.shape[1]
    both = g.add_layer_norm(*add.inputs, weight, bias, n.attrs["eps"])
    if uses[add] > 1:
        substitute(g, add, g.slice(both, axis=1, start=0, stop=d))
    return g.slice(both, axis=1, start=d, stop=2 * d)


def fuse_residual_into_linear(g: Graph, n: Node, uses) -> Node | None:
    """add(linear(x, w, b?), r) -> linear(x, w, b?, residual=r): one addmm instead of two passes."""
    if n.op != "add":
        return None
    for lin, other in (n.inputs, reversed(n.inputs)):
        if lin.op == "linear" and not lin.attrs["residual"] and not lin.attrs["gelu"] and uses[lin] == 1:
            return _relink(g, lin, lin.inputs[0], residual=other)
    return None


def fuse_swiglu(g: Graph, n: Node, uses) -> Node | None:
    """mul(silu(gate), up) -> swiglu(gate, up)"""
    if n.op != "mul":
        return None
    for act, up in (n.inputs, reversed(n.inputs)):
        if act.op == "silu" and uses[act] == 1:
            return g.swiglu(act.inputs[0], up)
    return None


def fuse_rope_into_cached_attention(g: Graph, n: Node, uses) -> Node | None:
    """cached_attention(rope(q, pos), rope(k, pos), v, ..., pos) -> cached_attention(q, k, v, ...,
    rope_theta): one kernel rotates q and k and writes the cache, instead of three passes."""
    if n.op != "cached_attention" or n.attrs["rope_theta"] is not None:
        return None
    q, k, v, k_cache, v_cache, block_table, slots, positions = n.inputs
    a = n.attrs
    head_dim = q.shape[1] // a["num_heads"]
    for r in (q, k):
        if (r.op != "rope" or uses[r] != 1 or len(r.inputs) != 2 or r.inputs[1] is not positions
                or r.attrs["head_dim"] != head_dim or r.attrs["theta"] != q.attrs.get("theta")):
            return None
    return g.cached_attention(q.inputs[0], k.inputs[0], v, k_cache, v_cache, block_table, slots, positions,
                              a["num_heads"], a["num_kv_heads"], mode=a["mode"], rope_theta=q.attrs["theta"])


def fuse_rms_norm_into_linear(g: Graph, n: Node, uses) -> Node | None:
    """linear(rms_norm(x, w), W) -> linear(x, W, norm=w): a decode step's skinny product
    recomputes the norm of its few rows instead of a kernel writing them out."""
    if n.op != "linear" or n.attrs["norm"] or n.attrs["gated"]:
        return None
    x = n.inputs[0]
    if x.op != "rms_norm" or uses[x] != 1:
        return None
    return _relink(g, n, x.inputs[0], norm=x.inputs[1], eps=x.attrs["eps"])


def fuse_swiglu_into_linear(g: Graph, n: Node, uses) -> Node | None:
    """linear(swiglu(m[:, :k], m[:, k:]), W) -> linear(m, W, gated=True) for the two halves of a
    merged gate|up projection m."""
    if n.op != "linear" or n.attrs["norm"] or n.attrs["gated"]:
        return None
    s = n.inputs[0]
    if s.op != "swiglu" or uses[s] != 1:
        return None
    gate, up = s.inputs
    if not (gate.op == up.op == "slice" and gate.inputs[0] is up.inputs[0]):
        return None
    merged, k = gate.inputs[0], gate.shape[1]
    halves = [(x.attrs["axis"], x.attrs["start"], x.attrs["stop"]) for x in (gate, up)]
    if halves != [(1, 0, k), (1, k, 2 * k)] or merged.shape[1] != 2 * k:
        return None
    return _relink(g, n, merged, gated=True)


def merge_sibling_linears(g: Graph, n: Node, uses) -> Node | None:
    """Linears that read the same x with parameter weights (q|k|v, gate|up) become one linear
    over the concatenated weight, followed by column slices. The concatenation depends on
    parameters only, so the session computes it once at load."""
    if not _merge_candidate(n):
        return None
    x = n.inputs[0]
    siblings = [u for u in g.nodes if u.op == "linear" and u.inputs and u.inputs[0] is x
                and _merge_candidate(u) and u.attrs["bias"] == n.attrs["bias"]]
    if len(siblings) < 2 or siblings[0] is not n:
        return None
    weight = g.concat([s.inputs[1] for s in siblings], axis=0)
    bias = g.concat([s.inputs[2] for s in siblings], axis=0) if n.attrs["bias"] else None
    merged = g.linear(x, weight, bias=bias)
    start = 0
    for s in siblings:
        width = s.shape[1]
        part = g.slice(merged, axis=1, start=start, stop=start + width)
        start += width
        if s is not n:
            substitute(g, s, part)
        else:
            first = part
    return first


def _merge_candidate(n: Node) -> bool:
    return (n.op == "linear" and not any(n.attrs[k] for k in ("residual", "norm", "gated", "gelu", "float_out"))
            and n.inputs[1].op == "parameter"
            and (not n.attrs["bias"] or n.inputs[2].op == "parameter"))


def apply_rules(g: Graph, rules, report: PassReport) -> None:
    """One sweep over the graph: each node is offered to each rule once, in order."""
    uses = consumers(g)
    for node in list(g.nodes):
        if uses[node] == 0:
            continue  # replaced earlier in this sweep
        for rule in rules:
            replacement = rule(g, node, uses)
            if replacement is not None:
                substitute(g, node, replacement)
                report.record(rule.__name__)
                uses = consumers(g)
                break


FUSION_RULES = [
    [fuse_bias_into_linear],
    [merge_sibling_linears, fuse_gelu_into_linear, fuse_add_into_layer_norm],  # before residual adds fuse
    [fuse_residual_into_linear, fuse_swiglu, fuse_rope_into_cached_attention],
    [fuse_rms_norm_into_linear, fuse_swiglu_into_linear],
]
