"""Fused focal InfoNCE with online hard-negative mixing (SPEC 4.3) in Triton; the B x N logits are never stored.

Layers (Liger-Kernel style): kernels -> plain launchers ``focal_infonce_fwd`` / ``focal_infonce_bwd`` (usable outside
autograd) -> ``_FocalInfoNCEFunction`` -> ``focal_infonce`` (the launcher contract of ``kalm_fast.ops``).

Notation: q (B, D), d (N, D), s_ij = q_i . d_j (fp32 accumulation), z_ij = s_ij / tau, candidates C_i (all N rows, or
[pos_i, pos_i + G) without in-batch negatives), M synthetic logits zh_im per query, lse_i = log(sum_{C_i} e^z +
sum_m e^zh), log p_i = z_i,pos - lse_i, loss_i = -(1 - p_i)^gamma log p_i. Inside the kernels the logits are in base
2: s * qk_scale with qk_scale = log2(e) / tau, so exp2 replaces exp (the log2(e) is folded into the scale).

Launch plan, tiles and the PINNED table: kernels/infonce_configs.py (every pass splits its looped dimension until it
launches >= 2 programs per SM; a small kernel merges the splits in a fixed order).

Forward (``_infonce_fwd_kernel``, one program per (block of BLOCK_M queries, split of the rows of d)): one pass over
the split's tiles of BLOCK_N rows of d, each tile's scores by tl.dot over D in BLOCK_K chunks (D <= BLOCK_K: one dot
with the query block held on chip, ``infonce_configs.resident``); per query an online logsumexp (m_i, l_i), the
positive's score, and a running top-(M+1) of negative scores with their indices (ties -> lower index), inserted only
when a tile holds a score above a row's current (M+1)-th, so after the first tiles most tiles insert nothing.
``_infonce_fwd_merge_kernel`` combines the splits' (m, l, positive logit, top list). Then ``_infonce_mix_kernel``
loads the two rows of each pair (h_1, h_{m+1}) and forms the synthetic logits from q.d_a, q.d_b (the top scores),
d_a.d_b, |d_a|^2, |d_b|^2 -- no mixed embedding exists. The O(B * M) head (lse, log p, focal weight, loss) is torch.
Saved for the backward: the base-2 lse (B,) (synthetic negatives included), log p (B,), the top indices (B, M+1),
the synthetic logits and norms (B, M).

Backward, derived (the same steps as ``heads.infonce_grad_coeffs``):
  1. L = sum_i r_i * loss_i with r_i the reduction weight (1/B for "mean", 1 for "sum"/"none") times the upstream
     gradient; g_i = dL/dlog p_i = r_i * f'(log p_i), f' from ``heads.focal_dloss_dlogp`` (finite as p -> 1).
  2. log p_i = z_i,pos - lse_i, and d lse_i / d z_ij = P_ij = exp(z_ij - lse_i) for j in C_i (0 elsewhere),
     d lse_i / d zh_im = Ph_im = exp(zh_im - lse_i).
  3. So dz_ij = dL/dz_ij = g_i * (1[j = pos_i] - P_ij) and dzh_im = -g_i * Ph_im.
  4. z_ij = q_i . d_j / tau: dq_i += (1/tau) sum_j dz_ij d_j and dd_j = (1/tau) sum_i dz_ij q_i.
  5. zh_im = q_i . e_im / tau with e_im = (lam d_a + (1 - lam) d_b) / n_im detached (SPEC: no gradient reaches d through
     it): dq_i += (1/tau) sum_m dzh_im e_im = (1/tau) (c_a,i d_a + sum_m c_b,im d_b,m) with
     c_a,i = sum_m dzh_im lam_im / n_im and c_b,im = dzh_im (1 - lam_im) / n_im.
The tiles of s are recomputed (flash attention style) by two kernels, no atomics, each partial row written by one
program in a fixed order (deterministic): ``_infonce_dq_kernel`` (a program per (query block, split of d's tiles))
and ``_infonce_dd_kernel`` (a program per (block of d rows, split of the query blocks)). dz = g (1[pos] - P) is formed
times a power of two 2^-e that brings max |g| to [1, 2) before its cast to the input dtype (g ~ 1/B would flush to
zero in fp16 at large B); ``_infonce_grad_merge_kernel`` sums the splits in order, multiplies by the exact 2^e, adds
step 5 (dq) and scales by 1/tau. Where the whole embedding fits one BLOCK_K slice (D <= BLOCK_K,
``infonce_configs.resident``: the recipe's Matryoshka dims 64-256 against the 64/128/256-wide configs, which the plan
prefers), the program keeps its rows, each tile of the other operand (read once for both dots) and the fp32
accumulator on chip and writes its partial once (RESIDENT): (2 BLOCK_N) D bytes per tile of the dq kernel against
4 BLOCK_M BLOCK_N D flops. A larger D cannot stay on chip (D = 1024: 256 KiB of fp32 for 64 rows, an SM's whole
register file), so the program accumulates its rows of its split's fp32 partial (S, B, D) / (S, N, D) slice by
slice of BLOCK_K columns (read-modify-write by the owning program only, L2-resident, a barrier after each tile
because the next tile's loads may map the slice to other threads): per tile of the dq kernel (2 BLOCK_M + 4 BLOCK_N
+ 8 BLOCK_M) D bytes (q, d twice, the fp32 slice read and written); the splits add 8 S B D bytes (the merge).

Without in-batch negatives the queries are visited in the order of their positives (a stable argsort), so a query
block only scans the rows [min pos, max pos + G) and a d block only the queries whose group can reach it (found by
binary search in the sorted positives): O(B * G * D) work rather than O(B * N * D).

Memory: O((B + N) * D) for the fp32 partials and the gradients plus, when the batch is too small to fill the GPU,
the extra splits' partials (under 2 * target * BLOCK * D * 4 bytes whatever B and N: ``infonce_configs.grid_plan``);
O(splits * B * M) for the forward's partials, O(B * M) saved; no tensor of B * N elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kalm_fast import heads
from kalm_fast.kernels import infonce_configs as configs
from kalm_fast.kernels.utils import (
    LN2,
    LOG2E,
    device_arch,
    dot_precision,
    dtype_class,
    input_guard,
    interpreting,
    launchable,
    lower_bound,
    next_power_of_2,
    rows_contiguous,
)

_INT32_MAX = tl.constexpr(2**31 - 1)  # module constants used inside @triton.jit must be constexpr
_NORM_EPS = tl.constexpr(heads.L2_EPS)

# arguments of each kernel (triton.autotune rejects others); the backward's mixing is outside dq and dd
_AUTOTUNE_KEYS = {"fwd": ["D", "NUM_TOP", "GROUPED"], "dq": ["D", "GROUPED"], "dd": ["D", "GROUPED"]}


def _launchable(kind: str, x: torch.Tensor, row: tuple):
    """``kernel[grid](...)``-able ``_infonce_<kind>_kernel``: the plan's config ``row`` (``configs.launch_plan``) by
    default, the autotuner over the surviving configs with KALM_FAST_AUTOTUNE=1 (RESIDENT from the tuned BLOCK_K)."""
    key = (kind, device_arch(x.device), dtype_class(x.dtype))
    resident = {"RESIDENT": lambda a: configs.resident(a["D"], a["BLOCK_K"])}
    return launchable("infonce", globals()[f"_infonce_{kind}_kernel"], configs.PINNED, key, row, configs.TILE,
                      _AUTOTUNE_KEYS[kind], heuristics=resident)


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _dot_rows(A, a_rows, a_mask, stride_a, Bt, b_rows, b_mask, stride_b, D,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
              INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A[a_rows] @ Bt[b_rows]^T over the whole embedding dim, fp32: [BLOCK_A, BLOCK_B]. Rows are int64."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + a_rows[:, None] * stride_a + offs_k[None, :]  # [BLOCK_A, BLOCK_K]
    b_ptrs = Bt + b_rows[:, None] * stride_b + offs_k[None, :]  # [BLOCK_B, BLOCK_K]
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_mask = (k0 + offs_k) < D
        a = tl.load(a_ptrs + k0, mask=a_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs + k0, mask=b_mask[:, None] & k_mask[None, :], other=0.0)
        if INTERPRET:  # the interpreter computes 16-bit arithmetic wrongly
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _load_rows(X, rows, row_mask, stride, offs_k, k_mask, INTERPRET: tl.constexpr):
    """X[rows][:, offs_k] as one [len(rows), BLOCK_K] tile (0 outside the masks); rows are int64."""
    x = tl.load(X + rows[:, None] * stride + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    if INTERPRET:  # the interpreter computes 16-bit arithmetic wrongly
        x = x.to(tl.float32)
    return x


@triton.jit
def _zero_slices(acc_ptrs, acc_rows, D, offs_k, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The streaming backward's fp32 accumulator rows set to 0, slice by slice (the kernel owns the zeroing, so an
    autotuning re-run starts clean); the barrier after: the first tile's slices may map to other threads."""
    for k0 in range(0, D, BLOCK_K):
        tl.store(acc_ptrs + k0, tl.zeros([BLOCK_ROWS, BLOCK_K], dtype=tl.float32),
                 mask=acc_rows[:, None] & ((k0 + offs_k) < D)[None, :])
    tl.debug_barrier()


