"""The tensor-parallel group: the processes (ranks) that share one model, each holding a
contiguous range of its KV heads with their query heads (msrnn.tp), and the few collectives that
cross ranks. The engine is torch.distributed: gloo on the CPU, nccl on CUDA.

What crosses ranks at a step (docs/scale.md): the attention output and the MLP's partial sums
(one all-reduce each per layer, msrnn.tp.RowLinear), and, for a policy whose choice is shared by
the layer's heads (per_head=False: TOVA, H2O-layer), the sum over heads of each candidate's
score (`mean`), so that every rank evicts the same token. `same` checks that every rank was
given the same token ids, the one thing the ranks must agree on from outside.

A group here is a torch.distributed ProcessGroup, or None: one process, nothing crosses.

A group msrnn made (`setup`) msrnn also ends (`end`): a barrier, then destroy_process_group().
Left to the interpreter's exit, gloo's threads are torn down in whatever order it takes, and a
rank can abort after a good answer ("terminate called without an active exception"). A group
the caller made (init_process_group before loading) is the caller's to end.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist

_made = None         # the default group msrnn made (setup), until it ends it (end)
WAIT = timedelta(seconds=60)    # how long `end` waits at its barrier for the other ranks


def setup(tp: int, device) -> "dist.ProcessGroup":
    """The group of `tp` processes this one belongs to: torch.distributed's default group, made
    here from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) unless the
    caller made it (init_process_group). The backend follows the device: gloo for the CPU, nccl
    for CUDA (each rank on cuda:LOCAL_RANK)."""
    device = torch.device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError(f"tp={tp} needs {tp} processes: start them with `torchrun "
                             f"--nproc-per-node {tp} ...` (or call torch.distributed."
                             f"init_process_group in each before loading)")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=30))
        global _made
        _made = dist.group.WORLD
    if dist.get_world_size() != tp:
        raise ValueError(f"tp={tp}, but {dist.get_world_size()} processes were started; start "
                         f"exactly {tp} (torchrun --nproc-per-node {tp})")
    return dist.group.WORLD


def end(wait: timedelta = WAIT):
    """End the group msrnn made (setup), if it is still the default group; a group the caller
    made is left alone. Every rank calls it after its last collective: a barrier, so that no
    rank tears its connections down while another still reads from them, then
    destroy_process_group(), which stops the backend's threads while the interpreter is whole.

    The barrier gives up after `wait`: a dead peer fails it at once ("Connection closed by
    peer"), a peer that never comes fails it after `wait`: no rank hangs. The group is destroyed
    either way; then a failed barrier's RuntimeError is raised, for the caller to report."""
    global _made
    ours, _made = _made, None
    if ours is None or not dist.is_initialized() or dist.group.WORLD is not ours:
        return
    try:
        ids = [torch.cuda.current_device()] if dist.get_backend() == "nccl" else None
        dist.barrier(device_ids=ids, timeout=wait)
    finally:
        dist.destroy_process_group()


class EndsGroup:
    """What a model on a tensor-parallel group offers its user (msrnn.tp.Sharded and
    msrnn.hf.HFBackend): `close()`, or a `with` block, ends the group msrnn made when loading it
    (`end`); a group the caller made is left alone. Every model on the group stops working
    with it.

        with msrnn.load(path, tp=4) as model:     # in each of the 4 processes
            ids = msrnn.generate(model, prompt_ids, policy)
    """

    def close(self):
        end()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        try:
            end()
        except RuntimeError:
            if kind is None:                 # a block that failed reports its own error
                raise


def rank(group) -> int:
    """This process's rank in the group (0 with no group)."""
    return 0 if group is None else dist.get_rank(group)


def size(group) -> int:
    """How many processes share the model (1 with no group)."""
    return 1 if group is None else dist.get_world_size(group)


def total(x, group):
    """x summed over the group's ranks, in place (x itself without a group). Every rank gets
    the same bits, so every rank then makes the same choice. torch.compile traces it."""
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def largest(x, group):
    """x's elementwise max over the group's ranks, in place (x itself without a group)."""
    if group is not None:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def mean(x, dims: tuple, group):
    """The mean of x over dimensions `dims` that hold heads, over the heads of every rank: each
    rank sums its own and counts them, one all-reduce adds both up (ranks may hold different
    numbers of heads). Without a group: x.mean(dims), the one-process computation."""
    if group is None:
        return x.mean(dims)
    part = x.sum(dims)
    count = torch.full_like(part[..., :1], x.numel() // part.numel())   # heads here
    both = total(torch.cat([part, count], -1), group)          # [..., S + 1]
    return both[..., :-1] / both[..., -1:]


def heads(n: int, group, device) -> tuple[range, int]:
    """(this rank's KV heads by their index in the layer, the layer's KV heads on all ranks):
    rank r holds the n heads after those of ranks 0..r-1 (msrnn.tp's contiguous ranges), which
    one all-reduce of the counts tells every rank. Without a group: (range(n), n)."""
    if group is None:
        return range(n), n
    counts = torch.zeros(size(group), dtype=torch.long, device=device)
    counts[rank(group)] = n
    total(counts, group)
    start = int(counts[:rank(group)].sum())
    return range(start, start + n), int(counts.sum())


def same(token_ids, group, what: str = "token ids"):
    """Raise the same clear error on every rank unless every rank holds equal `token_ids` (a
    sharded model computes one sequence: all its ranks must read the same prompt)."""
    if group is None:
        return
    shape = torch.tensor([token_ids.dim(), *token_ids.shape, 0, 0][:3], dtype=torch.long)
    if not agree(shape.to(token_ids.device), group) or \
            not agree(token_ids.reshape(-1).long(), group):
        raise ValueError(f"the ranks of the tensor-parallel group were given different {what}: "
                         f"every rank must see the same prompt (and draw the same samples: pass "
                         f"a seed)")


def agree(x, group) -> bool:
    """Whether the 1-D LongTensor x (of one length on every rank) is equal on every rank: the
    max over ranks of x equals the min, -max(-x). Every rank gets the same answer."""
    both = torch.cat([x, -x])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(both[:len(x)], -both[len(x):]))
