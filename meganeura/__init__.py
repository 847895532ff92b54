"""meganeura: a graph-compiled inference engine for small vision-language models."""

from .graph import Graph, GraphError, Node, TensorType
from .session import CompileOptions, Session, SessionError, Store, build_inference_session

__all__ = ["Graph", "GraphError", "Node", "TensorType", "CompileOptions", "Session", "SessionError",
           "Store", "build_inference_session"]
