"""The fp32 forward-error bounds of tests/bounds.py can fail: they hold for torch's own fp32 results (a different
summation order than the kernels') and reject the errors a real bug makes (a wrong scale, a dropped key, one
perturbed gradient entry), so a green kernel test means something on every machine."""

import bounds
import pytest
import torch
from conftest import cu_seqlens_of, packed_qkv

from kalm_fast import reference

LENGTHS = (1, 97, 0, 130)


def _attention_case():
    q, k, v, cu, _ = packed_qkv(LENGTHS, 4, 2, 64, torch.float32, device="cpu")
    return q, k, v, cu, torch.randn(q.shape)


def _torch_fp32(q, k, v, cu, dout, scale=None):
    out, lse = reference.flash_attn_varlen_func(q, k, v, cu, max(LENGTHS), scale, True)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    return dict(out=out, lse=lse, dq=grads[0], dk=grads[1], dv=grads[2])


def test_attention_bound_holds_for_torch_fp32():
    q, k, v, cu, dout = _attention_case()
    truth, bound = bounds.attention(q, k, v, cu, dout)
    for name, got in _torch_fp32(q, k, v, cu, dout).items():
        bounds.assert_within(name, got, truth[name], bound[name])


@pytest.mark.parametrize("bug", ["scale", "dropped-key", "one-entry"])
def test_attention_bound_rejects_bugs(bug):
    q, k, v, cu, dout = _attention_case()
    truth, bound = bounds.attention(q, k, v, cu, dout)
    if bug == "scale":  # softmax_scale off by 1%
        got = _torch_fp32(q, k, v, cu, dout, scale=1.01 * q.shape[-1] ** -0.5)["out"]
    elif bug == "dropped-key":  # the last key of the longest sequence masked out (an off-by-one tile bound)
        cut = cu.clone()
        cut[-1] -= 1
        got = _torch_fp32(q[:-1], k[:-1], v[:-1], cut, dout[:-1])["out"]
        truth["out"], bound["out"] = truth["out"][:-1], bound["out"][:-1]
    else:  # the largest gradient entry 1% off
        got = truth["dq"].clone()
        got.view(-1)[got.abs().argmax()] *= 1.01
        truth["out"], bound["out"] = truth["dq"], bound["dq"]
    with pytest.raises(AssertionError, match="outside 2.0 x the fp32 forward-error bound"):
        bounds.assert_within("out", got, truth["out"], bound["out"])


def test_pooling_bound_holds_and_rejects_a_dropped_token():
    H = 384
    x = torch.randn(sum(LENGTHS), H) * 1.5 + 0.3
    cu = cu_seqlens_of(LENGTHS, "cpu")
    w = 1.0 + 0.5 * torch.randn(H)
    g = torch.randn(len(LENGTHS), H)
    truth, bound = bounds.pooling(x, cu, None, "rmsnorm", w, None, 1e-6, True, g)
    good = reference.varlen_mean_pool(x, cu, None, "rmsnorm", w, None, 1e-6, True)
    bounds.assert_within("out", good, truth["out"], bound["out"])
    mask = torch.ones(x.shape[0], dtype=torch.bool)
    mask[-1] = False  # the last token of the 130-token sequence left out of its mean
    bad = reference.varlen_mean_pool(x, cu, mask, "rmsnorm", w, None, 1e-6, True)
    with pytest.raises(AssertionError):
        bounds.assert_within("out", bad, truth["out"], bound["out"])


def test_network_tol_is_the_stated_formula():
    # 2 * 8 * sqrt(6 * (2 * 384 + 1536 + 256)) * 2^-24 = 1.18e-4
    assert bounds.network_tol(layers=6, width=384, ffn=1536, seq_len=256) == pytest.approx(1.1819e-4, rel=1e-3)
