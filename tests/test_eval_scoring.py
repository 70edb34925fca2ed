"""Benchmark scorers on hand-made cases."""
from __future__ import annotations

import pytest

from mmada_jax.eval import scoring


def test_gsm8k():
  ref = scoring.gsm8k_reference("She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 1,018")
  assert ref == "1018"
  assert scoring.gsm8k_score("so 1,000 + 18 = 1018.\n#### 1018", ref) == 1.0
  assert scoring.gsm8k_score("The answer is $1,018$.", ref) == 1.0
  assert scoring.gsm8k_score("<think>3 + 4 = 7</think> \\boxed{1018}", ref) == 1.0
  assert scoring.gsm8k_score("I got 1017 then 1018 and finally 12", ref) == 0.0     # the last number
  assert scoring.gsm8k_score("", ref) == 0.0
  with pytest.raises(ValueError, match="no '#### N'"):
    scoring.gsm8k_reference("no final answer")


def test_math():
  ref = scoring.math_reference("We get $\\frac{1}{2} \\cdot 3 = \\boxed{\\dfrac{3}{2}}$.")
  assert ref == "\\dfrac{3}{2}"
  assert scoring.math_score("so the answer is \\boxed{1.5}", ref) == 1.0
  assert scoring.math_score("\\boxed{\\frac32}", ref) == 1.0
  assert scoring.math_score("\\boxed{2}", ref) == 0.0
  assert scoring.math_score("\\boxed{x+1}", "1+x") == 1.0
  with pytest.raises(ValueError, match="no \\\\boxed"):
    scoring.math_reference("the answer is 3")


def test_multiple_choice():
  assert scoring.choice_letter(2) == "C" and scoring.choice_letter("(b)") == "B" and scoring.choice_letter("3") == "D"
  with pytest.raises(ValueError, match="outside the 4 choices"):
    scoring.choice_letter(4, num_choices=4)
  with pytest.raises(ValueError, match="neither a letter nor an index"):
    scoring.choice_letter("maybe")
  choices = ["red", "green", "blue", "black"]
  assert scoring.choice_score("The answer is (C).", "C", choices) == 1.0
  assert scoring.choice_score("B. green", "B", choices) == 1.0
  assert scoring.choice_score("blue", "C", choices) == 1.0                 # quoting the option's text
  assert scoring.choice_score("Answer: A", "C", choices) == 0.0


def test_vqa_normalisation_and_accuracy():
  assert scoring.normalize_vqa("Two dogs!") == "2 dogs"
  assert scoring.normalize_vqa("The Cat.") == "cat"
  assert scoring.normalize_vqa("1,000") == "1000" and scoring.normalize_vqa("2.5") == "2.5"
  assert scoring.normalize_vqa("dont know") == "don't know"
  assert scoring.normalize_vqa("black-and-white") == "black and white"
  refs = ["2"] * 10
  assert scoring.vqa_accuracy("two", refs) == 1.0
  assert scoring.vqa_accuracy("3", refs) == 0.0
  three = ["2"] * 3 + ["3"] * 7
  assert scoring.vqa_accuracy("2", three) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
  one = ["2"] + ["3"] * 9
  assert scoring.vqa_accuracy("Two", one) == pytest.approx(9 * (1 / 3) / 10)
  assert scoring.vqa_accuracy("A table", ["table"]) == 1.0               # GQA: one answer, exact match
  with pytest.raises(ValueError, match="at least one"):
    scoring.vqa_accuracy("x", [])
  assert scoring.short_answer("<think>hmm</think> Yes.\nbecause") == "Yes"


def test_pope():
  assert [scoring.yes_no(t) for t in ("Yes, there is.", "No.", "There is not a dog.", "There isn't one", "dog")] \
      == ["yes", "no", "no", "no", "yes"]
  m = scoring.pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
  assert m["accuracy"] == pytest.approx(3 / 5) and m["precision"] == pytest.approx(2 / 3)
  assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == 0.6
  with pytest.raises(ValueError, match="'maybe' is not"):
    scoring.pope_metrics(["maybe"], ["yes"])


def test_mean_and_stderr():
  assert scoring.mean_and_stderr([1.0]) == (1.0, 0.0)
  mean, se = scoring.mean_and_stderr([1.0, 0.0, 1.0, 0.0])
  assert mean == 0.5 and se == pytest.approx((1 / 3) ** 0.5 / 2)


def test_truthfulqa_mc2():
  import math
  from mmada_jax.eval import scoring
  got = scoring.truthfulqa_mc2([math.log(0.2), math.log(0.1), math.log(0.3)], [1, 1, 0])
  assert abs(got - 0.5) < 1e-12
  assert abs(scoring.truthfulqa_mc2([-1000.0, -1001.0], [1, 0]) - 1 / (1 + math.exp(-1))) < 1e-12
  with pytest.raises(ValueError, match="truthfulqa_mc2"):
    scoring.truthfulqa_mc2([0.0], [0])
