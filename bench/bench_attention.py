"""Attention throughput: kalm_fast varlen vs torch SDPA (each backend) on the padded batch vs flash-attn (SPEC 7).

    python -m bench.bench_attention            # GPU sizes, bf16, rows appended to bench/results/<device>/attention.csv
    python -m bench.bench_attention --smoke    # tiny CPU sizes, seconds (CI)

For each length mix (equal 512, uniform 16-512, long tail up to 4096) and head dim (64, 128): fwd, bwd and fwd+bwd time,
TFLOP/s and peak memory per provider. kalm_fast runs on the packed batch (``kalm_fast.ops.flash_attn_varlen_unchecked``,
the unchecked dispatch the model glue calls: no host sync); SDPA runs on the padded (B, S, H, D) batch with a key
padding mask (none when all lengths are equal). Peers on the packed batch, each skipped with a one-line row saying why
when it cannot run here: torch's own ``torch.nn.attention.varlen.varlen_attn`` (CUDA only), flash-attn 2
(``flash_attn``) and flash-attn-4 (``flash_attn.cute``) when importable. Before a packed provider is timed its output is
compared with ``reference.flash_attn_varlen_func`` (fp32) on the same inputs; a mismatch fails its row.
FLOPs follow flash-attention's convention on the *real* lengths for every provider, fwd = sum_b 4 s_b^2 H D,
bwd = 2.5 fwd: the padded providers do more work for the same result, and that shows as lower TFLOP/s. Each kalm_fast
row's note gives its speedup over the best SDPA backend of the same mix, head dim and mode (Triton path only). A
backend that refuses the mask or the shape, or runs out of memory, gets a failed row with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import common
from kalm_fast import ops, reference

SUITE = "attention"
MODES = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}  # FLOPs as multiples of the forward's
SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}


# ----------------------------------------------------------------------------------------------------------------
# workloads
# ----------------------------------------------------------------------------------------------------------------


def length_mixes(smoke: bool) -> list[tuple[str, list[int]]]:
    """(name, lengths) per mix, drawn from a fixed seed. Full sizes hold ~16k real tokens per batch."""
    g = torch.Generator().manual_seed(0)
    randint = lambda lo, hi, n: torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    if smoke:
        return [
            ("equal-32", [32] * 4),
            ("equal-64", [64] * 2),
            ("uniform-16-64", randint(16, 64, 3)),
            ("long-tail", randint(8, 24, 3) + [128]),
        ]
    # equal lengths from 128 to 4096 at 16k tokens a batch: the TFLOP/s-vs-sequence-length curve
    equal = [(f"equal-{s}", [s] * (16384 // s)) for s in (128, 256, 512, 1024, 2048, 4096)]
    return [
        *equal,
        ("uniform-16-512", randint(16, 512, 64)),
        # embedding corpora: most texts short, a few long documents
        ("long-tail", randint(16, 128, 56) + randint(512, 1024, 5) + [2048, 3000, 4096]),
    ]


def fwd_flops(lengths: list[int], H: int, D: int) -> float:
    return float(sum(4 * s * s * H * D for s in lengths))


# ----------------------------------------------------------------------------------------------------------------
# providers: each returns (forward closure, differentiable leaf inputs, output gradient)
# ----------------------------------------------------------------------------------------------------------------


def _packed(lengths, H, D, dtype, device):
    T = sum(lengths)
    q, k, v = (torch.randn(T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return q, k, v, cu.to(device), torch.randn(T, H, D, device=device, dtype=dtype)


def kalm_fast_provider(lengths, H, D, dtype, device):
    q, k, v, cu, dout = _packed(lengths, H, D, dtype, device)
    max_seqlen = max(lengths)
    return (lambda: ops.flash_attn_varlen_unchecked(q, k, v, cu, max_seqlen)), (q, k, v), dout


def _sdpa_refusal(name: str, caught: list, device) -> RuntimeError:
    """SDPA explains why a backend cannot run only in warnings (on CUDA), one reason a warning, each after a header
    warning ("Memory efficient kernel not used because:") and every one ending in "(Triggered internally at
    <file>:<line>.)"; put the reasons themselves in the error, and so in the failed row's note."""
    reasons = []
    for w in caught:
        for line in str(w.message).splitlines():
            line = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?\s*$", "", line).strip()
            if line and not line.endswith("because:") and line not in reasons:
                reasons.append(line)
    return RuntimeError(f"{name} refused: {'; '.join(reasons) or f'no kernel for this input on {device}'}")


