"""`msrnn bench`: the command line of msrnn/experiments/bench.py (and llamacpp.py). Every
argument is checked before the first measurement; the report is printed as markdown tables,
saved as bench.json and plotted."""

import json
import os
import sys

from .common import (DEFAULT_MODEL, DTYPES, QUANTIZE, UsageError, add_policy_module_arg,
                     check_device,
                     check_out_dir, check_positive, model_config, parse_list)
from ..checkpoint.loading import home
from ..experiments.output import figure, save_figure, write_atomic

PARTS = ("speed", "prefill", "latency", "throughput", "ceiling")
EXTRA_PARTS = ("llamacpp",)              # not by default: it needs llama-cpp-python


def add_commands(commands):
    b = commands.add_parser("bench", help="decode speed and memory against transformers")
    b.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    b.add_argument("--parts", default=",".join(PARTS), help=f"from: {', '.join(PARTS)}; "
                   "and llamacpp: llama.cpp beside msrnn's compiled step on the same weights "
                   "(the extra msrnn[llamacpp]; docs/performance.md)")
    b.add_argument("--dtypes", default="float32,bfloat16")
    b.add_argument("--quantize", choices=QUANTIZE, help="also msrnn's rows with these weights "
                   "(float32 activations): speed, throughput and their ceiling")
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--size", type=int, default=64, help="TOVA size in the speed table")
    b.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    b.add_argument("--cpp-wrapper", action="store_true", help="the compiled rows' kernels "
                   "launched by inductor's C++ wrapper (CPU)")
    b.add_argument("--lengths", default="512,1024,2048,4096,6144,8192",
                   help="latency: sequence lengths")
    b.add_argument("--latency-size", type=int, default=512)
    b.add_argument("--compile-latency", action="store_true",
                   help="latency: time Full's rows compiled too (one compile per length; TOVA's "
                        "rows are timed compiled anyway)")
    b.add_argument("--length", type=int, default=4096, help="throughput: sequence length")
    b.add_argument("--full-batch", type=int, default=8, help="throughput: full-cache batch")
    b.add_argument("--throughput-sizes", default="512,256")
    b.add_argument("--prefill-tokens", type=int, default=1024, help="prefill: prompt length")
    b.add_argument("--weights", default="float32,bfloat16,int8,int4",
                   help="llamacpp: the kinds of weights (llama.cpp's F32, BF16, Q8_0, Q4_1)")
    b.add_argument("--rounds", type=int, default=2, help="llamacpp: rounds of interleaved rows")
    b.add_argument("--threads", type=int, help="llamacpp: threads of both programs (default: "
                   "torch's, one per core)")
    b.add_argument("--device", default="cpu")
    add_policy_module_arg(b)
    b.add_argument("--out", help="directory for bench.json and bench.png")
    b.set_defaults(run=run_bench)


