"""The documentation's map of the code names only files that exist.

docs/ARCHITECTURE.md (and the other docs) describe the code as it is: every Python file they
name in backquotes (``empath/spool/layout.py``, ``cluster/fleet.py``, ``layout.py``) must be a
file of the repository, found by its path or, for a bare or partial path, by the end of one.
A renamed or deleted module then fails this test until the docs follow.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted([REPO / "docs" / name for name in ("ARCHITECTURE.md", "SPOOL.md", "SECURITY.md",
                                                "RELIABILITY.md", "OPERATIONS.md",
                                                "MODULES.md", "DEPLOYMENT.md")]
              + [REPO / "benchmarks" / "README.md"])
NAMED = re.compile(r"`((?:[\w.-]+/)*[\w-]+\.(?:py|pyx))(?:::[\w\[\]-]+)?`")
SOURCES = [p.relative_to(REPO).as_posix() for p in REPO.rglob("*.py*")
           if ".venv" not in p.parts and "build" not in p.parts and p.suffix in (".py", ".pyx")]


def exists(name: str) -> bool:
    return (REPO / name).is_file() or any(s == name or s.endswith("/" + name)
                                         for s in SOURCES)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_python_file_a_doc_names_exists(doc: Path) -> None:
    names = sorted(set(NAMED.findall(doc.read_text())))
    assert names, f"{doc.name} names no file at all: is the pattern still right?"
    missing = [n for n in names if not exists(n)]
    assert not missing, f"{doc.relative_to(REPO)} names files that do not exist: {missing}"


def test_the_architecture_map_names_every_package_module() -> None:
    """Every module of empath/ appears in docs/ARCHITECTURE.md by file name (a map that
    leaves a module out is not a map)."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    modules = sorted(p.relative_to(REPO / "empath").as_posix()
                     for p in (REPO / "empath").rglob("*.py")
                     if p.name != "__init__.py" and not p.name.endswith("_py.py"))
    absent = [m for m in modules if f"`{m.rsplit('/', 1)[-1]}`" not in text
              and f"{m}`" not in text and f"/{m}`" not in text]
    assert not absent, f"docs/ARCHITECTURE.md does not mention: {absent}"
