"""An address sanitizer for Triton's interpreter (CPU, ``TRITON_INTERPRET=1``).

Compiled kernels fault (or silently read a neighbour's memory) on an out-of-bounds address;
the interpreter just dereferences host memory and carries on. Inside :func:`sanitized`, every
active lane of a load, store or atomic must address an element of one of the launch's tensor
arguments, or the kernel call raises :class:`OutOfBounds` naming the kernel, the access and
the first bad addresses:

* ``strict=True`` (default): an element of the argument *as viewed* (its shape, strides and
  offset), so a kernel handed ``k[:, :, 64:128]`` may not read key 130 of the buffer behind
  it, even though that address is mapped;
* ``strict=False``: anywhere in an argument's storage (what a GPU can get away with).

Usage::

    with sanitized() as log:
        op.forward_impl(q, k, v, [])
    assert log.launches  # the kernels ran under the check

Triton must be imported in interpreter mode (``TRITON_INTERPRET=1`` before it loads).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np


class OutOfBounds(AssertionError):
    """A kernel addressed memory outside its tensor arguments."""


@dataclass
class _Arg:
    name: str
    lo: int
    hi: int  # storage bounds, bytes [lo, hi)
    start: int  # the view's first element
    shape: tuple
    addrs: np.ndarray | None  # sorted element addresses of the view (strict), else None


@dataclass
class Log:
    """What ran under the sanitizer: kernel names, and lanes checked."""

    launches: list[str] = field(default_factory=list)
    lanes: int = 0


def _element_addresses(t) -> np.ndarray:
    """Sorted byte addresses of every element of a (strided) tensor view."""
    offs = np.zeros((), dtype=np.int64)
    for size, stride in zip(t.shape, t.stride()):
        offs = np.add.outer(offs, np.arange(size, dtype=np.int64) * stride)
    return np.unique(t.data_ptr() + offs.ravel() * t.element_size())


@contextlib.contextmanager
def sanitized(strict: bool = True):
    """Check every memory access of the Triton kernels launched inside the block."""
    import triton.runtime.interpreter as interp

    builder = interp.InterpreterBuilder
    executor = interp.GridExecutor
    log = Log()
    state: dict = {"args": [], "kernel": "?"}
    saved = {name: getattr(builder, name) for name in ("create_masked_load", "create_masked_store", "create_atomic_rmw",
                                                        "create_atomic_cas")}
    saved_init = executor._init_args_hst

    def init(self, args_dev, kwargs):
        args, kw = saved_init(self, args_dev, kwargs)
        names = list(getattr(self, "arg_names", [])) or [f"arg{i}" for i in range(len(args))]
        found = []
        for name, x in list(zip(names, args)) + list(kw.items()):
            x = getattr(x, "base", x)  # a tensor descriptor: the tensor it addresses
            if hasattr(x, "untyped_storage"):
                s = x.untyped_storage()
                found.append(_Arg(str(name), s.data_ptr(), s.data_ptr() + s.nbytes(), x.data_ptr(), tuple(x.shape),
                                  _element_addresses(x) if strict else None))
        state["args"] = found
        state["kernel"] = getattr(self.fn, "__name__", str(self.fn))
        log.launches.append(state["kernel"])
        return args, kw

    def check(ptrs, mask, what):
        p = ptrs.data.astype(np.int64)
        m = np.broadcast_to(np.asarray(mask.data if mask is not None else True).astype(bool), p.shape)
        act = p[m]
        if act.size == 0:
            return
        log.lanes += act.size
        size = np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize
        ok = np.zeros(act.shape, bool)
        for a in state["args"]:
            if a.addrs is None:
                ok |= (act >= a.lo) & (act + size <= a.hi)
            elif len(a.addrs):  # an empty tensor has no element to hit
                i = np.clip(np.searchsorted(a.addrs, act), 0, len(a.addrs) - 1)
                ok |= a.addrs[i] == act
        if not ok.all():
            bad = act[~ok]

            def where(addr):  # the nearest argument, and the offset from its first element
                if not state["args"]:
                    return "no tensor argument"
                a = min(state["args"], key=lambda a: 0 if a.lo <= addr < a.hi else min(abs(addr - a.lo), abs(addr - a.hi)))
                return f"{a.name}{list(a.shape)} {addr - a.start:+d} B"

            raise OutOfBounds(f"{what} in {state['kernel']}: {bad.size} of {act.size} active lanes outside the "
                              f"{'views' if strict else 'storage'} of its tensor arguments, e.g. "
                              + ", ".join(where(int(x)) for x in bad[:4]))

    def masked_load(self, ptrs, mask, other, *rest, **kw):
        check(ptrs, mask, "load")
        return saved["create_masked_load"](self, ptrs, mask, other, *rest, **kw)

    def masked_store(self, ptrs, value, mask, *rest, **kw):
        check(ptrs, mask, "store")
        return saved["create_masked_store"](self, ptrs, value, mask, *rest, **kw)

    def atomic_rmw(self, op, ptr, val, mask, *rest):
        check(ptr, mask, "atomic")
        return saved["create_atomic_rmw"](self, op, ptr, val, mask, *rest)

    def atomic_cas(self, ptr, cmp, val, *rest):
        check(ptr, None, "atomic_cas")
        return saved["create_atomic_cas"](self, ptr, cmp, val, *rest)

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = atomic_rmw, atomic_cas
    executor._init_args_hst = init
    try:
        yield log
    finally:
        for name, fn in saved.items():
            setattr(builder, name, fn)
        executor._init_args_hst = saved_init
