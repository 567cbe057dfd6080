"""attngen: an attention compiler.

Write an attention variant down as a spec (mask, score modification, normaliser, tiles,
recompute policy); :func:`compile` turns it into fused Triton kernels behind a
``torch.library`` operator with autograd, and :func:`reference` into a dense, exact check.

>>> import attngen
>>> op = attngen.compile("sliding_window", window=1024)      # doctest: +SKIP
>>> o = op(q, k, v)                                           # doctest: +SKIP
"""

from .compiler import build, compile
from .errors import (
    AttngenError,
    CodegenError,
    EnvError,
    IRVerifyError,
    ShapeError,
    SpecError,
    TuneError,
    UnsupportedError,
)
from .merge import merge_splits, merge_states
from .op import AttentionOp
from .reference import reference
from .schema import AttentionSpec, InputSpec, TileSpace, load_spec

__version__ = "0.1.0"

__all__ = [
    "AttentionOp",
    "AttentionSpec",
    "AttngenError",
    "CodegenError",
    "EnvError",
    "IRVerifyError",
    "InputSpec",
    "ShapeError",
    "SpecError",
    "TileSpace",
    "TuneError",
    "UnsupportedError",
    "build",
    "compile",
    "load_spec",
    "merge_splits",
    "merge_states",
    "reference",
]
