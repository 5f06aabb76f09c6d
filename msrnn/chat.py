"""A conversation held in a multi-state: each turn's new tokens are stepped into it, and the
history is never read again.

A transformer chat re-reads (or caches) the whole conversation at every turn; an MSRNN only
needs its multi-state H_t, which after any number of turns is still k slots per layer. A turn
is then: step the new user message, as the chat template renders it, into H; decode the reply
from there; step the reply's end-of-turn into H. Saved after each turn (msrnn.statefile), the
conversation survives its process (`msrnn chat --session FILE`).

How one more turn is rendered on top of a conversation the template never sees again
(`Turns`): a chat template renders a whole conversation, so we render a placeholder one with
and without the new turn and keep the difference. For conversation c and a message m,

    opening(u)  = render([u], generation prompt)                   the first turn
    closing     = render([U, A]) - render([U], generation prompt) - A     after a reply
    next(u)     = render([U, A, u], generation prompt) - render([U, A])    each later turn

with U, A placeholder messages; `-` removes a prefix, and a template for which it is not one
(it renders earlier turns differently once another follows) is refused. Since templates render
turns alike, opening(u1) + a1 + closing + next(u2) + a2 + closing ... is the template's own
rendering of the whole conversation (tests/test_chat.py checks it on the default model's).
"""

import torch

from .generate import decode
from .positions import check_range
from .prompt import prefill

USER, ASSISTANT = "Hello.", "Hi."            # the placeholder turn


def _after(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(f"this chat template renders {what}, so msrnn chat cannot add a turn "
                         f"to a conversation it does not re-read; use another checkpoint")
    return text[len(prefix):]


class Turns:
    """The text each turn adds (module docstring), from the tokenizer's chat template."""

    def __init__(self, tok):
        self.tok = tok
        user, reply = {"role": "user", "content": USER}, {"role": "assistant", "content": ASSISTANT}
        asked = self.render([user], True)
        answered = self.render([user, reply], False)
        self.closing = _after(answered, asked + ASSISTANT,
                              "a reply otherwise than after its generation prompt")
        self._before = answered

    def render(self, messages: list, generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)

    def opening(self, text: str) -> str:
        return self.render([{"role": "user", "content": text}], True)

    def next(self, text: str) -> str:
        user, reply = {"role": "user", "content": USER}, {"role": "assistant", "content": ASSISTANT}
        after = self.render([user, reply, {"role": "user", "content": text}], True)
        return _after(after, self._before, "earlier turns differently once another follows")


class Conversation:
    """A chat in the multi-state `state` of `model` (either backend), read by `tok`.

    `say(text, ...)` yields the reply's token ids as they are decoded (its end-of-turn token
    excluded); once it is exhausted the turn is complete: the user's message, the reply and the
    end of the turn are in the state, and `turns` counts it."""

    def __init__(self, model, tok, state, turns: int = 0):
        self.model, self.tok, self.state, self.turns = model, tok, state, turns
        self.template = Turns(tok)
        self.eos_ids = sorted(tok.eos_ids)

    def encode(self, text: str) -> list:
        return self.tok.encode(text, special=False)   # the template writes its own BOS

    def check_room(self, prompt: int, max_new_tokens: int):
        """Refuse, before it starts, a turn that could pass the model's range (`original`
        positions; `cache` and `compressed` never do, for a bounded policy)."""
        s = self.state
        end = s.length + prompt + max_new_tokens + len(self.encode(self.template.closing)) + 1
        check_range(s.policy, s.scheme, s.shape.positions, end, 0, s.allow_past_range,
                    f"this conversation's {s.length} tokens and turn {self.turns + 1}'s "
                    f"{prompt} plus up to {max_new_tokens} new")

    def prompt(self, text: str) -> list:
        """The token ids the user's message `text` adds to the conversation."""
        turns = self.template
        return self.encode(turns.opening(text) if self.state.length == 0 else turns.next(text))

    def say(self, text: str, max_new_tokens: int, temperature: float = 0.0, top_k=None,
            top_p=None, seed=None, ignore_eos: bool = False, min_new_tokens: int = 0):
        """The reply to `text`, token by token (its end-of-turn token not among them); the
        turn stepped into the state. `ignore_eos`, `min_new_tokens`: as msrnn.generate's."""
        ids = self.prompt(text)
        self.check_room(len(ids), max_new_tokens)
        logits, self.state = self.feed(ids)
        reply = []
        turn_seed = None if seed is None else (seed + self.turns) % 2**63   # a restart draws alike
        for new, self.state in decode(self.model, self.state, logits[:, -1], max_new_tokens,
                                      temperature, top_k, top_p, turn_seed, self.eos_ids,
                                      ignore_eos, min_new_tokens):
            reply.append(int(new[0]))
            if reply[-1] not in self.eos_ids:
                yield reply[-1]
        self.feed(self.ending(reply))
        self.turns += 1

    def ending(self, reply: list) -> list:
        """What closes the turn in the state: decoding never steps its last token, so that token
        (the end-of-turn one, or the last of a reply cut at max_new_tokens) and what the
        template writes after a reply (`closing`, less the end-of-turn token's text if the reply
        ended with it)."""
        closing = self.template.closing
        if reply and reply[-1] in self.eos_ids:
            eos = self.tok.decode([reply[-1]])
            return [reply[-1]] + self.encode(closing[len(eos):] if closing.startswith(eos)
                                             else closing)
        return reply[-1:] + self.encode(closing)

    def feed(self, ids: list):
        """Step token ids into the state, one by one (a non-empty bounded multi-state is only
        ever continued step by step; prompt.parallel_prefix)."""
        if not ids:
            return None, self.state
        token_ids = torch.tensor([ids], device=self.state.t.device)
        return prefill(self.model, token_ids, self.state, "sequential")
