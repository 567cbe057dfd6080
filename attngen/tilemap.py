"""The tile map of a spec at given lengths and tile sizes, from the same closed-form
classification the kernels evaluate: counts of EMPTY / PARTIAL / FULL tiles, the mask's
density, and a picture. Nothing here is O(T_Q * T_KV): work is per query tile (or per query
row for the density).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .args import position_offset
from .classify import evaluate_intervals
from .compiler import build
from .errors import UnsupportedError

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class TileCounts:
    """Tile counts over the whole ``[T_Q, T_KV]`` grid (one batch entry and head)."""

    q_tiles: int
    kv_tiles: int
    empty: int
    partial: int
    full: int
    visible_bounds: tuple[int, int]  # lower and upper bound on the number of visible pairs
    total_pairs: int

    @property
    def visible_pairs(self) -> int | None:
        """The exact number of visible pairs, or None where no closed form gives it."""
        lo, hi = self.visible_bounds
        return lo if lo == hi else None

    @property
    def density(self) -> float | None:
        return None if self.visible_pairs is None else self.visible_pairs / self.total_pairs


def _graph(spec: Any, params: dict):
    compiled = build(spec, **params)
    if compiled.spec.normalizer == "linear":
        raise UnsupportedError(
            f"spec {compiled.spec.name!r} is linear attention, which has no tiles of query-key pairs: its kernels run "
            "chunks of tiles.chunk positions with a carried state (docs/architecture.md, Linear attention)"
        )
    return compiled.spec, compiled.graph


def intervals(spec: Any, t_q: int, t_kv: int, block_q: int, block_kv: int, params: dict | None = None, *, var: str = "k"):
    """Per given tile, the loop intervals ``(s, fs, fe, e)`` the kernel visits.

    ``var="k"``: for each query tile, key-tile intervals (forward and dQ kernels);
    ``var="q"``: for each key tile, query-tile intervals (dK/dV kernel).

    Raises:
        UnsupportedError: the classification reads runtime inputs (it then depends on data).
    """
    spec, g = _graph(spec, params or {})
    return graph_intervals(spec, g, t_q, t_kv, block_q, block_kv, var=var)


def graph_intervals(spec, g, t_q: int, t_kv: int, block_q: int, block_kv: int, *, var: str = "k"):
    """:func:`intervals` from a spec and the graph :func:`attngen.build` made of it.

    Raises:
        UnsupportedError: the classification reads runtime inputs.
    """
    ranges = g.graph["tiles_k" if var == "k" else "tiles_q"]
    read = {d["symbol"].name: d["input"] for _, d in g.nodes(data=True) if d.get("op") == "load_input"}
    for conj in ranges.conjuncts:
        if any(n in read for n in conj.bound_symbols):
            used = ", ".join(sorted({read[n] for n in conj.bound_symbols if n in read}))
            raise UnsupportedError(
                f"the tile map of {spec.name!r} depends on runtime inputs ({used}): a bound of the visible "
                "keys reads them, so it has no closed form; to see the map for one value, write that input "
                "as a param (e.g. 'params: {n: 1000}' and 'k < n' for 'k < n[b]') and show that spec")
    off = position_offset(spec, t_q, t_kv)
    if var == "k":
        n_given, b_given, g_off, n_var, b_var, var_off = t_q, block_q, off, t_kv, block_kv, 0
    else:
        n_given, b_given, g_off, n_var, b_var, var_off = t_kv, block_kv, 0, t_q, block_q, off
    idx = torch.arange(0, n_given, b_given, dtype=torch.int64)
    env = {
        "g_first": idx + g_off,
        "g_last": torch.clamp(idx + b_given, max=n_given) - 1 + g_off,
        "given_full": idx + b_given <= n_given,
        "var_min": var_off,
        "var_max": var_off + n_var - 1,
        "T_Q": t_q,
        "T_KV": t_kv,
        "b": 0,
        "h": 0,
    }
    return evaluate_intervals(ranges, env, n_var=n_var, block_var=b_var, var_off=var_off)


def _count(ivs) -> tuple[int, int]:
    """Visited and FULL tiles over per-given-tile intervals ``(s, fs, fe, e)`` (with 1 x 1
    tiles: pairs that may be visible, and pairs that surely are)."""
    return sum(int((e - s).sum()) for s, fs, fe, e in ivs), sum(int((fe - fs).sum()) for s, fs, fe, e in ivs)


def tile_counts(spec: Any, t_q: int, t_kv: int, block_q: int = 128, block_kv: int = 128, params: dict | None = None) -> TileCounts:
    """Counts of EMPTY, PARTIAL and FULL (query tile, key tile) pairs, and the mask's density.

    The density is exact when every conjunct of the mask is an interval of keys (then the
    per-row key intervals are counted); otherwise ``visible_pairs`` is None and
    ``visible_bounds`` brackets it.
    """
    params = params or {}
    ivs = intervals(spec, t_q, t_kv, block_q, block_kv, params)
    q_tiles, kv_tiles = -(-t_q // block_q), -(-t_kv // block_kv)
    visited, full = _count(ivs)
    upper, lower = _count(intervals(spec, t_q, t_kv, 1, 1, params))  # per pair: may be / surely visible
    return TileCounts(
        q_tiles=q_tiles,
        kv_tiles=kv_tiles,
        empty=q_tiles * kv_tiles - visited,
        partial=visited - full,
        full=full,
        visible_bounds=(lower, upper),
        total_pairs=t_q * t_kv,
    )


def tile_map(spec: Any, t_q: int, t_kv: int, block_q: int, block_kv: int, params: dict | None = None) -> torch.Tensor:
    """The ``[q_tiles, kv_tiles]`` map of EMPTY (0), PARTIAL (1) and FULL (2) tiles, as the
    forward kernel classifies them (dense: for small grids and pictures)."""
    ivs = intervals(spec, t_q, t_kv, block_q, block_kv, params)
    q_tiles, kv_tiles = -(-t_q // block_q), -(-t_kv // block_kv)
    cols = torch.arange(kv_tiles).view(1, -1)
    out = torch.full((q_tiles, kv_tiles), EMPTY, dtype=torch.uint8)
    for s, fs, fe, e in ivs:
        inside = (cols >= s.view(-1, 1)) & (cols < e.view(-1, 1))
        full = (cols >= fs.view(-1, 1)) & (cols < fe.view(-1, 1))
        out[inside] = PARTIAL
        out[full] = FULL
    return out


def plot_tile_map(tmap: torch.Tensor, path: str, title: str) -> None:
    """Write a PNG picture of a tile map (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fig, ax = plt.subplots(figsize=(6, 6 * tmap.shape[0] / max(1, tmap.shape[1]) + 0.8))
    ax.imshow(tmap.numpy(), cmap=ListedColormap(["#f4f4f4", "#f2a33a", "#2d6db4"]), vmin=0, vmax=2, interpolation="nearest")
    ax.set_xlabel("key tile")
    ax.set_ylabel("query tile")
    ax.set_title(title, fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(color=c, label=lab) for c, lab in (("#f4f4f4", "EMPTY"), ("#f2a33a", "PARTIAL"), ("#2d6db4", "FULL"))],
        loc="upper right",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_zoo_page(docs: str | Path, t: int = 16384, block: int = 128) -> Path:
    """Write ``docs/zoo.md`` and a tile-map picture per zoo spec under ``docs/zoo/``."""
    from . import resources
    from .schema import load_spec

    docs = Path(docs)
    (docs / "zoo").mkdir(parents=True, exist_ok=True)
    lines = [
        "# Spec zoo",
        "",
        "<!-- generated by `python -m attngen zoo-docs --out docs`; do not edit -->",
        "",
        f"Every spec in `specs/` with its tile map at T = {t} and {block} x {block} tiles, as the",
        "forward kernel classifies it: EMPTY tiles are skipped, FULL tiles run without a mask,",
        "PARTIAL tiles are masked element-wise.",
        "",
    ]
    for path in sorted(resources.zoo_dir().glob("*.yaml")):
        spec = load_spec(path)
        lines += [f"## `{spec.name}`", "", " ".join(spec.description.split()), "", "```yaml", path.read_text().strip(), "```", ""]
        if spec.normalizer == "linear":
            lines += ["Linear attention has no tile map: its kernels run chunks of positions with a carried state.", ""]
            continue
        try:
            c = tile_counts(spec, t, t, block, block)
        except UnsupportedError:
            lines += ["Its mask reads runtime inputs, so its tile map depends on the data.", ""]
            continue
        picture = docs / "zoo" / f"{spec.name}.png"
        plot_tile_map(tile_map(spec, t, t, block, block), str(picture), f"{spec.name}, T={t}, tiles {block}x{block}")
        density = f"{c.density:.4f}" if c.density is not None else f"{c.visible_bounds[0] / c.total_pairs:.4f} to {c.visible_bounds[1] / c.total_pairs:.4f}"
        lines += [
            f"![tile map of {spec.name}](zoo/{spec.name}.png)",
            "",
            f"EMPTY {c.empty}, PARTIAL {c.partial}, FULL {c.full} of {c.q_tiles * c.kv_tiles} tiles; density {density}.",
            "",
        ]
    page = docs / "zoo.md"
    page.write_text("\n".join(lines))
    return page


def keeps_no_pair(spec, g, t: int = 4096) -> bool:
    """Whether the mask of a built spec keeps no (q, k) pair at ``T_Q = T_KV = t`` (a window
    of 0, contradictory conditions): every output row would be 0. False when it cannot tell
    (bounds that read runtime inputs, a mask that is not an interval of keys per row)."""
    if "mask" not in g:
        return False
    try:
        rows = graph_intervals(spec, g, t, t, 1, 1)
    except UnsupportedError:
        return False
    return _count(rows)[0] == 0


#: Mean key positions a query tile visits, at T = 16384, up to which a mask whose visited
#: keys grow linearly with T counts as a band for :func:`mask_class`.
BAND_KEYS = 2048


def mask_class(spec, g, plan) -> str:
    """How a built spec's mask shapes the kernels' key loops, for picking launch configs
    (:func:`attngen.tiles.default_config`).

    Returns:
        ``"data_dependent"`` when the forward needs per-call tile metadata (a mask that
        compares runtime inputs along positions, such as document ids); ``"dense"`` for a
        spec with no mask, or one whose every 64 x 64 tile is FULL at ``T = 16384``
        (``k >= 0``); ``"band"`` when the visited 64 x 64 tiles grow linearly with ``T`` (counted in closed form at
        ``T = 8192`` and ``16384``) and a query tile visits at most :data:`BAND_KEYS` keys on
        average at ``16384`` (sliding and dilated windows, chunks, sinks); ``"other"`` for
        the rest (causal, prefix-LM, and masks whose bounds read runtime inputs).
        The tiles are counted for batch entry 0 and head 0, and only the mean is compared: a
        mask that is a band on head 0 alone, or one that keeps a few long rows (``q < 128``),
        counts as a band. The class picks launch configs, tile loads (documents take pointer
        loads) and whether dQ is fused by default (:func:`attngen.tiles.fuses_dq`), so whether
        dQ repeats bit for bit; results agree within float rounding whatever it is.
    """
    if plan.fwd_ranges.meta is not None:
        return "data_dependent"
    if "mask" not in g:
        return "dense"
    tile, t = 64, 16384
    try:
        (half, _), (visited, full) = (_count(graph_intervals(spec, g, n, n, tile, tile)) for n in (t // 2, t))
    except UnsupportedError:
        return "other"
    if full == (t // tile) ** 2:  # a mask that keeps every pair (k >= 0): every tile FULL
        return "dense"
    # linear growth (about 2x from T/2 to T, where quadratic masks give about 4x), and short
    # loops: visited tiles x tile keys, over the query tiles, at most BAND_KEYS
    if half and visited < 3 * half and visited * tile <= BAND_KEYS * (t // tile):
        return "band"
    return "other"


#: Programs in launch order (:func:`query_tile_order`).
LAUNCH_ORDER = 0
#: Heads dealt out in groups, a group's programs tile by tile from its first tile.
FIRST_TILE_FIRST = 1
#: As :data:`FIRST_TILE_FIRST`, from its last tile.
LAST_TILE_FIRST = 2


def query_tile_order(spec, g, plan) -> int:
    """The order in which the ``attn_fwd`` and ``attn_bwd_dq`` programs of a built spec take
    their query tiles: :data:`LAUNCH_ORDER`, :data:`FIRST_TILE_FIRST` or
    :data:`LAST_TILE_FIRST` (the kernels' ``ORDER_Q``; the macro ``program_order`` in
    ``templates/macros.j2``).

    Longest processing time first: GPU blocks start roughly in launch order, so a grid whose
    last programs are its longest ends on a tail where a few multiprocessors work and the
    rest idle. The key tiles each query tile visits are counted in closed form at
    ``T = 16384`` with 64 x 64 tiles, whatever a call's lengths. When the last quarter of the
    query tiles visits more than 1.5 times what the first quarter does (causal, prefix-LM,
    causal windows of 4096 but not of 1024), the grid runs its last tile first; in the
    opposite case (``k >= q``), its first tile first. A reordered grid deals its heads out
    in groups of whole KV heads whose K and V fit in :attr:`AttentionOp.l2_budget
    <attngen.op.AttentionOp.l2_budget>`, so that the order holds over the whole grid rather
    than within each head. Otherwise, and for specs with no mask or whose tile bounds read
    runtime inputs (documents, ``k < n[b]``), launch order. Each program writes its own rows,
    so the order changes no result. Counted for batch entry 0 and head 0, as
    :func:`mask_class` is.

    Measured on the H200 (docs/perf-notes.md, "Longest programs first"; T = 16384, bf16):
    the D = 64 forward ran 6-10% faster (causal, prefix-LM, softcap, ALiBi), forward+backward
    at D = 64 1-3%. The warp-specialised forward keeps its own order (the last tile first
    within each head), and the dK/dV grid keeps launch order, which under a causal mask
    already starts each head's longest programs first: grouping its heads ran
    forward+backward 2-3.5% slower there at D = 64.
    """
    if plan.fwd_ranges.meta is not None or "mask" not in g:
        return LAUNCH_ORDER
    tile, t = 64, 16384
    try:
        ivs = graph_intervals(spec, g, t, t, tile, tile, var="k")
    except UnsupportedError:
        return LAUNCH_ORDER
    visits = sum((e - s).clamp(min=0) for s, _, _, e in ivs)
    quarter = max(len(visits) // 4, 1)
    early, late = int(visits[:quarter].sum()), int(visits[-quarter:].sum())
    if late > 1.5 * early:
        return LAST_TILE_FIRST
    if early > 1.5 * late:
        return FIRST_TILE_FIRST
    return LAUNCH_ORDER
