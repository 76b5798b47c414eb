"""Reading a final answer off a completion, and deciding whether it matches the reference.

Extraction rule, first that applies:
1. the content of the last ``\\boxed{...}`` (braces balanced);
2. the rest of the line after the last "answer is" / "answer:" (case-insensitive), trimmed of
   trailing punctuation;
3. the last number in the text (integers, decimals, fractions like 3/4, with sign and thousands commas).

Equivalence. A numeric reference (an integer, decimal or fraction) is matched only by a numeric final answer: an
integer, a decimal or a fraction in lowest terms (``3/4``, ``\\frac{3}{4}``), with sign, thousands separators,
``$...$``, ``\\text{...}``, brackets, leading words or a trailing unit around it (``dollars``, ``\\mathrm{cm}``,
``\\%``, ``^\\circ``); of an equation (``9 + 9 = 18``) the side after the last ``=`` counts. A reference is a
number only as written (LaTeX units at most: ``D3``, ``34a``, ``6.00i``, ``5 days`` are not). An integer
reference is matched only by its exact value (a tolerance would let ``-131073145`` answer ``-131073014``), a short
decimal by its digits (no tolerance relative to its size: ``569204311.663`` is not ``569204296.88``), or, where it
may be rounded (a dataset's, not a generator's), by a more precise answer once rounded to its decimals (``1/3``
for ``0.33``; ``12.0`` is exact); a fraction or a computed float (six decimals or more) within 1e-6 of it
(relative to max(1, |reference|)). Digits apart (``0 3 0 1``) are a sequence, not a number, and a
number too long for Python to convert (over 4,300 digits) is no answer. An expression that still has to be
computed (``4 - 1``, ``2 \\times 3``, ``\\frac{12}{2}``) is not an answer: a symbolic checker evaluates it, and
a policy trained on that reward learns to box the question itself (SmolLM2 under full training, 2026-12-02: 500
of 500 "correct" answers of the form ``\\boxed{4 - 1}``). Other references (expressions, sets, words) are
compared as normalised text (case, surrounding ``$``, spaces and a trailing period removed) or, without words,
by math-verify's symbolic equivalence with both sides read as LaTeX (bare, it reads ``5\\sqrt{2}`` as 5).
"""

from __future__ import annotations

import math
import re
import string
from fractions import Fraction

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# a whole final answer that is a number: sign, digits with optional thousands commas, optional decimals
NUMERAL = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
FRACTION = re.compile(r"([-+]?)(?:(\d+)/(\d+)|\\[dt]?frac\{([-+]?\d+)\}\{(\d+)\}|\\[dt]?frac(\d)(\d))")
WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|boxed)\{(.*)\}|\{(.*)\}|\(([^,]*)\)")  # or {-4}, (-4)
THOUSANDS_SPACE = re.compile(r"(?<=\d)[ \u00a0](?=\d{3}(?!\d))")
DIGITS_APART = re.compile(r"\d\s+\d")
LEAD = re.compile(r"^[A-Za-z]+(?=[-+.\d])")  # "simply 12", "about 3"
UNIT_WORDS = re.compile(r"[A-Za-z ]*")  # inside a trailing \text{...}
UNIT_COMMANDS = ("\\text{", "\\mathrm{", "\\textrm{", "\\mbox{")
UNIT_MARKS = ("\\%", "%", "^\\circ", "^{\\circ}", "\u00b0")
TOLERANCE = 1e-6  # relative to max(1, |reference|), as math-verify's numeric comparison
# a word of three letters or more (not a product like 2xy), neither a LaTeX command (\\sqrt) nor right inside
# one's braces
WORD = re.compile(r"(?<![\\A-Za-z{])[A-Za-z]{3,}")
TEXT_COMMAND = re.compile(r"\\(?:text|textrm|textbf|mathrm|mbox|operatorname)\{[^{}]*\}")
FLOAT_NOISE_PLACES = 6  # a reference with this many decimals or more is a computed float: the tolerance applies
# the first word of a quantity: a number, and a unit written against it ("34days"); no nested repetition
QUANTITY_HEAD = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?([A-Za-z]*)")
# each part of the phrase starts with what the one before cannot match, so that a run of whitespace after
# "answer" backtracks in linear, not quadratic, time; an "is", ":" or "=" is taken whenever it is there (it is
# never the answer)
ANSWER_PHRASE = re.compile(r"answer(?:\s+is|(?!\s+is))(?:\s*[:=]|(?!\s*[:=]))\s*(\S.*)", re.IGNORECASE)


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
    text = unwrapped(answer.strip().strip("$").strip()).rstrip(".").lower()  # \text{yes} is yes
    return re.sub(r"\s+", "", text.replace(",", "") if NUMBER.fullmatch(text) else text)


