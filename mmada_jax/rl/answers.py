"""Reading answers out of completions, and deciding whether two answers are equal.

* extraction: :func:`answer_region` (after ``</think>``), :func:`extract_answer` (the final
  answer: ``\\boxed{}``, ``####``, "answer is", the last number), :func:`extract_choice` (a
  multiple-choice letter), :func:`format_ok` (``<think> … </think> answer``);
* normalisation: :func:`normalize_answer`, :func:`parse_number`, :func:`normalize_short_answer`;
* matching: :func:`answers_match` (math answers), :func:`mmu_answer_correct` (multiple choice or
  short answers).

:func:`answers_match` first applies its own rules: numbers (integers, decimals, scientific
notation, ``a/b``, ``\\frac{a}{b}``, mixed ``1\\frac{1}{2}``, thousands separators, ``%``/``°``
stripped) are compared as exact fractions or within a relative tolerance of 1e-4; tuples are
compared element-wise; anything else as a normalised string (``$``, ``\\left``, ``\\right``,
``\\text{}``, spacing commands, ``\\dfrac``/``\\tfrac``, braces, whitespace and case removed,
``x = …`` reduced to its right-hand side). When those rules say "different", and the two answers
are not both plain numbers but both look mathematical (a digit, a LaTeX command or an operator),
it asks ``math-verify`` (LaTeX / expression parsing with sympy), which also accepts
mathematically equal forms (``x+1`` = ``1+x``, ``2\\sqrt{2}`` = ``\\sqrt{8}``). Two plain numbers
are decided by the rules alone, so the numeric tolerance stays exactly 1e-4; words never reach
the CAS (it would read "cat" as c·a·t, equal to "act").
"""
from __future__ import annotations

import math
import re
import threading
from fractions import Fraction
from typing import Any, Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# ------------------------------------------------------------------ extraction

def answer_region(text: str) -> str:
  """The text after the last ``</think>`` when that is non-empty, else the whole text."""
  if THINK_CLOSE in text:
    after = text.rsplit(THINK_CLOSE, 1)[1]
    if after.strip():
      return after
  return text


def last_boxed(text: str) -> str | None:
  """Content of the last ``\\boxed{…}`` / ``\\fbox{…}`` (balanced braces; ``\\boxed 5`` too)."""
  starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)", text)]
  for start in reversed(starts):
    i = start
    while i < len(text) and text[i] == " ":
      i += 1
    if i < len(text) and text[i] == "{":
      depth, j = 0, i
      while j < len(text):
        if text[j] == "{":
          depth += 1
        elif text[j] == "}":
          depth -= 1
          if depth == 0:
            return text[i + 1:j]
        j += 1
      continue
    m = re.match(r"[^\s$]+", text[i:])
    if m and i > start:
      return m.group(0)
  return None


_NUMBER_RE = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|[+-]?\.\d+"
_ANSWER_IS = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
  """The final answer of a completion, or None.

  Searched in the answer region (after ``</think>``): the last ``\\boxed{}``; the text after the
  last ``####`` (first line); the text after the last "answer is" / "answer:" (first line,
  trailing period dropped); the last number. A ``\\boxed{}`` inside the reasoning is the final
  fallback.
  """
  if not text:
    return None
  region = answer_region(text)
  boxed = last_boxed(region)
  if boxed is not None and boxed.strip():
    return boxed.strip()
  if "####" in region:
    tail = region.rsplit("####", 1)[1].strip().splitlines()
    if tail and tail[0].strip():
      return tail[0].strip()
  matches = list(_ANSWER_IS.finditer(region))
  if matches:
    cand = matches[-1].group(1).strip().splitlines()[0].strip()
    cand = re.sub(r"[.\s]+$", "", cand)
    if cand:
      return cand
  nums = re.findall(_NUMBER_RE, region)
  if nums:
    return nums[-1]
  boxed = last_boxed(text)
  return boxed.strip() if boxed else None


# ------------------------------------------------------------------ normalisation and comparison

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")


def normalize_answer(s: str) -> str:
  """A canonical string for comparison (see the module docstring); '' for None."""
  if s is None:
    return ""
  s = str(s).strip()
  for _ in range(2):
    s = _TEXT_CMD.sub(r"\1", s)
  for tok in ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ", "$"):
    s = s.replace(tok, "")
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
  s = s.replace("\\circ", "").replace("°", "").replace("\\%", "").replace("%", "")
  s = re.sub(r"\s+", "", s)
  s = s.rstrip(".")
  m = re.fullmatch(r"[A-Za-z]\w*=([^=]+)", s)
  if m:
    s = m.group(1)
  while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and _balanced(s[1:-1]):
    s = s[1:-1]
  return s


