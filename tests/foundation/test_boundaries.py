from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["config", "launch", "notify", "analytics"]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def production_files() -> list[Path]:
    return sorted((ROOT / "services").rglob("*.py")) + sorted((ROOT / "libs").rglob("*.py"))


def test_production_code_never_imports_the_stand_ins() -> None:
    """services/ and libs/ reach the outside world only through URLs, never sandbox/."""
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for path in production_files()
        for module in imported_modules(path)
        if module == "sandbox" or module.startswith(("sandbox.", "tests"))
    ]
    assert offenders == []


def test_services_do_not_import_each_other() -> None:
    """A service shares code with another only through libs/common."""
    offenders = []
    for service in SERVICES:
        for path in sorted((ROOT / "services" / service).rglob("*.py")):
            for module in imported_modules(path):
                other = module.split(".")[1] if module.startswith("services.") else None
                if other and other != service:
                    offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert offenders == []


def test_libs_common_depends_on_no_service() -> None:
    """The shared library knows nothing about any one service."""
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for path in sorted((ROOT / "libs").rglob("*.py"))
        for module in imported_modules(path)
        if module.startswith("services")
    ]
    assert offenders == []


def test_each_service_touches_only_its_own_schema() -> None:
    """No service's SQL names another service's schema (each owns its own tables)."""
    offenders = []
    for service in SERVICES:
        others = [s for s in SERVICES if s != service]
        for path in sorted((ROOT / "services" / service).rglob("*")):
            if path.suffix not in {".py", ".sql"}:
                continue
            text = path.read_text()
            for other in others:
                pattern = rf'(?i)\b(from|join|into|update|table|references)\s+"?{other}"?\.'
                if re.search(pattern, text):
                    offenders.append(f"{path.relative_to(ROOT)}: {other}")
    assert offenders == []
