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
DECODE_TEMPLATE = "decode.py.j2"
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
    # a strided mask's residue-order kernels, or recompute: store_p's kernels, follow in the
    # same module
    parts = (plan, plan.perm, plan.stored)
    return _render(TEMPLATE, plan.spec_name, [dict(plan=part) for part in parts if part is not None])


def decode_module_name(spec_name: str) -> str:
    """The name the decoding kernel's module is written and imported under."""
    return f"{spec_name}_decode"


def render_decode(plan: ModulePlan) -> RenderedModule:
    """Render the split-KV decoding kernel of a plan (``plan.decode``), a module of its own.

    Raises:
        CodegenError: the template failed to render or produced text that is not Python.
    """
    return _render(DECODE_TEMPLATE, plan.spec_name, [dict(plan=plan, decode=plan.decode)])


def render_linear(plan) -> RenderedModule:
    """Render the linear-attention template for a :class:`~attngen.linear.LinearPlan`.

    Raises:
        CodegenError: the template failed to render or produced text that is not Python.
    """
    return _render(LINEAR_TEMPLATE, plan.spec_name, [dict(plan=plan)])


def _render(name: str, spec_name: str, contexts: list[dict]) -> RenderedModule:
    try:
        template = _environment().get_template(name)
        source = "".join(template.render(**context) for context in contexts)
    except jinja2.TemplateError as exc:
        raise CodegenError(f"rendering {name} for spec {spec_name!r} failed: {exc}") from exc
    try:
        compile(source, f"<attngen {spec_name}>", "exec")  # syntax check only; nothing runs
    except SyntaxError as exc:
        raise CodegenError(f"rendered kernel for {spec_name!r} is not valid Python: {exc}") from exc
    return RenderedModule(source=source, digest=hashlib.sha256(source.encode()).hexdigest())
