"""Choosing the CPU kernels' variant (SPECJAX_CPU_ISA), its library cache, and rebuilding a corrupt one."""
import os

import pytest

from specjax import kernels


def test_default_is_the_best_variant_the_cpu_executes(monkeypatch):
  monkeypatch.delenv("SPECJAX_CPU_ISA", raising=False)
  assert kernels.executable_isas()[-1] == "generic"
  assert kernels.selected_isa() == kernels.executable_isas()[0]
  monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"sse2", "avx", "avx2", "fma", "f16c"}))
  if kernels.platform.machine() == "x86_64":
    assert kernels.executable_isas() == ("avx2", "generic")
    assert kernels.selected_isa() == "avx2"
  monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"sse2", "avx"}))
  assert kernels.executable_isas() == ("generic",)


def test_env_and_forced_isa_select_a_variant(monkeypatch):
  monkeypatch.setenv("SPECJAX_CPU_ISA", "generic")
  assert kernels.selected_isa() == "generic"
  monkeypatch.setenv("SPECJAX_CPU_ISA", " AVX2 ")  # case and spaces are forgiven
  if "avx2" in kernels.executable_isas():
    assert kernels.selected_isa() == "avx2"
  with kernels.forced_isa("generic"):
    assert kernels.selected_isa() == "generic"
    assert kernels._target("q4_1") == "specjax_generic_q4_1"
  with pytest.raises(ValueError, match="forced_isa='sse9' is not a kernel variant"):
    with kernels.forced_isa("sse9"):
      pass


def test_library_is_keyed_by_variant_and_cpu(monkeypatch):
  paths = {isa: kernels.library_path(isa) for isa in kernels.ISAS}
  assert len(set(paths.values())) == 3 and all(f"kernels-{isa}-" in p for isa, p in paths.items())
  monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"sse2"}))
  assert kernels.library_path("generic") != paths["generic"]


def test_corrupt_cached_library_is_rebuilt_with_a_warning(monkeypatch, tmp_path):
  """A cached library that does not load (here: garbage where it should be, as a disk-full or
  killed build could leave) is rebuilt, with a warning, instead of failing or silently using XLA."""
  monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
  if kernels.shutil.which("g++") is None and not os.environ.get("CXX"):
    pytest.skip("no C++ compiler")
  lib = kernels.library_path("generic")
  assert os.path.dirname(lib) == str(tmp_path)
  with open(lib, "wb") as f:
    f.write(b"\x7fELF not really" * 10)
  with pytest.warns(UserWarning, match="does not load.*rebuilding"):
    built = kernels._build("generic")
  assert hasattr(built, "SpecjaxMatmulQ41") and os.path.getsize(lib) > 10_000
