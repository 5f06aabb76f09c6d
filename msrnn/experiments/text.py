"""The texts every experiment reads, and the one way each cuts them into token ids.

A haystack is a text's token ids; prompts are cut from haystacks (`passage`), padded with the
classic filler (`filler`), and assembled from pieces encoded on their own (`plain`), with the
tokenizer's own BOS where it adds one (`bos`). `read_text` opens a file with errors that say
what is wrong with it, and `digest` names a set of files' contents in a results file.
"""

import hashlib
import os

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")                          # the passkey test's filler; RULER's noise haystack


def read_text(path: str) -> str:
    """A text file's contents, with errors that name the file and what is wrong with it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"text file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; give a text file")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a regular file (a device, pipe or socket); give a "
                         f"text file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it "
                         f"to UTF-8 first") from None
    if not text.strip():
        raise ValueError(f"{path} is empty; give a text with words in it")
    return text


def digest(files) -> str:
    """A short name for the contents of `files` (results files record it, so that a sweep never
    resumes on other texts)."""
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def bos(tok) -> list[int]:
    """[the BOS id] if the tokenizer puts one in front of every encoding, else []."""
    return [tok.bos_id] if tok.bos_id is not None and tok.encode("")[:1] == [tok.bos_id] else []


def plain(tok, text: str) -> list[int]:
    """Token ids of `text` without the special tokens the tokenizer adds to every encoding (a
    BOS, say), so that pieces can be concatenated."""
    ids, added = tok.encode(text), tok.encode("")
    first = added[:1] if added and added[0] == tok.bos_id else []
    last = added[len(first):]
    if first and ids[:1] == first:
        ids = ids[1:]
    if last and ids[-len(last):] == last:
        ids = ids[:-len(last)]
    return ids


def haystacks(tok, texts: list[str]) -> list[list[int]]:
    """Each text's token ids: the haystacks prompts are cut from."""
    return [plain(tok, text) for text in texts]


def filler(tok, length: int) -> list[list[int]]:
    """The filler sentences repeated past `length` tokens, as one haystack."""
    one = plain(tok, FILLER)
    return [one * (length // max(len(one), 1) + 2)]


def passage(rng, haystacks, n: int, what: str = "a prompt") -> list[int]:
    """n consecutive tokens of a haystack long enough, the haystack and the offset drawn from
    rng (every experiment cuts its passages this one way)."""
    usable = [h for h in haystacks if len(h) >= n]
    if not usable:
        raise ValueError(f"every haystack is shorter than the {n} tokens {what} needs; give a "
                         f"longer text")
    source = usable[rng.randrange(len(usable))]
    offset = rng.randrange(len(source) - n + 1)
    return source[offset:offset + n]
