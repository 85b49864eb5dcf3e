"""One contrastive step: the focal InfoNCE over Matryoshka dims and GradCache (Gao et al. 2021) with dropout replay.

    loss, stats, tokens, finite = grad_cache_step(embedder, queries, docs, loss_fn, mini_batch_size=64)

embeds mini-batches without autograd, takes the loss and its gradients w.r.t. every embedding, then pushes each
cached gradient back through its mini-batch (re-run under the RNG state it first ran with): the parameter gradients
of the whole contrastive batch, with the activations of one mini-batch in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kalm_fast import ops
from kalm_fast.distributed import gather_with_grad, pos_idx_offset, world
from kalm_fast.model import Embedder
from kalm_fast.train.config import RecipeError, StageConfig


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def contrastive_loss(q: torch.Tensor, d: torch.Tensor, *, group_size: int, in_batch_negatives: bool,
                     stage: StageConfig, generator: torch.Generator | None) -> tuple[torch.Tensor, dict]:
    """Focal InfoNCE (+ mixing) over the Matryoshka dims: sum_k w_k * loss(normalize(q[:, :k]), normalize(d[:, :k])).

    q (B, D) local queries, d (N, D) documents of every rank, query i's group at rows offset + i*G .. offset + i*G+G-1
    (offset = this rank's first document). Returns the loss and the stats of the full-dimension term (or the first)."""
    B, D = q.shape
    pos_idx = torch.arange(B, device=q.device) * group_size + pos_idx_offset(B * group_size)
    dims = stage.mrl_dims or [D]
    weights = stage.mrl_weights or [1.0] * len(dims)
    total, stats = 0.0, None
    for k, w in zip(dims, weights):
        if k > D:
            raise RecipeError(f"mrl_dims: {k} exceeds the embedding size {D}")
        qk, dk = (q, d) if k == D else (F.normalize(q[:, :k], dim=-1), F.normalize(d[:, :k], dim=-1))
        loss, s = ops.focal_infonce(qk, dk, pos_idx=pos_idx, group_size=group_size,
                                    in_batch_negatives=in_batch_negatives, temperature=stage.temperature,
                                    gamma=stage.gamma, num_mix=stage.num_mix, mix_alpha=stage.mix_alpha,
                                    generator=generator, return_stats=True)
        total = total + w * loss
        if stats is None or k == D:
            stats = s
    return total, stats


def grad_cache(embedder: Embedder, chunks: list[dict], num_queries: int,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]], *,
               autocast: bool = False) -> tuple[torch.Tensor, dict, bool]:
    """GradCache on tokenized mini-batches: accumulate into ``.grad`` the gradient of ``loss_fn(q, gather(d))``.

    chunks: ``embedder(**chunk)`` keyword dicts on the model's device, whose embeddings concatenated are this rank's
    queries (the first ``num_queries`` rows) then its documents. Returns (loss, stats, finite). When the loss is not
    finite on any rank nothing is backpropagated (all ranks agree, so collectives stay matched)."""
    device = embedder.device
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    # 1. embed without autograd, remembering each mini-batch's RNG state (dropout masks); the last mini-batch keeps
    #    its graph, so step 3 need not re-run it
    states, embs = [], []
    with torch.no_grad():
        for chunk in chunks[:-1]:
            states.append(_rng_state(device))
            with amp:
                embs.append(embedder(**chunk).float())
    with amp:
        last = embedder(**chunks[-1]).float()
    after = _rng_state(device)

    # 2. the loss on the cached embeddings: its gradients w.r.t. every embedding
    emb = torch.cat([*embs, last.detach()]).requires_grad_()
    loss, stats = loss_fn(emb[:num_queries], gather_with_grad(emb[num_queries:]))
    finite = torch.isfinite(loss.detach()).float()
    if world()[1] > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        return loss.detach(), stats, False
    loss.backward()
    grads = emb.grad.split([*(e.shape[0] for e in embs), last.shape[0]])

    # 3. push each cached gradient through its mini-batch: the last through its kept graph, the others re-run with
    #    autograd under their recorded RNG state
    last.backward(grads[-1])
    for chunk, state, grad in zip(chunks[:-1], states, grads[:-1]):
        _set_rng_state(state, device)
        with amp:
            out = embedder(**chunk).float()
        out.backward(grad)
    _set_rng_state(after, device)
    return loss.detach(), stats, True


def grad_cache_step(embedder: Embedder, queries: list[str], docs: list[str],
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]], *,
                    mini_batch_size: int, query_prompts: list[str | None] | None = None,
                    query_max_length: int | None = None, doc_max_length: int | None = None,
                    autocast: bool = False) -> tuple[torch.Tensor, dict, int, bool]:
    """:func:`grad_cache` on texts, in mini-batches of at most ``mini_batch_size``; ``query_prompts`` (one per query,
    e.g. the instruction prompt) go through ``embedder.tokenize(prompt=)``, so ``include_prompt`` applies; a
    mini-batch holds one prompt. Returns (loss, stats, real tokens, finite)."""
    prompts = query_prompts or [None] * len(queries)
    chunks, start = [], 0
    while start < len(queries):
        stop = start + 1
        while stop < len(queries) and stop - start < mini_batch_size and prompts[stop] == prompts[start]:
            stop += 1
        chunks.append(embedder.tokenize(queries[start:stop], prompt=prompts[start], max_length=query_max_length))
        start = stop
    chunks += [embedder.tokenize(docs[i:i + mini_batch_size], max_length=doc_max_length)
               for i in range(0, len(docs), mini_batch_size)]
    tokens = int(sum(int(c["attention_mask"].sum()) for c in chunks))  # on the host: no device sync per chunk
    chunks = [{k: v.to(embedder.device) for k, v in c.items()} for c in chunks]
    loss, stats, finite = grad_cache(embedder, chunks, len(queries), loss_fn, autocast=autocast)
    return loss, stats, tokens, finite
