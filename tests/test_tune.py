"""Autotuning and its cache, on the CPU with the timing function injected."""

import json
import multiprocessing
import warnings

import pytest
import torch

import attngen
from attngen import TuneError
from attngen.schema import TileSpace
from attngen.tiles import LaunchConfig, default_config
from attngen.tune import DeviceInfo, TuneCache, cache_key, candidates, estimate, shape_bucket, tune
from helpers import DEVICE, dims, needs_kernels

H200 = DeviceInfo("NVIDIA H200", "9.0", 227 * 1024, 132)


def test_pruning_drops_configs_over_the_shared_memory_and_register_budget():
    tiles = TileSpace(block_q=(64, 128, 256), block_kv=(64, 256), num_warps=(4, 8), num_stages=(2, 4))
    kept, pruned = candidates("fwd", tiles, 128, 128, torch.bfloat16, H200)
    assert kept and pruned
    for cfg in kept:
        smem, acc = estimate("fwd", cfg, 128, 128, torch.bfloat16)
        assert smem <= H200.shared_memory and acc <= 192
    reasons = " ".join(why for _, why in pruned)
    assert "shared memory" in reasons and "accumulators" in reasons
    # the defaults on an H200 are among the candidates the tuner tries
    space = TileSpace()
    for kernel in ("fwd", "dq", "dkdv", "dkdv_dq"):
        for cls in ("band", "data_dependent", "other"):
            # the fused kernel's D = 128 default (documents only) holds more accumulators than
            # the budget allows; the tuner adds a kernel's default to its candidates anyway
            for d in (64,) if kernel == "dkdv_dq" else (64, 128):
                default = default_config(kernel, d, torch.bfloat16, H200.shared_memory, cls)
                if all(x in getattr(space, f) for x, f in zip((default.block_q, default.block_kv, default.num_warps, default.num_stages),
                                                               ("block_q", "block_kv", "num_warps", "num_stages"))):
                    assert default in candidates(kernel, space, d, d, torch.bfloat16, H200)[0], (kernel, cls, d, default)
    # a smaller device keeps fewer
    small = DeviceInfo("small", "8.0", 100 * 1024, 1)
    assert len(candidates("fwd", tiles, 128, 128, torch.bfloat16, small)[0]) < len(kept)
    # head dim matters: float32 at D = 256 needs more shared memory than bf16 at D = 64
    assert estimate("dkdv", LaunchConfig(64, 64, 4, 2), 256, 256, torch.float32)[0] > estimate(
        "dkdv", LaunchConfig(64, 64, 4, 2), 64, 64, torch.bfloat16
    )[0]


def test_cache_keys_separate_what_must_be_separate():
    b1 = shape_bucket(dims(T_Q=3000, T_KV=3000, D_QK=128), torch.bfloat16)
    b2 = shape_bucket(dims(T_Q=4096, T_KV=2000, D_QK=128), torch.bfloat16)
    assert b1 == b2 and b1["T"] == 4096  # same power-of-two bucket
    base = cache_key("spec", "src", H200, "fwd", b1)
    assert base == cache_key("spec", "src", H200, "fwd", b2)
    assert base != cache_key("spec2", "src", H200, "fwd", b1)
    assert base != cache_key("spec", "src2", H200, "fwd", b1)
    assert base != cache_key("spec", "src", DeviceInfo("NVIDIA H100", "9.0", 227 * 1024, 132), "fwd", b1)
    assert base != cache_key("spec", "src", H200, "dq", b1)
    assert base != cache_key("spec", "src", H200, "fwd", shape_bucket(dims(T_Q=5000, T_KV=5000, D_QK=128), torch.bfloat16))
    assert base != cache_key("spec", "src", H200, "fwd", shape_bucket(dims(T_Q=3000, T_KV=3000, D_QK=128), torch.float16))
    assert base != cache_key("spec", "src", H200, "fwd", shape_bucket(dims(H=8, H_KV=2, T_Q=3000, T_KV=3000, D_QK=128), torch.bfloat16))


