"""bench.compile (issue 11): Triton kernels compiled for a GPU target on this GPU-less machine, with the launcher's
exact specialization, and the facts read back (shared memory, registers, spills, tensor cores).

The CI compiles a slice of the smoke run: the pinned attention forward (D 64 and 128) and pooling forward for sm_90,
a few seconds each. The whole smoke (`python -m bench.compile --smoke`: every kernel of a few variants, sm_80 and
sm_90) takes minutes on 2 cores and is the first step of bench/gpu_session.sh; the full table is
`python -m bench.compile` (committed under bench/results/compile-triton<version>/).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, import_bench

verdict = import_bench("compile").verdict


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KALM_FAST_AUTOTUNE")}


def test_smoke_slice_compiles_pinned_configs_for_sm90(tmp_path):
    cmd = [sys.executable, "-m", "bench.compile", "--smoke", "--arch", "sm_90", "--kernel", "_attn_fwd_kernel",
           "--kernel", "_pool_fwd_kernel", "--out", str(tmp_path), "--jobs", "2"]
    scratch = tmp_path / "tmp"  # the run's temporary kernel caches go here and must be gone when it ends
    scratch.mkdir()
    r = subprocess.run(cmd, env={**_env(), "TMPDIR": str(scratch)}, capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not list(scratch.iterdir()), list(scratch.iterdir())
    rows = [json.loads(line) for line in (tmp_path / "compile.jsonl").read_text().splitlines()]
    assert {r["kernel"] for r in rows} == {"_attn_fwd_kernel", "_pool_fwd_kernel"}
    fields = {"kernel", "arch", "dtype", "variant", "config", "pinned", "ok", "error", "shared_bytes", "registers",
              "spill_bytes", "uses_dot", "tensor_core_instructions", "compile_s", "triton", "git_sha", "date"}
    for row in rows:
        assert fields <= row.keys()
        assert row["ok"] and row["pinned"] and row["arch"] == "sm_90", row
        assert 0 < row["registers"] <= 255 and row["spill_bytes"] == 0 and row["shared_bytes"] <= 232_448, row
    attn = [r for r in rows if r["kernel"] == "_attn_fwd_kernel"]
    assert len(attn) == 2 and all(r["uses_dot"] and r["tensor_core_instructions"] > 0 for r in attn)
    assert (tmp_path / "compile.md").read_text().count("| _attn_fwd_kernel |") == 2
    # the committed table of this Triton version reproduces here, fact for fact (ptxas ships inside the Triton wheel)
    bc = import_bench("compile")
    facts = ("ok", "shared_bytes", "registers", "spill_bytes", "uses_dot", "tensor_core_instructions")
    committed = {bc.row_key(r): r for r in bc.load_rows(bc.results_dir(rows[0]["triton"]) / "compile.jsonl")}
    if not committed:
        pytest.skip(f"no committed compile table for triton {rows[0]['triton']}")
    for row in rows:
        assert row["source"] == bc.source_key(row["kernel"])
        old = committed[bc.row_key(row)]
        assert bc.current(old), ("committed row compiled from other source", old)
        assert {f: row[f] for f in facts} == {f: old[f] for f in facts}, (row, old)


_RECOMPILE = r"""
import json, sys
import triton
from triton.backends.nvidia import compiler as nv
from bench import compile as bc

ptxas = []  # ptxas runs that compile (not the --version query of Triton's cache key)


class Recorder:
    def __getattr__(self, name):
        import subprocess
        return getattr(subprocess, name)

    def run(self, cmd, *args, **kwargs):
        import subprocess
        ptxas.append(str(cmd[0]))
        return subprocess.run(cmd, *args, **kwargs)


nv.subprocess = Recorder()
split = [v for v in bc.warm_variants() if v["op"] == "pooling" and v["splits"] > 1][:4]
jobs = bc.make_jobs(split, ["sm_90"], search=False, kernels={"_pool_fwd_combine_kernel"})
for job in jobs:  # what JITFunction.run would compile for that launch on an H100
    src, target, options = bc.job_source(job)[:3]
    triton.compile(src, target=target, options=options.__dict__)
