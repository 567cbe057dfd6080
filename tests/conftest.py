"""Test set-up: Triton's interpreter on machines without a GPU, IR verification after every
pass, NaN-poisoned outputs, and a deterministic hypothesis profile for CI.

Triton fixes interpreter mode when it is first imported, so the environment is set here,
before any test module imports attngen's kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["ATTNGEN_VERIFY_IR"] = "1"
os.environ["ATTNGEN_POISON"] = "1"

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
