"""Fused masked mean pooling over packed sequences: [final RMSNorm/LayerNorm ->] masked mean [-> L2 normalize].

hidden (T, H) packed, cu_seqlens int32 (B+1,), optional pooling mask (T,) (non-zero = pooled token) -> (B, H).
Forward and backward each read the hidden states once; the backward also writes dhidden once.

Grid and memory access. A program owns one (sequence, token split) pair and walks its token range in
[BLOCK_T, BLOCK_H] tiles with BLOCK_H = next_pow2(H) covering whole rows. Whole rows because RMSNorm/LayerNorm
need sum(x) and sum(x^2) over the full row of every token: a program per (sequence, H block) would have to get the
statistics from other programs (a second read of the row or a separate statistics pass). Rows are contiguous, so a
tile is one contiguous span of BLOCK_T * H elements: fully coalesced, vectorized loads. Parallelism comes from the
token axis instead: when B alone cannot fill the GPU, each sequence is cut into ``num_splits`` token ranges
(flash-decoding's split-KV), chosen from B, T and the SM count without a host sync; the partial sums
(B, num_splits, H) fp32 are added in split order by a small combine kernel, so results are deterministic.

Keeping HBM busy (planned, from the compile facts in bench/results/compile-triton*/): a tile is 4,096 elements at
4 warps (32 per thread), and the token loop is software-pipelined (``tl.range(..., num_stages=NUM_STAGES)``: the
row loads become 16-byte cp.async copies into NUM_STAGES - 1 shared-memory buffers, issued that many tiles ahead).
The pooling mask is applied after the row load (``tl.where`` on the loaded tile), so the row load never waits on the
mask load; rows of unpooled tokens are read and discarded (they are instruction tokens: a few percent of the bytes).
NUM_STAGES gives each program 24 KB (bf16: 4 stages, 3 buffers of 8 KB) or 32 KB (fp32: 3 stages, 2 of 16 KB) of
tiles in flight, and four programs fit an SM (4 x 33 KB of shared memory within sm_80's 164 KB; the launcher targets
4 programs per SM): 96 KB (bf16) / 128 KB (fp32) in flight per SM, against ~32 KB before (two 8-warp programs holding
one 16 KB tile each in registers). Registers are the other limit, so the launcher gives ptxas the budget of that
residency (``maxnreg``, ``_max_registers``): 128 a thread at 4 warps for 4 programs, 168 for 3 where the kernel needs
more -- LayerNorm (x, x_hat, u and dx live at once in the backward: 146-168 registers uncapped; the forward under
Triton 3.6 up to 158) and Triton 3.6's fp32 RMSNorm backward on 8 x 512 tiles (H <= 512: 164 uncapped, 4 B of spill
under 128), 72 KB (bf16) in flight. Uncapped, ptxas chose fewer registers and spilled instead (Triton 3.6: 24 B in
the masked LayerNorm forward on sm_100 at 96 registers, 12 B in the fp16 RMSNorm backward on sm_80 at 72; 3.9: 4-8 B
in the fp32 LayerNorm forward on sm_100); with the budget no pooling kernel spills in either version. A fifth bf16
stage spilled 4 bytes under Triton 3.6 on sm_80 (RMSNorm forward). By Little's law an H200 (4.8 TB/s over 132 SMs,
~1 us loaded latency) needs ~36 KB per SM.

Saved for the backward: p_hat (B, H) fp32, the mean over valid tokens of the normalized rows *before* the affine
weight/bias, and the valid-token count n (B,) fp32. Per-token mean/rstd are not stored: the backward must read x
anyway (x_hat enters dx), so recomputing them costs no bytes, while storing them would cost a write and a read.

Backward derivation, per sequence with valid tokens V, n = |V|, x_hat_t the normalized row (x_t without a norm),
p_hat = (1/n) sum_{t in V} x_hat_t, p = w * p_hat + beta * [n > 0] (= mean of the normed rows y_t = w * x_hat_t + beta),
o = p / max(||p||, eps2) and g = dL/do:
  1. L2 normalize: with nu = ||p||, dp = (g - o (o . g)) / nu when nu > eps2; below it o = p / eps2 and dp = g / eps2.
     Without normalize dp = g. A sequence with n = 0 outputs constant zeros: dp := 0.
  2. Affine: the mean hands every valid token the same dL/dy_t = dp / n, so
     dw = sum_b sum_{t in V_b} (dp_b / n_b) * x_hat_t = sum_b dp_b * p_hat_b and dbeta = sum_b dp_b: the token sum
     was already done by the forward. The kernel writes dp (B, H) fp32 and torch reduces over b (deterministic).
  3. Mean: u = (dp / n) * w = dL/dx_hat_t, the same vector for every t in V; tokens outside V get dx = 0.
  4. RMSNorm: x_hat = x r, r = (mean(x^2) + eps)^(-1/2), dr/dx_j = -r^3 x_j / H  =>  dx = r (u - x_hat mean(u x_hat)).
  5. LayerNorm: x_hat = (x - mu) r, r = (var + eps)^(-1/2)  =>  dx = r (u - mean(u) - x_hat mean(u x_hat)).
  6. No norm: dx = u; x is not read at all.

Layers (Liger-Kernel style): Triton kernels -> plain launchers ``varlen_mean_pool_fwd``/``varlen_mean_pool_bwd`` -> ``_VarlenMeanPoolFunction``
-> ``varlen_mean_pool`` (called by ``kalm_fast.ops`` after its input checks; inputs are trusted here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kalm_fast.heads import L2_EPS
from kalm_fast.kernels.utils import input_guard, interpreting, next_power_of_2, num_sms, register_budget

_NORM_CODE = {None: 0, "rmsnorm": 1, "layernorm": 2}

# Elements of one [BLOCK_T, BLOCK_H] tile: 4096 at 4 warps is 32 fp32 registers a thread for the tile (and as many
# for the forward accumulator), so four programs fit an SM's 64K registers. The interpreter's cost is per tile
# operation, not per element, so it gets far bigger tiles.
_TILE_ELEMS = 4096
_TILE_ELEMS_INTERPRET = 65536
# Shared memory for the pipelined token loop's tile buffers, per program: with NUM_STAGES stages Triton keeps
# NUM_STAGES - 1 tiles in flight, each in its own buffer. 32 KB a program leaves four programs per SM within sm_80's
# 164 KB: NUM_STAGES = 1 + 32 KB // tile bytes within 2..4, bf16 4 stages (8 KB tiles: 5 spilled under Triton 3.6),
# fp32 3 stages (16 KB tiles).
_STAGE_BYTES = 32 * 1024
# Split sequences until there are this many programs per SM (B alone is often below the SM count at inference) ...
_PROGRAMS_PER_SM = 4
# ... but keep at least this many tiles per split on an average sequence: shorter splits cost more (partials write,
# program start-up, the combine) than their parallelism gains.
_MIN_TILES_PER_SPLIT = 4


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _split_range(cu_ptr, seq, split, num_splits, BLOCK_T: tl.constexpr):
    """Token range [lo, hi) of split ``split`` of sequence ``seq``: equal shares in whole tiles (hi < lo: empty)."""
    start = tl.load(cu_ptr + seq)
    end = tl.load(cu_ptr + seq + 1)
    per = tl.cdiv(tl.cdiv(end - start, num_splits), BLOCK_T) * BLOCK_T
    lo = start + split * per
    hi = tl.minimum(lo + per, end)
    return lo, hi


@triton.jit
def _pooled(mask_ptr, offs_t, in_range, HAS_MASK: tl.constexpr):
    """[BLOCK_T] bool: token inside the range and, with a mask, pooled. Applied to rows already loaded: the row load
    does not wait on this one."""
    if HAS_MASK:
        return in_range & (tl.load(mask_ptr + offs_t, mask=in_range, other=0) != 0)
    return in_range


@triton.jit
def _normalize_rows(x, hmask, H, eps, NORM: tl.constexpr):
    """x [BLOCK_T, BLOCK_H] fp32, zero outside the row -> (x_hat [BLOCK_T, BLOCK_H], r [BLOCK_T]) without the affine
    part. NORM 1 = RMSNorm, 2 = LayerNorm. An all-zero row (invalid token) gives x_hat = 0."""
    if NORM == 1:
        r = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)
        x_hat = x * r[:, None]
    else:
        mu = tl.sum(x, axis=1) / H
        xc = tl.where(hmask[None, :], x - mu[:, None], 0.0)
        r = tl.rsqrt(tl.sum(xc * xc, axis=1) / H + eps)
        x_hat = xc * r[:, None]
    return x_hat, r


@triton.jit
def _affine(p_hat, n, offs_h, hmask, w_ptr, bias_ptr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """p = w * p_hat + bias * [n > 0], [BLOCK_H] fp32 (a sequence without valid tokens pools to 0, bias included)."""
    p = p_hat
    if HAS_W:
        p = p * tl.load(w_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
    if HAS_B:
        p = p + tl.where(n > 0, tl.load(bias_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32), 0.0)
    return p


@triton.jit
def _finalize(psum, n, seq, offs_h, hmask, H, w_ptr, bias_ptr, out_ptr, phat_ptr, cnt_ptr, l2_eps,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, NORMALIZE: tl.constexpr):
    """psum [BLOCK_H] = sum of x_hat over the valid tokens, n their count -> out, p_hat and n stored for row seq."""
    p_hat = psum / tl.maximum(n, 1.0)
    p = _affine(p_hat, n, offs_h, hmask, w_ptr, bias_ptr, HAS_W, HAS_B)
    if NORMALIZE:
        p = p / tl.maximum(tl.sqrt(tl.sum(p * p, axis=0)), l2_eps)
    tl.store(out_ptr + seq * H + offs_h, p.to(out_ptr.dtype.element_ty), mask=hmask)
    tl.store(phat_ptr + seq * H + offs_h, p_hat, mask=hmask)
    tl.store(cnt_ptr + seq, n)


@triton.jit(do_not_specialize=["num_splits"])  # chosen per call from B and T
def _pool_fwd_kernel(
    x_ptr, cu_ptr, mask_ptr, w_ptr, bias_ptr,  # (T, H), (B+1,) int32, (T,) | None, (H,) | None, (H,) | None
    out_ptr, phat_ptr, cnt_ptr,  # without SPLIT: (B, H) in x's dtype, (B, H) fp32, (B,) fp32
    part_ptr, pcnt_ptr,  # with SPLIT: partial sums (B, num_splits, H) fp32 and counts (B, num_splits) fp32
    H, stride_x, num_splits, eps, l2_eps,
    NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    NORMALIZE: tl.constexpr, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    seq = tl.program_id(0)
    split = tl.program_id(1)
    lo, hi = _split_range(cu_ptr, seq, split, num_splits, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    # per tile row sums of x_hat, reduced over tokens once after the loop (no cross-thread reduction per tile)
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in tl.range(lo, hi, BLOCK_T, num_stages=NUM_STAGES):  # NUM_STAGES - 1 tiles in flight (cp.async)
        offs_t = t0 + tl.arange(0, BLOCK_T)
        in_range = offs_t < hi
        # fp32 right after the load: the norm statistics need it, and the interpreter's bf16 arithmetic is wrong
        x = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * stride_x + offs_h[None, :],
                    mask=in_range[:, None] & hmask[None, :], other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_H]
        valid = _pooled(mask_ptr, offs_t, in_range, HAS_MASK)
        if NORM != 0:
            x, _ = _normalize_rows(x, hmask, H, eps, NORM)
        acc += tl.where(valid[:, None], x, 0.0)
        cnt += valid.to(tl.float32)
    psum = tl.sum(acc, axis=0)  # [BLOCK_H]
    n = tl.sum(cnt, axis=0)
    if SPLIT:
        tl.store(part_ptr + (seq * num_splits + split) * H + offs_h, psum, mask=hmask)
        tl.store(pcnt_ptr + seq * num_splits + split, n)
    else:
        _finalize(psum, n, seq, offs_h, hmask, H, w_ptr, bias_ptr, out_ptr, phat_ptr, cnt_ptr, l2_eps,
                  HAS_W, HAS_B, NORMALIZE)


@triton.jit(do_not_specialize=["num_splits"])  # chosen per call from B and T
def _pool_fwd_combine_kernel(
    part_ptr, pcnt_ptr, w_ptr, bias_ptr, out_ptr, phat_ptr, cnt_ptr,
    H, num_splits, l2_eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program per sequence: add the split partials in split order (deterministic), then finalize."""
    seq = tl.program_id(0)
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    base = seq * num_splits
    psum = tl.load(part_ptr + base * H + offs_h, mask=hmask, other=0.0)
    n = tl.load(pcnt_ptr + base)
    for split in range(1, num_splits):
        psum += tl.load(part_ptr + (base + split) * H + offs_h, mask=hmask, other=0.0)
        n += tl.load(pcnt_ptr + base + split)
    _finalize(psum, n, seq, offs_h, hmask, H, w_ptr, bias_ptr, out_ptr, phat_ptr, cnt_ptr, l2_eps,
              HAS_W, HAS_B, NORMALIZE)


