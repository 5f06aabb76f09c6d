"""What every command shares: its options as argparse parent parsers (the model, devices, the
policy grid, positions, output), and the checks that run before any expensive work (arguments,
devices, ranges, output directories), the library's ValueErrors as the messages."""

import argparse
import os

from ..checkpoint.loading import DEFAULT_MODEL                    # a name: found in the model home
from ..quantize import KINDS as QUANTIZE
DTYPES = ("float32", "bfloat16", "float16", "float64")


class UsageError(ValueError):
    """A bad argument: the message names it and the fix."""


def policy_help() -> str:
    from ..policies import describe
    return "policies (--policy / --policies):\n" + describe()


def options(add, *args, **kwargs) -> argparse.ArgumentParser:
    """A parent parser (argparse's `parents=`) with the arguments `add(parser, ...)` adds."""
    parser = argparse.ArgumentParser(add_help=False)
    add(parser, *args, **kwargs)
    return parser


def command(commands, name: str, help: str, run, *parents, model: str = "required"):
    """A subcommand: its positional MODEL (`model`: "required", or "default" for the default
    model), the shared options of `parents`, and the registered policies as its epilog."""
    p = commands.add_parser(name, help=help, parents=list(parents), epilog=policy_help(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    if model == "default":
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                       help=f"checkpoint directory, name in the model home ($MSRNN_HOME, by "
                       f"default ~/.cache/msrnn) or Hub repo id (default {DEFAULT_MODEL})")
    else:
        p.add_argument("model", help="checkpoint directory, name in the model home or Hub "
                       "repo id")
    p.set_defaults(run=run)
    return p


def add_decoding_args(parser, seed: str = "sampling: each row draws from its own generator"):
    """How new tokens are drawn and when they stop (`msrnn generate`, `msrnn chat`)."""
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--min-new-tokens", type=int, default=0, metavar="N", help="no reply "
                        "ends before N new tokens: EOS is not drawn until then")
    parser.add_argument("--ignore-eos", action="store_true", help="EOS ends nothing: every "
                        "reply decodes --max-new-tokens (EOS is written and fed back like any "
                        "token)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int, help=seed)


def add_output_args(parser, files: str):
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--out", help=f"directory for {files} (resumable)")


def add_sample_args(parser, samples: int):
    parser.add_argument("--samples", type=int, default=samples, help="prompts per cell (one "
                        "batch)")
    parser.add_argument("--seed", type=int, default=0)


def load_policies(argv):
    """Register, before any parser reads the registry (its help and checks), the policies of
    installed plugins (entry-point group `msrnn.policies`) and of every `--policy-module FILE.py`
    in argv, in order."""
    import argparse

    from ..policies import import_file, load_plugins
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)   # --policy is not it
    pre.add_argument("--policy-module", action="append", default=[])
    files = pre.parse_known_args(argv)[0].policy_module
    try:
        load_plugins()
        for path in files:
            import_file(path)
    except ValueError as e:
        raise UsageError(f"--policy-module {e}" if files and str(e).startswith(
            tuple(files)) else str(e)) from None


def add_policy_module_arg(parser):
    parser.add_argument("--policy-module", action="append", metavar="FILE.py",
                        help="a Python file whose @register'ed policies join the registry "
                        "(repeatable); installed plugins join through the entry-point group "
                        "msrnn.policies")


def add_policy_args(parser, multiple=False):
    from ..policies import NAMES
    add_policy_module_arg(parser)
    if multiple:
        parser.add_argument("--policies", default="full,window,sinks,h2o,tova",
                            help=f"comma-separated, from: {', '.join(NAMES)}")
        parser.add_argument("--sizes", default="64,128,256", help="comma-separated sizes k")
    else:
        parser.add_argument("--policy", default="tova", help=f"one of: {', '.join(NAMES)}")
        parser.add_argument("--size", type=int, default=256, help="multi-state size k")
    parser.add_argument("--sinks", type=int, help="first tokens never evicted (sinks: default "
                        "4; window, tova, tova-head, keynorm: default 0)")


def add_batch_args(parser):
    """How many configurations of a sweep run together, as the rows of one batch."""
    parser.add_argument("--batch-configs", type=int, metavar="N", help="run up to N "
                        "configurations together as the rows of one batch (default: as many as "
                        "a quarter of this machine's memory holds; 1: one at a time)")


