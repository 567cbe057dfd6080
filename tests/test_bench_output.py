"""The benchmark harness's outputs (JSON, Markdown, plots) from a result, without a GPU."""

import json

import pytest
import torch
from helpers import DEVICE

from attngen.bench import markdown, write_outputs

RESULT = {
    "meta": {"card": "NVIDIA H200", "driver": "580", "torch": "2.11.0", "triton": "3.6.0", "attngen": "0.1.0",
             "python": "3.12", "command": "python -m attngen bench --suite sparse", "dtype": "bfloat16", "timing": "median"},
    "rows": [
        {"system": "attngen", "variant": "causal", "D": 128, "T": 4096, "mode": "fwd", "ms": 1.0, "tflops": 400.0, "status": "ok", "density": 0.5},
        {"system": "attngen", "variant": "causal", "D": 128, "T": 4096, "mode": "fwd+bwd", "ms": 3.0, "tflops": 350.0, "status": "ok", "density": 0.5},
        {"system": "flex", "variant": "causal", "D": 128, "T": 4096, "mode": "fwd", "ms": 1.2, "tflops": 333.3, "status": "ok", "density": 0.5},
        {"system": "flex", "variant": "causal", "D": 128, "T": 4096, "mode": "fwd+bwd", "ms": 3.3, "tflops": 318.2, "status": "ok", "density": 0.5},
        {"system": "attngen", "variant": "causal", "D": 128, "T": 4096, "mode": "compile", "ms": None, "tflops": None, "status": "ok",
         "cold_compile_s": 2.5, "warm_compile_ms": 20.0},
        {"system": "attngen", "variant": "softcap", "D": 64, "T": 4096, "mode": "fwd", "ms": None, "tflops": None, "status": "WRONG: max |attngen - baseline| = 1"},
    ],
}  # fmt: skip


def test_markdown_has_the_card_the_command_and_per_row_ratios():
    text = markdown(RESULT)
    assert "NVIDIA H200" in text and "python -m attngen bench --suite sparse" in text
    assert "| causal | 128 | 4096 | 0.5 | 400.0 / 350.0 | 333.3 / 318.2 | 1.20 / 1.10 | 2.5 s / 20.0 ms |" in text
    assert "WRONG" in text  # a wrong result is reported, never timed


def test_a_ratio_just_below_one_is_not_rounded_up_to_one():
    # 340.4 against 341.1 TFLOP/s is a miss of a >= 1.0 target: 0.998, not 1.00
    rows = [dict(r) for r in RESULT["rows"][:4]]
    rows[3]["ms"] = rows[1]["ms"] * 0.998
    text = markdown({"meta": RESULT["meta"], "rows": rows})
    assert "| 1.20 / 0.998 |" in text
    rows[3]["ms"] = rows[1]["ms"] * 0.99
    assert "| 1.20 / 0.99 |" in markdown({"meta": RESULT["meta"], "rows": rows})


