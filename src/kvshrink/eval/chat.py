"""Chat-template pieces for the question-agnostic protocol: context, then questions, on one cache.

A small instruct model only answers reliably inside its chat template, but the protocol needs
the context prefilled (and compressed) before the question exists. As kvpress does, the
template is rendered once around marker strings and cut at the markers: the context chunk is
everything up to the end of the context, a question chunk carries the rest of the user turn,
the assistant header and the answer prefix. Later turns of a session start with the text the
template puts between an assistant reply and the next user message.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import ModelError

__all__ = ["ChatPrompt"]

_CTX, _Q, _A, _Q2 = "\x1eCONTEXT\x1e", "\x1eQUESTION\x1e", "\x1eANSWER\x1e", "\x1eNEXT\x1e"


@dataclass(frozen=True)
class ChatPrompt:
    """``head + context`` | ``"\\n\\n" + question + tail + prefix`` | reply | ``between + question + tail + prefix`` ..."""

    head: str
    tail: str
    between: str

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatPrompt:
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError(
                "the tokenizer has no chat template; longbench needs an instruct model whose template "
                "makes it answer (e.g. smollm2-135m)"
            )

        def render(messages: list[dict[str, str]]) -> str:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

        one = render([{"role": "user", "content": _CTX + _Q}])
        two = render(
            [
                {"role": "user", "content": _CTX + _Q},
                {"role": "assistant", "content": _A},
                {"role": "user", "content": _Q2},
            ]
        )
        for marker, text in ((_CTX, one), (_Q, one), (_A, two), (_Q2, two)):
            if text.count(marker) != 1:
                raise ModelError("the chat template rewrites message contents; cannot split it into turns")
        head, rest = one.split(_CTX)
        tail = rest.split(_Q)[1]
        between = two.split(_A)[1].split(_Q2)[0]
        if two.split(_Q2)[1] != tail:
            raise ModelError("the chat template closes later user turns differently from the first")
        return cls(head, tail, between)

    def context(self, text: str) -> str:
        return self.head + text

    def question(self, text: str, answer_prefix: str, turn: int) -> str:
        lead = "\n\n" if turn == 0 else self.between
        return lead + text + self.tail + answer_prefix