def batch_configs(args, cfg, rows: int, configs: list, tokens: int, say) -> int:
    """--batch-configs, or the default that experiments.sweep.fit picks for configurations of
    `rows` rows each over `tokens` tokens (their largest multi-state bounds the slots), said
    on the log."""
    from ..experiments.sweep import fit
    if args.batch_configs is not None:
        return args.batch_configs
    sizes = [c.policy.size for c in configs if c.policy.bounded]
    slots = max(sizes) + 1 if sizes else tokens
    n, each = fit(cfg, rows, slots, tokens, {"float64": 8, "float32": 4}.get(args.dtype, 2))
    say(f"up to {n} configurations together as rows of one batch ({each / 2**20:.0f} MiB each "
        f"in a quarter of this machine's memory; --batch-configs N to choose)")
    return n


def add_device_args(parser):
    """Where and how the model runs: dtype, device, weights, backend, tensor parallelism."""
    parser.add_argument("--backend", choices=("msrnn", "transformers"), default="msrnn",
                        help="msrnn's own decoder, or the policy inside transformers (msrnn.hf)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel over N processes, "
                        "split by KV head: start them with torchrun --nproc-per-node N "
                        "(docs/scale.md)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--quantize", choices=QUANTIZE, help="int8: weight-only int8 "
                        "projections and LM head, one scale per output channel; int4: 4-bit "
                        "groups of 32 (llama.cpp's Q4_1; the LM head Q8_0), the default model's "
                        "own GGUF blocks; activations in --dtype (msrnn's decoder; "
                        "docs/performance.md)")


def check_device(name: str, ray: str | None = None):
    """The torch device `name`, if this machine has it. With --ray the workers' hosts have the
    devices, not necessarily this one: each worker is given one GPU of its host, which it sees
    as `cuda` (experiments.cluster), so only the kind is checked here."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}: use cpu, cuda or cuda:N") from None
    if ray is not None and device.type == "cuda":
        if device.index:
            raise UsageError(f"--device {name} with --ray: each worker is given one GPU of its "
                             f"host by Ray and sees it as cuda; use --device cuda")
        return device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this machine has no CUDA GPU (or this torch build "
                         f"has no CUDA); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: msrnn runs on cpu or cuda")
    return device


def add_worker_args(parser, jobs: bool = True, local: bool = False):
    """Where a sweep's items run (experiments.sweep, experiments.cluster): --ray ADDRESS, and
    with `jobs` --jobs N (`local`: also worker processes on this machine without --ray)."""
    parser.add_argument("--ray", metavar="ADDRESS", help="run on a Ray cluster, each worker "
                        "loading the model once: local (a Ray instance started here), auto (the "
                        "cluster `ray start` made on this host) or HOST:PORT of its head; the "
                        "extra msrnn[ray] (docs/scale.md)")
    if jobs:
        parser.add_argument("--jobs", type=int, metavar="N", help="workers, each with its own "
                            "model: with --ray, Ray workers (default: one per free CPU of the "
                            "cluster, or per GPU with --device cuda)" + (
                                "; without, processes on this machine (default 1; 2 is fastest "
                                "on a 2-core CPU)" if local else ""))


def check_workers(args, local: bool = False):
    """--ray and --jobs, before any work: a positive --jobs (without --ray only where worker
    processes run here, `local`), not with --tp, Ray installed and the cluster answering."""
    jobs = getattr(args, "jobs", None)
    check_positive("--jobs", jobs, allow_none=True)
    if args.ray is None:
        if (jobs or 1) > 1 and not local:
            raise UsageError(f"--jobs {jobs} sets how many Ray workers run: add --ray local "
                             f"(or a cluster's address), or drop --jobs")
        if (jobs or 1) > 1 and args.tp > 1:
            raise UsageError("--jobs runs configurations in processes of their own; with --tp, "
                             "leave it at 1 (the ranks already share the work)")
        return
    if args.tp > 1:
        raise UsageError("--ray runs whole models on its workers; drop --tp (or --ray)")
    from ..experiments import cluster
    try:
        cluster.reach(args.ray)
    except ValueError as e:
        raise UsageError(str(e)) from None


def workers(args) -> dict:
    """Sweep.run's keywords for where the items run: jobs, ray, gpu."""
    import torch
    return {"jobs": getattr(args, "jobs", None), "ray": args.ray,
            "gpu": torch.device(args.device).type == "cuda"}


def check_positive(name: str, value, allow_none=False):
    if value is None and allow_none:
        return
    if not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value}")


def check_seed(seed):
    if seed is not None and not 0 <= seed < 2**63:
        raise UsageError(f"--seed must be in 0..2**63-1, got {seed}")


