"""Compression policies: which state leaves a full multi-state (Oren et al., 2024, Sec. 3-4).

A bounded multi-state holds at most k states per layer. At step t the candidates are the k kept
states plus the new token, C = H_{t-1} ∪ {t}; the query attends over all of C, and then, if
|C| > k, the policy evicts one candidate e (the new token may be the one; tests/reference.py,
`Reference.evict`, writes this rule in plain lists):

    H_t = C \\ {e},    e = argmin_{j in C} score(j)

A policy is just that score, computed from what it sees of the candidates (`Candidates`). The
multi-state (state.py) does the rest the same way for every policy: positions below `sinks` are
never evicted, empty slots are filled before anything is evicted, and ties go to the oldest.

A policy that needs memory of its own (H2O's accumulated attention) names per-state buffers in
`memory`; the multi-state keeps one value per state in each, starts it at 0 when the state
enters, and hands them to `observe` (update them) and `score` (read them) at every step.

How many states a layer keeps is the policy's `budget(layer, layers)`: k (`size`) for every
layer by default, or one number per layer (PyramidKV), or one per KV head (DuoAttention, Ada-KV).

To add a policy, write a frozen dataclass that subclasses `Policy` with a `score` (and, if it
remembers, `memory` and `observe`; if its layers or heads keep different numbers of states,
`budget`), and give it a command-line name with `@register`. See docs/policies.md and
examples/policies/.
"""

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch


@dataclass
class Candidates:
    """What a policy sees of one layer's candidates at one step, one entry per slot S.

    a       [B, n, S]       this step's attention to each candidate, averaged over the query heads
                            that share the choice: n = Hkv (a KV head's query group, per_head) or
                            n = 1 (all query heads of the layer)
    a_sum   [B, n, S]       attention summed over the queries of this call: a itself for a step,
                            the column sums over all prompt queries for a `oneshot` prompt
    pos     [B, Hkv, S]     each candidate's absolute position (-1: an empty slot)
    t       [] or [B, 1, 1] the current position (the new token's; a prompt's last), counted
                            from 0: the paper's step t - 1
    keys    [B, Hkv, S, D]  the candidates' keys (after RoPE) and values
    values  [B, Hkv, S, D]
    memory  {name: [B, Hkv, S]}  the policy's own per-state memory (see Policy.memory)
    layer   the layer's index, 0-based
    heads   the KV heads of dim 1, by their index in the layer (tensor parallel: this rank's)
    prompt  True: ranking a whole `oneshot` prompt at once; False: one decoding step

    Slots are in no order while decoding (state.py); `by_position` and `to_slots` give a policy
    the candidates in order of position, to pool over neighbours in time (SnapKV).
    """

    a: torch.Tensor
    a_sum: torch.Tensor
    pos: torch.Tensor
    t: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    memory: dict
    layer: int = 0
    heads: tuple = ()
    prompt: bool = False

    def order(self, n: int):
        """The slots by ascending position, empty slots last: [B, n, S] indices (n = 1: head 0's
        order, which every head shares under a layer-wise policy)."""
        pos = self.pos[:, :n] if n == 1 else self.pos
        return torch.where(pos < 0, torch.iinfo(pos.dtype).max, pos).argsort(dim=-1, stable=True)

    def by_position(self, x):
        """x [B, n, S], one value per slot -> the same values in order of position, empty slots
        last: y[..., i] belongs to the i-th oldest candidate."""
        return x.gather(-1, self.order(x.shape[1]).expand(x.shape))

    def to_slots(self, y):
        """The inverse of `by_position`: values in order of position -> one per slot."""
        return torch.empty_like(y).scatter(-1, self.order(y.shape[1]).expand(y.shape), y)


# One registry of command-line names, filled by the policies' own definitions (`register`);
# the CLI, its help, the scripts and the tests read it. name -> (class, fixed arguments, text).
REGISTRY: dict = {}


