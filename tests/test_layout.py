"""The layout's rules hold: which package may import which (read from the sources, no stack needed).

Why: the API never loads torch or worker code, common/ is shared by both
sides, and a dialect reuses another's translation through that package's
public names, never its routes.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {             # package -> packages it must not import
    "common": ("api", "worker", "dev", "tests", "bench"),
    "api": ("worker", "dev", "tests", "bench"),
    "worker": ("api", "tests", "bench"),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_what_they_may(package):
    offenders = [f"{path.relative_to(ROOT)} imports {module}"
                 for path in sources(package) for module in imported_modules(path)
                 if module.split(".")[0] in FORBIDDEN[package]]
    assert not offenders, "\n".join(offenders)


def test_dialects_reuse_each_other_through_the_package_only():
    """EKS and the AWS extension use A1111's translation from `api.dialects.a1111`, never its modules."""
    offenders = []
    for path in sources("api/dialects"):
        own = path.relative_to(ROOT / "api" / "dialects").parts[0]
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[:2] == ["api", "dialects"] and len(parts) > 3 and parts[2] != own:
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_every_dialect_package_is_registered():
    from api.dialects import BLUEPRINTS

    packages = {p.name for p in (ROOT / "api" / "dialects").iterdir() if (p / "__init__.py").exists()}
    registered = {blp.import_name.split(".")[2] for blp in BLUEPRINTS}
    assert registered == packages
