"""Decoding: run the prompt into the multi-state, then step the MSRNN one new token at a time."""

import torch

from .model import Transformer
from .policies import Policy


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
    set whose probability reaches top_p (nucleus sampling)."""
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
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def stream(model: Transformer, prompt_ids, policy: Policy, max_new_tokens=256, temperature=0.0,
           top_k=None, top_p=None, seed=None, prompt_mode="oneshot", compile=False,
           eos_ids=None):
    """Yield (new token ids [B], multi-state) one step at a time; arguments as in `generate`."""
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompt_ids = torch.as_tensor(prompt_ids, device=model.embed.weight.device)
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    B, T = prompt_ids.shape
    if T == 0:
        raise ValueError("empty prompt: give at least one token")
    if T + max(max_new_tokens - 1, 0) > model.cfg.max_positions:   # checked before any work
        raise ValueError(f"a {T}-token prompt and {max_new_tokens} new tokens need "
                         f"{T + max_new_tokens - 1} positions, past the model's range of "
                         f"{model.cfg.max_positions}; use a shorter prompt or fewer new tokens")
    if compile:
        model.compile_step()
    # Full allocates the whole sequence once; a bounded policy holds k + 1 slots regardless.
    capacity = None if policy.bounded else T + max_new_tokens
    state = model.init_state(B, policy, capacity=capacity)
    generator = None if seed is None else torch.Generator(prompt_ids.device).manual_seed(seed)
    eos = torch.tensor(sorted(eos_ids or ()), dtype=torch.long, device=prompt_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)

    logits, state = model.prefill(prompt_ids, state, mode=prompt_mode)
    logits = logits[:, -1]
    for i in range(max_new_tokens):
        ids = sample(logits, temperature, top_k, top_p, generator)
        if len(eos):
            ids = torch.where(done, eos[0], ids)            # finished rows repeat EOS
            done |= torch.isin(ids, eos)
        yield ids, state
        if bool(done.all()) or i == max_new_tokens - 1:
            return
        logits, state = model.step(ids, state)


@torch.inference_mode()
def generate(model: Transformer, prompt_ids, policy: Policy, max_new_tokens=256, temperature=0.0,
             top_k=None, top_p=None, seed=None, prompt_mode="oneshot", compile=False,
             eos_ids=None):
    """prompt_ids [B, T] -> new token ids [B, N], N <= max_new_tokens.

    The prompt enters the multi-state (`prompt_mode`, see Transformer.prefill), then each step
    feeds the last token back: (x_t, H_{t-1}) -> (y_t, H_t). Stops after max_new_tokens or when
    every row has produced one of `eos_ids` (default: the model config's eos_token_id)."""
    if eos_ids is None:
        eos = model.cfg.eos_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    out = [ids for ids, _ in stream(model, prompt_ids, policy, max_new_tokens, temperature,
                                    top_k, top_p, seed, prompt_mode, compile, eos_ids)]
    if not out:
        return torch.zeros(len(prompt_ids), 0, dtype=torch.long)
    return torch.stack(out, 1)