def register(name: str, text: str, **fixed):
    """Class decorator: `name` on the command line makes cls(size, sinks=..., **fixed). A name
    is one policy's: registering another class under it is an error (the same class, or the
    same module's class imported again, replaces it)."""
    def add(cls):
        if name in REGISTRY:
            old = REGISTRY[name][0]
            if (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(f"policy name {name!r} is taken by {old.__module__}."
                                 f"{old.__qualname__}; {cls.__module__}.{cls.__qualname__} "
                                 f"must register another name")
        REGISTRY[name] = (cls, fixed, text)
        return cls
    return add


@dataclass(frozen=True, repr=False)
class Policy:
    """Evict the candidate with the lowest score once the candidates number more than `size`.

    A policy is data: a frozen dataclass, checked when it is made. What it reads is declared, so
    that the prompt pass computes only that (`reads`): "row", this step's attention row (a
    oneshot prompt: its last query's, or the mean of its last `observation` queries' rows);
    "sums", attention summed over the queries (a oneshot prompt: its column sums); "keys", the
    candidates' keys. A policy that reads nothing decides from positions alone and says which
    keys a query still sees (`visible`).

    `observation` (ω): a oneshot prompt is ranked by the mean attention row of its last ω queries
    (SnapKV's observation window) instead of its last query's alone (ω = 1, the paper's rule).
    Only a policy that reads the row uses it; decoding steps always use the step's own row.

    `budget(layer, layers)`: how many states each layer keeps (`size` unless overridden);
    `accepts`: which of the command line's arguments (size, sinks, observation) the class takes,
    so that `from_name` refuses the others by what the class declares."""

    size: int | None                     # k, the multi-state size (None: unbounded)
    sinks: int = 0                       # positions < sinks are never evicted (Window+i, TOVA+i)
    observation: int = field(default=1, kw_only=True)   # oneshot: rows averaged to rank it
    per_head: ClassVar[bool] = False     # True: each KV head evicts on its own; False: per layer
    reads: ClassVar[frozenset] = frozenset({"row"})
    memory: ClassVar[tuple] = ()         # names of per-state buffers the multi-state keeps for it
    accepts: ClassVar[frozenset] = frozenset({"size", "sinks", "observation"})
    # Whether ranking the first k + 1 tokens of a prompt at once evicts what the (k+1)-th step
    # would (prompt.parallel_prefix): False for a policy that ranks a prompt otherwise (c.prompt).
    prompt_as_step: ClassVar[bool] = True

    def __post_init__(self):
        n = self.observation
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"observation must be a positive integer (the prompt queries whose "
                             f"attention ranks a oneshot prompt), got {n!r}")
        if n > 1 and "row" not in self.reads:
            raise ValueError(f"{type(self).__name__} does not rank a prompt by attention rows, "
                             f"so observation={n} would change nothing; use it with TOVA")
        if not self.bounded:
            return
        size, sinks = self.size, self.sinks
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"multi-state size must be a positive integer, got {size!r}")
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sinks must be a non-negative integer, got {sinks!r}")
        if sinks >= size:
            raise ValueError(f"size {size} must be larger than sinks {sinks}: the first {sinks} "
                             f"tokens are always kept, so use --size > {sinks} or fewer sinks")

    @property
    def bounded(self) -> bool:
        """Whether the multi-state has a size at all (every policy but Full)."""
        return self.size is not None

    def budget(self, layer: int, layers: int) -> int | tuple:
        """How many states layer `layer` (0-based, of `layers`) keeps: an int for the whole layer,
        or, for a per-head policy, a tuple with one budget per KV head of the layer. `size`
        stays the nominal k (the --sizes value); this is what each layer really keeps."""
        return self.size

    def observe(self, c: Candidates):
        """Update the policy's memory (c.memory) from this step's attention; called at every
        step, before `score`, whether or not anything is evicted."""

    def score(self, c: Candidates) -> torch.Tensor:
        """Scores broadcastable to c.pos, [B, n, S]: the lowest leaves."""
        raise NotImplementedError

    def visible(self, q_pos, k_pos):
        """For a policy that reads nothing: which keys a query at q_pos still sees, so that a
        whole prompt can run as one masked parallel pass."""
        raise NotImplementedError(f"{type(self).__name__} reads {set(self.reads)}")

    def __repr__(self):
        """Name(size, sinks if any, the other arguments that differ from their defaults)."""
        args = [] if self.size is None else [str(self.size)]
        default = {"sinks": 0, "observation": 1}
        args += [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)[1:]
                 if getattr(self, f.name) != default.get(f.name, f.default)]
        return f"{type(self).__name__}({', '.join(args)})"


@register("full", "no eviction: the unbounded transformer")
@dataclass(frozen=True, repr=False)
class Full(Policy):
    """The topline: nothing is evicted; the multi-state grows with the sequence (a transformer)."""

    size: None = None
    reads: ClassVar[frozenset] = frozenset()
    accepts: ClassVar[frozenset] = frozenset()


