"""Graph -> Plan: plain data a backend executes.

A plan is the ordered dispatch list, split in two phases:
- `prepare`: nodes that depend on parameters only (a merged q|k|v weight, a reshaped conv
  kernel), computed once after the weights are set;
- `dispatches`: the per-run work.
Each per-run value gets a buffer; buffers are reused once their value is dead (liveness),
and each dispatch lists the values that die after it, so executors can free them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .graph import LEAF_OPS, Graph, Node, TensorType
from .passes.core import topological_order

_BYTES = {"f32": 4, "u32": 4}
# Ops whose result is a view of their operand on every backend: no buffer of their own.
VIEW_OPS = ("reshape",)


@dataclass
class Buffer:
    id: int
    nbytes: int


@dataclass
class Dispatch:
    node: Node
    buffer: int | None          # None for views
    frees: list[Node] = field(default_factory=list)

    def __str__(self) -> str:
        operands = ", ".join(f"%{i.id}" for i in self.node.inputs)
        where = f"buf{self.buffer}" if self.buffer is not None else "view"
        return f"%{self.node.id} = {self.node.op}({operands}) -> {self.node.type} @{where}"


@dataclass
class Plan:
    inputs: dict[str, Node]
    parameters: dict[str, Node]
    states: dict[str, Node]
    prepare: list[Node]
    dispatches: list[Dispatch]
    buffers: list[Buffer]
    outputs: list[Node]
    required: set[str]          # leaves the outputs depend on (others may be set, need not be)

    @property
    def buffer_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def summary(self) -> str:
        ops: dict[str, int] = {}
        for d in self.dispatches:
            ops[d.node.op] = ops.get(d.node.op, 0) + 1
        param_bytes = sum(_nbytes(n.type) for n in self.parameters.values())
        lines = [
            f"plan: {len(self.dispatches)} dispatches, {len(self.buffers)} buffers "
            f"({self.buffer_bytes / 2**20:.1f} MiB), {len(self.prepare)} prepared constants",
            f"  inputs: {len(self.inputs)}, parameters: {len(self.parameters)} "
            f"({param_bytes / 2**20:.1f} MiB f32), states: {len(self.states)}",
            "  ops: " + ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())),
            "  outputs: " + ", ".join(str(o.type) for o in self.outputs),
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary() + "\n" + "\n".join(f"  {d}" for d in self.dispatches)


def _nbytes(t: TensorType) -> int:
    n = _BYTES[t.dtype]
    for d in t.shape:
        n *= d
    return n


def _is_constant(node: Node, constant: set) -> bool:
    return node.op == "parameter" or (node.op not in LEAF_OPS and node.inputs
                                      and all(i in constant for i in node.inputs))


def build_plan(graph: Graph) -> Plan:
    order = topological_order(graph)
    leaves = graph._leaves.values()
    constant: set[Node] = set()
    for n in order:
        if _is_constant(n, constant):
            constant.add(n)
    prepare = [n for n in order if n in constant and n.op != "parameter"]
    work = [n for n in order if n not in constant and n.op not in LEAF_OPS]

    # Liveness: the last dispatch that reads each value (outputs live to the end).
    last_use: dict[Node, int] = {}   # per storage (views count as their operand)
    last_read: dict[Node, int] = {}  # per value, for executors that free values
    for i, n in enumerate(work):
        for operand in n.inputs:
            last_use[_root(operand)] = last_read[operand] = i
    for o in graph.outputs:
        last_use[_root(o)] = last_read[o] = len(work)

    buffers: list[Buffer] = []
    free: list[Buffer] = []
    owner: dict[Node, Buffer] = {}
    dispatches: list[Dispatch] = []
    for i, n in enumerate(work):
        buf = None
        if n.op not in VIEW_OPS:
            size = _nbytes(n.type)
            fits = [b for b in free if b.nbytes >= size]
            if fits:  # best fit keeps big buffers for big values
                buf = min(fits, key=lambda b: b.nbytes)
                free.remove(buf)
            else:
                buf = Buffer(len(buffers), size)
                buffers.append(buf)
            owner[n] = buf
        dispatch = Dispatch(n, buf.id if buf else None)
        dying = {_root(o) for o in n.inputs if last_use.get(_root(o)) == i and _root(o) in owner}
        for d in dying:
            free.append(owner[d])
        dispatch.frees = [o for o in set(n.inputs) if last_read[o] == i and o.op not in LEAF_OPS and o not in constant]
        dispatches.append(dispatch)

    return Plan(
        inputs={n.name: n for n in leaves if n.op == "input"},
        parameters={n.name: n for n in leaves if n.op == "parameter"},
        states={n.name: n for n in leaves if n.op == "state"},
        prepare=prepare,
        dispatches=dispatches,
        buffers=buffers,
        outputs=list(graph.outputs),
        required={n.name for n in order if n.op in LEAF_OPS},
    )


def _root(n: Node) -> Node:
    """A view's storage is its operand's."""
    while n.op in VIEW_OPS:
        n = n.inputs[0]
    return n
