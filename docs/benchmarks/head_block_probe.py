"""The head-block probe behind docs/benchmarks/h200-head-blocks-s10.txt: writes replay files
(``python -m attngen fuzz --replay``) for the fuzz case ``softmax_band_dqk16_dv80`` of
tests/regressions/test_gpu_fuzz_faults.py and for a causal mask, over D_QK in {16, 32, 64},
D_V in {16, 80, 128}, (T_Q, T_KV) in {(249, 34), (256, 256)} and the layouts ``contiguous``
(rank-2 tensor descriptors on the H200) and ``bthd`` (rank 4): 72 cases. With ``--regressions``
it also writes every case of that file. Run the cases with head_block_probe.sh.

    PYTHONPATH=. python docs/benchmarks/head_block_probe.py CASES_DIR [--regressions]
"""
import itertools
import os
import sys

import yaml

sys.path[:0] = ["tests/regressions", "tests"]
from test_gpu_fuzz_faults import CASES  # noqa: E402

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
base = CASES["softmax_band_dqk16_dv80"]
causal = {"name": "fuzz", "mask": "k <= q", "align": "bottom_right"}
for dqk, dv, (tq, tkv), layout, sp in itertools.product((16, 32, 64), (16, 80, 128), ((249, 34), (256, 256)),
                                                        ("contiguous", "bthd"), ("f", "c")):
    case = dict(base, spec=base["spec"] if sp == "f" else causal, layout=layout)
    case["dims"] = dict(base["dims"], D_QK=dqk, D_V=dv, T_Q=tq, T_KV=tkv)
    with open(f"{out}/{sp}_q{dqk}_v{dv}_t{tq}x{tkv}_{layout}.yaml", "w") as f:
        f.write(yaml.safe_dump(case, sort_keys=False))
if "--regressions" in sys.argv:
    for name, case in CASES.items():
        with open(f"{out}/reg_{name}.yaml", "w") as f:
            f.write(yaml.safe_dump(case, sort_keys=False))
