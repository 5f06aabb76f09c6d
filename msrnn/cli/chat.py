"""`msrnn chat`: a conversation in a bounded multi-state, saved after every turn, that goes on
across restarts in constant memory (msrnn.chat, msrnn.statefile)."""

import argparse
import json
import os
import sys

from .common import (DEFAULT_MODEL, UsageError, add_decoding_args, add_device_args,
                     add_policy_args, add_positions_args, check_decoder_options, check_device,
                     check_positive, check_seed, load_model, model_config, options, policy_help)
from .generate import Row

KIND = "msrnn chat"                        # the session's own header field


def add_commands(commands):
    c = commands.add_parser("chat", help="talk in a bounded multi-state that is saved after each "
                            "turn and resumed (--session FILE)",
                            parents=[options(add_policy_args), options(add_positions_args),
                                     options(add_decoding_args, "sampling: turn n draws with "
                                             "seed + n, so a resumed session draws as one that "
                                             "never stopped"),
                                     options(add_device_args)],
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=policy_help())
    c.add_argument("model", nargs="?", help=f"checkpoint directory, name or Hub repo id (default: "
                   f"the session's model, else {DEFAULT_MODEL})")
    c.add_argument("--session", required=True, help="the session file: created if missing, "
                   "continued if it exists, rewritten atomically after each turn")
    c.add_argument("--json", action="store_true", help="one JSON line per turn: turn, user, "
                   "assistant, tokens (seen so far), slots (per layer)")
    # What a session fixes: unset means "the session's" (or, for a new one, these defaults).
    c.set_defaults(run=run_chat, policy=None, size=None, positions=None, dtype=None)


NEW = {"policy": "tova", "size": 256, "positions": "original", "dtype": "float32"}


def open_session(path: str):
    """The session's header, or None for a new session; one clear line for anything else."""
    from .. import statefile
    if os.path.isdir(path):
        raise UsageError(f"--session {path} is a directory; give a file (created if missing)")
    if not os.path.exists(path):
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise UsageError(f"--session {path}: the directory {directory} does not exist")
        return None
    head, _ = statefile.read(path)
    if (head.get("session") or {}).get("kind") != KIND:
        raise UsageError(f"--session {path} is a saved multi-state, not a chat session; give "
                         f"another file")
    return head


def settle(args, head):
    """Fill the flags a session fixes from its header, refusing those that contradict it."""
    if head is None:
        for name, value in NEW.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        return
    session, spec = head["session"], head["policy"]
    held = {"policy": spec["name"], "size": spec["args"].get("size"),
            "sinks": spec["args"].get("sinks"), "positions": head["positions"],
            "dtype": head["dtype"], "quantize": session.get("quantize"),
            "past_range": head["allow_past_range"]}
    for name, value in held.items():
        given = getattr(args, name)
        if given in (None, False) or given == value or value is None:   # None: Full's size
            setattr(args, name, value)
            continue
        flag = "--" + name.replace("_", "-")
        raise UsageError(f"{flag} {given} contradicts the session {args.session}, which holds "
                         f"{head['model']['name']} with policy {spec['name']} "
                         f"({', '.join(f'{k}={v}' for k, v in spec['args'].items())}), "
                         f"positions {head['positions']}, {head['dtype']}"
                         f"{', ' + session['quantize'] if session.get('quantize') else ''}; "
                         f"drop {flag} or start another --session")
    if args.model is None:
        args.model = session["model"]


def run_chat(args):
    import torch

    from .. import load_tokenizer, policies, statefile
    from ..chat import Conversation
    from ..generate import check_sampling

    check_device(args.device)
    check_sampling(args.temperature, args.top_k, args.top_p)
    check_seed(args.seed)
    check_positive("--max-new-tokens", args.max_new_tokens)
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        raise UsageError(f"--min-new-tokens must be in 0..--max-new-tokens "
                         f"({args.max_new_tokens}), got {args.min_new_tokens}")
    check_decoder_options(args.backend, quantize=args.quantize)
    if args.tp != 1:
        raise UsageError("msrnn chat runs in one process; drop --tp")
    for stale in statefile.stale_temps(args.session):   # a writer killed mid-write left it
        os.unlink(stale)
    head = open_session(args.session)
    settle(args, head)
    directory, cfg = model_config(args.model or DEFAULT_MODEL)
    tok = load_tokenizer(directory)
    tok.chat_template()                                  # a base model is refused here
    model = load_model(directory, args.dtype, args.device, args.backend, quantize=args.quantize)
    if head is None:
        policy = policies.from_name(args.policy, args.size, args.sinks)
        policies.check_fits(policy, cfg.max_positions,
                            f"the model's range of {cfg.max_positions} positions", name="--size")
        state = model.init_state(1, policy, positions=args.positions,
                                 allow_past_range=args.past_range)
    else:
        state = statefile.load(args.session, model)
    talk = Conversation(model, tok, state, head["session"]["turns"] if head else 0)
    session = {"kind": KIND, "model": os.path.abspath(directory), "quantize": args.quantize}
    tty = sys.stdin.isatty()
    try:
        with torch.inference_mode():
            for text in lines(tty):
                turn(args, talk, tok, text, session, tty)
    except KeyboardInterrupt:                            # Ctrl-C: the file is a whole turn's
        print(f"\n[interrupted: {args.session} holds turn {talk.turns}]", file=sys.stderr)
        return 130
    return 0


def lines(tty: bool):
    """The user's turns: a prompt on a terminal, one line at a time from a pipe; empty lines
    skipped, end of input ends the chat."""
    while True:
        try:
            text = input("> ") if tty else sys.stdin.readline()
        except EOFError:                                 # Ctrl-D at the prompt
            print(file=sys.stderr)
            return
        if not tty and text == "":
            return
        text = text.rstrip("\r\n")
        if text.strip():
            yield text


def turn(args, talk, tok, text: str, session: dict, tty: bool):
    """One turn: the reply streamed (or one JSON line), then the session saved atomically."""
    try:
        talk.check_room(len(talk.prompt(text)), args.max_new_tokens)
    except ValueError as e:
        reason = str(e).split("; use")[0]
        raise UsageError(f"the session {args.session} is at the end of the model's range "
                         f"({reason}); start a new --session with a bounded --policy and "
                         f"--positions cache or compressed, which has no end") from None
    row = None if args.json else Row(tok, None, None)
    reply = []
    for token in talk.say(text, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          args.seed, args.ignore_eos, args.min_new_tokens):
        reply.append(token)
        if row is not None:
            row.add(token)
    talk.state.save(args.session, {**session, "turns": talk.turns})
    if row is not None:
        row.close()
    else:
        print(json.dumps({"turn": talk.turns, "user": text,
                          "assistant": tok.decode(reply, skip_special_tokens=True),
                          "tokens": talk.state.length, "slots": talk.state.slots}), flush=True)
    if tty:
        print(f"[turn {talk.turns}: {talk.state.length} tokens seen, {talk.state.slots} slots "
              f"per layer]", file=sys.stderr)
