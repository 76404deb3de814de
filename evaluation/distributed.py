"""One fine-tuning run across processes: torchrun, DistributedDataParallel, gloo or NCCL.

Each global batch is dealt out by ``DistributedSampler``: process r gets rows r, r + N,
r + 2N, ... of it. The backbone's trained stages run on the local rows only; their
pooled features are then gathered (``gather_rows``), put back in the global order, and
the MLP, head and loss run on the whole global batch in every process. Batch norm in
the MLP, the dropout masks (every process draws from the same seeded generator) and
the loss are therefore exactly those of a single process with the same global batch,
so every process's history equals the single-process history. DDP averages the
gradients of the backbone and of the head (whose class weights are ordinary
parameters of the DDP model, whatever the loss). The backbone's own batch norm layers
keep their ImageNet statistics while fine-tuning, which is what makes a local share of
a batch go through the backbone exactly as it would in the whole batch.

Launch (the script reads RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT from torchrun)::

    torchrun --nproc_per_node=4 -m evaluation.run --mode finetune ...
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DistributedSampler


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: object = None  # a process group of its own for gather_rows, apart from DDP's

    @property
    def main(self) -> bool:
        """Whether this process writes results, plots and caches (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def __deepcopy__(self, memo):  # process groups cannot be copied; models holding a Context can
        return self


SINGLE = Context()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device_type: str) -> Context:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); one process: no group."""
    if not launched_by_torchrun():
        return SINGLE
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, dist.new_group(backend=backend))


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def from_main(obj, ctx: Context):
    """``obj`` as the main process has it, in every process (a picklable object)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def batch_indices(n: int, batch_size: int, ctx: Context, *, shuffle: bool, seed: int, epoch: int):
    """Yield (local rows, global rows) of each global batch of ``batch_size`` over ``range(n)``.

    The order is ``DistributedSampler``'s, reseeded each epoch; it does not depend on the
    number of processes, so one process sees the same global batches. The sampler pads
    the last batch with repeated rows so every process gets the same count; those
    repeats are dropped again after the gather (global rows stop at n).
    """
    if batch_size % ctx.world:
        raise ValueError(f"--batch-size ({batch_size}) must be a multiple of the number of processes ({ctx.world})")
    local_size = batch_size // ctx.world
    sampler = DistributedSampler(range(n), num_replicas=ctx.world, rank=ctx.rank, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    local = torch.tensor(list(sampler), dtype=torch.long)
    everyone = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=shuffle, seed=seed)
    everyone.set_epoch(epoch)
    order = torch.tensor(list(everyone), dtype=torch.long)
    for k, start in enumerate(range(0, n, batch_size)):
        yield local[k * local_size:(k + 1) * local_size], order[start:start + batch_size]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, n: int, context: Context) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(context.world)]
        dist.all_gather(parts, x.contiguous(), group=context.group)
        ctx.context, ctx.local = context, x.shape[0]
        # Local row j of process r is global row r + N·j: interleave, then drop the padding.
        return torch.stack(parts, 1).flatten(0, 1)[:n]

    @staticmethod
    def backward(ctx, grad: Tensor):
        context = ctx.context
        # Every process computed the same loss on the global batch; summing their gradients
        # (N equal copies) rather than taking the local one undoes DDP's averaging over N.
        full = grad.new_zeros((ctx.local * context.world, *grad.shape[1:]))
        full[:grad.shape[0]] = grad
        dist.all_reduce(full, group=context.group)
        return full.view(ctx.local, context.world, *grad.shape[1:])[:, context.rank], None, None


def gather_rows(x: Tensor, n: int, context: Context) -> Tensor:
    """The global batch (n rows, in global order) from each process's local rows; differentiable."""
    if not context.distributed:
        return x[:n]
    return _GatherRows.apply(x, n, context)
