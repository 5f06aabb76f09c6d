"""How far a bounded generation drifts from the unbounded one (`msrnn drift`).

From the same prompts, generate greedily with Full and with a bounded policy, and measure the
policy's text three ways:

    first_divergence   the first step at which its tokens differ from Full's (the number of
                       tokens generated when they never do)
    full_ppl           Full's perplexity of it: exp(mean over its tokens of -log p_Full(token |
                       prompt, the tokens before)), what the unbounded model thinks of it (an
                       offline stand-in for the paper's GPT-4 judge)
    repeat_4gram       the fraction of its 4-grams that repeat an earlier one (degeneration)

Two kinds of prompts: `opening`, a seeded passage of the given texts to continue (no chat
template), and `story`, a chat prompt asking for a long story. Functions of models, policies,
token ids and plain values; the command line is msrnn/cli/drift.py.
"""

import math
import random

import torch
import torch.nn.functional as F

from ..generate import generate
from ..prompt import prefill
from .text import bos, passage, plain

TOPICS = ("a lighthouse keeper who finds a message in a bottle", "two rival bakers in a small "
          "town", "a robot learning to paint", "a girl who can talk to rivers", "the last train "
          "before a storm", "an old map hidden in a library book", "a dragon afraid of the dark",
          "a sailor lost in the fog")
STORY = "Write a long story about {topic}. Give it many chapters and rich detail."


def openings(tok, haystacks, samples: int, length: int, seed: int) -> list[list[int]]:
    """`samples` passages of `length` tokens (BOS first if the tokenizer adds one), each cut
    from a random haystack and offset (text.passage) drawn from random.Random(seed, "opening",
    length)."""
    rng = random.Random(f"{seed}/opening/{length}")
    first = bos(tok)
    return [first + passage(rng, haystacks, length - len(first), f"a {length}-token opening "
                            f"(--prompt-tokens)") for _ in range(samples)]


def stories(tok, samples: int, seed: int) -> list[list[int]]:
    """`samples` chat prompts asking for a long story, topics drawn from TOPICS."""
    from .needle import template
    rng = random.Random(f"{seed}/story")
    head, tail, _ = template(tok)
    return [head + plain(tok, STORY.format(topic=rng.choice(TOPICS))) + tail
            for _ in range(samples)]


def first_divergence(ids, full) -> int:
    """The first index at which two token sequences differ; where one is a prefix of the other,
    the shorter length (equal sequences: their length)."""
    for i, (a, b) in enumerate(zip(ids, full)):
        if a != b:
            return i
    return min(len(ids), len(full))


def repeat_4gram(ids) -> float:
    """The fraction of the 4-grams of `ids` that repeat an earlier 4-gram (0 with fewer than 4
    tokens): 1 - distinct / all."""
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


@torch.inference_mode()
def full_nll(model, prompt, new) -> tuple[float, int]:
    """(sum of -log p_Full(new_i | prompt, new_<i), len(new)) by one Full prompt pass over
    prompt + new (1-D token id lists)."""
    from ..policies import Full
    if not new:
        return 0.0, 0
    ids = torch.tensor([list(prompt) + list(new)], device=model.shape.device)
    state = model.init_state(1, Full(), capacity=ids.shape[1])
    hidden, _ = prefill(model, ids, state, logits=False)
    logits = model.logits(hidden[0, len(prompt) - 1:-1]).double()           # [N, V]
    return float(F.cross_entropy(logits, ids[0, len(prompt):], reduction="sum")), len(new)


def measure(model, prompts, outputs, full_outputs) -> dict:
    """The three measures of one configuration over its prompts: first_divergence (mean over
    prompts), full_ppl (over all generated tokens), repeat_4gram (mean), and tokens (mean)."""
    nll = count = 0
    for prompt, new in zip(prompts, outputs):
        s, n = full_nll(model, prompt, new)
        nll, count = nll + s, count + n
    k = len(outputs)
    return {"first_divergence": sum(first_divergence(o, f) for o, f in zip(outputs, full_outputs))
            / k, "full_ppl": math.exp(nll / max(count, 1)),
            "repeat_4gram": sum(repeat_4gram(o) for o in outputs) / k,
            "tokens": sum(len(o) for o in outputs) / k}


def run(model, prompts, policy, new_tokens: int, mode="oneshot", eos_ids=None,
        positions="original", allow_past_range=False) -> list:
    """Greedy generations (token id lists, up to and including an EOS) for each prompt; `policy`
    a list: each policy's generations [[ids per prompt] per policy], all of them decoded
    together as the rows of one batch."""
    many = isinstance(policy, (list, tuple))
    group = list(policy) if many else [policy]
    rows = [torch.tensor(p) for p in prompts] * len(group)
    every = [p for p in group for _ in prompts]
    out = generate(model, rows, every, new_tokens, prompt_mode=mode, eos_ids=eos_ids,
                   positions=positions, allow_past_range=allow_past_range)
    out = [r.tolist() for r in out]
    per = [out[i * len(prompts):(i + 1) * len(prompts)] for i in range(len(group))]
    return per if many else per[0]
