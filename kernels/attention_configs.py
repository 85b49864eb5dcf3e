"""Configs of the attention kernels (kernels/attention.py): the candidate tiles ``python -m bench.compile --search``
compiles, the PINNED table of compile-verified configs (written by ``python -m bench.compile --pin``) and the launch
plan of the dK/dV pass (a pure function of host integers: every process and rank launches the same grid). Nothing
here touches CUDA at import time."""

from __future__ import annotations

import triton

TILE = ("BLOCK_M", "BLOCK_N")  # the tile sizes of a row, then num_warps, num_stages, shared memory bytes

# Candidate tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) that ``python -m bench.compile --search`` compiles for
# sm_80 and sm_90. Forward and dQ own BLOCK_M query rows and loop over BLOCK_N keys; dK/dV owns BLOCK_N keys and loops
# over BLOCK_M queries (small BLOCK_M keeps its two [BLOCK_N, BLOCK_D] accumulators in registers).
CANDIDATES = {
    "fwd": [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 4), (128, 64, 4, 3), (128, 32, 4, 4),
            (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2)],
    "dkdv": [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3), (32, 128, 4, 4), (32, 128, 8, 2), (64, 64, 4, 3),
             (64, 64, 4, 2), (32, 64, 4, 4), (32, 64, 4, 3), (32, 64, 8, 2), (16, 64, 8, 2), (16, 64, 4, 3), (32, 32, 8, 2), (16, 32, 8, 2),
             (16, 32, 4, 2)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 4), (128, 32, 8, 4), (128, 32, 4, 3), (64, 64, 4, 3),
           (64, 64, 4, 2), (64, 32, 4, 4), (64, 32, 4, 3), (32, 32, 4, 2)],
}

# fp32 (exact FMA dots, no tensor cores): the FMA dot holds both operand tiles in registers at four bytes an element,
# so the 16-bit candidates spill at D >= 128 (32 x 32 at 4 warps: 244-2,420 B at D = 128); small tiles, more warps.
CANDIDATES_FP32 = {
    "fwd": [(32, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 2), (16, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2),
            (16, 16, 4, 1)],
    "dkdv": [(16, 32, 8, 2), (16, 32, 4, 2), (16, 16, 8, 2), (16, 16, 4, 2), (16, 16, 8, 1), (16, 16, 4, 1)],
    "dq": [(32, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 2), (16, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2),
           (16, 16, 4, 1)],
}

# one big tile under the interpreter: its cost grows with programs x loop iterations, not with tile size
INTERPRETER_TILES = {"fwd": (128, 128, 4, 1), "dkdv": (128, 128, 4, 1), "dq": (128, 128, 4, 1)}

