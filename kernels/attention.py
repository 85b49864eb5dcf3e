"""Bidirectional (non-causal) flash attention over packed variable-length sequences, forward and backward (SPEC 4.1).

Layout (flash-attention's varlen contract): q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens int32 (B+1,); query head h reads
kv head h // (Hq // Hkv) (GQA/MQA). Every token attends to every token of its own sequence.

Layers (Liger style): Triton kernels -> launchers ``flash_attn_varlen_fwd`` / ``flash_attn_varlen_bwd`` (plain functions, reusable outside
autograd) -> ``_FlashAttnVarlenFunction`` (eager) or the custom ops ``torch.ops.kalm_fast.flash_attn_varlen_fwd/_bwd``
(under torch.compile) -> ``flash_attn_varlen_func`` (what ``kalm_fast.ops`` dispatches to).

Kernels (notation of Triton tutorial 06: m_i running max, l_i running sum, acc unnormalized output, qk_scale =
softmax_scale * log2(e) so that every exponential is an exp2):
  _attn_fwd_kernel            one program = BLOCK_M query rows of one sequence and one query head; loops over the
                              sequence's key/value blocks with an online softmax; stores out and lse.
  _attn_bwd_preprocess_kernel delta = rowsum(dO * O) - dlse, per token and query head.
  _attn_bwd_dkdv_kernel       one program = BLOCK_N key/value rows of one sequence and one kv head; loops over all
                              query blocks of the sequence and the query heads of the GQA group, so dK/dV are owned by
                              exactly one program: no atomics, deterministic. When that grid would be under two waves
                              (few tokens, few kv heads: ``dkdv_plan``), one program per query head instead writes
                              that head's fp32 partial of dK/dV, and
  _attn_bwd_dkdv_reduce_kernel adds the GROUP partials in head order (deterministic), scales and casts.
  _attn_bwd_dq_kernel         one program = BLOCK_M query rows of one query head; loops over the key/value blocks.
Grids are (blocks of max_seqlen, heads, sequences); a program whose block starts past its sequence's end exits, so
zero-length sequences cost one early exit per program and have no rows. The sequence axis is walked through
``seq_order``, the sequences sorted by length, longest first (stable: ties keep batch order), so the programs of the
longest sequences start first and the short ones fill the tail instead of a long one running alone at the end (every
program of a sequence does the same work: the whole sequence is its loop). Row masks are applied only on a
sequence's last (partial) block; head dims that are not powers of two are padded to BLOCK_D with a column mask.

16-byte loads for any head dim: Triton marks an integer argument divisible by 16 or not at all, so with D = 40, 56
or 72 the head stride D carried no alignment and every load fell back to 2-byte scalars (160 ld.global.b16 in the
forward at D = 40, sm_90). The launchers pass token and head strides in units of STRIDE_UNIT elements (16 bytes, or
the largest power of two dividing every stride) and the kernels multiply them back by the constexpr: Triton then
knows each row starts 16-byte aligned, and the column mask (offs_d < D, constant over runs of 8) keeps 16-byte
vectors (cp.async 16 B / ld.global.v4 at D = 40).

No recompilation per length: max_seqlen only sizes the grid; the autotune key holds its power-of-two bucket, passed as a
plain int argument (>= 16, so Triton's divisibility specialization sees one case).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kalm_fast.kernels import attention_configs as configs
from kalm_fast.kernels import utils
from kalm_fast.kernels.attention_configs import dkdv_plan
from kalm_fast.kernels.utils import (
    Pinned,
    device_arch,
    dot_precision,
    dtype_class,
    input_guard,
    interpreting,
    launchable,
    next_power_of_2,
    num_sms,
    pick,
    register_budget,
    rows_contiguous,
)

LOG2E: tl.constexpr = tl.constexpr(utils.LOG2E)  # exp(x) = exp2(x * log2(e)); jit globals must be constexpr
LN2: tl.constexpr = tl.constexpr(utils.LN2)  # ln(x) = log2(x) * ln(2)
_MAX_GRID_YZ = 65535  # CUDA limit of grid dims 1 and 2: longer batches are launched in chunks of sequences


# ----------------------------------------------------------------------------------------------------------------
# tile helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr,
               INTERPRET: tl.constexpr):
    """[len(rows), BLOCK_D] tile; rows >= n_rows (only when MASK_ROWS) and columns >= HEAD_DIM read as 0."""
    if MASK_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    if INTERPRET:  # the interpreter's bf16 arithmetic is wrong: compute in fp32 there
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store the [len(rows), BLOCK_D] tile x (cast to the pointee dtype) where row < n_rows and column < HEAD_DIM."""
    x = x.to(ptrs.dtype.element_ty)
    if HEAD_DIM == BLOCK_D:
        tl.store(ptrs, x, mask=(rows < n_rows)[:, None])
    else:
        tl.store(ptrs, x, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :])


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, seqlen, qk_scale,
                    offs_n, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASK_N: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over the key blocks starting at lo, lo + BLOCK_N, ... < hi. MASK_N only for the last, partial
    block (keys >= seqlen get a score of -inf)."""
    k_ptrs = k_base + (lo + offs_n)[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + (lo + offs_n)[:, None] * stride_vt + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_ptrs, cols, seqlen, offs_d, HEAD_DIM, BLOCK_D, MASK_N, INTERPRET)  # [BLOCK_N, BLOCK_D]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N], unscaled scores
        if MASK_N:
            qk = tl.where((cols < seqlen)[None, :], qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # [BLOCK_M], log2 domain
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.math.exp2(m_i - m_ij)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs, cols, seqlen, offs_d, HEAD_DIM, BLOCK_D, MASK_N, INTERPRET)  # [BLOCK_N, BLOCK_D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D]
        m_i = m_ij
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["stride_lh"])  # lse/delta (Hq, T): T changes every call
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, cu_seqlens, seq_order, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,  # in STRIDE_UNITs
    stride_lh,
    seqlen_bucket,  # autotune key only (power-of-two bucket of max_seqlen)
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, STRIDE_UNIT: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.load(seq_order + tl.program_id(2))  # longest sequences first
    stride_qt, stride_qh, stride_kt, stride_kh = (stride_qt * STRIDE_UNIT, stride_qh * STRIDE_UNIT,
                                                  stride_kt * STRIDE_UNIT, stride_kh * STRIDE_UNIT)
    stride_vt, stride_vh, stride_ot, stride_oh = (stride_vt * STRIDE_UNIT, stride_vh * STRIDE_UNIT,
                                                  stride_ot * STRIDE_UNIT, stride_oh * STRIDE_UNIT)
    seq_start = tl.load(cu_seqlens + pid_b)
    seqlen = tl.load(cu_seqlens + pid_b + 1) - seq_start
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen:
        return
    pid_kv = pid_h // GROUP
    row0 = seq_start.to(tl.int64)  # T * H * D can exceed 2**31: 64-bit sequence offsets, 32-bit offsets inside
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = Q + row0 * stride_qt + pid_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = _load_tile(q_ptrs, offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D, True, INTERPRET)  # [BLOCK_M, BLOCK_D]
    k_base = K + row0 * stride_kt + pid_kv * stride_kh
    v_base = V + row0 * stride_vt + pid_kv * stride_vh

    qk_scale = sm_scale * LOG2E  # log2(e) folded in
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (seqlen // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, 0, n_full, seqlen,
                                    qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, False, INTERPRET,
                                    DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, n_full, seqlen, seqlen,
                                    qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, True, INTERPRET,
                                    DOT_PRECISION)
    # every row saw >= 1 real key (seqlen > 0), so l_i > 0 and m_i is finite, padded query rows included
    out = acc / l_i[:, None]
    o_ptrs = Out + row0 * stride_ot + pid_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    _store_tile(o_ptrs, out, offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D)
    lse = (m_i + tl.math.log2(l_i)) * LN2  # natural-log logsumexp of sm_scale * q.k
    tl.store(Lse + pid_h.to(tl.int64) * stride_lh + row0 + offs_m, lse, mask=offs_m < seqlen)


# ----------------------------------------------------------------------------------------------------------------
# backward
#
# Derivation, per sequence and query head (s = softmax_scale, K and V of the head's kv head):
#   1. S = s * Q K^T, P = softmax(S) row-wise = exp(S - lse), O = P V; the loss L depends on O and lse.
#   2. dV = P^T dO                                (O = P V; with GQA, dV of a kv head sums over its query heads)
#   3. dP = dO V^T
#   4. Softmax Jacobian: dS_ij = P_ij * (dP_ij - sum_k P_ik dP_ik), and sum_k P_ik dP_ik = sum_k P_ik (dO_i . V_k)
#      = dO_i . O_i =: delta_i (one dot per row instead of a row over all keys).
#   5. lse_i = log sum_j exp(S_ij) gives d lse_i / dS_ij = P_ij, so a gradient dlse adds P_ij * dlse_i to dS_ij:
#      dS = P * (dP - (delta - dlse)). The preprocess kernel stores delta - dlse, so the main kernels are unchanged.
#   6. dQ = s * dS K, dK = s * dS^T Q (chain rule through S = s * Q K^T).
# P is recomputed from Q, K and the saved lse (exp2 form: P = exp2(q.k * s * log2(e) - lse * log2(e))).
# Query rows past a sequence's end are loaded as 0 (q, dO, lse, delta): their P is finite and their dO = 0 and
# delta = 0 make every term they touch 0. Key rows past the end (k = v = 0) get P = exp(-lse), which overflows when
# lse < -88: the dQ loop sums over keys, so it masks P on the last key block; in the dK/dV program such a key row only
# reaches its own row of dK/dV (matmul rows never mix), which is never stored.
# ----------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T", "stride_lh"])  # T changes every call
def _attn_bwd_preprocess_kernel(Out, DO, DLse, Delta, T, stride_ot, stride_oh, stride_dot, stride_doh, stride_lh,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                                STRIDE_UNIT: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta[h, t] = sum_d O[t, h, d] * dO[t, h, d] - dlse[h, t] (step 5), fp32 (Hq, T). O/dO strides in
    STRIDE_UNITs."""
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    stride_ot, stride_oh = stride_ot * STRIDE_UNIT, stride_oh * STRIDE_UNIT
    stride_dot, stride_doh = stride_dot * STRIDE_UNIT, stride_doh * STRIDE_UNIT
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows64 = rows.to(tl.int64)
    o = tl.load(Out + rows64[:, None] * stride_ot + pid_h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows64[:, None] * stride_dot + pid_h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BLOCK_T]
    lse_offs = pid_h.to(tl.int64) * stride_lh + rows
    if HAS_DLSE:
        delta -= tl.load(DLse + lse_offs, mask=rows < T, other=0.0)
    tl.store(Delta + lse_offs, delta, mask=rows < T)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, lo, hi,
                         seqlen, qk_scale, offs_m, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, MASK_M: tl.constexpr, INTERPRET: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """Accumulate dK (without the scale s) and dV of one key block over the query blocks lo, lo + BLOCK_M, ... < hi,
    working on transposes so that the key block stays the row dimension."""
    q_ptrs = q_base + (lo + offs_m)[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = do_base + (lo + offs_m)[:, None] * stride_dot + offs_d[None, :]
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(q_ptrs, rows, seqlen, offs_d, HEAD_DIM, BLOCK_D, MASK_M, INTERPRET)  # [BLOCK_M, BLOCK_D]
        do = _load_tile(do_ptrs, rows, seqlen, offs_d, HEAD_DIM, BLOCK_D, MASK_M, INTERPRET)  # [BLOCK_M, BLOCK_D]
        if MASK_M:
            lse = tl.load(lse_base + rows, mask=rows < seqlen, other=0.0)  # [BLOCK_M]
            delta = tl.load(delta_base + rows, mask=rows < seqlen, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M] = (Q K^T)^T
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :] * LOG2E)  # P^T (step 1)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # step 2
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M] = dP^T (step 3)
        dsT = pT * (dpT - delta[None, :])  # steps 4-5
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)  # step 6, scaled by s at the end
        q_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dot
    return dk, dv


