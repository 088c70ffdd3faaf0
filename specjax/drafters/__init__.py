"""Drafters, one module each, all on the protocol in `base`."""
from __future__ import annotations

from specjax.drafters.base import Context as Context
from specjax.drafters.base import Drafter as Drafter
from specjax.drafters.draft_model import DraftModel as DraftModel
from specjax.drafters.eagle import Eagle as Eagle
from specjax.drafters.ngram import NGram as NGram

KNOWN = ("none", "ngram", "ngram-tree", "draft", "layerskip", "eagle1", "eagle3", "eagle2", "mtp", "medusa")


def _builders():
  from specjax.drafters import draft_model, eagle, eagle2
  return {"ngram": lambda model, k, **o: NGram(k=k, **o),
          # Prompt lookup as a tree: up to 3 earlier matches' continuations as sibling branches.
          "ngram-tree": lambda model, k, **o: NGram(k=k, **{"branches": 3, **o}),
          "draft": draft_model.make,
          "eagle1": eagle.make("eagle1"), "eagle3": eagle.make("eagle3"), "mtp": eagle.make("mtp"),
          # EAGLE-2: the EAGLE-3 head drafting a dynamic tree, k = its depth.
          "eagle2": eagle2.make}


DEFAULT_K = {"ngram": 5, "ngram-tree": 4, "draft": 3, "eagle1": 5, "eagle3": 5, "eagle2": 4, "mtp": 3, "medusa": 4, "layerskip": 4}


def default_k(name: str) -> int:
  return DEFAULT_K.get(name, 5)


def available() -> tuple[str, ...]:
  """Drafter names that can be built now ("none" included)."""
  return ("none",) + tuple(n for n in KNOWN if n in _builders())


def make_drafter(name: str, model, k: int = 5, **options):
  """Builds a drafter by its CLI name for `model`; "none" gives None (autoregressive)."""
  if name == "none":
    return None
  builders = _builders()
  if name not in builders:
    have = ", ".join(n for n in KNOWN if n == "none" or n in builders)
    missing = ", ".join(n for n in KNOWN if n != "none" and n not in builders)
    raise ValueError(f"unknown or unavailable drafter {name!r}; available: {have}"
                     + (f" (not yet implemented: {missing})" if missing else ""))
  try:
    return builders[name](model, k, **options)
  except TypeError as e:
    raise ValueError(f"bad options for drafter {name!r}: {e}") from e