def unwrapped(text: str) -> str:
    """``text`` without the wrappers around it (``\\text{...}``, ``{...}``, ``(...)`` without a comma: not a
    pair or an interval); at most 8 deep: a real answer has a few, a degenerate one thousands."""
    for _ in range(8):
        if (wrapped := WRAPPER.fullmatch(text)) is None:
            break
        text = next(g for g in wrapped.groups() if g is not None)
    return text


def numeric_value(answer: str, reference: bool = False) -> Fraction | None:
    """The value of ``answer`` if it is written as a number (module docstring), else None. A model's answer must
    give a fraction in lowest terms (``12/2`` restates a division rather than answering it), and may have leading
    words, an equation or unit words around its number. A ``reference`` is read as written: any fraction, LaTeX
    units (``\\text{ cm}``, ``\\%``) at most; ``D3``, ``34a``, ``6.00i``, ``5 days`` or ``C=3,Y=5`` are not numbers
    (comparing their digits would pay ``3`` for a board point, ``5 seconds`` for ``5 days``)."""
    text = THOUSANDS_SPACE.sub("", answer)  # "1 234"
    if DIGITS_APART.search(text):  # "0 3 0 1" (a sequence, a grid), "2 3/4": not one number
        return None
    text = re.sub(r"\s+|\\[,!; ]|\\left|\\right", "", text.replace("\u2212", "-").replace("{,}", ","))
    text = unwrapped(text.strip("$").rstrip(".").replace("\\$", ""))
    if not reference:  # "x = (3)", "9 + 9 = 18": the value after the last "="
        text = unwrapped(LEAD.sub("", text.rsplit("=", 1)[-1]))
    if NUMERAL.match(text) and not NUMERAL.fullmatch(text):
        text = without_unit(text, words=not reference)
    if NUMERAL.fullmatch(text):
        try:
            return Fraction(text.replace(",", ""))
        except ValueError:  # more digits than Python converts: no answer
            return None
    fraction = FRACTION.fullmatch(text)
    if fraction is None:
        return None
    try:
        sign = fraction[1]
        numerator = int(fraction[2] or fraction[4] or fraction[6])
        denominator = int(fraction[3] or fraction[5] or fraction[7])
    except ValueError:  # more digits than Python converts
        return None
    if denominator == 0 or (not reference and (denominator == 1 or math.gcd(numerator, denominator) != 1)):
        return None
    return Fraction(-numerator if sign == "-" else numerator, denominator)


def without_unit(text: str, words: bool = True) -> str:
    """``text`` without the unit words and marks at its end (``18dollars``, ``18\\text{ dollars}``,
    ``12\\mathrm{cm}``, ``50\\%``, ``90^\\circ``; bare letters only with ``words``), read right to left in linear
    time: the regex this replaces, a repetition of repetitions, backtracked exponentially on a run of letters
    followed by anything else, and a model's ``\\boxed{3 and...2}`` hung a scan's scoring."""
    end = len(text)
    while end:
        mark = next((m for m in UNIT_MARKS if text.endswith(m, 0, end)), None)  # before letters: ^\circ
        if mark:
            end -= len(mark)
            continue
        if words and text[end - 1] in string.ascii_letters:
            end -= 1
            continue
        word = next((start for command in UNIT_COMMANDS if text[end - 1] == "}"
                     and (start := text.rfind(command, 0, end)) >= 0
                     and UNIT_WORDS.fullmatch(text, start + len(command), end - 1)), None)
        if word is None:
            break
        end = word
    return text[:end]


