"""Public functional API of kalm_fast: input checks once, then dispatch (SPEC 3).

CUDA tensors and an importable Triton -> the Triton kernels of ``kalm_fast.kernels``; otherwise the torch path of
``kalm_fast.reference`` (for the loss, the chunked O((B+N)*D) path). ``KALM_FAST_BACKEND=torch|triton`` forces a path
(``triton`` on CPU needs ``TRITON_INTERPRET=1`` set before kalm_fast.kernels is imported).

Kernel modules implement these entries (inputs already checked, contiguous where noted), one stem per op at every
layer -- ``<op>_fwd`` / ``<op>_bwd`` launchers, ``_<Op>Function``, the entry, ``reference.<op>`` the oracle:
  kernels.attention.flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, softmax_scale, return_lse)
  kernels.pooling.varlen_mean_pool(hidden (T, H), cu_seqlens, mask (T,) | None, norm, norm_weight, norm_bias, eps,
                                   normalize) -> (B, H)
  kernels.infonce.focal_infonce(q, d, pos_idx, group_size, in_batch_negatives, temperature, gamma, num_mix,
                                mix_lambda, reduction, return_stats)
each differentiable through its own torch.autograd.Function (under torch.compile through the custom ops
``torch.ops.kalm_fast.<op>_fwd`` / ``_bwd``, the same bodies: a graph holds them whole).
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from kalm_fast import reference
from kalm_fast.padding import pad_input, unpad_input

__all__ = [
    "flash_attn_varlen_func",
    "flash_attn_func",
    "unpad_input",
    "pad_input",
    "masked_mean_pool",
    "varlen_mean_pool",
    "focal_infonce",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------------------


_TRITON = importlib.util.find_spec("triton") is not None  # a constant, not a cached call: torch.compile traces it


def triton_available() -> bool:
    return _TRITON


def use_triton(*tensors: torch.Tensor) -> bool:
    """The dispatch rule: True -> Triton kernels, False -> torch path."""
    backend = os.environ.get("KALM_FAST_BACKEND", "auto").lower()
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("KALM_FAST_BACKEND=triton but triton is not installed (pip install triton)")
        if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError("KALM_FAST_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1")
        return True
    if backend != "auto":
        raise ValueError(f"KALM_FAST_BACKEND must be 'torch', 'triton' or unset, got {backend!r}")
    return triton_available() and all(t.is_cuda for t in tensors)


# ----------------------------------------------------------------------------------------------------------------
# checks (each names the argument and what was expected)
# ----------------------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, ndim: int | None = None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(x).replace("torch.", "") for x in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def _check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {', '.join(f'{n}: {d}' for n, d in devices.items())}")


def _checking_values() -> bool:
    """Whether checks that read tensor values (a host sync each) run: always in eager, never while torch.compile
    traces (a sync would split the graph, and fullgraph=True would fail), like flash-attention's varlen API."""
    return not torch.compiler.is_compiling()


def _check_cu_seqlens(cu_seqlens, total: int, device, max_seqlen: int | None = None):
    """cu_seqlens int32 (B+1,), starting at 0, non-decreasing, ending at ``total``, max_seqlen >= its longest
    sequence (one host sync; values unchecked under torch.compile)."""
    _check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must have B+1 >= 1 entries")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on {device}, got {cu_seqlens.device}")
    if not _checking_values():
        return
    cpu = cu_seqlens.cpu()
    if int(cpu[0]) != 0 or int(cpu[-1]) != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the number of tokens {total}, "
                         f"got {int(cpu[0])} .. {int(cpu[-1])}")
    lengths = cpu[1:] - cpu[:-1]
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError("cu_seqlens must be non-decreasing")
    if max_seqlen is not None and lengths.numel() and int(max_seqlen) < int(lengths.max()):
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence ({int(lengths.max())})")


def _check_norm_args(norm, norm_weight, norm_bias, eps, hidden_size: int, device):
    if norm not in (None, "rmsnorm", "layernorm"):
        raise ValueError(f"norm must be None, 'rmsnorm' or 'layernorm', got {norm!r}")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is None:
            continue
        if norm is None:
            raise ValueError(f"{name} was given but norm is None")
        _check_tensor(name, t, ndim=1, dtypes=_FLOAT_DTYPES)
        if t.shape[0] != hidden_size:
            raise ValueError(f"{name} must have shape ({hidden_size},), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")
    if norm_bias is not None and norm != "layernorm":
        raise ValueError("norm_bias is only used with norm='layernorm'")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")


# ----------------------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------------------


