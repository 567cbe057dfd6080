"""Hypothesis: random masks and score modifications against the reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attngen.strategies import masks, scores
from helpers import INTERPRETER_BROKEN, check_spec, dims

SCORES = scores()


@given(
    mask=masks(),
    score=SCORES,
    t_q=st.integers(1, 40),
    t_kv=st.integers(1, 40),
    group=st.sampled_from([(1, 1), (2, 1), (3, 3), (6, 2)]),
    d=st.sampled_from([(8, 8), (5, 12), (16, 3)]),
    align=st.sampled_from(["bottom_right", "top_left"]),
    seed=st.integers(0, 2**16),
)
def test_random_specs_match_reference(mask, score, t_q, t_kv, group, d, align, seed):
    spec = {"name": "fuzz", "mask": mask, "align": align}
    if score:
        spec["score"] = score
    h, h_kv = group
    check_spec(spec, dims(B=1, H=h, H_KV=h_kv, T_Q=t_q, T_KV=t_kv, D_QK=d[0], D_V=d[1]), torch.float32, seed=seed)


def test_fuzz_cli_passes_and_reports_a_failure_with_a_replayable_reproduction(tmp_path, monkeypatch, capsys):
    import attngen.check
    from attngen.cli import main

    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    assert main(["fuzz", "causal", "--examples", "3", "--seed", "1", "--max-t", "20"]) == 0
    assert "3 examples passed" in capsys.readouterr().out
    # a tolerance no kernel can meet: the run must fail, shrink and leave a reproduction
    monkeypatch.setattr(attngen.check, "FACTOR", 0.0)
    monkeypatch.setattr(attngen.check, "FLOOR", {k: 0.0 for k in attngen.check.FLOOR})
    assert main(["fuzz", "--random", "--examples", "2", "--seed", "3", "--max-t", "6"]) == 1
    out = capsys.readouterr().out
    repro = next(tmp_path.glob("fuzz/repro-*.yaml"))
    assert f"--replay {repro}" in out
    assert main(["fuzz", "--replay", str(repro)]) == 1
    monkeypatch.undo()
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    assert main(["fuzz", "--replay", str(repro)]) == 0  # with the real tolerance it passes


def test_fuzz_jobs_split_the_examples_and_seed_each_worker_apart():
    from attngen.cli import _fuzz_commands, build_parser

    args = build_parser().parse_args(["fuzz", "--random", "--examples", "7", "--jobs", "3", "--seed", "10", "--dtype", "bf16", "--max-t", "50"])
    cmds = _fuzz_commands(args, "cuda")
    shares = [int(c[c.index("--examples") + 1]) for c in cmds]
    seeds = [int(c[c.index("--seed") + 1]) for c in cmds]
    assert shares == [3, 2, 2] and seeds == [10, 11, 12]
    assert all("--worker" in c and "--random" in c and c[c.index("--dtype") + 1] == "bf16" for c in cmds)
    # fewer examples than jobs: no worker is started with nothing to do
    args = build_parser().parse_args(["fuzz", "causal", "--examples", "2", "--jobs", "4"])
    assert [c[4] for c in _fuzz_commands(args, "cpu")] == ["causal", "causal"]


def test_fuzz_workers_take_the_visible_gpus_in_turn(monkeypatch):
    from attngen.cli import _worker_envs

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in _worker_envs("cuda", 5)] == ["2", "5", "2", "5", "2"]
    cpu = _worker_envs("cpu", 2)
    assert all(e["TRITON_INTERPRET"] == "1" and e["CUDA_VISIBLE_DEVICES"] == "2,5" for e in cpu)


@pytest.mark.parametrize(
    "device",
    [pytest.param("cpu", marks=pytest.mark.skipif(INTERPRETER_BROKEN is not None, reason=str(INTERPRETER_BROKEN))),
     pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])],
)  # fmt: skip
def test_fuzz_jobs_runs_the_workers_and_adds_up_their_examples(device, tmp_path, monkeypatch, capsys):
    # in this process Triton is already imported (without the interpreter on a GPU host):
    # the CPU workers must still interpret, so the parent starts them with TRITON_INTERPRET=1
    from attngen.cli import main

    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    assert main(["fuzz", "causal", "--examples", "3", "--jobs", "2", "--max-t", "12", "--device", device]) == 0
    assert "3 examples passed" in capsys.readouterr().out
    assert main(["fuzz", "causal", "--examples", "2", "--jobs", "0"]) == 2


def test_fuzz_jobs_start_cpu_workers_under_the_interpreter(monkeypatch, capsys):
    # the parent of --jobs may have imported Triton without the interpreter (a GPU host, or
    # here with TRITON_INTERPRET unset): its CPU workers get TRITON_INTERPRET=1 all the same
    import subprocess

    from attngen.cli import WORKER_TICK, main

    started = []

    class Worker:  # a worker that passes its share of examples at once
        def __init__(self, cmd, env=None, **kwargs):
            started.append((cmd, env))
            n = int(cmd[cmd.index("--examples") + 1])
            self.stdout = iter([WORKER_TICK + "\n"] * n + [f"{n} examples passed\n"])

        def wait(self):
            return 0

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(subprocess, "Popen", Worker)
    assert main(["fuzz", "causal", "--examples", "3", "--jobs", "2", "--device", "cpu"]) == 0
    assert "3 examples passed" in capsys.readouterr().out
    assert len(started) == 2
    for cmd, env in started:
        assert cmd[cmd.index("--device") + 1] == "cpu" and env is not None and env["TRITON_INTERPRET"] == "1"


def test_random_specs_include_every_normaliser_and_linear_ones_compile():
    # issue 8: the spec strategy grows with the normalisers; every drawn spec must compile
    import attngen
    from hypothesis import HealthCheck, find, settings

    from attngen.strategies import linear_specs, specs

    for normalizer in ("softmax", "sigmoid", "linear"):
        found = find(specs(), lambda s, n=normalizer: s.get("normalizer", "softmax") == n,
                     settings=settings(database=None, suppress_health_check=list(HealthCheck)))
        assert found.get("normalizer", "softmax") == normalizer

    @settings(max_examples=15, deadline=None, database=None)
    @given(linear_specs())
    def compiles(spec):
        attngen.compile(spec)

    compiles()


def test_random_linear_specs_match_the_reference():
    from hypothesis import settings

    from attngen.strategies import linear_specs

    @settings(max_examples=6, deadline=None, database=None)
    @given(spec=linear_specs(), t_q=st.integers(1, 20), t_kv=st.integers(1, 20), seed=st.integers(0, 2**16))
    def check(spec, t_q, t_kv, seed):
        check_spec(spec, dims(B=1, H=2, H_KV=1, T_Q=t_q, T_KV=t_kv, D_QK=8, D_V=8), torch.float32, seed=seed)

    check()


def test_drawn_lengths_keep_some_keys_and_mask_others():
    # an int input with no position dimension (a per-sequence length, `k < n[b]`) is drawn
    # in [0, max(T_Q, T_KV)], so `run` and `fuzz` exercise both masked and visible keys
    # (documents ids, drawn per position, stay small nondecreasing runs)
    from attngen.check import make_inputs
    from attngen.schema import load_spec

    spec = load_spec({"name": "padded", "inputs": {"n": {"dtype": "int32", "shape": ["B"]},
                                                   "doc": {"dtype": "int32", "shape": ["B", "T_KV"]}},
                      "mask": "k < n[b] and doc[b, q] == doc[b, k]"})
    gen = torch.Generator().manual_seed(0)
    _, _, _, inputs = make_inputs(spec, dims(B=64, T_Q=20, T_KV=40), dtype=torch.float32, device="cpu", generator=gen)
    n, doc = inputs["n"], inputs["doc"]
    assert n.dtype == torch.int32 and n.shape == (64,)
    assert 0 <= int(n.min()) and int(n.max()) <= 40 and len(set(n.tolist())) > 10
    assert doc.shape == (64, 40) and bool((doc.diff(dim=-1) >= 0).all()) and int(doc.max()) <= 40 // 8