@register("window", "the last k tokens")
@dataclass(frozen=True, repr=False)
class Window(Policy):
    """Evict the oldest position (a sliding window over the last k tokens).

    score(j) = pos_j. Window(k) attends to the current token and the k before it, so it equals a
    Mistral sliding window of k + 1. With sinks = i the first i positions stay ("Window+i").
    """

    size: int
    reads: ClassVar[frozenset] = frozenset()
    accepts: ClassVar[frozenset] = frozenset({"size", "sinks"})

    def score(self, c):
        return c.pos

    def visible(self, q_pos, k_pos):
        """The first `sinks` positions and the last size - sinks before the query (the query
        itself included)."""
        return (k_pos < self.sinks) | (k_pos >= q_pos - (self.size - self.sinks))


@register("sinks", "Window+i: the first i tokens (--sinks, default 4) and the last k - i")
@dataclass(frozen=True, repr=False)
class Sinks(Window):
    """Window+i (StreamingLLM): keep the first `sinks` tokens and a window over the rest."""

    sinks: int = 4


@register("h2o-layer", "H2O, one choice per layer", per_head=False)     # (decorators apply
@register("h2o", "H2O, per KV head: recent half + heavy hitters")       # bottom-up: h2o first)
@dataclass(frozen=True, repr=False)
class H2O(Policy):
    """Heavy-Hitter Oracle (Zhang et al., 2023): keep the k//2 most recent candidates, and evict
    among the others the one with the lowest accumulated attention

        acc_j = sum over steps τ >= j of mean_h a_{τ,h}(j)

    the mean over the KV head's query group (per_head=True, the default) or over all heads of
    the layer (per_head=False: "H2O-layer", one choice shared by the layer). acc_j is the
    policy's own memory, "acc": 0 when j enters, this step's attention added at every step."""

    size: int
    per_head: bool = field(default=True, kw_only=True)
    reads: ClassVar[frozenset] = frozenset({"sums"})
    memory: ClassVar[tuple] = ("acc",)
    accepts: ClassVar[frozenset] = frozenset({"size"})    # its own rule protects, not sinks

    def observe(self, c):
        c.memory["acc"] += c.a_sum

    def score(self, c):
        recent = c.pos > c.t - self.size // 2         # the new token is one of the k//2 recent
        return c.memory["acc"].masked_fill(recent, torch.inf)


@register("tova-head", "TOVA per KV head", per_head=True)
@register("tova", "TOVA, one choice per layer (the paper's); --sinks gives TOVA+i")
@dataclass(frozen=True, repr=False)
class TOVA(Policy):
    """Token Omission Via Attention (the paper's policy): evict the candidate the current query
    attends to least,  e = argmin_j mean_h a_h(j),  averaged over all query heads (one choice per
    layer, the paper's best variant) or, with per_head=True, per KV head over its query group."""

    size: int
    per_head: bool = field(default=False, kw_only=True)

    def score(self, c):
        return c.a


@register("keynorm", "evict the largest key norm (Devoto et al., 2024)")
@dataclass(frozen=True, repr=False)
class KeyNorm(Policy):
    """Key-norm eviction (Devoto et al., 2024): keys with a small L2 norm draw attention, so evict
    the candidate whose key has the largest norm,  e = argmax_j ||K_j||,  per KV head (each
    head has its own keys). It never looks at attention."""

    size: int
    per_head: ClassVar[bool] = True
    reads: ClassVar[frozenset] = frozenset({"keys"})
    accepts: ClassVar[frozenset] = frozenset({"size", "sinks"})

    def score(self, c):
        return -c.keys.to(torch.promote_types(c.keys.dtype, torch.float32)).norm(dim=-1)


NAMES = REGISTRY.keys()      # a live view: a policy registered later is in it


