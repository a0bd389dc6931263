"""The README's Layout section lists every module of the package, folder by folder, and the README stays a guide."""
from __future__ import annotations

import re

from conftest import REPO


def layout_paths() -> set[str]:
    """Each `name.py` in the Layout block, under the folder that starts its line (`probe/`, `replearn/`...)."""
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("## Layout"):].split("```")[1]
    listed = set()
    for line in block.splitlines():
        head = re.match(r"\s*([\w/]+/)\s", line)
        if head:
            folder = head.group(1)
            folder = "replearn/" + folder if folder.split("/")[0] not in ("replearn", "benchmarks", "docs", "tests",
                                                                       "tables") else folder
            listed |= {folder + name for name in re.findall(r"\b(\w+\.(?:py|sh))\b", line)}
    return listed


def test_every_module_is_in_the_readme_layout():
    listed = layout_paths()
    modules = {str(p.relative_to(REPO)) for p in (REPO / "replearn").rglob("*.py")
               if p.name != "__init__.py" or p.parent.name == "replearn"}
    assert modules - listed == set(), f"modules missing from the README's Layout: {sorted(modules - listed)}"
    others = {str(p.relative_to(REPO)) for p in (REPO / "benchmarks").glob("*.*")}
    assert listed - modules - others == set(), f"listed but not in the tree: {sorted(listed - modules - others)}"


def test_readme_is_a_guide_and_the_protocol_travels_with_the_code():
    assert len((REPO / "README.md").read_text().splitlines()) <= 210
    assert (REPO / "docs" / "protocol.md").exists()
