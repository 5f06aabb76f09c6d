"""Text <-> token ids, from a checkpoint directory's tokenizer files.

Checkpoints come with one of two tokenizer formats, each read by its own class:

    tokenizer.json    JsonTokenizer: the `tokenizers` library's full description (vocabulary,
                      merges, pre-tokenizer, post-processor, decoder), used as it is.
    tokenizer.model   SentencePieceTokenizer: a sentencepiece model (LLaMA-2, Mistral);
                      sentencepiece encodes and decodes, and BOS/EOS are added as
                      tokenizer_config.json says (LLaMA-2 adds BOS).

What they share (the special tokens, the ids that end generation, the chat template) is their
base, Tokenizer. tokenizer_config.json names the special tokens and holds the chat template;
the ids that end generation are the checkpoint's config.json and generation_config.json
eos_token_id (config.read_stop_tokens, what both backends stop on). All are optional.
"""

import json
import os
import re
from datetime import datetime

from ..config import read_json, read_stop_tokens

SPECIAL = ("bos", "eos", "unk", "pad")                  # the special tokens, by their config name


def load_tokenizer(model: str) -> "Tokenizer":
    """The tokenizer of a checkpoint (tokenizer.json preferred over tokenizer.model): a directory,
    or a name or repo id that msrnn.checkpoint.loading.resolve finds, as msrnn.load takes."""
    from .loading import resolve
    directory = resolve(model)
    for cls in (JsonTokenizer, SentencePieceTokenizer):
        if os.path.isfile(os.path.join(directory, cls.filename)):
            return cls(directory)
    raise FileNotFoundError(f"no tokenizer in {directory}: looked for tokenizer.json and "
                            f"tokenizer.model (with tokenizer_config.json); copy the checkpoint's "
                            f"tokenizer files there")