@triton.jit(do_not_specialize=["num_splits"])  # chosen per call from B and T
def _pool_bwd_kernel(
    x_ptr, cu_ptr, mask_ptr, w_ptr, bias_ptr,  # as in the forward
    phat_ptr, cnt_ptr, g_ptr,  # saved p_hat (B, H) fp32, n (B,) fp32; grad of the output (B, H)
    dx_ptr, dp_ptr,  # dx (T, H) in x's dtype when WRITE_DX; dp (B, H) fp32 when WRITE_DP
    H, stride_x, stride_dx, stride_g, num_splits, eps, l2_eps,
    NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    NORMALIZE: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    seq = tl.program_id(0)
    split = tl.program_id(1)
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    n = tl.load(cnt_ptr + seq)
    g = tl.load(g_ptr + seq * stride_g + offs_h, mask=hmask, other=0.0).to(tl.float32)
    # step 1 of the derivation: dp = dL/dp
    if NORMALIZE:
        p_hat = tl.load(phat_ptr + seq * H + offs_h, mask=hmask, other=0.0)
        p = _affine(p_hat, n, offs_h, hmask, w_ptr, bias_ptr, HAS_W, HAS_B)
        nu = tl.sqrt(tl.sum(p * p, axis=0))
        nu_c = tl.maximum(nu, l2_eps)
        o = p / nu_c
        dp = tl.where(nu > l2_eps, g - o * tl.sum(o * g, axis=0), g) / nu_c
    else:
        dp = g
    dp = tl.where(n > 0, dp, 0.0)
    # step 2: the per-sequence partials of dw and dbias are dp (* p_hat, done by torch); split 0 writes them.
    # Two ifs: WRITE_DP is a compile-time switch (dp_ptr is None without it), split == 0 a runtime test.
    if WRITE_DP:  # noqa: SIM102
        if split == 0:
            tl.store(dp_ptr + seq * H + offs_h, dp, mask=hmask)
    if WRITE_DX:
        # step 3: u = dL/dx_hat, shared by every valid token of the sequence
        u = dp / tl.maximum(n, 1.0)
        if HAS_W:
            u = u * tl.load(w_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
        if NORM == 2:
            u_mean = tl.sum(u, axis=0) / H
        lo, hi = _split_range(cu_ptr, seq, split, num_splits, BLOCK_T)
        for t0 in tl.range(lo, hi, BLOCK_T, num_stages=NUM_STAGES):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            in_range = offs_t < hi
            rows = offs_t.to(tl.int64)[:, None]
            if NORM == 0:  # step 6
                valid = _pooled(mask_ptr, offs_t, in_range, HAS_MASK)
                dx = tl.where(valid[:, None], u[None, :], 0.0)
            else:
                x = tl.load(x_ptr + rows * stride_x + offs_h[None, :],
                            mask=in_range[:, None] & hmask[None, :], other=0.0).to(tl.float32)
                valid = _pooled(mask_ptr, offs_t, in_range, HAS_MASK)
                x_hat, r = _normalize_rows(x, hmask, H, eps, NORM)
                c = tl.sum(u[None, :] * x_hat, axis=1) / H  # mean(u * x_hat) per token, [BLOCK_T]
                if NORM == 1:  # step 4
                    dx = r[:, None] * (u[None, :] - x_hat * c[:, None])
                else:  # step 5
                    dx = r[:, None] * (u[None, :] - u_mean - x_hat * c[:, None])
                dx = tl.where(valid[:, None], dx, 0.0)
            tl.store(dx_ptr + rows * stride_dx + offs_h[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=in_range[:, None] & hmask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# launchers (usable outside autograd)
# ----------------------------------------------------------------------------------------------------------------


def _tile(H: int, block_t: int | None, elem_size: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, num_warps, num_stages) for hidden size H and hidden's element size in bytes; ``block_t``
    (a power of two) overrides the heuristic."""
    block_h = next_power_of_2(H)
    if block_t is None:
        budget = _TILE_ELEMS_INTERPRET if interpreting() else _TILE_ELEMS
        block_t = max(1, budget // block_h)
    elif block_t < 1 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two, got {block_t}")
    num_warps = min(16, max(4, block_t * block_h // 1024))
    num_stages = min(4, max(2, 1 + _STAGE_BYTES // (block_t * block_h * elem_size)))
    return block_t, block_h, num_warps, num_stages


# Registers a thread at 4 warps for 4 (128) and 3 (168) resident programs per SM; handed to ptxas as ``maxnreg``.
_REGS_4_PROGRAMS = register_budget(4, 4)
_REGS_3_PROGRAMS = register_budget(3, 4)


def _max_registers(norm: str | None, backward: bool, block_t: int, elem_size: int) -> int:
    """ptxas's register budget for a pooling launch: 4 programs per SM, 3 for the kernels the compile tables show
    need more than 128 registers (module docstring): LayerNorm, and the fp32 RMSNorm backward on tiles of 8+ rows."""
    if norm == "layernorm" or (backward and norm == "rmsnorm" and elem_size == 4 and block_t >= 8):
        return _REGS_3_PROGRAMS
    return _REGS_4_PROGRAMS


def _num_splits(B: int, T: int, block_t: int, device: torch.device) -> int:
    """Token splits per sequence (host-side integers only: no sync). 1 off CUDA, where programs run one by one."""
    if device.type != "cuda" or B == 0:
        return 1
    target = _PROGRAMS_PER_SM * num_sms(device)
    cap = max(1, T // (B * _MIN_TILES_PER_SPLIT * block_t))
    return max(1, min(triton.cdiv(target, B), cap))


def _flags(norm, mask, weight, bias, normalize) -> dict:
    return dict(NORM=_NORM_CODE[norm], HAS_MASK=mask is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                NORMALIZE=bool(normalize))


@input_guard
def varlen_mean_pool_fwd(hidden, cu_seqlens, mask, norm, weight, bias, eps, normalize, *, num_splits=None, block_t=None):
    """Forward launcher. hidden (T, H) with unit stride along H, cu_seqlens int32 (B+1,), mask (T,) int/uint8 or
    None, weight/bias (H,) or None. Returns out (B, H) in hidden's dtype, p_hat (B, H) fp32 and count (B,) fp32."""
    T, H = hidden.shape
    B = cu_seqlens.numel() - 1
    BLOCK_T, BLOCK_H, num_warps, num_stages = _tile(H, block_t, hidden.element_size())
    splits = num_splits or _num_splits(B, T, BLOCK_T, hidden.device)
    regs = _max_registers(norm, False, BLOCK_T, hidden.element_size())
    out = hidden.new_empty(B, H)
    p_hat = torch.empty(B, H, dtype=torch.float32, device=hidden.device)
    count = torch.empty(B, dtype=torch.float32, device=hidden.device)
    if B == 0:
        return out, p_hat, count
    flags = _flags(norm, mask, weight, bias, normalize)
    if splits == 1:
        _pool_fwd_kernel[(B, 1)](
            hidden, cu_seqlens, mask, weight, bias, out, p_hat, count, None, None,
            H, hidden.stride(0), 1, eps, L2_EPS,
            SPLIT=False, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, NUM_STAGES=num_stages, num_warps=num_warps, maxnreg=regs,
            **flags,
        )
        return out, p_hat, count
    part = torch.empty(B, splits, H, dtype=torch.float32, device=hidden.device)
    pcnt = torch.empty(B, splits, dtype=torch.float32, device=hidden.device)
    _pool_fwd_kernel[(B, splits)](
        hidden, cu_seqlens, mask, weight, bias, None, None, None, part, pcnt,
        H, hidden.stride(0), splits, eps, L2_EPS,
        SPLIT=True, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, NUM_STAGES=num_stages, num_warps=num_warps, maxnreg=regs,
        **flags,
    )
    _pool_fwd_combine_kernel[(B,)](
        part, pcnt, weight, bias, out, p_hat, count, H, splits, L2_EPS,
        HAS_W=flags["HAS_W"], HAS_B=flags["HAS_B"], NORMALIZE=flags["NORMALIZE"], BLOCK_H=BLOCK_H, num_warps=4,
    )
    return out, p_hat, count


@input_guard
def varlen_mean_pool_bwd(grad_out, hidden, cu_seqlens, mask, norm, weight, bias, eps, normalize, p_hat, count, *,
              need_dx=True, need_dw=True, need_db=True, num_splits=None, block_t=None):
    """Backward launcher: grad_out (B, H) and the forward's inputs and saved p_hat/count -> (dx | None, dw | None,
    db | None), dx (T, H) in hidden's dtype, dw/db in the dtypes of weight/bias."""
    T, H = hidden.shape
    B = cu_seqlens.numel() - 1
    need_dw = need_dw and weight is not None
    need_db = need_db and bias is not None
    if not (need_dx or need_dw or need_db):
        return None, None, None
    BLOCK_T, BLOCK_H, num_warps, num_stages = _tile(H, block_t, hidden.element_size())
    splits = (num_splits or _num_splits(B, T, BLOCK_T, hidden.device)) if need_dx else 1
    dx = torch.empty(T, H, dtype=hidden.dtype, device=hidden.device) if need_dx else None
    dp = torch.empty(B, H, dtype=torch.float32, device=hidden.device) if (need_dw or need_db) else None
    if B > 0:
        _pool_bwd_kernel[(B, splits)](
            hidden, cu_seqlens, mask, weight, bias, p_hat, count, grad_out, dx, dp,
            H, hidden.stride(0), H, grad_out.stride(0), splits, eps, L2_EPS,
            WRITE_DX=need_dx, WRITE_DP=dp is not None, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, NUM_STAGES=num_stages,
            num_warps=num_warps, maxnreg=_max_registers(norm, True, BLOCK_T, hidden.element_size()),
            **_flags(norm, mask, weight, bias, normalize),
        )
    elif dp is not None:
        dp.zero_()
    dw = (dp * p_hat).sum(0).to(weight.dtype) if need_dw else None  # step 2: sum_b dp_b * p_hat_b
    db = dp.sum(0).to(bias.dtype) if need_db else None
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------


def _backward(grad_out, hidden, cu_seqlens, mask, weight, bias, p_hat, count, config, need):
    """(dx, dw, db), None where not needed (one body for eager autograd and the custom op)."""
    norm, eps, normalize, num_splits, block_t = config
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    return varlen_mean_pool_bwd(grad_out, hidden, cu_seqlens, mask, norm, weight, bias, eps, normalize, p_hat, count,
                                need_dx=need[0], need_dw=need[1], need_db=need[2], num_splits=num_splits,
                                block_t=block_t)


class _VarlenMeanPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, cu_seqlens, mask, weight, bias, norm, eps, normalize, num_splits, block_t):
        out, p_hat, count = varlen_mean_pool_fwd(hidden, cu_seqlens, mask, norm, weight, bias, eps, normalize,
                                      num_splits=num_splits, block_t=block_t)
        ctx.save_for_backward(hidden, cu_seqlens, mask, weight, bias, p_hat, count)
        ctx.config = (norm, eps, normalize, num_splits, block_t)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        need = ctx.needs_input_grad
        dx, dw, db = _backward(grad_out, *ctx.saved_tensors, ctx.config, (need[0], need[3], need[4]))
        return dx, None, None, dw, db, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# torch.compile: the launchers as custom ops (why: kalm_fast.kernels.attention, same section)
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("kalm_fast::varlen_mean_pool_fwd", mutates_args=())
def _fwd_op(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor | None,
            bias: torch.Tensor | None, norm: str | None, eps: float, normalize: bool, num_splits: int | None,
            block_t: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return varlen_mean_pool_fwd(hidden, cu_seqlens, mask, norm, weight, bias, eps, normalize, num_splits=num_splits,
                                block_t=block_t)


@_fwd_op.register_fake
def _(hidden, cu_seqlens, mask, weight, bias, norm, eps, normalize, num_splits, block_t):
    B, H = cu_seqlens.shape[0] - 1, hidden.shape[1]
    return (hidden.new_empty(B, H), hidden.new_empty(B, H, dtype=torch.float32),
            hidden.new_empty(B, dtype=torch.float32))


@torch.library.custom_op("kalm_fast::varlen_mean_pool_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, hidden: torch.Tensor, cu_seqlens: torch.Tensor, mask: torch.Tensor | None,
            weight: torch.Tensor | None, bias: torch.Tensor | None, p_hat: torch.Tensor, count: torch.Tensor,
            norm: str | None, eps: float, normalize: bool, num_splits: int | None, block_t: int | None,
            need_dx: bool, need_dw: bool, need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _backward(grad_out, hidden, cu_seqlens, mask, weight, bias, p_hat, count,
                      (norm, eps, normalize, num_splits, block_t), (need_dx, need_dw, need_db))
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)  # an op returns tensors: (0,) = none


@_bwd_op.register_fake
def _(grad_out, hidden, cu_seqlens, mask, weight, bias, p_hat, count, norm, eps, normalize, num_splits, block_t,
      need_dx, need_dw, need_db):
    need_dw, need_db = need_dw and weight is not None, need_db and bias is not None
    return (hidden.new_empty(hidden.shape) if need_dx else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_dw else hidden.new_empty(0),
            bias.new_empty(bias.shape) if need_db else hidden.new_empty(0))


def _op_setup(ctx, inputs, output):
    hidden, cu_seqlens, mask, weight, bias, norm, eps, normalize, num_splits, block_t = inputs
    _, p_hat, count = output
    ctx.save_for_backward(hidden, cu_seqlens, mask, weight, bias, p_hat, count)
    ctx.config = (norm, eps, normalize, num_splits, block_t)
    ctx.mark_non_differentiable(p_hat, count)


def _op_backward(ctx, grad_out, _dp_hat, _dcount):
    saved, need = ctx.saved_tensors, ctx.needs_input_grad  # saved: hidden, cu_seqlens, mask, weight, bias, ...
    need = (need[0], need[3] and saved[3] is not None, need[4] and saved[4] is not None)
    grads = _bwd_op(grad_out, *saved, *ctx.config, *need)
    dx, dw, db = (g if wanted else None for g, wanted in zip(grads, need))
    return dx, None, None, dw, db, None, None, None, None, None


_fwd_op.register_autograd(_op_backward, setup_context=_op_setup)


def varlen_mean_pool(hidden, cu_seqlens, mask=None, norm=None, norm_weight=None, norm_bias=None, eps=1e-6,
                normalize=True, *, num_splits=None, block_t=None):
    """Fused [norm ->] masked mean [-> L2 normalize] over packed sequences (inputs checked by ``kalm_fast.ops``).

    hidden (T, H) fp16/bf16/fp32, cu_seqlens int32 (B+1,) with cu_seqlens[-1] == T, mask (T,) bool/int or None
    (non-zero = pooled), norm None | "rmsnorm" | "layernorm", norm_weight/norm_bias (H,) or None. Returns (B, H) in
    hidden's dtype, differentiable w.r.t. hidden, norm_weight and norm_bias. ``num_splits`` (token splits per
    sequence) and ``block_t`` (tokens per tile, a power of two) override the launch heuristics (tests, tuning).
    """
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if mask is not None:
        mask = (mask.view(torch.uint8) if mask.dtype == torch.bool else mask).contiguous()
    args = (hidden, cu_seqlens, mask, norm_weight, norm_bias, norm, float(eps), bool(normalize), num_splits, block_t)
    if torch.compiler.is_compiling():
        return _fwd_op(*args)[0]
    return _VarlenMeanPoolFunction.apply(*args)
