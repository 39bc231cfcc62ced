"""torchrun plumbing shared by the training and data scripts: process group set-up and teardown,
a barrier, an all-gather, the check that every rank ended with the same weights, and the groups
and gradient sum of Ulysses sequence parallelism.

Follows torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and torch.distributed; the
sequence-parallel layout is DeepSpeed-Ulysses' ("DeepSpeed Ulysses: System Optimizations for
Enabling Training of Extreme Long Sequence Transformer Models", arXiv 2309.14509, §3), with
world = data-parallel x sequence-parallel groups. Under torchrun the process group is nccl on GPU
and gloo on CPU, and each process uses the GPU of its LOCAL_RANK; a plain `python script.py` is
rank 0 of 1 with no group, and every helper here but the sequence-parallel ones (which need a
group) is then a no-op. Imports only torch and the standard library.

Left out: launchers other than torchrun, and ring attention or any other context-parallel scheme.
"""

import os

import torch
import torch.distributed as dist


def rank_and_device() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment, creating no process group: for
    jobs whose ranks never talk to each other (sampling). (0, 1, first GPU or CPU) without torchrun."""
    cuda = torch.cuda.is_available()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    return rank, world, torch.device("cuda", local) if cuda else torch.device("cpu")


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: init the process group (nccl on GPU, gloo on
    CPU) and make this process's GPU current; otherwise (0, 1, the first GPU or the CPU), no group."""
    rank, world, device = rank_and_device()
    if "RANK" not in os.environ:
        return rank, world, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def global_rank() -> int:
    """This process's rank in the world (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup():
    """End the process group (torchrun, even with one process). The barrier first: no rank tears
    gloo down while another still talks to it."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def all_gather_cat(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's x (the same shape on all ranks of `group`, default the world) concatenated along
    dim 0 in rank order."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def max_rank_difference(tensors) -> float:
    """The largest absolute difference between this rank's tensors and rank 0's, maximised over
    ranks: 0.0 means every rank holds the same values. A collective: every rank calls it with
    tensors of the same shapes in the same order. 0.0 without a process group."""
    tensors = [t.detach() for t in tensors]
    if not dist.is_initialized() or not tensors:
        return 0.0
    device = tensors[0].device
    diff = torch.zeros((), device=device)
    for x in tensors:
        ref = x.clone()
        dist.broadcast(ref, 0)
        diff = torch.maximum(diff, (x - ref).abs().max().float().to(device))
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def sequence_parallel_groups(sp_size: int):
    """(sp group, data-parallel group) of this rank for sequence parallelism of size sp_size: ranks
    k*S .. k*S + S - 1 share one sample (its tokens split over them), and the ranks at the same
    place in every sequence group form a data-parallel group (a 2-D layout: world = DP x SP).
    Every rank creates every group, in the same order, as torch.distributed requires."""
    if sp_size > 1 and not dist.is_initialized():
        raise ValueError(f"--sp-size {sp_size} splits each sample over {sp_size} processes, and this is one: start "
                         f"it with torchrun --nproc-per-node {sp_size} (or a multiple of {sp_size})")
    world, rank = dist.get_world_size(), dist.get_rank()
    if sp_size < 1 or world % sp_size:
        raise ValueError(f"sequence parallel size {sp_size} must divide the world size {world}")
    sp = dp = None
    for k in range(world // sp_size):
        group = dist.new_group(list(range(k * sp_size, (k + 1) * sp_size)))
        sp = group if rank // sp_size == k else sp
    for j in range(sp_size):
        group = dist.new_group(list(range(j, world, sp_size)))
        dp = group if rank % sp_size == j else dp
    return sp, dp


def sp_sum_grads(params, group):
    """Sum the gradients over a sequence-parallel group: under Ulysses each rank's are the share
    of its own tokens (model_dit.WanDiT.set_sequence_parallel), the sum is the whole gradient."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
