"""Every environment variable attngen reads, in one module.

``ATTNGEN_CACHE_DIR``   where rendered kernels (and later tuning caches) are written.
``ATTNGEN_VERIFY_IR``   ``1`` runs the IR verifier after every compiler pass (tests switch it on).
``ATTNGEN_NO_SKIP``     ``1`` switches tile skipping off: kernels visit every tile and mask every
                        element (a debug switch; results must not change).
``ATTNGEN_STAGES``      an integer forces every kernel's software-pipelining depth (``num_stages``)
                        whatever the config says (a debug switch for compiler faults).
``ATTNGEN_MIN_HEAD_BLOCK`` a power of two raises the smallest padded head-dim block (default 16), a
                        debug switch for compiler faults with narrow tiles.
``ATTNGEN_DESCRIPTORS`` ``0`` makes the attention kernels load tiles through pointers instead of
                        tensor descriptors (the tensor memory accelerator); ``2`` or ``4`` forces
                        that descriptor rank where the tensors allow it (a debug switch; results
                        must not change). Unset: attngen picks.
``ATTNGEN_DQ``          how the backward computes dQ: ``0`` a dQ kernel of its own that recomputes
                        P; ``1`` the dK/dV kernel adds each key tile's share with float32 atomics;
                        ``2`` the same through the tensor memory accelerator's bulk reduction
                        (Hopper and later; elsewhere, under the interpreter and for head dims
                        not a multiple of 4 it acts as ``1``). Unset or ``auto``: attngen picks
                        (:meth:`attngen.op.AttentionOp.dq_mode`). Deterministic algorithms,
                        stored P and learnable inputs that want gradients take ``0`` whatever
                        it says.
``ATTNGEN_LAUNCH_ORDER`` ``1`` runs the forward and dQ kernels' programs (``attn_fwd``,
                        ``attn_bwd_dq``) in launch order instead of longest first
                        (:func:`attngen.tilemap.query_tile_order`; a switch for A/B timings;
                        results must not change).
``ATTNGEN_POISON``      ``1`` fills fresh outputs with NaN before the kernels write them, so an
                        element a kernel forgets to write cannot pass a test.
``TRITON_INTERPRET``    ``1`` makes Triton interpret every kernel (also GPU tensors). CPU
                        tensors need it: Triton reads it once, when it is first imported.

On/off switches take ``1`` or ``0``. A bad value of any switch raises
:class:`attngen.errors.EnvError`, naming the variable and its values, when a spec is
compiled (:func:`check_switches`) and wherever it is read.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import EnvError


def _source_checkout() -> Path | None:
    """The repository root when attngen runs from a source checkout, else ``None``."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "generated").is_dir():
        return root
    return None


def cache_dir() -> Path:
    """Directory for rendered kernels: ``$ATTNGEN_CACHE_DIR``, else ``generated/`` in a source
    checkout, else the platform's user cache directory (``platformdirs``)."""
    env = os.environ.get("ATTNGEN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    root = _source_checkout()
    if root is not None:
        return root / "generated"
    import platformdirs

    return Path(platformdirs.user_cache_dir("attngen"))


def _flag(name: str) -> bool:
    """Whether on/off switch ``name`` is on: ``1`` on, ``0`` or unset off.

    Raises:
        EnvError: any other value (``yes`` or ``true`` would otherwise pass for off).
    """
    text = os.environ.get(name, "").strip()
    if text not in ("", "0", "1"):
        raise EnvError(name, f"{text!r} is not a switch value: give 1 (on) or 0 (off), or unset it")
    return text == "1"


def verify_ir() -> bool:
    """Whether to run the IR verifier after every pass (``ATTNGEN_VERIFY_IR``)."""
    return _flag("ATTNGEN_VERIFY_IR")


def tile_skipping() -> bool:
    """Whether kernels skip EMPTY tiles and run FULL tiles unmasked (``ATTNGEN_NO_SKIP``)."""
    return not _flag("ATTNGEN_NO_SKIP")


def forced_stages() -> int | None:
    """``num_stages`` forced on every launch by ``ATTNGEN_STAGES``, else None.

    Raises:
        EnvError: the variable is set but is not an integer from 1 to 8 (the range a spec's
            ``tiles.num_stages`` takes).
    """
    text = os.environ.get("ATTNGEN_STAGES", "").strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 8:
        raise EnvError("ATTNGEN_STAGES", f"{text!r} is not a pipeline depth: give an integer from 1 to 8, or unset it")
    return int(text)


def min_head_block() -> int:
    """The smallest padded head-dim block forced by ``ATTNGEN_MIN_HEAD_BLOCK`` (0: none).

    Raises:
        EnvError: the variable is set but is not a power of two of at least 16 (``tl.dot``'s
            minimum).
    """
    text = os.environ.get("ATTNGEN_MIN_HEAD_BLOCK", "").strip()
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()) or int(text) < 16 or int(text) & (int(text) - 1):
        raise EnvError("ATTNGEN_MIN_HEAD_BLOCK", f"{text!r} is not a head block: give a power of two of at least 16 "
                       "(tl.dot's minimum), or unset it")
    return int(text)


