"""Loading: rendered kernel source becomes a file in the cache directory and an imported
module of ``triton.jit`` functions (Triton reads a kernel's source from its file)."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from . import config
from .render import RenderedModule

_LOCK = threading.Lock()
_MODULES: dict[str, ModuleType] = {}


def kernel_path(name: str, rendered: RenderedModule) -> Path:
    """Where the kernel file of spec ``name`` with this source lives."""
    return config.cache_dir() / "kernels" / f"{name}_{rendered.digest[:16]}.py"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_kernel(name: str, rendered: RenderedModule) -> Path:
    """Write the kernel file if it is missing or differs; return its path."""
    path = kernel_path(name, rendered)
    if not path.is_file() or path.read_text() != rendered.source:
        write_atomic(path, rendered.source)
    return path


def load_module(name: str, rendered: RenderedModule) -> tuple[ModuleType, Path]:
    """Write (if needed) and import the kernel module; one import per source per process.

    Returns:
        The module and the path of its file.
    """
    with _LOCK:
        module = _MODULES.get(rendered.digest)
        if module is not None:
            return module, kernel_path(name, rendered)
        path = write_kernel(name, rendered)
        module_name = f"attngen_kernels_{name}_{rendered.digest[:16]}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        _MODULES[rendered.digest] = module
        return module, path
