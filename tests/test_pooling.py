"""Fused masked mean pooling (kernels/pooling.py) against the fp32 reference, forward and backward.

On CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1), with big tiles and small shapes.
Tolerances: fp32 results lie within 2x the forward-error bound of the float64 truth (tests/bounds.py: K u times the
pipeline evaluated on absolute values, K = 3 H + n + 16 for the norm statistics, the token sum, the L2 norm and the
backward's row dots): the same verdict on every CPU and GPU, whatever summation order their BLAS or the interpreter
picks, and orders of magnitude below what a real bug gives. Low precision follows the 2x rule
(STYLE.md): the kernel's max error vs the fp32 reference is at most twice that of the same pipeline run in PyTorch in
the low dtype (norm, masked mean, F.normalize, each rounding to that dtype).
"""

import bounds
import pytest
import torch
from conftest import DEVICE, cu_seqlens_of

from kalm_fast import ops
from kalm_fast import reference as ref
from kalm_fast.kernels import pooling
from kalm_fast.padding import pad_input, unpad_input

EPS = 1e-6
NAMES = ("out", "dhidden", "dweight", "dbias")

# lengths with the instruction-prefix length of each sequence (attended, not pooled): a length-1 sequence, irregular
# 97 and 200, a zero-length sequence and a sequence made only of instruction tokens (an all-padding pooling row)
LENGTHS = (1, 97, 0, 200, 3)
PREFIX = (0, 5, 0, 7, 3)
EMPTY_ROWS = (2, 4)

NORM_CASES = [  # (norm, has weight, has bias)
    (None, False, False),
    ("rmsnorm", True, False),
    ("layernorm", True, True),
]


@pytest.fixture
def triton_calls(monkeypatch):
    """Forces the Triton path of kalm_fast.ops and records each forward launch, so a test through the public API
    fails if dispatch silently took the torch path."""
    monkeypatch.setenv("KALM_FAST_BACKEND", "triton")
    calls = []
    launcher = pooling.varlen_mean_pool_fwd

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(pooling, "varlen_mean_pool_fwd", spy)
    return calls


def varlen_batch(H, dtype=torch.float32, lengths=LENGTHS, prefix=PREFIX):
    """Packed hidden (T, H) with a non-zero mean (so LayerNorm's centering matters), cu_seqlens, the pooling mask
    (T,) bool excluding each sequence's instruction prefix, affine weight/bias (H,) and an output gradient (B, H)."""
    T = sum(lengths)
    hidden = (torch.randn(T, H, device=DEVICE) * 1.5 + 0.3).to(dtype)
    pos = torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)
    first = torch.repeat_interleave(torch.tensor(prefix), torch.tensor(lengths)).to(DEVICE)
    weight = (1.0 + 0.5 * torch.randn(H, device=DEVICE)).to(dtype)
    bias = (0.5 * torch.randn(H, device=DEVICE)).to(dtype)
    grad = torch.randn(len(lengths), H, device=DEVICE).to(dtype)
    return hidden, cu_seqlens_of(lengths), pos >= first, weight, bias, grad


def padded_batch(H, dtype, lengths=LENGTHS, prefix=PREFIX):
    """Padded hidden (B, S, H), attention mask and pooling mask (B, S) bool (right padding), weight, bias, grad."""
    B, S = len(lengths), max(lengths)
    hidden = (torch.randn(B, S, H, device=DEVICE) * 1.5 + 0.3).to(dtype)
    pos = torch.arange(S, device=DEVICE)[None, :]
    attn = pos < torch.tensor(lengths, device=DEVICE)[:, None]
    pool = attn & (pos >= torch.tensor(prefix, device=DEVICE)[:, None])
    weight = (1.0 + 0.5 * torch.randn(H, device=DEVICE)).to(dtype)
    bias = (0.5 * torch.randn(H, device=DEVICE)).to(dtype)
    grad = torch.randn(B, H, device=DEVICE).to(dtype)
    return hidden, attn, pool, weight, bias, grad