# (kind, arch, BLOCK_D, dtype class) -> configs (BLOCK_M, BLOCK_N, num_warps, num_stages, shared memory bytes) that
# compiled for the arch with zero spill bytes, tensor cores and shared memory within the arch's opt-in limit, under
# the CI's Triton and under Triton 3.6, best first: the first is the pinned config (the default), the rest are what
# KALM_FAST_AUTOTUNE=1 tunes over. Written by ``python -m bench.compile --pin`` from the committed compile tables.
# BEGIN PINNED
PINNED = {
    ('dkdv', 'sm_100', 128, '16bit'): [(16, 64, 8, 2, 57536), (32, 32, 8, 2, 35072)],
    ('dkdv', 'sm_100', 128, 'fp32'): [(16, 16, 4, 1, 33792)],
    ('dkdv', 'sm_100', 256, '16bit'): [(16, 32, 8, 2, 50304)],
    ('dkdv', 'sm_100', 256, 'fp32'): [(16, 16, 8, 2, 66688)],
    ('dkdv', 'sm_100', 32, '16bit'): [(32, 128, 8, 3, 33344), (32, 128, 8, 2, 28992)],
    ('dkdv', 'sm_100', 32, 'fp32'): [(16, 32, 4, 2, 14464), (16, 32, 8, 2, 14464), (16, 16, 4, 2, 9344)],
    ('dkdv', 'sm_100', 64, '16bit'): [(32, 128, 8, 3, 66112)],
    ('dkdv', 'sm_100', 64, 'fp32'): [(16, 32, 4, 2, 26752)],
    ('dkdv', 'sm_80', 128, '16bit'): [(32, 64, 8, 2, 53504), (16, 64, 8, 2, 43136)],
    ('dkdv', 'sm_80', 128, 'fp32'): [(16, 16, 8, 1, 33792)],
    ('dkdv', 'sm_80', 256, '16bit'): [(32, 32, 8, 2, 67840), (16, 32, 8, 2, 50304)],
    ('dkdv', 'sm_80', 256, 'fp32'): [(16, 16, 4, 1, 66560)],
    ('dkdv', 'sm_80', 32, '16bit'): [(64, 128, 8, 3, 33792), (64, 128, 8, 2, 25088)],
    ('dkdv', 'sm_80', 32, 'fp32'): [(16, 32, 4, 2, 14464), (16, 32, 8, 2, 14464)],
    ('dkdv', 'sm_80', 64, '16bit'): [(32, 128, 8, 3, 49664), (32, 128, 8, 2, 41216)],
    ('dkdv', 'sm_80', 64, 'fp32'): [(16, 32, 8, 2, 26752)],
    ('dkdv', 'sm_90', 128, '16bit'): [(32, 64, 8, 2, 65792), (16, 64, 8, 2, 49280)],
    ('dkdv', 'sm_90', 128, 'fp32'): [(16, 16, 4, 1, 33792)],
    ('dkdv', 'sm_90', 256, '16bit'): [(16, 32, 8, 2, 50304)],
    ('dkdv', 'sm_90', 256, 'fp32'): [(16, 16, 8, 2, 66688)],
    ('dkdv', 'sm_90', 32, '16bit'): [(64, 128, 8, 3, 41984), (64, 128, 8, 2, 33280)],
    ('dkdv', 'sm_90', 32, 'fp32'): [(16, 32, 8, 2, 14464), (16, 16, 4, 2, 9344)],
    ('dkdv', 'sm_90', 64, '16bit'): [(64, 128, 8, 2, 66048), (32, 128, 8, 3, 57856)],
    ('dkdv', 'sm_90', 64, 'fp32'): [(16, 32, 8, 2, 26752), (16, 16, 4, 2, 17536)],
    ('dq', 'sm_100', 128, '16bit'): [(128, 64, 8, 3, 181248), (128, 64, 8, 2, 148480)],
    ('dq', 'sm_100', 128, 'fp32'): [(16, 32, 4, 2, 51200)],
    ('dq', 'sm_100', 256, '16bit'): [(32, 32, 4, 2, 67584)],
    ('dq', 'sm_100', 256, 'fp32'): [(16, 32, 8, 2, 100352), (16, 16, 4, 2, 66560)],
    ('dq', 'sm_100', 32, '16bit'): [(128, 64, 8, 3, 45568), (128, 64, 8, 2, 37376)],
    ('dq', 'sm_100', 32, 'fp32'): [(32, 32, 4, 2, 20480), (32, 32, 8, 2, 20480)],
    ('dq', 'sm_100', 64, '16bit'): [(128, 64, 8, 3, 91136), (128, 64, 8, 2, 74752)],
    ('dq', 'sm_100', 64, 'fp32'): [(32, 32, 4, 2, 36864), (32, 32, 8, 2, 36864)],
    ('dq', 'sm_80', 128, '16bit'): [(128, 32, 8, 4, 114688), (64, 32, 4, 4, 86016)],
    ('dq', 'sm_80', 128, 'fp32'): [(32, 16, 4, 2, 51200), (16, 32, 8, 2, 51200)],
    ('dq', 'sm_80', 256, '16bit'): [(64, 32, 4, 3, 135168), (32, 32, 4, 2, 67584)],
    ('dq', 'sm_80', 256, 'fp32'): [(16, 32, 8, 2, 100352), (16, 16, 4, 2, 66560)],
    ('dq', 'sm_80', 32, '16bit'): [(128, 64, 8, 2, 24576), (128, 32, 4, 4, 28672)],
    ('dq', 'sm_80', 32, 'fp32'): [(32, 32, 4, 2, 20480), (32, 32, 8, 2, 20480)],
    ('dq', 'sm_80', 64, '16bit'): [(128, 64, 8, 3, 65536), (128, 64, 8, 2, 49152)],
    ('dq', 'sm_80', 64, 'fp32'): [(32, 32, 4, 2, 36864), (32, 32, 8, 2, 36864)],
    ('dq', 'sm_90', 128, '16bit'): [(128, 64, 8, 3, 163840), (128, 64, 8, 2, 131072)],
    ('dq', 'sm_90', 128, 'fp32'): [(32, 32, 8, 2, 69632), (16, 32, 4, 2, 51200)],
    ('dq', 'sm_90', 256, '16bit'): [(32, 32, 4, 2, 67584)],
    ('dq', 'sm_90', 256, 'fp32'): [(16, 32, 8, 2, 100352), (16, 16, 4, 2, 66560)],
    ('dq', 'sm_90', 32, '16bit'): [(128, 64, 8, 3, 40960), (128, 64, 8, 2, 32768)],
    ('dq', 'sm_90', 32, 'fp32'): [(32, 32, 4, 2, 20480), (32, 32, 8, 2, 20480)],
    ('dq', 'sm_90', 64, '16bit'): [(128, 64, 8, 3, 81920), (128, 64, 8, 2, 65536)],
    ('dq', 'sm_90', 64, 'fp32'): [(32, 32, 4, 2, 36864), (32, 32, 8, 2, 36864)],
    ('fwd', 'sm_100', 128, '16bit'): [(128, 128, 8, 3, 230400), (128, 128, 8, 2, 164864), (128, 64, 8, 3, 132096), (64, 64, 4, 3, 115712)],
    ('fwd', 'sm_100', 128, 'fp32'): [(16, 32, 8, 2, 43072), (16, 16, 4, 2, 25664)],
    ('fwd', 'sm_100', 256, '16bit'): [(32, 32, 4, 2, 51200)],
    ('fwd', 'sm_100', 256, 'fp32'): [(16, 32, 8, 2, 84032), (16, 16, 4, 2, 50240)],
    ('fwd', 'sm_100', 32, '16bit'): [(128, 128, 8, 3, 58368), (128, 128, 8, 2, 41984)],
    ('fwd', 'sm_100', 32, 'fp32'): [(32, 32, 4, 2, 16384), (32, 32, 8, 2, 16384)],
    ('fwd', 'sm_100', 64, '16bit'): [(128, 128, 8, 3, 115712), (128, 128, 8, 2, 82944)],
    ('fwd', 'sm_100', 64, 'fp32'): [(32, 32, 4, 2, 28800), (32, 32, 8, 2, 28800)],
    ('fwd', 'sm_80', 128, '16bit'): [(64, 32, 4, 3, 53248), (64, 32, 4, 2, 36864)],
    ('fwd', 'sm_80', 128, 'fp32'): [(32, 32, 8, 2, 53248), (32, 16, 4, 2, 34944)],
    ('fwd', 'sm_80', 256, '16bit'): [(32, 32, 4, 2, 51200)],
    ('fwd', 'sm_80', 256, 'fp32'): [(16, 32, 8, 2, 84032), (16, 16, 4, 2, 50240)],
    ('fwd', 'sm_80', 32, '16bit'): [(128, 128, 8, 3, 40960), (128, 128, 8, 2, 24576)],
    ('fwd', 'sm_80', 32, 'fp32'): [(32, 32, 4, 2, 16384), (32, 32, 8, 2, 16384)],
    ('fwd', 'sm_80', 64, '16bit'): [(128, 128, 8, 3, 81920)],
    ('fwd', 'sm_80', 64, 'fp32'): [(32, 32, 4, 2, 28800), (32, 32, 8, 2, 28800)],
    ('fwd', 'sm_90', 128, '16bit'): [(128, 64, 8, 3, 131072), (64, 64, 4, 3, 114688)],
    ('fwd', 'sm_90', 128, 'fp32'): [(16, 32, 8, 2, 43072), (16, 16, 4, 2, 25664)],
    ('fwd', 'sm_90', 256, '16bit'): [(64, 32, 4, 3, 131072), (64, 32, 4, 2, 98304)],
    ('fwd', 'sm_90', 256, 'fp32'): [(16, 32, 8, 2, 84032), (16, 16, 4, 2, 50240)],
    ('fwd', 'sm_90', 32, '16bit'): [(128, 128, 8, 3, 57344), (128, 128, 8, 2, 40960)],
    ('fwd', 'sm_90', 32, 'fp32'): [(32, 32, 4, 2, 16384), (32, 32, 8, 2, 16384)],
    ('fwd', 'sm_90', 64, '16bit'): [(128, 128, 8, 3, 114688), (128, 128, 8, 2, 81920)],
    ('fwd', 'sm_90', 64, 'fp32'): [(32, 32, 4, 2, 28800), (32, 32, 8, 2, 28800)],
}
# END PINNED