def units_differ(predicted: str, reference: str) -> bool:
    """Whether ``predicted`` and ``reference`` are each a number with unit words and the words differ (singular
    and plural, and case, aside): ``34 seconds`` for ``34 days``. A generator's verifier may read only the number
    (reasoning-gym 0.1.25's time_intervals), which would pay the wrong unit; an answer without a unit is left to it."""
    ours, theirs = _unit_words(predicted), _unit_words(reference)
    return ours is not None and theirs is not None and ours != theirs


def _unit_words(text: str) -> list[str] | None:
    """The unit words of a quantity ("34 days" -> ["day"], "2.5 square metres." -> ["square", "metre"]), or None
    when ``text`` is not a number followed by words (read word by word: linear time on any text)."""
    words = text.strip().rstrip(".").split()
    head = QUANTITY_HEAD.fullmatch(words[0]) if words else None
    if head is None:
        return None
    units = ([head[1]] if head[1] else []) + words[1:]
    if not units or not all(w.isascii() and w.isalpha() for w in units):
        return None
    return [w[:-1] if w.endswith("s") and len(w) > 3 else w for w in map(str.lower, units)]


def numbers_match(value: Fraction, reference: Fraction, reference_text: str, rounded: bool = True) -> bool:
    """Whether a numeric answer equals a numeric reference (module docstring). ``rounded``: the reference may be a
    rounded value (a dataset's ``0.33`` for 1/3), which an answer more precise than it matches once rounded to
    its decimals; a generator's references (Python floats) are exact."""
    if value == reference:
        return True
    decimals = re.search(r"\.(\d+)", reference_text)
    places = len(decimals[1]) if decimals else 0
    if reference.denominator == 1 and not places:  # an integer ($5$, 1,\!000): exactly
        return False
    if decimals is None or places >= FLOAT_NOISE_PLACES:
        # 1/3, or a computed float's last digits (0.30000000000000004): within the tolerance
        return abs(value - reference) <= TOLERANCE * max(1, abs(reference))
    # a short decimal's digits are what it says (569204296.88 is not 569204311.663, 12.0 not 11.96)
    more_precise = (value * 10 ** places).denominator != 1
    return rounded and more_precise and set(decimals[1]) != {"0"} and round(value, places) == reference


def answers_match(predicted: str | None, reference: str, rounded: bool = True) -> bool:
    """Whether ``predicted`` is the answer ``reference`` (module docstring); ``rounded`` as in
    :func:`numbers_match`."""
    if predicted is None:
        return False
    reference_value = numeric_value(reference, reference=True)
    if reference_value is not None:
        value = numeric_value(predicted)
        return value is not None and numbers_match(value, reference_value, reference, rounded)
    if normalize(predicted) == normalize(reference):
        return True
    if WORD.search(TEXT_COMMAND.sub("", reference)):  # "5 days", "yes": text, which math-verify would read as
        return False                                      # its number or drop (a \text{ cm} unit is LaTeX's)
    try:
        from math_verify import parse, verify

        # as LaTeX: bare, math-verify falls back to a string's last number (5\sqrt{2} would be 5, \{1, 2\} 2)
        gold, pred = parse(f"${reference.strip().strip('$')}$"), parse(f"${predicted.strip().strip('$')}$")
        return bool(gold and pred and verify(gold, pred))
    except Exception:  # math-verify raises on odd input or a timeout; that is simply "no match"
        return False