def fwd_bwd(fn, hidden, weight, bias, grad):
    """out and the gradients (d hidden, d weight, d bias) of <out, grad>; None for absent or frozen inputs."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), *(t.grad if t is not None else None for t in leaves)


def affine(has_w, has_b, weight, bias):
    return (weight if has_w else None), (bias if has_b else None)


def assert_fp32(got, hidden, cu, mask, norm, weight, bias, normalize, grad, what=""):
    """fwd_bwd's (out, dhidden, dweight, dbias) of an fp32 pooling within the forward-error bound of the float64
    truth (module docstring); hidden (T, H) packed or (B, S, H) padded with cu_seqlens marking rows of S."""
    truth, bound = bounds.pooling(hidden.reshape(-1, hidden.shape[-1]), cu, mask.reshape(-1) if mask is not None
                                  else None, norm, weight, bias, EPS, normalize, grad)
    for name, g in zip(NAMES, got):
        if g is not None:
            bounds.assert_within(f"{name}{what}", g.reshape(truth[name].shape), truth[name], bound[name])


def assert_2x(name, actual, lowp, truth):
    err = (actual.float() - truth.float()).abs().max().item()
    err_torch = (lowp.float() - truth.float()).abs().max().item()
    assert err <= 2 * err_torch, f"{name}: kernel error {err:.3g} > 2x torch's {lowp.dtype} error {err_torch:.3g}"


# ----------------------------------------------------------------------------------------------------------------
# kernel vs reference, fp32
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("norm,has_w,has_b", NORM_CASES)
def test_varlen_matches_reference(norm, has_w, has_b, normalize):
    hidden, cu, mask, weight, bias, grad = varlen_batch(384)
    w, b = affine(has_w, has_b, weight, bias)
    got = fwd_bwd(lambda x, w_, b_: pooling.varlen_mean_pool(x, cu, mask, norm, w_, b_, EPS, normalize), hidden, w, b,
                  grad)
    for name, g, expected in zip(NAMES, got, (hidden, hidden, w, b if norm == "layernorm" else None)):
        assert (g is None) == (expected is None), name
    assert_fp32(got, hidden, cu, mask, norm, w, b, normalize, grad)
    out, dx = got[0], got[1]
    # rows without a pooled token (zero-length, all instruction tokens) are exact zeros, and so is the gradient of
    # every token that is not pooled; nothing is NaN (the L2 normalize of a zero vector included)
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()
    assert (out[list(EMPTY_ROWS)] == 0).all()
    assert (dx[~mask] == 0).all()
    assert (dx[mask] != 0).any(dim=1).all()


@pytest.mark.parametrize("norm,has_w,has_b", [("rmsnorm", False, False), ("layernorm", False, False),
                                              ("layernorm", True, False)])
def test_norm_without_affine_parameters(norm, has_w, has_b):
    hidden, cu, mask, weight, bias, grad = varlen_batch(384)
    w, b = affine(has_w, has_b, weight, bias)
    got = fwd_bwd(lambda x, w_, b_: pooling.varlen_mean_pool(x, cu, mask, norm, w_, b_, EPS, True), hidden, w, b, grad)
    assert_fp32(got, hidden, cu, mask, norm, w, b, True, grad)


@pytest.mark.parametrize("norm,has_w,has_b", NORM_CASES[1:])
@pytest.mark.parametrize("num_splits,block_t", [(2, 16), (3, 32), (5, 64)])
def test_token_splits_and_tiles(norm, has_w, has_b, num_splits, block_t):
    """The split path (partials + combine kernel) and small tiles (several tiles per split, ragged tails, splits with
    no token) give the reference result; the GPU picks splits by itself, the interpreter only when told."""
    hidden, cu, mask, weight, bias, grad = varlen_batch(384)
    w, b = affine(has_w, has_b, weight, bias)
    pool = lambda x, w_, b_: pooling.varlen_mean_pool(x, cu, mask, norm, w_, b_, EPS, True, num_splits=num_splits,
                                                      block_t=block_t)
    got = fwd_bwd(pool, hidden, w, b, grad)
    assert_fp32(got, hidden, cu, mask, norm, w, b, True, grad)


def test_mask_dtypes_and_no_mask():
    hidden, cu, mask, weight, _, _ = varlen_batch(384)
    by_bool = pooling.varlen_mean_pool(hidden, cu, mask, "rmsnorm", weight, None, EPS, True)
    by_int = pooling.varlen_mean_pool(hidden, cu, mask.to(torch.int64), "rmsnorm", weight, None, EPS, True)
    assert torch.equal(by_bool, by_int)
    no_mask = pooling.varlen_mean_pool(hidden, cu, None, "rmsnorm", weight, None, EPS, True)
    truth, bound = bounds.pooling(hidden, cu, None, "rmsnorm", weight, None, EPS, True, torch.zeros(len(LENGTHS), 384))
    bounds.assert_within("out, no mask", no_mask, truth["out"], bound["out"])
    assert not torch.allclose(no_mask, by_bool)  # the instruction tokens do change the mean


def test_frozen_inputs():
    """Only the inputs that require grad get one: a frozen backbone with a trainable final norm, and the reverse."""
    hidden, cu, mask, weight, bias, grad = varlen_batch(384)
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    out = pooling.varlen_mean_pool(hidden, cu, mask, "layernorm", w, b, EPS, True)
    out.backward(grad)
    assert_fp32((out, None, w.grad, b.grad), hidden, cu, mask, "layernorm", weight, bias, True, grad, " (frozen x)")

    x = hidden.clone().requires_grad_()
    pooling.varlen_mean_pool(x, cu, mask, "layernorm", weight, bias, EPS, True).backward(grad)
    assert_fp32((None, x.grad), hidden, cu, mask, "layernorm", weight, bias, True, grad, " (frozen w, b)")


def test_only_empty_rows_and_empty_batch():
    """Every row without a pooled token: zero output and zero gradients, even with a bias and the L2 normalize
    (whose gradient at 0 is g / eps)."""
    hidden, cu, _, weight, bias, grad = varlen_batch(384)
    mask = torch.zeros(hidden.shape[0], dtype=torch.bool, device=DEVICE)
    out, dx, dw, db = fwd_bwd(lambda x, w_, b_: pooling.varlen_mean_pool(x, cu, mask, "layernorm", w_, b_, EPS, True),
                              hidden, weight, bias, grad)
    for name, t in (("out", out), ("dhidden", dx), ("dweight", dw), ("dbias", db)):
        assert (t == 0).all(), name

    empty = torch.zeros(0, 384, device=DEVICE)
    out, dx, dw, db = fwd_bwd(lambda x, w_, b_: pooling.varlen_mean_pool(x, cu_seqlens_of([0, 0]), None, "layernorm",
                                                                    w_, b_, EPS, True),
                              empty, weight, bias, grad[:2])
    assert out.shape == (2, 384) and (out == 0).all() and dx.shape == (0, 384)
    assert (dw == 0).all() and (db == 0).all()


def test_backward_is_deterministic():
    hidden, cu, mask, weight, bias, grad = varlen_batch(384)
    fn = lambda x, w_, b_: pooling.varlen_mean_pool(x, cu, mask, "layernorm", w_, b_, EPS, True, num_splits=3,
                                                    block_t=32)
    first = fwd_bwd(fn, hidden, weight, bias, grad)
    second = fwd_bwd(fn, hidden, weight, bias, grad)
    for name, a, b in zip(("out", "dhidden", "dweight", "dbias"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")
@pytest.mark.parametrize("norm", [None, "rmsnorm", "layernorm"])
def test_unpooled_rows_are_loaded_then_discarded(norm):
    """The mask is applied after the row load (the load does not wait on the mask): rows of unpooled tokens are read,
    so NaN and inf there must not leak into the output or into any gradient (bitwise equal to clean rows)."""
    hidden, cu, mask, weight, bias, grad = varlen_batch(384)
    w, b = affine(norm is not None, norm == "layernorm", weight, bias)
    dirty = hidden.clone()
    dirty[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(384 // 3)
    fn = lambda x, w_, b_: pooling.varlen_mean_pool(x, cu, mask, norm, w_, b_, EPS, True, num_splits=2, block_t=16)
    clean, poisoned = fwd_bwd(fn, hidden, w, b, grad), fwd_bwd(fn, dirty, w, b, grad)
    for name, a, c in zip(NAMES, clean, poisoned):
        if a is not None:
            assert torch.equal(a, c), name


@pytest.mark.parametrize("H,elem_size", [(384, 2), (896, 2), (1024, 2), (4096, 2), (1024, 4), (4096, 4)])
def test_tile_plan_bytes_in_flight(H, elem_size, monkeypatch):
    """GPU tile plan: 4,096-element tiles at 4 warps (32 elements a thread), and NUM_STAGES - 1 pipelined tile
    buffers per program, 24 KB (bf16) / 32 KB (fp32): with 4 programs per SM, 96 / 128 KB of loads in flight per SM."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU plan, not the interpreter's big tiles
    block_t, block_h, warps, stages = pooling._tile(H, None, elem_size)
    assert block_h >= H and block_t * block_h == 4096 and warps == 4
    in_flight = (stages - 1) * block_t * block_h * elem_size
    assert in_flight == {2: 24, 4: 32}[elem_size] * 1024
    assert pooling._PROGRAMS_PER_SM * in_flight >= 96 * 1024


