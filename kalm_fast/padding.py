"""Conversions between padded (B, S, ...) batches and packed (T, ...) sequences with cu_seqlens."""

from __future__ import annotations

import torch


def unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """Pack the mask-true tokens of a padded batch.

    hidden (B, S, ...), attention_mask (B, S) bool/int (true = real token; any pattern, left or right padding).
    Returns packed (T, ...), indices int64 (T,) into the flattened (B*S) positions, cu_seqlens int32 (B+1,) and
    max_seqlen (int). Differentiable with respect to ``hidden``.
    """
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (B, S, ...), got shape {tuple(hidden.shape)}")
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"attention_mask must have shape (B, S) = {tuple(hidden.shape[:2])}, got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.bool()
    seqlens = mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=hidden.device)
    torch.cumsum(seqlens, dim=0, out=cu_seqlens[1:])
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    packed = hidden.reshape(-1, *hidden.shape[2:]).index_select(0, indices)
    return packed, indices, cu_seqlens, max_seqlen


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of ``unpad_input``: packed (T, ...) -> (batch, seqlen, ...), zeros at padded positions."""
    if packed.shape[0] != indices.numel():
        raise ValueError(f"packed has {packed.shape[0]} rows but indices has {indices.numel()} entries")
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    return out.index_copy(0, indices, packed).reshape(batch, seqlen, *packed.shape[1:])