def run_bench(args):
    import torch

    from ..experiments import bench
    from .. import load

    parts = parse_list("--parts", args.parts)
    unknown = [p for p in parts if p not in PARTS + EXTRA_PARTS]
    if unknown:
        raise UsageError(f"--parts: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(PARTS + EXTRA_PARTS)}")
    dtypes = parse_list("--dtypes", args.dtypes)
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise UsageError(f"--dtypes: unknown {', '.join(bad)}; choose from {', '.join(DTYPES)}")
    lengths = parse_list("--lengths", args.lengths, int)
    sizes = parse_list("--throughput-sizes", args.throughput_sizes, int)
    for name in ("prompt_tokens", "new_tokens", "size", "latency_size", "length", "full_batch",
                 "prefill_tokens", "rounds"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name))
    check_positive("--threads", args.threads, allow_none=True)
    weights = parse_list("--weights", args.weights)
    if "llamacpp" in parts:
        from ..experiments import llamacpp
        bad = [w for w in weights if w not in llamacpp.FILE_TYPES]
        if bad:
            raise UsageError(f"--weights: unknown {', '.join(bad)}; choose from "
                             f"{', '.join(llamacpp.FILE_TYPES)}")
        try:
            llamacpp.need()
        except ImportError as e:
            raise UsageError(str(e)) from None
    if "latency" in parts and min(lengths) < bench.shortest_latency_length():
        raise UsageError(f"--lengths must be at least {bench.shortest_latency_length()}: each is "
                         f"reached by rounds of timed steps")
    device = check_device(args.device)
    if args.cpp_wrapper and (args.no_compile or device.type == "cuda"):
        raise UsageError("--cpp-wrapper launches the compiled CPU step's kernels from C++: drop "
                         "it with --no-compile or on CUDA (a CUDA graph replays the step)")
    wrapper = "cpp" if args.cpp_wrapper else "python"
    check_out_dir(args.out)
    directory, cfg = model_config(args.model)
    longest = max([args.prompt_tokens + args.new_tokens + 8] +
                  ([max(lengths)] if "latency" in parts else []) +
                  ([args.length] if "throughput" in parts else []) +
                  ([args.prefill_tokens] if "prefill" in parts else []))
    if longest > cfg.max_positions:
        raise UsageError(f"the benchmark needs {longest} positions, past the model's range of "
                         f"{cfg.max_positions}; use smaller --lengths/--length/--new-tokens")

    log = sys.stderr
    report = {"model": directory, "device": str(device), "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    if "speed" in parts:
        print("[msrnn bench] speed (each row in a fresh process"
              f"{'; compiled: the C++ wrapper' if args.cpp_wrapper else ''})", file=log)
        report["speed"] = bench.speed(directory, dtypes, args.device, args.size,
                                      args.prompt_tokens, args.new_tokens,
                                      compiled=not args.no_compile, quantize=args.quantize,
                                      log=log, wrapper=wrapper)
    if "llamacpp" in parts:
        threads = args.threads or torch.get_num_threads()
        print(f"[msrnn bench] llama.cpp beside msrnn compiled, batch 1, {threads} threads, "
              f"{args.rounds} rounds (each row in a fresh process"
              f"{'; compiled: the C++ wrapper' if args.cpp_wrapper else ''})", file=log)
        report["llamacpp"] = llamacpp.side_by_side(
            directory, weights, os.path.join(home(), "gguf"), args.rounds, args.prompt_tokens,
            args.new_tokens, threads, args.size, log, wrapper)
    if "prefill" in parts:
        print(f"[msrnn bench] prefill: a {args.prefill_tokens}-token prompt, float32, batch 1",
              file=log)
        report["prefill"] = bench.prefill_speed(directory, args.prefill_tokens, args.size,
                                                device, log)
    if not set(parts) & {"latency", "throughput", "ceiling"}:
        return finish(report, args.out)
    model = load(directory, dtype=torch.float32, device=device)
    compiled = None if args.no_compile else load(directory, dtype=torch.float32,
                                                 device=device).compile_step(wrapper=wrapper)
    weights = [("float32", model, compiled)]
    if args.quantize and "throughput" in parts:
        q = load(directory, dtype=torch.float32, device=device, quantize=args.quantize)
        weights.append((args.quantize, q, None if args.no_compile else load(
            directory, dtype=torch.float32, device=device,
            quantize=args.quantize).compile_step(wrapper=wrapper)))
    if "latency" in parts:
        print("[msrnn bench] latency against sequence length, float32, batch 1", file=log)
        report["latency"] = bench.latency(compiled if args.compile_latency else model, lengths,
                                          args.latency_size, log, compiled=compiled)
    if "throughput" in parts:
        print(f"[msrnn bench] throughput under a key-value budget of {args.full_batch} full "
              f"sequences of {args.length} tokens, float32 activations and multi-states",
              file=log)
        report["throughput"] = [
            {**row, "weights": kind} for kind, eager, step_compiled in weights
            for ragged in (False, True) for step, is_compiled in
            [(eager, False)] + ([(step_compiled, True)] if step_compiled is not None else [])
            for row in bench.throughput(step, args.length, args.full_batch, sizes, log,
                                        ragged=ragged, compiled=is_compiled)]
    if "ceiling" in parts:
        report["ceiling"] = bench.ceiling(directory, device,
                                          dtypes + ([args.quantize] if args.quantize else []))
        for row in report.get("speed", []):
            row["of_ceiling"] = row["tok_s"] / report["ceiling"][row["weights"]]["max_tok_s"]
        print(f"[msrnn bench] ceiling: read bandwidth {report['ceiling']['read_gb_s']:.1f} GB/s",
              file=log)
    return finish(report, args.out)


def finish(report: dict, out: str | None) -> int:
    """Print the report; with --out, save bench.json and plot."""
    print_report(report)
    if out:
        write_atomic(os.path.join(out, "bench.json"), json.dumps(report, indent=1))
        if "latency" in report and "throughput" in report:
            plot(report["latency"], report["throughput"], os.path.join(out, "bench.png"))
    return 0


def name(row) -> str:
    """A row's policy as the tables print it: full, tova(512)."""
    return row["policy"] if row["size"] is None else f"{row['policy']}({row['size']})"


def print_report(r):
    if "speed" in r:
        print("\n| implementation | policy | weights | activations | decode tok/s | vs "
              "transformers (same activations) | vs transformers fp32 | of ceiling | peak MB | "
              "multi-state MB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for s in r["speed"]:
            policy = name(s)
            ceiling = f"{s['of_ceiling']:.0%}" if "of_ceiling" in s else "-"
            print(f"| {s['impl']} | {policy} | {s['weights']} | {s['dtype']} | {s['tok_s']:.1f} | "
                  f"{s['vs_transformers']:.2f}x | {s['vs_transformers_fp32']:.2f}x | {ceiling} | "
                  f"{s['peak_mb']:.0f} | {s['state_mb']:.1f} |")
    if "latency" in r:
        print("\n| policy | step | length | ms/token |")
        print("|---|---|---|---|")
        for s in r["latency"]:
            print(f"| {name(s)} | {'compiled' if s['compiled'] else 'eager'} | {s['length']} | "
                  f"{s['ms']:.1f} |")
    if "prefill" in r:
        print("\n| implementation | policy | prompt mode | prompt tok/s | vs transformers |")
        print("|---|---|---|---|---|")
        for s in r["prefill"]:
            print(f"| {s['impl']} | {s['policy']} | {s['mode']} | {s['tok_s']:.0f} | "
                  f"{s['vs_transformers']:.2f}x |")
    if "throughput" in r:
        print("\n| policy | weights | batch | rows | step | key-value budget MB | tok/s | vs full "
              "(same weights, rows and step) |")
        print("|---|---|---|---|---|---|---|---|")
        for s in r["throughput"]:
            print(f"| {name(s)} | {s['weights']} | {s['batch']} | "
                  f"{'ragged' if s['ragged'] else 'equal'} | "
                  f"{'compiled' if s['compiled'] else 'eager'} | {s['kv_budget_mb']:.0f} | "
                  f"{s['tok_s']:.1f} | {s['vs_full']:.2f}x |")
        print("\nfastest step per row: " + "; ".join(
            f"{name(v)} {v['weights']} {'ragged' if v['ragged'] else 'equal'}: "
            f"{v['tok_s']:.1f} tok/s "
            f"({'compiled' if v['compiled'] else 'eager'})"
            for v in fastest(r["throughput"]).values()))
    if "llamacpp" in r:
        from ..experiments.llamacpp import table
        print("\n| weights | llama.cpp | llama.cpp tok/s | msrnn compiled tok/s (Full) | msrnn / "
              "llama.cpp | msrnn TOVA tok/s | TOVA / Full |")
        print("|---|---|---|---|---|---|---|")
        for t in table(r["llamacpp"]):
            print(f"| {t['weights']} | {t['file_type']} | {span(t['llama_cpp'])} | "
                  f"{span(t['msrnn_full'])} | {t['full_vs_llama_cpp']:.2f}x | "
                  f"{span(t['msrnn_tova'])} | {t['tova_vs_full']:.2f}x |")
    if "ceiling" in r:
        c = r["ceiling"]
        print(f"\nread bandwidth {c['read_gb_s']:.1f} GB/s; " + "; ".join(
            f"{d}: {v['weight_mb_per_token']:.0f} MB of weights per token -> at most "
            f"{v['max_tok_s']:.0f} tok/s" for d, v in c.items() if d != "read_gb_s"))


def span(rates) -> str:
    """Rates over rounds as the tables print them: 34.5-36.2, or 34.5 for one."""
    low, high = min(rates), max(rates)
    return f"{low:.1f}" if len(rates) == 1 else f"{low:.1f}-{high:.1f}"


def fastest(rows) -> dict:
    """(policy, size, ragged, weights) -> the throughput row of the faster step, eager or
    compiled."""
    best = {}
    for row in rows:
        key = (row["policy"], row["size"], row["ragged"], row["weights"])
        if key not in best or row["tok_s"] > best[key]["tok_s"]:
            best[key] = row
    return best


def plot(latency_rows, throughput_rows, path):
    fig, (a, b) = figure(1, 2, figsize=(10, 3.8))
    for key in dict.fromkeys((r["policy"], r["size"], r["compiled"]) for r in latency_rows):
        pts = [(r["length"], r["ms"]) for r in latency_rows
               if (r["policy"], r["size"], r["compiled"]) == key]
        label = key[0] if key[1] is None else f"{key[0]} ({key[1]})"
        a.plot(*zip(*pts), marker="o", label=label + (" compiled" if key[2] else ""))
    a.set_xlabel("sequence length (tokens)")
    a.set_ylabel("ms per token (batch 1)")
    a.set_ylim(bottom=0)
    a.legend()
    a.grid(alpha=0.3)
    equal = [r for (_, _, ragged, _), r in fastest(throughput_rows).items() if not ragged]
    labels = [(r["policy"] if r["size"] is None else f"{r['policy']} {r['size']}") +
              ("" if r["weights"] == "float32" else f" {r['weights']}") +
              f"\nbatch {r['batch']}" for r in equal]
    b.bar(labels, [r["tok_s"] for r in equal], color="tab:green")
    b.set_ylabel("tokens/s under one key-value budget")
    b.grid(alpha=0.3, axis="y")
    save_figure(fig, path)