# ----------------------------------------------------------------------------------------------------------------
# public API (kalm_fast.ops) on the Triton path
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm,has_w,has_b", NORM_CASES)
def test_padded_api_equals_varlen_api(norm, has_w, has_b, triton_calls):
    """masked_mean_pool on a padded batch == varlen_mean_pool on the unpadded tokens, with a pooling mask that
    differs from the attention mask; both equal the padded reference."""
    hidden, attn, pool, weight, bias, grad = padded_batch(384, torch.float32)
    w, b = affine(has_w, has_b, weight, bias)
    B, S, H = hidden.shape
    padded = fwd_bwd(lambda x, w_, b_: ops.masked_mean_pool(x, pool, norm=norm, norm_weight=w_, norm_bias=b_),
                     hidden, w, b, grad)
    _, idx, cu, _ = unpad_input(hidden, attn)
    pool_packed = pool.reshape(-1)[idx]

    def varlen(x, w_, b_):
        return ops.varlen_mean_pool(unpad_input(x, attn)[0], cu, mask=pool_packed, norm=norm, norm_weight=w_,
                                    norm_bias=b_)

    packed = fwd_bwd(varlen, hidden, w, b, grad)
    assert [tuple(s) for s in triton_calls] == [(B * S, H), (int(attn.sum()), H)]
    rows = torch.arange(0, B * S + 1, S, dtype=torch.int32)
    assert_fp32(padded, hidden, rows, pool, norm, w, b, True, grad, " (padded)")
    assert_fp32(packed, hidden, rows, pool, norm, w, b, True, grad, " (varlen)")
    assert (padded[1][~attn] == 0).all()


