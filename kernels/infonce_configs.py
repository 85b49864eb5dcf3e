"""Configs of the InfoNCE kernels (kernels/infonce.py): the candidate tiles ``python -m bench.compile --search``
compiles, the PINNED table of compile-verified configs (written by ``python -m bench.compile --pin``) and the launch
plan that picks a row and the number of splits per pass (pure functions of the shapes and the SM count, so every
process and rank launches the same tiles). Nothing here touches CUDA at import time.

Launch plan (``grid_plan``): one program per block of queries would leave an H100 (132 SMs) nearly idle at the
recipe's B = 512 (4-8 programs), so every pass splits its looped dimension into contiguous runs of whole tiles until it
launches >= 2 programs per SM (or every tile is a program), choosing a smaller tile from the pinned table when the
large one cannot get there; the splits write partials that a small kernel merges in split order 0, 1, ... -- the same
bits every run, no atomics. A batch that fills the GPU by itself keeps one split.
"""

from __future__ import annotations

import os

import torch

from kalm_fast.kernels.utils import device_arch, dtype_class, num_sms, pick, shared_memory_optin

KINDS = ("fwd", "dq", "dd")  # the tabled passes: forward, dq, dd
TILE = ("BLOCK_M", "BLOCK_N", "BLOCK_K")  # the tile sizes of a row, then num_warps, num_stages, shared memory bytes

# Candidate tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) that ``python -m bench.compile --search`` compiles
# per arch: 32 fp32 scores per thread (128 x 64 tiles on 8 warps) stay near 180-230 registers, 64 per thread
# (128 x 128 on 8 warps) reach 255; a long looped dimension (BLOCK_N for the forward and dq, BLOCK_M for dd)
# amortizes the scratch read-modify-write. sm_90 has 228 KiB of shared memory per SM: one more stage than sm_80.
# The search keeps the best passing config of every (tile size, BLOCK_K): ``grid_plan`` picks a smaller tile when the
# large one cannot give every SM two programs, and a BLOCK_K >= D lets the backward keep its accumulator on chip
# (``resident``: BLOCK_K 128 and 256 serve the recipe's Matryoshka dims 64-256).
CANDIDATES = {
    arch: [(128, 128, 64, 8, s), (64, 128, 64, 8, s), (128, 64, 64, 8, s), (128, 64, 128, 8, s - 1),
           (64, 128, 128, 8, s - 1), (64, 256, 64, 8, s - 1), (256, 64, 64, 8, s - 1), (64, 64, 64, 4, s),
           (64, 64, 128, 4, s - 1), (64, 64, 256, 8, 2), (64, 64, 32, 4, s - 1), (32, 64, 256, 8, 2),
           (32, 64, 32, 4, 2)]
    for arch, s in (("sm_80", 3), ("sm_90", 4))
}
# fp32 (exact FMA dots, no tensor cores): small tiles only, larger ones spill; 8 warps or one stage keep the forward
# with mixing clean on sm_90/sm_100
CANDIDATES_FP32 = [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2), (32, 32, 32, 8, 2), (32, 32, 32, 4, 2), (32, 32, 32, 4, 1),
                   (16, 32, 32, 4, 2)]
# one big tile under the interpreter (its cost ~ programs x loop iterations)
_INTERPRETER_CONFIG = (64, 128, 64, 4, 1, 0)  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, smem)

