"""RULER's synthetic tasks (Hsieh et al., 2024), generated offline: what `msrnn tasks` asks.

Each prompt has exactly `length` tokens, in the model's chat template (needle.template), laid out
as needle.py's are, each piece encoded on its own and then concatenated:

    head | intro | body | question | tail | answer prefix

The answer prefix (RULER's: the first words of the answer, after the assistant's header) makes a
small model answer in the expected form. The body is a haystack passage with statements woven in
(the needle tasks, variable tracking) or a list of words (the word extraction tasks):

    niah_single       one "special magic number" for one key; asked for it
    niah_multikey     the asked key's number among 3 distractor keys with their own numbers
    niah_multivalue   one key with 4 numbers, all asked
    niah_multiquery   4 keys with a number each, all asked at once
    vt                variable tracking: VAR X1 = N, VAR X2 = VAR X1, ... (4 hops) spread evenly
                      through the haystack; asked which variables hold N (all 5)
    cwe               common words extraction: 10 words each repeated more often than the
                      others in a list of words; asked for those 10
    fwe               frequent words extraction: coded words drawn with frequencies ~ 1 / rank^2;
                      asked for the 3 most frequent

For the needle tasks the first (asked) statement starts at token round(depth * n) of the n
haystack tokens, the others at random depths; vt, cwe and fwe have no depth (None).

The score is RULER's: the fraction of the expected strings found in the answer (case-insensitive
substring), averaged over the samples, 0-100. Prompts depend only on (seed, task, length, depth,
sample), the texts and the word list, never on the policy.
"""

import random
import re
from dataclasses import dataclass, field

import torch

from .needle import template
from .text import passage, plain

NIAH = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
TASKS = NIAH + ("vt", "cwe", "fwe")
DEPTH = set(NIAH)                             # tasks whose statements sit at a chosen depth
MAX_NEW_TOKENS = {"niah_single": 24, "niah_multikey": 24, "niah_multivalue": 64,
                  "niah_multiquery": 64, "vt": 40, "cwe": 100, "fwe": 40}

MAGIC = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
         "them. I will quiz you about the numbers afterwards.\n")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
NEEDLES = 4                                   # multikey, multivalue, multiquery
HOPS = 4                                      # vt: 5 variables
COMMON, FREQUENT = 10, 3                      # cwe, fwe: how many words are asked


@dataclass
class Parts:
    """One sample's pieces before they become tokens: statements to weave into a haystack at
    relative depths (or, for cwe and fwe, the body's words), the texts around them, and the
    expected answers."""

    intro: str
    question: str
    prefix: str
    answers: list
    inserts: list = field(default_factory=list)    # [(depth, text)]
    words: list | None = None                       # cwe, fwe: the body, word by word


def vocabulary(texts: list[str]) -> list[str]:
    """The word list the tasks draw keys and words from: the distinct lowercase words of 4-10
    letters in `texts` (the shipped books by default), sorted."""
    return sorted({w for text in texts for w in re.findall(r"\b[a-z]{4,10}\b", text)})


def keys(rng, words, n):
    """n distinct keys 'word-word'."""
    out = []
    while len(out) < n:
        key = f"{rng.choice(words)}-{rng.choice(words)}"
        if key not in out:
            out.append(key)
    return out


def numbers(rng, n, digits=7):
    return [str(x) for x in rng.sample(range(10 ** (digits - 1), 10 ** digits), n)]


def niah(task, rng, words, depth) -> Parts:
    """The four needle tasks: statements NEEDLE(key, value); the first at `depth`."""
    n = 1 if task == "niah_single" else NEEDLES
    ks = keys(rng, words, n)
    if task == "niah_multivalue":
        ks = ks[:1] * n
    values = numbers(rng, n)
    depths = [depth] + [rng.random() for _ in range(n - 1)]
    inserts = [(d, NEEDLE.format(key=k, value=v)) for d, k, v in zip(depths, ks, values)]
    if task in ("niah_single", "niah_multikey"):
        asked, answers, many = ks[0], values[:1], False
    elif task == "niah_multivalue":
        asked, answers, many = ks[0], values, True
    else:
        asked, answers, many = ", ".join(ks[:-1]) + " and " + ks[-1], values, True
    noun, verb = ("numbers", "are") if many else ("number", "is")
    question = (f"What {verb} {'all the ' if many else 'the '}special magic {noun} for {asked} "
                f"mentioned in the provided text?")
    prefix = f"The special magic {noun} for {asked} mentioned in the provided text {verb}"
    return Parts(MAGIC, question, prefix, answers, inserts)


def variable_tracking(rng) -> Parts:
    """vt: one chain VAR X1 = N, VAR X2 = VAR X1, ..., its statements evenly spread."""
    names = set()
    while len(names) < HOPS + 1:
        names.add("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
    names = sorted(names, key=lambda _: rng.random())
    value = numbers(rng, 1, digits=5)[0]
    lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in
                                              zip(names, names[1:])]
    inserts = [((i + 1) / (len(lines) + 1), line) for i, line in enumerate(lines)]
    return Parts("Memorize and track the chain of variable assignments hidden in the following "
                 "text.\n", f"Question: Find all variables that are assigned the value {value} "
                 f"in the text above.", f"Answer: According to the chain of variable assignments "
                 f"in the text above, {len(names)} variables are assigned the value {value}, they "
                 f"are:", names, inserts)


def common_words(rng, words) -> Parts:
    chosen = rng.sample(words, len(words))            # a shuffled copy: common first, then rare
    return Parts("Below is a list of words. Some of them appear more often than the others. "
                 "Memorize the ones that appear most often.\n",
                 f"Question: What are the {COMMON} most common words in the above list?",
                 f"Answer: The top {COMMON} words that appear most often in the list are:",
                 chosen[:COMMON], words=chosen)