def flash_attn_varlen_unchecked(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, return_lse=False):
    """Unchecked dispatch for callers that built cu_seqlens themselves (the model glue): no host sync."""
    if use_triton(q, k, v):
        from kalm_fast.kernels import attention

        return attention.flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, softmax_scale, return_lse)
    return reference.flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, softmax_scale, return_lse)


def flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, *, softmax_scale=None, return_lse=False):
    """Bidirectional attention over packed variable-length sequences: every token attends to every token of its own
    sequence. Backward is deterministic.

    Arguments:
        q: (T, Hq, D), fp16/bf16/fp32, D <= 256.
        k, v: (T, Hkv, D), q's dtype, Hq % Hkv == 0 (GQA/MQA).
        cu_seqlens: (B + 1,) int32, cu_seqlens[0] == 0, non-decreasing, cu_seqlens[-1] == T (empty sequences allowed).
        max_seqlen: int >= the longest sequence (sizes the grid).
        softmax_scale: float > 0, default 1 / sqrt(D).
        return_lse: also return the logsumexp of the scaled scores.
    Returns out (T, Hq, D) in q's dtype [, lse (Hq, T) fp32].
    """
    _check_tensor("q", q, ndim=3, dtypes=_FLOAT_DTYPES)
    _check_tensor("k", k, ndim=3, dtypes=_FLOAT_DTYPES)
    _check_tensor("v", v, ndim=3, dtypes=_FLOAT_DTYPES)
    _check_same_device(q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    T, Hq, D = q.shape
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k/v must be (T={T}, Hkv, D={D}), got {tuple(k.shape)}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the key/value heads ({k.shape[1]})")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim must be in 1..256, got {D}")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if softmax_scale is not None and not (softmax_scale > 0 and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a positive finite number or None, got {softmax_scale!r}")
    _check_cu_seqlens(cu_seqlens, T, q.device, max_seqlen)
    return flash_attn_varlen_unchecked(q, k, v, cu_seqlens, max_seqlen, softmax_scale, return_lse)


def flash_attn_func(q, k, v, key_padding_mask=None, *, softmax_scale=None):
    """Bidirectional attention on a padded batch: padding is removed once, attention runs varlen, and padded query
    rows come back as 0.

    Arguments:
        q: (B, S, Hq, D), fp16/bf16/fp32, D <= 256.
        k, v: (B, S, Hkv, D), q's dtype, Hq % Hkv == 0.
        key_padding_mask: (B, S) bool/int, true = real token (any pattern); None = no padding.
        softmax_scale: float > 0, default 1 / sqrt(D).
    Returns out (B, S, Hq, D) in q's dtype.
    """
    _check_tensor("q", q, ndim=4, dtypes=_FLOAT_DTYPES)
    _check_tensor("k", k, ndim=4, dtypes=_FLOAT_DTYPES)
    _check_tensor("v", v, ndim=4, dtypes=_FLOAT_DTYPES)
    B, S = q.shape[:2]
    if k.shape[:2] != (B, S) or v.shape[:2] != (B, S):
        raise ValueError(f"k/v must have the batch and sequence sizes of q ({B}, {S}), "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if key_padding_mask is None:
        cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=q.device)
        out = flash_attn_varlen_func(q.reshape(B * S, *q.shape[2:]), k.reshape(B * S, *k.shape[2:]),
                                     v.reshape(B * S, *v.shape[2:]), cu, S, softmax_scale=softmax_scale)
        return out.reshape(B, S, *out.shape[1:])
    _check_tensor("key_padding_mask", key_padding_mask, ndim=2)
    _check_same_device(q=q, key_padding_mask=key_padding_mask)
    if key_padding_mask.shape != (B, S):
        raise ValueError(f"key_padding_mask must be (B, S) = ({B}, {S}), got {tuple(key_padding_mask.shape)}")
    q_u, idx, cu, max_s = unpad_input(q, key_padding_mask)
    k_u = k.reshape(B * S, *k.shape[2:]).index_select(0, idx)
    v_u = v.reshape(B * S, *v.shape[2:]).index_select(0, idx)
    out = flash_attn_varlen_func(q_u, k_u, v_u, cu, max_s, softmax_scale=softmax_scale)
    return pad_input(out, idx, B, S)


# ----------------------------------------------------------------------------------------------------------------
# pooling
# ----------------------------------------------------------------------------------------------------------------


def varlen_mean_pool_unchecked(hidden, cu_seqlens, mask=None, norm=None, norm_weight=None, norm_bias=None,
                               eps=1e-6, normalize=True):
    """Unchecked dispatch of the varlen pooling (model glue)."""
    if use_triton(hidden):
        from kalm_fast.kernels import pooling

        return pooling.varlen_mean_pool(hidden, cu_seqlens, mask, norm, norm_weight, norm_bias, eps, normalize)
    return reference.varlen_mean_pool(hidden, cu_seqlens, mask, norm, norm_weight, norm_bias, eps, normalize)


def varlen_mean_pool(hidden, cu_seqlens, *, mask=None, norm=None, norm_weight=None, norm_bias=None, eps=1e-6,
                     normalize=True):
    """Fused [final norm ->] mean over the mask-true tokens of each packed sequence [-> L2 normalize]; a sequence
    without a pooled token gives a zero vector and zero gradient.

    Arguments:
        hidden: (T, H), fp16/bf16/fp32, the packed last hidden states (before the model's final norm when norm is set).
        cu_seqlens: (B + 1,) int32, the packed sequences' boundaries, cu_seqlens[-1] == T.
        mask: (T,) bool/int, true = pooled token (may differ from the attention mask); None = every token.
        norm: None, "rmsnorm" or "layernorm", applied to each token before the mean.
        norm_weight: (H,) (required with norm); norm_bias: (H,) or None (layernorm only).
        eps: float > 0, the norm's epsilon.
        normalize: L2-normalize the pooled vector.
    Returns (B, H) in hidden's dtype.
    """
    _check_tensor("hidden", hidden, ndim=2, dtypes=_FLOAT_DTYPES)
    _check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device)
    if mask is not None:
        _check_tensor("mask", mask, ndim=1)
        if mask.shape[0] != hidden.shape[0] or mask.device != hidden.device:
            raise ValueError(f"mask must be ({hidden.shape[0]},) on {hidden.device}, "
                             f"got {tuple(mask.shape)} on {mask.device}")
    _check_norm_args(norm, norm_weight, norm_bias, eps, hidden.shape[1], hidden.device)
    return varlen_mean_pool_unchecked(hidden, cu_seqlens, mask, norm, norm_weight, norm_bias, eps, normalize)