def parse_list(name: str, text: str, kind=str) -> list:
    """'a,b,c' -> [a, b, c] (kind int: integers), with a clear error."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if kind is int:
        try:
            items = [int(x) for x in items]
        except ValueError:
            raise UsageError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not items:
        raise UsageError(f"{name} is empty")
    return items


def model_config(path: str):
    """(local checkpoint directory, its Config): read before loading any weight, so that ranges
    are checked first. `path` is a directory, a name in the model home or a Hub repo id
    (msrnn.checkpoint.loading.resolve); a repo id not in the model home is downloaded here, once."""
    from ..config import read_config
    from ..checkpoint.loading import resolve
    directory = resolve(path)
    return directory, read_config(directory)


def add_positions_args(parser, multiple: bool = False):
    from ..positions import NAMES
    parser.add_argument("--positions", default="original", choices=None if multiple else NAMES,
                        help=f"{'comma-separated, from' if multiple else 'one of'}: "
                        f"{', '.join(NAMES)}: how the kept states are numbered for RoPE (cache, "
                        f"compressed: a bounded policy runs past the model's range; "
                        f"docs/design.md, Positions)")
    parser.add_argument("--past-range", action="store_true",
                        help="run absolute positions past the model's range anyway (what the "
                        "extrapolation experiment measures)")


def check_reach(cfg, policy, scheme, end: int, what: str, parallel: int = 0,
                past_range: bool = False):
    """Refuse before any work a run whose budgets are bad (msrnn.policies.budgets) or whose
    rotary positions pass the model's range (msrnn.positions.check_range, with the command
    line's names)."""
    from ..policies import budgets
    from ..positions import check_range as positions_range
    try:
        budgets(policy, cfg.n_layers, cfg.n_kv_heads)    # each layer's, checked by name first
        positions_range(policy, scheme, cfg.max_positions, end, parallel, past_range, what,
                        layers=cfg.n_layers)
    except ValueError as e:
        raise UsageError(str(e)) from None


def add_prompt_mode_arg(parser, observe: bool = False):
    from ..prompt import Mode
    parser.add_argument("--prompt-mode", choices=[m.value for m in Mode],
                        default=Mode.ONESHOT.value,
                        help="oneshot: the prompt in one pass, then the best k kept (the paper "
                        "authors' code); sequential: every prompt token a step (the MSRNN "
                        "definition)")
    if observe:
        parser.add_argument("--observe", type=int, default=1, metavar="N", help="oneshot: rank "
                            "the prompt by the mean attention of its last N queries (the "
                            "observation window ω; TOVA; default 1, the paper's rule)")


def check_observe(args):
    """--observe W ranks a oneshot prompt: refused with a sequential one, which never ranks."""
    check_positive("--observe", args.observe)
    if args.observe != 1 and args.prompt_mode != "oneshot":
        raise UsageError(f"--observe {args.observe} ranks a oneshot prompt by its last "
                         f"{args.observe} queries; a sequential prompt never ranks: use "
                         f"--prompt-mode oneshot, or drop --observe")


