"""Spec-Bench questions: reading the JSONL file and turning turns into prompts.

A line is one JSON object: {"question_id": int|str, "category": str, "turns": [str, ...]}
(other keys, such as Spec-Bench's "reference", are ignored). Turn t > 1 continues
the conversation through the chat template:

  template([user_1, assistant_1, ..., user_t], add_generation_prompt=True)

where assistant_i is the answer the baseline (autoregressive) run gave to turn i,
so every method sees the same prompt ids for every turn.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class Question:
  question_id: int | str
  category: str
  turns: tuple[str, ...]
  line: int = 0  # 1-based line in the source file (0 when built in memory)


class QuestionsError(ValueError):
  """A malformed questions file; the message names the file and line."""


def _parse(obj, where: str, line: int) -> Question:
  if not isinstance(obj, dict):
    raise QuestionsError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  missing = [k for k in ("question_id", "category", "turns") if k not in obj]
  if missing:
    raise QuestionsError(f"{where}: missing key(s) {', '.join(missing)} (Spec-Bench rows need question_id, "
                         "category, turns)")
  qid, cat, turns = obj["question_id"], obj["category"], obj["turns"]
  if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
    raise QuestionsError(f"{where}: question_id={qid!r} must be an int or a non-empty string")
  if not isinstance(cat, str) or not cat.strip():
    raise QuestionsError(f"{where}: category={cat!r} must be a non-empty string")
  if (not isinstance(turns, list) or not turns
      or not all(isinstance(t, str) and t.strip() for t in turns)):
    raise QuestionsError(f"{where}: turns must be a non-empty list of non-empty strings, got {turns!r:.80}")
  return Question(qid, cat.strip(), tuple(turns), line)


def parse_questions(lines: Iterable[str], source: str = "<questions>",
                    skip_bad: bool = False) -> tuple[list[Question], list[str]]:
  """Parses JSONL lines. Returns (questions, problems skipped).

  Blank lines are ignored. A bad line raises QuestionsError naming it, unless
  skip_bad, in which case it is reported in the second return value.
  """
  questions, skipped, seen = [], [], {}
  for n, text in enumerate(lines, start=1):
    if not text.strip():
      continue
    where = f"{source} line {n}"
    try:
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        raise QuestionsError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
      q = _parse(obj, where, n)
      key = (q.category, q.question_id)
      if key in seen:
        raise QuestionsError(f"{where}: duplicate question_id {q.question_id!r} in category {q.category!r} "
                             f"(first on line {seen[key]})")
      seen[key] = n
      questions.append(q)
    except QuestionsError as e:
      if not skip_bad:
        raise QuestionsError(f"{e} (pass --skip-bad to skip bad lines)") from None
      skipped.append(str(e))
  return questions, skipped


def load_questions(path: str, skip_bad: bool = False) -> tuple[list[Question], list[str]]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"questions file {path!r} not found; pass --questions FILE.jsonl "
                            "(Spec-Bench format: question_id, category, turns)")
  with open(path, encoding="utf-8") as f:
    questions, skipped = parse_questions(f, source=path, skip_bad=skip_bad)
  if not questions:
    raise QuestionsError(f"{path}: no questions" + (f" ({len(skipped)} bad lines skipped)" if skipped else ""))
  return questions, skipped


def as_questions(rows: Sequence) -> list[Question]:
  """Questions from Question objects or dicts in Spec-Bench's shape (for the Python API)."""
  out = []
  for i, r in enumerate(rows):
    out.append(r if isinstance(r, Question) else _parse(r, f"question {i}", 0))
  return out


def select(questions: Sequence[Question], categories: Sequence[str] | None = None,
           limit: int | None = None) -> list[Question]:
  """Keeps the given categories (all by default) and the first `limit` questions of each, in file order."""
  have = list(dict.fromkeys(q.category for q in questions))
  if categories:
    unknown = [c for c in categories if c not in have]
    if unknown:
      raise ValueError(f"unknown categories {unknown}; the questions file has: {', '.join(have)}")
  keep = set(categories) if categories else set(have)
  counts: dict[str, int] = {}
  out = []
  for q in questions:
    if q.category in keep and (limit is None or counts.get(q.category, 0) < limit):
      counts[q.category] = counts.get(q.category, 0) + 1
      out.append(q)
  return out


def conversation(turns: Sequence[str], answers: Sequence[str]) -> list[dict]:
  """Messages for the next turn: user/assistant pairs for the answered turns, then the next user turn."""
  if len(answers) >= len(turns):
    raise ValueError(f"{len(answers)} answers for {len(turns)} turns: nothing left to ask")
  messages = []
  for user, assistant in zip(turns, answers):
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
  return messages + [{"role": "user", "content": turns[len(answers)]}]


def prompt_ids(tokenizer, turns: Sequence[str], answers: Sequence[str]) -> list[int]:
  """Token ids of the prompt for turn len(answers) + 1, through the chat template."""
  text = tokenizer.apply_chat_template(conversation(turns, answers), add_generation_prompt=True)
  return list(tokenizer.encode(text))
