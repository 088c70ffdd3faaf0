"""Shared test fixtures."""
from __future__ import annotations

import pytest

# Property-test bookkeeping: test name -> [hypothesis examples, rows checked]. Reported in the
# terminal summary so the README can cite how many cases the property suite ran.
_PROPERTY_CASES: dict[str, list[int]] = {}


@pytest.fixture(scope="session")
def property_cases():
  """Call `property_cases(name, rows)` once per hypothesis example."""

  def record(name: str, rows: int) -> None:
    entry = _PROPERTY_CASES.setdefault(name, [0, 0])
    entry[0] += 1
    entry[1] += rows

  return record


def pytest_terminal_summary(terminalreporter):
  if not _PROPERTY_CASES:
    return
  terminalreporter.write_sep("-", "property tests: hypothesis examples x rows")
  for name, (examples, rows) in sorted(_PROPERTY_CASES.items()):
    terminalreporter.write_line(f"{name}: {examples} examples, {rows} rows")
  examples = sum(e for e, _ in _PROPERTY_CASES.values())
  rows = sum(r for _, r in _PROPERTY_CASES.values())
  terminalreporter.write_line(f"total: {examples} examples, {rows} cases (rows)")
