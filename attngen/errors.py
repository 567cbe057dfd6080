"""The exception types attngen raises.

Every error attngen raises on bad input derives from :class:`AttngenError`, so a caller can
catch them all at once, and each message names the offending field or argument and the fix.
"""

from __future__ import annotations


class AttngenError(Exception):
    """Base class of every attngen error."""


class SpecError(AttngenError, ValueError):
    """A spec is malformed: unknown key, wrong type, or an expression outside the grammar.

    Attributes:
        field: dotted path of the offending field, e.g. ``"mask"`` or ``"tiles.block_q"``.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class EnvError(AttngenError, ValueError):
    """An ``ATTNGEN_*`` environment variable holds a value attngen cannot use.

    Attributes:
        name: the variable, e.g. ``"ATTNGEN_DQ"``.
    """

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(f"{name}: {message}")


class UnsupportedError(AttngenError, NotImplementedError):
    """A well-formed spec or call asks for something attngen cannot do (yet)."""


class ShapeError(AttngenError, ValueError):
    """Tensors passed at call time have the wrong shape, dtype, device or are missing."""


class IRVerifyError(AttngenError, RuntimeError):
    """A compiler pass left the IR graph in an inconsistent state (a bug in attngen)."""


class CodegenError(AttngenError, RuntimeError):
    """Rendering or loading a kernel failed (a bug in attngen or its templates)."""


class TuneError(AttngenError, RuntimeError):
    """Every candidate tile config failed to compile or launch."""