def test_writes_are_atomic(tmp_path, monkeypatch):
    cache = TuneCache(tmp_path)
    cache.put("k", LaunchConfig(64, 64, 4, 2))
    before = cache.path("k").read_text()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(OSError):
        cache.put("k", LaunchConfig(128, 32, 8, 3))
    assert cache.path("k").read_text() == before  # the old entry is intact
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []  # no debris


def _writer(root, i):
    cache = TuneCache(root)
    for j in range(40):
        cache.put("shared", LaunchConfig(64, 32 if (i + j) % 2 else 64, 4, 2), {"writer": i, "round": j})


def test_concurrent_writers_leave_a_valid_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), i)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads(TuneCache(tmp_path).path("shared").read_text())
    assert data["config"]["block_kv"] in (32, 64) and data["round"] == 39


def test_corrupt_or_foreign_file_is_ignored_with_a_warning_and_rewritten(tmp_path):
    cache = TuneCache(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    cache.path("k").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable tuning cache file"):
        assert cache.get("k") is None
    cache.path("k").write_text(json.dumps({"format": "something-else", "config": {}}))
    with pytest.warns(UserWarning):
        assert cache.get("k") is None
    cache.put("k", LaunchConfig(64, 64, 4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get("k") == LaunchConfig(64, 64, 4, 2)


def test_tune_picks_the_fastest_reports_failures_and_a_hit_never_retunes(tmp_path, monkeypatch):
    spec = {"name": "tunable", "mask": "k <= q", "tiles": {"block_q": [16, 32], "block_kv": [16, 32], "num_warps": [4], "num_stages": [1]}}
    op = attngen.compile(spec)
    cache = TuneCache(tmp_path)
    calls = []

    def timer(fn):
        cfg = op._configs[next(iter(k for k in op._configs))] if op._configs else None
        calls.append(cfg)
        fn()
        if cfg is not None and cfg.block_q == 32 and cfg.block_kv == 16:
            raise RuntimeError("out of resources")  # this one "fails to compile"
        return 1.0 if cfg == LaunchConfig(16, 32, 4, 1) else 2.0

    shape = dims(H=2, H_KV=1, T_Q=40, T_KV=40, D_QK=16)
    results = tune(op, shape, torch.float32, DEVICE, timer=timer, cache=cache, kernels=("fwd",), progress=False)
    (r,) = results
    assert r.best == LaunchConfig(16, 32, 4, 1) and r.best_ms == 1.0 and not r.cached
    assert [c for c, _ in r.failures] == [LaunchConfig(32, 16, 4, 1)]
    # the chosen config is used by later calls, and gives the right answer
    from helpers import check_spec

    check_spec(op.spec, shape)
    n = len(calls)
    # a hit never retunes, and runs nothing: not even the inputs are built
    monkeypatch.setattr(op, "forward_impl", lambda *a: pytest.fail("a cache hit ran the forward"))
    again = tune(op, shape, torch.float32, DEVICE, timer=timer, cache=cache, kernels=("fwd",), progress=False)
    assert again[0].cached and again[0].best == r.best and len(calls) == n


def test_all_configs_failing_raises_tune_error(tmp_path):
    spec = {"name": "untunable", "tiles": {"block_q": [16], "block_kv": [16], "num_warps": [4], "num_stages": [1]}}
    op = attngen.compile(spec)

    def broken(fn):
        raise RuntimeError("no kernel image")

    with pytest.raises(TuneError, match="every config of untunable:fwd failed.*no kernel image"):
        tune(op, dims(T_Q=8, T_KV=8, D_QK=16), torch.float32, DEVICE, timer=broken, cache=TuneCache(tmp_path), kernels=("fwd",), progress=False)


def test_default_config_is_used_without_a_cache_entry():
    op = attngen.compile("causal")
    d = dims(T_Q=10, T_KV=10, D_QK=16)
    assert op.config_for("fwd", d, torch.float32, torch.device("cpu")) == default_config("fwd", 16, torch.float32)


def test_gpu_calls_read_the_cache_and_fall_back_to_the_default(tmp_path, monkeypatch):
    # the CUDA branch of config_for, with the device query replaced (no GPU here)
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(DeviceInfo, "of", classmethod(lambda cls, device: H200))
    d = dims(T_Q=3000, T_KV=3000, D_QK=128)
    cuda = torch.device("cuda")
    op = attngen.compile("causal")
    # a Hopper-sized shared memory takes the deeper pipeline
    assert op.config_for("fwd", d, torch.bfloat16, cuda) == LaunchConfig(128, 64, 8, 3)
    tuned = LaunchConfig(64, 128, 8, 3)
    key = cache_key(op.plan.spec_digest, op.source_digest, H200, "fwd", shape_bucket(d, torch.bfloat16))
    TuneCache().put(key, tuned)
    fresh = attngen.compile("causal")
    assert fresh.config_for("fwd", d, torch.bfloat16, cuda) == tuned
    assert fresh.config_for("dq", d, torch.bfloat16, cuda) == LaunchConfig(128, 64, 8, 3)


def test_defaults_fit_the_shared_memory_of_smaller_cards():
    # three stages of 128 x 64 tiles at D = 128 need about 128 KiB of shared memory
    assert default_config("fwd", 128, torch.bfloat16, 99 * 1024) == LaunchConfig(128, 64, 8, 2)
    assert default_config("fwd", 128, torch.bfloat16, 227 * 1024) == LaunchConfig(128, 64, 8, 3)
    assert default_config("dq", 128, torch.bfloat16, 99 * 1024) == LaunchConfig(64, 32, 4, 2)
    # float32 halves the tiles and runs one stage whatever the card
    assert default_config("fwd", 128, torch.float32, 227 * 1024) == LaunchConfig(64, 32, 8, 1)


def test_defaults_follow_the_mask_class_only_with_large_shared_memory():
    h200, small = 227 * 1024, 99 * 1024
    bf16 = torch.bfloat16
    # short key loops (bands) take 64-row tiles at D = 128, 8 warps at D = 64
    assert default_config("fwd", 128, bf16, h200, "band") == LaunchConfig(64, 64, 4, 3)
    assert default_config("dkdv", 128, bf16, h200, "band") == LaunchConfig(64, 64, 4, 2)
    assert default_config("fwd", 64, bf16, h200, "band") == LaunchConfig(128, 64, 8, 3)
    assert default_config("fwd", 64, bf16, h200, "data_dependent") == LaunchConfig(64, 64, 4, 2)
    for cls in ("other", "dense", "data_dependent"):
        assert default_config("dkdv", 128, bf16, h200, cls) == LaunchConfig(64, 128, 8, 3)
        assert default_config("fwd", 128, bf16, h200, cls) == LaunchConfig(128, 64, 8, 3)
    # smaller cards and float32 keep one config whatever the mask
    for cls in ("band", "data_dependent", "dense", "other"):
        assert default_config("fwd", 128, bf16, small, cls) == LaunchConfig(128, 64, 8, 2)
        assert default_config("dkdv", 128, bf16, small, cls) == LaunchConfig(32, 64, 4, 2)
        assert default_config("fwd", 64, bf16, small, cls) == LaunchConfig(128, 64, 4, 3)
        assert default_config("dkdv", 128, torch.float32, h200, cls) == LaunchConfig(16, 32, 4, 1)
    with pytest.raises(ValueError, match="unknown mask class 'banded'"):
        default_config("fwd", 128, bf16, h200, "banded")


@pytest.mark.parametrize(
    ("spec", "params", "expected"),
    [
        ("sliding_window", {"window": 1024}, "band"),
        ("sliding_window", {"window": 4096}, "other"),  # 64 key tiles per query tile: a long loop
        ("dilated_window", {}, "band"),
        ("streaming_sinks", {}, "band"),
        ("longformer", {}, "band"),
        ("document", {}, "data_dependent"),
        ("causal", {}, "other"),
        ("prefix_lm", {}, "other"),
        ("dense", {}, "dense"),
        ("chunked", {"chunk": 8192}, "other"),
        ("chunked", {"chunk": 512}, "band"),
    ],
)
def test_mask_class_of_zoo_specs(spec, params, expected):
    assert attngen.compile(spec, **params).mask_class == expected


def test_json_that_is_not_an_entry_and_illegal_configs_are_ignored(tmp_path):
    cache = TuneCache(tmp_path)
    for text in ("[]", "null", '"x"'):
        cache.path("k").write_text(text)
        with pytest.warns(UserWarning):
            assert cache.get("k") is None
    cache.put("k", LaunchConfig(64, 64, 4, 2))
    data = json.loads(cache.path("k").read_text())
    data["config"] = {"block_q": "big", "block_kv": -3, "num_warps": 0, "num_stages": None}
    cache.path("k").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="not a legal tile config"):
        assert cache.get("k") is None


def test_a_nan_time_counts_as_a_failure_not_a_winner(tmp_path):
    spec = {"name": "nantime", "tiles": {"block_q": [16, 32], "block_kv": [16], "num_warps": [4], "num_stages": [1]}}
    op = attngen.compile(spec)
    times = iter([float("nan"), 2.0, 3.0])
    results = tune(op, dims(T_Q=8, T_KV=8, D_QK=16), torch.float32, DEVICE, timer=lambda fn: next(times),
                   cache=TuneCache(tmp_path), kernels=("fwd",), progress=False)  # fmt: skip
    assert results[0].best_ms == 2.0 and "nan" in results[0].failures[0][1]


def test_tune_draws_documents_of_the_requested_length(tmp_path, monkeypatch):
    import attngen.check

    seen = []
    real = attngen.check.make_inputs

    def spy(*args, **kwargs):
        q, k, v, inputs = real(*args, **kwargs)
        seen.append(inputs["doc"])
        return q, k, v, inputs

    monkeypatch.setattr(attngen.check, "make_inputs", spy)
    op = attngen.compile({"name": "doc_tune", "inputs": {"doc": {"dtype": "int32", "shape": ["B", "T_KV"]}},
                          "mask": "doc[b, q] == doc[b, k]", "tiles": {"block_q": [16], "block_kv": [16], "num_warps": [4], "num_stages": [1]}})
    tune(op, dims(T_Q=40, T_KV=40, D_QK=16), torch.float32, DEVICE, timer=lambda fn: 1.0, cache=TuneCache(tmp_path),
         kernels=("fwd",), progress=False, doc_len=10)  # fmt: skip
    assert seen[0][0].tolist() == [i // 10 for i in range(40)]


def test_the_dq_kernel_is_tuned_only_where_it_runs(tmp_path, monkeypatch):
    op = attngen.compile({"name": "dq_tune", "mask": "k <= q", "tiles": {"block_q": [16], "block_kv": [16, 32], "num_warps": [4], "num_stages": [1]}})
    shape = dims(T_Q=8, T_KV=8, D_QK=16)
    calls = []

    def timer(fn):
        calls.append(fn)
        return float(len(calls))

    monkeypatch.delenv("ATTNGEN_DQ", raising=False)  # D = 16: dQ is fused into the dK/dV kernel
    assert tune(op, shape, torch.float32, DEVICE, timer=timer, cache=TuneCache(tmp_path), kernels=("dq",), progress=False) == []
    assert calls == []
    monkeypatch.setenv("ATTNGEN_DQ", "0")
    results = tune(op, shape, torch.float32, DEVICE, timer=timer, cache=TuneCache(tmp_path), kernels=("dq",), progress=False)
    assert [r.kernel for r in results] == ["dq"] and len(calls) == 3  # two candidates and the default config


@needs_kernels
def test_a_spec_that_stores_p_is_tuned_on_the_kernels_that_write_and_read_p(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTNGEN_DQ", raising=False)  # D = 16 would fuse dQ, but stored P takes the dQ kernel
    op = attngen.compile({"name": "p_tune", "mask": "k <= q", "recompute": "store_p", "store_p_limit": 64,
                          "tiles": {"block_q": [16], "block_kv": [16], "num_warps": [4], "num_stages": [1]}})
    launched = []
    real = op.kernel
    monkeypatch.setattr(op, "kernel", lambda name, device: launched.append(name) or real(name, device))

    def timer(fn):
        launched.clear()
        fn()
        return 1.0

    results = tune(op, dims(T_Q=8, T_KV=8, D_QK=16), torch.float32, DEVICE, timer=timer, cache=TuneCache(tmp_path / "p"),
                   kernels=("fwd", "dq"), progress=False)  # fmt: skip
    assert [r.kernel for r in results] == ["fwd", "dq"]
    stored = op.plan.stored
    assert stored.dq.name in launched and stored.fwd.name not in launched  # the last timed run: the backward reading P
    # past store_p_limit the same spec tunes the recomputing kernels
    long = dims(T_Q=8, T_KV=9, D_QK=16)  # 72 pairs per head > store_p_limit
    tune(op, long, torch.float32, DEVICE, timer=timer, cache=TuneCache(tmp_path / "r"), kernels=("fwd",), progress=False)
    assert op.parts[0].fwd.name in launched and stored.fwd.name not in launched


def test_a_fused_dq_share_counts_against_the_dkdv_register_budget():
    cfg = LaunchConfig(64, 128, 8, 2)
    plain, fused = (estimate(kernel, cfg, 128, 128, torch.bfloat16)[1] for kernel in ("dkdv", "dkdv_dq"))
    assert fused - plain == 64 * 128 / 256  # one float32 [BLOCK_Q, D_QK] tile over 256 threads


def test_the_fused_backward_tunes_and_looks_up_its_own_dkdv_config(tmp_path, monkeypatch):
    # a config tuned for the fused kernel (more registers per program) is not the dQ-kernel
    # path's, which deterministic runs, stored P and learnable inputs take
    monkeypatch.delenv("ATTNGEN_DQ", raising=False)
    op = attngen.compile({"name": "dkdv_tune", "mask": "k <= q", "tiles": {"block_q": [16], "block_kv": [16, 32], "num_warps": [4], "num_stages": [1]}})
    shape = dims(T_Q=8, T_KV=8, D_QK=16)
    times = iter([3.0, 1.0, 2.0])
    results = tune(op, shape, torch.float32, DEVICE, timer=lambda fn: next(times), cache=TuneCache(tmp_path),
                   kernels=("dkdv",), progress=False)  # fmt: skip
    assert [r.kernel for r in results] == ["dkdv_dq"] and results[0].best == LaunchConfig(16, 32, 4, 1)
    dev = torch.device(DEVICE)
    assert op.config_for("dkdv_dq", shape, torch.float32, dev) == LaunchConfig(16, 32, 4, 1)
    assert op.config_for("dkdv", shape, torch.float32, dev) == default_config("dkdv", 16, torch.float32)


def test_the_dkdv_default_at_small_head_dims_depends_on_the_fused_dq():
    big = H200.shared_memory
    assert default_config("dkdv_dq", 64, torch.bfloat16, big) == LaunchConfig(64, 64, 4, 2)
    assert default_config("dkdv", 64, torch.bfloat16, big) == LaunchConfig(32, 128, 4, 3)
    for cls in ("band", "data_dependent", "other"):  # above 64 the two kernels share their defaults
        assert default_config("dkdv_dq", 128, torch.bfloat16, big, cls) == default_config("dkdv", 128, torch.bfloat16, big, cls)
