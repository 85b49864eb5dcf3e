"""Compile facts without a GPU: every launched Triton kernel of kalm_fast compiled for sm_80, sm_90 and sm_100.

    python -m bench.compile                 # pinned configs x every variant, every arch (the table the README shows)
    python -m bench.compile --search        # every candidate config x one variant per class (what --pin chooses from)
    python -m bench.compile --pin           # rewrite kernels/*_configs.py PINNED tables from the committed tables
    python -m bench.compile --smoke         # pinned configs of a few variants, sm_80 + sm_90 (a few minutes)
    python -m bench.compile --reduced       # the pinned matrix cut to fit 2 cores (what the committed tables hold)
    python -m bench.compile --estimate      # compiles and seconds a cold GPU process spends on the pinned configs
    python -m bench.compile --warm --arch sm_90 --jobs 10   # fill Triton's kernel cache (TRITON_CACHE_DIR) for the
                                            # GPU tests' and the bench's launches, in parallel (gpu_session.sh)
    --resume skips rows already in the table (compiled from the current kernel source); --arch/--op/--kernel narrow
    any mode; --jobs N parallel processes.

How a compile mirrors the runtime: the real launcher (``flash_attn_varlen_fwd``, ``varlen_mean_pool_fwd``,
``focal_infonce_bwd``, ...) is called on small CPU tensors with ``JITFunction.run`` replaced by a recorder, so the
arguments are exactly the launcher's; they are bound by the kernel's own binder for a ``GPUTarget`` (Triton's runtime
specialization: 16-divisible pointers and integers, ``do_not_specialize``), and the result goes to ``triton.compile`` as
the runtime would send it.
Registers and spill stores come from the ``ptxas -v`` log of that compile, shared memory from the kernel's metadata,
tensor-core instructions from ``cuobjdump -sass`` (HGMMA on sm_90, HMMA on sm_80, UTC*MMA on sm_100). Identical
specializations (a D that is only a runtime bound, say) are compiled once and reported for each variant.

Rows go to bench/results/compile-triton<version>/compile.jsonl (replacing rows with the same key) and compile.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import hashlib
import importlib
import itertools
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import git_sha

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def _mount_kernels():
    """Before ``pip install -e .`` (the GPU session compiles first): map kernels/ to kalm_fast.kernels, as setup.py
    does, so the compile needs no build."""
    import importlib.util

    try:
        importlib.import_module("kalm_fast.kernels")
    except ImportError:
        spec = importlib.util.spec_from_file_location("kalm_fast.kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["kalm_fast.kernels"] = module
        spec.loader.exec_module(module)


_mount_kernels()
ARCHS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}
SHARED_MEMORY_OPTIN = {"sm_80": 166_912, "sm_90": 232_448, "sm_100": 232_448}
# The sm_80 table also serves the GPUs of other majors with mma.sync tensor cores (``device_arch``): sm_86, sm_89 and
# sm_120 (RTX 30/40/50, A10, L4, L40) opt in to 99 KB a block. The search keeps a passing sm_80 config within it for
# every class, so ``pick`` finds a row that launches there.
SMALL_SHARED_MEMORY = {"sm_80": 101_376}


def table_arch(arch: str) -> str:
    """The arch whose candidate tiles and PINNED rows are the candidates on ``arch``: sm_100 (Blackwell) starts from
    sm_90's (the same 227 KiB of shared memory per block); ``--pin`` keeps those that pass on sm_100 itself."""
    return "sm_90" if arch == "sm_100" else arch
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# kernels whose tiles come from a table (kind, file); the others take the launcher's fixed launch parameters
TABLED = {"_attn_fwd_kernel": ("fwd", "attention"), "_attn_bwd_dkdv_kernel": ("dkdv", "attention"),
          "_attn_bwd_dq_kernel": ("dq", "attention"), "_infonce_fwd_kernel": ("fwd", "infonce"),
          "_infonce_dq_kernel": ("dq", "infonce"), "_infonce_dd_kernel": ("dd", "infonce")}
PAUSE_FILE = os.environ.get("KALM_FAST_COMPILE_PAUSE_FILE", "")  # while it exists, no new compile starts


# ----------------------------------------------------------------------------------------------------------------
# variants: what the launchers are called with
# ----------------------------------------------------------------------------------------------------------------


def attention_variants(head_dims=(32, 40, 64, 80, 96, 128, 256), groups=(1, 7), dtypes=("bf16", "fp16", "fp32"),
                       dkdv_splits=(1, 7)):
    """D = 40: a head stride that is not a multiple of 16 (16-byte loads through stride units). dkdv_splits > 1: the
    dK/dV pass with GQA partials (the count is a runtime argument: any split > 1 is the same compile)."""
    return [dict(op="attention", D=D, GROUP=g, dtype=dt, **({"dkdv_splits": s} if s > 1 else {}))
            for D, g, dt, s in itertools.product(head_dims, groups, dtypes, dkdv_splits) if s == 1 or s <= g]


def pooling_variants(hidden=(384, 896, 1024, 4096), dtypes=("bf16", "fp16", "fp32")):
    out = []
    for H, mask, norm, dt, split in itertools.product(hidden, (False, True), (None, "rmsnorm", "layernorm"), dtypes,
                                                      (1, 4)):
        out.append(dict(op="pooling", H=H, mask=mask, norm=norm, dtype=dt, splits=split))
    return out


def infonce_variants(dims=(64, 128, 256, 896, 1024), mixes=(0, 2), dtypes=("bf16", "fp16", "fp32"),
                     in_batch=(True, False)):
    """D is a runtime bound, except that the backward keeps its accumulator on chip where D <= BLOCK_K: 64, 128 and
    256 compile that path for the 64-, 128- and 256-wide configs, 896 and 1024 the streaming one."""
    return [dict(op="infonce", D=D, num_mix=m, dtype=dt, in_batch=ib)
            for D, m, dt, ib in itertools.product(dims, mixes, dtypes, in_batch)]


def variant_name(v: dict) -> str:
    if v["op"] == "attention":
        return (f"D={v['D']} GROUP={v['GROUP']}" + (f" dkdv_splits={v['dkdv_splits']}" if "dkdv_splits" in v else "")
                + (f" Hkv={v['Hkv']}" if "Hkv" in v else "") + (" dlse=0" if v.get("dlse") is False else ""))
    if v["op"] == "pooling":
        return f"H={v['H']} mask={int(v['mask'])} norm={v['norm'] or 'none'} splits={v['splits']}"
    return f"D={v['D']} num_mix={v['num_mix']} in_batch={int(v['in_batch'])}"


