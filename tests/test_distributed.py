"""Cross-device negatives (SPEC 4.3): local queries scored against ``gather_with_grad``-gathered documents on 2 gloo
processes give the single-process loss and gradients on the concatenated batch, once DDP has averaged over ranks."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import gloo_group

from kalm_fast import ops
from kalm_fast.distributed import gather_with_grad, pos_idx_offset

WORLD, B_LOCAL, G, D = 2, 24, 4, 32
LOSS_KW = dict(temperature=0.05, gamma=0.5, num_mix=2)


def _global_batch():
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(WORLD * B_LOCAL, D, generator=gen), dim=-1)
    d = F.normalize(torch.randn(WORLD * B_LOCAL * G, D, generator=gen), dim=-1)
    lam = torch.rand(WORLD * B_LOCAL, LOSS_KW["num_mix"], generator=gen)
    return q, d, lam


def _worker(rank: int, init_file: str):
    with gloo_group(rank, init_file, WORLD, 60):
        q, d, lam = _global_batch()
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        docs = slice(rank * B_LOCAL * G, (rank + 1) * B_LOCAL * G)
        for in_batch in (True, False):
            # one process, the whole batch
            q_all, d_all = q.clone().requires_grad_(), d.clone().requires_grad_()
            ref = ops.focal_infonce(q_all, d_all, group_size=G, in_batch_negatives=in_batch, mix_lambda=lam,
                                    **LOSS_KW)
            ref.backward()
            # this rank: its queries against every rank's documents
            q_loc, d_loc = q[rows].clone().requires_grad_(), d[docs].clone().requires_grad_()
            gathered = gather_with_grad(d_loc)
            assert gathered.shape == d.shape
            pos_idx = torch.arange(B_LOCAL) * G + pos_idx_offset(d_loc.shape[0])
            loss = ops.focal_infonce(q_loc, gathered, pos_idx=pos_idx, group_size=G, in_batch_negatives=in_batch,
                                     mix_lambda=lam[rows], **LOSS_KW)
            loss.backward()
            # what DDP reports / applies: the mean over ranks of the losses and of the gradients
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            # fp32 reassociation only (other chunking of the logits, a + b in the all-reduce): default fp32 tolerances
            torch.testing.assert_close(mean_loss / WORLD, ref.detach())
            torch.testing.assert_close(q_loc.grad / WORLD, q_all.grad[rows])
            torch.testing.assert_close(d_loc.grad / WORLD, d_all.grad[docs])
            assert d_loc.grad.abs().sum() > 0


def test_two_processes_match_one(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)


def test_not_distributed_is_identity():
    x = torch.randn(5, 3, requires_grad=True)
    assert gather_with_grad(x) is x
    assert pos_idx_offset(40) == 0


def _slow_rank_zero_worker(rank: int, init_file: str):
    """The default group times out after 2 s; rank 0 works alone for 5 s (an evaluation), the other waits in
    kalm_fast's barrier: it must not time out (it would in dist.barrier() on the default group)."""
    import time

    from kalm_fast import distributed

    with gloo_group(rank, init_file, WORLD, 2):
        distributed.barrier()  # every rank makes the wait group here
        if rank == 0:
            time.sleep(5)
        distributed.barrier()
        assert distributed._wait_group() is not dist.group.WORLD


def test_barrier_outlasts_the_default_group_timeout(tmp_path):
    mp.spawn(_slow_rank_zero_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
