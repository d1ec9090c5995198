"""bootstrap.py test: its pytest phases' exit codes make one, and none lets 'no tests' pass."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "bootstrap", Path(__file__).resolve().parents[1] / "bootstrap.py"
)
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)
NO_TESTS = 5  # pytest's exit code when it collected nothing


@pytest.mark.parametrize(
    "codes,expected",
    [
        ([0, 0], 0),
        ([NO_TESTS, NO_TESTS], 1),  # nothing ran at all: a failure, never a pass
        ([NO_TESTS, 0], 0),  # -k picked integration tests only
        ([0, NO_TESTS], 0),
        ([1, 0], 1),  # a failing test in either phase fails the command
        ([0, 1], 1),
        ([NO_TESTS, 2], 2),  # interrupted: pytest's own code
    ],
)
def test_the_test_command_exits_with_the_first_failure_and_never_passes_no_tests(codes, expected):
    assert bootstrap.outcome(codes) == expected