def variant_class(kernel: str, v: dict):
    """Key of the pinned table a (kernel, variant) reads (None for kernels with fixed launch parameters)."""
    if kernel not in TABLED:
        return None
    kind, op = TABLED[kernel]
    dcls = "fp32" if v["dtype"] == "fp32" else "16bit"
    if op == "attention":
        return (kind, _table_block_d(v["D"]), dcls)
    return (kind, dcls)


def _table_block_d(D: int) -> int:
    """BLOCK_D of attention's PINNED keys for head dim D: the next power of two, at least 32 (the launcher's rule,
    ``attention._launchable``: D < 32 borrows the D=32 tiles)."""
    return max(32, 1 << (D - 1).bit_length())


# ----------------------------------------------------------------------------------------------------------------
# capture: run a launcher on CPU tensors with JITFunction.run recording instead of launching
# ----------------------------------------------------------------------------------------------------------------


def capture(v: dict, arch: str, config: tuple | None):
    """[(jit_function, args, kwargs)] of every kernel launch the launcher makes for variant v on ``arch``; tabled
    kernels get ``config`` (a row of the PINNED table without its shared-memory column), or the pinned row."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["KALM_FAST_AUTOTUNE"] = "0"
    import torch
    import triton
    from triton.runtime.jit import JITFunction

    from kalm_fast.kernels import attention, infonce, pooling

    launches = []
    real_run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    def fake_pick(table, key, device):  # the arch's own pinned row, else the row it starts from (table_arch)
        if config is not None:
            return (*config, 0)
        return table[_arch_key(table, key[0], arch, key[1:])][0]

    # every kernel module that imported the device queries (launchers, launch plans)
    mods = [m for name, m in sorted(sys.modules.items()) if name.startswith("kalm_fast.kernels.") and m is not None]
    saved = [(m, n, getattr(m, n)) for m in mods for n in ("device_arch", "pick") if hasattr(m, n)]
    JITFunction.run = record
    try:
        for m in mods:
            if hasattr(m, "device_arch"):
                m.device_arch = lambda device: arch
            if hasattr(m, "pick"):
                m.pick = lambda table, key, device: fake_pick(table, (key[0], *key[2:]), device)
        dt = getattr(torch, DTYPES[v["dtype"]])
        g = torch.Generator().manual_seed(0)
        if v["op"] == "attention":
            lengths, Hkv = v.get("lengths", (37, 100)), v.get("Hkv", 2)
            T, Hq, D = sum(lengths), Hkv * v["GROUP"], v["D"]
            q, do, out = (torch.randn(T, Hq, D, generator=g).to(dt) for _ in range(3))
            k, vv = (torch.randn(T, Hkv, D, generator=g).to(dt) for _ in range(2))
            cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
            lse = torch.zeros(Hq, T)
            attention.flash_attn_varlen_fwd(q, k, vv, cu, max(lengths), D ** -0.5)
            attention.flash_attn_varlen_bwd(do, q, k, vv, out, lse, cu, max(lengths), D ** -0.5,
                                            dlse=None if v.get("dlse") is False else torch.zeros(Hq, T),
                                            dkdv_splits=v.get("dkdv_splits"))
        elif v["op"] == "pooling":
            lengths, H = v.get("lengths", (60, 77)), v["H"]
            T, nb = sum(lengths), len(lengths)
            x = torch.randn(T, H, generator=g).to(dt)
            cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
            mask = (torch.rand(T, generator=g) > 0.3).to(torch.uint8) if v["mask"] else None
            w = torch.ones(H, dtype=dt) if v["norm"] else None
            b = torch.zeros(H, dtype=dt) if v["norm"] == "layernorm" else None
            pooling.varlen_mean_pool_fwd(x, cu, mask, v["norm"], w, b, 1e-6, True, num_splits=v["splits"])
            p_hat, cnt = torch.zeros(nb, H), torch.ones(nb)
            pooling.varlen_mean_pool_bwd(torch.randn(nb, H).to(dt), x, cu, mask, v["norm"], w, b, 1e-6, True,
                                         p_hat, cnt, num_splits=v["splits"])
        else:
            B, G, D, M = v.get("B", 37), v.get("G", 4), v["D"], v["num_mix"]
            q = torch.randn(B, D, generator=g).to(dt)
            d = torch.randn(B * G, D, generator=g).to(dt)
            pos = torch.arange(B) * G
            lam = torch.rand(B, M) if M else None
            infonce.focal_infonce_fwd(q, d, pos, G, v["in_batch"], 0.05, M, lam)
            top_i = torch.zeros(B, M + 1, dtype=torch.int32)
            c_a, c_b = (torch.zeros(B), torch.zeros(B, M)) if M else (None, None)
            infonce.focal_infonce_bwd(q, d, pos, G, v["in_batch"], 0.05, torch.zeros(B), torch.zeros(B), top_i, c_a,
                                      c_b)
    finally:
        JITFunction.run = real_run
        for m, n, f in saved:
            setattr(m, n, f)
    del triton
    return launches


def bind(jit, args, kwargs, arch: str):
    """What JITFunction.run would hand to triton.compile on a GPU of ``arch``: (ASTSource, target, options)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", ARCHS[arch], 32)
    backend = make_backend(target)
    # the two options JITFunction.run adds before binding (their defaults: the same options hash either way)
    kwargs = dict(kwargs, debug=kwargs.get("debug", jit.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    key = (jit.fn.__name__, arch, repr(specialization), repr(sorted(options.__dict__.items())))
    return ASTSource(jit, signature, constexprs, attrs), target, options, key


def variant_counts(variant: dict, sizes: list[dict], arch: str = "sm_90") -> dict[str, int]:
    """{kernel: number of distinct runtime specializations} over the per-call ``sizes`` of one variant (needs the real
    JIT functions: run without TRITON_INTERPRET). Equal specialization keys mean one entry in Triton's kernel cache."""
    from kalm_fast.kernels import attention_configs, infonce_configs

    config = {"attention": attention_configs.CANDIDATES["fwd"][0],
              "infonce": infonce_configs.CANDIDATES[table_arch(arch)][0]}.get(variant["op"])
    keys: dict[str, set] = {}
    for s in sizes:
        for jit, args, kwargs in capture({**variant, **s}, arch, config):
            keys.setdefault(jit.fn.__name__, set()).add(bind(jit, args, kwargs, arch)[3])
    return {k: len(v) for k, v in keys.items()}


# ----------------------------------------------------------------------------------------------------------------
# compile + facts
# ----------------------------------------------------------------------------------------------------------------

_PTXAS_LOGS: list[str] = []


class _LoggingSubprocess:
    """Stands in for the ``subprocess`` module inside Triton's NVIDIA backend to keep the ``ptxas -v`` log it
    writes to a temporary file (Triton deletes it)."""

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def run(self, cmd, *args, **kwargs):
        result = subprocess.run(cmd, *args, **kwargs)
        f = kwargs.get("stderr")
        if "ptxas" in os.path.basename(str(cmd[0])) and hasattr(f, "name"):
            with open(f.name) as log:
                _PTXAS_LOGS.append(log.read())
        return result


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _tensor_core_count(cubin: bytes) -> int:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    return len(re.findall(r"\b(HGMMA|HMMA|UTCHMMA|UTCQMMA|UTCMMA)\b", sass))


def compile_job(job: dict) -> dict:
    """Compile one (kernel, variant, arch, config) job and return its row (ok=False with the error on failure)."""
    while PAUSE_FILE and os.path.exists(PAUSE_FILE):
        time.sleep(5)
    import triton
    from triton.backends.nvidia import compiler as nv

    nv.subprocess = _LoggingSubprocess()
    row = base_row(job)
    t0 = time.perf_counter()
    # a kernel cache of its own: two jobs with the same specialization (a D the kernel only bounds) would otherwise
    # hit the first one's cache entry, which skips ptxas and so loses the registers and spills
    os.environ["TRITON_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="kalm_compile_job_")
    try:
        src, target, options = job_source(job)[:3]
        _PTXAS_LOGS.clear()
        k = triton.compile(src, target=target, options=options.__dict__)
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        log = "\n".join(_PTXAS_LOGS)
        regs = re.search(r"Used (\d+) registers", log)
        spill = re.search(r"(\d+) bytes spill stores", log)
        row.update(ok=True, shared_bytes=int(k.metadata.shared), registers=int(regs.group(1)) if regs else None,
                   spill_bytes=int(spill.group(1)) if spill else None,
                   uses_dot="tt.dot" in k.asm["ttir"], tensor_core_instructions=_tensor_core_count(k.asm["cubin"]))
    except Exception as e:  # a compile error is a fact to record, not a crash
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}",
                   compile_s=round(time.perf_counter() - t0, 2))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return row


def job_source(job: dict):
    launches = capture(job["variant"], job["arch"], tuple(job["config"]) if job["config"] else None)
    for jit, args, kwargs in launches:
        if jit.fn.__name__ == job["kernel"]:
            return bind(jit, args, kwargs, job["arch"])
    raise LookupError(f"{job['kernel']} is not launched for {job['variant']}")


def config_of(jit_kwargs: dict, kernel: str) -> str:
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_T", "BLOCK_H", "BLOCK_B", "BLOCK_R", "BLOCK_D")
    parts = [f"{n}={jit_kwargs[n]}" for n in names if n in jit_kwargs and not (n == "BLOCK_D" and kernel in TABLED)]
    parts.append(f"num_warps={jit_kwargs.get('num_warps', 4)}")
    # a loop's own stage count (pooling's tl.range) stands in for the launch option, which then does nothing
    parts.append(f"NUM_STAGES={jit_kwargs['NUM_STAGES']}" if "NUM_STAGES" in jit_kwargs
                 else f"num_stages={jit_kwargs.get('num_stages', 3)}")
    if jit_kwargs.get("maxnreg"):
        parts.append(f"maxnreg={jit_kwargs['maxnreg']}")
    return " ".join(parts)


@functools.cache
def provenance() -> dict:
    import triton

    return dict(triton=triton.__version__, git_sha=git_sha(), date=_dt.date.today().isoformat())


def jit_fingerprint(jit) -> str:
    """Fingerprint of the Triton source a @triton.jit function compiles from: its source text (decorator included) and
    that of every @triton.jit function it calls, transitively, with the values of the constexpr globals they read.
    Line numbers are left out (Triton's own cache key has them), so an edit elsewhere in the file changes nothing.
    The same under the interpreter (InterpretedFunction wraps the same Python function)."""
    import inspect

    import triton.language as tl
    from triton.runtime.jit import KernelInterface

    seen, parts, todo = set(), [], [jit]
    while todo:
        fn = todo.pop().fn
        if fn in seen:
            continue
        seen.add(fn)
        parts.append(f"{fn.__qualname__}\n{inspect.getsource(fn)}")
        for name in fn.__code__.co_names:
            g = fn.__globals__.get(name)
            if isinstance(g, KernelInterface) and callable(getattr(g, "fn", None)):
                todo.append(g)
            elif isinstance(g, tl.constexpr):
                parts.append(f"{name} = {g.value!r}")
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()[:12]


@functools.cache
def source_key(kernel: str) -> str | None:
    """``jit_fingerprint`` of the launched kernel ``kernel`` (None: no such kernel any more). Every compiled row
    records it as ``source``; a committed row whose ``source`` is not the current one holds facts of other code."""
    for op in ("attention", "pooling", "infonce"):
        jit = getattr(importlib.import_module(f"kalm_fast.kernels.{op}"), kernel, None)
        if jit is not None:
            return jit_fingerprint(jit)
    return None


def base_row(job: dict) -> dict:
    return dict(kernel=job["kernel"], arch=job["arch"], dtype=job["variant"]["dtype"],
                variant=variant_name(job["variant"]), config=job["config_str"], pinned=job["pinned"], ok=None,
                error="", shared_bytes=None, registers=None, spill_bytes=None, uses_dot=None,
                tensor_core_instructions=None, compile_s=None, source=source_key(job["kernel"]), **provenance())


def current(r: dict) -> bool:
    """A table row compiled from the kernel source of this checkout (its ``source`` is the current fingerprint)."""
    return r.get("source") is not None and r.get("source") == source_key(r["kernel"])


# ----------------------------------------------------------------------------------------------------------------
# job lists
# ----------------------------------------------------------------------------------------------------------------


def _candidates(kernel: str, arch: str, dtype: str):
    kind, op = TABLED[kernel]
    configs = _configs_module(op)
    if op == "attention":
        return configs.CANDIDATES_FP32[kind] if dtype == "fp32" else configs.CANDIDATES[kind]
    return configs.CANDIDATES_FP32 if dtype == "fp32" else configs.CANDIDATES[table_arch(arch)]


def _configs_module(op: str):
    """kernels/<op>_configs.py: the op's candidate tiles and PINNED table."""
    return importlib.import_module(f"kalm_fast.kernels.{op}_configs")


def make_jobs(variants, archs, *, search: bool, kernels=None, all_pinned: bool = False):
    """One job per (kernel launched for the variant, arch, config): every candidate config with ``search``, every row
    of the PINNED table with ``all_pinned`` (the alternatives a launch plan may choose), else the pinned one
    (launcher-fixed kernels: their one config). Jobs with an identical specialization share a compile."""
    jobs = []
    for v, arch in itertools.product(variants, archs):
        by_config = {}  # config -> the launches with it (one capture gives every tabled kernel's kwargs)
        for jit, _args, kwargs in capture(v, arch, None if not search else _first_candidate(v, arch)):
            name = jit.fn.__name__
            if (kernels and name not in kernels) or (search and name not in TABLED):
                continue
            if name in TABLED and search:
                configs = _candidates(name, arch, v["dtype"])
            elif name in TABLED and all_pinned:
                configs = [tuple(r[:-1]) for r in _pinned_rows(name, arch, v)]
            else:
                configs = [None]
            for c in configs:
                job = dict(kernel=name, arch=arch, variant=v, config=c, pinned=not search or name not in TABLED)
                kw = dict(kwargs)
                if c is not None:  # the launch kwargs of this config (a register budget may follow num_warps)
                    if c not in by_config:
                        by_config[c] = capture(v, arch, c)
                    kw = next(k for j, _a, k in by_config[c] if j.fn.__name__ == name)
                job["config_str"] = config_of(kw, name)
                jobs.append(job)
    return jobs


def _arch_key(table: dict, kind: str, arch: str, rest: tuple) -> tuple:
    """The PINNED key of (kind, arch, *rest): the arch's own, else that of ``table_arch`` (the rows it starts from)."""
    return (kind, arch, *rest) if (kind, arch, *rest) in table else (kind, table_arch(arch), *rest)


def _pinned_rows(kernel: str, arch: str, v: dict) -> list[tuple]:
    """PINNED rows of the kernel's class for variant v on ``arch`` (``_arch_key``), and for InfoNCE the class's
    resident-only rows that run resident at v's D."""
    kind, op = TABLED[kernel]
    configs = _configs_module(op)
    key = _arch_key(configs.PINNED, kind, arch, variant_class(kernel, v)[1:])
    extra = ([r for r in configs.PINNED.get((*key, "resident"), ()) if configs.resident(v["D"], r[2])]
             if op == "infonce" else [])
    return configs.PINNED[key] + extra


def _variant_d(r: dict) -> int:
    """The D of a compile row's variant ("D=128 GROUP=7", "D=1024 num_mix=2 ..."): head dim or embedding dim."""
    return int(r["variant"].split()[0].split("=")[1])


def _runs_resident(r: dict) -> bool:
    """An InfoNCE compile row whose kernel keeps the embedding on chip (the launcher's RESIDENT)."""
    return _configs_module("infonce").resident(_variant_d(r), _parse_config(r["config"])["BLOCK_K"])


def _first_candidate(v, arch):
    kernel = {"attention": "_attn_fwd_kernel", "infonce": "_infonce_fwd_kernel"}.get(v["op"])
    return _candidates(kernel, arch, v["dtype"])[0] if kernel else None


def _with_keys(jobs):
    """Attach the specialization key of each job (computed by the kernel's binder for the arch)."""
    for job in jobs:
        job["key"] = job_source(job)[3]
    return jobs


def run_jobs(jobs, workers: int, progress=True, partial: Path | None = None):
    jobs = _with_keys(jobs)
    unique = {}
    for job in jobs:
        unique.setdefault(job["key"], job)
    todo = list(unique.values())
    # longest first (attention backward, big head dims), so the pool does not end on one long compile
    todo.sort(key=lambda j: (j["kernel"].startswith("_pool"), -j["variant"].get("D", 0)))
    t0 = time.time()
    done = {}
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, maxtasksperchild=20) as pool:
        for i, row in enumerate(pool.imap_unordered(_compile_keyed, todo)):
            done[row.pop("_key")] = row
            if progress:
                print(f"[{i + 1}/{len(todo)} {time.time() - t0:6.0f}s] {_fmt(row)}", flush=True)
            if partial is not None:  # an interrupted run keeps what it compiled
                with open(partial, "a") as f:
                    f.write(json.dumps(row) + "\n")
    rows = []
    for job in jobs:
        first = done[job["key"]]
        row = base_row(job)
        row.update({k: first[k] for k in ("ok", "error", "shared_bytes", "registers", "spill_bytes", "uses_dot",
                                          "tensor_core_instructions")})
        row["compile_s"] = first["compile_s"] if job is unique[job["key"]] else 0.0  # shared compile: counted once
        rows.append(row)
    return rows, len(todo), time.time() - t0


