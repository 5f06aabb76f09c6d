"""Is inductor's generated int8 loop what holds the int8 step back? A measurement, not a feature.

scripts/int8_matvec.cpp is a hand-written AVX-512 product for one row (64 weights a load, four
accumulators, software prefetch). This builds it (torch.utils.cpp_extension, gcc, ninja), makes
it a custom op that torch.compile keeps as one call, and runs two int8 models in one process:
the package's own (inductor's loop) and a twin whose projections call the kernel. Their compiled
TOVA(64) steps alternate, round by round, so that the machine's drift hits both; then the
products alone, one pass over the model's own 121 matrices, each way.

    python scripts/int8_kernel.py weights/SmolLM2-135M-Instruct [--rounds 4] [--steps 64]

Needs a CPU with AVX-512 (it says so otherwise). Results: docs/performance.md, section 10.
"""

import argparse
import os
import time

import torch
from torch.utils.cpp_extension import load

import msrnn
from msrnn.experiments.bench import prompt_ids
from msrnn.policies import TOVA
from msrnn.prompt import prefill
from msrnn.quantize import Int8Linear

HERE = os.path.dirname(os.path.abspath(__file__))


def build():
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        raise SystemExit("int8_kernel.py: the kernel is written for AVX-512, which this CPU "
                         f"lacks ({torch.backends.cpu.get_cpu_capability()})")
    return load("msrnn_int8_matvec", [os.path.join(HERE, "int8_matvec.cpp")],
                extra_cflags=["-O3", "-march=native"])


def kernel_op(ext):
    """The kernel as a custom op: torch.compile keeps it as one opaque call in the graph."""
    @torch.library.custom_op("msrnn_probe::int8_matvec", mutates_args=())
    def int8_matvec(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return ext.int8_matvec(x.reshape(-1).contiguous(), q, s).reshape(*x.shape[:-1], -1)

    @int8_matvec.register_fake
    def _(x, q, s):
        return x.new_empty(*x.shape[:-1], q.shape[0])
    return int8_matvec


def twin(path, op):
    """An int8 model whose one-row projections call the kernel (its class swapped, per module)."""
    class KernelLinear(Int8Linear):
        def forward(self, x):
            if x[..., 0].numel() == 1 and self.bias is None and self.group is None:
                return op(x, self.weight, self.scale)
            return super().forward(x)

    model = msrnn.load(path, quantize="int8")
    for m in model.modules():
        if type(m) is Int8Linear:
            m.__class__ = KernelLinear
    return model


@torch.inference_mode()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args(argv)
    ext = build()
    op = kernel_op(ext)
    models = {"inductor's loop": msrnn.load(args.model, quantize="int8"),
              "hand-written kernel": twin(args.model, op)}
    runs = {}
    for name, model in models.items():
        compiled = model.compile_step()
        state = compiled.init_state(1, TOVA(64))
        logits, state = prefill(compiled, prompt_ids(128, model.cfg.vocab_size, "cpu"), state)
        tok = logits[:, -1].argmax(-1)
        first = compiled.step(tok, state)[0]                         # compiles; the logits
        for _ in range(7):
            compiled.step(tok, state)
        runs[name] = (compiled, state, tok, first)
    (a, *_, ya), (b, *_, yb) = runs.values()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; int8, TOVA(64), "
          f"batch 1, compiled; max |Δ logit| between the two first steps: "
          f"{(ya - yb).abs().max().item():.2e}")
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (compiled, state, tok, _) in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                compiled.step(tok, state)
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    for name, ms in times.items():
        print(f"step, {name}: " + " ".join(f"{t:.2f}" for t in ms) + " ms")

    # The products alone: one pass over the model's own matrices, each output feeding the next
    # input (as in the step), compiled, inductor's sum against the kernel
    mats = [(m.weight, m.scale) for m in models["inductor's loop"].modules()
            if isinstance(m, Int8Linear)]
    nbytes = sum(q.numel() for q, _ in mats)

    def chain(product):
        c = torch.zeros(())
        for q, s in mats:
            x = torch.ones(q.shape[1]) + c
            c = product(x, q, s).mean() * 1e-9
        return c

    ways = {"inductor's loop": torch.compile(lambda: chain(lambda x, q, s: (x * q).sum(-1) * s)),
            "hand-written kernel": torch.compile(lambda: chain(op))}
    for f in ways.values():
        f()
    alone = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, f in ways.items():
            start = time.perf_counter()
            for _ in range(10):
                f()
            alone[name].append((time.perf_counter() - start) / 10)
    for name, s in alone.items():
        print(f"products alone ({nbytes / 1e6:.0f} MB), {name}: " +
              " ".join(f"{t * 1e3:.2f} ms ({nbytes / t / 1e9:.1f} GB/s)" for t in s))


if __name__ == "__main__":
    main()
