"""Session: compile a graph (passes -> plan) and run it on a backend.

Several sessions of one model (vision, prefill, decode) share one `Store`: the weights,
the constants prepared from them and the persistent states (KV cache) live there once.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

import numpy as np

from .backends.protocol import Backend
from .graph import Graph, Node
from .passes import optimize
from .plan import Plan, build_plan


class SessionError(ValueError):
    """A parameter or input was missing, unknown, or of the wrong shape or type."""


@dataclass(frozen=True)
class CompileOptions:
    backend: str = "numpy"      # "numpy" (the reference) or "torch"
    device: str = "cpu"         # torch device: "cpu", "cuda", "cuda:1"
    dtype: str = "float32"      # torch weight and activation dtype: "float32", "bfloat16", "float16"
    quantize: str = "none"      # the text decoder's product weights: "none", "int8", "int4" (torch CPU)
    optimize: bool = True       # run the fusion passes


def make_backend(options: CompileOptions) -> Backend:
    if options.backend == "numpy":
        from .backends.numpy_backend import NumpyBackend
        return NumpyBackend(options)
    if options.backend == "torch":
        from .backends.torch_backend import TorchBackend
        return TorchBackend(options)
    raise SessionError(f"unknown backend {options.backend!r}: choose 'numpy' or 'torch'")


class Store:
    """Backend-resident parameters, prepared constants and states, shared by sessions.

    A parameter that only feeds prepared constants (the parts of a merged q|k|v weight) can be
    released once its constants exist: `release` drops the backend copy and `parameter` uploads
    it again from its host source if a later graph reads it directly."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.sources: dict[str, object] = {}
        self.forms: dict[str, str] = {}  # parameters the backend keeps in a compact form (int4, int8)
        self.parameters: dict[str, object] = {}
        self.states: dict[str, object] = {}
        self.constants: dict[str, object] = {}
        self.version = 0  # bumped when parameters change: captured replays must be re-recorded

    def set_parameter(self, name: str, array, reload=None, form: str | None = None) -> None:
        """`reload()` gives the host array again if a released parameter is needed later (a
        checkpoint's lazy tensor: no host copy is kept); by default the array is kept. With a
        `form`, the backend keeps the weight compact (`array` may then be quantized blocks)."""
        self.sources[name] = reload or (lambda: array)
        if form:
            self.forms[name] = form
        else:
            self.forms.pop(name, None)
        self.parameters[name] = self._upload(name, array)
        self.constants.clear()  # derived from parameters: recompute on next use
        self.version += 1

    def _upload(self, name: str, array):
        form = self.forms.get(name)
        return self.backend.weight(array, form) if form else self.backend.from_host(array, "f32")

    def parameter(self, name: str):
        value = self.parameters.get(name)
        if value is None:
            value = self.parameters[name] = self._upload(name, self.sources[name]())
        return value

    def release(self, names) -> None:
        for name in names:
            self.parameters.pop(name, None)

    def state(self, node: Node):
        """A state's storage: given by its owner (the runner's KV cache), or zeros made here
        on first use for graphs built by hand."""
        value = self.states.get(node.name)
        if value is None:
            value = self.states[node.name] = self.backend.zeros(node.shape)
        elif tuple(value.shape) != node.shape:  # never silently replace memory a plan or recording uses
            raise SessionError(f"state {node.name!r}: the graph wants shape {list(node.shape)}, the store holds "
                               f"{list(value.shape)}")
        return value


def _describe(array) -> str:
    return f"{getattr(array, 'dtype', type(array).__name__)} array of shape {list(np.shape(array))}"


def _unknown(kind: str, name: str, known) -> SessionError:
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return SessionError(f"unknown {kind} {name!r}{hint} ({len(known)} {kind}s declared)")


def _check_array(kind: str, node: Node, array) -> np.ndarray | object:
    shape = tuple(getattr(array, "shape", np.shape(array)))
    if shape != node.shape:
        raise SessionError(f"{kind} {node.name!r}: expected shape {list(node.shape)}, got {_describe(array)}")
    dtype = str(getattr(array, "dtype", ""))
    is_float = any(t in dtype for t in ("float", "bfloat"))
    is_int = "int" in dtype
    if node.dtype == "f32" and not is_float:
        raise SessionError(f"{kind} {node.name!r}: expected a floating-point array, got {_describe(array)}")
    if node.dtype == "u32":
        if not is_int:
            raise SessionError(f"{kind} {node.name!r}: expected an integer array (u32), got {_describe(array)}")
        a = np.asarray(array)
        if a.size and (a.min() < 0 or a.max() >= 2**32):
            raise SessionError(f"{kind} {node.name!r}: values must fit in u32, got range [{a.min()}, {a.max()}]")
    return array


def _constant_key(node: Node, memo: dict) -> str:
    """Structural name of a parameter-only value, so sessions sharing a store share it."""
    key = memo.get(node)
    if key is None:
        if node.op == "parameter":
            key = node.name
        else:
            args = ",".join(_constant_key(i, memo) for i in node.inputs)
            attrs = ",".join(f"{k}={v}" for k, v in sorted(node.attrs.items()))
            key = f"{node.op}[{attrs}]({args})"
        memo[node] = key
    return key