def _balanced(s: str) -> bool:
  depth = 0
  for ch in s:
    depth += ch == "{"
    depth -= ch == "}"
    if depth < 0:
      return False
  return depth == 0


_FRAC = r"\\frac(?:\{([^{}]+)\}|(\d))(?:\{([^{}]+)\}|(\d))"


def parse_number(s: str) -> Fraction | None:
  """The exact value of a normalised numeric answer, or None (not a plain number)."""
  if not s:
    return None
  s = s.strip()
  if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
    s = s.replace(",", "")
  if re.fullmatch(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", s):
    return Fraction(s)
  m = re.fullmatch(r"([+-]?(?:\d+\.?\d*|\.\d+))/([+-]?(?:\d+\.?\d*|\.\d+))", s)
  if m:
    den = Fraction(m.group(2))
    return Fraction(m.group(1)) / den if den != 0 else None
  m = re.fullmatch(r"([+-]?)(\d*)" + _FRAC, s)
  if m:
    num = parse_number(m.group(3) or m.group(4))
    den = parse_number(m.group(5) or m.group(6))
    if num is None or den is None or den == 0:
      return None
    value = (Fraction(int(m.group(2))) if m.group(2) else Fraction(0)) + num / den
    return -value if m.group(1) == "-" else value
  return None


def numbers_close(a: Fraction, b: Fraction, rel_tol: float = 1e-4, abs_tol: float = 1e-8) -> bool:
  """Exact equality, or ``math.isclose`` of the floats with the given tolerances."""
  return a == b or math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=abs_tol)


def _first_number(s: str) -> Fraction | None:
  m = re.search(r"[+-]?\d*" + _FRAC, s) or re.search(_NUMBER_RE, s)
  return parse_number(m.group(0)) if m else None


def _split_tuple(s: str) -> tuple[str, list[str]] | None:
  """('()' / '[]' / '', top-level comma-separated items) for a tuple-like answer, else None."""
  brackets = ""
  if len(s) >= 2 and s[0] + s[-1] in ("()", "[]", "(]", "[)"):
    brackets, s = s[0] + s[-1], s[1:-1]
  items, depth, cur = [], 0, ""
  for ch in s:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == "," and depth == 0:
      items.append(cur)
      cur = ""
    else:
      cur += ch
  items.append(cur)
  return (brackets, items) if len(items) > 1 else None


def _canon(s: str) -> str:
  return s.replace("{", "").replace("}", "").lower()


_MATHY = re.compile(r"[0-9\\^_+\-*/=()\[\]{}]")
"""A character that makes a normalised answer mathematical (a digit, a LaTeX command, an operator)."""


def _rules_match(p: str, r: str, rel_tol: float, symbolic: bool) -> bool:
  """The module's own rules on normalised answers ``p`` (prediction) and ``r`` (reference)."""
  if p == r:
    return True
  rn = parse_number(r)
  if rn is not None:
    pn = parse_number(p)
    if pn is None:
      pn = _first_number(p)
    return pn is not None and numbers_close(pn, rn, rel_tol)
  rt, pt = _split_tuple(r), _split_tuple(p)
  if rt is not None and pt is not None:
    return rt[0] == pt[0] and len(rt[1]) == len(pt[1]) and all(
        answers_match(a, b, rel_tol, symbolic) for a, b in zip(pt[1], rt[1]))
  return _canon(p) == _canon(r)


def symbolic_equal(pred: str, ref: str) -> bool:
  """Whether ``math-verify`` parses both answers (as LaTeX or a plain expression) to equal values.

  Its timeouts use ``signal.alarm``, which works only in the main thread; elsewhere they are off.
  An answer it cannot parse is not equal to anything.
  """
  import math_verify  # imported here: it loads sympy (about a second)
  timeout = 5 if threading.current_thread() is threading.main_thread() else None
  gold = math_verify.parse("$" + str(ref).replace("$", "") + "$", parsing_timeout=timeout)
  got = math_verify.parse("$" + str(pred).replace("$", "") + "$", parsing_timeout=timeout)
  return bool(gold and got and math_verify.verify(gold, got, timeout_seconds=timeout))