def descriptor_rank() -> int | None:
    """The tensor-descriptor rank forced by ``ATTNGEN_DESCRIPTORS`` (0: pointer loads), or None
    (unset or ``auto``: :func:`attngen.op.descriptor_rank` picks).

    Raises:
        EnvError: the variable is set to anything but ``auto``, ``0``, ``2`` or ``4``.
    """
    return _forced_choice("ATTNGEN_DESCRIPTORS", ("0", "2", "4"), "0 (pointer loads), 2 or 4 (a descriptor rank)")


def dq_mode() -> int | None:
    """The dQ method forced by ``ATTNGEN_DQ`` (0: a dQ kernel of its own, 1: atomics in the dK/dV
    kernel, 2: bulk reductions there), or None (unset or ``auto``: attngen picks).

    Raises:
        EnvError: the variable is set to anything but ``auto``, ``0``, ``1`` or ``2``.
    """
    return _forced_choice("ATTNGEN_DQ", ("0", "1", "2"), "0 (a dQ kernel of its own), 1 (atomics), 2 (bulk reductions)")


def warp_specialize() -> int | None:
    """The forward kernel forced by ``ATTNGEN_WS`` (:mod:`attngen.warpspec`): 0 the Triton
    forward for every call, 1 the warp-specialised Hopper kernel for every call it can run,
    or None (unset or ``auto``: the warp-specialised kernel where it can run and pays).

    Raises:
        EnvError: the variable is set to anything but ``auto``, ``0`` or ``1``.
    """
    return _forced_choice("ATTNGEN_WS", ("0", "1"), "0 (the Triton forward) or 1 (the warp-specialised one wherever it can run)")


def _forced_choice(name: str, allowed: tuple[str, ...], meanings: str) -> int | None:
    """The integer choice environment variable ``name`` forces, or None when it is unset or
    ``auto`` (in any case); ``meanings`` describes ``allowed`` in the error."""
    text = os.environ.get(name, "").strip()
    if text.lower() in ("", "auto"):  # AUTO and Auto as well
        return None
    if text not in allowed:
        raise EnvError(name, f"{text!r} is not a choice: give {meanings}, or auto (or unset it)")
    return int(text)


def check_switches() -> None:
    """Read every switch (``ATTNGEN_VERIFY_IR``, ``ATTNGEN_NO_SKIP``, ``ATTNGEN_POISON``,
    ``ATTNGEN_STAGES``, ``ATTNGEN_MIN_HEAD_BLOCK``, ``ATTNGEN_DESCRIPTORS``, ``ATTNGEN_DQ``, ``ATTNGEN_WS``, ``ATTNGEN_LAUNCH_ORDER``), so
    a bad one fails when a spec is compiled rather than at the first launch that reads it.
    Each launch still reads them again, so a change after compiling takes effect.

    Raises:
        EnvError: the first variable that holds a bad value.
    """
    verify_ir()
    tile_skipping()
    poison_outputs()
    forced_stages()
    min_head_block()
    descriptor_rank()
    dq_mode()
    warp_specialize()
    tile_order()


def tile_order() -> bool:
    """Whether ``attn_fwd`` and ``attn_bwd_dq`` take their query tiles longest first where
    the mask makes some programs longer (:func:`attngen.tilemap.query_tile_order`), off with
    ``ATTNGEN_LAUNCH_ORDER=1``."""
    return not _flag("ATTNGEN_LAUNCH_ORDER")


def poison_outputs() -> bool:
    """Whether to fill fresh outputs with NaN before kernels write them (``ATTNGEN_POISON``)."""
    return _flag("ATTNGEN_POISON")


def interpret_all() -> bool:
    """Whether Triton was asked to interpret every kernel (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def enable_interpreter() -> None:
    """Switch Triton's interpreter on for this process (CPU runs of the CLI).

    Triton reads ``TRITON_INTERPRET`` when it is first imported, so this must run before any
    module imports ``triton``.

    Raises:
        RuntimeError: Triton was already imported without the interpreter.
    """
    import sys

    if "triton" in sys.modules:
        raise RuntimeError("Triton is already imported; set TRITON_INTERPRET=1 before starting Python")
    os.environ["TRITON_INTERPRET"] = "1"


def fast_sigmoid(dtype) -> bool:
    """Whether sigmoid attention uses the hardware tanh.approx (bf16/fp16 on a GPU; see the
    ``_sigmoid`` kernel helper for its error bound). Triton's interpreter has no inline PTX."""
    import torch

    return dtype in (torch.bfloat16, torch.float16) and not interpret_all()
