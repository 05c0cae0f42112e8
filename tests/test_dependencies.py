"""Every runtime dependency declared in pyproject.toml is used by the product (core/, workers/,
native/): imported, or opened as a resource package. Test-only use does not count."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path, PurePosixPath

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _packages(dist: str) -> set[str]:
    """The outermost modules a distribution installs (`opentelemetry.sdk`, not `opentelemetry`,
    which several distributions share)."""
    found = set()
    for f in importlib.metadata.files(dist) or []:
        path = PurePosixPath(str(f))
        if path.suffix != ".py" or ".." in path.parts or path.parts[0].endswith("-info"):
            continue
        # a file in a package stands for the package; a top-level file is a module itself
        found.add(".".join(path.parts[:-1]) if len(path.parts) > 1 else path.stem)
    return {m for m in found if not any(m.startswith(o + ".") for o in found)}


def _product_source() -> str:
    return "\n".join(p.read_text() for folder in ("core", "workers", "native")
                     for p in (ROOT / folder).rglob("*.py"))


def test_every_declared_dependency_is_used() -> None:
    source = _product_source()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    unused = []
    for dep in pyproject["project"]["dependencies"]:
        name = Requirement(dep).name
        modules = _packages(name)
        assert modules, f"{name}: no modules found"
        if not any(re.search(rf"\b(import|from)\s+{re.escape(m)}\b|[\"']{re.escape(m)}[\"']",
                             source) for m in modules):
            unused.append(f"{name} ({', '.join(sorted(modules))})")
    assert not unused, f"declared but never used by the product: {unused}"
