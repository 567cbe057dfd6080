"""The command line: the main job on the CPU, and show."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import INTERPRETER_BROKEN

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, **extra_env):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | extra_env
    return subprocess.run([sys.executable, "-m", "attngen", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def run_main_job(device):
    """``run gemma2_local`` on ``device``; asserts it checked o, lse and the gradients and passed."""
    res = run_cli("run", "gemma2_local", "--device", device, "--shape", "1,2,1,40,50,16", "--param", "window=9", "--dtype", "fp32")
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("o ", "lse", "dq", "dk", "dv"):
        assert name in res.stdout
    assert res.stdout.strip().endswith("PASS")
    return res


@pytest.mark.skipif(INTERPRETER_BROKEN is not None, reason=str(INTERPRETER_BROKEN))
def test_run_main_job_on_cpu_passes():
    # the child starts without TRITON_INTERPRET: the CLI switches the interpreter on itself,
    # before anything imports Triton (also on a GPU host)
    res = run_main_job("cpu")
    assert "Triton interpreter" in res.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_run_main_job_on_gpu_passes():
    res = run_main_job("cuda")
    assert "Triton interpreter" not in res.stdout


def test_show_prints_spec_ir_and_kernel_path():
    res = run_cli("show", "softcap")
    assert res.returncode == 0, res.stderr
    assert "cap: 50.0" in res.stdout and "dscore" in res.stdout and "derivative" in res.stdout
    path = res.stdout.strip().splitlines()[-1].split()[-1]
    assert Path(path).is_file() and "def attn_fwd(" in Path(path).read_text()


def test_bad_spec_exits_2_with_the_field():
    res = run_cli("run", "causal", "--device", "cpu", "--param", "window=3")
    assert res.returncode == 2
    assert "params.window: unknown param" in res.stderr


def test_usage_errors_say_what_to_change():
    for args, message in (
        (("run", "causal", "--device", "cpu", "--doc-len", "4"), "has no integer runtime input"),
        (("run", "document", "--device", "cpu", "--doc-len", "0"), "at least 1 token"),
        (("show", "causal", "--png", "map.png"), "add --tiles"),
        # a bad spec or bound is a usage error before any fuzz worker starts
        (("fuzz", "missing.yaml", "--jobs", "2", "--device", "cpu"), "no such spec file"),
        (("fuzz", "--random", "--max-t", "0", "--device", "cpu"), "--max-t 0"),
        (("bench", "--suite", "linear", "--blocks", "64x16"), "may not be narrower"),
        (("bench", "--suite", "anchors", "--blocks", "64x64"), "only the linear suite"),
    ):
        res = run_cli(*args)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)


def test_a_bad_debug_switch_exits_2_naming_it_without_a_traceback():
    for name, value in (("ATTNGEN_DQ", "atomic"), ("ATTNGEN_DESCRIPTORS", "3"), ("ATTNGEN_STAGES", "9"), ("ATTNGEN_NO_SKIP", "yes"),
                        ("ATTNGEN_WS", "on"), ("ATTNGEN_STAGES", "³"), ("ATTNGEN_MIN_HEAD_BLOCK", "²")):  # fmt: skip
        res = run_cli("run", "causal", "--device", "cpu", **{name: value})
        assert res.returncode == 2, (name, res.stdout, res.stderr)
        assert res.stderr.startswith(f"error: {name}: '{value}'") and "Traceback" not in res.stderr, res.stderr


def test_every_command_checks_the_switches_before_it_starts():
    # show would otherwise ignore the bad value, and zoo and fuzz report it as a kernel failure per case
    for args in (("show", "causal"), ("zoo", "--shape", "1,1,1,16,16"), ("fuzz", "causal", "--examples", "2")):
        res = run_cli(*args, ATTNGEN_WS="bogus")
        assert res.returncode == 2 and res.stderr.startswith("error: ATTNGEN_WS: 'bogus'"), (args, res.stderr)


def test_warnings_print_as_one_plain_line():
    res = run_cli("run", "sliding_window", "--device", "cpu", "--param", "window=0")
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith("warning: spec 'sliding_window': mask") and "UserWarning" not in res.stderr, res.stderr


def test_show_lists_metadata_and_residue_order_kernels():
    doc = run_cli("show", "document").stdout
    assert "attn_tile_ranges_k" in doc and "attn_tile_ranges_q" in doc
    assert "attn_decode" in doc and "document_decode_" in doc  # the split-KV decoding kernel's own file
    strided = run_cli("show", "strided").stdout
    assert "attn_fwd_perm" in strided and "attn_bwd_dkdv_perm" in strided and "attn_bwd_dq_perm" in strided
    tiles = run_cli("show", "strided", "--tiles", "--t-q", "1024").stdout
    assert "runs in residue order" in tiles


def test_show_says_which_specs_take_the_warp_specialized_forward():
    causal = run_cli("show", "causal").stdout
    line = next(ln for ln in causal.splitlines() if ln.strip().startswith("attn_fwd_ws"))
    assert "def attn_fwd_ws(" in Path(line.split()[-1]).read_text() and "by default" in causal
    assert "only with ATTNGEN_WS=1" in run_cli("show", "document").stdout
    assert "attn_fwd_ws              not used (strided part)" in run_cli("show", "strided").stdout
    assert "not used (linear attention)" in run_cli("show", "linear_elu").stdout
    source = run_cli("show", "sliding_window", "--source").stdout
    assert "def attn_fwd(" in source and "def attn_fwd_ws(" in source


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_gpu_only_commands_say_so_instead_of_suggesting_a_missing_flag(capsys):
    from attngen.cli import main

    assert main(["bench", "--suite", "sparse"]) == 2
    assert "bench times kernels and needs a CUDA GPU; on the CPU use run, zoo or fuzz" in capsys.readouterr().err
    assert main(["tune", "causal", "--gpu-shapes", "1,2,2,64,16"]) == 2
    assert "tune times kernels and needs a CUDA GPU" in capsys.readouterr().err


def test_show_prints_the_bias_split():
    alibi = run_cli("show", "alibi").stdout
    assert "graph.bias_split = row (pos_a - q)*slopes[h], column (k - pos_a)*slopes[h], slope slopes[h]" in alibi
    assert "graph.bias_split" not in run_cli("show", "softcap").stdout


def test_show_prints_the_program_order():
    assert "  last query tile first, heads in groups" in run_cli("show", "causal").stdout
    assert "  launch order: no query tile" in run_cli("show", "dense").stdout