def _compile_keyed(job):
    row = compile_job(job)
    row["_key"] = job["key"]
    return row


def _fmt(r: dict) -> str:
    facts = (f"smem={r['shared_bytes']} regs={r['registers']} spill={r['spill_bytes']} "
             f"tc={r['tensor_core_instructions']}"
             if r["ok"] else f"ERROR {r['error'][:100]}")
    return f"{r['kernel']} {r['arch']} {r['dtype']} {r['variant']} [{r['config']}] {facts} ({r['compile_s']}s)"


# ----------------------------------------------------------------------------------------------------------------
# verdicts, tables, pinning
# ----------------------------------------------------------------------------------------------------------------


def verdict(r: dict) -> str:
    """'' when the row passes the issue's bar; else why not."""
    if not r["ok"]:
        return "compile error"
    if r["shared_bytes"] > SHARED_MEMORY_OPTIN[r["arch"]]:
        return "shared memory"
    if r["registers"] is None or r["spill_bytes"] is None:
        return "no ptxas facts"
    if r["spill_bytes"]:
        return "spills"
    if r["uses_dot"] and r["dtype"] != "fp32" and not r["tensor_core_instructions"]:
        return "no tensor cores"
    return ""


def row_key(r: dict) -> tuple:
    return (r["kernel"], r["arch"], r["dtype"], r["variant"], r["config"])


