"""Incremental detokenization: the text of a growing token list at a constant cost per token.

Decoding a request's whole output at every step costs O(length) per token, O(length^2) per
request: for 128 streams of a few hundred tokens that is milliseconds of Python per step,
under the GIL the step thread needs. `IncrementalText` decodes only a window: the tokens of the
last piece it emitted (the context that spacing and merges at the seam depend on) and the new
ones, and emits what the new tokens add. A window whose text ends inside a character (U+FFFD)
waits for the tokens that complete it.

Windows are decoded without HF's clean_up_tokenization_spaces (which can shorten the text
a token before it and so break the window's arithmetic), as streaming servers do. The pieces
join to the decode of the whole list for tokenizers whose decode is a concatenation of their
tokens' texts given their left neighbour (byte-level BPE, SentencePiece, word-level, WordPiece),
with two differences: no clean-up of spaces, and invalid UTF-8 in the output, which a whole
decode may turn into U+FFFD differently.
"""

from __future__ import annotations


class IncrementalText:
    """The text of a growing token list, handed out in pieces that end on whole characters;
    with stop strings, the last characters that could begin one are held back until the end,
    and the final text ends before the stop string that ended it."""

    CONTEXT = 8  # prompt tokens decoded before the output (spaces and merges at the seam)

    def __init__(self, tokenizer, prompt: list[int], stops=None):
        self.tok, self.ids = tokenizer, list(prompt)[-self.CONTEXT:]
        self.prefix, self.read = 0, len(self.ids)  # ids[prefix:read]: the last piece's tokens
        self.seen = 0  # output tokens taken in
        self.text = ""  # the output's text so far (whole characters)
        self.shown = ""  # what delta() has handed out (text less what is held back)
        self.hold = max([len(s) for s in stops or []] + [1]) - 1
        self.plain = False  # the tokenizer's decode takes no clean_up_tokenization_spaces

    def _decode(self, ids: list[int]) -> str:
        if self.plain:
            return self.tok.decode(ids)
        try:
            return self.tok.decode(ids, clean_up_tokenization_spaces=False)
        except TypeError:  # a decode without the option (tokenizers.Tokenizer, ByteTokenizer)
            self.plain = True
            return self.tok.decode(ids)

    def add(self, tokens: list[int], final: bool = False, end: int | None = None) -> str:
        """Takes in the output tokens past those seen (tokens[:end]: the whole output so far)
        and returns the text they complete (at the end, `final`, whatever they decode to)."""
        end = len(tokens) if end is None else end
        self.ids += tokens[self.seen:end]
        self.seen = end
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        self.text += now[len(before):]
        return now[len(before):]

    def delta(self, tokens: list[int], final: bool = False, stop: str | None = None) -> str:
        """The text to show next, tokens being the whole output so far; `stop`: the stop string
        that ended it (the text ends before it)."""
        self.add(tokens, final or stop is not None)
        text = self.text
        if stop is not None:
            at = text.find(stop)
            text = text[:at] if at >= 0 else text
        elif not final:
            text = text[:max(0, len(text) - self.hold)]
        # (text already shown cannot be taken back from the client: only what lies past it
        # is sent)
        piece = text[len(self.shown):]
        self.shown = text
        return piece