class Session:
    """A compiled graph. With `capture=True` (on backends that can record, i.e. CUDA) the first
    run records every dispatch once and each run replays the recording: inputs are copied into
    fixed buffers and outputs are overwritten in place by the next run."""

    def __init__(self, graph: Graph, options: CompileOptions | None = None, store: Store | None = None,
                 capture: bool = False, foldable: frozenset[str] | set[str] = frozenset()):
        if not graph.outputs:
            raise SessionError("the graph has no outputs: call graph.set_outputs([...]) first")
        self.options = options or CompileOptions()
        self.graph, self.report = optimize(graph, fuse=self.options.optimize)
        self.plan: Plan = build_plan(self.graph)
        self.store = store or Store(make_backend(self.options))
        self.backend = self.store.backend
        memo: dict = {}
        self._constant_keys = {n: _constant_key(n, memo) for n in self.plan.prepare}
        # `foldable` parameters are read by no plan of the model except through prepared
        # constants: each is released from the store once the last constant reading it exists,
        # so a merged weight and its parts are never all on the device at once
        last_reader = {i.name: node for node in self.plan.prepare for i in node.inputs
                       if i.op == "parameter" and i.name in foldable}
        self._release_after: dict[Node, list[str]] = {}
        for name, node in last_reader.items():
            self._release_after.setdefault(node, []).append(name)
        self._inputs: dict[str, object] = {}
        self._outputs: list = []
        self.capture = capture and self.backend.can_capture
        self._replay = None
        self._recorded_version = None
        self._checked_version = None

    # ---- feeding ------------------------------------------------------------------
    def set_parameter(self, name: str, array) -> None:
        node = self.plan.parameters.get(name)
        if node is None:
            raise _unknown("parameter", name, self.plan.parameters)
        self.store.set_parameter(name, _check_array("parameter", node, array))

    def set_input(self, name: str, array) -> None:
        node = self.plan.inputs.get(name)
        if node is None:
            raise _unknown("input", name, self.plan.inputs)
        array = _check_array("input", node, array)
        if self.capture and name in self._inputs:  # a recording reads this very buffer
            self.backend.write(self._inputs[name], array, node.dtype)
        else:
            self._inputs[name] = self.backend.from_host(array, node.dtype)

    def bind_input(self, name: str, value) -> None:
        """Make a backend array (e.g. a view of a packed buffer the caller refills) the input's
        storage: runs, recorded ones included, read it in place."""
        node = self.plan.inputs.get(name)
        if node is None:
            raise _unknown("input", name, self.plan.inputs)
        if tuple(value.shape) != node.shape:
            raise SessionError(f"input {name!r}: expected shape {list(node.shape)}, got {_describe(value)}")
        self._inputs[name] = value

    def missing_parameters(self) -> list[str]:
        return [n for n in self.plan.parameters if n in self.plan.required and n not in self.store.sources]

    @functools.cached_property
    def direct_parameters(self) -> set[str]:
        """Parameters the per-run dispatches (or outputs) read; the rest only feed prepared constants."""
        read = [i for d in self.plan.dispatches for i in d.node.inputs] + self.plan.outputs
        return {n.name for n in read if n.op == "parameter"}

    # ---- running ------------------------------------------------------------------
    def _prepare_constants(self, env: dict) -> None:
        for node in self.plan.prepare:
            key = self._constant_keys[node]
            value = self.store.constants.get(key)
            if value is None:
                args = [self.store.parameter(i.name) if i.op == "parameter" else env[i] for i in node.inputs]
                value = self.store.constants[key] = self.backend.run(node, args)
                del args
                self.store.release(self._release_after.get(node, ()))
            env[node] = value

    def run(self) -> None:
        if self._checked_version != self.store.version:  # parameters only change between loads
            self._check_parameters()
            self._checked_version = self.store.version
        unset = [n for n in self.plan.inputs if n in self.plan.required and n not in self._inputs]
        if unset:
            raise SessionError(f"input(s) never set: {', '.join(unset)}")
        if not self.capture:
            self._execute()
            return
        if self._replay is None or self._recorded_version != self.store.version:
            self._replay = self.backend.capture(self._execute)  # after a warm-up run: kernels, states
            self._recorded_version = self.store.version
        self._replay()

    def _check_parameters(self) -> None:
        missing = self.missing_parameters()
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise SessionError(f"{len(missing)} parameter(s) never set: {shown}")

    def _execute(self) -> None:
        env: dict[Node, object] = {}
        for name in self.direct_parameters:
            env[self.plan.parameters[name]] = self.store.parameter(name)
        for name, node in self.plan.inputs.items():
            if name in self.plan.required:
                env[node] = self._inputs[name]
        for node in self.plan.states.values():
            env[node] = self.store.state(node)
        self._prepare_constants(env)
        run = self.backend.run
        for d in self.plan.dispatches:
            env[d.node] = run(d.node, [env[i] for i in d.node.inputs])
            for dead in d.frees:
                del env[dead]
        self._outputs = [env[o] for o in self.plan.outputs]

    step = run

    def output(self, index: int = 0):
        """The backend-resident output (a torch tensor on the torch backend): no copy."""
        if not self._outputs:
            raise SessionError("no outputs yet: call run() first")
        if not 0 <= index < len(self._outputs):
            raise SessionError(f"output index {index} out of range: the graph has {len(self._outputs)} output(s)")
        return self._outputs[index]

    def read_output(self, index: int = 0) -> np.ndarray:
        return self.backend.to_host(self.output(index))


def build_inference_session(graph: Graph, options: CompileOptions | None = None,
                            store: Store | None = None) -> Session:
    return Session(graph, options, store)
