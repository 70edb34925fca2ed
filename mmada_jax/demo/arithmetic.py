"""Synthetic arithmetic with verifiable answers: pretraining statements, CoT chat (SFT), GRPO prompts.

A problem is ``a op b`` with integers 0 ≤ a, b ≤ ``max_operand``; ``-`` keeps a ≥ b (no negative
answers). Its CoT response is ``<think> … </think> answer``, the layout that
:func:`mmada_jax.rl.answers.format_ok` and :func:`mmada_jax.rl.answers.extract_answer` expect:

* both operands < 10: ``<think> 7 + 5 = 12 </think> 12``;
* otherwise tens and ones separately, e.g. ``<think> 20 + 10 = 30 , 3 + 9 = 12 , 30 + 12 = 42 </think> 42``
  and ``<think> 42 - 10 = 32 , 32 - 9 = 23 </think> 23``.

``all_problems(9)`` (single digits, + and −) has 155 problems and ``all_problems(5)`` 57. A ~1M-parameter
diffusion LM does not learn even the small space fully in minutes of CPU training (it must copy the
operands into the reasoning and recall each sum), which leaves room for GRPO.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mmada_jax.rl import answers as answer_lib

OPS = ("+", "-")
QUESTION_TEMPLATE = "What is {a} {op} {b}?"


@dataclasses.dataclass(frozen=True)
class Problem:
  """``a op b`` with ``op`` in ``OPS``."""
  a: int
  op: str
  b: int

  @property
  def answer(self) -> int:
    return self.a + self.b if self.op == "+" else self.a - self.b

  @property
  def question(self) -> str:
    return QUESTION_TEMPLATE.format(a=self.a, op=self.op, b=self.b)

  @property
  def statement(self) -> str:
    """Plain pretraining form, e.g. ``7 + 5 = 12.``"""
    return f"{self.a} {self.op} {self.b} = {self.answer}."

  def reasoning(self) -> str:
    """The inside of ``<think> … </think>`` (see the module docstring)."""
    a, b, op = self.a, self.b, self.op
    if a < 10 and b < 10:
      return f"{a} {op} {b} = {self.answer}"
    if op == "+":
      ta, oa, tb, ob = a - a % 10, a % 10, b - b % 10, b % 10
      return f"{ta} + {tb} = {ta + tb} , {oa} + {ob} = {oa + ob} , {ta + tb} + {oa + ob} = {self.answer}"
    tb, ob = b - b % 10, b % 10
    return f"{a} - {tb} = {a - tb} , {a - tb} - {ob} = {self.answer}"

  def cot(self) -> str:
    """The SFT response ``<think> reasoning </think> answer``."""
    return f"<think> {self.reasoning()} </think> {self.answer}"


def all_problems(max_operand: int = 9, ops: Sequence[str] = OPS) -> list[Problem]:
  """Every problem of the space in a fixed order (op, a, b); ``-`` only with a ≥ b."""
  bad = [o for o in ops if o not in OPS]
  if bad or not ops:
    raise ValueError(f"ops must be a non-empty subset of {OPS}, got {list(ops)}")
  if max_operand < 0:
    raise ValueError(f"max_operand must be >= 0, got {max_operand}")
  out = []
  for op in ops:
    for a in range(max_operand + 1):
      for b in range(max_operand + 1):
        if op == "-" and b > a:
          continue
        out.append(Problem(a, op, b))
  return out


def shuffled(problems: Sequence[Problem], seed: int) -> list[Problem]:
  """A seeded permutation of ``problems``."""
  rng = np.random.default_rng(seed)
  return [problems[i] for i in rng.permutation(len(problems))]


def pretrain_texts(problems: Sequence[Problem], rows: int, facts_per_row: int, seed: int,
                   question_fraction: float = 0.5) -> list[str]:
  """``rows`` plain-text rows of ``facts_per_row`` facts each, cycling through seeded permutations so
  every problem appears about equally often. A fact is its statement (``"3 + 4 = 7."``) or, with
  probability ``question_fraction``, question then statement (``"What is 3 + 4? 3 + 4 = 7."``),
  which teaches the question-to-equation copy the CoT answers need."""
  rng = np.random.default_rng(seed)
  order: list[int] = []
  need = rows * facts_per_row
  while len(order) < need:
    order.extend(rng.permutation(len(problems)).tolist())
  asked = rng.random(need) < question_fraction
  facts = [f"{problems[i].question} {problems[i].statement}" if q else problems[i].statement
           for i, q in zip(order[:need], asked)]
  return [" ".join(facts[r * facts_per_row:(r + 1) * facts_per_row]) for r in range(rows)]


def chat_messages(problem: Problem, system: str | None = None) -> list[dict[str, str]]:
  """One SFT conversation: user question (``system`` sentence prepended when given) -> CoT answer."""
  question = problem.question if system is None else system + problem.question
  return [{"role": "user", "content": question}, {"role": "assistant", "content": problem.cot()}]


def prompt_record(problem: Problem) -> dict[str, object]:
  """A GRPO / evaluation prompt in ``mmada_jax.rl.prompts.load_jsonl_records`` form."""
  return {"question": problem.question, "answer": str(problem.answer), "a": problem.a, "op": problem.op,
          "b": problem.b}


def is_correct(completion: str, answer: int | str) -> bool:
  """The reward's notion of a correct completion: final answer (after ``</think>``) equals ``answer``."""
  return answer_lib.answers_match(answer_lib.extract_answer(completion), str(answer))


def score(completions: Sequence[str], answers: Sequence[int | str]) -> dict[str, float]:
  """``accuracy`` (fraction correct) and ``format`` (fraction with ``<think> … </think> answer``)."""
  if len(completions) != len(answers):
    raise ValueError(f"{len(completions)} completions for {len(answers)} answers")
  n = max(1, len(completions))
  return {"accuracy": sum(is_correct(c, a) for c, a in zip(completions, answers)) / n,
          "format": sum(answer_lib.format_ok(c) for c in completions) / n}