def results_dir(version: str | None = None) -> Path:
    import triton

    return RESULTS / f"compile-triton{version or triton.__version__}"


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rows(rows: list[dict], out: Path):
    """Merge rows into out/compile.jsonl (same key: replaced) and rewrite out/compile.md."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compile.jsonl"
    merged = {row_key(r): r for r in load_rows(path)}
    merged.update({row_key(r): r for r in rows})
    allrows = sorted(merged.values(), key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["variant"], r["config"]))
    path.write_text("".join(json.dumps(r) + "\n" for r in allrows))
    (out / "compile.md").write_text(markdown(allrows))


def markdown(rows: list[dict]) -> str:
    prov = rows[0] if rows else {}
    lines = [f"# Compile facts, Triton {prov.get('triton')} (git {prov.get('git_sha')}, {prov.get('date')})", "",
             "Written by `python -m bench.compile`; registers and spill stores from `ptxas -v`, shared memory from the "
             "kernel metadata, tensor cores from `cuobjdump -sass` (HGMMA sm_90, HMMA sm_80, UTC*MMA sm_100). Limits: "
             "shared memory sm_90/sm_100 232,448 B, sm_80 166,912 B; verdict empty = within every limit.", ""]
    n = len(rows)
    pinned = [r for r in rows if r["pinned"]]
    n_spill = sum(1 for r in rows if r["spill_bytes"])
    lines += [f"{n} rows, {sum(1 for r in rows if r['ok'])} compiled, {n_spill} spill; "
              f"pinned rows: {len(pinned)}, failing the bar: {sum(1 for r in pinned if verdict(r))}.", ""]
    lines += ["| kernel | arch | dtype | variant | config | pinned | shared B | regs | spill B | tensor-core instr | "
              "compile s | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['variant']} | {r['config']} | "
                     f"{'yes' if r['pinned'] else ''} | {r['shared_bytes']} | {r['registers']} | {r['spill_bytes']} | "
                     f"{r['tensor_core_instructions']} | {r['compile_s']} | "
                     f"{verdict(r) or ('ok' if r['ok'] else '')} |")
    return "\n".join(lines) + "\n"


def _parse_config(s: str) -> dict:
    return {k: int(v) for k, v in (p.split("=") for p in s.split())}


def pinned_key(r: dict) -> tuple[str, tuple, tuple]:
    """(op, key of the op's PINNED table, config tuple as the table stores it) of a compile row whose kernel is in
    TABLED. Attention keys carry the padded head dim: (kind, arch, BLOCK_D, dtype class); InfoNCE's (kind, arch,
    dtype class)."""
    kind, op = TABLED[r["kernel"]]
    c = _parse_config(r["config"])
    dcls = "fp32" if r["dtype"] == "fp32" else "16bit"
    if op == "attention":
        return op, (kind, r["arch"], _table_block_d(_variant_d(r)), dcls), (
            c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"])
    return op, (kind, r["arch"], dcls), (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"])


def choose_pins(tables: list[list[dict]]):
    """For each pinned-table key (kernel kind, arch, class): the candidate configs that pass the bar in every row of
    every Triton version's table (any variant of the class, search or verification), ordered largest tile first
    (BLOCK_M x BLOCK_N, then BLOCK_K, then more stages, then fewer warps). A key where nothing passes everywhere gets
    the config with the fewest spill bytes among those that compile within shared memory everywhere (stated by the
    tests that allow it), so the launcher always has a config. InfoNCE keys also get a resident-only class,
    (*key, "resident"): the configs that pass in every row where they run resident (D <= BLOCK_K) but not at every D.
    Returns {(op, key): [row tuples]}."""
    seen, failed, smem, spills, unfit = {}, set(), {}, {}, set()
    n_tables = len(tables)
    for t, rows in enumerate(tables):
        for r in rows:
            if r["kernel"] not in TABLED:
                continue
            op, key, tup = pinned_key(r)
            # an InfoNCE row run resident (D <= BLOCK_K) is also evidence for the key's resident-only class
            keys = [key] + ([(*key, "resident")] if op == "infonce" and _runs_resident(r) else [])
            v = verdict(r)
            for k in keys:
                seen.setdefault((op, k, tup), set()).add(t)
                if v:
                    failed.add((op, k, tup))
                if v in ("", "spills"):
                    smem[(op, k, tup)] = max(smem.get((op, k, tup), 0), r["shared_bytes"])
                    spills[(op, k, tup)] = max(spills.get((op, k, tup), 0), r["spill_bytes"])
                else:
                    unfit.add((op, k, tup))
    pins = {}
    for (op, key, tup), ts in seen.items():
        if (op, key, tup) not in failed and len(ts) == n_tables:
            pins.setdefault((op, key), []).append((*tup, smem[(op, key, tup)]))
    for (op, key), rows in list(pins.items()):  # resident-only: the configs that do not pass at every D
        if key[-1] == "resident":
            general = {r[:-1] for r in pins.get((op, key[:-1]), ())}
            pins[(op, key)] = [r for r in rows if r[:-1] not in general]
            if not pins[(op, key)]:
                del pins[(op, key)]
    for rows in pins.values():
        rows.sort(key=preference)
    least: dict = {}
    for (op, key, tup), ts in seen.items():
        if (op, key) in pins or (op, key, tup) in unfit or len(ts) < n_tables or key[-1] == "resident":
            continue
        if (op, key) not in least or spills[(op, key, tup)] < least[(op, key)][0]:
            least[(op, key)] = (spills[(op, key, tup)], (*tup, smem[(op, key, tup)]))
    for k, (_, row) in least.items():
        pins[k] = [row]
    return pins


def preference(c: tuple):
    """Sort key of candidate configs, best first: the largest tile (BLOCK_M x BLOCK_N, then BLOCK_K), then more
    pipeline stages, then fewer warps. Attention rows are (BM, BN, warps, stages[, smem]), InfoNCE (BM, BN, BK, ...)."""
    if len(c) in (4, 5) and c[2] in (4, 8):  # attention
        return (-c[0] * c[1], -c[3], c[2], c[0] != 128)
    return (-c[0] * c[1], -c[2], -c[4], c[3])


def _sibling_failed(job, existing) -> bool:
    """The same config failed for another variant of the job's class (GROUP 1 when searching GROUP 7): it cannot be
    pinned for the class, so it is not compiled."""
    k = row_key(base_row(job))
    head = k[3].split()[0]
    return any(verdict(r) for kk, r in existing.items()
               if kk[:3] == k[:3] and kk[4] == k[4] and kk[3] != k[3] and kk[3].split()[0] == head)


def search(archs, workers: int, out: Path, need: int = 2, only_passing: Path | None = None, kernels=None,
           ops=None, dtypes=None):
    """Rounds over the candidates of every (kernel, arch, dtype, class variant), best first (``preference``): each
    round compiles the next candidate of every class with fewer than ``need`` passing configs (or, on sm_80, none
    within ``SMALL_SHARED_MEMORY``). Rows already in
    ``out`` count (a rerun resumes); ``only_passing``: candidates that failed in that table are never compiled."""
    out.mkdir(parents=True, exist_ok=True)
    existing = {row_key(r): r for r in load_rows(out / "compile.jsonl")}
    failed_elsewhere = ({row_key(r) for r in load_rows(only_passing / "compile.jsonl") if verdict(r)}
                        if only_passing else set())
    variants = [v for v in search_variants() if (not ops or v["op"] in ops) and (not dtypes or v["dtype"] in dtypes)]
    jobs = make_jobs(variants, archs, search=True, kernels=kernels)
    classes: dict = {}
    for j in jobs:
        # InfoNCE's launch plan picks smaller tiles to fill the GPU, and a BLOCK_K >= D keeps the backward's
        # accumulator on chip: one passing config per (tile size BM x BN, BLOCK_K)
        size = (j["config"][0] * j["config"][1], j["config"][2]) if TABLED[j["kernel"]][1] == "infonce" else 0
        classes.setdefault((j["kernel"], j["arch"], j["variant"]["dtype"], variant_name(j["variant"]), size),
                           []).append(j)
    for lst in classes.values():
        lst.sort(key=lambda j: preference(tuple(j["config"])))
    all_rows, n_total, t_total = [], 0, 0.0
    for rnd in itertools.count():
        batch = []
        for cls, lst in classes.items():
            passes, enough = 0, (1 if cls[-1] else need)  # InfoNCE: one per tile size
            small = SMALL_SHARED_MEMORY.get(cls[1])
            fits_small = small is None  # a passing config within the small devices' shared memory (sm_80)
            for j in lst:
                r = existing.get(row_key(base_row(j)))
                if row_key(base_row(j)) in failed_elsewhere:  # cannot be pinned: neither compiled nor counted
                    continue
                if r is not None:
                    passes += not verdict(r)
                    fits_small = fits_small or (not verdict(r) and r["shared_bytes"] <= small)
                    continue
                if _sibling_failed(j, existing):
                    continue
                if passes < enough or not fits_small:
                    batch.append(j)
                break
        if not batch:
            break
        while PAUSE_FILE and os.path.exists(PAUSE_FILE):
            time.sleep(5)
        print(f"search round {rnd}: {len(batch)} compiles", flush=True)
        rows, n, t = run_jobs(batch, workers, partial=out / "partial.jsonl")
        n_total, t_total = n_total + n, t_total + t
        for r in rows:
            existing[row_key(r)] = r
        write_rows(rows, out)
        (out / "partial.jsonl").unlink(missing_ok=True)  # merged into the table
        all_rows += rows
    return all_rows, n_total, t_total


def mark_pinned(folder: Path, pins: dict):
    """Re-mark the ``pinned`` column of a table after the pins changed (rows of other configs stay as facts)."""
    rows = load_rows(folder / "compile.jsonl")
    for r in rows:
        if r["kernel"] in TABLED:
            op, key, tup = pinned_key(r)
            r["pinned"] = (op, key) in pins and pins[(op, key)][0][:len(tup)] == tup
    (folder / "compile.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "compile.md").write_text(markdown(rows))


def write_pins(pins: dict):
    for op in ("attention", "infonce"):
        path = ROOT / "kernels" / f"{op}_configs.py"
        text = path.read_text()
        body = ["PINNED = {"]
        for (o, key), rows in sorted(pins.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            if o == op:
                body.append(f"    {key!r}: {rows!r},")
        body.append("}")
        text = re.sub(r"# BEGIN PINNED\n.*?# END PINNED", "# BEGIN PINNED\n" + "\n".join(body) + "\n# END PINNED",
                      text, flags=re.S)
        path.write_text(text)
        print(f"{path.relative_to(ROOT)}: {sum(1 for (o, _k) in pins if o == op)} pinned keys")


def readme_table() -> str:
    """The README's "compiled for" table from the committed tables: one row per (kernel, arch, class) of the pinned
    configs, worst case over the class's variants and dtypes (bf16/fp16; fp32 in the full tables)."""
    dirs = sorted(RESULTS.glob("compile-triton*"), key=lambda d: [int(x) for x in re.findall(r"\d+", d.name)])
    tables = {d.name.removeprefix("compile-triton"): load_rows(d / "compile.jsonl") for d in dirs}
    versions = list(tables)
    main_v = versions[-1]
    groups: dict = {}
    for v, rows in tables.items():
        for r in rows:
            if not r["pinned"] or r["dtype"] == "fp32":
                continue
            cls = ""
            if r["kernel"].startswith("_attn") and r["kernel"] != "_attn_bwd_preprocess_kernel":
                D = _variant_d(r)
                cls = f"D<={max(16, 1 << (D - 1).bit_length())}"
            g = groups.setdefault((r["kernel"], cls, r["arch"]), {"configs": set(), "by_v": {}})
            if v == main_v:
                g["configs"].add(r["config"] if r["kernel"] in TABLED else "launcher's")
            g["by_v"].setdefault(v, []).append(r)
    lines = [f"| kernel | class | arch | pinned config | shared memory | registers | spill bytes "
             f"({' / '.join(versions)}) | tensor-core instr. |", "|---|---|---|---|---|---|---|---|"]
    for (kernel, cls, arch), g in sorted(groups.items(), key=lambda kv: (kv[0][0], int(kv[0][1][3:] or 0), kv[0][2])):
        rows = g["by_v"].get(main_v, [])
        if not rows:
            continue
        smem = max(r["shared_bytes"] or 0 for r in rows)
        regs = max(r["registers"] or 0 for r in rows)
        spills = " / ".join(str(max((r["spill_bytes"] or 0) for r in g["by_v"].get(v, [{"spill_bytes": None}]))
                                if g["by_v"].get(v) else "-") for v in versions)
        tc = min(r["tensor_core_instructions"] or 0 for r in rows) if any(r["uses_dot"] for r in rows) else "-"
        config = "; ".join(sorted(g["configs"])).replace("num_warps", "w").replace("num_stages", "s")
        lines.append(f"| `{kernel}` | {cls} | {arch} | {config} | {smem / 1024:.0f} KB | {regs} | {spills} | {tc} |")
    return "\n".join(lines) + "\n"


