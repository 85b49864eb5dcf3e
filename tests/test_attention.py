"""Bidirectional varlen flash attention (kernels/attention.py) against the fp32 oracle
``kalm_fast.reference.flash_attn_varlen_func``: forward out and lse, backward dq/dk/dv.

Tolerances:
- fp16/bf16, the 2x rule (STYLE.md): the kernel's max abs error vs the fp32 reference is at most twice the error of
  PyTorch computing the same attention in the same low precision (``_oracle_in_dtype``: the oracle with
  ``compute_dtype`` = the inputs' dtype, i.e. matmuls, softmax and logsumexp in fp16/bf16, backward by autograd in
  that dtype), plus a 1e-5 floor for the case where that error is 0.
- fp32: the exact result in float64 and an elementwise forward-error bound (tests/bounds.py: K u times the same
  quantity on absolute values, sum|q||k|, sum P|v|, ..., with the score errors propagated through the softmax); the
  kernel must lie within 2x that bound of the truth. The bound holds for any summation order, so the verdict is the
  same on every CPU (AVX-512 or AVX2 BLAS, numpy under the interpreter) and GPU; a real bug is orders of magnitude
  past it. Large scores (test_extreme_scores_stay_finite, |S| ~ 130) widen it through e_S ~ D u |S|, as they should.
On CPU the Triton kernels run under TRITON_INTERPRET=1 (conftest) with one 128x128 tile config and fp32 arithmetic
inside (the interpreter's low-precision arithmetic is unreliable), so CPU covers fp32 and fp16; bf16 and the
autotuned configs are covered by the GPU tests.
"""

from __future__ import annotations

import bounds
import pytest
import torch
from conftest import DEVICE, assert_close, cu_seqlens_of, packed_qkv

import kalm_fast
from kalm_fast import reference

FLOOR = 1e-5


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    """Force the Triton kernels (interpreted on CPU) behind kalm_fast.flash_attn_varlen_func."""
    monkeypatch.setenv("KALM_FAST_BACKEND", "triton")


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _grads(out, lse, dout, dlse, inputs):
    loss = (out.float() * dout).sum()
    if dlse is not None:
        loss = loss + (lse.float() * dlse).sum()
    return torch.autograd.grad(loss, inputs)


def _kalm(q, k, v, cu, max_seqlen, dout, dlse=None, scale=None):
    """out, lse, (dq, dk, dv) through the public API, asserting that the Triton path ran."""
    out, lse = kalm_fast.flash_attn_varlen_func(q, k, v, cu, max_seqlen, softmax_scale=scale, return_lse=True)
    assert type(out.grad_fn).__name__ == "_FlashAttnVarlenFunctionBackward", "the Triton kernel did not run"
    return out, lse, _grads(out, lse, dout, dlse, (q, k, v))


def _oracle(q, k, v, cu, max_seqlen, dout, dlse=None, scale=None):
    """The fp32 reference on fp32 copies of the same inputs."""
    q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
    out, lse = reference.flash_attn_varlen_func(q, k, v, cu, max_seqlen, scale, True)
    return out, lse, _grads(out, lse, dout, dlse, (q, k, v))


