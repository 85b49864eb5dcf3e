"""Pure-PyTorch references: the oracle for the tests, the CPU fallback and the benchmark baseline.

Every function computes in fp32 (inputs are upcast) and returns the input dtype, so the same code checks a
low-precision kernel (2x rule of STYLE.md) and serves as the torch path of ``kalm_fast.ops`` on CPU.
Inputs are trusted: the public boundary (``kalm_fast.ops``) checks them.

Sections: attention, pooling, focal InfoNCE (naive oracle + chunked O((B+N)*D) path), shared helpers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kalm_fast.heads import (  # noqa: F401  (the O(B * M) math shared with the kernels, re-exported here)
    INFONCE_STATS,
    L2_EPS,
    focal_dloss_dlogp,
    focal_nll,
    infonce_grad_coeffs,
    infonce_head,
    infonce_mix_logits,
    infonce_stats,
    reduce_loss,
)

# ----------------------------------------------------------------------------------------------------------------
# Bidirectional attention over packed variable-length sequences
# ----------------------------------------------------------------------------------------------------------------


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    *,
    compute_dtype: torch.dtype = torch.float32,
):
    """Non-causal attention inside each packed sequence, computed in ``compute_dtype``.

    Arguments:
        q: (T, Hq, D); k, v: (T, Hkv, D) with Hq % Hkv == 0.
        cu_seqlens: int32 (B + 1,), the packed sequences' boundaries; max_seqlen: int (only a hint here).
        softmax_scale: float, default 1 / sqrt(D).
        return_lse: also return the natural-log logsumexp of the scaled scores, (Hq, T) (flash-attention's layout).
        compute_dtype: every matmul, softmax and logsumexp in this dtype: fp32 (the CPU fallback), float64 (a truth),
            or fp16/bf16 (PyTorch's own error in the inputs' precision: the baseline of the tests' 2x rule).
    Returns out (T, Hq, D) in q's dtype [, lse (Hq, T) in fp32, or float64 when computed in it].

    The non-empty sequences are padded to (B', H, S, D) with a key mask; padded query rows still see their sequence's
    keys, so every softmax row is finite in forward and backward, and those rows are dropped when unpadding. In fp32
    without lse the output is torch SDPA (the fast CPU fallback); otherwise the scores are written out with their
    logsumexp, and the output is exp(scores - lse) V (fp32/float64) or softmax(scores) V (fp16/bf16). Autocast is off
    inside.
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    nonempty = torch.nonzero(lengths > 0).flatten()
    if T == 0 or nonempty.numel() == 0:
        out = q.new_zeros(T, Hq, D) + 0.0 * (q.sum() + k.sum() + v.sum())  # keeps the graph connected
        lse = torch.full((Hq, T), float("-inf"), device=q.device, dtype=torch.promote_types(compute_dtype,
                                                                                             torch.float32))
        return (out, lse) if return_lse else out

    lengths = lengths[nonempty]
    S = int(lengths.max())  # the real longest sequence: a too small max_seqlen cannot truncate the oracle
    pos = torch.arange(S, device=q.device)
    valid = pos[None, :] < lengths[:, None]  # (B', S)
    # index of each padded slot in the packed tensor (0 where invalid; those slots are masked and dropped)
    idx = torch.where(valid, cu_seqlens[:-1].long()[nonempty][:, None] + pos[None, :], 0)

    def to_padded(x):  # (T, H, D) -> (B', H, S, D) in compute_dtype
        return x.to(compute_dtype)[idx].permute(0, 2, 1, 3)

    with torch.autocast(q.device.type, enabled=False):
        qp, kp, vp = to_padded(q), to_padded(k), to_padded(v)
        if Hq != Hkv:
            kp = kp.repeat_interleave(Hq // Hkv, dim=1)
            vp = vp.repeat_interleave(Hq // Hkv, dim=1)
        key_valid = valid[:, None, None, :]  # (B', 1, 1, S)
        if return_lse or compute_dtype != torch.float32:
            scores = torch.matmul(qp, kp.transpose(-1, -2)) * scale  # (B', H, S, S)
            scores = scores.masked_fill(~key_valid, float("-inf"))
            lse = torch.logsumexp(scores, dim=-1)  # (B', H, S)
            if compute_dtype.itemsize >= 4:
                out_p = torch.matmul(torch.exp(scores - lse[..., None]), vp)
            else:  # what a PyTorch user writes in half precision
                out_p = torch.matmul(scores.softmax(-1), vp)
        else:
            out_p = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=key_valid, scale=scale)
    out = out_p.permute(0, 2, 1, 3)[valid].to(q.dtype)  # rows in packed order: sequence by sequence, token by token
    if not return_lse:
        return out
    return out, lse.permute(1, 0, 2)[:, valid].to(torch.promote_types(compute_dtype, torch.float32)).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Masked mean pooling with an optional fused final norm and L2 normalize
# ----------------------------------------------------------------------------------------------------------------



def apply_norm(x, norm, weight, bias, eps):
    """Per-token final norm of the model in x's dtype (the compute dtype). x (..., H); weight, bias (H,) or None.
    fp32/float64 by the formula; fp16/bf16 through torch's own F.rms_norm / F.layer_norm (the unfused pipeline a
    16-bit model runs: the 2x rule's baseline)."""
    if norm not in (None, "rmsnorm", "layernorm"):
        raise ValueError(f"norm must be None, 'rmsnorm' or 'layernorm', got {norm!r}")
    if norm is None:
        return x
    w, b = (t.to(x.dtype) if t is not None else None for t in (weight, bias))
    if x.dtype.itemsize < 4:
        H = x.shape[-1]
        return F.rms_norm(x, (H,), w, eps) if norm == "rmsnorm" else F.layer_norm(x, (H,), w, b, eps)
    if norm == "rmsnorm":
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y * w if w is not None else y
    y = F.layer_norm(x, x.shape[-1:], None, None, eps)
    y = y * w if w is not None else y
    return y + b if b is not None else y


def _l2_normalize(pooled):
    # F.normalize's floor L2_EPS underflows to 0 in fp16, which would turn rows without a pooled token into 0/0; the
    # dtype's smallest normal number keeps them at 0 and changes nothing else (fp32/float64/bf16: L2_EPS itself)
    return F.normalize(pooled, dim=-1, eps=max(L2_EPS, torch.finfo(pooled.dtype).tiny))


def masked_mean_pool(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    norm: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    normalize: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Padded masked mean pooling: norm each token, mean over the mask-true tokens, L2 normalize.

    Arguments:
        hidden: (B, S, H) the last hidden states.
        mask: (B, S) any dtype; a non-zero entry marks a pooled token (as in the kernel).
        norm, norm_weight, norm_bias, eps: the model's final norm (None, "rmsnorm", "layernorm"), (H,) each or None.
        normalize: L2-normalize the pooled rows.
        compute_dtype: every step in this dtype: fp32 (the CPU fallback), float64, or fp16/bf16 (torch's unfused
            pipeline in the model's dtype: the 2x rule's baseline).
    Returns (B, H) in hidden's dtype. A row without a pooled token gives zeros (and, because the mask multiplies, zero
    gradient)."""
    x = apply_norm(hidden.to(compute_dtype), norm, norm_weight, norm_bias, eps)
    m = (mask != 0).to(compute_dtype)
    pooled = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
    return (_l2_normalize(pooled) if normalize else pooled).to(hidden.dtype)


def varlen_mean_pool(hidden, cu_seqlens, mask=None, norm=None, norm_weight=None, norm_bias=None, eps=1e-6,
                     normalize=True, compute_dtype=torch.float32):
    """The packed layout of ``masked_mean_pool``: hidden (T, H), cu_seqlens int32 (B+1,), optional token mask (T,)
    -> (B, H) in hidden's dtype; the other arguments as there."""
    T, H = hidden.shape
    B = cu_seqlens.numel() - 1
    x = apply_norm(hidden.to(compute_dtype), norm, norm_weight, norm_bias, eps)
    m = (torch.ones(T, device=hidden.device, dtype=compute_dtype) if mask is None
         else (mask != 0).to(compute_dtype))
    seg = torch.repeat_interleave(torch.arange(B, device=hidden.device), (cu_seqlens[1:] - cu_seqlens[:-1]).long(),
                                  output_size=T)
    sums = torch.zeros(B, H, device=hidden.device, dtype=compute_dtype).index_add(0, seg, x * m[:, None])
    counts = torch.zeros(B, device=hidden.device, dtype=compute_dtype).index_add(0, seg, m)
    pooled = sums / counts[:, None].clamp_min(1.0)
    return (_l2_normalize(pooled) if normalize else pooled).to(hidden.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Focal InfoNCE with online hard-negative mixing (SPEC 4.3)
# ----------------------------------------------------------------------------------------------------------------


def sample_mix_lambda(B: int, M: int, alpha: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """lambda (B, M) ~ Beta(alpha, alpha), fp32 on ``device``.

    torch's Beta sampler takes no generator, so a seed is drawn from ``generator`` and the draw runs on a forked CPU
    RNG: the same seeded generator gives the same lambdas on every device and backend. Only the CPU generator is
    seeded (``torch.manual_seed`` would also reseed every GPU's, which the fork does not restore).
    """
    if generator is None:
        lam = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample((B, M))
        return lam.to(device=device, dtype=torch.float32)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        lam = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample((B, M))
    return lam.to(device=device, dtype=torch.float32)


def default_pos_idx(B: int, N: int, device) -> torch.Tensor:
    """pos_idx[i] = i * (N // B): the layout [pos_0, neg_0_1 .. neg_0_{G-1}, pos_1, ...]."""
    return torch.arange(B, device=device, dtype=torch.int64) * (N // B)


def focal_infonce(
    q: torch.Tensor,
    d: torch.Tensor,
    pos_idx: torch.Tensor,
    group_size: int,
    in_batch_negatives: bool = True,
    temperature: float = 0.02,
    gamma: float = 0.0,
    num_mix: int = 0,
    mix_lambda: torch.Tensor | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
    *,
    compute_dtype: torch.dtype = torch.float32,
    parts: dict | None = None,
):
    """The oracle: SPEC 4.3 written out with the full (B, N) logit matrix and explicit mixed embeddings.

    q (B, D), d (N, D), pos_idx int64 (B,), group_size G (the own group of query i is rows [pos_idx_i, pos_idx_i + G)
    when ``in_batch_negatives`` is False), mix_lambda (B, num_mix) fp32 in [0, 1] when num_mix > 0.
    Returns the loss (and with ``return_stats`` a dict of per-query p_pos, weight, hard_neg_logit, hard_neg_idx).
    ``compute_dtype``: every step in this dtype (fp32 by default; float64 gives the tests' truth, fp16/bf16 torch's
    own low-precision result for the 2x rule). ``parts`` (a dict) receives the logits z (B, N), the synthetic logits
    zh (B, M) or None and the candidate mask (B, N), for the tests' error bounds.
    """
    B, N = q.shape[0], d.shape[0]
    qf, df = q.to(compute_dtype), d.to(compute_dtype)
    z = qf @ df.t() / temperature  # (B, N)
    cols = torch.arange(N, device=q.device)
    if in_batch_negatives:
        cand = torch.ones(B, N, dtype=torch.bool, device=q.device)
    else:
        cand = (cols[None, :] >= pos_idx[:, None]) & (cols[None, :] < pos_idx[:, None] + group_size)
    neg = cand & (cols[None, :] != pos_idx[:, None])
    z_neg = z.detach().masked_fill(~neg, float("-inf"))
    # hardest negatives, ties -> lower index (a stable sort keeps equal logits in index order)
    order = torch.sort(z_neg, dim=1, descending=True, stable=True).indices

    logits = [z.masked_fill(~cand, float("-inf"))]
    if num_mix > 0:
        M = num_mix
        a = order[:, :1].expand(B, M)  # h_1
        b = order[:, 1 : M + 1]  # h_2 .. h_{M+1}
        lam = mix_lambda.to(compute_dtype)[..., None]  # (B, M, 1)
        dd = df.detach()
        e = lam * dd[a] + (1.0 - lam) * dd[b]  # (B, M, D)
        e = e / e.norm(dim=-1, keepdim=True)
        logits.append(torch.einsum("bd,bmd->bm", qf, e) / temperature)
    lse = torch.logsumexp(torch.cat(logits, dim=1), dim=1)
    logp = z.gather(1, pos_idx[:, None]).squeeze(1) - lse
    if parts is not None:
        parts.update(z=z.detach(), zh=logits[1].detach() if num_mix > 0 else None, cand=cand)
    loss = reduce_loss(focal_nll(logp, gamma), reduction)
    if not return_stats:
        return loss
    has_neg = neg.any(1)
    stats = {
        "p_pos": logp.detach().exp(),
        "weight": (-torch.expm1(logp.detach())).pow(gamma),
        "hard_neg_logit": torch.where(has_neg, z_neg.gather(1, order[:, :1]).squeeze(1), float("-inf")),
        "hard_neg_idx": torch.where(has_neg, order[:, 0], -1),
    }
    return loss, stats


# --- chunked focal InfoNCE (O((B+N)*D) memory, recomputation in backward) ---------------------------------------
# The torch path of kalm_fast.ops on CPU. Its O(B * M) pieces (infonce_head / infonce_grad_coeffs / infonce_stats,
# and infonce_mix_logits, the torch twin of _infonce_mix_kernel) live in kalm_fast.heads, shared with the Triton path.

INFONCE_CHUNK_ELEMS = 2**22  # elements of one chunk's logit block (16 MiB in fp32): the transient memory bound


def _chunk_rows(N: int, group_size: int, D: int, in_batch_negatives: bool) -> int:
    """Queries per chunk so that a chunk's largest transient, (Bc, N) logits in-batch or (Bc, G, D) gathered group
    rows otherwise, holds at most INFONCE_CHUNK_ELEMS elements (at least one query)."""
    per_query = N if in_batch_negatives else group_size * D
    return max(1, INFONCE_CHUNK_ELEMS // per_query)


def _chunk_logits(qc, df, pos_c, group_size, in_batch_negatives, temperature):
    """Logits of a chunk of queries qc (Bc, D) fp32 against their candidates.

    Returns z (Bc, C) fp32, the candidates' rows of d (Bc, C) int64 (None in-batch: C = N, all rows in order), their
    embeddings (Bc, G, D) (None in-batch) and the positive's column of z (Bc,).
    """
    if in_batch_negatives:
        return torch.mm(qc, df.t()).div_(temperature), None, None, pos_c
    cols = pos_c[:, None] + torch.arange(group_size, device=qc.device)
    dg = df[cols]
    z = torch.bmm(dg, qc[:, :, None]).squeeze(2).div_(temperature)
    return z, cols, dg, torch.zeros_like(pos_c)


def _top_negatives(z, pos_col, k):
    """The k highest logits of each row of z without its positive, descending, ties -> lower column (torch.argmax
    returns the first maximum): values (Bc, k), columns (Bc, k) int64, -inf / -1 past the last negative."""
    zn = z.scatter(1, pos_col[:, None], float("-inf"))
    vals, cols = [], []
    for _ in range(k):
        c = zn.argmax(1, keepdim=True)
        v = zn.gather(1, c)
        zn.scatter_(1, c, float("-inf"))
        vals.append(v)
        cols.append(torch.where(v > float("-inf"), c, -1))
    return torch.cat(vals, 1), torch.cat(cols, 1)


def _mix_dots(qf, df, a, b):
    """q.d_a, |d_a|^2 (B,) and q.d_b, d_a.d_b, |d_b|^2 (B, M) by row gathers, one (B, D) row set at a time."""
    da = df[a]
    s_b, ab, bb = [], [], []
    for m in range(b.shape[1]):
        db = df[b[:, m]]
        s_b.append((qf * db).sum(1))
        ab.append((da * db).sum(1))
        bb.append((db * db).sum(1))
    return (qf * da).sum(1), (da * da).sum(1), torch.stack(s_b, 1), torch.stack(ab, 1), torch.stack(bb, 1)


def _index_add_rows(out, index, src):
    """out[index[k]] += src[k] with repeated indices summed in the order of k, on every device: a stable sort groups
    equal indices and each index_add_ call then gets at most one row per target (no two CUDA atomics meet)."""
    order = torch.argsort(index, stable=True)
    sorted_idx = index[order]
    ar = torch.arange(index.numel(), device=index.device)
    run_start = torch.ones_like(sorted_idx, dtype=torch.bool)
    run_start[1:] = sorted_idx[1:] != sorted_idx[:-1]
    rank = ar - torch.cummax(torch.where(run_start, ar, 0), 0).values  # position inside a run of equal indices
    for r in range(int(rank.max()) + 1):
        sel = order[rank == r]
        out.index_add_(0, index[sel], src[sel])


class _FocalInfoNCEChunked(torch.autograd.Function):
    """SPEC 4.3 over chunks of queries: each chunk's logits exist only while it is processed; saved are O(B * M)
    per-query values (lse, log p, top indices, synthetic logits and norms). The backward recomputes each chunk's logits,
    P = exp(z - lse) and dz = g (1[pos] - P), then dq_chunk = dz d / tau and dd += dz^T q_chunk / tau, chunk after
    chunk in a fixed order (deterministic). Outputs: (loss, p_pos, weight, hard_neg_logit, hard_neg_idx)."""

    @staticmethod
    def forward(ctx, q, d, pos_idx, group_size, in_batch_negatives, temperature, gamma, num_mix, mix_lambda,
                reduction):
        qf, df = q.float(), d.float()
        B, N, D = q.shape[0], d.shape[0], q.shape[1]
        K = num_mix + 1
        lse_real = torch.empty(B, device=q.device)
        logp_real = torch.empty(B, device=q.device)
        top_v = torch.empty(B, K, device=q.device)
        top_i = torch.empty(B, K, device=q.device, dtype=torch.int64)
        step = _chunk_rows(N, group_size, D, in_batch_negatives)
        for c0 in range(0, B, step):
            sl = slice(c0, c0 + step)
            z, cols, _, pos_col = _chunk_logits(qf[sl], df, pos_idx[sl], group_size, in_batch_negatives, temperature)
            lse_real[sl] = torch.logsumexp(z, 1)
            logp_real[sl] = z.gather(1, pos_col[:, None]).squeeze(1) - lse_real[sl]
            v, c = _top_negatives(z, pos_col, K)
            top_v[sl] = v
            top_i[sl] = c if cols is None else torch.where(c >= 0, cols.gather(1, c.clamp_min(0)), -1)
        lam = zh = nrm = None
        if num_mix > 0:
            lam = mix_lambda.float()
            zh, nrm = infonce_mix_logits(*_mix_dots(qf, df, top_i[:, 0], top_i[:, 1:]), lam, temperature)
        shift, logp, loss = infonce_head(lse_real, logp_real, zh, gamma)
        lse = lse_real + shift
        ctx.save_for_backward(q, d, pos_idx, lse, logp, top_i, lam, nrm, zh)
        ctx.args = (group_size, in_batch_negatives, temperature, gamma, reduction)
        stats = infonce_stats(logp, gamma, top_v[:, 0], top_i[:, 0])
        ctx.mark_non_differentiable(*stats.values())
        return (reduce_loss(loss, reduction), *stats.values())

    @staticmethod
    def backward(ctx, grad_loss, *_stats_grads):
        q, d, pos_idx, lse, logp, top_i, lam, nrm, zh = ctx.saved_tensors
        group_size, in_batch_negatives, temperature, gamma, reduction = ctx.args
        need_dq, need_dd = ctx.needs_input_grad[:2]
        g, c_a, c_b = infonce_grad_coeffs(grad_loss, logp, lse, zh, lam, nrm, gamma, reduction)
        qf, df = q.float(), d.float()
        B, N, D = q.shape[0], d.shape[0], q.shape[1]
        dq = torch.empty(B, D, device=q.device) if need_dq else None
        dd = torch.zeros(N, D, device=d.device) if need_dd else None
        step = _chunk_rows(N, group_size, D, in_batch_negatives)
        for c0 in range(0, B, step):
            sl = slice(c0, c0 + step)
            qc = qf[sl]
            z, cols, dg, pos_col = _chunk_logits(qc, df, pos_idx[sl], group_size, in_batch_negatives, temperature)
            dz = z.sub_(lse[sl, None]).exp_().mul_(-g[sl, None])  # -g P, in place of the logits
            dz.scatter_add_(1, pos_col[:, None], g[sl, None])  # + g at the positive
            if need_dq:
                dq[sl] = dz @ df if cols is None else torch.bmm(dz[:, None, :], dg).squeeze(1)
            if need_dd:
                if cols is None:
                    dd.addmm_(dz.t(), qc)
                else:
                    _index_add_rows(dd, cols.reshape(-1), (dz[:, :, None] * qc[:, None, :]).reshape(-1, D))
        if need_dq and zh is not None:
            dq += c_a[:, None] * df[top_i[:, 0]]
            for m in range(zh.shape[1]):
                dq += c_b[:, m, None] * df[top_i[:, m + 1]]
        dq = dq.div_(temperature).to(q.dtype) if need_dq else None
        dd = dd.div_(temperature).to(d.dtype) if need_dd else None
        return dq, dd, None, None, None, None, None, None, None, None


def focal_infonce_chunked(
    q: torch.Tensor,
    d: torch.Tensor,
    pos_idx: torch.Tensor,
    group_size: int,
    in_batch_negatives: bool = True,
    temperature: float = 0.02,
    gamma: float = 0.0,
    num_mix: int = 0,
    mix_lambda: torch.Tensor | None = None,
    reduction: str = "mean",
    return_stats: bool = False,
):
    """``focal_infonce`` (same arguments and results) in O((B + N) * D) memory: queries are processed in chunks
    whose logit block holds at most INFONCE_CHUNK_ELEMS elements, in fp32, and the backward recomputes them."""
    loss, *stats = _FocalInfoNCEChunked.apply(q, d, pos_idx, group_size, in_batch_negatives, temperature, gamma,
                                              num_mix, mix_lambda, reduction)
    if not return_stats:
        return loss
    return loss, dict(zip(INFONCE_STATS, stats))