def write_readme():
    path = ROOT / "README.md"
    text = path.read_text()
    begin, end = "<!-- compiled-for:begin -->\n", "<!-- compiled-for:end -->"
    if begin not in text:
        raise SystemExit("README.md has no compiled-for markers")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(head + begin + readme_table() + end + tail)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def smoke_variants():
    return (attention_variants(head_dims=(64, 128), groups=(1,), dtypes=("bf16",))
            + [dict(op="pooling", H=1024, mask=True, norm="rmsnorm", dtype="bf16", splits=1)]
            + infonce_variants(dims=(1024,), mixes=(2,), dtypes=("bf16",), in_batch=(True,)))


def reduced_variants():
    """The pinned matrix cut to fit 2 CPU cores: GROUP 7 and every head dim in bf16, fp16 at GROUP 1, fp32 at
    D 32/64/128 (fp32 attention compiles take minutes); pooling in bf16, fp32 at H 4096; InfoNCE at D 1024 (D is a
    runtime bound: every D compiles the same)."""
    return (attention_variants(dtypes=("bf16",)) + attention_variants(groups=(1,), dtypes=("fp16",))
            + attention_variants(head_dims=(32, 64, 128), groups=(1,), dtypes=("fp32",))
            + pooling_variants(dtypes=("bf16",)) + pooling_variants(hidden=(4096,), dtypes=("fp32",))
            + infonce_variants(dims=(1024,)))


