"""Generated tokens as the text an answer gives: decoded as they come, cut before the first stop string.

Text that may be the start of a stop string is held back until the next tokens tell, so a stop string is never
sent, even in part. Each token keeps its offset in the answer, its log-probability and its top alternatives as
strings, for the completions API's `logprobs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Sequence

from ernie_paddle.text.chat_output import partial_tag_length as _held_back  # the longest end of a text that begins one of some strings
from ernie_paddle.text.tokenizer import IncrementalDecoder
from ernie_paddle.serving.engine import Token


@dataclass
class TokenText:
    """A generated token in the answer: its string, where its text starts, its log-probability and alternatives."""

    id: int
    string: str  # the token alone, special tokens included (what logprobs show)
    offset: int  # of its text in the answer
    logprob: float | None = None
    top: dict[str, float] | None = None  # the most likely tokens and the chosen one: {string: logprob}
    alternatives: list[tuple[str, float]] | None = None  # the most likely tokens, most likely first (chat's shape)


@dataclass
class Piece:
    """Text released to the client, and the tokens whose text it completes."""

    text: str = ""
    tokens: list[TokenText] = field(default_factory=list)


class TextStream:
    """Tokens in, text out: `push(token)` gives the text it releases; `stopped` once a stop string matched (the text
    ends before it); `finish()` releases what was held back when generation ended otherwise."""

    def __init__(self, tokenizer, prompt: Sequence[int], stops: Sequence[str] = (), keep: Collection[str] = ()):
        self.tok, self.stops = tokenizer, list(stops)
        self.decoder = IncrementalDecoder(tokenizer, prompt, keep=keep)
        self.previous = int(prompt[-1]) if len(prompt) else None  # the token before the next: a string's context
        self.held = ""  # decoded, not released: it may begin a stop string
        self.held_tokens: list[tuple[TokenText, int]] = []  # (token, end of its text in the answer)
        self.released = 0  # characters of the answer sent
        self.stopped = False

    def push(self, token: Token) -> Piece:
        """Add one generated token; the text (and tokens) it lets go. Must not be called once `stopped`."""
        delta = self.decoder.push(token.id)
        start = self.released + len(self.held)
        entry = TokenText(token.id, "", start)
        if token.logprob is not None:
            entry.string = self._string(token.id)
            entry.logprob = token.logprob
            entry.alternatives = [(self._string(i), p) for i, p in token.top or ()]
            entry.top = dict(entry.alternatives)
            entry.top.setdefault(entry.string, token.logprob)
        self.previous = token.id
        self.held += delta
        self.held_tokens.append((entry, start + len(delta)))
        cut = _first_match(self.held, self.stops)
        if cut is not None:
            self.stopped = True
            return self._release(cut, cut_here=True)
        return self._release(len(self.held) - _held_back(self.held, self.stops))

    def finish(self) -> Piece:
        """Generation ended (eos, a stop id or max_tokens): release everything."""
        return self._release(len(self.held))

    def _release(self, n: int, cut_here: bool = False) -> Piece:
        """Send the first `n` held characters and the tokens they complete; at a stop string, the tokens whose text
        starts before the cut, and nothing after it."""
        end = self.released + n
        if cut_here:
            tokens, rest = [t for t, _ in self.held_tokens if t.offset < end], []
        else:
            done = next((i for i, (_, stop) in enumerate(self.held_tokens) if stop > end), len(self.held_tokens))
            tokens, rest = [t for t, _ in self.held_tokens[:done]], self.held_tokens[done:]
        piece = Piece(self.held[:n], tokens)
        self.held, self.held_tokens, self.released = self.held[n:] if not cut_here else "", rest, end
        return piece

    def _string(self, token_id: int) -> str:
        """The token's text after the previous token (so a word-initial space shows), special tokens included."""
        if self.previous is None:
            return self.tok.decode([token_id])
        before = self.tok.decode([self.previous])
        both = self.tok.decode([self.previous, token_id])
        return both[len(before):] if both.startswith(before) else self.tok.decode([token_id])


def _first_match(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else None