def sdpa_provider(backend: SDPBackend, name: str):
    def make(lengths, H, D, dtype, device):
        B, S = len(lengths), max(lengths)
        mask = torch.arange(S, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]  # (B, S)
        # the padded (B, S, H, D) layout of a transformers model, made leaves so that grads land on them
        q, k, v = (torch.randn(B, S, H, D, device=device, dtype=dtype).masked_fill(~mask[..., None, None], 0)
                   .requires_grad_() for _ in range(3))
        dout = torch.randn(B, S, H, D, device=device, dtype=dtype) * mask[..., None, None]  # padded rows: no loss
        attn_mask = None if min(lengths) == S else mask[:, None, None, :]  # (B, 1, 1, S) key padding mask

        def fwd():
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     attn_mask=attn_mask)
            return out.transpose(1, 2)

        # probe once, outside the timed calls: a backend that refuses this input raises here, with SDPA's reasons
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            try:
                fwd()
            except RuntimeError as e:
                if "No viable backend" in str(e) or "No available kernel" in str(e):
                    raise _sdpa_refusal(name, caught, q.device.type) from e
                raise
        return fwd, (q, k, v), dout

    return make


def _flash_attn_provider(module: str):
    def make(lengths, H, D, dtype, device):
        fn = importlib.import_module(module).flash_attn_varlen_func
        q, k, v, cu, dout = _packed(lengths, H, D, dtype, device)
        max_seqlen = max(lengths)

        def fwd():
            out = fn(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
                     causal=False)
            return out[0] if isinstance(out, tuple) else out  # flash-attn-4 also returns the lse

        return fwd, (q, k, v), dout

    return make


def varlen_attn_provider(lengths, H, D, dtype, device):
    from torch.nn.attention.varlen import varlen_attn

    q, k, v, cu, dout = _packed(lengths, H, D, dtype, device)
    max_seqlen = max(lengths)
    return (lambda: varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen)), (q, k, v), dout


PACKED = ("kalm_fast", "kalm_fast-autotune", "varlen_attn", "flash-attn", "flash-attn-4")


def _check_packed(name: str, fwd, inputs, lengths) -> None:
    """A packed provider's forward against reference.flash_attn_varlen_func in fp32, before it is timed."""
    q, k, v = inputs
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    with torch.no_grad():
        got = fwd().float()
        want = reference.flash_attn_varlen_func(q.float(), k.float(), v.float(), cu.to(q.device), max(lengths)).float()
    tol = 1e-4 if q.dtype == torch.float32 else 2e-2  # bf16: the output's rounding and bf16 P @ V
    err = (got - want).abs().max().item()
    if not err <= tol:
        raise AssertionError(f"{name} differs from reference.flash_attn_varlen_func by {err:.3g} (> {tol}): not timed")


def _module_reason(module: str) -> str:
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a CUDA-only package failing at import
        first = str(e).splitlines()[0][:80] if str(e) else ""
        return f"skipped, {module} is not importable ({type(e).__name__}: {first})"
    return ""


def peers(device: str) -> tuple[dict, dict[str, str]]:
    """(name -> provider) of the peers that can run here, and (name -> one-line reason) of those that cannot."""
    out, skipped = {}, {}
    cuda = str(device).startswith("cuda")
    reason = _module_reason("torch.nn.attention.varlen")
    if not reason and not cuda:
        reason = "skipped, torch's varlen_attn runs on CUDA only"
    if reason:
        skipped["varlen_attn"] = reason
    else:
        out["varlen_attn"] = varlen_attn_provider
    for name, module in (("flash-attn", "flash_attn"), ("flash-attn-4", "flash_attn.cute")):
        reason = "" if importlib.util.find_spec(module.split(".")[0]) else \
            f"skipped, {module.split('.')[0]} is not installed"
        if not reason:
            reason = _module_reason(module)
        if not reason and not cuda:
            reason = f"skipped, {name} runs on CUDA only"
        if name == "flash-attn-4" and reason and os.environ.get("KALM_FAST_GPU_SESSION"):
            reason += " (its nvidia-cutlass-dsl wheels, ~96 MB, exceed one transfer to the GPU machine)"
        if reason:
            skipped[name] = reason
        else:
            out[name] = _flash_attn_provider(module)
    return out, skipped


