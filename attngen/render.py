"""Rendering: a :class:`~attngen.plan.ModulePlan` becomes Triton source text.

Output is byte-deterministic for a given plan (Jinja2 with ``StrictUndefined``, no dates or
paths in the text), so its SHA-256 names the kernel file.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import jinja2

from . import resources
from .errors import CodegenError
from .plan import ModulePlan

TEMPLATE = "attention.py.j2"
LINEAR_TEMPLATE = "linear.py.j2"


@dataclass(frozen=True)
class RenderedModule:
    """Kernel source text and its hash (hex SHA-256)."""

    source: str
    digest: str


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.template_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(plan: ModulePlan) -> RenderedModule:
    """Render the attention template for one plan (and for its permuted part, if any).

    Raises:
        CodegenError: the template failed to render or produced text that is not Python.
    """
    try:
        template = _environment().get_template(TEMPLATE)
        # a strided mask: the residue-order kernels follow in the same module
        source = "".join(template.render(plan=part) for part in (plan, plan.perm) if part is not None)
    except jinja2.TemplateError as exc:
        raise CodegenError(f"rendering {TEMPLATE} for spec {plan.spec_name!r} failed: {exc}") from exc
    return _checked(plan.spec_name, source)


def render_linear(plan) -> RenderedModule:
    """Render the linear-attention template for a :class:`~attngen.linear.LinearPlan`.

    Raises:
        CodegenError: the template failed to render or produced text that is not Python.
    """
    try:
        source = _environment().get_template(LINEAR_TEMPLATE).render(plan=plan)
    except jinja2.TemplateError as exc:
        raise CodegenError(f"rendering {LINEAR_TEMPLATE} for spec {plan.spec_name!r} failed: {exc}") from exc
    return _checked(plan.spec_name, source)


def _checked(spec_name: str, source: str) -> RenderedModule:
    """The rendered module, after a syntax check of its text."""
    try:
        compile(source, f"<attngen {spec_name}>", "exec")  # syntax check only; nothing runs
    except SyntaxError as exc:
        raise CodegenError(f"rendered kernel for {spec_name!r} is not valid Python: {exc}") from exc
    return RenderedModule(source=source, digest=hashlib.sha256(source.encode()).hexdigest())
