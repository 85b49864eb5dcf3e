"""What the Triton interpreter cannot see about the launchers (issue 11): the device they launch on, CUDA at import
time, how many compiled variants per-call sizes make, the pinned tables and their reproducibility, 64-bit offsets.

The variant counts use Triton's own binder for an sm_90 target (bench.compile.capture + bind): the specialization
key it returns is the key of the runtime's kernel cache, so equal keys mean one compile. No GPU and no compile needed.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest
import torch
import triton
from conftest import ROOT, import_bench

_compile = import_bench("compile")
TABLED, pinned_key, verdict, _parse_config = (_compile.TABLED, _compile.pinned_key, _compile.verdict,
                                              _compile._parse_config)


# ----------------------------------------------------------------------------------------------------------------
# import time and device
# ----------------------------------------------------------------------------------------------------------------


def test_no_cuda_at_import():
    """Importing the kernel modules calls nothing in torch.cuda (infonce built its configs from the device once)."""
    code = (
        "import torch\n"
        "def boom(*a, **k):\n"
        "    raise RuntimeError('torch.cuda touched at import')\n"
        "for name in ('is_available', 'get_device_capability', 'get_device_properties', 'current_device',"
        " 'device_count', 'init'):\n"
        "    setattr(torch.cuda, name, boom)\n"
        "import kalm_fast.kernels.attention, kalm_fast.kernels.pooling, kalm_fast.kernels.infonce\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


class _OnCuda1(torch.Tensor):
    """A CPU tensor that reports itself as living on cuda:1 (enough for the guard, which only reads these two)."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_input_guard_switches_to_the_inputs_device(monkeypatch):
    from contextlib import contextmanager

    from kalm_fast.kernels import utils

    entered = []

    @contextmanager
    def fake_device(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    seen = []
    launcher = utils.input_guard(lambda a, b=None: seen.append(list(entered)) or "done")
    x = torch.Tensor._make_subclass(_OnCuda1, torch.zeros(3))
    assert launcher(torch.zeros(1), b=x) == "done"
    assert entered == [torch.device("cuda", 1)] and seen == [[torch.device("cuda", 1)]]
    entered.clear()
    launcher(torch.zeros(1))  # CPU inputs: no device switch
    assert entered == []


def test_every_launcher_is_guarded():
    from kalm_fast.kernels import attention, infonce, pooling

    for fn in (attention.flash_attn_varlen_fwd, attention.flash_attn_varlen_bwd, pooling.varlen_mean_pool_fwd,
               pooling.varlen_mean_pool_bwd, infonce.focal_infonce_fwd, infonce.focal_infonce_bwd):
        assert hasattr(fn, "__wrapped__"), f"{fn.__name__} launches without input_guard"


def test_old_interpreter_with_new_numpy_is_a_clear_error(monkeypatch):
    """Triton < 3.7's interpreter beside numpy >= 2.4 (torch 2.11's triton 3.6 with a fresh numpy) fails every launch
    deep inside the interpreter ("only 0-dimensional arrays ..."); the launchers say which versions and what to do."""
    import numpy as np
    import triton

    import kalm_fast
    from kalm_fast.kernels import utils

    for tv, nv in [("3.6.0", "2.4.0"), ("3.0.0", "2.5.2"), ("3.6.1+git0a1b2c", "2.4.0rc1")]:
        msg = utils.interpreter_problem(tv, nv)
        assert msg and tv in msg and nv in msg and "numpy<2.4" in msg and "triton>=3.7" in msg
    for tv, nv in [("3.6.0", "2.3.5"), ("3.7.0", "2.4.6"), ("3.9.0", "2.5.2"), ("4.0.0", "3.0.0")]:
        assert utils.interpreter_problem(tv, nv) is None
    if torch.cuda.is_available():
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("KALM_FAST_BACKEND", "triton")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(np, "__version__", "2.4.6")
    utils._check_interpreter.cache_clear()
    try:
        x = torch.randn(8, 2, 32)
        with pytest.raises(RuntimeError, match=r"triton 3\.6\.0 cannot run with numpy 2\.4\.6"):
            kalm_fast.flash_attn_varlen_func(x, x, x, torch.tensor([0, 8], dtype=torch.int32), 8)
    finally:
        utils._check_interpreter.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_inputs_on_the_second_device():
    import kalm_fast

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    q, k, v = (torch.randn(100, 4, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 40, 100], dtype=torch.int32, device=dev)
    out = kalm_fast.flash_attn_varlen_func(q, k, v, cu, 60)
    ref = kalm_fast.flash_attn_varlen_func(q.cuda(0), k.cuda(0), v.cuda(0), cu.cuda(0), 60)
    assert torch.equal(out.cpu(), ref.cpu())
    h = torch.randn(100, 256, device=dev)
    assert torch.equal(kalm_fast.varlen_mean_pool(h, cu).cpu(), kalm_fast.varlen_mean_pool(h.cuda(0), cu.cuda(0)).cpu())
    qq, dd = torch.randn(8, 64, device=dev), torch.randn(16, 64, device=dev)
    assert torch.equal(kalm_fast.focal_infonce(qq, dd).cpu(), kalm_fast.focal_infonce(qq.cuda(0), dd.cuda(0)).cpu())


# ----------------------------------------------------------------------------------------------------------------
# compiled variants: per-call sizes must not multiply them
# ----------------------------------------------------------------------------------------------------------------


def _counts(variant: dict, sizes: list[dict]) -> dict[str, int]:
    """bench.compile.variant_counts in a fresh process without TRITON_INTERPRET (it needs the real JIT functions)."""
    code = ("import json, sys; from bench.compile import variant_counts; "
            "print(json.dumps(variant_counts(*json.loads(sys.argv[1]))))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code, json.dumps([variant, sizes])], env=env, capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant,sizes", [
    (dict(op="attention", D=128, GROUP=2, dtype="bf16"),
     [dict(lengths=x) for x in ((37, 100), (1,), (16,), (64, 64), (2048, 5, 3), (0, 999))]),
    (dict(op="attention", D=40, GROUP=4, dtype="bf16"),  # GQA partials: split count, heads per split, T vary
     [dict(lengths=x, dkdv_splits=s) for x, s in (((37, 100), 2), ((1,), 3), ((64, 64), 4), ((0, 999), 2))]),
    (dict(op="pooling", H=1024, mask=True, norm="rmsnorm", dtype="bf16"),
     [dict(lengths=x, splits=s) for x, s in (((60, 77), 2), ((1,), 3), ((16, 16), 8), ((500, 3, 7), 5))]),
    (dict(op="infonce", D=1024, num_mix=2, dtype="bf16", in_batch=False),
     [dict(B=b, G=g) for b, g in ((37, 4), (1, 8), (64, 8), (1000, 1), (33, 3))]),
], ids=["attention", "attention-dkdv-splits", "pooling", "infonce"])
def test_one_compiled_variant_per_kernel(variant, sizes):
    """Batch sizes, token counts, group sizes and split counts are runtime bounds (do_not_specialize): one
    specialization per kernel whatever they are (Triton would otherwise compile again for 1, multiples of 16, rest)."""
    counts = _counts(variant, sizes)
    assert counts, "no launch recorded"
    # InfoNCE's row merge serves dq (with the mixing term, NUM_MIX = M) and dd (NUM_MIX = 0): two kernels by design
    uses = {"_infonce_grad_merge_kernel": 2 if variant.get("num_mix") else 1}
    for name, n in counts.items():
        assert n == uses.get(name, 1), f"{name}: {n} compiled variants for {len(sizes)} call sizes"


# ----------------------------------------------------------------------------------------------------------------
# pinned tables
# ----------------------------------------------------------------------------------------------------------------

LIMITS = {"sm_80": 166_912, "sm_90": 232_448, "sm_100": 232_448}


def test_pinned_tables_cover_every_launch():
    from kalm_fast.kernels import attention_configs, infonce_configs

    for arch in LIMITS:
        for kind in ("fwd", "dkdv", "dq"):
            for block_d in (16, 32, 64, 128, 256):
                for dcls in ("16bit", "fp32"):
                    rows = attention_configs.PINNED.get((kind, arch, block_d, dcls))
                    if block_d == 16:  # head dims < 16 are padded to 16 but not promised (SPEC: 32-256)
                        continue
                    assert rows, f"attention {kind} {arch} BLOCK_D={block_d} {dcls}: no pinned config"
                    assert all(r[-1] <= LIMITS[arch] for r in rows)
        for kind in ("fwd", "dq", "dd"):
            for dcls in ("16bit", "fp32"):
                rows = infonce_configs.PINNED.get((kind, arch, dcls))
                assert rows and all(r[-1] <= LIMITS[arch] for r in rows), f"infonce {kind} {arch} {dcls}"


def _committed_tables():
    return sorted((ROOT / "bench" / "results").glob("compile-triton*/compile.jsonl"))


def test_committed_tables_pinned_rows_pass():
    """Every pinned bf16/fp16 row of every committed compile table (the CI's Triton and the GPU machine's 3.6):
    compiled, within the arch's shared memory, zero spill bytes, tensor cores when it multiplies (fp32: exact FMA dots,
    no tensor cores by design; zero spill bytes too). The launcher-fixed kernels (pooling, the attention preprocess,
    merges) spill nothing anywhere."""
    tables = _committed_tables()
    assert len(tables) >= 2, "expected the compile tables of two Triton versions"
    for path in tables:
        rows = _compile.load_rows(path)
        pinned = [r for r in rows if r["pinned"]]
        assert pinned, path
        bad = [(r["kernel"], r["arch"], r["dtype"], r["variant"], r["config"], verdict(r), r["spill_bytes"])
               for r in pinned if verdict(r)]
        assert not bad, f"{path.parent.name}: {bad[:5]}"
        for arch in LIMITS:
            kernels = {r["kernel"] for r in pinned if r["arch"] == arch}
            assert {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_pool_fwd_kernel",
                    "_pool_bwd_kernel", "_infonce_fwd_kernel", "_infonce_dq_kernel", "_infonce_dd_kernel"} <= kernels


def test_committed_pinned_rows_compiled_from_this_source():
    """The facts of every pinned row (both tables) were read off the kernel source of this checkout: each row's
    ``source`` is its kernel's current fingerprint (bench.compile.jit_fingerprint: the kernel and every @triton.jit
    function it calls, constexpr globals included). After a kernel edit, `python -m bench.compile --all-pinned
    --resume` under each Triton version recompiles exactly the rows this lists."""
    for path in _committed_tables():
        stale = collections.Counter(r["kernel"] for r in _compile.load_rows(path)
                                    if r["pinned"] and not _compile.current(r))
        assert not stale, f"{path.parent.name}: pinned rows compiled from other source (rows per kernel): {stale}"


def test_pinned_rows_are_the_tables_first_configs():
    """The pinned config the code launches is the one the committed tables verified (no silent drift)."""
    from kalm_fast.kernels import attention_configs, infonce_configs

    for path in _committed_tables():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if not (r["pinned"] and r["kernel"] in TABLED):
                continue
            op, key, tup = pinned_key(r)
            first = (attention_configs if op == "attention" else infonce_configs).PINNED[key][0]
            assert first[:len(tup)] == tup, (path, r)


def test_every_infonce_plan_row_verified():
    """InfoNCE's launch plan may choose any row of its PINNED table (a smaller tile when the batch cannot fill the
    GPU): every row, fp32 included, compiled in every committed table for every variant of its class that the table
    holds, with zero spill bytes, within shared memory and (16-bit) with tensor cores -- a resident-only row for every
    variant where it runs resident (D <= BLOCK_K), the only ones the plan gives it (``plan_rows``)."""
    from kalm_fast.kernels import infonce_configs

    for path in _committed_tables():
        rows = _compile.load_rows(path)
        seen = {}
        for r in rows:
            if r["kernel"] in TABLED and TABLED[r["kernel"]][1] == "infonce":
                _op, key, tup = pinned_key(r)
                seen.setdefault((key, tup), []).append(r)
                if _compile._runs_resident(r):  # the facts of a resident-only row: where it runs resident
                    seen.setdefault(((*key, "resident"), tup), []).append(r)
        for key, table_rows in infonce_configs.PINNED.items():
            for row in table_rows:
                facts = seen.get((key, tuple(row[:5])))
                assert facts, f"{path.parent.name}: {key} {row[:5]} never compiled"
                bad = [(r["variant"], r["dtype"], verdict(r), r["spill_bytes"]) for r in facts if verdict(r)]
                assert not bad, f"{path.parent.name}: {key} {row[:5]}: {bad[:3]}"


# per SM: 64K registers, 2,048 threads, shared memory (sm_80 164 KB, sm_90 and sm_100 228 KB) with 1 KB reserved
# per block
SM_SHARED = {"sm_80": 167_936, "sm_90": 233_472, "sm_100": 233_472}


def _resident_by_registers(num_warps: int, registers: int) -> int:
    """Programs of ``num_warps`` warps at ``registers`` a thread that fit an SM's 64K registers (allocated in multiples
    of 8 a thread)."""
    return 65536 // (num_warps * 32 * (-(-registers // 8) * 8))


def test_pooling_fits_four_programs_per_sm():
    """Issue 12: the pooling kernels' pinned launches (4 warps, pipelined tile buffers, ptxas's register budget
    ``maxnreg`` from ``pooling._max_registers``) keep 4 resident programs per SM in every committed table --
    registers (allocated in multiples of 8 a thread), threads and shared memory -- the residency behind the planned
    96 KB (bf16) / 128 KB (fp32) of loads in flight per SM (kernels/pooling.py); 3 where the launcher grants 168
    registers (LayerNorm; the fp32 RMSNorm backward on 8-row tiles). ptxas keeps to the budget (registers <= maxnreg
    in every row) and, with it, spills nothing (test_committed_tables_pinned_rows_pass)."""
    from kalm_fast.kernels import pooling

    for path in _committed_tables():
        rows = _compile.load_rows(path)
        pool = [r for r in rows if r["pinned"] and r["kernel"] in ("_pool_fwd_kernel", "_pool_bwd_kernel")]
        assert pool, path
        for r in pool:
            c = _parse_config(r["config"])
            norm = r["variant"].split("norm=")[1].split()[0]
            budget = pooling._max_registers(None if norm == "none" else norm, r["kernel"] == "_pool_bwd_kernel",
                                            c["BLOCK_T"], 4 if r["dtype"] == "fp32" else 2)
            need = 65536 // (128 * budget)  # 4 at 128 registers, 3 at 168
            assert c["num_warps"] == 4 and c["maxnreg"] == budget and r["registers"] <= budget, (path.parent.name, r)
            warps = c["num_warps"]
            resident = min(_resident_by_registers(warps, r["registers"]), 2048 // (warps * 32),
                           SM_SHARED[r["arch"]] // (r["shared_bytes"] + 1024))
            assert resident >= need >= 3, (path.parent.name, resident, r)


def test_fp32_dkdv_register_budget(monkeypatch):
    """The fp32 attention dK/dV on sm_80 launches with ptxas's register budget of two resident programs per SM
    (``attention._max_registers``: 255 a thread at 4 warps, 128 at 8), pinned and autotuned alike, and every such row
    of every committed table was compiled with that budget and kept to it (registers <= maxnreg); without one ptxas
    chose 80 registers there and spilled. sm_90/sm_100, 16-bit and the other kernels launch without a budget (ptxas
    chooses: their committed rows carry no maxnreg)."""
    from kalm_fast.kernels import attention, utils

    budget = attention._max_registers("dkdv", "sm_80", "fp32")
    assert (budget(4), budget(8)) == (255, 128)
    assert all(attention._max_registers(kind, arch, dcls) is None
               for kind in ("fwd", "dkdv", "dq") for arch in ("sm_80", "sm_90", "sm_100") for dcls in ("16bit", "fp32")
               if (kind, arch, dcls) != ("dkdv", "sm_80", "fp32"))
    row, names = (16, 16, 8, 1, 33792), attention.configs.TILE
    assert utils.config_kwargs(names, row, budget)["maxnreg"] == 128
    assert "maxnreg" not in utils.config_kwargs(names, row)
    monkeypatch.setattr(utils, "_TUNERS", {})
    tuner = utils._autotuner("attention", ("dkdv", "sm_80", 128, "fp32"), attention._attn_bwd_dkdv_kernel,
                             [(16, 32, 8, 2, 0), (16, 32, 4, 2, 0)], names, ["HEAD_DIM"], maxnreg=budget)
    assert [c.maxnreg for c in tuner.configs] == [128, 255]
    for path in _committed_tables():
        rows = _compile.load_rows(path)
        attn = [r for r in rows if r["kernel"] in TABLED and TABLED[r["kernel"]][1] == "attention" and r["ok"]]
        budgeted = [r for r in attn if r["kernel"] == "_attn_bwd_dkdv_kernel" and r["dtype"] == "fp32"
                    and r["arch"] == "sm_80"]
        assert any(r["pinned"] for r in budgeted), path
        for r in budgeted:
            c = _parse_config(r["config"])
            assert c["maxnreg"] == budget(c["num_warps"]) and r["registers"] <= c["maxnreg"], (path.parent.name, r)
            assert _resident_by_registers(c["num_warps"], r["registers"]) >= 2, (path.parent.name, r)
        assert not [r for r in attn if r not in budgeted and "maxnreg" in r["config"]], path


def test_two_processes_same_bits(tmp_path):
    """Pinned configs (KALM_FAST_AUTOTUNE unset): two fresh processes give the same bits for all three ops, forward
    and backward. On CPU this runs the interpreter; on a GPU machine (KALM_FAST_TEST_DEVICE=cuda) the compiled
    kernels with the pinned tiles."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    code = f"""
import hashlib, torch, kalm_fast
torch.manual_seed(0)
dev = "{device}"
dt = torch.bfloat16 if dev == "cuda" else torch.float32
q, k, v = (torch.randn(300, 4, 64, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
cu = torch.tensor([0, 100, 300], dtype=torch.int32, device=dev)
o = kalm_fast.flash_attn_varlen_func(q, k, v, cu, 200)
h = torch.randn(300, 256, device=dev, dtype=dt, requires_grad=True)
p = kalm_fast.varlen_mean_pool(h, cu)
a, b = torch.randn(16, 64, device=dev, dtype=dt, requires_grad=True), torch.randn(64, 64, device=dev, dtype=dt,
                                                                                 requires_grad=True)
loss = kalm_fast.focal_infonce(a, b, num_mix=2, gamma=1.0)
(o.float().square().sum() + p.float().sum() + loss).backward()
m = hashlib.sha256()
for t in (o, p, loss, q.grad, k.grad, v.grad, h.grad, a.grad, b.grad):
    m.update(t.detach().float().cpu().numpy().tobytes())
print(m.hexdigest())
"""
    env = {k: v for k, v in os.environ.items() if k != "KALM_FAST_AUTOTUNE"}
    env["KALM_FAST_BACKEND"] = "triton"
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    digests = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        digests.append(r.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]


# ----------------------------------------------------------------------------------------------------------------
# 64-bit offsets (GPU: T * H * D >= 2**31 needs > 8 GB of inputs, too much for the CPU interpreter)
# ----------------------------------------------------------------------------------------------------------------


def _check_last_sequences(q: torch.Tensor, L: int, Hkv: int = 2):
    """Sequences of L tokens over q's T rows (bf16, CUDA), random k and v with Hkv heads: the last two sequences of
    the kernel's output equal the reference on them (the 2e-2 bf16 bound of the GPU tests)."""
    import kalm_fast
    from kalm_fast import reference

    T, D = q.shape[0], q.shape[2]
    k, v = (torch.randn(T, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu = torch.arange(0, T + 1, L, dtype=torch.int32, device="cuda")
    out = kalm_fast.flash_attn_varlen_func(q, k, v, cu, L)
    s = T - 2 * L
    one = torch.tensor([0, L, 2 * L], dtype=torch.int32, device="cuda")
    ref = reference.flash_attn_varlen_func(q[s:].float(), k[s:].float(), v[s:].float(), one, L)
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert (out[s:].float() - ref).abs().max().item() < 2e-2


@pytest.mark.gpu
def test_gpu_64bit_offsets_attention():
    """T * Hq * D = 2**31 + ...: the last sequences sit past element 2**31 of q; compared with the reference on them."""
    Hq, D, L = 16, 128, 1024
    T = ((2**31 // (Hq * D)) // L + 2) * L
    _check_last_sequences(torch.randn(T, Hq, D, device="cuda", dtype=torch.bfloat16), L)


def test_head_offsets_past_2_31_get_a_contiguous_layout():
    """The attention kernels' head offsets (head * head stride) are 32-bit: a (T, H, D) view of an (H, T, D) tensor
    (the model's hook for one packed row) with (H - 1) * T * D >= 2**31 is copied contiguous before the launch; below
    that, and for the contiguous layout at any T, it is launched as it is (meta tensors: no memory)."""
    from kalm_fast.kernels.attention import launch_layout

    H, D = 16, 128
    big = 2**31 // ((H - 1) * D) + 1
    view = torch.empty(H, big, D, device="meta").transpose(0, 1)
    assert not view.is_contiguous() and launch_layout(view).is_contiguous()
    small = torch.empty(H, big - 2, D, device="meta").transpose(0, 1)
    assert launch_layout(small) is small
    flat = torch.empty(4 * big, H, D, device="meta")
    assert launch_layout(flat) is flat


@pytest.mark.gpu
def test_gpu_head_offsets_past_2_31_attention():
    """A (T, Hq, D) view of an (Hq, T, D) tensor whose last head starts past element 2**31: the last sequences are
    compared with the reference."""
    Hq, D, L = 16, 128, 1024
    T = (2**31 // ((Hq - 1) * D) // L + 2) * L
    _check_last_sequences(torch.randn(Hq, T, D, device="cuda", dtype=torch.bfloat16).transpose(0, 1), L)


@pytest.mark.gpu
def test_gpu_64bit_offsets_pooling():
    import kalm_fast

    H, L = 4096, 4096
    B = 2**31 // (H * L) + 2
    h = torch.randn(B * L, H, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(0, B * L + 1, L, dtype=torch.int32, device="cuda")
    out = kalm_fast.varlen_mean_pool(h, cu)
    ref = torch.nn.functional.normalize(h[-L:].float().mean(0), dim=0)
    assert (out[-1].float() - ref).abs().max().item() < 1e-2


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_100"])
def test_autotuner_builds_for_every_tabled_kernel(monkeypatch, arch):
    """KALM_FAST_AUTOTUNE=1 wraps each tabled kernel in ``triton.autotune(key=...)`` on its first launch; every key name
    must be an argument of that kernel (Triton >= 3.7 raises ValueError when building the tuner otherwise: the InfoNCE
    dq kernel's key once named NUM_TOP and NUM_MIX, which only the forward takes, so the first dq launch of an autotuned
    run failed). Built through the launchers' own ``_launchable`` with the device facts stubbed: no GPU needed."""
    from kalm_fast.kernels import attention, infonce, utils

    monkeypatch.setenv("KALM_FAST_AUTOTUNE", "1")
    monkeypatch.setattr(utils, "_TUNERS", {})
    for module in (attention, infonce):
        monkeypatch.setattr(module, "device_arch", lambda device: arch)
    monkeypatch.setattr(attention, "pick", lambda table, key, device: table[key][0])
    built = 0
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.zeros(4, 64, dtype=dtype)
        for kind in ("fwd", "dkdv", "dq"):
            tuner = attention._launchable(kind, x, 64)
            assert set(attention._AUTOTUNE_KEY) <= set(tuner.fn.arg_names), kind
            built += isinstance(tuner, triton.runtime.Autotuner)
        for kind in infonce.configs.KINDS:
            key = (kind, arch, utils.dtype_class(dtype))
            tuner = infonce._launchable(kind, x, infonce.configs.PINNED[key][0])
            assert set(infonce._AUTOTUNE_KEYS[kind]) <= set(tuner.fn.arg_names), kind
            built += isinstance(tuner, triton.runtime.Autotuner)
    assert built == 12


def test_sm80_tables_launch_on_99_kb_gpus(monkeypatch):
    """The sm_80 rows also serve sm_86/89/120 (RTX 30/40/50, A10, L4, L40: ``device_arch``), which opt in to 99 KB of
    shared memory a block, not the A100's 163 KB. Every sm_80 key of every table keeps a compile-verified row within
    that (the search looks for one: bench.compile.SMALL_SHARED_MEMORY), and ``pick`` / ``plan_rows`` launch it there
    (the attention dQ at D = 128 once had only a 112 KB row: an OutOfResources on every such GPU)."""
    from kalm_fast.kernels import attention_configs, infonce_configs, utils

    small = _compile.SMALL_SHARED_MEMORY["sm_80"]
    assert small == 99 * 1024
    monkeypatch.setattr(utils, "shared_memory_optin", lambda device: small)
    for table in (attention_configs.PINNED, infonce_configs.PINNED):
        for key, rows in table.items():
            if key[1] == "sm_80" and key[-1] != "resident":
                assert min(r[-1] for r in rows) <= small, (key, rows)
                assert utils.pick(table, key, torch.device("cpu"))[-1] <= small, key
    for kind in infonce_configs.KINDS:
        for dcls in ("16bit", "fp32"):
            for D in (64, 256, 1024):
                assert all(r[-1] <= small for r in infonce_configs.plan_rows((kind, "sm_80", dcls), D, small))
    assert utils.pick(attention_configs.PINNED, ("dq", "sm_80", 128, "16bit"), None) == (64, 32, 4, 4, 86016)
