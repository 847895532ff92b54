"""Graph rewrite passes. `optimize` is the whole pipeline, readable top to bottom."""

from __future__ import annotations

from ..graph import Graph
from .core import PassReport, copy_graph, dead_code_elimination
from .fusions import FUSION_RULES, apply_rules


def optimize(graph: Graph, fuse: bool = True) -> tuple[Graph, PassReport]:
    """Return an optimized copy of `graph` (the caller's graph is left as built) and a report."""
    g = copy_graph(graph)
    report = PassReport()
    dead_code_elimination(g, report)  # don't fuse what nobody reads
    if fuse:
        for rules in FUSION_RULES:
            apply_rules(g, rules, report)
            dead_code_elimination(g, report)  # replaced nodes must not count as consumers next stage
    return g, report


__all__ = ["optimize", "PassReport", "dead_code_elimination", "copy_graph", "FUSION_RULES", "apply_rules"]