def answers_match(pred: str | None, ref: Any, rel_tol: float = 1e-4, symbolic: bool = True) -> bool:
  """Whether a predicted final answer equals the reference (numbers, tuples, or strings).

  The module's rules decide first, and alone when the reference is a plain number: an
  unevaluated expression such as "3+4" is not the answer 7 (a CAS would say equal, which would
  reward restating an arithmetic question). When the rules say "different", the reference is not a
  plain number, and both contain a digit, a LaTeX command or an operator (so that words such as
  "cat" / "act" are never read as products of symbols), ``symbolic=True`` asks
  :func:`symbolic_equal`.
  """
  if pred is None or ref is None:
    return False
  p, r = normalize_answer(pred), normalize_answer(str(ref))
  if not p or not r:
    return False
  if _rules_match(p, r, rel_tol, symbolic):
    return True
  if not symbolic or parse_number(r) is not None:
    return False   # numeric references: the rules' numeric comparison is the answer
  if not (_MATHY.search(p) and _MATHY.search(r)):
    return False   # words: a CAS reads "cat" as c·a·t (= "act"), so text answers stay with the rules
  return symbolic_equal(pred, str(ref))


# ------------------------------------------------------------------ multiple choice / short answers

_CHOICE_KEY = re.compile(
    r"(?i:answer|option|choice)\s*(?i:is|:)?\s*[:\-]?\s*(?:\(\s*([A-Za-z])\s*\)|([A-Z])(?![A-Za-z]))")


def _letter(s: str) -> str | None:
  """The letter of 'B', '(B)', 'B.', 'B)', 'B. text', '(b)'; None otherwise."""
  s = s.strip()
  m = re.fullmatch(r"\(\s*([A-Za-z])\s*\)[.:]?(?:\s.*)?", s, re.DOTALL)
  if m:
    return m.group(1).upper()
  m = re.fullmatch(r"([A-Z])(?:[.):](?:\s.*)?)?", s, re.DOTALL)
  return m.group(1) if m else None


def extract_choice(text: str) -> str | None:
  """The chosen option letter of a completion (upper case), or None.

  In the answer region: the last ``\\boxed{}`` holding a letter; the last "answer/option/choice
  is X" / "(x)"; a region that starts with a letter ('B', '(B)', 'B. …'); the last '(X)'.
  """
  if not text:
    return None
  region = answer_region(text)
  boxed = last_boxed(region)
  if boxed is not None:
    letter = _letter(normalize_answer(boxed)) or _letter(boxed)
    if letter:
      return letter
  matches = list(_CHOICE_KEY.finditer(region))
  if matches:
    m = matches[-1]
    return (m.group(1) or m.group(2)).upper()
  letter = _letter(region.strip().splitlines()[0] if region.strip() else "")
  if letter:
    return letter
  parens = re.findall(r"\(([A-Z])\)", region)
  return parens[-1] if parens else None


_ARTICLES = {"a", "an", "the"}


def normalize_short_answer(s: str) -> str:
  """VQA-style: lower case, punctuation removed (decimal points kept), articles dropped."""
  s = str(s).lower().strip()
  s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)
  s = re.sub(r"[^\w\s.]", " ", s)
  return " ".join(w for w in s.split() if w not in _ARTICLES)


def _short_answer(text: str) -> str:
  region = answer_region(text)
  boxed = last_boxed(region)
  if boxed is not None and boxed.strip():
    return boxed.strip()
  matches = list(_ANSWER_IS.finditer(region))
  if matches:
    return re.sub(r"[.\s]+$", "", matches[-1].group(1).strip().splitlines()[0])
  lines = region.strip().splitlines()
  return lines[0].strip() if lines else ""


def mmu_answer_correct(completion: str, reference: Any, choices: Sequence[str] | None = None) -> bool:
  """Multiple choice when ``choices`` is given or the reference is a single letter ('B', '(B)');
  otherwise a short answer (numeric/symbolic match, yes/no on the first word, or equal
  normalised text). With ``choices``, an answer quoting an option's text counts as that letter.
  """
  if completion is None or reference is None:
    return False
  ref = str(reference).strip()
  ref_letter = _letter(ref) if (choices or re.fullmatch(r"\(?[A-Z]\)?\.?", ref)) else None
  if ref_letter is not None:
    got = extract_choice(completion)
    if got is None and choices:
      said = normalize_short_answer(_short_answer(completion))
      for i, c in enumerate(choices):
        if said and said == normalize_short_answer(c):
          got = chr(ord("A") + i)
          break
    return got == ref_letter
  said = _short_answer(completion)
  if answers_match(said, ref):
    return True
  ns, nr = normalize_short_answer(said), normalize_short_answer(ref)
  if nr in ("yes", "no"):
    return ns.split()[:1] == [nr]
  return bool(nr) and ns == nr


# ------------------------------------------------------------------ format

_FORMAT = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)


def format_ok(text: str) -> bool:
  """``<think> non-empty </think> non-empty answer``, one tag of each, nothing before ``<think>``."""
  if not text or text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
    return False
  m = _FORMAT.fullmatch(text)
  return bool(m and m.group(1).strip() and m.group(2).strip())
