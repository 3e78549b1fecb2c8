"""The docs cite tests as the proof of their claims: every cited test exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: ``test_name``, or ``test_file.py::test_name`` (a parametrized id after [ is dropped).
CITED = re.compile(r"\b(?:(test_[a-z0-9_]+)\.py::)?(test_[a-z0-9_]+)\b")
#: A test of jupyter_client's own suite: ``jupyter_client:tests/test_x.py::...``; these are
#: checked against the lists of tests/jupyter_client_suite/npr_jc_suite.py instead.
UPSTREAM = re.compile(r"jupyter_client:(tests/[^`\s|]+)")
#: The page about jupyter_client's suite: there, only ``file.py::test`` citations are ours.
UPSTREAM_DOC = "compatibility.md"


def defined_tests() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        names = {
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")
        }
        found[path.stem] = names
    return found


def test_every_test_cited_in_the_docs_exists() -> None:
    tests = defined_tests()
    every = set().union(*tests.values())
    missing = []
    for doc in sorted([*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]):
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            for module, name in CITED.findall(UPSTREAM.sub("", line)):
                if doc.name == UPSTREAM_DOC and not module:
                    continue  # a test of jupyter_client's suite, named in passing
                if module and module not in tests:
                    missing.append(f"{doc.name}:{number}: no tests/{module}.py")
                elif name in tests:  # a file named without .py (test_zmtp.py is matched above)
                    continue
                elif name not in (tests[module] if module else every):
                    missing.append(f"{doc.name}:{number}: {module or '*'}::{name}")
    assert not missing, "\n".join(missing)


def test_the_check_sees_citations() -> None:
    """So that it can fail: a known citation is found and resolves."""
    security = (ROOT / "docs" / "security.md").read_text()
    cited = {name for _, name in CITED.findall(security)}
    assert "test_intruder_reads_nothing_and_runs_nothing" in cited
    assert "test_intruder_reads_nothing_and_runs_nothing" in defined_tests()["test_local_security"]


def test_jupyter_client_suite_lists_are_the_documented_ones() -> None:
    """Every test of jupyter_client's suite that the plugin skips or leaves out is in the
    tables of docs/compatibility.md, and every test in those tables is skipped or left out."""
    from tests.jupyter_client_suite import npr_jc_suite as plugin

    keys = set(plugin.EXCLUDED) | set(plugin.SKIPPED_WITHOUT_CURVE)
    for skipped in plugin.SKIPPED.values():
        keys |= set(skipped)
    text = (ROOT / "docs" / UPSTREAM_DOC).read_text()
    tables = [
        section
        for section in text.split("\n## ")
        if section.startswith(("Skipped, by design", "Left out, to keep the run short"))
    ]
    assert len(tables) == 2
    listed = {
        test
        for section in tables
        for line in section.splitlines()
        if line.startswith("| `")
        for test in UPSTREAM.findall(line)
    }
    assert sorted(keys - listed) == [], "not in the tables of docs/compatibility.md"
    assert sorted(listed - keys) == [], "in docs/compatibility.md, but not skipped or left out"