def search_variants():
    # GROUP > 1 turns the dK/dV kernel's loop over the group's query heads into a real loop (more registers): searched
    # at GROUP 7. fp32 attention (exact FMA dots) has its own small candidates (attention_configs.CANDIDATES_FP32).
    return (attention_variants(head_dims=(32, 64, 128, 256), groups=(1,), dtypes=("bf16", "fp32"))
            + attention_variants(head_dims=(32, 64, 128, 256), groups=(7,), dtypes=("bf16", "fp32"), dkdv_splits=(1,))
            + infonce_variants(dims=(256, 1024), mixes=(2,), dtypes=("bf16", "fp32"), in_batch=(True,)))


def warm_variants():
    """Launches to precompile on the GPU machine before its tests and bench need them (``--warm``): first the
    attention shapes of the GPU tests that the table lacks -- GROUP 2, 4 and 8 (GROUP is a compile-time constant), in
    both dK/dV modes (the launch plan splits over query heads when the grid is small), and one KV head (a stride of
    one head is another specialization) -- then the pinned 16-bit matrix the bench and the other tests draw from.
    fp32 attention is left out: no GPU test or bench suite runs it, and its compiles take minutes."""
    gqa = [dict(op="attention", D=D, GROUP=g, dtype=dt, **({"dkdv_splits": g} if split else {}))
           for D, g, dt, split in [(128, 4, "bf16", 0), (128, 4, "fp16", 0), (128, 4, "bf16", 1), (128, 4, "fp16", 1),
                                   (40, 4, "bf16", 0), (40, 4, "bf16", 1), (96, 4, "bf16", 0), (96, 4, "bf16", 1),
                                   (256, 4, "bf16", 0), (256, 4, "bf16", 1), (128, 2, "bf16", 0),
                                   (128, 2, "bf16", 1), (128, 8, "bf16", 0), (128, 8, "bf16", 1)]]
    one_head = [dict(op="attention", D=64, GROUP=1, dtype="bf16", Hkv=1)]
    # the backward without a gradient on lse (HAS_DLSE=False: the bench, most tests), and test_model's tiny Qwen2
    # (D 64, GROUP 2; fp32 pooling at H 64)
    no_dlse = [dict(op="attention", D=D, GROUP=g, dtype="bf16", dlse=False, **extra)
               for D, g, extra in [(40, 4, {}), (96, 4, {}), (256, 4, {}), (128, 2, {}), (64, 1, {"Hkv": 1}),
                                   (64, 2, {}), (64, 2, {"dkdv_splits": 2})]]
    model_pool = [dict(op="pooling", H=64, mask=False, norm="rmsnorm", dtype="fp32", splits=1)]
    half = ("bf16", "fp16")
    return (gqa + one_head + no_dlse + model_pool + attention_variants(dtypes=half) + pooling_variants(dtypes=half)
            + infonce_variants(dtypes=half))


