"""The documentation site builds in strict mode, and the zoo page matches the zoo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_mkdocs_build_strict(tmp_path):
    # mkdocs comes with the test extra (CI has it); a machine without it (a GPU host set up
    # for the kernels) skips the site build instead of failing on the missing tool
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install 'attngen[docs]' or 'attngen[test]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "site" / "zoo" / "index.html").is_file()


def test_zoo_page_is_up_to_date(tmp_path):
    from attngen.tilemap import write_zoo_page

    page = write_zoo_page(tmp_path)
    assert page.read_text() == (ROOT / "docs" / "zoo.md").read_text(), "run: python -m attngen zoo-docs --out docs"
    committed = sorted(p.name for p in (ROOT / "docs" / "zoo").glob("*.png"))
    assert committed == sorted(p.name for p in (tmp_path / "zoo").glob("*.png"))
