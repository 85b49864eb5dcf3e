"""The small torch math that the oracle (``kalm_fast.reference``) and the kernels' autograd functions share, below
both (it imports neither): the L2 floor, the focal loss with its finite derivative, the loss reduction and the
O(B * M) head of focal InfoNCE (synthetic logits from dot products, lse / log p, backward coefficients, stats).
The Triton path and the torch paths therefore agree by construction outside the tiled parts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

L2_EPS = 1e-12  # as torch.nn.functional.normalize
INFONCE_STATS = ("p_pos", "weight", "hard_neg_logit", "hard_neg_idx")


class _FocalNLL(torch.autograd.Function):
    """loss_i = -(1 - p_i)^gamma * log p_i as a function of log p_i, with a gradient that stays finite as p_i -> 1.

    Derivation (u = log p, p = e^u, 1 - p = -expm1(u)):
      1. L(u) = -(1 - p)^g * u.
      2. d(1 - p)/du = -p, so dL/du = -(1 - p)^g + g * p * (1 - p)^(g - 1) * u.
      3. Write (1 - p)^(g - 1) * u = (1 - p)^g * r with r = u / (1 - p); r -> -1 as u -> 0 (log p ~ -(1 - p)),
         and r <= -1 everywhere because -log p >= 1 - p.
      4. dL/du = (1 - p)^g * (g * p * r - 1): finite for every g >= 0, and -> 0 as p -> 1 when g > 0.
    """

    @staticmethod
    def forward(ctx, logp: torch.Tensor, gamma: float):
        one_minus_p = -torch.expm1(logp)
        w = one_minus_p.pow(gamma)
        ctx.save_for_backward(logp)
        ctx.gamma = gamma
        return -w * logp

    @staticmethod
    def backward(ctx, grad_out):
        (logp,) = ctx.saved_tensors
        return grad_out * focal_dloss_dlogp(logp, ctx.gamma), None


def focal_dloss_dlogp(logp: torch.Tensor, gamma: float) -> torch.Tensor:
    """dL_i/d log p_i of ``_FocalNLL`` (step 4 of its derivation), fp32."""
    p = torch.exp(logp)
    one_minus_p = -torch.expm1(logp)
    r = torch.where(one_minus_p > 0, logp / one_minus_p.clamp_min(torch.finfo(logp.dtype).tiny), -torch.ones_like(logp))
    return one_minus_p.pow(gamma) * (gamma * p * r - 1.0)


def focal_nll(logp: torch.Tensor, gamma: float) -> torch.Tensor:
    """-(1 - p)^gamma * log p per query, finite value and gradient for every log p <= 0."""
    return _FocalNLL.apply(logp, float(gamma))


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def infonce_mix_logits(s_a, aa, s_b, ab, bb, lam, temperature):
    """Synthetic-negative logits from five dot products, without forming e = lam d_a + (1 - lam) d_b.

    s_a, aa (B,) = q.d_a, |d_a|^2; s_b, ab, bb (B, M) = q.d_b, d_a.d_b, |d_b|^2; lam (B, M). Uses
    |e|^2 = lam^2 |d_a|^2 + 2 lam (1 - lam) d_a.d_b + (1 - lam)^2 |d_b|^2 and zh = q.e / (tau |e|), with |e| floored at
    L2_EPS as F.normalize does (the oracle divides by |e| unguarded; they differ only for a zero mixture).
    Returns zh (B, M) and |e| (B, M), fp32.
    """
    s_a, aa = s_a[:, None], aa[:, None]
    n2 = lam * lam * aa + 2.0 * lam * (1.0 - lam) * ab + (1.0 - lam) * (1.0 - lam) * bb
    nrm = n2.clamp_min(L2_EPS * L2_EPS).sqrt()
    return (lam * s_a + (1.0 - lam) * s_b) / nrm / temperature, nrm


def infonce_head(lse_real, logp_real, zh, gamma):
    """The O(B * M) end of the forward, natural logs, fp32.

    lse_real (B,) = log sum_{C_i} e^z_ij over the real candidates, logp_real (B,) = z_i,pos - lse_real (formed by the
    caller from the same logits, so it is exact, 0, when the positive dominates), zh (B, M) or None. Returns
    shift (B,) = lse - lse_real = log(1 + sum_m e^(zh_im - lse_real)) >= 0 (the synthetic negatives' share),
    log p (B,) = logp_real - shift and the per-query focal loss -(1 - p)^gamma log p (B,).
    """
    if zh is None:
        shift = torch.zeros_like(lse_real)
    else:
        shift = F.softplus(torch.logsumexp(zh - lse_real[:, None], 1))
    # p <= 1 exactly; rounding could give log p = +1 ulp, and (1 - p)^gamma needs 1 - p >= 0
    logp = (logp_real - shift).clamp(max=0.0)
    return shift, logp, -(-torch.expm1(logp)).pow(gamma) * logp


def infonce_grad_coeffs(grad_loss, logp, lse, zh, lam, nrm, gamma, reduction):
    """Per-query backward coefficients (steps 1, 3 and 5 of the derivation in kalm_fast.kernels.infonce).

    1. g_i = dL/dlog p_i = r_i * f'(log p_i), r_i = upstream gradient (/ B for "mean"), f' = focal_dloss_dlogp.
    3. dL/dzh_im = -g_i * Ph_im with Ph_im = exp(zh_im - lse_i).
    5. dq_i gets (1/tau) (c_a,i d_a + sum_m c_b,im d_b,m): c_a,i = sum_m dzh_im lam_im / |e_im|,
       c_b,im = dzh_im (1 - lam_im) / |e_im| (e detached: nothing reaches d).
    Returns g (B,), c_a (B,) and c_b (B, M) (None, None without mixing).
    """
    r = grad_loss.float() / logp.shape[0] if reduction == "mean" else grad_loss.float()
    g = focal_dloss_dlogp(logp, gamma) * r
    if zh is None:
        return g, None, None
    w = -g[:, None] * torch.exp(zh - lse[:, None]) / nrm
    return g, (w * lam).sum(1), w * (1.0 - lam)


def infonce_stats(logp, gamma, hard_neg_logit, hard_neg_idx) -> dict:
    """The ``return_stats`` dict (keys INFONCE_STATS), per query, detached. A query without a hardest negative
    (``hard_neg_idx`` -1: no negatives, or NaN scores) gets ``hard_neg_logit`` -inf on every backend."""
    logp = logp.detach()
    hard_neg_logit = torch.where(hard_neg_idx >= 0, hard_neg_logit, float("-inf"))
    return {"p_pos": logp.exp(), "weight": (-torch.expm1(logp)).pow(gamma), "hard_neg_logit": hard_neg_logit,
            "hard_neg_idx": hard_neg_idx}