def masked_mean_pool(hidden, mask, *, norm=None, norm_weight=None, norm_bias=None, eps=1e-6, normalize=True):
    """Padded form of ``varlen_mean_pool``. The pooling mask may differ from the attention mask (e.g. to leave out
    instruction tokens).

    Arguments:
        hidden: (B, S, H), fp16/bf16/fp32.
        mask: (B, S) bool/int, true = pooled token.
        norm, norm_weight (H,), norm_bias (H,), eps, normalize: as in ``varlen_mean_pool``.
    Returns (B, H) in hidden's dtype.
    """
    _check_tensor("hidden", hidden, ndim=3, dtypes=_FLOAT_DTYPES)
    _check_tensor("mask", mask, ndim=2)
    B, S, H = hidden.shape
    if mask.shape != (B, S):
        raise ValueError(f"mask must be (B, S) = ({B}, {S}), got {tuple(mask.shape)}")
    _check_same_device(hidden=hidden, mask=mask)
    _check_norm_args(norm, norm_weight, norm_bias, eps, H, hidden.device)
    if not use_triton(hidden):
        return reference.masked_mean_pool(hidden, mask, norm, norm_weight, norm_bias, eps, normalize)
    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=hidden.device)
    return varlen_mean_pool_unchecked(hidden.reshape(B * S, H), cu, mask.reshape(B * S), norm, norm_weight, norm_bias,
                                      eps, normalize)


# ----------------------------------------------------------------------------------------------------------------
# focal InfoNCE with online hard-negative mixing
# ----------------------------------------------------------------------------------------------------------------


def _check_number(name, value, *, low, low_inclusive):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if low_inclusive else value > low)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>=' if low_inclusive else '>'} {low}, got {value!r}")


