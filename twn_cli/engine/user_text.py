"""Users' text made safe to place in a prompt: read as text, never as control tokens, and of bounded length.

A tokenizer matches its added tokens (`<|im_end|>`, `<|image_pad|>`, `<think>`, ...) in the prompt string
before anything else, so the same characters typed by a user would end the turn, ask for a picture that is
not there, or open a thought. Each such marker in user text gets a zero-width space after its first
character: it looks the same and is encoded as the plain text it is. A text longer than the backbone's
positions leave room for (or than an explicit limit) is cut at a token boundary and counted.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

ZERO_WIDTH_SPACE = "\u200b"
# Prompt tokens around the user's text that it must leave room for: the chat template's turn markers and
# system prompt, the think markers, the queries and the CoT budget are counted apart from this.
TEMPLATE_TOKENS = 64
# A marker is an added token that is special, or that looks like markup (<think>, <tool_call>, ...); other
# added tokens are ordinary words the tokenizer was given, which users' text should still use.
_MARKUP = re.compile(r"<.+>|\[.+\]")


class UserText:
    """Neutralises control tokens in users' text and cuts it to `limit` tokens; counts what it cut."""

    def __init__(self, tokenizer, positions: int | None, markers: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.positions = positions  # the backbone's positions; None: unbounded
        self.max_tokens: int | None = None  # an explicit limit (--max-text-tokens) instead of the positions'
        self.truncated = 0  # texts cut so far
        added = [token for token in tokenizer.added_tokens_decoder.values() if token.special or _MARKUP.fullmatch(token.content)]
        found = {token.content for token in added} | set(markers)
        controls = sorted((marker for marker in found if len(marker) > 1), key=len, reverse=True)
        self._controls = re.compile("|".join(map(re.escape, controls))) if controls else None

    def limit(self, reserved: int) -> int | None:
        """The most tokens a text may have when `reserved` positions are needed for the rest of the prompt."""
        if self.max_tokens is not None:
            return self.max_tokens
        return None if self.positions is None else max(1, self.positions - reserved - TEMPLATE_TOKENS)

    def __call__(self, text: str, reserved: int = 0) -> str:
        """`text` with its control tokens neutralised, cut to `limit(reserved)` tokens."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, which no tokenizer takes: readers refuse such records
            text = text.encode("utf-8", "replace").decode("utf-8")
        if self._controls is not None:
            text = self._controls.sub(lambda match: match[0][0] + ZERO_WIDTH_SPACE + match[0][1:], text)
        limit = self.limit(reserved)
        # A token covers at least one byte: a text of no more bytes than the limit needs no counting.
        if limit is None or len(text.encode("utf-8")) < limit:
            return text
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(encoded["input_ids"]) <= limit:
            return text
        self.truncated += 1
        if self.truncated == 1:
            log.warning("a text of %d tokens was cut to %d, what the backbone's positions leave room for "
                        "(--max-text-tokens sets the limit; every cut text is counted)", len(encoded["input_ids"]), limit)
        return text[: encoded["offset_mapping"][limit - 1][1]]