@triton.jit
def _accumulate_slices(acc_ptrs, acc_rows, dz, x_ptrs, x_rows, D, offs_k, BLOCK_K: tl.constexpr,
                       INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr, PREFETCH: tl.constexpr):
    """The streaming backward's step 4: acc[:, k0:k0 + BLOCK_K] += dz @ x[:, k0:k0 + BLOCK_K] for every slice of D,
    the fp32 accumulator read from and written back to memory by its owning program (acc_ptrs, x_ptrs: row pointers
    at column 0; acc_rows, x_rows: their row masks). The barrier after: the next tile rereads these slices, maybe
    from other threads of the program. Triton pipelines the x slices (dot operand: async copies, num_stages ahead)
    but not a load feeding the dot's accumulator, so with PREFETCH (the default) the next accumulator slice is loaded
    before this slice's dot is issued: its latency hides behind the dot and the store (masked off past D). The same
    dots either way: the same bits."""
    k_mask = offs_k < D
    if PREFETCH:
        acc = tl.load(acc_ptrs, mask=acc_rows[:, None] & k_mask[None, :], other=0.0)
    for k0 in range(0, D, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=x_rows[:, None] & k_mask[None, :], other=0.0)
        if INTERPRET:
            x = x.to(tl.float32)
        next_mask = (k0 + BLOCK_K + offs_k) < D
        if PREFETCH:
            acc_next = tl.load(acc_ptrs + (k0 + BLOCK_K), mask=acc_rows[:, None] & next_mask[None, :], other=0.0)
        else:
            acc = tl.load(acc_ptrs + k0, mask=acc_rows[:, None] & k_mask[None, :], other=0.0)
        tl.store(acc_ptrs + k0, tl.dot(dz, x, acc, input_precision=DOT_PRECISION),
                 mask=acc_rows[:, None] & k_mask[None, :])
        if PREFETCH:
            acc = acc_next
        k_mask = next_mask
    tl.debug_barrier()


