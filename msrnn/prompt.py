"""How a prompt enters a multi-state: the schedule every command shares, on either backend.

A backend is what computes (backend.py); this module decides what it computes. Two backends
exist, msrnn's own decoder (`model.Transformer`, or its `Compiled` step) and a transformers
model with a MultiStateCache (`msrnn.hf.HFBackend`); every loop (generate, perplexity,
retention, needle, ...) runs on either through the methods of `backend.Backend`.

The two prompt modes (docs/design.md, "Prompts"):
- `sequential`: exactly T steps, the MSRNN definition (what perplexity uses). `parallel_prefix`
  says which of them run as one parallel pass, which computes the same.
- `oneshot`: the paper's authors' code: full causal attention over the whole prompt, then each
  layer keeps the k states its policy ranks best from the last prompt token's attention row
  (`Policy.observation` = w > 1: the mean of the last w rows; H2O: the column sums; KeyNorm: the
  key norms), and decoding continues step by step.
"""

from enum import Enum

import torch

from .backend import Backend
from .policies import smallest
from .positions import Scheme
from .state import unique


class Mode(str, Enum):
    """How a prompt enters the multi-state (a str: "oneshot" == Mode.ONESHOT)."""

    SEQUENTIAL = "sequential"
    ONESHOT = "oneshot"

    @classmethod
    def of(cls, mode) -> "Mode":
        try:
            return cls(mode)
        except ValueError:
            raise ValueError(f"unknown prompt mode {mode!r}: use 'sequential' or "
                             f"'oneshot'") from None


def parallel_prefix(T: int, state, mode: Mode) -> tuple[int, bool]:
    """(how many of a prompt's T tokens run as one parallel pass, whether that pass is masked to
    what a positional policy still holds); the rest are steps.

    Full: all T (nothing is ever evicted, so a step is a row of causal attention).
    A bounded multi-state that is not empty: none (`sequential` only; oneshot is refused).
    An empty one, oneshot: all T, by definition. An empty one, sequential:
      - all T, masked, if the policy decides from positions alone (it reads nothing: Window,
        Sinks) and its keys keep their absolute positions (scheme `original`): each query sees
        the keys the policy would still hold (`Policy.visible`);
      - else the first min(T, k+1): nothing is evicted before the multi-state holds k + 1
        candidates, and the (k+1)-th token's step sees exactly those, so ranking them by its
        attention row (`oneshot` of k + 1 tokens) makes the same one eviction; a policy whose
        oneshot ranking averages several rows (`observation` > 1), or that ranks a prompt
        otherwise (`prompt_as_step` False: SnapKV's pooling), ranks otherwise than that step,
        so it takes the first min(T, k), which the pass keeps whole. With budgets of their own
        (Policy.budget), k is the smallest of any layer or KV head: the others keep all of
        those tokens, and a positional policy's mask (`visible`) holds only for one k.
    Rows with policies of their own (a list): the fewest tokens any row's policy allows,
    unmasked, then steps."""
    if not state.bounded:
        return T, False
    if state.length > 0:
        if mode is Mode.ONESHOT:
            raise ValueError("oneshot compresses a whole prompt into an empty multi-state; "
                             "continue a non-empty one with mode='sequential'")
        return 0, False
    if mode is Mode.ONESHOT:
        return T, False
    policy, rows = state.policy, unique(state.policies)
    if len(rows) == 1 and not policy.reads and state.scheme is Scheme.ORIGINAL and \
            all(b == policy.size for layer in state.layers for row in layer.budgets for b in row):
        return T, True
    return min(min(T, smallest(p, state.shape.layers) + (p.observation == 1 and p.prompt_as_step))
               for p in rows if p.bounded), False


def prefill(model: Backend, token_ids, state, mode="sequential", logits: bool = True):
    """Run a prompt token_ids [B, T] into `state` -> (logits [B, T, V], state); logits=False:
    the hidden states [B, T, ...] instead (a long prompt's logits may not fit in memory)."""
    mode = Mode.of(mode)
    model.check(token_ids, state, 2)
    n, restrict = parallel_prefix(token_ids.shape[1], state, mode)
    return model.prompt(token_ids, state, n, restrict, head=logits), state


def prefill_shared(model: Backend, token_ids, states: list, logits: bool = True):
    """The `oneshot` prompt token_ids [B, T] for several empty multi-states at once (one per
    policy, say) -> logits [B, T, V] (logits=False: hidden states). Full causal attention over
    the prompt is the same whatever the policy, so the pass runs once where the backend can
    share it; each multi-state then keeps what its own policy ranks best, exactly as
    prefill(..., mode="oneshot") would."""
    if any(state.length for state in states):
        raise ValueError("prefill_shared compresses a prompt into empty multi-states")
    hidden = model.parallel(token_ids, states)
    return model.logits(hidden) if logits else hidden


def fill(model: Backend, rows: list, policy, mode, extra: int = 0,
         positions="original", allow_past_range: bool = False):
    """A new multi-state with every prompt (1-D LongTensors) in its row: (state, logits [B, V]
    after each prompt); `policy`: one Policy for every row, or a list with one per row.
    Prompts of one length run as one batch; a ragged batch runs each prompt alone, as batch-1
    generation would, and copies it into its row (MultiState.set_rows), so padding never
    enters a multi-state. `extra`: tokens to come, so that Full allocates once.
    `positions`, `allow_past_range`: the multi-state's position scheme (msrnn.positions)."""
    lengths = [len(r) for r in rows]
    scheme = dict(positions=positions, allow_past_range=allow_past_range)
    state = model.init_state(len(rows), policy, capacity=max(lengths) + extra, **scheme)
    if len(set(lengths)) == 1:
        hidden, state = prefill(model, torch.stack(rows), state, mode, logits=False)
        return state, model.logits(hidden[:, -1])
    last = []
    for b, row in enumerate(rows):
        alone = model.init_state(1, state.policies[b], capacity=len(row), **scheme)
        hidden, alone = prefill(model, row[None], alone, mode, logits=False)
        state.set_rows(b, alone)
        last.append(model.logits(hidden[0, -1]))
    return state, torch.stack(last)
