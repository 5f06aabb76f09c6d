"""Decoding: run the prompts into the multi-state, then step the MSRNN one new token at a time,
on either backend (msrnn's decoder, or a transformers model through msrnn.hf.HFBackend).

Prompts of different lengths (a ragged batch) share one multi-state: each row has its own
positions, so each prompt runs on its own into its row (prompt.fill), and then all rows step
together; padding never exists, so it never enters a multi-state. A row that has finished
repeats its EOS, and once half of the rows still in the batch have finished they leave it
(MultiState.select), so they stop costing work."""

import torch

from .policies import Policy
from .positions import check_range
from .backend import Backend
from .prompt import Mode, fill


def check_sampling(temperature: float, top_k: int | None, top_p: float | None):
    """Clear errors for sampling parameters that mean nothing."""
    if not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got "
                         f"{temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token ids [B] from logits [B, V]: greedy at temperature 0, otherwise drawn from
    softmax(logits / temperature), restricted to the top_k most likely tokens and to the smallest
    set whose probability reaches top_p (nucleus sampling). `generator`: one torch.Generator for
    the batch, or a list of one per row (then a row draws the same whatever its batch)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and top_p < 1:
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        ahead = probs.cumsum(-1) - probs              # mass of the more likely tokens
        drop = torch.zeros_like(ahead, dtype=torch.bool).scatter(-1, order, ahead >= top_p)
        logits = logits.masked_fill(drop, -torch.inf)
    probs = logits.softmax(-1)
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[:, 0]
                          for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def as_rows(prompts, device) -> list:
    """The prompts as a list of 1-D LongTensors: from [B, T] or [T] token ids, or a list of
    prompts (lists of ints or 1-D tensors, any lengths). Errors name the prompt at fault."""
    if torch.is_tensor(prompts):
        if prompts.dim() not in (1, 2):
            raise ValueError(f"prompt ids must be [B, T] or [T], got shape {tuple(prompts.shape)}")
        rows = list(prompts[None] if prompts.dim() == 1 else prompts)
    elif isinstance(prompts, (list, tuple)) and prompts and all(
            isinstance(x, int) for x in prompts):
        rows = [prompts]                                   # one prompt as a list of ints
    elif isinstance(prompts, (list, tuple)):
        rows = list(prompts)
    else:
        raise ValueError(f"prompts must be token ids ([B, T] or [T]) or a list of prompts, got "
                         f"{type(prompts).__name__}")
    if not rows:
        raise ValueError("no prompts: give at least one")
    out = []
    for i, row in enumerate(rows):
        where = f"prompt {i}" if len(rows) > 1 else "prompt"
        try:
            row = torch.as_tensor(row, device=device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{where} is not a sequence of token ids") from None
        if row.dim() != 1:
            raise ValueError(f"{where} must be one sequence of token ids (1-D), got shape "
                             f"{tuple(row.shape)}")
        if len(row) == 0:
            raise ValueError(f"{where} is empty: give at least one token")
        if row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool:
            raise ValueError(f"{where} must hold integer token ids, got dtype {row.dtype}")
        out.append(row.long())
    return out


def check_lengths(max_new_tokens, min_new_tokens=0, ignore_eos=False):
    """Clear errors for a length that means nothing: integers >= 0, min_new_tokens at most
    max_new_tokens, ignore_eos True or False."""
    for name, value in (("max_new_tokens", max_new_tokens), ("min_new_tokens", min_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if min_new_tokens > max_new_tokens:
        raise ValueError(f"min_new_tokens ({min_new_tokens}) must be at most max_new_tokens "
                         f"({max_new_tokens}); raise max_new_tokens or lower min_new_tokens")
    if not isinstance(ignore_eos, bool):
        raise ValueError(f"ignore_eos must be True or False, got {ignore_eos!r}")


def stream(model: Backend, prompts, policy: Policy, max_new_tokens=256, temperature=0.0,
           top_k=None, top_p=None, seed=None, prompt_mode=Mode.ONESHOT, compile=False,
           eos_ids=None, positions="original", allow_past_range=False, ignore_eos=False,
           min_new_tokens=0):
    """Yield (new token ids [B], multi-state) one step at a time; arguments as in `generate`."""
    check_sampling(temperature, top_k, top_p)
    check_lengths(max_new_tokens, min_new_tokens, ignore_eos)
    mode = Mode.of(prompt_mode)
    rows = as_rows(prompts, model.shape.device)
    for i, row in enumerate(rows):                               # checked before any work
        where = f"prompt {i} ({len(row)} tokens)" if len(rows) > 1 else \
            f"a {len(row)}-token prompt"
        check_range(policy, positions, model.shape.positions,
                    len(row) + max(max_new_tokens - 1, 0),
                    len(row) if mode is Mode.ONESHOT else 0, allow_past_range,
                    f"{where} and {max_new_tokens} new tokens", model.shape.layers)
    if compile:
        if not hasattr(model, "compile_step"):
            raise ValueError("compile=True compiles msrnn's own decode step; this backend has "
                             "none (use msrnn.load, or compile=False)")
        model = model.compile_step()
    state, logits = fill(model, rows, policy, mode, max_new_tokens, positions, allow_past_range)
    yield from decode(model, state, logits, max_new_tokens, temperature, top_k, top_p, seed,
                      eos_ids, ignore_eos, min_new_tokens)


def decode(model: Backend, state, logits, max_new_tokens=256, temperature=0.0, top_k=None,
           top_p=None, seed=None, eos_ids=None, ignore_eos=False, min_new_tokens=0):
    """From a multi-state after its prompts and their last logits [B, V]: yield (new token ids
    [B], multi-state) one step at a time, each token fed back, until max_new_tokens or every row
    has produced one of eos_ids.

    min_new_tokens = N: EOS cannot end a row before its N-th new token: for the first N tokens
    the logits of eos_ids are -inf, so they are never drawn (as min_new_tokens in transformers,
    min_tokens in vLLM). ignore_eos: an EOS is a token like any other, drawn and fed back, and
    every row runs to max_new_tokens (vLLM's ignore_eos, llama.cpp's --ignore-eos)."""
    check_lengths(max_new_tokens, min_new_tokens, ignore_eos)
    device, B = logits.device, logits.shape[0]
    generators = None if seed is None else [torch.Generator(device).manual_seed(seed)
                                            for _ in range(B)]
    banned = torch.tensor(sorted(eos_ids or ()), dtype=torch.long, device=device)
    eos = banned[:0] if ignore_eos else banned       # the ids that end a row
    done = torch.zeros(B, dtype=torch.bool, device=device)
    live = torch.arange(B, device=device)            # the batch row of each multi-state row
    for i in range(max_new_tokens):
        if i < min_new_tokens and len(banned):       # too early to end: EOS cannot be drawn
            logits = logits.index_fill(-1, banned, -torch.inf)
        ids = torch.full((B,), int(eos[0]) if len(eos) else 0, device=device)
        ids[live] = sample(logits, temperature, top_k, top_p,
                           None if generators is None else [generators[j] for j in live])
        if len(eos):
            ids = torch.where(done, eos[0], ids)            # finished rows repeat EOS
            done |= torch.isin(ids, eos)
        yield ids, state
        if bool(done.all()) or i == max_new_tokens - 1:
            return
        going = ~done[live]
        if int(going.sum()) <= len(live) // 2:            # half have finished: they leave
            state, live = state.select(going.nonzero()[:, 0]), live[going]
        logits, state = model.step(ids[live], state)


@torch.inference_mode()
def generate(model: Backend, prompts, policy: Policy, max_new_tokens=256, temperature=0.0,
             top_k=None, top_p=None, seed=None, prompt_mode=Mode.ONESHOT, compile=False,
             eos_ids=None, positions="original", allow_past_range=False, ignore_eos=False,
             min_new_tokens=0):
    """prompt_ids [B, T] -> new token ids [B, N], N <= max_new_tokens; or a list of prompts of
    any lengths (lists of ints or 1-D tensors) -> a list of 1-D LongTensors, row i what
    generate gives for prompts[i] alone (up to and including its EOS).

    The prompt enters the multi-state (`prompt_mode`, see msrnn.prompt), then each step
    feeds the last token back: (x_t, H_{t-1}) -> (y_t, H_t). Stops after max_new_tokens or when
    every row has produced one of `eos_ids` (default: the model config's eos_token_id). With a
    seed, each row draws from its own generator seeded with it. `model`: msrnn's decoder, or any
    Backend (msrnn.hf.HFBackend(transformers_model)). `positions`: "original", "cache" or
    "compressed", how the kept states are numbered for RoPE (msrnn.positions; a bounded policy
    with "cache" or "compressed" runs past the model's range); `allow_past_range`: run absolute
    positions past the range anyway.

    Past EOS: `min_new_tokens` = N, no row ends before N new tokens (EOS is not drawn until
    then); `ignore_eos`, EOS ends nothing and every row has exactly max_new_tokens."""
    eos_ids = set(model.eos_ids if eos_ids is None else eos_ids)
    out = [ids for ids, _ in stream(model, prompts, policy, max_new_tokens, temperature,
                                    top_k, top_p, seed, prompt_mode, compile, eos_ids,
                                    positions, allow_past_range, ignore_eos, min_new_tokens)]
    B = len(as_rows(prompts, "cpu"))
    ids = torch.stack(out, 1) if out else torch.zeros(B, 0, dtype=torch.long)
    if torch.is_tensor(prompts) or (prompts and all(isinstance(x, int) for x in prompts)):
        return ids
    return [until_eos(row, set() if ignore_eos else eos_ids) for row in ids]


def until_eos(ids, eos_ids):
    """A row of new ids up to and including its first EOS."""
    stops = [i for i, x in enumerate(ids.tolist()) if x in eos_ids]
    return ids[: stops[0] + 1] if stops else ids
