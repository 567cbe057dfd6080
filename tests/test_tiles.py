"""Tile classification: soundness against brute force, kernels with and without skipping,
and the closed-form counts of `show --tiles`."""

import os
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attngen
from attngen.check import make_inputs
from attngen.reference import mask_matrix
from attngen.tilemap import EMPTY, FULL, tile_counts, tile_map
from helpers import DEVICE, SMALL_PARAMS, dims, with_and_without_skipping
from attngen.strategies import masks


def brute_force(spec, t_q, t_kv, bq, bkv):
    """Per tile: any visible pair, and all pairs visible (bounds included)."""
    m = mask_matrix(spec, dims(T_Q=t_q, T_KV=t_kv))
    nq, nk = -(-t_q // bq), -(-t_kv // bkv)
    padded = torch.zeros(nq * bq, nk * bkv, dtype=torch.bool)
    valid = torch.zeros_like(padded)
    padded[:t_q, :t_kv] = m
    valid[:t_q, :t_kv] = True
    tiles = padded.view(nq, bq, nk, bkv)
    any_visible = tiles.any(dim=(1, 3))
    all_visible = (tiles | ~valid.view(nq, bq, nk, bkv)).all(dim=(1, 3)) & valid.view(nq, bq, nk, bkv).all(dim=(1, 3))
    return any_visible, all_visible


def assert_sound(spec, t_q, t_kv, bq, bkv):
    tmap = tile_map(spec, t_q, t_kv, bq, bkv)
    any_visible, all_visible = brute_force(spec, t_q, t_kv, bq, bkv)
    assert not (any_visible & (tmap == EMPTY)).any(), "a tile called EMPTY has a visible pair"
    assert not (~all_visible & (tmap == FULL)).any(), "a tile called FULL has a masked pair"
    # the dK/dV kernel's transposed classification, checked the same way
    from attngen.tilemap import intervals

    cols = torch.arange(-(-t_q // bq)).view(1, -1)
    visited_t = torch.zeros(-(-t_kv // bkv), -(-t_q // bq), dtype=torch.bool)
    for s, fs, fe, e in intervals(spec, t_q, t_kv, bq, bkv, var="q"):
        visited_t |= (cols >= s.view(-1, 1)) & (cols < e.view(-1, 1))
        full = (cols >= fs.view(-1, 1)) & (cols < fe.view(-1, 1))
        assert not (full & ~all_visible.T).any(), "a tile called FULL (dK/dV) has a masked pair"
    assert not (any_visible.T & ~visited_t).any(), "a skipped tile (dK/dV) has a visible pair"


@given(
    mask=masks(),
    t_q=st.integers(1, 90),
    t_kv=st.integers(1, 90),
    bq=st.sampled_from([1, 2, 4, 16]),
    bkv=st.sampled_from([1, 4, 8, 16]),
    align=st.sampled_from(["bottom_right", "top_left"]),
)
def test_classification_is_sound(mask, t_q, t_kv, bq, bkv, align):
    assert_sound({"name": "fuzz", "mask": mask, "align": align}, t_q, t_kv, bq, bkv)


def test_zoo_classification_is_sound():
    for name in ("causal", "sliding_window", "prefix_lm", "longformer", "strided", "dilated_window", "chunked", "streaming_sinks"):
        from attngen.schema import load_spec, with_params

        assert_sound(with_params(load_spec(name), SMALL_PARAMS.get(name, {})), 70, 90, 16, 8)


@given(
    mask=masks(),
    t_q=st.integers(1, 40),
    t_kv=st.integers(1, 40),
    seed=st.integers(0, 1000),
)
def test_skipping_does_not_change_results(mask, t_q, t_kv, seed):
    op = attngen.compile({"name": "skip", "mask": mask, "score": "2.0 * tanh(s / 2.0)"})
    gen = torch.Generator().manual_seed(seed)
    q, k, v, _ = make_inputs(op.spec, dims(H=2, H_KV=1, T_Q=t_q, T_KV=t_kv), dtype=torch.float32, device=DEVICE, generator=gen)
    do = torch.randn(1, 2, t_q, 16, generator=gen).to(DEVICE)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o, lse = op(*leaves, return_lse=True)
        return (o, lse, *torch.autograd.grad(o, leaves, do))

    with_skip, without = with_and_without_skipping(run)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), with_skip, without):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5, equal_nan=False), name


def test_counts_at_a_million_tokens_match_the_closed_form_fast():
    n, w, b = 1_048_576, 4096, 128
    start = time.perf_counter()
    c = tile_counts("sliding_window", n, n, b, b)
    assert time.perf_counter() - start < 10
    tiles = n // b
    first = w // b  # query tiles whose window starts at key 0
    assert c.partial == 2 * tiles - first
    assert c.full == sum(range(first)) + (tiles - first) * (w // b - 1)
    assert c.empty == tiles * tiles - c.partial - c.full
    assert c.visible_pairs == n * w - w * (w - 1) // 2


def test_show_tiles_cli(tmp_path):
    png = tmp_path / "map.png"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-m", "attngen", "show", "sliding_window", "--tiles", "--t-q", "1048576"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "16,352" in res.stdout and "253,456" in res.stdout and "0.003899" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "attngen", "show", "longformer", "--tiles", "--t-q", "2048", "--png", str(png)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert png.stat().st_size > 1000


def test_left_window_without_right_limit_scaled_down():
    # the H200 case below at a tenth of the size: keys far to the right stay visible
    from helpers import check_spec

    check_spec({"name": "left333", "params": {"w": 33}, "mask": "q - k < w"}, dims(B=1, H=4, H_KV=2, T_Q=30, T_KV=410, D_QK=16), torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_left_window_without_right_limit_on_gpu():
    from helpers import check_spec

    check_spec({"name": "left333", "params": {"w": 333}, "mask": "q - k < w"}, dims(B=1, H=8, H_KV=2, T_Q=300, T_KV=4096, D_QK=128), torch.float16)


def test_a_tile_map_whose_bounds_read_inputs_says_how_to_see_one():
    from attngen.errors import UnsupportedError
    from attngen.tilemap import tile_counts

    spec = {"name": "padded", "inputs": {"n": {"dtype": "int32", "shape": ["B"]}}, "mask": "k < n[b] and k <= q"}
    with pytest.raises(UnsupportedError, match=r"runtime inputs \(n\).*write that input as a param"):
        tile_counts(spec, 256, 256)
    # written as a param, the same mask has a closed form: 2 of 4 tiles visited, both PARTIAL at n = 100
    counts = tile_counts({"name": "padded_at", "params": {"n": 100}, "mask": "k < n and k <= q"}, 256, 256)
    assert (counts.empty, counts.partial, counts.full) == (2, 2, 0)
