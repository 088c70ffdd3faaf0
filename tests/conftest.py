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


# Every compiled XLA:CPU executable keeps a few hundred memory maps (its JIT code); a
# dynamic-speculation generate config holds ~800 (one verify branch per size). Linux caps a
# process at vm.max_map_count (65530 by default), and past it XLA's compiler segfaults on
# a failed mmap: a whole suite in one process went past it. Dropping the compiled
# executables when the count grows keeps the suite well under the cap.
MAP_BUDGET = 20_000


def _map_count() -> int:
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:
    return 0


@pytest.fixture(autouse=True)
def _bounded_memory_maps():
  yield
  if _map_count() > MAP_BUDGET:
    import gc

    import jax

    from specjax import decode
    decode._COMPILED.clear()
    jax.clear_caches()
    gc.collect()