@triton.jit
def _mm_operand(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """An fp32 tile rounded to the input dtype for the tensor-core dot (as flash attention rounds dS); under the
    interpreter the rounding is kept but the dot runs in fp32."""
    if INTERPRET:
        return x.to(DTYPE).to(tl.float32)
    return x.to(DTYPE)


@triton.jit
def _shift_right(v, i, slots, TOP_PAD: tl.constexpr):
    """[BM, TOP_PAD] lists moved one slot right (slot s gets slot s - 1; slot 0 gets (-inf, -1))."""
    out_v = tl.full(v.shape, float("-inf"), tl.float32)
    out_i = tl.full(i.shape, -1, tl.int32)
    for s in tl.static_range(1, TOP_PAD):
        col_v = tl.sum(tl.where(slots[None, :] == s - 1, v, 0.0), 1)
        col_i = tl.sum(tl.where(slots[None, :] == s - 1, i, 0), 1)
        out_v = tl.where(slots[None, :] == s, col_v[:, None], out_v)
        out_i = tl.where(slots[None, :] == s, col_i[:, None], out_i)
    return out_v, out_i


@triton.jit
def _insert_top(top_v, top_i, x, cols, slots, NUM_TOP: tl.constexpr, TOP_PAD: tl.constexpr):
    """Running top-NUM_TOP per row (top_v/top_i [BM, TOP_PAD], descending, (-inf, -1) when empty) updated with the
    tile's candidates x [BM, BN] (-inf where none) at columns cols ([1, BN] for a tile of d, [BM, BN] for a list).

    x's entries are inserted best first (ties -> lower column), each after the held entries >= it: held entries come
    from earlier tiles or earlier insertions, so an equal held score always has the lower index. One pass per entry
    the busiest row inserts (capped at NUM_TOP): after the first tiles that is usually one pass, or none.
    """
    n_pass = tl.minimum(tl.max(tl.sum((x > float("-inf")).to(tl.int32), 1), 0), NUM_TOP)
    for _ in range(n_pass):
        v = tl.max(x, 1)  # [BM]
        i = tl.min(tl.where(x == v[:, None], cols, _INT32_MAX), 1)
        x = tl.where(cols == i[:, None], float("-inf"), x)
        p = tl.sum((top_v >= v[:, None]).to(tl.int32), 1)  # insertion slot
        sv, si = _shift_right(top_v, top_i, slots, TOP_PAD)
        new_v = tl.where(slots[None, :] < p[:, None], top_v, tl.where(slots[None, :] == p[:, None], v[:, None], sv))
        new_i = tl.where(slots[None, :] < p[:, None], top_i, tl.where(slots[None, :] == p[:, None], i[:, None], si))
        keep = (v > float("-inf"))[:, None] & (slots[None, :] < NUM_TOP)  # rows with an entry; padding slots stay empty
        top_v = tl.where(keep, new_v, top_v)
        top_i = tl.where(keep, new_i, top_i)
    return top_v, top_i


@triton.jit
def _split_range(lo, hi, split, SPLITS, BLOCK: tl.constexpr):
    """[start, end) of split ``split`` of SPLITS over [lo, hi): contiguous runs of whole tiles of BLOCK, in increasing
    order, whose tile counts differ by at most one (so merging the splits in split order visits the candidates in
    the order one program would); empty only when SPLITS exceeds the tiles."""
    tiles = tl.cdiv(hi - lo, BLOCK).to(tl.int64)
    t0 = split.to(tl.int64) * tiles // SPLITS
    t1 = (split.to(tl.int64) + 1) * tiles // SPLITS
    start = lo + (t0 * BLOCK).to(tl.int32)
    end = tl.minimum(hi, lo + (t1 * BLOCK).to(tl.int32))
    return start, end


@triton.jit
def _query_block(POS, QORD, B, N, G, SPLITS, GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (query block, split) of the forward and dq kernels -> (split, rows [BLOCK_M] of q in the visiting
    order, their mask, their positives' rows of d, [n_start, n_end) the split's share of the rows of d that hold the
    block's candidates: all N in-batch, the span of the block's groups when GROUPED)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < B
    pos = tl.load(POS + offs_m, mask=row_mask, other=0)  # POS is in the visiting order (sorted when GROUPED)
    if GROUPED:
        rows = tl.load(QORD + offs_m, mask=row_mask, other=0)
        lo = tl.min(tl.where(row_mask, pos, N), 0).to(tl.int32)
        hi = (tl.max(tl.where(row_mask, pos, 0), 0) + G).to(tl.int32)
    else:
        rows = offs_m.to(tl.int64)
        lo = 0
        hi = N
    n_start, n_end = _split_range(lo, hi, split, SPLITS, BLOCK_N)
    return split, rows, row_mask, pos, n_start, n_end


@triton.jit
def _tile_scores(Q, rows, row_mask, stride_q, q_all, Dm, n0, n_end, stride_d, D, offs_k, k_mask, pos, G,
                 GROUPED: tl.constexpr, RESIDENT: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step 1's raw dots of a (query block, tile of d) pair -> (cols [BLOCK_N] rows of d, their mask,
    s [BLOCK_M, BLOCK_N], cand: the candidate mask, d_all: the [BLOCK_N, BLOCK_K] tile of d when RESIDENT (the query
    block q_all stays on chip and the tile is read once for every dot of the program), else 0 (s streams over D in
    BLOCK_K slices))."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < n_end
    if RESIDENT:
        d_all = _load_rows(Dm, cols.to(tl.int64), col_mask, stride_d, offs_k, k_mask, INTERPRET)
        s = tl.dot(q_all, tl.trans(d_all), input_precision=DOT_PRECISION)
    else:
        d_all = 0
        s = _dot_rows(Q, rows, row_mask, stride_q, Dm, cols.to(tl.int64), col_mask, stride_d, D,
                      BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET, DOT_PRECISION)
    cand = row_mask[:, None] & col_mask[None, :]
    if GROUPED:
        cand = cand & (cols[None, :] >= pos[:, None]) & (cols[None, :] < pos[:, None] + G)
    return cols, col_mask, s, cand, d_all


@triton.jit(do_not_specialize=["B", "N", "G", "SPLITS"])  # per-call sizes: bounds only, no recompilation
def _infonce_fwd_kernel(
    Q, Dm, POS, QORD, PM, PL, PSPOS, PTOPV, PTOPI,
    B, N, D, stride_q, stride_d, G, qk_scale, SPLITS,
    NUM_TOP: tl.constexpr, TOP_PAD: tl.constexpr, GROUPED: tl.constexpr, RESIDENT: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (query block, split): the split's share of the query block's candidate rows of d, in base 2 (RESIDENT,
    D <= BLOCK_K: the query block is loaded once and stays on chip; else the scores stream over D). Writes
    the partials of split ``s`` at [s, query]: PM the running max m, PL sum 2^(logit - m), PSPOS the positive's
    base-2 logit (0 when the positive is in another split) and PTOPV/PTOPI (.., NUM_TOP) the split's highest negative
    scores (raw dots) and rows, -inf / -1 past the last one. ``_infonce_fwd_merge_kernel`` combines the splits."""
    split, rows, row_mask, pos, n_start, n_end = _query_block(POS, QORD, B, N, G, SPLITS, GROUPED, BLOCK_M, BLOCK_N)
    slots = tl.arange(0, TOP_PAD)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the base-2 logits
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(logit - m_i)
    s_pos = tl.zeros([BLOCK_M], dtype=tl.float32)  # the positive's base-2 logit, the same value that enters m_i
    top_v = tl.full([BLOCK_M, TOP_PAD], float("-inf"), tl.float32)
    top_i = tl.full([BLOCK_M, TOP_PAD], -1, tl.int32)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < D
    q_all = _load_rows(Q, rows, row_mask, stride_q, offs_k, k_mask, INTERPRET) if RESIDENT else 0  # [BLOCK_M, BLOCK_K]
    for n0 in range(n_start, n_end, BLOCK_N):
        cols, _, s, cand, _ = _tile_scores(Q, rows, row_mask, stride_q, q_all, Dm, n0, n_end, stride_d, D, offs_k,
                                           k_mask, pos, G, GROUPED, RESIDENT, INTERPRET, DOT_PRECISION, BLOCK_M,
                                           BLOCK_N, BLOCK_K)  # s, cand [BLOCK_M, BLOCK_N]
        is_pos = cols[None, :] == pos[:, None]
        # online logsumexp; m_safe keeps rows without a candidate so far (m = -inf) free of inf - inf
        s2 = tl.where(cand, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s2 - m_safe[:, None]), 1)
        m_i = m_new
        s_pos += tl.sum(tl.where(cand & is_pos, s2, 0.0), 1)
        # running top-NUM_TOP of the negatives: only scores above the current NUM_TOP-th can enter (strictly: an
        # equal score here has a higher index than the one held), so most tiles insert nothing
        kth = tl.min(tl.where(slots[None, :] < NUM_TOP, top_v, float("inf")), 1)
        x = tl.where(cand & (cols[None, :] != pos[:, None]) & (s > kth[:, None]), s, float("-inf"))
        top_v, top_i = _insert_top(top_v, top_i, x, cols[None, :], slots, NUM_TOP, TOP_PAD)
    part = split.to(tl.int64) * B + rows  # [s, query] of the (SPLITS, B) partials
    tl.store(PM + part, m_i, mask=row_mask)
    tl.store(PL + part, l_i, mask=row_mask)
    tl.store(PSPOS + part, s_pos, mask=row_mask)
    top_ptrs = part[:, None] * NUM_TOP + slots[None, :]
    top_mask = row_mask[:, None] & (slots[None, :] < NUM_TOP)
    tl.store(PTOPV + top_ptrs, top_v, mask=top_mask)
    tl.store(PTOPI + top_ptrs, top_i, mask=top_mask)


@triton.jit(do_not_specialize=["B", "SPLITS"])
def _infonce_fwd_merge_kernel(
    PM, PL, PSPOS, PTOPV, PTOPI, LSE2, LOGP2, TOPV, TOPI, B, SPLITS,
    NUM_TOP: tl.constexpr, TOP_PAD: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """The splits' partials combined in split order 0, 1, ... (a fixed order: bitwise the same every run): LSE2 =
    m + log2(l) and LOGP2 = (s_pos - m) - log2(l) per query (exact when the positive dominates: m is then its own
    logit), and the top-NUM_TOP negatives (ties -> lower row: an earlier split holds lower rows)."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    slots = tl.arange(0, TOP_PAD)
    list_mask = b_mask[:, None] & (slots[None, :] < NUM_TOP)
    m_i = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_pos = tl.zeros([BLOCK_B], dtype=tl.float32)
    top_v = tl.full([BLOCK_B, TOP_PAD], float("-inf"), tl.float32)
    top_i = tl.full([BLOCK_B, TOP_PAD], -1, tl.int32)
    for split in range(0, SPLITS):
        part = split * B + offs_b.to(tl.int64)
        m_s = tl.load(PM + part, mask=b_mask, other=float("-inf"))
        l_s = tl.load(PL + part, mask=b_mask, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + l_s * tl.exp2(m_s - m_safe)
        m_i = m_new
        s_pos += tl.load(PSPOS + part, mask=b_mask, other=0.0)
        list_ptrs = part[:, None] * NUM_TOP + slots[None, :]
        x = tl.load(PTOPV + list_ptrs, mask=list_mask, other=float("-inf"))
        xi = tl.load(PTOPI + list_ptrs, mask=list_mask, other=-1)
        top_v, top_i = _insert_top(top_v, top_i, x, xi, slots, NUM_TOP, TOP_PAD)
    l_i = tl.where(b_mask, l_i, 1.0)  # padded rows have no candidate: keep log2 finite
    tl.store(LSE2 + offs_b, m_i + tl.log2(l_i), mask=b_mask)
    tl.store(LOGP2 + offs_b, (s_pos - m_i) - tl.log2(l_i), mask=b_mask)
    top_ptrs = offs_b[:, None] * NUM_TOP + slots[None, :]
    tl.store(TOPV + top_ptrs, top_v, mask=list_mask)
    tl.store(TOPI + top_ptrs, top_i, mask=list_mask)


@triton.jit(do_not_specialize=["B"])
def _infonce_mix_kernel(
    Dm, TOPV, TOPI, LAM, ZH, NRM,
    B, D, stride_d, inv_tau,
    NUM_MIX: tl.constexpr, NUM_TOP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Synthetic logits of SPEC 4.3 from five dot products: with a = h_1, b = h_{m+1} (TOPI), s_a, s_b = q.d_a, q.d_b
    (TOPV, the same fp32 scores that entered the logsumexp), |e|^2 = lam^2 |d_a|^2 + 2 lam (1 - lam) d_a.d_b +
    (1 - lam)^2 |d_b|^2 and zh = (lam s_a + (1 - lam) s_b) / (tau max(|e|, eps)). ZH, NRM (B, NUM_MIX) fp32."""
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    offs_k = tl.arange(0, BLOCK_K)
    # top_i is -1 where a row has no such negative (NaN scores never enter the list): read row 0 instead of the row
    # before d; its score -inf makes the synthetic logit -inf (probability 0)
    ia = tl.maximum(tl.load(TOPI + offs_b * NUM_TOP, mask=b_mask, other=0), 0).to(tl.int64)
    s_a = tl.load(TOPV + offs_b * NUM_TOP, mask=b_mask, other=0.0)
    a_ptrs = Dm + ia[:, None] * stride_d + offs_k[None, :]  # [BLOCK_B, BLOCK_K]
    aa = tl.zeros([BLOCK_B], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        mask = b_mask[:, None] & ((k0 + offs_k) < D)[None, :]
        da = tl.load(a_ptrs + k0, mask=mask, other=0.0).to(tl.float32)
        aa += tl.sum(da * da, 1)
    for m in tl.static_range(NUM_MIX):
        ib = tl.maximum(tl.load(TOPI + offs_b * NUM_TOP + m + 1, mask=b_mask, other=0), 0).to(tl.int64)
        s_b = tl.load(TOPV + offs_b * NUM_TOP + m + 1, mask=b_mask, other=0.0)
        b_ptrs = Dm + ib[:, None] * stride_d + offs_k[None, :]
        ab = tl.zeros([BLOCK_B], dtype=tl.float32)
        bb = tl.zeros([BLOCK_B], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            mask = b_mask[:, None] & ((k0 + offs_k) < D)[None, :]
            da = tl.load(a_ptrs + k0, mask=mask, other=0.0).to(tl.float32)
            db = tl.load(b_ptrs + k0, mask=mask, other=0.0).to(tl.float32)
            ab += tl.sum(da * db, 1)
            bb += tl.sum(db * db, 1)
        lam = tl.load(LAM + offs_b * NUM_MIX + m, mask=b_mask, other=0.0)
        n2 = lam * lam * aa + 2.0 * lam * (1.0 - lam) * ab + (1.0 - lam) * (1.0 - lam) * bb
        nrm = tl.sqrt(tl.maximum(n2, _NORM_EPS * _NORM_EPS))
        zh = (lam * s_a + (1.0 - lam) * s_b) / nrm * inv_tau
        tl.store(ZH + offs_b * NUM_MIX + m, zh, mask=b_mask)
        tl.store(NRM + offs_b * NUM_MIX + m, nrm, mask=b_mask)


@triton.jit(do_not_specialize=["B", "N", "G", "SPLITS"])
def _infonce_dq_kernel(
    Q, Dm, POS, QORD, LSE2, GRAD, SCALE, DQP,
    B, N, D, stride_q, stride_d, G, qk_scale, SPLITS,
    GROUPED: tl.constexpr, RESIDENT: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (query block, split): sum_j dz_ij d_j over the split's share of the block's candidate rows of d
    (steps 3-4 of the module docstring), times SCALE[0], accumulated in the program's rows of the split's partial
    DQP[split] (SPLITS, B, D) fp32. ``_infonce_grad_merge_kernel`` sums the splits and adds step 5. RESIDENT (D <=
    BLOCK_K): the query block, each tile of d (read once for both dots) and the dq accumulator are single on-chip
    tiles, and the partial is written once at the end; else the accumulator streams through DQP slice by slice."""
    split, rows, row_mask, pos, n_start, n_end = _query_block(POS, QORD, B, N, G, SPLITS, GROUPED, BLOCK_M, BLOCK_N)
    lse2 = tl.load(LSE2 + rows, mask=row_mask, other=0.0)  # base-2 lse: P = exp2(s * qk_scale - lse2)
    # dL/dlog p (step 1) times a power of two that brings max |g| to [1, 2): dz keeps its bits through the cast to
    # fp16/bf16 at any batch size (g ~ 1/B); the merge multiplies by the exact inverse
    g = tl.load(GRAD + rows, mask=row_mask, other=0.0) * tl.load(SCALE)
    offs_k = tl.arange(0, BLOCK_K)
    acc_ptrs = DQP + (split.to(tl.int64) * B + rows)[:, None] * D + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    k_mask = offs_k < D
    if RESIDENT:
        q_all = _load_rows(Q, rows, row_mask, stride_q, offs_k, k_mask, INTERPRET)  # [BLOCK_M, BLOCK_K]
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    else:
        q_all = 0  # streamed slice by slice
        _zero_slices(acc_ptrs, row_mask, D, offs_k, BLOCK_M, BLOCK_K)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols, col_mask, s, cand, d_all = _tile_scores(Q, rows, row_mask, stride_q, q_all, Dm, n0, n_end, stride_d, D,
                                                      offs_k, k_mask, pos, G, GROUPED, RESIDENT, INTERPRET,
                                                      DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # s, cand [BM, BN]
        p = tl.where(cand, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)  # step 2, 0 off the candidates
        dz = g[:, None] * (tl.where(cand & (cols[None, :] == pos[:, None]), 1.0, 0.0) - p)  # step 3 (scaled)
        dz = _mm_operand(dz, Dm.dtype.element_ty, INTERPRET)
        if RESIDENT:  # step 4 on chip
            acc = tl.dot(dz, d_all, acc, input_precision=DOT_PRECISION)
        else:
            d_ptrs = Dm + cols.to(tl.int64)[:, None] * stride_d + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
            _accumulate_slices(acc_ptrs, row_mask, dz, d_ptrs, col_mask, D, offs_k, BLOCK_K, INTERPRET,
                               DOT_PRECISION, PREFETCH)  # step 4, one BLOCK_K slice of the program's dq rows at a time
    if RESIDENT:
        tl.store(acc_ptrs, acc, mask=row_mask[:, None] & k_mask[None, :])


@triton.jit(do_not_specialize=["B", "N", "G", "SPLITS"])
def _infonce_dd_kernel(
    Q, Dm, POS, QORD, LSE2, GRAD, SCALE, DDP,
    B, N, D, stride_q, stride_d, G, qk_scale, SPLITS,
    GROUPED: tl.constexpr, RESIDENT: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (block of d rows, split): sum_i dz_ij q_i (step 4) over the split's share of the query blocks that
    can reach the rows, in a fixed order, times SCALE[0], accumulated in DDP[split] (SPLITS, N, D) fp32; RESIDENT
    (D <= BLOCK_K) as in ``_infonce_dq_kernel``: d's rows, each query tile and the accumulator on chip."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of d owned by this program
    col_mask = cols < N
    cols64 = cols.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc_ptrs = DDP + (split.to(tl.int64) * N + cols64)[:, None] * D + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    if RESIDENT:
        k_mask = offs_k < D
        d_all = _load_rows(Dm, cols64, col_mask, stride_d, offs_k, k_mask, INTERPRET)  # [BLOCK_N, BLOCK_K]
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        _zero_slices(acc_ptrs, col_mask, D, offs_k, BLOCK_N, BLOCK_K)
    if GROUPED:
        # queries in positive order whose group [pos, pos + G) meets these rows: pos in [n0 - G + 1, n0 + BLOCK_N)
        q_lo = lower_bound(POS, B, pid * BLOCK_N - G + 1)
        q_hi = lower_bound(POS, B, pid * BLOCK_N + BLOCK_N)
    else:
        q_lo = 0
        q_hi = B
    m_start, m_end = _split_range(q_lo, q_hi, split, SPLITS, BLOCK_M)
    scale = tl.load(SCALE)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_mask = offs_m < m_end
        pos = tl.load(POS + offs_m, mask=row_mask, other=0)
        if GROUPED:
            rows = tl.load(QORD + offs_m, mask=row_mask, other=0)
        else:
            rows = offs_m.to(tl.int64)
        lse2 = tl.load(LSE2 + rows, mask=row_mask, other=0.0)
        g = tl.load(GRAD + rows, mask=row_mask, other=0.0) * scale
        if RESIDENT:
            q_all = _load_rows(Q, rows, row_mask, stride_q, offs_k, k_mask, INTERPRET)  # [BLOCK_M, BLOCK_K]
            s_t = tl.dot(d_all, tl.trans(q_all), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M] = s^T
        else:
            s_t = _dot_rows(Dm, cols64, col_mask, stride_d, Q, rows, row_mask, stride_q, D,
                            BLOCK_N, BLOCK_M, BLOCK_K, INTERPRET, DOT_PRECISION)  # [BLOCK_N, BLOCK_M] = s^T
        cand = col_mask[:, None] & row_mask[None, :]
        if GROUPED:
            cand = cand & (cols[:, None] >= pos[None, :]) & (cols[:, None] < pos[None, :] + G)
        p_t = tl.where(cand, tl.exp2(s_t * qk_scale - lse2[None, :]), 0.0)
        dz_t = g[None, :] * (tl.where(cand & (cols[:, None] == pos[None, :]), 1.0, 0.0) - p_t)  # step 3, transposed
        dz_t = _mm_operand(dz_t, Q.dtype.element_ty, INTERPRET)
        if RESIDENT:
            acc = tl.dot(dz_t, q_all, acc, input_precision=DOT_PRECISION)
        else:
            q_ptrs = Q + rows[:, None] * stride_q + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
            _accumulate_slices(acc_ptrs, col_mask, dz_t, q_ptrs, row_mask, D, offs_k, BLOCK_K, INTERPRET,
                               DOT_PRECISION, PREFETCH)
    if RESIDENT:
        tl.store(acc_ptrs, acc, mask=col_mask[:, None] & k_mask[None, :])


@triton.jit(do_not_specialize=["R", "SPLITS"])
def _infonce_grad_merge_kernel(
    P, OUT, SCALE, Dm, TOPI, CA, CB,
    R, D, stride_d, SPLITS, inv_tau,
    NUM_MIX: tl.constexpr, NUM_TOP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT[r] = (1/tau) (SCALE[1] sum_s P[s, r] + step 5), the splits summed in split order 0, 1, ... (bitwise the
    same every run); step 5 (dq only, NUM_MIX > 0): c_a,r d_a + sum_m c_b,rm d_b,m, rows a = h_1, b = h_{m+1}."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < R
    mask = row_mask[:, None] & (offs_k < D)[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for split in range(0, SPLITS):
        acc += tl.load(P + (split * R + rows)[:, None] * D + offs_k[None, :], mask=mask, other=0.0)
    acc = acc * tl.load(SCALE + 1)  # the exact inverse of the power of two dz was scaled by
    if NUM_MIX > 0:
        ia = tl.maximum(tl.load(TOPI + rows * NUM_TOP, mask=row_mask, other=0), 0).to(tl.int64)  # -1: no such row
        c_a = tl.load(CA + rows, mask=row_mask, other=0.0)
        da = tl.load(Dm + ia[:, None] * stride_d + offs_k[None, :], mask=mask, other=0.0)
        acc += c_a[:, None] * da.to(tl.float32)
        for m in tl.static_range(NUM_MIX):
            ib = tl.maximum(tl.load(TOPI + rows * NUM_TOP + m + 1, mask=row_mask, other=0), 0).to(tl.int64)
            c_b = tl.load(CB + rows * NUM_MIX + m, mask=row_mask, other=0.0)
            db = tl.load(Dm + ib[:, None] * stride_d + offs_k[None, :], mask=mask, other=0.0)
            acc += c_b[:, None] * db.to(tl.float32)
    tl.store(OUT + rows[:, None] * D + offs_k[None, :], (acc * inv_tau).to(OUT.dtype.element_ty), mask=mask)



def _grad_scale(g: torch.Tensor) -> torch.Tensor:
    """(2,) fp32 [2^-e, 2^e] with e = floor(log2 max |g|): dz = g (1[pos] - P) times 2^-e has max |g| in [1, 2), so
    its cast to fp16/bf16 keeps the bits that g ~ 1/B would send under the smallest subnormal (6e-8 in fp16); powers
    of two scale exactly. Computed on the device (no host sync)."""
    amax = g.abs().amax().float()
    e = torch.where(amax > 0, torch.floor(torch.log2(amax)), torch.zeros_like(amax)).clamp(-126, 126)
    return torch.stack([torch.exp2(-e), torch.exp2(e)]).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# launchers (inputs checked by kalm_fast.ops; usable outside autograd)
# ----------------------------------------------------------------------------------------------------------------


@input_guard
def focal_infonce_fwd(q, d, pos_idx, group_size, in_batch_negatives, temperature, num_mix, mix_lambda):
    """Forward kernels. q (B, D), d (N, D), pos_idx int64 (B,), mix_lambda (B, M) fp32 when num_mix > 0.

    Returns lse2 (B,) = log2 sum_{C_i} 2^{z_ij log2(e)}, logp2 (B,) = the positive's base-2 log share among the real
    candidates (z_i,pos log2(e) - lse2), top_v (B, M+1) fp32 and top_i (B, M+1) int32 (the highest negative scores
    q.d_j and their rows, descending, ties -> lower row; -inf / -1 past the last negative), and with num_mix > 0 the
    synthetic logits zh (B, M) and norms |e| (B, M) (else None, None).
    """
    q, d = rows_contiguous(q), rows_contiguous(d)
    B, D = q.shape
    N = d.shape[0]
    K = num_mix + 1
    plan, config = configs.launch_plan(q, N, group_size, in_batch_negatives)
    S = plan["fwd_splits"]
    pos_visit, order = configs.visit_order(pos_idx, in_batch_negatives)
    dev, f32 = q.device, torch.float32
    pm, pl, pspos = (torch.empty(S, B, device=dev, dtype=f32) for _ in range(3))
    ptopv = torch.empty(S, B, K, device=dev, dtype=f32)
    ptopi = torch.empty(S, B, K, device=dev, dtype=torch.int32)
    interp = interpreting()
    top_pad = max(2, next_power_of_2(K))
    _launchable("fwd", q, config["fwd"])[lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), S)](
        q, d, pos_visit, order, pm, pl, pspos, ptopv, ptopi,
        B, N, D, q.stride(0), d.stride(0), group_size, LOG2E / temperature, S,
        NUM_TOP=K, TOP_PAD=top_pad, GROUPED=not in_batch_negatives, RESIDENT=configs.resident(D, config["fwd"][2]),
        INTERPRET=interp, DOT_PRECISION=dot_precision(q.dtype),
    )
    lse2 = torch.empty(B, device=dev, dtype=f32)
    logp2 = torch.empty(B, device=dev, dtype=f32)
    top_v = torch.empty(B, K, device=dev, dtype=f32)
    top_i = torch.empty(B, K, device=dev, dtype=torch.int32)
    block_b = 64 if interp else 32
    _infonce_fwd_merge_kernel[(triton.cdiv(B, block_b),)](
        pm, pl, pspos, ptopv, ptopi, lse2, logp2, top_v, top_i, B, S, NUM_TOP=K, TOP_PAD=top_pad, BLOCK_B=block_b,
    )
    del pm, pl, pspos, ptopv, ptopi
    if num_mix == 0:
        return lse2, logp2, top_v, top_i, None, None
    zh = torch.empty(B, num_mix, device=dev, dtype=f32)
    nrm = torch.empty(B, num_mix, device=dev, dtype=f32)
    block_b = 64 if interp else 16
    _infonce_mix_kernel[(triton.cdiv(B, block_b),)](
        d, top_v, top_i, mix_lambda.contiguous(), zh, nrm, B, D, d.stride(0), 1.0 / temperature,
        NUM_MIX=num_mix, NUM_TOP=K, BLOCK_B=block_b, BLOCK_K=min(256, max(16, next_power_of_2(D))),
    )
    return lse2, logp2, top_v, top_i, zh, nrm


def _merge_rows(part, out, scale, d, top_i, c_a, c_b, temperature):
    """out (R, D) = (1/tau) (scale[1] * sum over splits of part (S, R, D) + step 5 when c_b is given)."""
    S, R, D = part.shape
    num_mix = 0 if c_b is None else c_b.shape[1]
    mix = (top_i, c_a.contiguous(), c_b.contiguous()) if num_mix else (scale, scale, scale)  # unread without mixing
    block_r, block_k = (64, min(256, next_power_of_2(D))) if interpreting() else (32, min(128, next_power_of_2(D)))
    _infonce_grad_merge_kernel[(triton.cdiv(R, block_r), triton.cdiv(D, block_k))](
        part, out, scale, d, *mix, R, D, d.stride(0), S, 1.0 / temperature,
        NUM_MIX=num_mix, NUM_TOP=num_mix + 1, BLOCK_R=block_r, BLOCK_K=block_k,
    )
    return out


@input_guard
def focal_infonce_bwd(q, d, pos_idx, group_size, in_batch_negatives, temperature, lse2, g, top_i, c_a, c_b,
                 need_dq=True, need_dd=True):
    """Backward kernels: dq (B, D) and dd (N, D) in the input dtype (None where not needed) from lse2 (B,) (base-2
    lse, synthetic negatives included), g (B,) = dL/dlog p and, with mixing, top_i (B, M+1) int32 and the
    coefficients c_a (B,), c_b (B, M) of step 5 (``heads.infonce_grad_coeffs``)."""
    q, d = rows_contiguous(q), rows_contiguous(d)
    B, D = q.shape
    N = d.shape[0]
    plan, config = configs.launch_plan(q, N, group_size, in_batch_negatives)
    pos_visit, order = configs.visit_order(pos_idx, in_batch_negatives)
    lse2 = lse2.contiguous()
    g = g.float().contiguous()
    scale = _grad_scale(g)
    args = (q, d, pos_visit, order, lse2, g, scale)
    common = dict(GROUPED=not in_batch_negatives, INTERPRET=interpreting(), DOT_PRECISION=dot_precision(q.dtype),
                  PREFETCH=configs.prefetch())
    sizes = (B, N, D, q.stride(0), d.stride(0), group_size, LOG2E / temperature)
    dq = dd = None
    if need_dq:
        S = plan["dq_splits"]
        part = torch.empty(S, B, D, device=q.device, dtype=torch.float32)
        _launchable("dq", q, config["dq"])[lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), S)](
            *args, part, *sizes, S, RESIDENT=configs.resident(D, config["dq"][2]), **common)
        dq = _merge_rows(part, torch.empty(B, D, device=q.device, dtype=q.dtype), scale, d, top_i, c_a, c_b,
                         temperature)
        del part  # freed before the dd partials exist (4 * S * B * D bytes off the peak)
    if need_dd:
        S = plan["dd_splits"]
        part = torch.empty(S, N, D, device=d.device, dtype=torch.float32)
        _launchable("dd", q, config["dd"])[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), S)](
            *args, part, *sizes, S, RESIDENT=configs.resident(D, config["dd"][2]), **common)
        dd = _merge_rows(part, torch.empty(N, D, device=d.device, dtype=d.dtype), scale, d, None, None, None,
                         temperature)
    return dq, dd


# ----------------------------------------------------------------------------------------------------------------
# autograd + public launcher
# ----------------------------------------------------------------------------------------------------------------


def _forward(q, d, pos_idx, group_size, in_batch_negatives, temperature, gamma, num_mix, mix_lambda, reduction):
    """(loss, stats (INFONCE_STATS order), residuals for the backward: lam (None without mixing), lse2, logp, top_i,
    nrm, zh) -- one body for eager autograd and the op."""
    lam = mix_lambda if num_mix > 0 else None
    lse2, logp2, top_v, top_i, zh, nrm = focal_infonce_fwd(q, d, pos_idx, group_size, in_batch_negatives,
                                                     temperature, num_mix, lam)
    shift, logp, loss = heads.infonce_head(lse2 * LN2, logp2 * LN2, zh, gamma)
    lse2 = lse2 + shift * LOG2E  # the synthetic negatives' share, for P = exp2(s qk_scale - lse2) in the backward
    stats = heads.infonce_stats(logp, gamma, top_v[:, 0] / temperature, top_i[:, 0].long())
    return heads.reduce_loss(loss, reduction), tuple(stats.values()), (lam, lse2, logp, top_i, nrm, zh)


def _backward(grad_loss, q, d, pos_idx, lam, lse2, logp, top_i, nrm, zh, args, need):
    group_size, in_batch_negatives, temperature, gamma, reduction = args
    g, c_a, c_b = heads.infonce_grad_coeffs(grad_loss, logp, lse2 * LN2, zh, lam, nrm, gamma, reduction)
    return focal_infonce_bwd(q, d, pos_idx, group_size, in_batch_negatives, temperature, lse2, g, top_i, c_a, c_b,
                             need_dq=need[0], need_dd=need[1])


class _FocalInfoNCEFunction(torch.autograd.Function):
    """(loss, p_pos, weight, hard_neg_logit, hard_neg_idx); only the loss is differentiable (w.r.t. q and d)."""

    @staticmethod
    def forward(ctx, q, d, pos_idx, group_size, in_batch_negatives, temperature, gamma, num_mix, mix_lambda,
                reduction):
        loss, stats, saved = _forward(q, d, pos_idx, group_size, in_batch_negatives, temperature, gamma, num_mix,
                                      mix_lambda, reduction)
        ctx.save_for_backward(q, d, pos_idx, *saved)
        ctx.args = (group_size, in_batch_negatives, temperature, gamma, reduction)
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *_stats_grads):
        dq, dd = _backward(grad_loss, *ctx.saved_tensors, ctx.args, ctx.needs_input_grad[:2])
        return dq, dd, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# torch.compile: the same two bodies as custom ops (why: kalm_fast.kernels.attention, same section). An op returns
# tensors only: the absent mixing residuals and gradients travel as (0,)-sized tensors.
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("kalm_fast::focal_infonce_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, d: torch.Tensor, pos_idx: torch.Tensor, group_size: int, in_batch_negatives: bool,
            temperature: float, gamma: float, num_mix: int, mix_lambda: torch.Tensor | None,
            reduction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, stats, (_, lse2, logp, top_i, nrm, zh) = _forward(q, d, pos_idx, group_size, in_batch_negatives,
                                                            temperature, gamma, num_mix, mix_lambda, reduction)
    return (loss, *stats, lse2, logp, top_i, *(lse2.new_empty(0) if x is None else x for x in (nrm, zh)))


@_fwd_op.register_fake
def _(q, d, pos_idx, group_size, in_batch_negatives, temperature, gamma, num_mix, mix_lambda, reduction):
    B = q.shape[0]
    f32 = dict(dtype=torch.float32)
    loss = q.new_empty((B,) if reduction == "none" else (), **f32)
    stats = (q.new_empty(B, **f32), q.new_empty(B, **f32), q.new_empty(B, **f32), q.new_empty(B, dtype=torch.int64))
    mix = (q.new_empty(B, num_mix, **f32), q.new_empty(B, num_mix, **f32)) if num_mix > 0 else (
        q.new_empty(0, **f32), q.new_empty(0, **f32))
    return (loss, *stats, q.new_empty(B, **f32), q.new_empty(B, **f32),
            q.new_empty(B, num_mix + 1, dtype=torch.int32), *mix)


@torch.library.custom_op("kalm_fast::focal_infonce_bwd", mutates_args=())
def _bwd_op(grad_loss: torch.Tensor, q: torch.Tensor, d: torch.Tensor, pos_idx: torch.Tensor,
            lam: torch.Tensor | None, lse2: torch.Tensor, logp: torch.Tensor, top_i: torch.Tensor,
            nrm: torch.Tensor | None, zh: torch.Tensor | None, group_size: int, in_batch_negatives: bool,
            temperature: float, gamma: float, reduction: str, need_dq: bool,
            need_dd: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dq, dd = _backward(grad_loss, q, d, pos_idx, lam, lse2, logp, top_i, nrm, zh,
                       (group_size, in_batch_negatives, temperature, gamma, reduction), (need_dq, need_dd))
    return (q.new_empty(0) if dq is None else dq), (d.new_empty(0) if dd is None else dd)


@_bwd_op.register_fake
def _(grad_loss, q, d, pos_idx, lam, lse2, logp, top_i, nrm, zh, group_size, in_batch_negatives, temperature, gamma,
      reduction, need_dq, need_dd):
    return q.new_empty(q.shape if need_dq else 0), d.new_empty(d.shape if need_dd else 0)


def _op_setup(ctx, inputs, output):
    q, d, pos_idx, group_size, in_batch_negatives, temperature, gamma, num_mix, mix_lambda, reduction = inputs
    stats, (lse2, logp, top_i, nrm, zh) = output[1:5], output[5:]
    mixing = num_mix > 0
    ctx.save_for_backward(q, d, pos_idx, mix_lambda if mixing else None, lse2, logp, top_i, nrm if mixing else None,
                          zh if mixing else None)
    ctx.args = (group_size, in_batch_negatives, temperature, gamma, reduction)
    ctx.mark_non_differentiable(*stats, lse2, logp, top_i, nrm, zh)


def _op_backward(ctx, grad_loss, *_other_grads):
    need = ctx.needs_input_grad[:2]
    dq, dd = _bwd_op(grad_loss, *ctx.saved_tensors, *ctx.args, *need)
    return (dq if need[0] else None), (dd if need[1] else None), None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_op_backward, setup_context=_op_setup)


def focal_infonce(q, d, pos_idx, group_size, in_batch_negatives, temperature, gamma, num_mix, mix_lambda, reduction,
                  return_stats):
    """Launcher contract of ``kalm_fast.ops.focal_infonce`` (arguments already checked; mix_lambda (B, M) fp32)."""
    args = (q, d, pos_idx, group_size, in_batch_negatives, temperature, gamma, num_mix, mix_lambda, reduction)
    if torch.compiler.is_compiling():
        loss, *stats = _fwd_op(*args)[:5]
    else:
        loss, *stats = _FocalInfoNCEFunction.apply(*args)
    if not return_stats:
        return loss
    return loss, dict(zip(heads.INFONCE_STATS, stats))