def test_write_outputs_makes_json_markdown_and_a_plot_per_head_dim(tmp_path):
    paths = write_outputs(RESULT, tmp_path, "suite")
    names = sorted(p.name for p in paths)
    assert names == ["suite-d128.png", "suite-d64.png", "suite.json", "suite.md"]
    assert json.loads((tmp_path / "suite.json").read_text()) == RESULT
    assert (tmp_path / "suite-d128.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_anchor_cases_are_the_anchors_table_and_shards_split_them_once():
    from attngen.bench import _cases

    cases = list(_cases("anchors"))
    assert len(cases) == 7 * 2 * 2 == len(set(cases))
    assert ("document", 128, 16384, 1, 16) in cases and ("softcap", 64, 4096, 4, 32) in cases  # 16,384 tokens, H = 2048 / D
    shards = [[c for i, c in enumerate(cases) if i % 3 == s] for s in range(3)]
    assert sorted(sum(shards, [])) == sorted(cases)


def test_warm_jobs_workers_get_the_same_selection_and_one_shard_each():
    import sys

    from attngen.cli import _warm_commands, build_parser

    args = build_parser().parse_args(["bench", "--suite", "anchors", "--warm-jobs", "3", "--dims", "64", "--variants", "causal", "document"])
    cmds = _warm_commands(args)
    assert len(cmds) == 3
    for i, cmd in enumerate(cmds):
        assert cmd[:6] == [sys.executable, "-m", "attngen", "bench", "--suite", "anchors"]
        assert cmd[6:8] == ["--warm-shard", f"{i}/3"]
        assert cmd[8:] == ["--variants", "causal", "document", "--dims", "64"]
    # a worker's own command line parses back to the same selection
    again = build_parser().parse_args(cmds[1][3:])
    assert again.warm_shard == "1/3" and again.variants == ["causal", "document"] and again.dims == [64]


def test_markdown_names_the_suite_cases_a_stopped_run_did_not_measure():
    text = markdown(RESULT)  # the sparse suite: 5 variants at D=128, T=16384; RESULT has none of them
    line = next(x for x in text.splitlines() if x.startswith("Not measured"))
    assert line.startswith("Not measured in this run (5 of the suite's cases")
    for variant in ("causal", "sliding_window", "document", "prefix_lm", "strided"):
        assert f"{variant} D=128 T=16384" in line
    assert "causal D=128 T=4096" not in line  # measured, and not a case of the suite anyway
    done = {**RESULT, "rows": RESULT["rows"] + [
        {"system": "attngen", "variant": v, "D": 128, "T": 16384, "mode": "compile", "ms": None, "tflops": None, "status": "ok",
         "cold_compile_s": 1.0, "warm_compile_ms": 1.0} for v in ("causal", "sliding_window", "document", "prefix_lm", "strided")]}
    assert "Not measured" not in markdown(done)
    # a run that asked for D=128 only does not count the D=64 cases as missed
    sigmoid = {"meta": {**RESULT["meta"], "suite": "sigmoid", "selection": {"variants": None, "dims": [128], "seqs": None}},
               "rows": []}
    line = next(x for x in markdown(sigmoid).splitlines() if x.startswith("Not measured"))
    assert "D=128" in line and "D=64" not in line


def test_decode_suite_builds_a_paged_cache_equal_to_the_contiguous_one():
    # the H200 decode benchmark's layout code (shuffled pages behind a block table), run tiny
    # on this device without timing: paged and contiguous decoding must agree
    from attngen.bench import decode_markdown, decode_suite
    from helpers import DEVICE

    result = decode_suite(b=2, h=4, h_kv=2, d=16, t_kv=64, t_q=1, block_size=16, device=DEVICE, with_flex=False, timing=False)
    rows = {r["system"]: r for r in result["rows"]}
    assert rows["flex"]["status"].startswith("unavailable")
    assert rows["attngen-contiguous"]["status"] == "ok" and rows["attngen-paged"]["status"] == "ok"
    assert rows["attngen-paged"]["max_err_vs_first"] < 1e-2  # bf16 outputs of the same cache
    assert "attngen-paged" in decode_markdown(result)


def test_a_variant_flex_cannot_express_is_checked_on_its_last_rows_against_the_reference():
    import attngen
    from attngen.bench import VARIANTS, _reference_rows_error

    assert not VARIANTS["sigmoid"].flex
    op = attngen.compile(VARIANTS["sigmoid"].spec)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 150, 16, generator=gen).to(DEVICE) for _ in range(3))
    out = op(q, k, v).float()
    assert _reference_rows_error(op, out, q, k, v, {}) < 1e-5
    out[:, :, -1, 0] += 1.0  # an error in the last row is seen
    assert _reference_rows_error(op, out, q, k, v, {}) > 0.99


def test_markdown_compares_sigmoid_with_softmax_causal():
    from attngen.bench import markdown

    meta = {"card": "H200", "driver": "1", "torch": "2", "triton": "3", "attngen": "0", "dtype": "bfloat16",
            "command": "python -m attngen bench --suite sigmoid", "timing": "median", "suite": "sigmoid"}
    rows = [{"system": "attngen", "variant": v, "D": 128, "T": 16384, "mode": m, "ms": 1.0, "tflops": f, "status": "ok", "density": 0.5}
            for v, m, f in (("causal", "fwd", 400.0), ("causal", "fwd+bwd", 300.0), ("sigmoid", "fwd", 360.0), ("sigmoid", "fwd+bwd", 330.0))]
    text = markdown({"meta": meta, "rows": rows})
    assert "D=128, T=16384): forward 0.90×, forward+backward 1.10×" in text


def test_timing_keeps_the_garbage_collector_out_of_the_timed_loop(monkeypatch):
    # A full collection of the objects a FlexAttention compile leaves behind stalled the host
    # inside do_bench; bench() collects first, times with the collector off, and restores it.
    import gc

    import triton.testing

    from attngen.timing import bench

    seen = []

    def fake_do_bench(fn, **kwargs):
        seen.append((gc.isenabled(), kwargs["grad_to_none"]))
        return 1.25

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    assert gc.isenabled()
    assert bench(lambda: None, grads=["g"]) == 1.25
    assert seen == [(False, ["g"])] and gc.isenabled()

    def failing(fn, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(triton.testing, "do_bench", failing)
    with pytest.raises(RuntimeError):
        bench(lambda: None)
    assert gc.isenabled()


def test_anchors_case_counts_only_the_kept_pairs():
    from attngen.bench import anchors_case

    op, q, k, v, do, inputs, flops = anchors_case("causal", 1, 2, 64, 16, "cpu")
    assert op.spec.name == "causal" and q.shape == do.shape == (1, 2, 64, 16) and q.dtype == torch.bfloat16
    assert inputs == {}
    assert flops == 4.0 * 2 * (64 * 65 // 2) * 16  # 2080 of the 4096 pairs: k <= q
