"""The README's Layout section lists every module of the package, and the README stays a guide."""
from __future__ import annotations

import re

from conftest import REPO


def test_every_module_is_in_the_readme_layout():
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    listed = set(re.findall(r"\b(\w+\.py)\b", layout))
    modules = {p.name for p in (REPO / "replearn").glob("*.py")}
    assert modules - listed == set(), f"modules missing from the README's Layout: {sorted(modules - listed)}"
    assert listed - modules - {p.name for p in (REPO / "benchmarks").glob("*.py")} == set()


def test_readme_is_a_guide_and_the_protocol_travels_with_the_code():
    assert len((REPO / "README.md").read_text().splitlines()) <= 210
    assert (REPO / "docs" / "protocol.md").exists()