def _oracle_in_dtype(q, k, v, cu, dout, dlse=None, scale=None):
    """The oracle computed in the inputs' own dtype (``compute_dtype``, no upcast): in fp16/bf16 the error baseline
    of the 2x rule."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = reference.flash_attn_varlen_func(q, k, v, cu, 0, scale, True, compute_dtype=q.dtype)
    return out, lse, _grads(out, lse, dout, dlse, (q, k, v))


NAMES = ("out", "lse", "dq", "dk", "dv")


def _flat(result):
    out, lse, grads = result
    return (out, lse, *grads)


def _check(kalm, oracle, lowp, dtype):
    """Compare (out, lse, (dq, dk, dv)) triples with the fp32 oracle under the 2x rule against PyTorch's own
    low-precision result ``lowp`` (fp16/bf16; fp32 goes through _check_fp32)."""
    for name, got in zip(NAMES, _flat(kalm)):
        assert got.dtype == (torch.float32 if name == "lse" else dtype), f"{name}: dtype {got.dtype}"
    _check_2x(kalm, oracle, lowp)


def _check_fp32(kalm, q, k, v, cu, dout, dlse=None, scale=None, names=NAMES):
    """fp32: every tensor of ``kalm`` within the forward-error bound of the float64 truth (module docstring)."""
    truth, bound = bounds.attention(q, k, v, cu, dout, dlse, scale)
    for name, got in zip(names, _flat(kalm)):
        assert got.dtype == torch.float32, f"{name}: dtype {got.dtype}"
        bounds.assert_within(name, got, truth[name], bound[name])


def _check_2x(kalm, truth, baseline):
    """Every tensor of ``kalm`` is within 2x the max abs error of ``baseline`` (PyTorch in the same precision) from
    ``truth``, plus FLOOR."""
    for name, got, ref, low in zip(NAMES, _flat(kalm), _flat(truth), _flat(baseline)):
        ref = ref.double()
        torch_err = (low.double() - ref).abs().max().item()
        assert_close(got.double(), ref, atol=2 * torch_err + FLOOR, rtol=0, name=f"{name} (2x torch's error)")


# ----------------------------------------------------------------------------------------------------------------
# forward + backward vs the reference (CPU: interpreter)
# ----------------------------------------------------------------------------------------------------------------

CASES = [
    pytest.param((1, 97, 200), 2, 2, 64, id="irregular-d64"),
    pytest.param((0, 37, 0, 130, 0), 2, 2, 64, id="zero-length-start-middle-end"),
    pytest.param((97, 128), 4, 2, 80, id="gqa-d80"),
    pytest.param((200, 33), 4, 1, 128, id="mqa-d128"),
    pytest.param((256, 3), 2, 2, 32, id="block-multiple"),  # a sequence that is exactly 2 tiles: no tail block
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lengths,Hq,Hkv,D", CASES)
def test_forward_backward_matches_reference(lengths, Hq, Hkv, D, dtype):
    q, k, v, cu, max_seqlen = packed_qkv(lengths, Hq, Hkv, D, dtype)
    dout = torch.randn(q.shape, device=DEVICE)
    kalm = _kalm(q, k, v, cu, max_seqlen, dout)
    if dtype == torch.float32:
        _check_fp32(kalm, q, k, v, cu, dout)
    else:
        _check(kalm, _oracle(q, k, v, cu, max_seqlen, dout), _oracle_in_dtype(q, k, v, cu, dout), dtype)


def test_long_sequence():
    """1025 tokens = 8 full tiles + 1 row: the longest online softmax of the CPU tests (fp32 only, the interpreter's
    cost grows with tiles^2; fp16 rounding is covered by the cases above)."""
    q, k, v, cu, max_seqlen = packed_qkv((1, 1025, 97), 1, 1, 32, torch.float32)
    dout = torch.randn(q.shape, device=DEVICE)
    _check_fp32(_kalm(q, k, v, cu, max_seqlen, dout), q, k, v, cu, dout)


@pytest.mark.parametrize("use_out", [True, False], ids=["out-and-lse", "lse-only"])
def test_lse_gradient(use_out):
    """A gradient reaching lse is supported (dS gets + P * dlse), also when out itself is unused."""
    q, k, v, cu, max_seqlen = packed_qkv((0, 150, 41), 4, 2, 64, torch.float32)
    dout = torch.randn(q.shape, device=DEVICE) if use_out else torch.zeros(q.shape, device=DEVICE)
    dlse = torch.randn(q.shape[1], q.shape[0], device=DEVICE)
    out, lse = kalm_fast.flash_attn_varlen_func(q, k, v, cu, max_seqlen, return_lse=True)
    loss = (lse * dlse).sum() + ((out * dout).sum() if use_out else 0.0)
    grads = torch.autograd.grad(loss, (q, k, v))
    _check_fp32((out, lse, grads), q, k, v, cu, dout, dlse)
    assert grads[0].abs().max() > 0.1  # the lse term really contributes


@pytest.mark.parametrize("lengths", [(0, 0), ()], ids=["all-empty", "no-sequence"])
def test_empty_batch(lengths):
    q, k, v, cu, _ = packed_qkv(lengths, 2, 1, 64, torch.float16)
    out, lse = kalm_fast.flash_attn_varlen_func(q, k, v, cu, 0, return_lse=True)
    assert out.shape == (0, 2, 64) and out.dtype == torch.float16 and lse.shape == (2, 0)
    dq, dk, dv = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_softmax_scale_and_strided_inputs():
    """A custom softmax_scale, and q/k/v that are views into one fused qkv projection (token stride != H * D)."""
    lengths, Hq, Hkv, D = (70, 130), 2, 1, 64
    T = sum(lengths)
    qkv = torch.randn(T, Hq + 2 * Hkv, D, device=DEVICE, requires_grad=True)
    q, k, v = qkv.split([Hq, Hkv, Hkv], dim=1)
    cu = cu_seqlens_of(lengths)
    out, lse = kalm_fast.flash_attn_varlen_func(q, k, v, cu, max(lengths), softmax_scale=0.3, return_lse=True)
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad((out * dout).sum(), qkv)
    _check_fp32((out, lse, g.split([Hq, Hkv, Hkv], dim=1)), q, k, v, cu, dout, scale=0.3)


# the dK/dV program's padded key rows (k = 0) overflow to inf/NaN there; they are never stored and, matmul rows being
# independent, never reach real rows (asserted by the comparison)
@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_extreme_scores_stay_finite():
    """Scores around -130 (lse < -88): a padded key (k = 0, score 0) would get P = exp(0 - lse) = inf if the dQ loop
    did not mask it. Such scores also amplify rounding (|score| * eps ~ 2e-5, and dQ sums P * (dP - delta) terms that
    cancel): the bound carries that through e_S = D u |scale q||k|."""
    lengths, H, D = (97, 130), 2, 32
    T = sum(lengths)
    q = (1.0 + 0.3 * torch.randn(T, H, D, device=DEVICE)).requires_grad_()
    k = (-1.0 + 0.3 * torch.randn(T, H, D, device=DEVICE)).requires_grad_()
    v = torch.randn(T, H, D, device=DEVICE, requires_grad=True)
    cu, max_seqlen = cu_seqlens_of(lengths), max(lengths)
    dout = torch.randn(T, H, D, device=DEVICE)
    kalm = _kalm(q, k, v, cu, max_seqlen, dout, scale=4.0)
    assert kalm[1].max() < -88  # exp(-lse) overflows fp32
    _check_fp32(kalm, q, k, v, cu, dout, scale=4.0)


def test_many_sequences_launch_in_chunks(monkeypatch):
    """Batches with more sequences than a CUDA grid dimension holds (65535) are launched in chunks of cu_seqlens;
    exercised here with a chunk of 2 sequences."""
    from kalm_fast.kernels import attention

    monkeypatch.setattr(attention, "_MAX_GRID_YZ", 2)
    q, k, v, cu, max_seqlen = packed_qkv((3, 0, 40, 17, 5), 2, 1, 32, torch.float32)
    dout = torch.randn(q.shape, device=DEVICE)
    _check_fp32(_kalm(q, k, v, cu, max_seqlen, dout), q, k, v, cu, dout)


def test_unequal_tiles(monkeypatch):
    """BLOCK_M != BLOCK_N in every kernel (the GPU autotune configs mostly are), with a non-power-of-two head dim."""
    from kalm_fast.kernels import attention

    tiles = {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dq": (64, 32, 4, 1)}
    monkeypatch.setattr(attention.configs, "INTERPRETER_TILES", tiles)
    q, k, v, cu, max_seqlen = packed_qkv((1, 97, 0, 64), 4, 2, 40, torch.float32)
    dout = torch.randn(q.shape, device=DEVICE)
    _check_fp32(_kalm(q, k, v, cu, max_seqlen, dout), q, k, v, cu, dout)


@pytest.mark.parametrize("major,smem,arch", [(9, 232448, "sm_90"), (8, 166912, "sm_80"), (8, 101376, "sm_80"),
                                             (10, 232448, "sm_100"), (12, 101376, "sm_80")],
                         ids=["h100", "a100", "sm86", "b200", "sm120"])
def test_pinned_config_fits_the_device(monkeypatch, major, smem, arch):
    """The launcher's choice on a GPU: the table of the device's arch (``device_arch``: Blackwell datacenter parts
    have their own compile-verified rows; consumer Blackwell, mma.sync and 99 KB, reads sm_80's), its pinned (first)
    config when the device has the shared memory it measured, else the first surviving config that fits (an sm_86
    reading the sm_80 table)."""
    from kalm_fast.kernels import attention_configs, utils

    monkeypatch.setattr(utils, "_device_facts", lambda index: (major, smem, 132))
    monkeypatch.setattr(utils, "interpreting", lambda: False)
    dev = torch.device("cuda", 0)
    assert utils.device_arch(dev) == arch
    keys = [key for key in attention_configs.PINNED if key[1] == arch]
    assert keys, arch
    for key in keys:
        rows = attention_configs.PINNED[key]
        chosen = utils.pick(attention_configs.PINNED, key, dev)
        fitting = [r for r in rows if r[-1] <= smem]
        assert chosen == (fitting[0] if fitting else min(rows, key=lambda r: r[-1])), key


# ----------------------------------------------------------------------------------------------------------------
# padded API, determinism
# ----------------------------------------------------------------------------------------------------------------


def test_padded_equals_varlen():
    """flash_attn_func with a key padding mask gives the varlen results at real tokens and exact zeros (output and
    gradients) at padded ones; rows: right padding, left padding, no token at all, no padding."""
    B, S, Hq, Hkv, D = 4, 150, 2, 1, 64
    mask = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
    mask[0, :97] = True
    mask[1, 60:] = True
    mask[3, :] = True
    q = torch.randn(B, S, Hq, D, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(B, S, Hkv, D, device=DEVICE, requires_grad=True) for _ in range(2))
    dout = torch.randn(B, S, Hq, D, device=DEVICE)

    out = kalm_fast.flash_attn_func(q, k, v, mask)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))

    lengths = mask.sum(1).tolist()
    packed = [x.detach()[mask].requires_grad_() for x in (q, k, v)]
    out_u = kalm_fast.flash_attn_varlen_func(*packed, cu_seqlens_of(lengths), max(lengths))
    grads_u = torch.autograd.grad((out_u * dout[mask]).sum(), packed)

    assert torch.equal(out[mask], out_u)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    for name, g, g_u in zip(("dq", "dk", "dv"), grads, grads_u):
        assert torch.equal(g[mask], g_u), name
        assert torch.equal(g[~mask], torch.zeros_like(g[~mask])), name


def test_padded_without_mask_equals_varlen():
    B, S, H, D = 2, 45, 2, 32
    q, k, v = (torch.randn(B, S, H, D, device=DEVICE) for _ in range(3))
    out = kalm_fast.flash_attn_func(q, k, v)
    flat = [x.reshape(B * S, H, D) for x in (q, k, v)]
    out_u = kalm_fast.flash_attn_varlen_func(*flat, cu_seqlens_of([S] * B), S)
    assert torch.equal(out.reshape(B * S, H, D), out_u)
    truth, bound = bounds.attention(*flat, cu_seqlens_of([S] * B), torch.zeros_like(flat[0]))
    bounds.assert_within("out", out_u, truth["out"], bound["out"])


def test_backward_is_deterministic():
    q, k, v, cu, max_seqlen = packed_qkv((300, 0, 129), 4, 2, 64, torch.float16)
    dout = torch.randn(q.shape, device=DEVICE)
    first = _kalm(q, k, v, cu, max_seqlen, dout)
    second = _kalm(q, k, v, cu, max_seqlen, dout)
    for name, a, b in zip(("dq", "dk", "dv"), first[2], second[2]):
        assert torch.equal(a, b), f"{name} differs between two identical backward runs"


# ----------------------------------------------------------------------------------------------------------------
# scheduling (issue 12): GQA dK/dV partials, longest sequences first, 16-byte stride units
# ----------------------------------------------------------------------------------------------------------------


def test_dkdv_plan_fills_two_waves():
    """Qwen2-0.5B (14 query / 2 kv heads) with 4 x 1,024 tokens: 128 dK/dV programs on 132 SMs, under one wave; the
    plan gives one program per query head (7 partials per kv head): 896 programs, 6.8 waves."""
    from kalm_fast.kernels.attention_configs import dkdv_plan

    plan = dkdv_plan(T=4096, B=4, max_seqlen=1024, Hkv=2, group=7, block_n=64, num_sms=132)
    assert plan["splits"] == 7 and plan["programs"] == 4 * 16 * 2 * 7 and plan["waves"] >= 2
    # enough programs already, no GQA, no token: one program owns its rows and sums its group, as before
    assert dkdv_plan(T=65536, B=64, max_seqlen=1024, Hkv=2, group=7, block_n=64, num_sms=132)["splits"] == 1
    assert dkdv_plan(T=4096, B=4, max_seqlen=1024, Hkv=2, group=1, block_n=64, num_sms=132)["splits"] == 1
    assert dkdv_plan(T=0, B=3, max_seqlen=0, Hkv=2, group=7, block_n=64, num_sms=132)["splits"] == 1
    # the program bound uses T when max_seqlen would overcount (one long sequence among short ones)
    mixed = dkdv_plan(T=2048 + 63 * 8, B=64, max_seqlen=2048, Hkv=2, group=7, block_n=64, num_sms=132)
    assert mixed["programs"] == (triton_cdiv(2048 + 63 * 8, 64) + 64) * 2 * mixed["splits"]


def triton_cdiv(a, b):
    return -(-a // b)


def test_dkdv_plan_threshold():
    """Over a sweep: partials exactly when the unsplit grid is under two waves (264 programs on 132 SMs) and the
    group has more than one head."""
    from kalm_fast.kernels.attention_configs import dkdv_plan

    for T in (1, 100, 1000, 4096, 8448, 8449, 9000, 20000):
        for group in (1, 2, 4, 7, 8):
            p = dkdv_plan(T=T, B=1, max_seqlen=T, Hkv=2, group=group, block_n=64, num_sms=132)
            base = triton_cdiv(T, 64) * 2
            assert p["splits"] == (group if base < 264 and group > 1 else 1), (T, group, p)
            assert p["programs"] == base * p["splits"]


@pytest.mark.parametrize("Hq", [6, 2], ids=["group-3", "group-1"])
def test_dkdv_partials_match_reference_and_are_deterministic(Hq):
    """Per-query-head partials (GQA group of 3) give dK/dV within the fp32 bound of the float64 truth, like the
    unsplit pass, and two runs are bitwise equal; without GQA (group 1) there is nothing to split."""
    from kalm_fast.kernels import attention

    q, k, v, cu, max_seqlen = packed_qkv((97, 0, 130), Hq, 2, 64, torch.float32)
    dout = torch.randn(q.shape, device=DEVICE)
    dlse = torch.randn(q.shape[1], q.shape[0], device=DEVICE)
    scale = q.shape[-1] ** -0.5
    out, lse = attention.flash_attn_varlen_fwd(q.detach(), k.detach(), v.detach(), cu, max_seqlen, scale)
    runs = [attention.flash_attn_varlen_bwd(dout, q.detach(), k.detach(), v.detach(), out, lse, cu, max_seqlen, scale,
                                            dlse, dkdv_splits=s) for s in (1, 3, 3)]
    truth, bound = bounds.attention(q, k, v, cu, dout, dlse, scale)
    for grads in runs:
        for name, got in zip(("dq", "dk", "dv"), grads):
            bounds.assert_within(name, got, truth[name], bound[name])
    assert torch.equal(runs[0][0], runs[1][0])  # dq does not depend on the dK/dV split
    for a, b in zip(runs[1], runs[2]):
        assert torch.equal(a, b)


def test_planned_splits_through_the_api(monkeypatch):
    """On a (pretend) 132-SM device a small GQA batch takes the partials path by itself; fp16 under the 2x rule."""
    from kalm_fast.kernels import attention

    monkeypatch.setattr(attention, "num_sms", lambda device: 132)
    launches = []
    reduce_kernel = attention._attn_bwd_dkdv_reduce_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return reduce_kernel[grid]

    monkeypatch.setattr(attention, "_attn_bwd_dkdv_reduce_kernel", Spy())
    q, k, v, cu, max_seqlen = packed_qkv((97, 128), 4, 2, 80, torch.float16)
    dout = torch.randn(q.shape, device=DEVICE)
    kalm = _kalm(q, k, v, cu, max_seqlen, dout)
    assert launches, "the dK/dV partials were not used"
    _check(kalm, _oracle(q, k, v, cu, max_seqlen, dout), _oracle_in_dtype(q, k, v, cu, dout), torch.float16)


def test_longest_first_order():
    from kalm_fast.kernels.attention import longest_first

    cu = cu_seqlens_of([3, 0, 40, 17, 40, 3])
    assert longest_first(cu).tolist() == [2, 4, 3, 0, 5, 1]  # ties keep batch order
    assert longest_first(cu).dtype == torch.int32
    assert longest_first(cu_seqlens_of([])).numel() == 0


def test_stride_units():
    """16 bytes of elements when every token and head stride allows it (D = 40: the head stride 40 is not a multiple
    of 16, yet each head row starts 80 bytes = 5 x 16 B apart), else the largest power of two that divides them."""
    from kalm_fast.kernels.attention import stride_unit

    x = lambda *shape, dt=torch.bfloat16: torch.empty(*shape, dtype=dt)
    assert stride_unit(x(10, 14, 40), x(10, 2, 40)) == 8
    assert stride_unit(x(10, 14, 40, dt=torch.float32)) == 4
    assert stride_unit(x(10, 14, 36)) == 4
    assert stride_unit(x(10, 1, 36), x(10, 2, 44)) == 4
    assert stride_unit(x(10, 3, 33)) == 1
    qkv = x(10, 2 + 2 * 1, 40)
    assert stride_unit(*qkv.split([2, 1, 1], dim=1)) == 8


# ----------------------------------------------------------------------------------------------------------------
# input checks of the public boundary
# ----------------------------------------------------------------------------------------------------------------


def _bad_inputs(case):
    q, k, v, cu, max_seqlen = packed_qkv((5, 7), 4, 2, 32, torch.float16)
    if case == "int-dtype":
        q = q.detach().to(torch.int32)
    elif case == "mixed-dtype":
        k = k.detach().float()
    elif case == "heads":
        q = torch.randn(12, 3, 32, dtype=torch.float16, device=DEVICE)
    elif case == "cu-dtype":
        cu = cu.long()
    elif case == "cu-total":
        cu = cu_seqlens_of([5, 6])
    elif case == "cu-decreasing":
        cu = torch.tensor([0, 8, 5, 12], dtype=torch.int32, device=DEVICE)
    elif case == "max-seqlen":
        max_seqlen = 6
    elif case == "head-dim":
        q, k, v = (torch.randn(12, h, 320, dtype=torch.float16, device=DEVICE) for h in (4, 2, 2))
    return q, k, v, cu, max_seqlen


@pytest.mark.parametrize(
    "case,error,match",
    [
        ("int-dtype", TypeError, "q must have dtype"),
        ("mixed-dtype", TypeError, "q, k, v must share a dtype"),
        ("heads", ValueError, r"query heads \(3\) must be a multiple of the key/value heads \(2\)"),
        ("cu-dtype", TypeError, "cu_seqlens must have dtype"),
        ("cu-total", ValueError, "cu_seqlens must start at 0 and end at the number of tokens 12"),
        ("cu-decreasing", ValueError, "cu_seqlens must be non-decreasing"),
        ("max-seqlen", ValueError, r"max_seqlen=6 is smaller than the longest sequence \(7\)"),
        ("head-dim", ValueError, "head dim must be in 1..256"),
    ],
)
def test_input_checks(case, error, match):
    q, k, v, cu, max_seqlen = _bad_inputs(case)
    with pytest.raises(error, match=match):
        kalm_fast.flash_attn_varlen_func(q, k, v, cu, max_seqlen)


def test_padded_input_checks():
    """flash_attn_func names a key_padding_mask on another device (here "meta", which needs no second GPU) instead
    of failing inside the unpadding."""
    q = torch.randn(2, 5, 4, 32, dtype=torch.float16, device=DEVICE)
    mask = torch.ones(2, 5, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="tensors must be on one device.*key_padding_mask: meta"):
        kalm_fast.flash_attn_func(q, q, q, key_padding_mask=mask)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(B, S\) = \(2, 5\)"):
        kalm_fast.flash_attn_func(q, q, q, key_padding_mask=torch.ones(2, 6, dtype=torch.bool, device=DEVICE))


# ----------------------------------------------------------------------------------------------------------------
# GPU: compiled kernels with the autotuned configs, bf16, large shapes, long sequences
# ----------------------------------------------------------------------------------------------------------------

GPU_LENGTHS = (2048, 1, 513, 1000, 77, 1999, 256, 1500)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("Hq,Hkv,D", [(16, 16, 64), (16, 16, 128), (16, 4, 128)],
                         ids=["mha-d64", "mha-d128", "gqa-d128"])
def test_gpu_large_shapes(Hq, Hkv, D, dtype):
    q, k, v, cu, max_seqlen = packed_qkv(GPU_LENGTHS, Hq, Hkv, D, dtype)
    dout = torch.randn(q.shape, device=DEVICE)
    dlse = torch.randn(Hq, q.shape[0], device=DEVICE)
    kalm = _kalm(q, k, v, cu, max_seqlen, dout, dlse)
    oracle = _oracle(q, k, v, cu, max_seqlen, dout, dlse)
    lowp = _oracle_in_dtype(q, k, v, cu, dout, dlse)
    _check(kalm, oracle, lowp, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [40, 96, 256])
def test_gpu_other_head_dims(D):
    q, k, v, cu, max_seqlen = packed_qkv((700, 0, 129, 1), 8, 2, D, torch.bfloat16)
    dout = torch.randn(q.shape, device=DEVICE)
    _check(_kalm(q, k, v, cu, max_seqlen, dout), _oracle(q, k, v, cu, max_seqlen, dout),
           _oracle_in_dtype(q, k, v, cu, dout), torch.bfloat16)


def _oracle_per_sequence(q, k, v, cu, dout):
    """Memory-lean fp32 oracle for long sequences: the reference on one sequence at a time (no (B, S, S) padding)."""
    outs, lses, grads = [], [], [[], [], []]
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        one = cu_seqlens_of([e - s])
        out, lse, g = _oracle(q[s:e], k[s:e], v[s:e], one, e - s, dout[s:e])
        outs.append(out.detach())
        lses.append(lse.detach())
        for acc, x in zip(grads, g):
            acc.append(x)
    return torch.cat(outs), torch.cat(lses, 1), tuple(torch.cat(g) for g in grads)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths,Hq,Hkv,D", [((8192, 1000), 4, 2, 128), ((32768,), 1, 1, 64)], ids=["8k", "32k"])
def test_gpu_long_sequences(lengths, Hq, Hkv, D):
    q, k, v, cu, max_seqlen = packed_qkv(lengths, Hq, Hkv, D, torch.bfloat16)
    dout = torch.randn(q.shape, device=DEVICE)
    kalm = _kalm(q, k, v, cu, max_seqlen, dout)
    torch.cuda.empty_cache()
    oracle = _oracle_per_sequence(q, k, v, cu, dout)
    torch.cuda.empty_cache()
    lowp = _oracle_in_dtype(q, k, v, cu, dout)
    _check(kalm, oracle, lowp, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    q, k, v, cu, max_seqlen = packed_qkv(GPU_LENGTHS, 16, 4, 128, torch.bfloat16)
    dout = torch.randn(q.shape, device=DEVICE)
    first = _kalm(q, k, v, cu, max_seqlen, dout)
    for _ in range(3):
        again = _kalm(q, k, v, cu, max_seqlen, dout)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (first[0], first[1], *first[2]),
                              (again[0], again[1], *again[2])):
            assert torch.equal(a, b), f"{name} differs between identical runs"