@pytest.mark.parametrize("norm,H,normalize", [(None, 384, True), ("rmsnorm", 896, True), ("layernorm", 384, False),
                                              ("layernorm", 896, True)])
def test_fp16_two_x_rule(norm, H, normalize, triton_calls):
    """fp16 through the padded API: out, dhidden, dweight, dbias within 2x torch's own fp16 error."""
    hidden, _, pool, weight, bias, grad = padded_batch(H, torch.float16)
    w, b = affine(norm is not None, norm == "layernorm", weight, bias)
    got = fwd_bwd(lambda x, w_, b_: ops.masked_mean_pool(x, pool, norm=norm, norm_weight=w_, norm_bias=b_, eps=EPS,
                                                         normalize=normalize), hidden, w, b, grad)
    assert triton_calls
    lowp = fwd_bwd(lambda x, w_, b_: ref.masked_mean_pool(x, pool, norm, w_, b_, EPS, normalize, compute_dtype=x.dtype),
                   hidden, w, b, grad)  # torch's own fp16 pipeline
    up = lambda t: t.float() if t is not None else None
    truth = fwd_bwd(lambda x, w_, b_: ref.masked_mean_pool(x, pool, norm, w_, b_, EPS, normalize), up(hidden), up(w),
                    up(b), grad.float())
    assert got[0].dtype == torch.float16 and got[1].dtype == torch.float16
    for name, g, lp, t in zip(("out", "dhidden", "dweight", "dbias"), got, lowp, truth):
        if t is not None:
            assert_2x(name, g, lp, t)


