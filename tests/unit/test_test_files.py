"""The test directories have no __init__.py, so pytest imports each test file by its basename:
two files with the same name in tests/unit and tests/integration break collection of the
whole suite (`import file mismatch`)."""

from __future__ import annotations

import collections
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent.parent


def test_test_file_names_are_unique_across_directories():
    by_name = collections.defaultdict(list)
    for path in TESTS.rglob("test_*.py"):
        by_name[path.name].append(str(path.relative_to(TESTS)))
    assert not {name: paths for name, paths in by_name.items() if len(paths) > 1}
