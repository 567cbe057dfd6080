"""Shared test helpers: run a spec on random inputs and assert the three-way rule."""

from __future__ import annotations

import pytest
import torch

import attngen
from attngen import config
from attngen.check import compare, format_rows, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: skip a test that runs kernels on a CPU-only machine without Triton's interpreter
needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not config.interpret_all(),
                                   reason="CPU tensors run kernels only under TRITON_INTERPRET=1")


def _interpreter_broken() -> str | None:
    """Why Triton's interpreter cannot run attngen's kernels in this environment, or None.

    Triton 3.6's interpreter turns a runtime loop bound into a Python int with ``int()`` of a
    one-element array, which numpy 2.4 refuses ("only 0-dimensional arrays can be converted
    to Python scalars"); pyproject's ``test`` and ``interpreter`` extras pin ``numpy<2.4``.
    """
    import numpy

    major, minor = (int(part) for part in numpy.__version__.split(".")[:2])
    if (major, minor) >= (2, 4):
        return (f"numpy {numpy.__version__} breaks Triton 3.6's interpreter on runtime loop bounds; "
                "install numpy<2.4 (the test extra pins it) to run CPU kernels")
    return None


#: why the interpreter cannot run here (None: it can); for tests that start an interpreter
#: process on a GPU host, where the rest of the suite does not need the interpreter
INTERPRETER_BROKEN = _interpreter_broken()

#: zoo params scaled down so that every pattern shows at the tiny shapes of CPU tests
SMALL_PARAMS = {
    "sliding_window": {"window": 13},
    "prefix_lm": {"prefix": 11},
    "gemma2_local": {"window": 13, "cap": 2.0},
    "softcap": {"cap": 2.0},
    "longformer": {"window": 5, "globals": 3},
    "strided": {"stride": 6},
    "dilated_window": {"window": 6, "dilation": 3},
    "chunked": {"chunk": 16},
    "streaming_sinks": {"sinks": 2, "window": 9},
}


def dims(B=1, H=2, H_KV=1, T_Q=40, T_KV=40, D_QK=16, D_V=None):
    return {"B": B, "H": H, "H_KV": H_KV, "T_Q": T_Q, "T_KV": T_KV, "D_QK": D_QK, "D_V": D_V or D_QK}


def check_spec(spec, shape, dtype=torch.float32, *, params=None, seed=0, layout=None, backward=True):
    """Compile ``spec``, run it on random inputs of ``shape``, assert the three-way rule.

    ``layout`` rewrites (q, k, v) before the call, e.g. to make them non-contiguous.
    """
    op = attngen.compile(spec, **(params or {}))
    gen = torch.Generator().manual_seed(seed)
    q, k, v, inputs = make_inputs(op.spec, shape, dtype=dtype, device=DEVICE, generator=gen)
    if layout is not None:
        q, k, v = layout(q, k, v)
    rows = compare(op, attngen.reference(op.spec), q, k, v, inputs, backward=backward, generator=gen)
    assert all(r.ok for r in rows), f"{op.spec.name} {shape} {dtype}\n{format_rows(rows)}"
    return rows


def non_contiguous(q, k, v):
    """q from a [B, T, H, D] buffer, k broadcast over batch with stride 0, v transposed storage."""
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k = k[:1].expand(k.shape[0], -1, -1, -1)
    v = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    return q, k, v


def with_and_without_skipping(run):
    """``run()`` with tile skipping, then with ``ATTNGEN_NO_SKIP=1``; both results."""
    import os

    with_skip = run()
    os.environ["ATTNGEN_NO_SKIP"] = "1"
    try:
        without = run()
    finally:
        del os.environ["ATTNGEN_NO_SKIP"]
    return with_skip, without