def test_input_checks():
    hidden, attn, pool, weight, bias, _ = padded_batch(64, torch.float32, lengths=(3, 5), prefix=(0, 1))
    packed, _, cu, _ = unpad_input(hidden, attn)
    H = hidden.shape[-1]
    bad = [
        (dict(norm="batchnorm"), "norm must be None, 'rmsnorm' or 'layernorm'"),
        (dict(norm="rmsnorm", norm_weight=weight[:-1]), rf"norm_weight must have shape \({H},\)"),
        (dict(norm="rmsnorm", norm_weight=weight, norm_bias=bias), "norm_bias is only used with norm='layernorm'"),
        (dict(norm_weight=weight), "norm_weight was given but norm is None"),
        (dict(norm="layernorm", norm_bias=bias[None]), "norm_bias must be 1-D"),
        (dict(norm="rmsnorm", eps=0.0), "eps must be a positive finite number"),
        (dict(norm="rmsnorm", eps=-1e-6), "eps must be a positive finite number"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            ops.masked_mean_pool(hidden, pool, **kwargs)
        with pytest.raises(ValueError, match=message):
            ops.varlen_mean_pool(packed, cu, **kwargs)
    with pytest.raises(ValueError, match=r"mask must be \(B, S\)"):
        ops.masked_mean_pool(hidden, pool[:, :-1])
    with pytest.raises(ValueError, match="mask must be"):
        ops.varlen_mean_pool(packed, cu, mask=pool.reshape(-1))
    with pytest.raises(ValueError, match="hidden must be 3-D"):
        ops.masked_mean_pool(packed, pool)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at the number of tokens"):
        ops.varlen_mean_pool(packed[1:], cu)
    with pytest.raises(TypeError, match="cu_seqlens must have dtype"):
        ops.varlen_mean_pool(packed, cu.long())


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 at training shapes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("norm", [None, "rmsnorm", "layernorm"])
@pytest.mark.parametrize("B,S,H", [(256, 512, 896), (256, 512, 1024)])
def test_gpu_bf16_large(B, S, H, norm):
    """Padded batch, random lengths 1..S with instruction prefixes, bf16, under the 2x rule (fwd and bwd)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    lengths = torch.randint(1, S + 1, (B,), generator=g).tolist()
    prefix = [min(n, int(p)) for n, p in zip(lengths, torch.randint(0, 16, (B,), generator=g))]
    hidden, _, pool, weight, bias, grad = padded_batch(H, torch.bfloat16, lengths=lengths, prefix=prefix)
    w, b = affine(norm is not None, norm == "layernorm", weight, bias)
    got = fwd_bwd(lambda x, w_, b_: ops.masked_mean_pool(x, pool, norm=norm, norm_weight=w_, norm_bias=b_, eps=EPS),
                  hidden, w, b, grad)
    lowp = fwd_bwd(lambda x, w_, b_: ref.masked_mean_pool(x, pool, norm, w_, b_, EPS, True, compute_dtype=x.dtype),
                   hidden, w, b, grad)  # torch's own bf16 pipeline
    up = lambda t: t.float() if t is not None else None
    truth = fwd_bwd(lambda x, w_, b_: ref.masked_mean_pool(x, pool, norm, w_, b_, EPS, True), up(hidden), up(w), up(b),
                    grad.float())
    for name, t, lp, want in zip(("out", "dhidden", "dweight", "dbias"), got, lowp, truth):
        if want is not None:
            assert_2x(name, t, lp, want)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_gpu_bf16_long_sequences_split(norm):
    """Few long sequences (the launcher splits each over many programs) through the varlen API, bf16, 2x rule."""
    lengths = (8192, 1, 0, 5000, 16384, 777)
    prefix = (30, 1, 0, 0, 12, 5)
    hidden, cu, mask, weight, bias, grad = varlen_batch(1024, torch.bfloat16, lengths=lengths, prefix=prefix)
    assert pooling._num_splits(len(lengths), hidden.shape[0], pooling._tile(1024, None)[0], hidden.device) > 1
    w, b = affine(True, norm == "layernorm", weight, bias)
    got = fwd_bwd(lambda x, w_, b_: ops.varlen_mean_pool(x, cu, mask=mask, norm=norm, norm_weight=w_, norm_bias=b_,
                                                         eps=EPS), hidden, w, b, grad)
    B, S = len(lengths), max(lengths)
    pos = torch.arange(S, device=DEVICE)[None, :]
    valid = pos < torch.tensor(lengths, device=DEVICE)[:, None]
    flat = (torch.arange(B, device=DEVICE)[:, None] * S + pos)[valid]  # padded position of each packed token
    to_padded = lambda t: pad_input(t, flat, B, S)
    pool = to_padded(mask[:, None].to(hidden.dtype))[..., 0].bool()

    def lowp_fn(x, w_, b_):
        return ref.masked_mean_pool(to_padded(x), pool, norm, w_, b_, EPS, True, compute_dtype=x.dtype)

    lowp = fwd_bwd(lowp_fn, hidden, w, b, grad)
    up = lambda t: t.float() if t is not None else None
    truth = fwd_bwd(lambda x, w_, b_: ref.varlen_mean_pool(x, cu, mask, norm, w_, b_, EPS, True), up(hidden), up(w),
                    up(b), grad.float())
    for name, t, lp, want in zip(("out", "dhidden", "dweight", "dbias"), got, lowp, truth):
        if want is not None:
            assert_2x(name, t, lp, want)
