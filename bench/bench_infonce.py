"""Focal InfoNCE bench (SPEC 7): fwd and fwd+bwd time, TFLOP/s and peak memory of the tiled loss vs naive torch.

    python -m bench.bench_infonce [--smoke] [--device cuda] [--no-write]

Providers, measured side by side in one run on one device:
  kalm_fast      ``ops.focal_infonce``: the Triton kernels on CUDA (off CUDA it is the chunked torch path of SPEC 3,
                 listed there once, as torch_chunked).
  kalm_fast-no-prefetch  the same with KALM_FAST_INFONCE_PREFETCH=0 (CUDA, D = 1024, M = 2, B = 512 and 16k: the
                 streaming backward without its accumulator prefetch -- the A/B of that change; the same bits).
  torch_chunked  ``reference.focal_infonce_chunked``: O((B + N) * D) memory, fp32 math (on CUDA up to B = 16k: at 64k
                 its chunks are 8 queries and one call takes many seconds).
  torch_naive    ``reference.focal_infonce``, the oracle, eager: the full B x N logit matrix in fp32.
  torch.compile  the oracle compiled (CUDA, B = 16k, D = 1024, M = 2: the speed target's shape; a compile takes
                 about a minute).
  matmul         ``torch.matmul`` of two n x n matrices (bf16 on CUDA, fp32 on CPU): the peak of this run.
  inf-cl         Inf-CL's tiled contrastive loss (``inf_cl.cal_flash_loss``, Triton, CUDA only; fp32 logits) on the
                 configuration it supports: gamma = 0 and M = 0 (plain InfoNCE, in-batch negatives, query i's
                 positive at document i*G), B in {4k, 16k, 64k}, D = 1024; its rows come with kalm_fast and
                 torch_naive at gamma = 0 (mode suffix "g0"), and its gradients are checked against torch_chunked's
                 before it is timed (B = 16k right after the target shape). Without inf_cl or CUDA: one row saying
                 why.
Shapes (in-batch negatives, G = 8 so N = 8B, gamma = 0.5, tau = 0.02, explicit lambdas): CUDA bf16 with
B in {1k, 4k, 16k, 64k}, D in {768, 1024}, M in {0, 2}, and B = 512 at D = 1,024 and 128 (M = 2), the target's
B = 16k, D = 1,024, M = 2 first; CPU fp32 with B = 2048, D = 256, M in {0, 2}. A provider that fails (out of memory)
gets a row whose note is the error; shapes a --budget-s run had no time for, one row listing them.

FLOP convention (nominal and the same for every provider, so TFLOP/s compares times): fwd = 2BND (the logits),
bwd = 4BND (dq = dZ d and dd = dZ^T q) + 2BND (the logits recomputed), fwd+bwd = 8BND; the O(B M D) mixing is not
counted. kalm_fast recomputes the logits in both backward kernels and so executes 10BND per fwd+bwd. Notes give
TFLOP/s as a share of the matmul row (target for kalm_fast on H100: >= 60%) and the speed-up over torch_naive
(target at B = 16k, D = 1024: >= 1.5x for fwd+bwd).

Peak memory: CUDA: memory allocated above the level before one call (inputs excluded). CPU (Linux): the RSS
high-water mark of one call above the RSS before it (the mark reset through /proc/self/clear_refs), each row in a
fresh process after a small warm-up call: in a long-lived process freed memory that malloc keeps is reused without
raising RSS, and getrusage's peak only ever grows (a child even inherits its parent's), so rows would hide behind
earlier ones. --smoke measures in-process (approximate, and fast).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import common
from kalm_fast import ops, reference

SUITE = "infonce"
OP = "focal_infonce"
G, TEMPERATURE, GAMMA = 8, 0.02, 0.5

# best first (a run with --budget-s stops before its next shape): the speed target's shape, the recipe's step
# (B = 512, N = 4,096) at D = 1,024 (issue 12's shape) and at a Matryoshka dim of the recipe that the kernels keep on
# chip (D = 128 <= BLOCK_K: resident), then the scaling rows
GPU_SHAPES = [(16384, 1024, 2), (512, 1024, 2), (512, 128, 2)] + [
    (B, D, M) for B in (1024, 4096, 16384, 65536) for D in (768, 1024) for M in (0, 2) if (B, D, M) != (16384, 1024, 2)]
CPU_SHAPES = [(2048, 256, 0), (2048, 256, 2)]
SMOKE_SHAPES = [(64, 32, 0), (64, 32, 2)]
ROOT = Path(__file__).resolve().parents[1]


def _cuda(device) -> bool:
    return str(device).startswith("cuda")


def _inputs(B, D, M, dtype, device):
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(B, D, generator=gen), dim=-1).to(device=device, dtype=dtype).requires_grad_()
    d = F.normalize(torch.randn(B * G, D, generator=gen), dim=-1).to(device=device, dtype=dtype).requires_grad_()
    lam = torch.rand(B, M, generator=gen).to(device) if M else None
    return q, d, lam


def _loss_fn(provider, B, M, lam, device, gamma=GAMMA):
    """loss(q, d) of a provider; every provider computes the same SPEC 4.3 loss (inf-cl: only at gamma = 0, M = 0)."""
    args = (torch.arange(B, device=device) * G, G, True, TEMPERATURE, gamma, M, lam, "mean")
    if provider == "inf-cl":
        from inf_cl import cal_flash_loss

        labels = torch.arange(B, device=device) * G
        return lambda q, d: cal_flash_loss(q, d, labels, scale=1 / TEMPERATURE, head_dim=min(256, q.shape[1])).mean()
    if provider in ("kalm_fast", "kalm_fast-no-prefetch"):  # the second under _provider_env
        return lambda q, d: ops.focal_infonce(q, d, group_size=G, temperature=TEMPERATURE, gamma=gamma, num_mix=M,
                                              mix_lambda=lam)
    if provider == "torch_chunked":
        return lambda q, d: reference.focal_infonce_chunked(q, d, *args)
    if provider == "torch_naive":
        return lambda q, d: reference.focal_infonce(q, d, *args)
    if provider == "torch.compile":
        compiled = torch.compile(reference.focal_infonce, dynamic=False)
        return lambda q, d: compiled(q, d, *args)
    raise ValueError(f"unknown provider {provider!r}")


@contextlib.contextmanager
def _provider_env(provider):
    """The environment a provider runs under: kalm_fast-no-prefetch turns the backward's prefetch off."""
    old = os.environ.get("KALM_FAST_INFONCE_PREFETCH")
    if provider == "kalm_fast-no-prefetch":
        os.environ["KALM_FAST_INFONCE_PREFETCH"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KALM_FAST_INFONCE_PREFETCH", None)
        else:
            os.environ["KALM_FAST_INFONCE_PREFETCH"] = old


def _step(loss_fn, q, d, mode):
    """One call: the forward on inputs that require grad (so it saves what its backward needs), or fwd + bwd."""
    if mode == "fwd":
        return lambda: loss_fn(q, d)
    return lambda: torch.autograd.grad(loss_fn(q, d), (q, d))


def _time(step, device):
    """Median/p20/p80 ms; the repetitions fit about three seconds (at least 5), after a compile/autotune call."""
    step()
    common.sync(device)
    t0 = time.perf_counter()
    step()
    common.sync(device)
    rep = int(min(20, max(5, 3.0 / max(time.perf_counter() - t0, 1e-6))))
    return common.bench_ms(step, device, warmup=0, rep=rep)


def _cpu_peak_in_this_process(provider, mode, B, D, M):
    """The child side of the CPU memory figure: a small warm-up call (thread pools and other one-time buffers are
    not the loss's memory), then one measured call."""
    q, d, lam = _inputs(64, D, M, torch.float32, "cpu")
    _step(_loss_fn(provider, 64, M, lam, "cpu"), q, d, mode)()
    q, d, lam = _inputs(B, D, M, torch.float32, "cpu")
    return common.rss_peak_mb(_step(_loss_fn(provider, B, M, lam, "cpu"), q, d, mode))


def _peak_mb(provider, mode, B, D, M, step, device, smoke):
    """Peak memory growth of one call (see the module docstring)."""
    if _cuda(device):
        return common.peak_memory_mb(step, device)
    if smoke:
        return common.rss_peak_mb(step)
    call = f"_cpu_peak_in_this_process({provider!r}, {mode!r}, {B}, {D}, {M})"
    code = f"from bench.bench_infonce import _cpu_peak_in_this_process; print({call})"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def _matmul_row(device, smoke):
    n = 256 if smoke else (8192 if _cuda(device) else 2048)
    dtype = torch.bfloat16 if _cuda(device) else torch.float32
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = _time(lambda: torch.matmul(a, b), device)
    return common.row(SUITE, "matmul", "torch.matmul", "fwd", f"{n}x{n}x{n}", dtype, device, times,
                      flops=2 * n**3, note="the measured peak of this run")


def _providers(device, smoke, B, D, M):
    if not _cuda(device):
        return ["torch_chunked", "torch_naive"]
    providers = ["kalm_fast", "torch_naive"]
    if B <= 16384:
        providers.append("torch_chunked")
    if not smoke and D == 1024 and M == 2 and B in (512, 16384):
        providers += ["kalm_fast-no-prefetch"] + (["torch.compile"] if B == 16384 else [])
    return providers


def _shape_rows(B, D, M, device, smoke, peak_tflops):
    dtype = torch.bfloat16 if _cuda(device) else torch.float32
    N = B * G
    shape = f"B={B} N={N} D={D} M={M}"
    rows = []
    # the deadline is checked before each provider too: torch.compile (last) takes about a minute
    for provider in common.within_budget(SUITE, OP, _providers(device, smoke, B, D, M), lambda p: f"{p} {shape}",
                                         dtype, device, rows):
        for mode, flops in (("fwd", 2 * B * N * D), ("fwd+bwd", 8 * B * N * D)):
            try:
                q, d, lam = _inputs(B, D, M, dtype, device)
                step = _step(_loss_fn(provider, B, M, lam, device), q, d, mode)
                with _provider_env(provider):
                    peak = _peak_mb(provider, mode, B, D, M, step, device, smoke)
                    times = _time(step, device)
            except Exception as error:  # out of memory, compile failure: reported, not dropped
                rows.append(common.failed_row(SUITE, OP, provider, mode, shape, dtype, device, error))
                continue
            finally:
                if _cuda(device):
                    torch.cuda.empty_cache()
            rows.append(common.row(SUITE, OP, provider, mode, shape, dtype, device, times, flops=flops,
                                   peak_mem_mb=peak))
    naive = {r["mode"]: r["median_ms"] for r in rows if r["provider"] == "torch_naive" and r["median_ms"] != ""}
    for r in rows:
        if r["median_ms"] == "":
            continue
        notes = [f"{r['tflops'] / peak_tflops:.0%} of matmul"]
        if r["provider"] != "torch_naive" and r["mode"] in naive:
            notes.append(f"{naive[r['mode']] / r['median_ms']:.2f}x vs torch_naive")
        if r["provider"] == "kalm_fast":
            notes.append("triton" if ops.use_triton(torch.empty(0, device=device)) else "torch path")
            if _cuda(device):  # the launch plan: programs per pass (issue 12: >= 2 per SM)
                notes.append(plan_note(torch.empty(B, D, device=device, dtype=dtype), N))
        r["note"] = "; ".join(notes)
    return rows


def plan_note(q: torch.Tensor, N: int) -> str:
    """The InfoNCE launch plan for queries like q against N documents on q's device: programs, tile and whether the
    embedding stays on chip, per pass."""
    from kalm_fast.kernels import infonce_configs

    plan, chosen = infonce_configs.launch_plan(q, N, G, True)
    return "programs fwd/dq/dd " + "/".join(
        f"{plan[k + '_programs']} ({plan[k + '_tile'][0]}x{plan[k + '_tile'][1]}"
        f"{', on chip' if infonce_configs.resident(q.shape[1], chosen[k][2]) else ''})" for k in ("fwd", "dq", "dd"))


def inf_cl_reason(device) -> str:
    """Why the inf-cl peer cannot run here ("" when it can)."""
    try:
        import inf_cl  # noqa: F401
    except Exception as e:  # ImportError, or triton missing
        first = str(e).splitlines()[0][:80] if str(e) else ""
        return f"skipped, inf_cl is not importable ({type(e).__name__}: {first})"
    if not _cuda(device):
        return "skipped, inf-cl's Triton kernels run on CUDA only"
    return ""


def _peer_rows(B, D, device, smoke, peak_tflops):
    """gamma = 0, M = 0 (what Inf-CL computes): inf-cl beside kalm_fast and torch_naive, inf-cl's gradients checked
    first against the chunked torch reference (O((B + N) D) memory: the naive one's B x N logits need 137 GB at
    B = 65,536, and its OOM there is a row of the picture, not a reason to drop inf-cl's)."""
    dtype = torch.bfloat16 if _cuda(device) else torch.float32
    N = B * G
    shape = f"B={B} N={N} D={D} M=0 gamma=0"
    q, d, _ = _inputs(B, D, 0, dtype, device)
    want = torch.autograd.grad(_loss_fn("torch_chunked", B, 0, None, device, 0.0)(q, d), (q, d))
    got = torch.autograd.grad(_loss_fn("inf-cl", B, 0, None, device, 0.0)(q, d), (q, d))
    for name, a, b in zip(("dq", "dd"), got, want):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
        if err > 2e-2:
            raise AssertionError(f"inf-cl's {name} differs from torch_chunked's by {err:.3g} of its largest entry")
    rows = []
    providers = ["inf-cl", "kalm_fast", "torch_naive"]  # no torch.compile: a minute a shape (GPU session budget)
    for provider in common.within_budget(SUITE, OP, providers, lambda p: f"{p} {shape}", dtype, device, rows):
        for mode, flops in (("fwd", 2 * B * N * D), ("fwd+bwd", 8 * B * N * D)):
            try:
                q, d, _ = _inputs(B, D, 0, dtype, device)
                step = _step(_loss_fn(provider, B, 0, None, device, 0.0), q, d, mode)
                peak = common.peak_memory_mb(step, device)
                times = _time(step, device)
            except Exception as error:  # out of memory: reported, not dropped
                rows.append(common.failed_row(SUITE, OP, provider, mode + " g0", shape, dtype, device, error))
                continue
            finally:
                torch.cuda.empty_cache()
            rows.append(common.row(SUITE, OP, provider, mode + " g0", shape, dtype, device, times, flops=flops,
                                   peak_mem_mb=peak, note=f"{flops / (times[0] * 1e-3) / 1e12 / peak_tflops:.0%} of "
                                   "matmul; gamma 0, M 0: the configuration inf-cl supports"))
    return rows


PEER_B = (16384, 4096, 65536)  # inf-cl's rows (D = 1024): the loss-memory-vs-B picture; the target's B first


def run(*, smoke: bool, device: str) -> list[dict]:
    torch.manual_seed(0)
    matmul = _matmul_row(device, smoke)
    rows = [matmul]
    shapes = SMOKE_SHAPES if smoke else (GPU_SHAPES if _cuda(device) else CPU_SHAPES)
    dtype = torch.bfloat16 if _cuda(device) else torch.float32
    reason = inf_cl_reason(device)
    if reason:
        rows.append(common.failed_row(SUITE, OP, "inf-cl", "-", "gamma=0 M=0", torch.float32, device,
                                      ImportError(reason)))
    peer_b = [] if reason else list((64,) if smoke else PEER_B)
    # best first (a --budget-s run stops before its next item): the two targets' shapes (B = 16k with mixing, then
    # inf-cl's at B = 16k), then the other shapes, then inf-cl's other batch sizes
    items = ([("shape", x) for x in shapes[:1]] + [("inf-cl", b) for b in peer_b[:1]]
             + [("shape", x) for x in shapes[1:]] + [("inf-cl", b) for b in peer_b[1:]])
    name = lambda item: "B={} D={} M={}".format(*item[1]) if item[0] == "shape" else f"inf-cl B={item[1]}"
    for kind, item in common.within_budget(SUITE, OP, items, name, dtype, device, rows):
        if kind == "shape":
            rows += _shape_rows(*item, device, smoke, matmul["tflops"])
            continue
        try:
            rows += _peer_rows(item, 32 if smoke else 1024, device, smoke, matmul["tflops"])
        except Exception as error:  # the check failed: no timing of a peer that computes something else
            rows.append(common.failed_row(SUITE, OP, "inf-cl", "-", f"B={item} gamma=0 M=0", torch.bfloat16,
                                          device, error))
    return rows


def main(argv=None) -> None:
    args = common.standard_args(__doc__.splitlines()[0]).parse_args(argv)
    common.report(run(smoke=args.smoke, device=args.device), args.device, stem=SUITE, write=not args.no_write)


if __name__ == "__main__":
    main()