def providers(device: str) -> dict:
    # KALM_FAST_AUTOTUNE=1 (bench/gpu_session.sh's second pass): the autotuned kernels, reported under their own name
    out = {"kalm_fast-autotune" if os.environ.get("KALM_FAST_AUTOTUNE") == "1" else "kalm_fast": kalm_fast_provider}
    out.update({name: sdpa_provider(backend, name) for name, backend in SDPA_BACKENDS.items()})
    out.update(peers(device)[0])
    return out


# ----------------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------------


def _mode_fn(mode: str, fwd, inputs, dout):
    if mode == "fwd":  # inference: no autograd graph
        def run():
            with torch.no_grad():
                return fwd()

        return run
    if mode == "bwd":  # one forward kept alive, backward timed alone
        out = fwd()
        return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)
    return lambda: torch.autograd.grad(fwd(), inputs, dout)


def _free(device: str):
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def run(*, smoke: bool, device: str) -> list[dict]:
    dtype = torch.float32 if smoke else torch.bfloat16  # the CPU smoke run checks plumbing; fp32 is fastest there
    H = 2 if smoke else 16
    head_dims = (64,) if smoke else (64, 128)
    warmup, rep = (1, 3) if smoke else (5, 30)
    kalm_note = "" if ops.use_triton(torch.empty(0, device=device)) else \
        "torch path (off GPU the Triton interpreter is no speed test)"
    rows = [common.failed_row(SUITE, "attention_varlen", name, "-", "-", dtype, device, ImportError(reason))
            for name, reason in peers(device)[1].items()]
    shapes = [(mix, lengths, D) for mix, lengths in length_mixes(smoke) for D in head_dims]
    if not smoke:  # best first (a --budget-s run stops before its next shape): the mixed lengths of the targets
        shapes.sort(key=lambda s: not s[0].startswith(("long-tail", "uniform")))
    for mix, lengths, D in common.within_budget(SUITE, "attention_varlen", shapes, lambda s: f"{s[0]} D={s[2]}",
                                                dtype, device, rows):
        shape = f"{mix} B={len(lengths)} T={sum(lengths)} Smax={max(lengths)} H={H} D={D}"
        flops = fwd_flops(lengths, H, D)
        by_mode: dict[str, dict[str, dict]] = {m: {} for m in MODES}
        for name, make in providers(device).items():
            for mode, factor in MODES.items():
                try:
                    fwd, inputs, dout = make(lengths, H, D, dtype, device)
                    if name in PACKED:
                        _check_packed(name, fwd, inputs, lengths)
                    fn = _mode_fn(mode, fwd, inputs, dout)
                    times = common.bench_ms(fn, device, warmup=warmup, rep=rep)
                    peak = common.peak_memory_mb(fn, device)
                    r = common.row(SUITE, "attention_varlen", name, mode, shape, dtype, device, times,
                                   flops=factor * flops, peak_mem_mb=peak,
                                   note=kalm_note if name.startswith("kalm_fast") else "")
                except Exception as e:  # refused mask/shape, out of memory, missing package: a failed row
                    r = common.failed_row(SUITE, "attention_varlen", name, mode, shape, dtype, device, e)
                finally:
                    fwd = inputs = dout = fn = None
                    _free(device)
                by_mode[mode][name] = r
                rows.append(r)
        if not kalm_note:  # a speedup of the CPU torch path would mean nothing
            for results in by_mode.values():
                _note_speedup(results)
    return rows


def _note_speedup(results: dict[str, dict]) -> None:
    """Append 'Nx vs best SDPA (backend)' to the kalm_fast row of one (mix, D, mode)."""
    kalm = results.get("kalm_fast") or results.get("kalm_fast-autotune")  # KALM_FAST_AUTOTUNE=1 names it so
    sdpa = {n: r["median_ms"] for n, r in results.items() if n.startswith("sdpa-") and r["median_ms"] != ""}
    if not kalm or kalm["median_ms"] == "" or not sdpa:
        return
    best = min(sdpa, key=sdpa.get)
    speedup = f"{sdpa[best] / kalm['median_ms']:.2f}x vs best SDPA ({best})"
    kalm["note"] = f"{kalm['note']}; {speedup}" if kalm["note"] else speedup


def main(argv=None) -> None:
    args = common.standard_args(__doc__.splitlines()[0]).parse_args(argv)
    common.report(run(smoke=args.smoke, device=args.device), args.device, stem=SUITE, write=not args.no_write)


if __name__ == "__main__":
    main()
