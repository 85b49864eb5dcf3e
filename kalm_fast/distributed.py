"""Cross-device negatives for the contrastive loss (SPEC 4.3): gather every rank's documents with autograd.

Each rank scores its local queries against the documents of all ranks::

    d_all = gather_with_grad(d_local)                          # (world * N_local, D)
    pos_idx = local_pos_idx + pos_idx_offset(d_local.shape[0])  # rows of this rank's positives in d_all
    loss = focal_infonce(q_local, d_all, pos_idx=pos_idx, group_size=G)

and DDP then averages the parameter gradients; the result equals one process on the concatenated batch (see
``gather_with_grad`` for why). Everything here is a no-op without an initialized process group or with one rank.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def _active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def pos_idx_offset(num_local_docs: int, group=None) -> int:
    """Row of this rank's first document in ``gather_with_grad``'s output: rank * num_local_docs (0 when not
    distributed). Add it to the local ``pos_idx`` (e.g. ``arange(B_local) * G``)."""
    return dist.get_rank(group) * num_local_docs if _active(group) else 0


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place: use a private copy
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """all_gather along dim 0 with autograd: (n, ...) on each of W ranks -> (W * n, ...), rank r's rows at
    [r * n, (r + 1) * n). Every rank must pass the same shape. Returns ``x`` itself when not distributed.

    Backward: the gathered gradients are all-reduced with SUM and each rank keeps its own slice. Why SUM: rank r's
    loss L_r depends on every rank's x, so rank s must backpropagate sum_r dL_r/dx_s through its own encoder, and
    the pieces dL_r/dx_s sit on the other ranks -- summing the gathered gradients collects them. DDP then *averages*
    the parameter gradients over the W ranks, which gives d/dtheta (1/W) sum_r L_r: the gradient of the mean of the
    per-rank mean losses, i.e. of the single-process mean loss over the concatenated batch (equal local batch sizes).
    Averaging here as well would divide the document gradients by W twice.
    """
    if not _active(group):
        return x
    return _GatherWithGrad.apply(x, group)


# ----------------------------------------------------------------------------------------------------------------
# the process group as the trainer sees it
# ----------------------------------------------------------------------------------------------------------------


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# How long the other ranks wait in ``barrier`` while rank 0 works alone (the MTEB check after a stage, the draw and
# write of the mined file, the soup, checkpoint saves): hours of evaluation must not trip NCCL's watchdog, which
# aborts a collective after 10 minutes by default. A rank that dies ends the run sooner: torchrun stops the others.
WAIT_TIMEOUT = datetime.timedelta(hours=float(os.environ.get("KALM_FAST_WAIT_TIMEOUT_H", "12")))
_WAIT_GROUP: dict = {}


def _wait_group():
    """A gloo group over every rank with ``WAIT_TIMEOUT``, made once (collectively: every rank's first ``barrier``);
    the default group (NCCL on GPUs) keeps its own timeout for the training collectives."""
    key = id(dist.group.WORLD)  # a new default group (tests, a restarted run) gets its own
    if key not in _WAIT_GROUP:
        _WAIT_GROUP.clear()
        _WAIT_GROUP[key] = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return _WAIT_GROUP[key]


def barrier() -> None:
    """Every rank waits here for the others when there is more than one rank, on ``_wait_group`` (long timeout)."""
    if world()[1] > 1:
        dist.barrier(group=_wait_group())


def rank_share(n: int, rank: int | None = None) -> range:
    """Rank ``rank``'s (default: this rank's) contiguous share of ``n`` items: rank r of W gets
    [n*r//W, n*(r+1)//W), so the shares in rank order are range(n); all of them when not distributed."""
    me, size = world()
    r = me if rank is None else rank
    return range(n * r // size, n * (r + 1) // size)


# The mining collectives below run on the gloo group of ``barrier`` (CPU tensors, its long timeout: ranks may reach
# them minutes apart); every rank must call each of them.

def scatter_objects(objects: list | None):
    """Rank 0's ``objects[r]`` on rank r (picklable; ``objects`` is only read on rank 0). ``objects[0]`` itself when
    not distributed."""
    rank, size = world()
    if size == 1:
        return objects[0]
    out = [None]
    dist.scatter_object_list(out, objects if rank == 0 else None, src=0, group=_wait_group())
    return out[0]


def broadcast_rows(x: torch.Tensor, *, src: int, rows: int) -> torch.Tensor:
    """Rank ``src``'s (rows, ...) CPU tensor on every rank (``x`` gives the trailing shape and dtype on the others and
    is returned on ``src``); ``rows`` must be the same on every rank. ``x`` when not distributed."""
    rank, size = world()
    if size == 1 or rows == 0:
        return x if rank == src or size == 1 else x.new_empty(0, *x.shape[1:])
    buf = x.contiguous() if rank == src else x.new_empty(rows, *x.shape[1:])
    dist.broadcast(buf, src=src, group=_wait_group())
    return buf


def gather_rows(x: torch.Tensor) -> torch.Tensor | None:
    """Every rank's rows of a CPU tensor concatenated in rank order, on rank 0 (None on the others); ranks may hold
    different numbers of rows (the same trailing shape and dtype). ``x`` itself when not distributed."""
    rank, size = world()
    if size == 1:
        return x
    group = _wait_group()
    x = x.contiguous()
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([x.shape[0]]), group=group)
    counts = [int(c) for c in counts]
    padded = torch.zeros(max(counts), *x.shape[1:], dtype=x.dtype)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(size)] if rank == 0 else None
    dist.gather(padded, parts, dst=0, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]) if rank == 0 else None


def average_gradients(params: list[torch.Tensor]) -> None:
    """Mean over ranks of the parameter gradients (what DDP's reducer does; see gather_with_grad for why mean)."""
    _, size = world()
    if size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(size)