class Tokenizer:
    """What both formats share: the special tokens and ids, and the chat template. A format's
    class reads its file (_open) and does the rest: encode(str) -> list[int],
    decode(ids) -> str, and token_id(str) -> int | None."""

    filename = None                          # the format's file in the checkpoint directory

    def __init__(self, directory: str):
        self.directory = directory
        self.config = read_json(directory, "tokenizer_config.json")
        path = os.path.join(directory, self.filename)
        try:
            self._open(path)
        except Exception as e:     # the libraries raise their own types for a damaged file
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path} is damaged and cannot be read ({first[:120]}); copy the "
                             f"checkpoint's tokenizer files again") from None
        # Tokens a sentencepiece checkpoint added after training (by id), e.g. chat markers.
        self.added = {_content(t): int(i) for i, t in
                      self.config.get("added_tokens_decoder", {}).items()}
        # Special tokens: tokenizer_config.json names them (as strings or {"content": ...});
        # those it leaves out, the format's own file may name.
        self.special = {k: _content(self.config.get(f"{k}_token")) for k in SPECIAL}
        self.special = {k: self._own_special(k) if t is None else t
                        for k, t in self.special.items()}
        named = {t for t in self.special.values() if t} | set(self.added)
        self.specials = sorted((t for t in named if self.token_id(t) is not None), key=len,
                               reverse=True)                  # sentencepiece: split on these
        self.bos_id, self.eos_id = (self.token_id(self.special[k]) if self.special[k] else None
                                    for k in ("bos", "eos"))
        # Every id that ends generation: the checkpoint's, by the rule both backends follow
        # (config.stop_tokens: config.json's and generation_config.json's eos_token_id).
        self.eos_ids = set(read_stop_tokens(directory))

    def _own_special(self, kind: str) -> str | None:
        """The special token of `kind` ("bos", ...) that the format's file names itself: none."""
        return None

    def _cleaned(self, text: str) -> str:
        """Decoded text, tidied as transformers does when tokenizer_config.json asks for it."""
        return _clean_up(text) if self.config.get("clean_up_tokenization_spaces", False) else text

    # -- chat -----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation `messages` ([{"role": ..., "content": ...}]) as the prompt text the
        model was trained on, rendered from the checkpoint's jinja template the way transformers
        does: sandboxed, trim_blocks and lstrip_blocks, with raise_exception() and the special
        tokens (bos_token, eos_token, ...) available to the template."""
        template = self.chat_template()
        return _jinja_env().from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **{f"{k}_token": v for k, v in self.special.items()})

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of apply_chat_template's text, as transformers' apply_chat_template(...,
        tokenize=True) gives them: nothing added, since the template writes its own BOS."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), special=False)

    def chat_template(self) -> str:
        """The checkpoint's chat template: chat_template.jinja, or tokenizer_config.json's
        `chat_template` (a string, or a list of named templates: the "default" one)."""
        path = os.path.join(self.directory, "chat_template.jinja")
        if os.path.isfile(path):
            with open(path) as f:
                return f.read()
        template = self.config.get("chat_template")
        if isinstance(template, list):
            template = {t["name"]: t["template"] for t in template}.get("default")
        if not template:
            raise ValueError(f"the checkpoint in {self.directory} has no chat template (no "
                             f"chat_template.jinja, no chat_template in tokenizer_config.json): "
                             f"it is probably a base model; give it plain text instead")
        return template


class JsonTokenizer(Tokenizer):
    """tokenizer.json: the `tokenizers` library does all the work."""

    filename = "tokenizer.json"

    def _open(self, path: str):
        from tokenizers import Tokenizer as Backend

        self.backend = Backend.from_file(path)

    def token_id(self, token: str) -> int | None:
        """The id of one token, None if the vocabulary lacks it."""
        return self.backend.token_to_id(token)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`, with BOS/EOS added by the file's post-processor (as transformers
        5 does: it ignores add_bos_token when there is a tokenizer.json); special=False: none
        added (text that continues a sequence, a chat template's rendering). Special tokens
        written in the text ("<|im_start|>") become their single ids."""
        return self.backend.encode(text, add_special_tokens=special).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of token ids (a list or a 1-D tensor); special tokens are written out
        ("<|im_end|>") unless skip_special_tokens."""
        ids = [int(i) for i in ids]
        return self._cleaned(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))


class SentencePieceTokenizer(Tokenizer):
    """tokenizer.model: sentencepiece for the text between special tokens, and BOS, EOS and the
    special tokens added here, as transformers' LlamaTokenizer does."""

    filename = "tokenizer.model"

    def __init__(self, directory: str):
        super().__init__(directory)
        # Does sentencepiece put a "▁" before the text (its add_dummy_prefix option)?
        self.dummy_prefix = self.sp.encode("a", out_type=str)[0].startswith("\u2581")

    def _open(self, path: str):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)

    def _own_special(self, kind: str) -> str | None:
        """A bare tokenizer.model: sentencepiece knows its bos, eos, unk and pad pieces."""
        i = getattr(self.sp, f"{kind}_id")()
        return self.sp.id_to_piece(i) if i >= 0 else None

    def token_id(self, token: str) -> int | None:
        """The id of one token, None if the vocabulary lacks it."""
        if token in self.added:
            return self.added[token]
        i = self.sp.piece_to_id(token)        # sentencepiece answers unk_id for unknown pieces
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`, with BOS/EOS added as tokenizer_config.json says: add_bos_token
        (default true, as LLaMA's) and add_eos_token. special=False: text that continues a
        sequence, with no BOS/EOS and no space put before it. Special tokens written in the text
        ("</s>", "[INST]") become their single ids."""
        ids = []
        for i, piece in enumerate(self._split_special(text)):
            if i % 2:                                                   # a special token
                ids.append(self.token_id(piece))
            elif piece:
                ids += self._encode_piece(piece, after_special=i > 0 or not special)
        bos = special and self.config.get("add_bos_token", True) and self.bos_id is not None
        eos = special and self.config.get("add_eos_token", False) and self.eos_id is not None
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def _split_special(self, text: str) -> list[str]:
        """[text, special, text, special, ..., text]: the special tokens the text contains
        (tried longest first)."""
        if not self.specials:
            return [text]
        return re.split("(" + "|".join(map(re.escape, self.specials)) + ")", text)

    def _encode_piece(self, text: str, after_special: bool) -> list[int]:
        """sentencepiece puts a "▁" (its space) before the text, so that a first word is spelled
        like any other ("▁Hello"). transformers puts it only at the start, not after a special
        token ("<s>[INST]" gives "[", not "▁["), unless tokenizer_config.json sets legacy: true.
        sentencepiece cannot be told to leave it out, so we encode the text behind the unknown
        token's text ("<unk>") and cut that off."""
        if not after_special or self.config.get("legacy", False):
            return self.sp.encode(text)
        marker = self.sp.id_to_piece(self.sp.unk_id())
        return self.sp.encode(marker + text)[len(self.sp.encode(marker)):]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of token ids (a list or a 1-D tensor): pieces joined, "▁" read as a space,
        byte pieces (<0xE2>) joined into UTF-8 characters, and the space sentencepiece put before
        the text removed (what transformers does too). Special tokens are written out ("</s>")
        unless skip_special_tokens."""
        ids = [int(i) for i in ids]
        special = {self.token_id(t): t for t in self.specials}
        out, pending = [], bytearray()                   # pending: bytes of a split character
        for i in ids:
            if i in special or self.sp.is_control(i):
                if skip_special_tokens:
                    continue
                piece = special.get(i) or self.sp.id_to_piece(i)
            elif self.sp.is_byte(i):
                pending.append(int(self.sp.id_to_piece(i)[3:-1], 16))   # "<0xE2>" -> 0xE2
                continue
            else:
                piece = self.sp.id_to_piece(i).replace("\u2581", " ")
            out += [pending.decode("utf-8", "replace"), piece]
            pending.clear()
        text = "".join(out) + pending.decode("utf-8", "replace")
        return self._cleaned(text[1:] if text.startswith(" ") and self.dummy_prefix else text)


def _jinja_env():
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization_spaces: no space before punctuation and contractions."""
    for spaced, tight in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):
        text = text.replace(spaced, tight)
    return text


def _content(token):
    return token.get("content") if isinstance(token, dict) else token
