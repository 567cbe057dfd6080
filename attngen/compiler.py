"""``attngen.compile``: spec -> IR -> passes -> plan -> rendered kernels -> operator."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from . import config
from .linear import LinearAttentionOp, LinearPlan, make_linear_plan
from .load import load_module
from .lower import lower
from .op import AttentionOp
from .passes import run_pipeline
from .plan import ModulePlan, make_plan
from .render import RenderedModule, render, render_linear
from .schema import AttentionSpec, load_spec, with_params


@dataclass(frozen=True)
class Compiled:
    """Every stage's output for one spec, as ``python -m attngen show`` prints it.

    A linear spec skips the IR: its ``graph`` has no nodes (graph attributes ``normalizer``
    and ``saved`` only) and its ``plan`` is a :class:`~attngen.linear.LinearPlan`."""

    spec: AttentionSpec
    graph: nx.DiGraph
    plan: ModulePlan | LinearPlan
    rendered: RenderedModule


def build(spec: Any, **params: int | float) -> Compiled:
    """Run the pure stages (parse, validate, lower, passes, plan, render) without loading.

    Raises:
        SpecError, UnsupportedError: the spec is malformed or asks for what is not built.
        IRVerifyError, CodegenError: a compiler bug.
    """
    spec = with_params(load_spec(spec), params)
    if spec.normalizer == "linear":
        plan = make_linear_plan(spec)
        graph = nx.DiGraph(spec=spec, normalizer="linear", saved=("q", "k", "v", "o", "den"))
        return Compiled(spec, graph, plan, render_linear(plan))
    graph = run_pipeline(lower(spec))
    plan = make_plan(graph)
    return Compiled(spec, graph, plan, render(plan))


def compile(spec: Any, *, autotune: bool = False, **params: int | float) -> AttentionOp | LinearAttentionOp:  # noqa: A001 - the product's verb
    """Compile an attention spec into a differentiable operator.

    Args:
        spec: a YAML path, a zoo spec name (``"causal"``), a dict or an
            :class:`~attngen.AttentionSpec`.
        autotune: tune a call's shape bucket on the GPU the first time it has no cached
            config (otherwise calls use cached or default configs and never pause to tune;
            see :mod:`attngen.tune`).
        **params: overrides of the spec's compile-time params, e.g. ``window=1024``.

    Returns:
        An :class:`~attngen.op.AttentionOp`, or for ``normalizer: linear`` a
        :class:`~attngen.linear.LinearAttentionOp` (no tuning: ``autotune`` is ignored); see
        their docstrings for the calling convention.
        Kernels are rendered into ``<cache dir>/kernels/<name>_<hash>.py`` (written atomically)
        and compiled by Triton on first use for each dtype and head dim.

    Raises:
        SpecError: a malformed spec or an unknown or mistyped param override.
        UnsupportedError: a normaliser or recompute policy that is not built yet.
        EnvError: an ``ATTNGEN_*`` switch (:mod:`attngen.config`) holds a bad value.

    Warns:
        UserWarning: the mask keeps no (q, k) pair at ``T_Q = T_KV = 4096`` (a window of 0,
            contradictory conditions), so every output row would be 0. Masks whose key
            bounds read runtime inputs are not checked. Also a param or an input that
            neither the mask nor the score reads (an unused input is still required).
    """
    config.check_switches()
    compiled = build(spec, **params)
    module, path = load_module(compiled.spec.name, compiled.rendered)
    if not isinstance(compiled.plan, LinearPlan):
        _warn_unused(compiled.spec)
        from .tilemap import keeps_no_pair

        if keeps_no_pair(compiled.spec, compiled.graph):
            values = ", ".join(f"{k}={v}" for k, v in compiled.spec.params)
            hint = " (a window must be at least 1)" if any("window" in k for k, _ in compiled.spec.params) else ""
            warnings.warn(
                f"spec {compiled.spec.name!r}: mask {compiled.spec.mask!r}{f' with {values}' if values else ''} keeps no "
                f"(q, k) pair (checked at T_Q = T_KV = 4096), so every output row is 0; check the mask and its params{hint}",
                stacklevel=2)
    if isinstance(compiled.plan, LinearPlan):
        return LinearAttentionOp(compiled.spec, module, Path(path), compiled.plan, compiled.rendered.digest)
    return AttentionOp(compiled.spec, module, Path(path), compiled.plan, compiled.rendered.digest, autotune=autotune,
                       graph=compiled.graph)


def _warn_unused(spec: AttentionSpec) -> None:
    """Warn about params and inputs that neither the mask nor the score reads (a typo in an
    expression, or a leftover): an unused input is still required at call time."""
    used: set[str] = set()
    for parsed in (spec.parsed_mask(), spec.parsed_score()):
        if parsed is not None:
            used |= {str(sym) for sym in parsed.sym.free_symbols}
    for name, _ in spec.params:
        if name not in used:
            warnings.warn(f"spec {spec.name!r}: params.{name} is never read by the mask or the score; remove it "
                          "or use it", stacklevel=3)
    for inp in spec.inputs:
        if inp.name not in used:
            warnings.warn(f"spec {spec.name!r}: inputs.{inp.name} is never read by the mask or the score, but every "
                          "call must still pass it; remove it or use it", stacklevel=3)
