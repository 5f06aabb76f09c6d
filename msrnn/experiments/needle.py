"""Needle and passkey retrieval: where compression loses a fact (the heat maps of `msrnn needle`).

A prompt of exactly `length` tokens holds a haystack (a book passage from a random offset, or the
classic passkey filler), and at relative depth `depth` a fact with a random 5-digit number N,
stated twice in one sentence pair; the question comes at the end, and the whole is wrapped in the
model's chat template (the raw prompt if the tokenizer has none). The model answers greedily; an
answer is right when the first 5-digit number in it is N.

Layout of one prompt, in tokens (each piece encoded on its own, then concatenated, so that every
prompt of a (length, depth) has exactly `length` tokens and they form one batch):

    head (template up to the user's text) | haystack | fact | haystack | question | tail

The fact starts at token index round(depth * length), held inside the haystack's span: at
depth 0 it follows the head, at depth 1 it ends right before the question.

Prompts depend only on (seed, task, length, depth, sample) and the texts: every policy, size and
prompt mode sees the same ones, and a run that resumes draws the same ones again.

Functions of models, policies, token ids and plain values; the command line is msrnn/cli/needle.py.
"""

import random
import re
import time

import torch

from ..generate import decode
from ..policies import Full
from ..prompt import Mode, prefill, prefill_shared
from .text import bos, passage, plain

NEEDLE = ("The secret number is {n}. Remember it: the secret number is {n}.",
          "What is the secret number? Answer with the number only.")
PASSKEY = ("The pass key is {n}. Remember it. {n} is the pass key.",
           "What is the pass key? Answer with the number only.")
TASKS = {"needle": NEEDLE, "passkey": PASSKEY}
MAX_NEW_TOKENS = 24
MARKER = "\u2063NEEDLE-CONTENT\u2063"        # where the user's text goes in the chat template


def template(tok, chat: bool = True):
    """(head ids, tail ids, whether the chat template is used): what comes before and after the
    user's text. Without a chat template (or chat=False) the raw prompt: the tokenizer's own
    BOS, if it adds one, and nothing else."""
    first = bos(tok)
    if chat:
        try:
            tok.chat_template()
        except ValueError:
            chat = False
    if not chat:
        return first, [], False
    text = tok.apply_chat_template([{"role": "user", "content": MARKER}])
    head, tail = text.split(MARKER)
    head = plain(tok, head) if head else []
    return (head if head[:1] == first else first + head), plain(tok, tail), True


def overhead(tok, task: str = "needle", chat: bool = True) -> int:
    """Tokens of a prompt that are not haystack: head, fact, question and tail."""
    fact, question = TASKS[task]
    head, tail, _ = template(tok, chat)
    return (len(head) + len(plain(tok, " " + fact.format(n=99999))) +
            len(plain(tok, "\n\n" + question)) + len(tail))


