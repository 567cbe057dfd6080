"""Where the files that ship with attngen live: Jinja2 templates and the spec zoo.

In a source checkout they are the top-level ``templates/`` and ``specs/`` folders; in an
installed wheel they are packaged as ``attngen/templates`` and ``attngen/specs``.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _find(folder: str) -> Path:
    for candidate in (_PACKAGE.parent / folder, _PACKAGE / folder):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"attngen's {folder}/ folder is missing from {_PACKAGE}; reinstall attngen")


def template_dir() -> Path:
    """The folder of Jinja2 kernel templates."""
    return _find("templates")


def zoo_dir() -> Path:
    """The folder of spec-zoo YAML files."""
    return _find("specs")
