"""Reading a final answer off a completion, and deciding whether it matches the reference.

Extraction rule, first that applies:
1. the content of the last ``\\boxed{...}`` (braces balanced);
2. the rest of the line after the last "answer is" / "answer:" (case-insensitive), trimmed of
   trailing punctuation;
3. the last number in the text (integers, decimals, fractions like 3/4, with sign and thousands commas).

Equivalence: math-verify's symbolic comparison of the two, or, failing that, equal strings after
normalisation (case, surrounding ``$``, spaces and a trailing period removed). Two plain decimal numbers
that are far apart are unequal without asking math-verify (it costs 1-3 ms a pair, the bulk of scoring a
batch of arithmetic completions, and can only say no to them).
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
PLAIN_DECIMAL = re.compile(r"-?\d+(?:\.\d+)?")
# plain numbers further apart than this (relative to the larger, or absolutely below 1) are unequal under
# any numeric comparison math-verify makes (it rounds to 6 decimals)
FAR_APART = 1e-4
ANSWER_PHRASE = re.compile(r"answer(?:\s+is)?\s*[:=]?\s*(.+)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in ``text`` by the rule in the module docstring, or None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    phrases = ANSWER_PHRASE.findall(text)
    if phrases:
        lines = phrases[-1].strip().splitlines()
        candidate = lines[0].strip().rstrip(".").strip("*$ ").strip() if lines else ""
        if candidate:
            numbers = NUMBER.findall(candidate)
            return numbers[0].replace(",", "") if numbers and len(candidate) > 30 else candidate
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def normalize(answer: str) -> str:
    text = answer.strip().strip("$").strip().rstrip(".").lower()
    return re.sub(r"\s+", "", text.replace(",", "") if NUMBER.fullmatch(text) else text)


def answers_match(predicted: str | None, reference: str) -> bool:
    """Whether ``predicted`` equals ``reference`` symbolically (math-verify) or as normalised text."""
    if predicted is None:
        return False
    a, b = normalize(predicted), normalize(reference)
    if a == b:
        return True
    if PLAIN_DECIMAL.fullmatch(a) and PLAIN_DECIMAL.fullmatch(b):
        x, y = float(a), float(b)
        if abs(x - y) > FAR_APART * max(1.0, abs(x), abs(y)):
            return False
    try:
        from math_verify import parse, verify

        gold, pred = parse(reference), parse(predicted)
        return bool(gold and pred and verify(gold, pred))
    except Exception:  # math-verify raises on odd input or a timeout; that is simply "no match"
        return False
