"""A long chat in flat resident memory: `msrnn chat --session` for many turns, measured.

    python scripts/chat_memory.py weights/SmolLM2-135M-Instruct --turns 200 --policy tova \
        --size 64 --positions cache --max-new-tokens 16 --out results/chat-memory
    python scripts/chat_memory.py --tiny --turns 200       # a tiny random model (tests/tiny.py)

Starts one `msrnn chat ... --json` process, writes it one user message at a time through its
standard input, and after each turn's JSON line reads the process's resident memory (VmRSS in
/proc/PID/status) and the session file's size. A bounded multi-state is k + 1 slots per layer
however long the conversation, so after the first turns (allocator and library warm-up) both
must stay flat while the tokens seen grow. Writes chat-memory.json to --out and prints the table
and a summary line (the RSS spread over the turns after --warmup).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGES = ["Hi! Who are you?", "What is a recurrent network?", "Tell me a short story.",
            "Why is the sky blue?", "Give me three names for a cat.", "What did I ask first?",
            "Summarize our talk.", "What is 12 times 7?"]


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/PID/status (Linux only)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="a checkpoint directory (or --tiny)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random LLaMA with a character "
                    "tokenizer and a chat template (tests/tiny.py): no weights needed")
    ap.add_argument("--turns", type=int, default=200)
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--positions", default="cache")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=10, help="turns before RSS must be flat")
    ap.add_argument("--out", help="a directory for chat-memory.json")
    args = ap.parse_args(argv)
    if args.tiny == (args.model is not None):
        ap.error("give a model directory or --tiny")
    if args.tiny:
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from tiny import save, save_chat_tokenizer, tiny_hf
        args.model = save_chat_tokenizer(save(tiny_hf("llama"), tempfile.mkdtemp(prefix="tiny-")))

    session = os.path.join(tempfile.mkdtemp(prefix="chat-memory-"), "session.msrnn")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    chat = subprocess.Popen(
        [sys.executable, "-m", "msrnn", "chat", args.model, "--session", session, "--policy",
         args.policy, "--size", str(args.size), "--positions", args.positions,
         "--max-new-tokens", str(args.max_new_tokens), "--json"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    rows = []
    print(f"{'turn':>5} {'tokens':>7} {'slots':>5} {'RSS MiB':>8} {'file KiB':>9}")
    for i in range(args.turns):
        chat.stdin.write(MESSAGES[i % len(MESSAGES)] + "\n")
        chat.stdin.flush()
        line = chat.stdout.readline()
        if not line:
            raise SystemExit(f"msrnn chat ended at turn {i + 1} (exit {chat.wait()})")
        turn = json.loads(line)
        row = {"turn": turn["turn"], "tokens": turn["tokens"], "slots": turn["slots"],
               "rss_mib": round(resident_mib(chat.pid), 1),
               "file_kib": round(os.path.getsize(session) / 1024, 1)}
        rows.append(row)
        print(f"{row['turn']:5d} {row['tokens']:7d} {row['slots']:5d} {row['rss_mib']:8.1f} "
              f"{row['file_kib']:9.1f}", flush=True)
    chat.stdin.close()
    chat.wait(timeout=60)
    after = [r["rss_mib"] for r in rows[args.warmup:]] or [rows[-1]["rss_mib"]]
    files = {r["file_kib"] for r in rows}
    summary = {"turns": len(rows), "tokens": rows[-1]["tokens"], "slots": rows[-1]["slots"],
               "rss_first_mib": rows[0]["rss_mib"], "rss_min_after_warmup_mib": min(after),
               "rss_max_after_warmup_mib": max(after), "file_kib": sorted(files)}
    print(f"{len(rows)} turns, {summary['tokens']} tokens seen, {summary['slots']} slots per "
          f"layer: RSS after turn {args.warmup} between {min(after):.1f} and {max(after):.1f} "
          f"MiB (spread {max(after) - min(after):.1f}); session file {sorted(files)} KiB")
    if args.out:
        from msrnn.experiments.output import write_atomic
        os.makedirs(args.out, exist_ok=True)
        write_atomic(os.path.join(args.out, "chat-memory.json"),
                     json.dumps({"setup": vars(args), "summary": summary, "turns": rows},
                                indent=1))


if __name__ == "__main__":
    main()
