"""Splitting long input text into pieces the model can speak one at a time."""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable

# A sentence ends with a run of terminators and any closing quotes or brackets after it.
_CLOSERS = "\"')]}”’」』）】》"
_TERMINATORS = re.compile(r"[.!?;。！？；…]+[" + re.escape(_CLOSERS) + r"]*|\n")
# Clause breaks (after these, or after whitespace) are used inside an over-long sentence.
_CLAUSE_BREAKS = "，、"


def split_text(text: str, max_chars: int) -> list[str]:
    """Split ``text`` into pieces of at most ``max_chars`` characters, verbatim:
    ``"".join(pieces) == text`` always (the model uses text as it is).

    Rule:

    * Text of at most ``max_chars`` characters, and text that is only whitespace, is
      returned whole: ``[text]``.
    * Sentences end after ``! ? ;``, a newline, or ``。！？；…`` (full-width forms
      included), with closing quotes/brackets and the whitespace that follow; a ``.``
      ends a sentence only before whitespace or the end of the text, so ``3.14`` and
      ``example.com`` stay whole. Whole sentences are packed greedily into each piece.
    * A sentence that does not fit is cut after the last whitespace or ``，、`` before
      the limit (an ASCII comma counts through the space after it, so ``1,000`` stays
      whole), and where there is none, hard-cut at the limit.
    * No piece is empty or only whitespace; cuts are chosen (looking ahead) so that the
      rest of the text can still be split that way. Only where the text holds whitespace
      runs so long that no such split exists (about ``max_chars`` or longer) are they
      attached to their neighbouring text, so such a piece exceeds ``max_chars`` by
      whitespace alone: ``len(piece.strip()) <= max_chars`` holds for every piece.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars: must be a positive integer, got {max_chars!r}")
    if not isinstance(text, str):
        raise ValueError(f"text: must be a string, got {type(text).__name__}")
    n = len(text)
    if n <= max_chars or not text.strip():
        return [text]

    # next_text[i]: index of the first non-whitespace character at or after i (n if none)
    next_text = [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        next_text[i] = next_text[i + 1] if text[i].isspace() else i

    sentence_ends = _sentence_ends(text, next_text)
    clause_ends = [i + 1 for i, ch in enumerate(text) if ch.isspace() or ch in _CLAUSE_BREAKS]
    feasible = _feasible_cuts(next_text, max_chars)

    if feasible[0]:
        # A piece [pos, c) must reach some text (c > next_text[pos]), keep to the limit,
        # and leave a rest that can itself be split.
        def window(pos: int) -> tuple[int, int]:
            return next_text[pos], min(pos + max_chars, n)

        def usable(c: int) -> bool:
            return feasible[c]
    else:
        # Pathological whitespace: measure pieces without the whitespace around their
        # text, and cut only just before text, so whitespace rides along with its text.
        def window(pos: int) -> tuple[int, int]:
            start = next_text[pos]
            return start, next_text[min(start + max_chars, n)]

        def usable(c: int) -> bool:
            return next_text[c] == c

    pieces: list[str] = []
    pos = 0
    while True:
        low, high = window(pos)
        if high >= n:
            pieces.append(text[pos:])
            return pieces
        cut = (_last(sentence_ends, low, high, usable) or _last(clause_ends, low, high, usable)
               or next(c for c in range(high, low, -1) if usable(c)))
        pieces.append(text[pos:cut])
        pos = cut


def _sentence_ends(text: str, next_text: list[int]) -> list[int]:
    """Sorted positions just after each sentence and the whitespace that follows it."""
    ends = []
    for match in _TERMINATORS.finditer(text):
        end = match.end()
        only_dots = set(match.group().rstrip(_CLOSERS)) == {"."}
        if only_dots and end < len(text) and not text[end].isspace():
            continue  # ASCII dots inside a word or number: "3.14", "example.com"
        ends.append(next_text[end])
    return sorted(set(ends))


def _feasible_cuts(next_text: list[int], max_chars: int) -> list[bool]:
    """feasible[c]: text[c:] splits into pieces of at most max_chars that each hold
    some non-whitespace (feasible[n] is True: nothing left)."""
    n = len(next_text) - 1
    feasible = [False] * (n + 1)
    feasible[n] = True
    # count[i]: how many feasible positions lie in [i, n]
    count = [0] * (n + 2)
    count[n] = 1
    for c in range(n - 1, -1, -1):
        low, high = next_text[c] + 1, min(c + max_chars, n)  # the piece [c, cut) must hold text
        feasible[c] = low <= high and count[low] - count[high + 1] > 0
        count[c] = count[c + 1] + feasible[c]
    return feasible


def _last(positions: list[int], low: int, high: int, usable: Callable[[int], bool]) -> int | None:
    """The largest usable position p with low < p <= high."""
    i = bisect.bisect_right(positions, high) - 1
    while i >= 0 and positions[i] > low:
        if usable(positions[i]):
            return positions[i]
        i -= 1
    return None