def from_name(name: str, size: int | None = None, sinks: int | None = None,
              observation: int = 1) -> Policy:
    """A policy from its command-line name (REGISTRY). `sinks`: the first tokens never evicted
    (the sinks policy's i, default 4; TOVA+i; Window+i). `observation`: the oneshot observation
    window of a policy that ranks by the attention row (TOVA); the others rank otherwise and
    ignore it. What a class takes is what it declares (`Policy.accepts`)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(NAMES)}")
    cls, fixed, _ = REGISTRY[name]
    if sinks and "sinks" not in cls.accepts:
        raise ValueError(f"policy {name!r} has no sinks: --sinks means nothing to it "
                         f"({cls.__name__}); drop --sinks or use sinks, tova or window")
    args = dict(fixed)
    if "size" in cls.accepts:
        if size is None:
            raise ValueError(f"policy {name!r} needs a multi-state size (--size)")
        args["size"] = size
    if sinks is not None and "sinks" in cls.accepts:
        args["sinks"] = sinks
    if "observation" in cls.accepts:
        args["observation"] = observation
    return cls(**args)


def grid(names, sizes, sinks: int | None = None, observation: int = 1) -> list:
    """[(name, size or None, Policy)] for every policy name and size, once for a policy that
    takes no size (Full): the configurations every sweep (ppl, needle, tasks) runs."""
    out = []
    for name in names:
        if name in REGISTRY and "size" not in REGISTRY[name][0].accepts:
            out.append((name, None, from_name(name, sinks=sinks)))
        else:
            out += [(name, size, from_name(name, size, sinks, observation)) for size in sizes]
    if not out:
        raise ValueError("no configuration to run: give --policies (and --sizes)")
    return out


def budgets(policy: Policy, layers: int, kv_heads: int | None = None) -> list:
    """Every layer's budget (`Policy.budget`), checked before any work: a positive integer
    larger than the sinks, or, for a per-head policy, a tuple of them with one per KV head
    (`kv_heads`, when known). [int | tuple] per layer; [] for Full."""
    if not policy.bounded:
        return []
    out = []
    for layer in range(layers):
        b = policy.budget(layer, layers)
        where = f"{policy}.budget(layer={layer}, layers={layers}) returned {b!r}"
        if isinstance(b, (tuple, list)):
            if not policy.per_head:
                raise ValueError(f"{where}: one budget per KV head needs a per-head policy "
                                 f"(per_head=True); a layer-wise policy evicts the same state "
                                 f"from every head, so return one int")
            if kv_heads is not None and len(b) != kv_heads:
                raise ValueError(f"{where}: {len(b)} budgets, but the layer has {kv_heads} KV "
                                 f"heads; return one per KV head")
            b, each = tuple(b), b
        else:
            each = [b]
        for x in each:
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"{where}: a budget must be a positive integer (the states "
                                 f"the layer keeps)")
            if x <= policy.sinks:
                raise ValueError(f"{where}: a budget must be larger than sinks "
                                 f"{policy.sinks}, which are always kept")
        out.append(b)
    return out


def largest(policy: Policy, layers: int | None = None) -> int:
    """The most states any layer or KV head keeps (`size` when the layers are not known)."""
    if layers is None:
        return policy.size
    return max(max(b) if isinstance(b, tuple) else b for b in budgets(policy, layers))


def smallest(policy: Policy, layers: int | None = None) -> int:
    """The fewest states any layer or KV head keeps (`size` when the layers are not known)."""
    if layers is None:
        return policy.size
    return min(min(b) if isinstance(b, tuple) else b for b in budgets(policy, layers))


def check_fits(policy: Policy, limit: int, what: str, name: str = "multi-state size",
               layers: int | None = None, kv_heads: int | None = None):
    """A bounded multi-state must be smaller than the sequences it reads (`limit`: the model's
    range, a context, a prompt length), or it would never evict: every layer's budget (of a
    model with `layers` layers and `kv_heads` KV heads, when given; else the nominal size)."""
    if not policy.bounded:
        return
    if layers is not None:
        budgets(policy, layers, kv_heads)               # bad budgets fail first, by name
    k = largest(policy, layers)
    if k >= limit:
        where = "" if k == policy.size else f" (the largest budget of {policy})"
        raise ValueError(f"{name} {k}{where} is not smaller than {what}: it would never "
                         f"evict; use a smaller size or the full policy")


def import_file(path: str):
    """Import a user's policy file (its @register lines add its policies to REGISTRY): the
    module, or a one-line ValueError naming the file and what went wrong."""
    import importlib.util
    import os
    import sys

    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file; give the path of a Python file that registers "
                         f"policies (@register)")
    name = os.path.splitext(os.path.basename(path))[0]
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module                      # dataclasses look their module up
        spec.loader.exec_module(module)
    except Exception as e:                              # whatever the user's file raises
        sys.modules.pop(name, None)
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{path}: {type(e).__name__}: {first}") from None
    return module


def load_plugins(group: str = "msrnn.policies"):
    """Import every installed plugin of the entry-point group `msrnn.policies` (a package's
    `[project.entry-points."msrnn.policies"] name = "package.module"`), which registers its
    policies; a plugin that fails to load is a one-line ValueError naming it."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        try:
            ep.load()
        except Exception as e:
            first = (str(e).splitlines() or [""])[0]
            raise ValueError(f"policy plugin {ep.name} ({ep.value}): {type(e).__name__}: "
                             f"{first}") from None


def describe() -> str:
    """The registry as help text: 'name: description' lines."""
    return "\n".join(f"  {name:10s} {REGISTRY[name][2]}" for name in NAMES)
