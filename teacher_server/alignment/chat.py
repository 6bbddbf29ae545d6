"""The teacher's prompt from chat messages: its own chat template, read as the teacher reads a
prompt, where only the template makes control tokens.

Both kinds of session use it (a request's `messages`): a cross-tokenizer one as the prompt before
the aligned completion, a same-tokenizer one in place of the student's prompt. It needs the
teacher's tokenizer only, not the byte tables of alignment.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from teacher_server.alignment.byte_tables import parsed_tokenizer
from teacher_server.alignment.text import plain_tokenizer


@dataclass(eq=False)
class TeacherChat:
    tokenizer_json: str
    chat_template: str = ""
    bos_token: str | None = None
    eos_token: str | None = None
    # The teacher's tokenizer as it reads a prompt, and a copy that reads control-token strings as
    # text and adds no dummy-prefix space (text.plain_tokenizer).
    default: object = field(default=None, repr=False)
    plain: object = field(default=None, repr=False)
    _specials: frozenset[str] = field(default=frozenset(), repr=False)  # the special tokens' strings

    def __post_init__(self) -> None:
        self.default = parsed_tokenizer(self.tokenizer_json)  # shared with the byte table's check
        added = self.default.get_added_tokens_decoder().values()
        self._specials = frozenset(token.content for token in added if token.special)
        self.plain = plain_tokenizer(self.tokenizer_json)
        self.plain.encode_special_tokens = True

    def encode_prompt(self, text: str) -> np.ndarray:
        """A prompt as the teacher reads it: its special tokens parsed, its own prefix rules."""
        return np.asarray(self.default.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> np.ndarray:
        """The prompt in the teacher's chat template, as the teacher reads it, where only the
        template makes control tokens: a special token's string inside a message stays text
        (as it does in a completion), so a message cannot open a turn of another role."""
        specials = self._specials
        if not any(special in content for _, content in messages for special in specials):
            return self.encode_prompt(self.render_chat(messages))
        # Mark where each content lands in the rendering (markers the client cannot forge), then
        # turn the control tokens found inside those spans back into text.
        marker = f"\ue000{secrets.randbelow(10**16):016d}\ue001"  # digits: case filters leave them alone
        rendered = self.render_chat([(role, f"{marker}{content}{marker}") for role, content in messages])
        pieces = rendered.split(marker)
        if len(pieces) != 2 * len(messages) + 1:  # the template dropped, repeated or rewrote a content
            raise ValueError(
                "a message contains one of the teacher's control tokens, and the teacher's chat template does not "
                "render each message's content once as it is, so it cannot be kept as plain text: remove it"
            )
        spans, text, offset = [], "", 0
        for index, piece in enumerate(pieces):
            if index % 2:  # between an opening and a closing marker: a message's content
                spans.append((offset, offset + len(piece)))
            text, offset = text + piece, offset + len(piece)
        encoding = self.default.encode(text, add_special_tokens=False)
        ids: list[int] = []
        for token, (start, end) in zip(encoding.ids, encoding.offsets):
            inside = any(low <= start and end <= high for low, high in spans)
            if inside and text[start:end] in specials:
                ids += self.plain.encode(text[start:end], add_special_tokens=False).ids
            else:
                ids.append(token)
        return np.asarray(ids, dtype=np.int64)

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        """The prompt in the teacher's chat template, ready for the assistant's answer."""
        if not self.chat_template:
            raise ValueError("the teacher has no chat template; send the prompt as tokens without messages")
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(
                conversations=[[{"role": role, "content": content} for role, content in messages]],
                chat_template=self.chat_template,
                add_generation_prompt=True,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as error:  # e.g. the template's raise_exception on a role it does not know
            raise ValueError(f"the teacher's chat template refused these messages: {error}") from None
        return rendered[0]