def frequent_words(rng) -> Parts:
    coded = []
    while len(coded) < 30:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        if all(w not in c and c not in w for c in coded):
            coded.append(w)
    return Parts("Read the following coded text and track the frequency of each coded word. "
                 "Find the three most frequently appearing coded words.\n",
                 "Question: What are the three most frequently appearing words in the above coded "
                 "text?", "Answer: According to the coded text above, the three most frequently "
                 "appearing words are:", coded[:FREQUENT], words=coded)


def parts(task, rng, words, depth) -> Parts:
    if task in NIAH:
        return niah(task, rng, words, depth)
    return {"vt": lambda: variable_tracking(rng), "cwe": lambda: common_words(rng, words),
            "fwe": lambda: frequent_words(rng)}[task]()


def cwe_counts(pieces, budget):
    """cwe: how often each word appears (pieces: its token ids, common words first) so that the
    body fits `budget` tokens, or None: the 10 common words c times each (c <= 30, about half
    the budget), then rare words c' < c times each (c' <= 3) until one does not fit. Only the words
    used are encoded (`pieces` is lazy)."""
    common = [next(pieces) for _ in range(COMMON)]
    c = min(30, budget // (2 * sum(len(p) for p in common)))
    if c < 2:
        return None
    out, left, rare = [(p, c) for p in common], budget - c * sum(len(p) for p in common), \
        min(3, c - 1)
    for p in pieces:                          # until the first that does not fit
        if rare * len(p) > left:
            break
        out.append((p, rare))
        left -= rare * len(p)
    return out


def fwe_counts(pieces, budget):
    """fwe: the word of rank r floor(N / r^2) times (at least once), N as large as fits and at
    least 18, so that the top 3 counts are distinct and above the rest; or None."""
    pieces = list(pieces)

    def tokens(n):
        return sum(max(1, n // r ** 2) * len(p) for r, p in enumerate(pieces, 1))
    if tokens(18) > budget:
        return None
    lo, hi = 18, budget
    while lo < hi:                                           # the largest N that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if tokens(mid) <= budget else (lo, mid - 1)
    return [(p, max(1, lo // r ** 2)) for r, p in enumerate(pieces, 1)]


def body_of_words(tok, rng, task, words, budget):
    """cwe / fwe: the body's words, each repeated as cwe_counts / fwe_counts say, shuffled,
    exactly `budget` tokens (newlines pad the few that no word fills), or None if they cannot
    fit."""
    pieces = (plain(tok, " " + w) for w in words)
    counts = (cwe_counts if task == "cwe" else fwe_counts)(pieces, budget)
    if counts is None:
        return None
    seq = [p for p, c in counts for _ in range(c)]
    rng.shuffle(seq)
    ids = [i for p in seq for i in p]
    pad = plain(tok, "\n")[-1:]
    return ids + pad * (budget - len(ids))


def build(tok, task, haystacks, words, length, depth, samples, seed, chat=True):
    """`samples` prompts of exactly `length` tokens for `task`: (ids LongTensor [samples,
    length], expected answers [samples][...]). haystacks: token id lists the passages are cut
    from (needle tasks, vt); words: the word list (keys, cwe). Drawn from
    random.Random(seed, task, length, depth): the same arguments, the same prompts."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use {', '.join(TASKS)}")
    if (depth is None) != (task not in DEPTH) or (depth is not None and not 0 <= depth <= 1):
        raise ValueError(f"task {task} takes {'a depth in [0, 1]' if task in DEPTH else 'no depth'}"
                         f", got {depth}")
    head, tail, chat = template(tok, chat)
    rng = random.Random(f"{seed}/{task}/{length}/{depth!r}")
    rows, answers = [], []
    for _ in range(samples):
        p = parts(task, rng, words, depth)
        first = head + plain(tok, p.intro)
        last = plain(tok, "\n\n" + p.question) + tail + plain(tok, ("" if chat else "\n") +
                                                              p.prefix)
        inserts = [(d, plain(tok, " " + text)) for d, text in p.inserts]
        budget = length - len(first) - len(last) - sum(len(ids) for _, ids in inserts)
        if budget < 1:
            raise ValueError(f"length {length} is too short for {task}: the template, "
                             f"statements and question alone take {length - budget} tokens")
        if p.words is not None:
            body = body_of_words(tok, rng, task, p.words, budget)
            if body is None:
                raise ValueError(f"length {length} is too short for {task}: its word list "
                                 f"needs more than {budget} tokens")
        else:
            body = weave(rng, haystacks, inserts, budget)
        rows.append(first + body + last)
        answers.append(p.answers)
    return torch.tensor(rows), answers


def weave(rng, haystacks, inserts, n):
    """A passage of n tokens from a random haystack and offset, each insert (depth, ids) placed
    at token round(depth * n) of it (in depth order)."""
    text = passage(rng, haystacks, n)
    out, at = [], 0
    for d, ids in sorted(inserts, key=lambda x: x[0]):
        cut = min(max(round(d * n), at), n)
        out += text[at:cut] + ids
        at = cut
    return out + text[at:]


def score(answer: str, expected: list[str]) -> float:
    """RULER's string_match_all for one answer: the fraction of the expected strings that occur
    in it, case-insensitive."""
    text = answer.lower()
    return sum(e.lower() in text for e in expected) / len(expected)


def scores(tok, new_ids, expected) -> tuple[float, list[str]]:
    """(the mean score of the answers, 0-100; the answers' texts)."""
    texts = [tok.decode(row.tolist(), skip_special_tokens=True) for row in new_ids]
    return 100 * sum(score(t, e) for t, e in zip(texts, expected)) / len(texts), texts
