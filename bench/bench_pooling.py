"""Pooling bench (SPEC 7): fused RMSNorm -> masked mean -> L2 normalize, GB/s against the measured copy bandwidth.

    python -m bench.bench_pooling [--smoke] [--device cuda] [--no-write]

Providers, measured side by side in one run on one device (bf16):
  kalm_fast      the public op: ``masked_mean_pool`` on equal-length batches, the unchecked varlen entry the Embedder
                 uses (``ops.varlen_mean_pool_unchecked``, no host sync) on the packed tokens of a length mix.
                 Triton on CUDA; off CUDA the torch path of SPEC 3 runs, and the note says which.
  torch          what a PyTorch user writes, unfused, in the input dtype on the padded batch: the nn.RMSNorm module,
                 the masked mean, F.normalize.
  torch.compile  the same function compiled (CUDA only, skipped with --smoke: compiling takes minutes on CPU).
  copy           ``dst.copy_(src)`` of a buffer far larger than L2: the achievable HBM bandwidth of this run.
GB/s divides the op's minimal traffic on the real (pooled) tokens by the time, the same byte count for every provider
(so the column compares times): forward reads the T x H hidden states, the mask and the weight and writes B x H;
fwd+bwd also reads the hidden states again and the output gradient, and writes the T x H and H gradients. Each
non-copy row's note gives its GB/s as a share of the copy row's (target for kalm_fast: >= 80%).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench import common
from kalm_fast import ops

SUITE = "pooling"
OP = "pool_rmsnorm_l2"
EPS = 1e-6
DTYPE = torch.bfloat16
# Calls per timed sample on CUDA: the CPU launch cost of one call (Triton's Python launcher, eager's chain of small
# kernels) then overlaps the previous call's GPU work, as it does inside a training step.
INNER_CUDA = 5

# (B, shortest, longest, H): equal lengths when shortest == longest, else lengths uniform in [shortest, longest]
# (B, min length, max length, H): a size sweep at H=896 (GB/s vs size), H=1024, and a varlen mix
# best first (a run with --budget-s stops before its next shape): mixed lengths (the varlen path), then equal ones
SHAPES = [(256, 16, 512, 896), (16, 512, 512, 896), (64, 512, 512, 896), (256, 512, 512, 896), (1024, 512, 512, 896),
          (128, 512, 512, 1024)]
SMOKE_SHAPES = [(4, 64, 64, 128), (2, 64, 64, 256), (4, 8, 64, 128)]


def torch_pool(hidden, mask, norm):
    """hidden (B, S, H), mask (B, S) bool, norm an nn.RMSNorm -> (B, H); every op in hidden's dtype."""
    x = norm(hidden)
    m = mask.to(x.dtype).unsqueeze(-1)
    return F.normalize((x * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)


def _time(fn, device):
    inner = INNER_CUDA if str(device).startswith("cuda") else 1

    def many():
        for _ in range(inner):
            fn()

    return tuple(t / inner for t in common.bench_ms(many, device))


def _fwd_bwd(forward, inputs, grad):
    def step():
        torch.autograd.grad(forward(*inputs), inputs, grad)

    return step


def _no_grad(forward, inputs):
    def step():
        with torch.no_grad():
            forward(*inputs)

    return step


def _copy_row(device, smoke):
    n = 2**20 if smoke else 2**28  # bf16 elements: 512 MiB per buffer on GPU, ten times the H100/H200 L2
    src = torch.randn(n, device=device).to(DTYPE)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()
    times = _time(lambda: dst.copy_(src), device)
    return common.row(SUITE, "copy", "copy", "copy_", f"{nbytes // 2 >> 20} MiB", DTYPE, device, times,
                      nbytes=nbytes, note="read + write; the roofline of this run")


def _shape_rows(B, lo, hi, H, device, smoke, copy_gbps):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(lo, hi + 1, (B,), generator=g) if lo < hi else torch.full((B,), hi)
    S = hi
    mask = torch.arange(S)[None, :] < lengths[:, None]
    mask = mask.to(device)
    hidden = torch.randn(B, S, H, device=device).to(DTYPE)
    T = int(lengths.sum())
    cu = torch.zeros(B + 1, dtype=torch.int32, device=device)
    cu[1:] = lengths.to(device).cumsum(0)
    norm = torch.nn.RMSNorm(H, eps=EPS, device=device, dtype=DTYPE)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    grad = torch.randn(B, H, device=device).to(DTYPE)

    e = hidden.element_size()
    fwd_bytes = (T * H + H + B * H) * e + T  # hidden, weight, output; bool mask
    bwd_bytes = (2 * T * H + B * H + H) * e + T  # hidden again, dx, output grad, dweight; mask again
    equal = lo == hi
    shape = f"B={B} S={S} H={H}" if equal else f"B={B} S={lo}..{hi} (T={T}, padded {B * S}) H={H}"
    path = "triton" if ops.use_triton(hidden) else "torch path (no CUDA)"

    if equal:
        kalm_inputs = (hidden.clone().requires_grad_(), norm.weight)
        kalm = lambda x, w: ops.masked_mean_pool(x, mask, norm="rmsnorm", norm_weight=w, eps=EPS)
        kalm_note = f"{path}, masked_mean_pool"
    else:
        kalm_inputs = (hidden[mask].requires_grad_(), norm.weight)
        kalm = lambda x, w: ops.varlen_mean_pool_unchecked(x, cu, None, "rmsnorm", w, None, EPS, True)
        kalm_note = f"{path}, varlen on the T packed tokens"
    torch_inputs = (hidden.clone().requires_grad_(), norm.weight)
    providers = [
        ("kalm_fast", kalm, kalm_inputs, kalm_note),
        ("torch", lambda x, w: torch_pool(x, mask, norm), torch_inputs, "eager, padded"),
    ]
    if not smoke and str(device).startswith("cuda"):
        compiled = torch.compile(torch_pool)
        providers.append(("torch.compile", lambda x, w: compiled(x, mask, norm), torch_inputs, "padded"))

    rows = []
    # the deadline is checked before each provider too: torch.compile (last) compiles each shape anew
    for provider, forward, inputs, note in common.within_budget(SUITE, OP, providers, lambda p: f"{p[0]} {shape}",
                                                                DTYPE, device, rows):
        for mode, step, nbytes in (("fwd", _no_grad(forward, inputs), fwd_bytes),
                                   ("fwd+bwd", _fwd_bwd(forward, inputs, grad), fwd_bytes + bwd_bytes)):
            try:
                times = _time(step, device)
                peak = common.peak_memory_mb(step, device)
            except Exception as error:  # an unsupported or out-of-memory provider is reported, not dropped
                rows.append(common.failed_row(SUITE, OP, provider, mode, shape, DTYPE, device, error))
                continue
            share = nbytes / (times[0] * 1e-3) / 1e9 / copy_gbps
            rows.append(common.row(SUITE, OP, provider, mode, shape, DTYPE, device, times, nbytes=nbytes,
                                   peak_mem_mb=peak, note=f"{note}; {share:.0%} of copy"))
    return rows


def run(*, smoke: bool, device: str) -> list[dict]:
    torch.manual_seed(0)
    copy = _copy_row(device, smoke)
    rows = [copy]
    shapes = SMOKE_SHAPES if smoke else SHAPES
    for B, lo, hi, H in common.within_budget(SUITE, OP, shapes, lambda s: "B={} S={}..{} H={}".format(*s), DTYPE,
                                             device, rows):
        rows += _shape_rows(B, lo, hi, H, device, smoke, copy["gbps"])
    return rows


def main(argv=None) -> None:
    args = common.standard_args(__doc__.splitlines()[0]).parse_args(argv)
    common.report(run(smoke=args.smoke, device=args.device), args.device, stem=SUITE, write=not args.no_write)


if __name__ == "__main__":
    main()