# per-call sizes: lse/delta (Hq, T) and the partials' head stride T * Hkv * D change with T
@triton.jit(do_not_specialize=["stride_lh", "stride_ds"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, cu_seqlens, seq_order, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,  # in STRIDE_UNITs
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,  # in STRIDE_UNITs
    stride_lh,
    stride_ds,  # SPLIT: DK/DV are fp32 partials (GROUP, T, Hkv, D), one per query head; the head stride
    seqlen_bucket,  # autotune key only
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, STRIDE_UNIT: tl.constexpr, SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    if SPLIT:  # program (kv head, g) owns query head g of the group: no loop over heads
        pid_kv = tl.program_id(1) // GROUP
        h0 = tl.program_id(1)  # = pid_kv * GROUP + g
    else:
        pid_kv = tl.program_id(1)
        h0 = pid_kv * GROUP
    pid_b = tl.load(seq_order + tl.program_id(2))  # longest sequences first
    stride_qt, stride_qh, stride_kt, stride_kh = (stride_qt * STRIDE_UNIT, stride_qh * STRIDE_UNIT,
                                                  stride_kt * STRIDE_UNIT, stride_kh * STRIDE_UNIT)
    stride_vt, stride_vh, stride_dot, stride_doh = (stride_vt * STRIDE_UNIT, stride_vh * STRIDE_UNIT,
                                                    stride_dot * STRIDE_UNIT, stride_doh * STRIDE_UNIT)
    stride_dkt, stride_dkh, stride_dvt, stride_dvh = (stride_dkt * STRIDE_UNIT, stride_dkh * STRIDE_UNIT,
                                                      stride_dvt * STRIDE_UNIT, stride_dvh * STRIDE_UNIT)
    seq_start = tl.load(cu_seqlens + pid_b)
    seqlen = tl.load(cu_seqlens + pid_b + 1) - seq_start
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen:
        return
    row0 = seq_start.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    k_ptrs = K + row0 * stride_kt + pid_kv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + row0 * stride_vt + pid_kv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    k = _load_tile(k_ptrs, offs_n, seqlen, offs_d, HEAD_DIM, BLOCK_D, True, INTERPRET)  # [BLOCK_N, BLOCK_D]
    v = _load_tile(v_ptrs, offs_n, seqlen, offs_d, HEAD_DIM, BLOCK_D, True, INTERPRET)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    m_full = (seqlen // BLOCK_M) * BLOCK_M
    # the query heads h0, h0 + 1, ... that read this kv head: the GQA sum stays inside the program (constant bounds)
    for g in range(1 if SPLIT else GROUP):
        pid_h = h0 + g
        q_base = Q + row0 * stride_qt + pid_h * stride_qh
        do_base = DO + row0 * stride_dot + pid_h * stride_doh
        lse_base = Lse + pid_h.to(tl.int64) * stride_lh + row0
        delta_base = Delta + pid_h.to(tl.int64) * stride_lh + row0
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                      0, m_full, seqlen, qk_scale, offs_m, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M,
                                      False, INTERPRET, DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                      m_full, seqlen, seqlen, qk_scale, offs_m, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M,
                                      True, INTERPRET, DOT_PRECISION)
    if SPLIT:  # unscaled fp32 partial of this query head; the reduce kernel adds the heads in order and scales
        DK += (tl.program_id(1) % GROUP).to(tl.int64) * stride_ds
        DV += (tl.program_id(1) % GROUP).to(tl.int64) * stride_ds
    else:
        dk *= sm_scale
    dk_ptrs = DK + row0 * stride_dkt + pid_kv * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = DV + row0 * stride_dvt + pid_kv * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :]
    _store_tile(dk_ptrs, dk, offs_n, seqlen, offs_d, HEAD_DIM, BLOCK_D)
    _store_tile(dv_ptrs, dv, offs_n, seqlen, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit(do_not_specialize=["n", "num_splits"])  # per-call sizes
def _attn_bwd_dkdv_reduce_kernel(DKp, DVp, DK, DV, n, num_splits, sm_scale, BLOCK: tl.constexpr):
    """dK = s * sum_g DKp[g], dV = sum_g DVp[g] over n = T * Hkv * D contiguous elements, the num_splits (GROUP)
    per-query-head partials added in head order (deterministic), then cast to dK/dV's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    pk = DKp + offs
    pv = DVp + offs
    dk = tl.load(pk, mask=mask, other=0.0)
    dv = tl.load(pv, mask=mask, other=0.0)
    for _ in range(1, num_splits):
        pk += n
        pv += n
        dk += tl.load(pk, mask=mask, other=0.0)
        dv += tl.load(pv, mask=mask, other=0.0)
    tl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, lo, hi, seqlen, qk_scale,
                       offs_n, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       MASK_N: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ (without the scale s) of one query block over the key blocks lo, lo + BLOCK_N, ... < hi."""
    k_ptrs = k_base + (lo + offs_n)[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + (lo + offs_n)[:, None] * stride_vt + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_ptrs, cols, seqlen, offs_d, HEAD_DIM, BLOCK_D, MASK_N, INTERPRET)  # [BLOCK_N, BLOCK_D]
        v = _load_tile(v_ptrs, cols, seqlen, offs_d, HEAD_DIM, BLOCK_D, MASK_N, INTERPRET)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])  # step 1
        if MASK_N:  # padded keys (k = 0) would get P = exp(-lse), which may overflow: zero them
            p = tl.where((cols < seqlen)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # step 3
        ds = p * (dp - delta[:, None])  # steps 4-5
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)  # step 6, scaled by s at the end
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit(do_not_specialize=["stride_lh"])  # lse/delta (Hq, T): T changes every call
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, cu_seqlens, seq_order, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,  # in STRIDE_UNITs
    stride_dqt, stride_dqh,  # in STRIDE_UNITs
    stride_lh,
    seqlen_bucket,  # autotune key only
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, STRIDE_UNIT: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.load(seq_order + tl.program_id(2))  # longest sequences first
    stride_qt, stride_qh, stride_kt, stride_kh = (stride_qt * STRIDE_UNIT, stride_qh * STRIDE_UNIT,
                                                  stride_kt * STRIDE_UNIT, stride_kh * STRIDE_UNIT)
    stride_vt, stride_vh, stride_dot, stride_doh = (stride_vt * STRIDE_UNIT, stride_vh * STRIDE_UNIT,
                                                    stride_dot * STRIDE_UNIT, stride_doh * STRIDE_UNIT)
    stride_dqt, stride_dqh = stride_dqt * STRIDE_UNIT, stride_dqh * STRIDE_UNIT
    seq_start = tl.load(cu_seqlens + pid_b)
    seqlen = tl.load(cu_seqlens + pid_b + 1) - seq_start
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen:
        return
    pid_kv = pid_h // GROUP
    row0 = seq_start.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = Q + row0 * stride_qt + pid_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = DO + row0 * stride_dot + pid_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :]
    q = _load_tile(q_ptrs, offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D, True, INTERPRET)  # [BLOCK_M, BLOCK_D]
    do = _load_tile(do_ptrs, offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D, True, INTERPRET)
    lse_offs = pid_h.to(tl.int64) * stride_lh + row0 + offs_m
    lse2 = tl.load(Lse + lse_offs, mask=offs_m < seqlen, other=0.0) * LOG2E  # [BLOCK_M], log2 domain
    delta = tl.load(Delta + lse_offs, mask=offs_m < seqlen, other=0.0)
    k_base = K + row0 * stride_kt + pid_kv * stride_kh
    v_base = V + row0 * stride_vt + pid_kv * stride_vh

    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (seqlen // BLOCK_N) * BLOCK_N
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, 0, n_full, seqlen,
                            qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, False, INTERPRET, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, n_full, seqlen, seqlen,
                            qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, True, INTERPRET, DOT_PRECISION)
    dq *= sm_scale
    dq_ptrs = DQ + row0 * stride_dqt + pid_h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    _store_tile(dq_ptrs, dq, offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------------------------------------------
# configs (tiles, PINNED table, dK/dV plan: kernels/attention_configs.py)
# ----------------------------------------------------------------------------------------------------------------

_AUTOTUNE_KEY = ["HEAD_DIM", "GROUP", "seqlen_bucket"]  # + the tensor dtypes, which triton's autotuner appends
_KERNELS = {"fwd": "_attn_fwd_kernel", "dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel"}


def _launchable(kind: str, q: torch.Tensor, block_d: int):
    """``kernel[grid](...)``-able ``kind`` kernel on q's device: the pinned config by default (the same tiles in every
    process), the autotuner over the surviving configs with KALM_FAST_AUTOTUNE=1, one big tile when interpreting."""
    arch = device_arch(q.device)
    key = (kind, arch, max(32, block_d), dtype_class(q.dtype))  # D < 32 (not promised) borrows the D=32 tiles
    row = configs.INTERPRETER_TILES[kind] if arch == "interpreter" else pick(configs.PINNED, key, q.device)
    return launchable("attention", globals()[_KERNELS[kind]], configs.PINNED, key, row, configs.TILE, _AUTOTUNE_KEY,
                      maxnreg=_max_registers(kind, arch, key[3]))


def _max_registers(kind: str, arch: str, dtype_cls: str):
    """num_warps -> ptxas's register budget a thread for the ``kind`` kernel on ``arch``, None where ptxas chooses.
    fp32 dK/dV on sm_80 gets the budget of two resident programs per SM (64K registers: 255 a thread at 4 warps, 128
    at 8): left to choose, ptxas held it at 80 registers and spilled 8 B (16 x 16 w8 s1, D 80/96, GROUP 7 partials,
    Triton 3.9); given 128 it takes 118 and spills nothing. Given 255 at 8 warps it took all 255 (one program per
    SM). On sm_90/sm_100 ptxas's own choice spills in no pinned row, while the same budget spilled 4-32 B at D 40 and
    256 (compile tables of Triton 3.6 and 3.9), so there it chooses."""
    if (kind, arch, dtype_cls) != ("dkdv", "sm_80", "fp32"):
        return None
    return lambda num_warps: register_budget(2, num_warps)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------


def _seqlen_bucket(max_seqlen: int) -> int:
    """Power-of-two bucket of max_seqlen, >= 16 (autotune key; one Triton specialization)."""
    return max(16, next_power_of_2(max_seqlen))


def _meta(q: torch.Tensor) -> dict:
    """Compile-time arguments shared by the kernels."""
    return dict(
        HEAD_DIM=q.shape[-1],
        BLOCK_D=max(16, next_power_of_2(q.shape[-1])),  # tl.dot needs >= 16
        INTERPRET=interpreting(),
        DOT_PRECISION=dot_precision(q.dtype),
    )


def stride_unit(*tensors: torch.Tensor) -> int:
    """Elements per stride unit (module docstring): the largest power of two, at most 16 bytes, that divides every
    token and head stride of ``tensors`` (8 for 16-bit tensors with D % 8 == 0, 4 for fp32 with D % 4 == 0)."""
    unit = 16 // tensors[0].element_size()
    while unit > 1 and any(st % unit for x in tensors for st in x.stride()[:-1]):
        unit //= 2
    return unit


def launch_layout(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels take it: unit stride along D (``rows_contiguous``), and a contiguous copy when a head offset
    (H - 1) * head stride would not fit the kernels' 32-bit head offsets (only the sequence offsets are 64-bit): a
    (T, H, D) view of an (H, T, D) tensor, as the model's attention hook passes for one packed row, past about
    2**31 / ((H - 1) D) tokens (600k at H = 28, D = 128)."""
    x = rows_contiguous(x)
    return x.contiguous() if (x.shape[1] - 1) * x.stride(1) >= 2**31 else x


def _strides(unit: int, *tensors: torch.Tensor) -> list[int]:
    """(token stride, head stride) of each tensor in units of ``unit`` elements, flattened."""
    return [st // unit for x in tensors for st in x.stride()[:2]]


def longest_first(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int32 (B,): sequence indices by length, longest first; a stable sort, so ties keep batch order and the order
    is the same in every run. Computed on cu_seqlens' device (no host sync)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.sort(lengths, descending=True, stable=True).indices.to(torch.int32)


def _order_chunks(order: torch.Tensor):
    """Slices of the sequence order with at most _MAX_GRID_YZ sequences each (grid dim 2 limit)."""
    for b0 in range(0, order.numel(), _MAX_GRID_YZ):
        yield order[b0:b0 + _MAX_GRID_YZ]


def _block_n(kernel) -> int:
    """BLOCK_N of the pinned config, or of the autotuner's first config (the pinned one): the dK/dV plan's tile."""
    return kernel.config["BLOCK_N"] if isinstance(kernel, Pinned) else kernel.configs[0].kwargs["BLOCK_N"]


@input_guard
def flash_attn_varlen_fwd(q, k, v, cu_seqlens, max_seqlen: int, softmax_scale: float, order=None):
    """Forward launcher. q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens int32 (B+1,) -> out (T, Hq, D) in q's dtype,
    lse (Hq, T) fp32 (natural log of the scaled scores' sum of exponentials). ``order``: ``longest_first(cu_seqlens)``
    when the caller has it."""
    q, k, v = launch_layout(q), launch_layout(k), launch_layout(v)
    cu_seqlens = cu_seqlens.contiguous()
    T, Hq, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    order = longest_first(cu_seqlens) if order is None else order
    meta = _meta(q)
    unit = stride_unit(q, k, v, out)
    kernel = _launchable("fwd", q, meta["BLOCK_D"])
    for chunk in _order_chunks(order):
        nb = chunk.numel()
        kernel[lambda m, nb=nb: (triton.cdiv(max_seqlen, m["BLOCK_M"]), Hq, nb)](
            q, k, v, out, lse, cu_seqlens, chunk, softmax_scale,
            *_strides(unit, q, k, v, out), lse.stride(0),
            _seqlen_bucket(max_seqlen), GROUP=Hq // k.shape[1], STRIDE_UNIT=unit, **meta,
        )
    return out, lse


@input_guard
def flash_attn_varlen_bwd(do, q, k, v, out, lse, cu_seqlens, max_seqlen: int, softmax_scale: float, dlse=None, *, order=None,
             dkdv_splits=None):
    """Backward launcher: dO (T, Hq, D) and optionally dlse (Hq, T) -> dq, dk, dv in the dtypes of q, k, v.
    Deterministic: every gradient element is written by exactly one program (dK/dV partials: one program per split,
    added in head order). ``dkdv_splits`` overrides ``dkdv_plan``: 1 no partials, > 1 per-query-head partials
    (tests, compile tables)."""
    do, q, k, v, out = (launch_layout(x) for x in (do, q, k, v, out))
    cu_seqlens = cu_seqlens.contiguous()
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if T == 0:
        return dq, dk, dv
    order = longest_first(cu_seqlens) if order is None else order
    meta = _meta(q)
    bucket = _seqlen_bucket(max_seqlen)
    unit = stride_unit(do, q, k, v, out, dq, dk, dv)
    delta = torch.empty_like(lse)  # (Hq, T) fp32
    if dlse is not None:
        dlse = dlse.float().contiguous()
    # 8192-element tiles of O and dO at 8 warps: 32 values a thread each, with a budget of 128 registers for ptxas.
    # Uncapped, ptxas chose 48-64 registers on sm_100 and spilled 4-28 B (4 or 8 warps); 4 warps capped at 128 spill
    # in fp32 (64 + 64 values a thread). Capped at 8 warps: 46-90 registers, nothing spills in the compile tables.
    block_t = 8192 // meta["BLOCK_D"]
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, block_t), Hq)](
        out, do, dlse if dlse is not None else delta, delta, T,  # DLse is not read without HAS_DLSE
        *_strides(unit, out, do), lse.stride(0),
        HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_T=block_t, STRIDE_UNIT=unit, HAS_DLSE=dlse is not None,
        num_warps=8, maxnreg=register_budget(2, 8),
    )
    dkdv_kernel = _launchable("dkdv", q, meta["BLOCK_D"])
    dq_kernel = _launchable("dq", q, meta["BLOCK_D"])
    B = cu_seqlens.numel() - 1
    if dkdv_splits is None:
        splits = dkdv_plan(T, B, max_seqlen, Hkv, group, _block_n(dkdv_kernel), num_sms(q.device))["splits"]
    else:
        splits = group if dkdv_splits > 1 else 1
    if splits > 1:  # fp32 partials (GROUP, T, Hkv, D), strides as dk's (contiguous) plus the head stride
        dk_out, dv_out = (torch.empty((splits, *k.shape), dtype=torch.float32, device=k.device) for _ in range(2))
    else:
        dk_out, dv_out = dk, dv
    for chunk in _order_chunks(order):
        nb = chunk.numel()
        dkdv_kernel[lambda m, nb=nb: (triton.cdiv(max_seqlen, m["BLOCK_N"]), Hkv * splits, nb)](
            q, k, v, do, lse, delta, dk_out, dv_out, cu_seqlens, chunk, softmax_scale,
            *_strides(unit, q, k, v, do, dk, dv), lse.stride(0), dk.numel(),
            bucket, GROUP=group, STRIDE_UNIT=unit, SPLIT=splits > 1, **meta,
        )
        dq_kernel[lambda m, nb=nb: (triton.cdiv(max_seqlen, m["BLOCK_M"]), Hq, nb)](
            q, k, v, do, lse, delta, dq, cu_seqlens, chunk, softmax_scale,
            *_strides(unit, q, k, v, do, dq), lse.stride(0),
            bucket, GROUP=group, STRIDE_UNIT=unit, **meta,
        )
    if splits > 1:
        n, block = dk.numel(), 2048
        _attn_bwd_dkdv_reduce_kernel[(triton.cdiv(n, block),)](dk_out, dv_out, dk, dv, n, splits, softmax_scale,
                                                               BLOCK=block, num_warps=4)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------


def _forward(q, k, v, cu_seqlens, max_seqlen: int, softmax_scale: float):
    """out, lse and the sequence order the backward reuses (one body for eager autograd and the custom op)."""
    order = longest_first(cu_seqlens)
    out, lse = flash_attn_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, softmax_scale, order=order)
    return out, lse, order


def _backward(dout, dlse, q, k, v, out, lse, cu_seqlens, order, max_seqlen: int, softmax_scale: float):
    if dout is None:  # only lse was used downstream
        dout = torch.zeros_like(out)
    return flash_attn_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, dlse, order=order)


class _FlashAttnVarlenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, softmax_scale):
        out, lse, order = _forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, order)
        ctx.max_seqlen = max_seqlen
        ctx.softmax_scale = softmax_scale
        ctx.set_materialize_grads(False)  # an unused lse gets no zero-filled gradient
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dq, dk, dv = _backward(dout, dlse, *ctx.saved_tensors, ctx.max_seqlen, ctx.softmax_scale)
        return dq, dk, dv, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# torch.compile: the same two bodies as custom ops. Under torch.compile (``torch.compiler.is_compiling()``) the graph
# calls them as opaque ops, their fake impls giving only shapes: Dynamo never traces the launchers (host-side tile
# choice, device guard) and inductor never relaunches the kernels with tiles of its own, so compiled and eager runs
# give the same bits. Eager keeps the autograd.Function: a custom op costs about 20 us more a call on the host.
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("kalm_fast::flash_attn_varlen_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
            softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale)


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    T, Hq, _ = q.shape
    return (q.new_empty(q.shape), q.new_empty((Hq, T), dtype=torch.float32),
            cu_seqlens.new_empty(cu_seqlens.shape[0] - 1, dtype=torch.int32))


@torch.library.custom_op("kalm_fast::flash_attn_varlen_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor | None, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, order: torch.Tensor, max_seqlen: int,
            softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dout, dlse, q, k, v, out, lse, cu_seqlens, order, max_seqlen, softmax_scale)


@_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens, order, max_seqlen, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _op_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, softmax_scale = inputs
    out, lse, order = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, order)
    ctx.args = (max_seqlen, softmax_scale)
    ctx.mark_non_differentiable(order)
    ctx.set_materialize_grads(False)


def _op_backward(ctx, dout, dlse, _dorder):
    dq, dk, dv = _bwd_op(dout, dlse, *ctx.saved_tensors, *ctx.args)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_op_backward, setup_context=_op_setup)


def flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, return_lse=False):
    """Bidirectional varlen attention (inputs checked by ``kalm_fast.ops.flash_attn_varlen_func``).

    q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens int32 (B+1,), max_seqlen >= the longest sequence. Returns out
    (T, Hq, D) in q's dtype, and with ``return_lse`` also lse (Hq, T) fp32; both are differentiable (a gradient
    reaching lse is folded into the backward's delta, step 5 above).
    """
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if torch.compiler.is_compiling():
        out, lse, _ = _fwd_op(q, k, v, cu_seqlens, max_seqlen, scale)
    else:
        out, lse = _FlashAttnVarlenFunction.apply(q, k, v, cu_seqlens, int(max_seqlen), scale)
    return (out, lse) if return_lse else out
