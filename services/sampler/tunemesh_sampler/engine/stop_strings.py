"""Stop strings checked as a row grows, at a cost per step that does not grow with the row.

Checking the whole row's text every step (detokenize everything, search every stop) costs
O(n) per step and O(n^2) over a generation. A stop string that appears at step t ends in
the text of the newest token, so it lies within the text of the last few tokens: a stop
of L characters spans at most 4 L tokens (one byte per token, at worst, for 4-byte UTF-8
characters). Each step decodes only the last `4 L + WINDOW_MARGIN` tokens and searches
that; only when a stop shows up there is the whole text decoded, to confirm it and to
find where to cut (the same cut as before: the tokens before the first token whose prefix
text holds the stop, so the returned text holds no stop string).

A window may start inside a multi-byte character (its text then starts with U+FFFD) or,
for SentencePiece tokenizers, drop the leading space of its first token; neither can hide
a stop that ends at the newest token, and the full-text confirmation rules out a match
the row's real text does not hold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

WINDOW_MARGIN = 8  # tokens beyond the longest stop's worst case


class StopStrings:
    """A request's stop strings over a `detokenize` (token ids -> text)."""

    def __init__(self, stops: Sequence[str], detokenize: Callable[[list[int]], str]) -> None:
        self._stops = [s for s in stops if s]
        self._detokenize = detokenize
        self._window = 4 * max((len(s) for s in self._stops), default=0) + WINDOW_MARGIN

    def __bool__(self) -> bool:
        return bool(self._stops)

    def cut(self, tokens: Sequence[int]) -> int | None:
        """None while the text of `tokens` holds no stop string (checked after each new
        token); else how many tokens to keep."""
        if not self._stops or not self._holds(tokens[-self._window :]):
            return None
        if not self._holds(tokens):
            return None
        first = len(tokens)  # the first k whose prefix tokens[:k] holds a stop: near the end
        while first > 1 and self._holds(tokens[: first - 1]):
            first -= 1
        return first - 1

    def _holds(self, tokens: Sequence[int]) -> bool:
        text = self._detokenize(list(tokens))
        return any(s in text for s in self._stops)
