"""The graph IR: one small node type and a builder with a method per operation.

A model is written once as calls on a `Graph`; each call checks shapes at build time and
returns a `Node`. Values are 2-D row-major tensors in almost every op ([rows, features]),
which keeps the op set small and the kernels simple. `backends/numpy_backend.py` defines
what each op computes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

DTYPES = ("f32", "u32")


class GraphError(ValueError):
    """A node was built with operands of the wrong shape or type."""


class TensorType(NamedTuple):
    shape: tuple[int, ...]
    dtype: str

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


_ids = itertools.count()


@dataclass(eq=False)
class Node:
    """One value in the graph: the op that makes it, its operands, its type, its attributes.

    `name` is set for graph inputs, parameters and states (persistent buffers such as a KV cache).
    """

    op: str
    inputs: tuple["Node", ...]
    shape: tuple[int, ...]
    dtype: str = "f32"
    attrs: dict = field(default_factory=dict)
    name: str | None = None
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def type(self) -> TensorType:
        return TensorType(self.shape, self.dtype)

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return f"%{self.id} = {self.op}{label} {self.type}"

    def __hash__(self) -> int:
        return self.id


LEAF_OPS = ("input", "parameter", "state")


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class Graph:
    """Builder and container. Nodes are appended in topological order."""

    def __init__(self, batch_invariant: bool = False) -> None:
        # Products built in this graph compute each row as they would alone, whatever the other
        # rows (decode steps: a greedy answer must not depend on what runs beside it).
        self.batch_invariant = batch_invariant
        self.nodes: list[Node] = []
        self.outputs: list[Node] = []
        self._leaves: dict[str, Node] = {}

    # ---- introspection -------------------------------------------------------------
    def _leaves_of(self, op: str) -> dict[str, TensorType]:
        return {n.name: n.type for n in self._leaves.values() if n.op == op}

    @property
    def inputs(self) -> dict[str, TensorType]:
        return self._leaves_of("input")

    @property
    def parameters(self) -> dict[str, TensorType]:
        return self._leaves_of("parameter")

    @property
    def states(self) -> dict[str, TensorType]:
        return self._leaves_of("state")

    def leaf(self, name: str) -> Node:
        return self._leaves[name]

    def set_outputs(self, outputs: list[Node]) -> None:
        for o in outputs:
            if not isinstance(o, Node):
                raise GraphError(f"set_outputs: expected graph nodes, got {type(o).__name__}")
        self.outputs = list(outputs)

    def __repr__(self) -> str:
        return f"Graph({len(self.nodes)} nodes, {len(self.inputs)} inputs, {len(self.parameters)} parameters)"

    # ---- building ------------------------------------------------------------------
    def _add(self, op, inputs, shape, dtype="f32", name=None, **attrs) -> Node:
        for i in inputs:
            if not isinstance(i, Node):
                raise GraphError(f"{op}: operand {i!r} is not a graph node")
        node = Node(op, tuple(inputs), tuple(int(d) for d in shape), dtype, attrs, name)
        self.nodes.append(node)
        return node

    def _leaf(self, op: str, name: str, shape, dtype: str) -> Node:
        if dtype not in DTYPES:
            raise GraphError(f"{op} {name!r}: dtype must be one of {DTYPES}, got {dtype!r}")
        if name in self._leaves:
            existing = self._leaves[name]
            if existing.op == op and existing.type == TensorType(tuple(shape), dtype):
                return existing  # e.g. a tied embedding used as lm_head
            raise GraphError(f"{op} {name!r}: already declared as {existing.op} {existing.type}")
        node = self._add(op, (), shape, dtype, name=name)
        self._leaves[name] = node
        return node

    def input(self, name: str, shape, dtype: str = "f32") -> Node:
        return self._leaf("input", name, shape, dtype)

    def input_u32(self, name: str, shape) -> Node:
        return self._leaf("input", name, shape, "u32")

    def parameter(self, name: str, shape) -> Node:
        return self._leaf("parameter", name, shape, "f32")

    def state(self, name: str, shape) -> Node:
        """A persistent f32 buffer owned by its user (zero at start), e.g. the KV cache (engine/kv_cache.py)."""
        return self._leaf("state", name, shape, "f32")

    # ---- helpers for checks --------------------------------------------------------
    @staticmethod
    def _need(cond: bool, op: str, msg: str, *nodes: Node) -> None:
        if not cond:
            shapes = ", ".join(str(n.type) for n in nodes)
            raise GraphError(f"{op}: {msg} (got {shapes})")

    def _f32(self, op: str, *nodes: Node) -> None:
        for n in nodes:
            self._need(n.dtype == "f32", op, "expects f32 operands", n)

    # ---- linear algebra ------------------------------------------------------------
    def matmul(self, a: Node, b: Node) -> Node:
        """[m, k] @ [k, n]."""
        self._f32("matmul", a, b)
        self._need(len(a.shape) == 2 and len(b.shape) == 2 and a.shape[1] == b.shape[0],
                   "matmul", "needs [m, k] @ [k, n]", a, b)
        return self._add("matmul", (a, b), (a.shape[0], b.shape[1]))

    def linear(self, x: Node, weight: Node, bias: Node | None = None, residual: Node | None = None,
               norm: Node | None = None, eps: float = 0.0, gated: bool = False, gelu: bool = False,
               float_out: bool = False) -> Node:
        """f(x) @ weight^T (+ bias) (+ residual); weight keeps the checkpoint layout [out, in].

        f is the identity, or (fusions of what precedes a projection) RMSNorm with weight `norm`
        [in] and `eps`, or with gated=True SwiGLU of x = [rows, 2*in] = gate|up: silu(gate) * up.
        gelu=True applies the tanh GELU to the product + bias (a fusion of what follows it).
        float_out=True keeps the result in float32 whatever the backend's dtype (logits: rounding
        them to bf16 makes ties that pick the wrong token)."""
        self._f32("linear", x, weight)
        self._need(not (gelu and residual is not None), "linear", "gelu and residual are exclusive", x)
        width = weight.shape[1] * (2 if gated else 1) if len(weight.shape) == 2 else -1
        self._need(len(x.shape) == 2 and len(weight.shape) == 2 and x.shape[1] == width,
                   "linear", "needs x [rows, in] (gated: [rows, 2*in]) and weight [out, in]", x, weight)
        self._need(not (gated and norm is not None), "linear", "norm and gated are exclusive", x)
        out = (x.shape[0], weight.shape[0])
        operands = [x, weight]
        if bias is not None:
            self._need(bias.shape == (out[1],), "linear", f"bias must be [{out[1]}]", bias)
            operands.append(bias)
        if residual is not None:
            self._need(residual.shape == out, "linear", f"residual must be {list(out)}", residual)
            operands.append(residual)
        if norm is not None:
            self._need(norm.shape == (weight.shape[1],), "linear", f"norm must be [{weight.shape[1]}]", norm)
            operands.append(norm)
        return self._add("linear", operands, out, bias=bias is not None, residual=residual is not None,
                         norm=norm is not None, eps=float(eps), gated=bool(gated), gelu=bool(gelu),
                         float_out=bool(float_out), batch_invariant=self.batch_invariant)

    # ---- elementwise -------------------------------------------------------------------
    def add(self, a: Node, b: Node) -> Node:
        self._f32("add", a, b)
        self._need(a.shape == b.shape, "add", "operands must have equal shapes", a, b)
        return self._add("add", (a, b), a.shape)

    def mul(self, a: Node, b: Node) -> Node:
        self._f32("mul", a, b)
        self._need(a.shape == b.shape, "mul", "operands must have equal shapes", a, b)
        return self._add("mul", (a, b), a.shape)

    def bias_add(self, x: Node, bias: Node) -> Node:
        self._f32("bias_add", x, bias)
        self._need(bias.shape == x.shape[-1:], "bias_add", "bias must match the last dimension", x, bias)
        return self._add("bias_add", (x, bias), x.shape)

    def gelu(self, x: Node) -> Node:
        """GELU, tanh approximation (gelu_pytorch_tanh)."""
        self._f32("gelu", x)
        return self._add("gelu", (x,), x.shape)

    def silu(self, x: Node) -> Node:
        self._f32("silu", x)
        return self._add("silu", (x,), x.shape)

    def swiglu(self, gate: Node, up: Node) -> Node:
        """silu(gate) * up."""
        self._f32("swiglu", gate, up)
        self._need(gate.shape == up.shape, "swiglu", "gate and up must have equal shapes", gate, up)
        return self._add("swiglu", (gate, up), gate.shape)

    # ---- normalization -------------------------------------------------------------
    def layer_norm(self, x: Node, weight: Node, bias: Node, eps: float) -> Node:
        self._f32("layer_norm", x, weight, bias)
        self._need(weight.shape == x.shape[-1:] and bias.shape == x.shape[-1:], "layer_norm",
                   "weight and bias must match the last dimension", x, weight, bias)
        return self._add("layer_norm", (x, weight, bias), x.shape, eps=float(eps))

    def add_layer_norm(self, x: Node, residual: Node, weight: Node, bias: Node, eps: float) -> Node:
        """s = x + residual and its LayerNorm side by side: [rows, 2*d] = s | layer_norm(s)
        (a fusion of a residual add and the norm that reads it; slices take the halves)."""
        self._f32("add_layer_norm", x, residual, weight, bias)
        self._need(len(x.shape) == 2 and residual.shape == x.shape and weight.shape == bias.shape == x.shape[-1:],
                   "add_layer_norm", "needs x and residual [rows, d], weight and bias [d]", x, residual, weight, bias)
        return self._add("add_layer_norm", (x, residual, weight, bias), (x.shape[0], 2 * x.shape[1]), eps=float(eps))

    def rms_norm(self, x: Node, weight: Node, eps: float) -> Node:
        self._f32("rms_norm", x, weight)
        self._need(weight.shape == x.shape[-1:], "rms_norm", "weight must match the last dimension", x, weight)
        return self._add("rms_norm", (x, weight), x.shape, eps=float(eps))

    # ---- positions and attention -----------------------------------------------------
    def rope(self, x: Node, positions: Node | None, head_dim: int, theta: float) -> Node:
        """Rotary embedding (rotate-half layout) of x [rows, heads*head_dim] at positions [rows]
        (u32; None means row i is at position i)."""
        self._need(x.dtype == "f32" and len(x.shape) == 2 and x.shape[1] % head_dim == 0 and head_dim % 2 == 0,
                   "rope", f"needs f32 x [rows, heads*{head_dim}]", x)
        operands = [x]
        if positions is not None:
            self._need(positions.dtype == "u32" and positions.shape == (x.shape[0],), "rope",
                       f"positions must be u32 [{x.shape[0]}]", x, positions)
            operands.append(positions)
        return self._add("rope", operands, x.shape, head_dim=int(head_dim), theta=float(theta))

    def _check_qkv(self, op, q, k, v, num_heads, num_kv_heads):
        self._f32(op, q, k, v)
        self._need(len(q.shape) == 2 and q.shape[1] % num_heads == 0, op,
                   f"q must be [rows, {num_heads} heads * head_dim]", q)
        head_dim = q.shape[1] // num_heads
        self._need(num_heads % num_kv_heads == 0, op, f"{num_heads} heads not divisible by {num_kv_heads} kv heads", q)
        self._need(k.shape == v.shape and len(k.shape) == 2 and k.shape[1] == num_kv_heads * head_dim, op,
                   f"k and v must be [rows, {num_kv_heads}*{head_dim}]", q, k, v)
        return head_dim

    def attention(self, q: Node, k: Node, v: Node, num_heads: int, num_kv_heads: int | None = None,
                  causal: bool = False, block: int | None = None, key_mask: Node | None = None) -> Node:
        """Softmax attention with grouped-query heads.

        Rows are split into independent sequences of `block` rows (default: one sequence);
        `key_mask` [sequences, block] (1 = attend, 0 = padding) hides padded keys.
        """
        num_kv_heads = num_kv_heads or num_heads
        self._check_qkv("attention", q, k, v, num_heads, num_kv_heads)
        rows = q.shape[0]
        block = block or rows
        self._need(k.shape[0] == rows and rows % block == 0, "attention",
                   f"q and k must have equal rows, a multiple of block={block}", q, k)
        operands = [q, k, v]
        if key_mask is not None:
            self._need(key_mask.shape == (rows // block, block), "attention",
                       f"key_mask must be [{rows // block}, {block}]", key_mask)
            operands.append(key_mask)
        return self._add("attention", operands, q.shape, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         causal=bool(causal), block=block, masked=key_mask is not None)

    def causal_attention(self, q, k, v, num_heads, num_kv_heads=None) -> Node:
        return self.attention(q, k, v, num_heads, num_kv_heads, causal=True)

    def full_attention(self, q, k, v, num_heads, block=None, key_mask=None) -> Node:
        return self.attention(q, k, v, num_heads, num_heads, causal=False, block=block, key_mask=key_mask)

    def cached_attention(self, q: Node, k: Node, v: Node, k_cache: Node, v_cache: Node, block_table: Node,
                         slots: Node, positions: Node, num_heads: int, num_kv_heads: int,
                         mode: str = "any", rope_theta: float | None = None) -> Node:
        """Write each row's k, v into the paged cache at (slot, position), then attend causally
        over the cache.

        The caches are states [pages, page_size, kv_dim]; block_table (u32 [slots, max_pages])
        lists each slot's pages, so token t of slot s lives at row t % page_size of page
        block_table[s, t // page_size] (engine/kv_cache.py). Row i attends to tokens
        0..positions[i] of slot slots[i]. All writes happen before reads, so one call serves a
        prefill (one slot, consecutive positions), a batched decode (one row per slot) and any
        mix of the two. `mode` is a promise about the rows that lets a backend pick a faster
        kernel without reading them: "prefill" (one slot, positions 0..rows-1), "extend" (the
        rows' slots[0] and positions, consecutive, continue a sequence whose earlier positions
        are cached; other rows may write the scratch slot and their outputs are unused),
        "decode" (each row its own slot) or "any". With `rope_theta`, q and k are rotated (rope) at their
        positions first: the fusion of rope into the cache write.
        """
        op = "cached_attention"
        head_dim = self._check_qkv(op, q, k, v, num_heads, num_kv_heads)
        rows = q.shape[0]
        self._need(k.shape[0] == rows, op, "q and k must have equal rows", q, k)
        self._need(k_cache.op == "state" and v_cache.op == "state" and k_cache.shape == v_cache.shape
                   and len(k_cache.shape) == 3 and k_cache.shape[2] == num_kv_heads * head_dim, op,
                   f"caches must be states [pages, page_size, {num_kv_heads * head_dim}]", k_cache, v_cache)
        self._need(block_table.dtype == "u32" and len(block_table.shape) == 2, op,
                   "block_table must be u32 [slots, max_pages]", block_table)
        self._need(slots.dtype == positions.dtype == "u32" and slots.shape == positions.shape == (rows,), op,
                   f"slots and positions must be u32 [{rows}]", slots, positions)
        self._need(mode in ("any", "prefill", "extend", "decode"), op,
                   f"mode must be any, prefill, extend or decode, got {mode!r}", q)
        return self._add(op, (q, k, v, k_cache, v_cache, block_table, slots, positions), q.shape,
                         num_heads=num_heads, num_kv_heads=num_kv_heads, mode=mode,
                         rope_theta=None if rope_theta is None else float(rope_theta))

    # ---- indexing and layout -------------------------------------------------------
    def embedding(self, ids: Node, table: Node) -> Node:
        """Rows of table [n, d] picked by ids [m] (u32): token embeddings, position embeddings,
        or the rows of a result that are wanted (e.g. the last position's hidden state)."""
        self._need(ids.dtype == "u32" and len(ids.shape) == 1 and table.dtype == "f32" and len(table.shape) == 2,
                   "embedding", "needs u32 ids [m] and an f32 table [n, d]", ids, table)
        return self._add("embedding", (ids, table), (ids.shape[0], table.shape[1]))

    def scatter_rows(self, base: Node, index: Node, src: Node) -> Node:
        """base with rows index[i] replaced by src[i]: merges image features into token embeddings."""
        self._need(index.dtype == "u32" and index.shape == (src.shape[0],) and len(base.shape) == 2
                   and src.shape[1:] == base.shape[1:], "scatter_rows",
                   "needs base [n, d], index u32 [m], src [m, d]", base, index, src)
        return self._add("scatter_rows", (base, index, src), base.shape)

    def reshape(self, x: Node, shape) -> Node:
        shape = tuple(int(d) for d in shape)
        self._need(_numel(shape) == _numel(x.shape), "reshape", f"cannot reshape to {list(shape)}", x)
        return self._add("reshape", (x,), shape, x.dtype)

    def concat(self, nodes: list[Node], axis: int = 0) -> Node:
        first = nodes[0]
        ax = axis % len(first.shape)
        for n in nodes:
            self._need(n.dtype == first.dtype and len(n.shape) == len(first.shape)
                       and all(a == b for i, (a, b) in enumerate(zip(n.shape, first.shape)) if i != ax),
                       "concat", f"shapes must agree except on axis {axis}", *nodes)
        shape = list(first.shape)
        shape[ax] = sum(n.shape[ax] for n in nodes)
        return self._add("concat", nodes, shape, first.dtype, axis=ax)

    def slice(self, x: Node, axis: int, start: int, stop: int) -> Node:
        ax = axis % len(x.shape)
        self._need(0 <= start < stop <= x.shape[ax], "slice", f"[{start}:{stop}] out of range on axis {axis}", x)
        shape = list(x.shape)
        shape[ax] = stop - start
        return self._add("slice", (x,), shape, x.dtype, axis=ax, start=int(start), stop=int(stop))

    def patchify(self, pixels: Node, patch: int) -> Node:
        """Images [n, C, H, W] -> patches [n * (H/p) * (W/p), C*p*p], each row ordered (c, ky, kx)
        like a Conv2d kernel [out, C, p, p], so the patch embedding is a plain matmul."""
        self._need(pixels.dtype == "f32" and len(pixels.shape) == 4 and pixels.shape[2] % patch == 0
                   and pixels.shape[3] % patch == 0, "patchify", f"needs f32 [n, C, H, W] with H, W divisible by "
                   f"{patch}", pixels)
        n, c, h, w = pixels.shape
        return self._add("patchify", (pixels,), (n * (h // patch) * (w // patch), c * patch * patch), patch=patch)

    def pixel_shuffle(self, x: Node, images: int, scale: int) -> Node:
        """Space-to-depth over each image's square patch grid, as SmolVLM's connector does:
        [images*side*side, d] -> [images*(side/scale)^2, d*scale^2]."""
        rows, dim = x.shape
        per_image = rows // images if images else 0
        side = int(round(per_image ** 0.5))
        self._need(images > 0 and rows % images == 0 and side * side == per_image and side % scale == 0,
                   "pixel_shuffle", f"rows must be {images} square grids with sides divisible by {scale}", x)
        out_rows = images * per_image // (scale * scale)
        return self._add("pixel_shuffle", (x,), (out_rows, dim * scale * scale), images=images, scale=scale)
