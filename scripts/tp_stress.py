"""Does `--tp` end cleanly under load? Runs the tensor-parallel command line many times beside
busy cores and counts how each run ended (not a CI test: it takes minutes).

    python scripts/tp_stress.py                      # a tiny random LLaMA it builds, 20 runs
    python scripts/tp_stress.py weights/SmolLM2-135M-Instruct --nproc 3 --runs 20

Each run is

    torchrun --standalone --nproc-per-node N -m msrnn generate MODEL --tp N --prompt ... \
        --policy tova --size 8 --max-new-tokens T

while --busy processes spin on the CPU. A run passes when torchrun exits 0, prints what the first
run printed, and its stderr holds no abort ("terminate called") and no traceback. Before the
group was ended (msrnn.group.end), a rank could abort at exit after a good answer, and torchrun
reported the whole run as failed. Prints one line per run and the count; exits 1 if any failed.
"""

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def spin():
    while True:                                 # a busy core: what the suite's neighbours do
        pass


def tiny_model(directory: str) -> str:
    """A tiny random LLaMA (4 KV heads, 2 layers) with a one-character-a-token tokenizer."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import save, save_char_tokenizer, tiny_hf
    save(tiny_hf("llama", seed=4, vocab_size=256, num_attention_heads=8,
                 num_key_value_heads=4), directory)
    return save_char_tokenizer(directory, 256)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="a model directory or name (default: a tiny random "
                    "LLaMA built in a temporary directory)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--nproc", type=int, default=2, help="ranks (at most the model's KV heads)")
    ap.add_argument("--busy", type=int, default=1, help="spinning processes beside the runs")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens a run")
    ap.add_argument("--timeout", type=int, default=300, help="seconds a run may take")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(tmp)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(args.nproc), "-m", "msrnn", "generate", model,
                   "--tp", str(args.nproc), "--prompt", "Once upon a time", "--policy", "tova",
                   "--size", "8", "--max-new-tokens", str(args.tokens)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        busy = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
        for p in busy:
            p.start()
        first, failed, seconds = None, [], []
        try:
            for i in range(args.runs):
                started = time.perf_counter()
                try:
                    run = subprocess.run(command, capture_output=True, text=True, env=env,
                                         timeout=args.timeout, cwd=ROOT)
                    code, out, err = run.returncode, run.stdout, run.stderr
                except subprocess.TimeoutExpired as e:
                    code, out, err = "timeout", e.stdout or "", e.stderr or ""
                    out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
                seconds.append(time.perf_counter() - started)
                first = out if first is None else first
                why = [w for w, bad in [(f"exit {code}", code != 0),
                                        ("a different answer", out != first),
                                        ("terminate called", "terminate called" in err),
                                        ("a traceback", "Traceback" in err)] if bad]
                print(f"run {i + 1:2d}: exit {code}, {seconds[-1]:.1f} s"
                      + (f"  FAILED: {', '.join(why)}" if why else ""), flush=True)
                if why:
                    failed.append(i + 1)
                    print("    " + "\n    ".join(err.strip().splitlines()[-8:]), flush=True)
        finally:
            for p in busy:
                p.kill()
    print(f"{args.runs - len(failed)} of {args.runs} runs exited 0 with the same answer and a "
          f"clean stderr ({args.nproc} ranks, {args.busy} busy core(s), "
          f"{sum(seconds) / max(len(seconds), 1):.1f} s a run)"
          + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