def warm_job(job: dict) -> tuple:
    """Compile one job into the shared kernel cache (TRITON_CACHE_DIR, as the tests and the bench read it): the same
    ASTSource, target and options the runtime builds, so the runtime's own compile of that launch finds it."""
    import triton

    t0 = time.perf_counter()
    try:
        src, target, options = job_source(job)[:3]
        triton.compile(src, target=target, options=options.__dict__)
        return job["kernel"], None, time.perf_counter() - t0
    except Exception as e:  # reported, never fatal: the runtime then compiles the launch itself
        return job["kernel"], f"{type(e).__name__}: {str(e).strip()[:200]}", time.perf_counter() - t0


def warm(archs, workers: int, ops=None, kernels=None) -> int:
    """Fill Triton's kernel cache with ``warm_variants`` for ``archs``: each variant's pinned launches first, then
    the PINNED alternatives (a launch plan's other rows, KALM_FAST_AUTOTUNE=1's candidates). A cold process compiles
    one kernel at a time as it first launches it; ``workers`` processes do it ahead, in parallel. Jobs with the same
    specialization are compiled once (the second is a cache hit). Returns the number of failed compiles."""
    import triton

    variants = [v for v in warm_variants() if not ops or v["op"] in ops]
    seen, todo = set(), []
    for all_pinned in (False, True):
        for job in make_jobs(variants, archs, search=False, kernels=kernels, all_pinned=all_pinned):
            key = (job["kernel"], job["arch"], job["variant"]["dtype"], variant_name(job["variant"]), job["config_str"])
            if key not in seen:
                seen.add(key)
                todo.append(job)
    cache = os.environ.get("TRITON_CACHE_DIR") or triton.knobs.cache.dir
    print(f"warm: {len(todo)} launches for {', '.join(archs)} into {cache}, {workers} processes", flush=True)
    t0, failed = time.time(), 0
    # stopped (timeout, kill): leave through the pool's __exit__, which terminates the workers mid-compile
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"warm: stopped after {time.time() - t0:.0f} s"))
    with mp.get_context("spawn").Pool(workers, maxtasksperchild=50) as pool:
        for kernel, error, _s in pool.imap(warm_job, todo, chunksize=4):
            if error:
                failed += 1
                print(f"warm: {kernel} failed: {error}", flush=True)
    print(f"warm: {len(todo)} launches compiled or found in {time.time() - t0:.0f} s, {failed} failed", flush=True)
    return failed


