"""What every backend shares: the bookkeeping around the tensor work of a multi-state RNN.

A backend is what computes a step `(x_t, H_{t-1}) -> (y_t, H_t)`. Two exist: msrnn's own
decoder (`model.Transformer`, and `Compiled`, the same decoder with its step compiled) and a
transformers model (`msrnn.hf.HFBackend`). Each implements only the tensor calls:

    compute_step(token_ids [B], state, head)       one token per row -> logits [B, V] (or hidden)
    compute_parallel(token_ids [B, T], states, restrict, tick)   a prompt in one pass -> hidden
    logits(hidden [..., E])                         the final norm and the LM head -> [..., V]
    rotary()                                        positions -> (cos, sin), its RoPE

and this class does the rest, once, for all of them: the checks on what comes in (once per
call), H_0 (`init_state`), making room for the tokens and counting them (`enter`, `leave`: the
only callers of MultiState.reserve and .advance), the tokens that stop generation (`eos_ids`),
and a long prompt's progress bar. The schedule (prompt.py) and every loop (generate.py,
experiments/) drive any backend through `init_state`, `step`, `parallel`, `prompt` and `logits`.
"""

import os
import time
import weakref

import torch
from tqdm import tqdm

from .policies import Policy
from .positions import Scheme
from .state import MultiState, check


def enter(state: MultiState, n: int, parallel: bool = False):
    """Before n more tokens go in (`parallel`: in one pass): the range check of the position
    scheme, and room for Full's states (MultiState.reserve)."""
    state.reserve(n, parallel)


def leave(state: MultiState, n: int):
    """After n more tokens went in: the multi-state's count and its positions move on."""
    state.advance(n)


