"""meganeura: a graph-compiled inference engine for small vision-language models."""

from .graph import Graph, GraphError, Node, TensorType
from .session import CompileOptions, Session, SessionError, Store, build_inference_session



def __getattr__(name):
    # The pipeline pulls in tokenizers, Pillow and the weight readers: load it on first use.
    if name in ("load", "Pipeline"):
        from . import pipeline
        return getattr(pipeline, name)
    if name == "caption":
        from .jobs import caption
        return caption
    raise AttributeError(f"module 'meganeura' has no attribute {name!r}")


__all__ = ["load", "Pipeline", "caption", "Graph", "GraphError", "Node", "TensorType", "CompileOptions", "Session", "SessionError",
           "Store", "build_inference_session"]