def estimate(archs=("sm_90",)):
    """Pinned compiles a cold GPU process makes for the GPU tests' shapes, with the seconds the committed table
    measured on this project's CPUs (the GPU machine compiles ~2x faster per core with 16 cores)."""
    rows = load_rows(results_dir() / "compile.jsonl")
    seen = {}
    for r in rows:
        if r["pinned"] and r["arch"] in archs and r["compile_s"]:
            seen[(r["kernel"], r["arch"], r["dtype"], r["variant"])] = r["compile_s"]
    return len(seen), sum(seen.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--search", action="store_true", help="every candidate config, one variant per class")
    mode.add_argument("--smoke", action="store_true", help="pinned configs of a few variants")
    mode.add_argument("--pin", action="store_true", help="rewrite the PINNED tables from the committed tables")
    mode.add_argument("--estimate", action="store_true", help="pinned compiles and CPU seconds in the table")
    mode.add_argument("--reduced", action="store_true", help="the pinned matrix cut to fit 2 CPU cores")
    mode.add_argument("--warm", action="store_true", help="fill TRITON_CACHE_DIR for the GPU tests and the bench")
    p.add_argument("--all-pinned", action="store_true", help="every row of the PINNED tables, not only the first")
    mode.add_argument("--readme", action="store_true", help="rewrite README.md's compiled-for table")
    p.add_argument("--arch", action="append", choices=sorted(ARCHS), help="default: all (--smoke: sm_80, sm_90)")
    p.add_argument("--op", action="append", choices=["attention", "pooling", "infonce"], help="default: all")
    p.add_argument("--kernel", action="append", help="only these kernels (repeatable)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="only these dtypes (repeatable)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compile processes")
    p.add_argument("--out", type=Path, help="results folder (default bench/results/compile-triton<version>)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--resume", action="store_true", help="skip compiles whose row is already in the table")
    p.add_argument("--skip-failed-in", type=Path, help="with --search: skip configs that failed in this table folder")
    args = p.parse_args(argv)
    if args.warm:  # into the cache the runtime reads (TRITON_CACHE_DIR, else Triton's default)
        return 1 if warm(args.arch or ["sm_90"], args.jobs, ops=args.op,
                         kernels=set(args.kernel) if args.kernel else None) else 0
    if args.pin:
        tables = [load_rows(d / "compile.jsonl") for d in sorted(RESULTS.glob("compile-triton*"))]
        names = ", ".join(d.name for d in sorted(RESULTS.glob("compile-triton*")))
        print(f"pinning from {len(tables)} tables: {names}")
        pins = choose_pins(tables)
        write_pins(pins)
        for d in sorted(RESULTS.glob("compile-triton*")):
            mark_pinned(d, pins)
        return 0
    if args.readme:
        write_readme()
        return 0
    if args.estimate:
        n, s = estimate()
        print(f"pinned sm_90 matrix in the committed table: {n} kernel compiles, {s:.0f} s of compile measured on "
              f"this project's CPUs one at a time ({s / max(n, 1):.1f} s each); a cold GPU process compiles only the "
              f"variants it launches, one at a time")
        return 0
    archs = args.arch or (["sm_80", "sm_90"] if args.smoke else list(ARCHS))
    if args.smoke:
        variants = smoke_variants()
    elif args.search:
        variants = search_variants()
    elif args.reduced:
        variants = reduced_variants()
    else:
        variants = attention_variants() + pooling_variants() + infonce_variants()
    if args.op:
        variants = [v for v in variants if v["op"] in args.op]
    if args.dtype:
        variants = [v for v in variants if v["dtype"] in args.dtype]
    if args.search:
        out = args.out or results_dir()
        rows, n_compiles, wall = search(archs, args.jobs, out, only_passing=args.skip_failed_in,
                                        kernels=set(args.kernel) if args.kernel else None, ops=args.op,
                                        dtypes=args.dtype)
        print(f"\nsearch: {n_compiles} compiles in {wall:.0f} s; table {out}")
        return 0
    jobs = make_jobs(variants, archs, search=False, kernels=set(args.kernel) if args.kernel else None,
                     all_pinned=args.all_pinned)
    if args.resume:  # rows already in the table (same kernel, arch, dtype, variant, config), compiled from the current
        # source, are not compiled again
        have = {row_key(r) for r in load_rows((args.out or results_dir()) / "compile.jsonl") if current(r)}
        jobs = [j for j in jobs if row_key(base_row(j)) not in have]
        if not jobs:
            print("nothing to compile")
            return 0
    rows, n_compiles, wall = run_jobs(jobs, args.jobs)
    failing = [r for r in rows if r["pinned"] and verdict(r)]
    print(f"\n{len(rows)} rows, {n_compiles} compiles in {wall:.0f} s ({args.jobs} processes); "
          f"{sum(1 for r in rows if r['spill_bytes'])} rows spill; pinned rows failing the bar: {len(failing)}")
    for r in failing:
        print(f"  FAIL {verdict(r)}: {_fmt(r)}")
    if not args.no_write:
        write_rows(rows, args.out or results_dir())
        print(f"written to {(args.out or results_dir()).relative_to(ROOT) if not args.out else args.out}")
    return 1 if (args.smoke and failing) else 0


if __name__ == "__main__":
    sys.exit(main())