class Backend:
    """The base of every backend (see the module's docstring). A subclass sets `shape` (what its
    multi-states are made for, state.Shape) and `vocab_size`, and implements the tensor calls."""

    eos_ids: list = []            # the tokens that end generation (config.stop_tokens)
    source: str | None = None     # the checkpoint directory, where the tokenizer files are
    backend: str                  # "msrnn" or "transformers": what a saved multi-state records

    @property
    def name(self) -> str:
        """The checkpoint's directory name (what a saved multi-state calls its model)."""
        return os.path.basename(os.path.normpath(self.source)) if self.source else "a model"

    # ---------------------------------------------------------------- the tensor calls

    def compute_step(self, token_ids, state: MultiState, head: bool = True):
        raise NotImplementedError

    def compute_parallel(self, token_ids, states: list, restrict: bool, tick):
        raise NotImplementedError

    def logits(self, hidden):
        raise NotImplementedError

    def rotary(self):
        """The model's RoPE as positions -> (cos, sin), which the renumbering position schemes
        rotate by (positions.py)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- what every backend shares

    def init_state(self, batch_size: int, policy, capacity: int | None = None,
                   positions="original", allow_past_range: bool = False) -> MultiState:
        """H_0: an empty multi-state for `batch_size` sequences, bounded by `policy` (one Policy
        for every row, or a list with one per row), its states numbered for RoPE by the scheme
        `positions` (msrnn.positions). `capacity`: Full's first number of slots (the final
        length, to allocate once; Full rows beside bounded ones: the most they will hold)."""
        rows = policy if isinstance(policy, (list, tuple)) else [policy]
        renumbered = any(isinstance(p, Policy) and p.bounded for p in rows) and \
            Scheme.of(positions) is not Scheme.ORIGINAL
        state = MultiState(self.shape, policy, batch_size, capacity, positions, allow_past_range,
                           self.rotary() if renumbered else None)
        state.model = self                  # what state.save names (msrnn.statefile)
        return state

    def check(self, token_ids, state: MultiState, dims: int):
        """Clear errors for token ids this model cannot read, or a multi-state of another
        model or batch (state.check)."""
        check(state, token_ids, dims, self.shape, self.vocab_size)

    def step(self, token_ids, state: MultiState, head: bool = True):
        """(x_t, H_{t-1}) -> (y_t, H_t): token_ids [B], the tokens x_t, each at its row's next
        position -> logits [B, V] (head=False: the final hidden state [B, E]). H_t overwrites
        H_{t-1} in place and is returned."""
        self.check(token_ids, state, 1)
        return self._step(token_ids, state, head), state

    def parallel(self, token_ids, states: list, restrict: bool = False):
        """T tokens token_ids [B, T] in one parallel pass into the multi-states -> the final
        hidden states [B, T, E] (Full appends; an empty bounded one keeps its best k; several
        empty ones share the pass; `restrict`: a positional policy's sequential prompt)."""
        for state in states:
            self.check(token_ids, state, 2)
        return self._parallel(token_ids, states, restrict)

    def prompt(self, token_ids, state: MultiState, parallel: int, restrict: bool = False,
               head: bool = True):
        """A prompt token_ids [B, T] into `state`: its first `parallel` tokens in one pass, the
        rest one step each -> logits [B, T, V] (head=False: hidden states [B, T, E]). This is
        prompt.prefill's work, which checks the ids once and decides how many run in parallel
        (prompt.parallel_prefix)."""
        # The outputs go into one tensor, made once: a long prompt's thousands of steps leave
        # no list of small tensors behind them, and need no copy at the end.
        T, out = token_ids.shape[1], None
        if parallel:
            hidden = self._parallel(token_ids[:, :parallel], [state], restrict)
            first = self.logits(hidden) if head else hidden              # [B, parallel, ...]
            out = first.new_empty(first.shape[0], T, *first.shape[2:])
            out[:, :parallel] = first
        for i in tqdm(range(parallel, T), "prompt steps", leave=False, disable=T - parallel < 512):
            y = self._step(token_ids[:, i], state, head)                 # [B, ...]
            if out is None:
                out = y.new_empty(y.shape[0], T, *y.shape[1:])
            out[:, i] = y
        return out

    def _step(self, token_ids, state: MultiState, head: bool):
        enter(state, 1)
        out = self.compute_step(token_ids, state, head)
        leave(state, 1)
        return out

    def _parallel(self, token_ids, states: list, restrict: bool):
        T = token_ids.shape[1]
        for state in states:
            enter(state, T, parallel=True)
        with tqdm(total=self.shape.layers, desc="prompt layers", leave=False,
                  disable=T < 2048) as bar:
            hidden = self.compute_parallel(token_ids, states, restrict, bar.update)
        for state in states:
            leave(state, T)
        return hidden


class Compiled(Backend):
    """msrnn's decoder with its step compiled by torch.compile: the whole step (every layer's
    attention, policy scoring and eviction) is one graph (fullgraph=True) with static shapes,
    so it compiles once per (policy, batch size, dtype, position scheme) and never again as
    positions grow. The prompt pass and the logits are the decoder's own. mode: default
    "reduce-overhead" (CUDA graphs) on CUDA, inductor's default on the CPU.

    `wrapper`: what launches the step's kernels on the CPU. "python", inductor's default: a
    generated Python function calls them one by one; "cpp", inductor's C++ wrapper (its
    `cpp_wrapper` option): the same kernels, launched from compiled C++, with no interpreter
    between them (docs/performance.md, section 10: a step about a fifth shorter, a first
    compile about twice as long). On CUDA the step replays as a CUDA graph, which has no
    wrapper to speed up.

    `compile_seconds`: the time of the steps that compiled a graph (torch.compile compiles on a
    step's first call with a new shape, and that call takes seconds, or minutes, where the
    others take milliseconds). A decode rate leaves it out and reports it on its own."""

    def __init__(self, model: Backend, mode: str | None = None, wrapper: str = "python"):
        cuda = model.shape.device.type == "cuda"
        if wrapper not in WRAPPERS:
            raise ValueError(f"wrapper={wrapper!r}: the compiled step's kernels are launched "
                             f"by {' or '.join(map(repr, WRAPPERS))}")
        if wrapper == "cpp" and (cuda or mode is not None):
            raise ValueError("wrapper='cpp' is for the CPU step with inductor's default mode: "
                             "on CUDA the step replays as a CUDA graph, with no Python between "
                             "its kernels; drop wrapper='cpp' (--cpp-wrapper)")
        if mode is None and cuda:
            mode = "reduce-overhead"
        # Every Compiled of one model shares one code object (compute_step), and each
        # (policy, batch size, position scheme) is one more graph of it: a sweep over a few
        # dozen configurations in one process must not hit dynamo's default limit of 8 and fall
        # back to the eager step.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.model, self.wrapper, self.compile_seconds = model, wrapper, 0.0
        # On the CPU the C++ compiler may fuse each multiply and add into one FMA instruction
        # (-ffp-contract=fast): the weight loops issue fewer instructions, and the int8
        # step is a fifth shorter (docs/performance.md, section 10). A fused a*b+c rounds once
        # where a*b, +c round twice: the logits move by float32 rounding, no more.
        options = None if cuda else {"cpp.enable_floating_point_contract_flag": "fast"}
        if wrapper == "cpp":
            options["cpp_wrapper"] = True
        self.compiled = torch.compile(model.compute_step, fullgraph=True, dynamic=False,
                                      mode=mode, options=options)
        self.compute_parallel, self.logits = model.compute_parallel, model.logits
        self.rotary = model.rotary

    def compute_step(self, token_ids, state: MultiState, head: bool = True):
        """The compiled step; a call in which dynamo made a new graph adds its time to
        compile_seconds."""
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        out = self.compiled(token_ids, state, head)
        if torch._dynamo.utils.counters["stats"]["unique_graphs"] != graphs:
            self.compile_seconds += time.perf_counter() - start
        return out

    @property
    def shape(self):
        return self.model.shape

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def eos_ids(self) -> list:
        return self.model.eos_ids

    @property
    def source(self):
        return self.model.source

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def backend(self) -> str:
        return self.model.backend

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    def compile_step(self, mode: str | None = None, wrapper: str = "python") -> "Compiled":
        return self if wrapper == self.wrapper else compiled(self.model, mode, wrapper)


WRAPPERS = ("python", "cpp")               # what launches a compiled step's kernels (Compiled)

# model -> {wrapper: its Compiled}: compile each model once per wrapper
_compiled = weakref.WeakKeyDictionary()


def compiled(model: Backend, mode: str | None = None, wrapper: str = "python") -> Compiled:
    """The one Compiled of `model` with this wrapper (made at the first call)."""
    each = _compiled.setdefault(model, {})
    if wrapper not in each:
        each[wrapper] = Compiled(model, mode, wrapper)
    return each[wrapper]


def compile_seconds(model) -> float:
    """The seconds `model` has spent compiling its step so far (0 for a backend that does not
    compile: msrnn's eager decoder, a transformers model). Time some work as wall seconds less
    the compile_seconds it added, to leave compilation out of a rate."""
    return getattr(model, "compile_seconds", 0.0)