def focal_infonce(q, d, *, pos_idx=None, group_size=None, in_batch_negatives=True, temperature=0.02, gamma=0.0,
                  num_mix=0, mix_alpha=2.0, mix_lambda=None, generator=None, reduction="mean", return_stats=False):
    """Focal InfoNCE with online hard-negative mixing, computed tile by tile (the B x N matrix is never stored).
    SPEC 4.3 defines the candidates, the synthetic negatives, p_i, the focal weight (1 - p_i)^gamma and the loss.

    Arguments:
        q: (B, D) fp16/bf16/fp32 query embeddings; d: (N, D) document embeddings, q's dtype (both L2-normalized by
            the caller).
        pos_idx: (B,) int64/int32, the row of d holding query i's positive; default i * G.
        group_size: G, rows of d per query ([positive, hard negatives...]); default N // B.
        in_batch_negatives: every row of d is a candidate (True) or only the query's own group [pos_i, pos_i + G).
        temperature: tau > 0; gamma: focal exponent >= 0 (0 = plain InfoNCE).
        num_mix: M synthetic negatives per query, each mixed from the hardest negative and the (m+1)-th hardest.
        mix_alpha: lambda ~ Beta(mix_alpha, mix_alpha); mix_lambda: (B, M) in [0, 1] instead of sampling;
            generator: torch.Generator for the sampling.
        reduction: "mean" | "sum" | "none" (per query, (B,)).
        return_stats: also return a dict of (B,) tensors ``p_pos``, ``weight``, ``hard_neg_logit``, ``hard_neg_idx``
            (the hardest negative's logit and row of d; -inf and -1 for a query without negatives or with NaN
            scores).
    Returns the loss [, stats].
    """
    _check_tensor("q", q, ndim=2, dtypes=_FLOAT_DTYPES)
    _check_tensor("d", d, ndim=2, dtypes=_FLOAT_DTYPES)
    _check_same_device(q=q, d=d)
    if q.dtype != d.dtype:
        raise TypeError(f"q and d must share a dtype, got {q.dtype} and {d.dtype}")
    B, D = q.shape
    N = d.shape[0]
    if d.shape[1] != D:
        raise ValueError(f"q and d must have the same embedding size, got q (B={B}, D={D}) and d {tuple(d.shape)}")
    if B == 0 or N == 0:
        raise ValueError(f"q and d must be non-empty, got B={B}, N={N}")
    _check_number("temperature", temperature, low=0, low_inclusive=False)
    _check_number("gamma", gamma, low=0, low_inclusive=True)
    _check_number("mix_alpha", mix_alpha, low=0, low_inclusive=False)
    if not isinstance(num_mix, int) or isinstance(num_mix, bool) or num_mix < 0:
        raise ValueError(f"num_mix must be an int >= 0, got {num_mix!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")

    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if pos_idx is None:
        if group_size is None and N % B != 0:
            raise ValueError(f"N ({N}) must be a multiple of B ({B}) when pos_idx is not given (layout "
                             "[pos_0, neg_0_1 .. neg_0_(G-1), pos_1, ...]); pass pos_idx or group_size")
        G = group_size if group_size is not None else N // B
        if B * G > N:
            raise ValueError(f"group_size={G} needs B * G = {B * G} rows of d, got N={N}")
        pos_idx = torch.arange(B, device=q.device, dtype=torch.int64) * G
    else:
        _check_tensor("pos_idx", pos_idx, ndim=1, dtypes=(torch.int64, torch.int32))
        if pos_idx.shape[0] != B or pos_idx.device != q.device:
            raise ValueError(f"pos_idx must be ({B},) on {q.device}, got {tuple(pos_idx.shape)} on {pos_idx.device}")
        pos_idx = pos_idx.long()
        lo, hi = torch.stack(torch.aminmax(pos_idx)).tolist() if _checking_values() else (0, 0)  # one device sync
        if lo < 0 or hi >= N:
            raise ValueError(f"pos_idx values must be in [0, N={N}), got range [{lo}, {hi}]")
        if group_size is None and not in_batch_negatives and N % B != 0:
            raise ValueError(f"in_batch_negatives=False needs group_size when N ({N}) is not a multiple of B ({B})")
        G = group_size if group_size is not None else N // B
        if not in_batch_negatives and hi + G > N:
            raise ValueError(f"the group of the query with pos_idx={hi} runs past N={N} (group_size={G})")

    negatives = (N - 1) if in_batch_negatives else (G - 1)
    if num_mix > 0 and negatives < num_mix + 1:
        raise ValueError(f"num_mix={num_mix} needs at least {num_mix + 1} negatives per query, but each query has "
                         f"{negatives} ({'in-batch' if in_batch_negatives else 'own-group'} candidates)")
    if mix_lambda is not None:
        _check_tensor("mix_lambda", mix_lambda, ndim=2, dtypes=_FLOAT_DTYPES)
        if tuple(mix_lambda.shape) != (B, num_mix):
            raise ValueError(f"mix_lambda must have shape (B, num_mix) = ({B}, {num_mix}), "
                             f"got {tuple(mix_lambda.shape)}")
        if _checking_values() and mix_lambda.numel() and not bool(((mix_lambda >= 0) & (mix_lambda <= 1)).all()):
            raise ValueError("mix_lambda values must lie in [0, 1]")
        lam = mix_lambda.to(device=q.device, dtype=torch.float32)
    elif num_mix > 0:
        lam = reference.sample_mix_lambda(B, num_mix, mix_alpha, generator, q.device)
    else:
        lam = None

    args = (q, d, pos_idx, G, bool(in_batch_negatives), float(temperature), float(gamma), num_mix, lam, reduction,
            return_stats)
    if use_triton(q, d):
        from kalm_fast.kernels import infonce

        return infonce.focal_infonce(*args)
    return reference.focal_infonce_chunked(*args)