WAVES = 2  # dK/dV grids under this many waves of programs get per-query-head partials (dkdv_plan)


def dkdv_plan(T: int, B: int, max_seqlen: int, Hkv: int, group: int, block_n: int, num_sms: int) -> dict:
    """Launch plan of the dK/dV pass, from host integers only (pure).

    One program per (key block, kv head, sequence) has work; their number is at most
    ``min(cdiv(max_seqlen, block_n) * B, cdiv(T, block_n) + B) * Hkv`` (each sequence's blocks, the last one partial).
    When even that bound is under WAVES waves (``WAVES * num_sms`` programs) and the group has more than one query
    head, each (key block, kv head) gets one program per query head (``group`` splits) writing fp32 partials that
    ``_attn_bwd_dkdv_reduce_kernel`` adds in head order. (Splits of several heads each looped over a runtime range of
    heads, which spilled 12-52 bytes at the pinned tiles on sm_90: per-head programs have no head loop.)
    Returns dict(splits (1 or group), programs (upper bound, splits included), waves).
    """
    blocks = min(triton.cdiv(max_seqlen, block_n) * B, triton.cdiv(T, block_n) + B) if B else 0
    programs = blocks * Hkv
    splits = group if 0 < programs < WAVES * num_sms and group > 1 else 1
    return dict(splits=splits, programs=programs * splits, waves=programs * splits / max(num_sms, 1))