# (kind, arch, dtype class) -> configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, shared memory bytes) that
# compiled for the arch with zero spill bytes, tensor cores and shared memory within the arch's opt-in limit, under
# the CI's Triton and under Triton 3.6, best first: the first is the pinned config (the default), the rest are what
# KALM_FAST_AUTOTUNE=1 tunes over. (kind, arch, dtype class, "resident") -> configs that pass that bar wherever they
# run resident (every compiled D <= BLOCK_K) but not streaming a larger D (a wide BLOCK_K slice next to the streamed
# accumulator spills): the launch plan offers them only at D <= BLOCK_K (``plan_rows``), the autotuner never.
# Written by ``python -m bench.compile --pin`` from the committed compile tables.
# BEGIN PINNED
PINNED = {
    ('dd', 'sm_100', '16bit'): [(32, 64, 32, 4, 2, 12304)],
    ('dd', 'sm_100', '16bit', 'resident'): [(64, 128, 64, 8, 4, 60448), (64, 64, 256, 8, 2, 132128), (64, 64, 64, 4, 4, 52256), (32, 64, 256, 8, 2, 82464)],
    ('dd', 'sm_100', 'fp32'): [(32, 64, 32, 4, 2, 20480), (32, 32, 32, 4, 2, 8192), (16, 32, 32, 4, 2, 6144)],
    ('dd', 'sm_80', '16bit'): [(128, 64, 128, 8, 2, 67584), (64, 128, 64, 8, 3, 65536), (64, 64, 256, 8, 2, 74752), (64, 64, 128, 4, 2, 41984), (64, 64, 64, 4, 3, 32768), (64, 64, 32, 4, 2, 20480), (32, 64, 256, 8, 2, 53760), (32, 64, 32, 4, 2, 14336)],
    ('dd', 'sm_80', 'fp32'): [(32, 64, 32, 4, 2, 20480), (32, 32, 32, 4, 2, 8192), (16, 32, 32, 4, 2, 6144)],
    ('dd', 'sm_90', '16bit'): [(64, 128, 64, 8, 4, 98304), (64, 64, 64, 4, 4, 65536), (64, 64, 32, 4, 3, 24576), (32, 64, 256, 8, 2, 102400), (32, 64, 32, 4, 2, 12288)],
    ('dd', 'sm_90', 'fp32'): [(32, 64, 32, 4, 2, 20480), (32, 32, 32, 4, 2, 8192), (16, 32, 32, 4, 2, 6144)],
    ('dq', 'sm_100', '16bit'): [(64, 64, 64, 4, 4, 65552), (64, 64, 32, 4, 3, 24592), (32, 64, 256, 8, 2, 53248), (32, 64, 32, 4, 2, 12288)],
    ('dq', 'sm_100', 'fp32'): [(32, 64, 32, 4, 2, 16384), (32, 32, 32, 4, 2, 8192), (16, 32, 32, 4, 2, 6144)],
    ('dq', 'sm_80', '16bit'): [(64, 64, 64, 4, 3, 32768), (64, 64, 32, 4, 2, 20480), (32, 64, 32, 4, 2, 12288)],
    ('dq', 'sm_80', '16bit', 'resident'): [(64, 64, 256, 8, 2, 73728), (64, 64, 128, 4, 2, 40960)],
    ('dq', 'sm_80', 'fp32'): [(32, 64, 32, 4, 2, 16384), (32, 32, 32, 4, 2, 8192), (16, 32, 32, 4, 2, 6144)],
    ('dq', 'sm_90', '16bit'): [(64, 64, 64, 4, 4, 65536), (64, 64, 32, 4, 3, 24576), (32, 64, 256, 8, 2, 53248), (32, 64, 32, 4, 2, 12288)],
    ('dq', 'sm_90', '16bit', 'resident'): [(64, 64, 256, 8, 2, 98304)],
    ('dq', 'sm_90', 'fp32'): [(32, 64, 32, 4, 2, 16384), (32, 32, 32, 4, 2, 8192), (16, 32, 32, 4, 2, 6144)],
    ('fwd', 'sm_100', '16bit'): [(32, 64, 32, 4, 2, 6144)],
    ('fwd', 'sm_100', 'fp32'): [(32, 32, 32, 4, 1, 8192)],
    ('fwd', 'sm_80', '16bit'): [(64, 128, 64, 8, 3, 49152), (32, 64, 32, 4, 2, 6144)],
    ('fwd', 'sm_80', 'fp32'): [(32, 64, 32, 4, 2, 12288), (32, 32, 32, 4, 2, 8192), (16, 32, 32, 4, 2, 6144)],
    ('fwd', 'sm_90', '16bit'): [(128, 64, 128, 8, 3, 147456), (64, 128, 64, 8, 4, 98304), (64, 64, 256, 8, 2, 131072), (64, 64, 128, 4, 3, 98304), (64, 64, 64, 4, 4, 65536), (64, 64, 32, 4, 3, 24576)],
    ('fwd', 'sm_90', 'fp32'): [(32, 32, 32, 8, 2, 8192)],
}
# END PINNED

# ----------------------------------------------------------------------------------------------------------------
# launch plan: how many programs each pass launches (issue 12: fill the GPU)
# ----------------------------------------------------------------------------------------------------------------

PROGRAMS_PER_SM = 2  # every pass launches at least this many programs per SM whenever B * N allows


