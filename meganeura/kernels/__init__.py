"""Triton kernels for the torch backend on CUDA, one a file, each tested against the numpy
reference (on CPU through Triton's interpreter, TRITON_INTERPRET=1).

Each file holds the `@triton.jit` kernel and a small launcher taking torch tensors. The
numerics copy transformers' bf16 rounding points (see docs/design.md) so that the bf16 path
stays close to the reference model, not just to the fp32 math.
"""