print(json.dumps({"jobs": len(jobs), "ptxas": len(ptxas)}))
"""


def test_warm_fills_the_cache_the_runtime_reads(tmp_path):
    """gpu_session.sh warms Triton's kernel cache on the GPU machine's cores before the tests and the bench launch
    their kernels one compile at a time. The warm-up compiles each launch as bench.compile binds it (the runtime's
    own binder, plus the options JITFunction.run adds), so the runtime's compile of the same launch is a cache hit:
    here a fresh process, same TRITON_CACHE_DIR, compiles those launches again without running ptxas; with an empty
    cache it runs ptxas for each (the check can fail)."""
    env = {**_env(), "TRITON_CACHE_DIR": str(tmp_path / "cache"), "TRITON_DEFAULT_FP_FUSION": "1"}
    cmd = [sys.executable, "-m", "bench.compile", "--warm", "--arch", "sm_90", "--op", "pooling", "--kernel",
           "_pool_fwd_combine_kernel", "--jobs", "2"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.splitlines()[-1].endswith(", 0 failed"), r.stdout[-2000:]
    assert any(p.suffix == ".cubin" for p in (tmp_path / "cache").rglob("*")), "nothing written to the cache"
    warm = subprocess.run([sys.executable, "-c", _RECOMPILE], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert warm.returncode == 0, warm.stderr[-3000:]
    counts = json.loads(warm.stdout.splitlines()[-1])
    assert counts["jobs"] >= 2 and counts["ptxas"] == 0, counts
    cold = subprocess.run([sys.executable, "-c", _RECOMPILE], env={**env, "TRITON_CACHE_DIR": str(tmp_path / "cold")},
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    counts = json.loads(cold.stdout.splitlines()[-1])
    assert counts["ptxas"] >= counts["jobs"], counts


def test_jit_fingerprint_follows_the_compiled_source(tmp_path, monkeypatch):
    """A table row's ``source``: the same when lines only move, another one when a called @triton.jit function or a
    constexpr global it reads changes (what makes a committed row's facts stale)."""
    bc = import_bench("compile")
    body = """
import triton
import triton.language as tl

SCALE = tl.constexpr({scale})


@triton.jit
def _helper(x):
    return x * {factor}


@triton.jit
def _kernel(x_ptr):
    tl.store(x_ptr, _helper(tl.load(x_ptr)) * SCALE)
"""
    monkeypatch.syspath_prepend(str(tmp_path))

    def fingerprint(name, pad="", scale=2, factor=3):
        (tmp_path / f"{name}.py").write_text(pad + body.format(scale=scale, factor=factor))
        return bc.jit_fingerprint(importlib.import_module(name)._kernel)

    base = fingerprint("fp_base")
    assert len(base) == 12 and fingerprint("fp_moved", pad="\n\n# lines moved\n\n") == base
    assert fingerprint("fp_callee", factor=4) != base and fingerprint("fp_const", scale=5) != base
    from kalm_fast.kernels import attention

    assert bc.source_key("_attn_fwd_kernel") == bc.jit_fingerprint(attention._attn_fwd_kernel)
    assert bc.source_key("no_such_kernel") is None


def test_verdict():
    ok = dict(ok=True, arch="sm_80", dtype="bf16", shared_bytes=166_912, registers=255, spill_bytes=0, uses_dot=True,
              tensor_core_instructions=8)
    assert verdict(ok) == ""
    assert verdict({**ok, "shared_bytes": 166_913}) == "shared memory"
    assert verdict({**ok, "spill_bytes": 4}) == "spills"
    assert verdict({**ok, "tensor_core_instructions": 0}) == "no tensor cores"
    assert verdict({**ok, "dtype": "fp32", "tensor_core_instructions": 0}) == ""  # ieee fp32 dots use FMA by design
    assert verdict({**ok, "ok": False}) == "compile error"
    assert verdict({**ok, "registers": None}) == "no ptxas facts"  # a cached kernel skipped ptxas: not a pass


def test_gpu_session_dry_run():
    r = subprocess.run(["bash", "bench/gpu_session.sh", "--dry-run"], env=_env(), capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "compile smoke" in r.stdout and "kernel compiles" in r.stdout and "budget 530 s" in r.stdout


def test_gpu_stack_check_parses():
    """bench/gpu_stack_check.sh builds a ~4 GB venv, too much for CI: here only that bash parses it and that it runs
    the Python steps of gpu_session.sh the way that script runs them."""
    r = subprocess.run(["bash", "-n", "bench/gpu_stack_check.sh"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    check, session = ((ROOT / "bench" / f).read_text() for f in ("gpu_stack_check.sh", "gpu_session.sh"))
    for cmd in ("python3 -m bench.compile --smoke --arch sm_90", "python3 -m bench.compile --warm --arch sm_90",
                "python3 -P -m pytest", "python3 -m bench ",
                "--no-build-isolation --no-deps -e .", "--no-index --no-deps .whl/*.whl"):
        assert cmd in session and cmd in check, cmd
    for f in ("tests/test_attention.py", "tests/test_pooling.py", "tests/test_infonce.py", "tests/test_launch.py",
              "tests/test_soup.py", "tests/test_model.py"):
        assert f in session and f in check, f


def test_head_dim_40_keeps_16_byte_loads():
    """D = 40 (head stride 40, not a multiple of 16): the attention kernels still load q/k/v/dO tiles with 16-byte
    vectors (cp.async of 16 bytes, ld.global.v4), no 2-byte scalar loads (issue 12: before the stride units, the
    forward compiled to 160 ld.global.b16 for sm_90)."""
    code = r"""
import collections, json, re, sys
import triton
from bench import compile as bc
v = dict(op="attention", D=40, GROUP=2, dtype="bf16")
out = {}
for kernel in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel"):
    src, target, options, _ = bc.job_source(dict(kernel=kernel, arch="sm_90", variant=v, config=None))
    ptx = triton.compile(src, target=target, options=options.__dict__).asm["ptx"]
    loads = collections.Counter(re.findall(r"\bld\.global(?:\.\w+)*", ptx))
    copies = collections.Counter(int(n, 0) for n in re.findall(
        r"cp\.async\.c[ag]\.shared\.global \[[^\]]*\], \[[^\]]*\], (0x[0-9a-f]+|\d+)", ptx))
    out[kernel] = dict(loads=dict(loads), copies={str(k): n for k, n in copies.items()})
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    facts = json.loads(r.stdout.strip().splitlines()[-1])
    for kernel, f in facts.items():
        assert not any(".b16" in name or ".v2" in name for name in f["loads"]), (kernel, f)
        assert f["copies"].get("16", 0) >= 16, (kernel, f)  # the q/k/v (dO) tiles: 16-byte copies
        assert set(f["copies"]) <= {"16", "4"}, (kernel, f)  # 4 bytes: the lse/delta rows (fp32, one per thread)