def _tiles_per_block(kind: str, B: int, N: int, tile: tuple, group_size: int, in_batch_negatives: bool) -> tuple:
    """(blocks, tiles of the looped dimension per block) of a pass: the forward and dq own BLOCK_M queries and loop
    over tiles of BLOCK_N rows of d, dd owns BLOCK_N rows of d and loops over blocks of BLOCK_M queries. Without
    in-batch negatives a query block only meets the rows of its groups (about BLOCK_M * G of them)."""
    bm, bn = tile
    if kind == "dd":
        span = B if in_batch_negatives else min(B, -(-bn // max(1, group_size)) + 1)
        return -(-N // bn), max(1, -(-span // bm))
    span = N if in_batch_negatives else min(N, bm * group_size + bn)
    return -(-B // bm), max(1, -(-span // bn))


def grid_plan(B: int, N: int, D: int, num_sms: int, *, group_size: int = 1, in_batch_negatives: bool = True,
              tiles: dict | None = None) -> dict:
    """The launch plan of the loss for B queries, N documents of dim D on a GPU with ``num_sms`` SMs (pure: the same
    plan in every process and rank for the same shapes, so the results are bitwise reproducible).

    Per pass ("fwd", "dq", "dd"): the tile (BLOCK_M, BLOCK_N) -- the first of ``tiles[kind]`` (best first; default:
    the sm_90 16-bit rows of PINNED) that can give ``PROGRAMS_PER_SM * num_sms`` programs, else the one that gives the
    most -- and the number of splits of the looped dimension (the forward and dq split the rows of d, dd the query
    blocks): the fewest that bring blocks x splits to that target, each a balanced run of whole tiles. Returns
    {"<kind>_tile", "<kind>_splits", "<kind>_programs"} for the three passes (merges excluded), "target" and
    "partial_bytes": the fp32 partials of the backward, 4 * D * (dq_splits * B + dd_splits * N). A pass splits only
    when blocks < target, and then has splits * B < (target + blocks) * BLOCK_M partial rows (dd: N, BLOCK_N): under
    2 * target * BLOCK * D * 4 bytes whatever B and N (the forward's partials are O(splits * B * M))."""
    if num_sms < 1:
        raise ValueError(f"num_sms must be >= 1, got {num_sms}")
    if tiles is None:
        tiles = {kind: [row[:2] for row in PINNED[(kind, "sm_90", "16bit")]] for kind in KINDS}
    target = PROGRAMS_PER_SM * num_sms
    plan = {"target": target}
    for kind in KINDS:
        options = [(t, *_tiles_per_block(kind, B, N, t, group_size, in_batch_negatives)) for t in tiles[kind]]
        fit = [o for o in options if o[1] * o[2] >= target]
        tile, blocks, per_block = fit[0] if fit else max(options, key=lambda o: o[1] * o[2])
        splits = min(per_block, -(-target // blocks))  # balanced runs of whole tiles (``_split_range``)
        plan.update({f"{kind}_tile": tuple(tile), f"{kind}_splits": splits, f"{kind}_programs": blocks * splits})
    plan["partial_bytes"] = 4 * D * (plan["dq_splits"] * B + plan["dd_splits"] * N)
    return plan


def plan_rows(key: tuple, D: int, smem: int) -> list[tuple]:
    """Configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, smem) of PINNED[key] a pass at embedding dim D may
    run on a device with ``smem`` bytes of opt-in shared memory, best first: the rows that fit (none fits: the
    smallest, as ``pick``), then the key's resident-only rows that hold D in one slice and fit."""
    rows = PINNED[key]
    fitting = [r for r in rows if r[-1] <= smem] or [min(rows, key=lambda r: r[-1])]
    return fitting + [r for r in PINNED.get((*key, "resident"), ()) if resident(D, r[2]) and r[-1] <= smem]


def tile_rows(kind: str, x: torch.Tensor) -> list[tuple]:
    """``plan_rows`` for x (B, D) on its device; one big tile under the interpreter."""
    arch = device_arch(x.device)
    if arch == "interpreter":
        return [_INTERPRETER_CONFIG]
    key = (kind, arch, dtype_class(x.dtype))
    if x.device.type != "cuda":  # the compile capture: the row it compiles (bench.compile patches ``pick``)
        return [pick(PINNED, key, x.device)]
    return plan_rows(key, x.shape[1], shared_memory_optin(x.device))


def prefetch() -> bool:
    """Whether the streaming backward loads the next fp32 accumulator slice before each slice's dot (the default;
    kernels/infonce.py ``_accumulate_slices``). KALM_FAST_INFONCE_PREFETCH=0 turns it off: the bench's A/B, the same
    dots and bits either way. Read at each launch."""
    return os.environ.get("KALM_FAST_INFONCE_PREFETCH", "1") != "0"


def resident(D: int, block_k: int) -> bool:
    """Whether a pass with BLOCK_K ``block_k`` keeps its rows on chip: the whole embedding fits one slice (the
    kernels' RESIDENT path: the program's own rows loaded once, each tile of the other operand read once for both
    dots, and in the backward no read-modify-write of the fp32 partial)."""
    return block_k >= D


def launch_plan(q: torch.Tensor, N: int, group_size: int, in_batch_negatives: bool) -> tuple[dict, dict]:
    """(grid_plan for q's device, {kind: the chosen config row}); off CUDA num_sms is 1: two programs per pass, so
    every CPU test runs the split-and-merge path. The rows that keep the embedding on chip at this D (``resident``)
    come first, in table order."""
    rows = {kind: tile_rows(kind, q) for kind in KINDS}
    B, D = q.shape
    for kind in KINDS:
        rows[kind] = sorted(rows[kind], key=lambda r: not resident(D, r[2]))
    plan = grid_plan(B, N, D, num_sms(q.device), group_size=group_size, in_batch_negatives=in_batch_negatives,
                     tiles={kind: [r[:2] for r in rows[kind]] for kind in KINDS})
    return plan, {kind: next(r for r in rows[kind] if tuple(r[:2]) == plan[f"{kind}_tile"]) for kind in KINDS}


def visit_order(pos_idx: torch.Tensor, in_batch_negatives: bool):
    """(positives in visiting order, query order) -- sorted by positive without in-batch negatives (stable argsort:
    a query block then spans few rows of d), the natural order otherwise (the order array is then unused)."""
    pos_idx = pos_idx.contiguous()
    if in_batch_negatives:
        return pos_idx, pos_idx
    order = torch.argsort(pos_idx, stable=True)
    return pos_idx[order].contiguous(), order
