"""Pass machinery: copying a graph, consumer counts, substitution, dead-code elimination."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..graph import LEAF_OPS, Graph, Node


@dataclass
class PassReport:
    """How often each rule fired, in order of first firing."""

    fired: Counter = field(default_factory=Counter)

    def record(self, rule: str, n: int = 1) -> None:
        self.fired[rule] += n

    def __str__(self) -> str:
        if not self.fired:
            return "no rewrites"
        return ", ".join(f"{rule} x{n}" for rule, n in self.fired.items())


def copy_graph(graph: Graph) -> Graph:
    """A structural copy whose nodes can be rewritten without touching the original."""
    new = Graph(graph.batch_invariant)
    mapping: dict[Node, Node] = {}
    for n in graph.nodes:
        clone = Node(n.op, tuple(mapping[i] for i in n.inputs), n.shape, n.dtype, dict(n.attrs), n.name)
        mapping[n] = clone
        new.nodes.append(clone)
        if n.op in LEAF_OPS:
            new._leaves[n.name] = clone
    new.outputs = [mapping[o] for o in graph.outputs]
    return new


def topological_order(graph: Graph) -> list[Node]:
    """Nodes reachable from the outputs, operands before users (iterative DFS: graphs are deep)."""
    order, state = [], {}
    for root in graph.outputs:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                state[node] = True
                order.append(node)
                continue
            if node in state:
                continue
            state[node] = False
            stack.append((node, True))
            stack.extend((i, False) for i in reversed(node.inputs) if i not in state)
    return order


def consumers(graph: Graph) -> Counter:
    """How many times each node is used as an operand or an output."""
    uses = Counter()
    for n in graph.nodes:
        uses.update(n.inputs)
    uses.update(graph.outputs)
    return uses


def substitute(graph: Graph, old: Node, new: Node) -> None:
    """Make every user of `old` use `new` instead."""
    for n in graph.nodes:
        if old in n.inputs:
            n.inputs = tuple(new if i is old else i for i in n.inputs)
    graph.outputs = [new if o is old else o for o in graph.outputs]


def dead_code_elimination(graph: Graph, report: PassReport) -> None:
    """Drop nodes the outputs don't need; declared leaves stay (inputs remain settable)."""
    live = set(topological_order(graph))
    before = len(graph.nodes)
    graph.nodes = [n for n in topological_order(graph)] + [
        n for n in graph._leaves.values() if n not in live]
    removed = before - len(graph.nodes)
    if removed:
        report.record("dead_code", removed)
