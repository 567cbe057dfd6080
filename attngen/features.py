"""Feature maps of linear attention, in plain PyTorch: the reference's definitions and the
random features of the performer map.

Linear attention replaces ``exp(q·k)`` by ``φ(q)·φ(k)`` for a feature map ``φ`` applied to
each row of q and k (Katharopoulos et al., 2020, "Transformers are RNNs"). The generated
kernels (``templates/linear.py.j2``) compute the same maps inside the kernels; the functions
here define them for the float64 reference and draw the performer's features on the host.

=========== ======================================= =================== =====================
kind        ``φ(x)`` for a row ``x`` of ``D_QK``    features ``F``      source
=========== ======================================= =================== =====================
identity    ``x``                                   ``D_QK``
elu1        ``elu(x) + 1``                          ``D_QK``            Katharopoulos et al., 2020
relu        ``max(x, 0)``                           ``D_QK``
taylor2     ``[1, √s x, (s/√2) x⊗x]``               ``1 + D + D²``      Based (Arora et al., 2024)
performer   ``exp(W √s x - s|x|²/2) / √m``          ``m``               FAVOR+ (Choromanski et al., 2021)
=========== ======================================= =================== =====================

``s`` is the spec's ``scale`` (``1/sqrt(D_QK)`` when null), so that ``φ(q)·φ(k)`` is
``1 + s q·k + (s q·k)²/2`` for taylor2 (the second-order Taylor expansion of
``exp(s q·k)``) and an unbiased estimate of ``exp(s q·k)`` for performer.
"""

from __future__ import annotations

import math

import torch

from .schema import AttentionSpec

#: taylor2 expands D_QK to 1 + D + D² features (1057 at 32); the kernels split them into blocks
#: over several programs, but beyond this head dim the feature count itself grows too large
TAYLOR2_MAX_DIM = 32
#: maps that work column by column: feature ``f`` of a row is a function of its column ``f`` alone
ELEMENTWISE_MAPS = ("identity", "elu1", "relu")


def feature_count(kind: str, d_qk: int, features: int | None = None) -> int:
    """The number of features ``F`` a map gives a row of ``d_qk`` values."""
    if kind == "taylor2":
        return 1 + d_qk + d_qk * d_qk
    if kind == "performer":
        return int(features)
    return d_qk


def feature_scale(spec: AttentionSpec, d_qk: int) -> float:
    """``s`` of taylor2 and performer: the spec's ``scale``, else ``1/sqrt(D_QK)``."""
    return spec.scale if spec.scale is not None else 1.0 / math.sqrt(d_qk)


def performer_features(m: int, d_qk: int, seed: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Positive orthogonal random features of FAVOR+ (Choromanski et al., 2021, "Rethinking
    Attention with Performers", section 2.4), drawn deterministically from ``seed``.

    Blocks of ``d_qk`` rows are orthonormalised (QR of a Gaussian matrix) and each row is then
    given the norm of an independent Gaussian vector, so every row is marginally
    ``N(0, I)`` while rows within a block are exactly orthogonal.

    Returns:
        ``W [m, d_qk]`` float32 on ``device``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    blocks = []
    for _ in range(-(-m // d_qk)):
        gauss = torch.randn(d_qk, d_qk, generator=gen, dtype=torch.float64)
        ortho, r = torch.linalg.qr(gauss)
        ortho = ortho * torch.sign(torch.diagonal(r))  # unique QR: a uniform orthogonal matrix
        blocks.append(ortho.T)
    rows = torch.cat(blocks)[:m]
    norms = torch.randn(m, d_qk, generator=gen, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (rows * norms).to(device=device, dtype=torch.float32)


def apply_feature_map(kind: str, x: torch.Tensor, *, scale: float = 1.0, w: torch.Tensor | None = None) -> torch.Tensor:
    """``φ(x)`` row by row, in x's dtype.

    Args:
        kind: a feature map of :data:`attngen.schema.FEATURE_MAPS`.
        x: ``[..., D_QK]``.
        scale: ``s`` of taylor2 and performer (ignored by the others).
        w: performer only: ``W [m, D_QK]`` from :func:`performer_features`.

    Returns:
        ``[..., F]`` with ``F`` from :func:`feature_count`; differentiable.
    """
    if kind == "identity":
        return x
    if kind == "relu":
        return torch.relu(x)
    if kind == "elu1":
        # exp(x) for x <= 0, not elu(x) + 1 = (exp(x) - 1) + 1, which cancels to 0 once exp(x)
        # drops below the dtype's epsilon (x < -6 in bfloat16, x < -37 in float64)
        return torch.where(x > 0, x + 1.0, torch.exp(torch.clamp(x, max=0.0)))
    if kind == "taylor2":
        root = math.sqrt(scale)
        outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) * (scale / math.sqrt(2.0))
        return torch.cat([torch.ones_like(x[..., :1]), root * x, outer], dim=-1)
    if kind == "performer":
        xs = x * math.sqrt(scale)
        u = xs @ w.to(x.dtype).T - 0.5 * (xs * xs).sum(-1, keepdim=True)
        return torch.exp(u) / math.sqrt(w.shape[0])
    raise ValueError(f"unknown feature map {kind!r}")