def check_policies(args, limit: int, what: str, schemes=None, bounded_only: bool = False,
                   name: str = "size"):
    """The configurations of --policies x --sizes (x position schemes), each checked: known
    names, positive sizes, smaller than `limit` (`what` names it)."""
    from ..experiments.sweep import configurations
    from ..policies import NAMES

    names = parse_list("--policies", args.policies)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise UsageError(f"unknown policy {unknown[0]!r}; choose from {', '.join(NAMES)}")
    sizes = parse_list("--sizes", args.sizes, int)
    if any(s < 1 for s in sizes):
        raise UsageError(f"--sizes must be positive, got {args.sizes!r}")
    try:
        return configurations(names, sizes, args.sinks, getattr(args, "observe", 1),
                              schemes or (args.positions,), limit, what, bounded_only, name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def setup(args, directory: str, files: dict, **fields) -> dict:
    """What identifies a sweep's results (experiments.sweep: a results file resumes only under
    the same setup): the model, the texts (`files`: {key: paths}) and their digest, the options
    every sweep shares, and `fields`, the command's own."""
    from ..experiments.text import digest

    out = {"model": os.path.abspath(directory),
           **{key: [os.path.basename(p) for p in paths] for key, paths in files.items()},
           "digest": digest([p for paths in files.values() for p in paths]),
           "dtype": args.dtype, "sinks": args.sinks, "backend": args.backend, **fields}
    if args.quantize:                      # older results directories stay valid without it
        out["quantize"] = args.quantize
    return out


def read_texts(paths) -> list[str]:
    """The texts of --text / --haystack files, each checked (experiments.text.read_text)."""
    from ..experiments.text import read_text

    try:
        return [read_text(path) for path in paths]
    except ValueError as e:
        raise UsageError(str(e)) from None


def ranks(args) -> int:
    """--tp N: this process's rank in the group torchrun started (0 without --tp). Rank 0
    speaks for the group: the others print nothing and write no files."""
    import sys

    from ..experiments import output

    tp = getattr(args, "tp", 1)
    if tp == 1:
        return 0
    check_positive("--tp", tp)
    if os.environ.get("WORLD_SIZE") != str(tp):
        raise UsageError(f"--tp {tp} runs as {tp} processes: start them with `torchrun "
                         f"--standalone --nproc-per-node {tp} $(which msrnn) {args.command} ...`")
    rank = int(os.environ.get("RANK", 0))
    if rank:
        sys.stdout = sys.stderr = open(os.devnull, "w")
        output.WRITES = False
    return rank


def end_group(args, ok: bool):
    """--tp N: end the group the command made, on every way out (msrnn.group.end: a barrier,
    then destroy_process_group), so that no rank aborts at exit after a good answer. After a
    good run the other ranks may wait up to 5 minutes for rank 0 to write its files and plots;
    a barrier that fails then (a peer died, or never came) is one warning line, and the answer
    stands (exit 0). After a failure (wait: msrnn.group.WAIT), the failure's line was the one
    line."""
    if getattr(args, "tp", 1) == 1:
        return
    import sys
    from datetime import timedelta

    from .. import group
    try:
        group.end(timedelta(minutes=5) if ok else group.WAIT)
    except RuntimeError as e:
        if ok:
            first = (str(e).splitlines() or [""])[0]
            print(f"msrnn {args.command} (rank {os.environ.get('RANK', '?')}): warning: the "
                  f"ranks did not end together: another rank ended first or never came "
                  f"({first})", file=sys.__stderr__)


def compile_option(args):
    """--compile and --cpp-wrapper as one value for load_model: False (eager), True (compiled)
    or "cpp" (compiled, its kernels launched by inductor's C++ wrapper: backend.Compiled)."""
    if not getattr(args, "cpp_wrapper", False):
        return args.compile
    if not args.compile:
        raise UsageError("--cpp-wrapper chooses what launches the compiled step's kernels; add "
                         "--compile")
    if args.device.startswith("cuda"):
        raise UsageError("--cpp-wrapper is for the CPU: on CUDA the compiled step replays as a "
                         "CUDA graph, with no Python between its kernels; drop --cpp-wrapper")
    return "cpp"


def check_decoder_options(backend: str, compile: bool = False, quantize: str | None = None):
    """--compile and --quantize change msrnn's own decoder: refused with --backend transformers."""
    if backend != "transformers":
        return
    if compile:
        raise UsageError("--compile compiles msrnn's own decode step; drop it with --backend "
                         "transformers")
    if quantize:
        raise UsageError(f"--quantize {quantize} quantizes msrnn's own decoder; drop it with "
                         f"--backend transformers (or use transformers' own quantization)")


def load_model(directory: str, dtype: str, device: str, backend: str = "msrnn", tp: int = 1,
               compile: bool | str = False, quantize: str | None = None, warm=None):
    """The backend a command runs on (experiments.sweep.backend), its options checked first: tp
    against the model's KV heads, --compile (compile_option) and --quantize with msrnn's own
    decoder; with tp > 1
    on CUDA, the GPU cuda:LOCAL_RANK. `warm(model)`: a first run, kept out of the timings."""
    import torch

    from ..config import read_config
    from ..experiments.sweep import backend as make

    if tp > 1:
        kv = read_config(directory).n_kv_heads
        if tp > kv or (backend == "transformers" and kv % tp):
            raise UsageError(f"--tp {tp}: this model has {kv} KV heads; use at most {kv} ranks"
                             + (" that divide them (transformers' tensor parallelism splits "
                                "heads evenly)" if backend == "transformers" else ""))
        if torch.device(device).type == "cuda":
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    check_decoder_options(backend, compile, quantize)
    model = make(directory, getattr(torch, dtype), device, backend, tp, compile, quantize)
    if warm is not None:
        warm(model)
    return model


def loader(args, directory: str, compile: bool = False, warm=None):
    """`load_model` with the command's options, to call once there is work (it pickles: a
    sweep's worker processes call it too)."""
    import functools

    return functools.partial(load_model, directory, args.dtype, args.device, args.backend,
                             args.tp, compile, args.quantize, warm)


def check_out_dir(path: str | None, what: str = "--out"):
    """--out: a directory that exists or can be made, and that this process can write (made
    here, msrnn.paths.writable_dir); checked before the work whose results go there."""
    if path is None:
        return
    from ..paths import writable_dir
    try:
        writable_dir(path, what)
    except ValueError as e:
        raise UsageError(str(e)) from None