def build_prompts(tok, haystacks: list[list[int]], length: int, depth: float, samples: int,
                  seed: int, task: str = "needle", chat: bool = True):
    """`samples` prompts of exactly `length` tokens: (ids LongTensor [samples, length], numbers
    [samples], fact start indices [samples]). Drawn from random.Random(seed, task, length,
    depth): the same arguments give the same prompts, whoever asks."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use {' or '.join(TASKS)}")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    fact_text, question = TASKS[task]
    head, tail, _ = template(tok, chat)
    q = plain(tok, "\n\n" + question)
    rng = random.Random(f"{seed}/{task}/{length}/{float(depth)!r}")
    rows, numbers, where = [], [], []
    for _ in range(samples):
        n = rng.randrange(10000, 100000)
        fact = plain(tok, " " + fact_text.format(n=n))
        hay = length - len(head) - len(fact) - len(q) - len(tail)
        if hay < 0:
            raise ValueError(f"length {length} is too short: the template, fact and question "
                             f"alone take {length - hay} tokens")
        text = passage(rng, haystacks, hay, f"a {length}-token prompt")
        before = min(max(round(depth * length) - len(head), 0), hay)
        rows.append(head + text[:before] + fact + text[before:] + q + tail)
        numbers.append(n)
        where.append(len(head) + before)
    return torch.tensor(rows), numbers, where


FIVE_DIGITS = re.compile(r"(?<!\d)\d{5}(?!\d)")


def score(answer: str, number: int) -> bool:
    """Whether the first 5-digit number in `answer` is `number`."""
    m = FIVE_DIGITS.search(answer)
    return m is not None and int(m.group()) == number


def _prompt_pass(model, ids, policies, mode, max_new_tokens, scheme):
    """The prompts ids [B, T] once per policy, as the rows of one multi-state (policy by policy:
    row i * B + b is prompt b under policies[i]) -> (state, last logits [P * B, V]). oneshot
    runs the parallel pass once for all of them (prompt.prefill_shared, where the backend can
    share it) and copies each policy's multi-state into its rows; sequential runs every row in
    one batch. `scheme`: init_state's keywords for the position scheme."""
    (B, T), P = ids.shape, len(policies)
    every = [p for p in policies for _ in range(B)]
    state = model.init_state(P * B, every, capacity=T + max_new_tokens, **scheme)
    if Mode.of(mode) is Mode.ONESHOT:
        states = [model.init_state(B, p, capacity=T + max_new_tokens, **scheme)
                  for p in policies]
        last = model.logits(prefill_shared(model, ids, states, logits=False)[:, -1])
        for i, one in enumerate(states):
            state.set_rows(i * B, one)
        return state, last.repeat(P, 1)
    hidden, _ = prefill(model, ids.repeat(P, 1), state, mode=mode, logits=False)
    return state, model.logits(hidden[:, -1])


@torch.inference_mode()
def answer(model, ids, policies, mode: Mode = Mode.ONESHOT, max_new_tokens: int = MAX_NEW_TOKENS,
           eos_ids=None, positions="original", allow_past_range=False):
    """Greedy answers to prompts ids [B, T] under each policy, all of them decoded together as
    the rows of one batch: [(new ids [B, N], seconds)] in the order of `policies` (seconds: the
    whole run's, shared equally), the states numbered by the scheme `positions`. Stops at
    max_new_tokens or when every row has ended (eos_ids); a row that ended repeats its EOS."""
    ids = torch.as_tensor(ids, device=model.shape.device)
    eos_ids = model.eos_ids if eos_ids is None else eos_ids
    scheme = dict(positions=positions, allow_past_range=allow_past_range)
    start = time.perf_counter()
    state, logits = _prompt_pass(model, ids, policies, mode, max_new_tokens, scheme)
    new = [ids for ids, _ in decode(model, state, logits, max_new_tokens, eos_ids=eos_ids)]
    new = torch.stack(new, 1).cpu()                                     # [P * B, N]
    share = (time.perf_counter() - start) / len(policies)
    return [(rows, share) for rows in new.split(ids.shape[0])]


def warm_up(model):
    """The first steps of a process are slow (allocations, caches): one short answer before
    anything is timed."""
    answer(model, [list(range(1, 9))], [Full()], max_new_tokens=2)


def accuracy(tok, new_ids, numbers) -> tuple[int, list[str]]:
    """(how many answers retrieve their number, the answers' texts)."""
    texts = [tok.decode(row.tolist(), skip_special_tokens=True) for row in new_ids]
    return sum(score(t, n) for t, n in zip(texts, numbers)), texts


def retrieval(model, tok, haystacks, policies, length: int, depth: float, samples: int,
              seed: int = 0, task: str = "needle", mode: Mode = Mode.ONESHOT, chat: bool = True,
              max_new_tokens: int = MAX_NEW_TOKENS, positions="original",
              allow_past_range=False):
    """One (length, depth) cell for several policies at once, as the rows of one batch:
    [{accuracy, correct, seconds, answers}] in the order of `policies` (the same prompts for
    all)."""
    ids, numbers, _ = build_prompts(tok, haystacks, length, depth, samples, seed, task, chat)
    rows = []
    for new, seconds in answer(model, ids, policies, mode, max_new_tokens, tok.eos_ids or None,
                               positions, allow_past_range):
        correct, texts = accuracy(tok, new, numbers)
        rows.append({"accuracy": correct / samples, "correct": correct, "seconds": seconds,
                     "answers": texts, "numbers": numbers})
    return rows
