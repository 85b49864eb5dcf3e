"""Conversions between padded (B, S, ...) batches and packed (T, ...) sequences with cu_seqlens."""

from __future__ import annotations

import torch


def unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """Pack the mask-true tokens of a padded batch (flash-attention's ``bert_padding.unpad_input``).

    Arguments:
        hidden: (B, S, ...), any dtype; differentiable.
        attention_mask: (B, S) bool/int, true = real token (any pattern, left or right padding).
    Returns packed (T, ...), indices int64 (T,) into the flattened (B*S) positions, cu_seqlens int32 (B+1,) and
    max_seqlen (int).
    """
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (B, S, ...), got shape {tuple(hidden.shape)}")
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"attention_mask must have shape (B, S) = {tuple(hidden.shape[:2])}, got {tuple(attention_mask.shape)}"
        )
    indices, cu_seqlens, max_seqlen = varlen_layout(attention_mask)
    packed = hidden.reshape(-1, *hidden.shape[2:]).index_select(0, indices)
    return packed, indices, cu_seqlens, max_seqlen


def varlen_layout(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The packed layout of a padded batch, shared by ``unpad_input`` and the model glue.

    Arguments:
        attention_mask: (B, S) bool/int, true = real token (any pattern, left or right padding).
    Returns indices int64 (T,) of the true positions in the flattened (B*S) batch, cu_seqlens int32 (B+1,) on the
    mask's device, and max_seqlen (int; the one host sync).
    """
    mask = attention_mask.bool()
    seqlens = mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten()).flatten()
    cu_seqlens = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    torch.cumsum(seqlens, dim=0, out=cu_seqlens[1:])
    return indices, cu_seqlens, int(seqlens.max()) if seqlens.numel() else 0


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of ``unpad_input``: zeros at the padded positions.

    Arguments:
        packed: (T, ...); indices: (T,) int64 from ``unpad_input``; batch: B; seqlen: S.
    Returns (B, S, ...) in packed's dtype.
    """
    if packed.shape[0] != indices.numel():
        raise ValueError(f"packed has {packed.shape[0]} rows but indices has {indices.numel()} entries")
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    return out.index_copy(0, indices, packed).reshape(batch, seqlen, *packed.shape[1:])
