"""Pool hidden states over positions: `mean` over valid positions only, `cls` = position 0."""
from __future__ import annotations

import torch

from featx.settings import POOLINGS


def masked_mean(hidden_states, mask) -> torch.Tensor:
    """Mean over valid positions of every layer.

    hidden_states: L tensors (B, T, D); mask: (B, T) bool, True where a position is real.
    Returns (B, L, D) float32. Padding never enters the sum; an all-padding row would divide by zero
    and is a caller error (every item has at least one valid position).
    """
    w = mask.to(torch.float32)
    w = (w / w.sum(dim=1, keepdim=True)).unsqueeze(1)  # (B, 1, T): 1/count at valid positions
    # One batched matrix product per layer: half the time of multiply-then-sum, and no (B, T, D) temporary.
    # In float32 also inside a caller's bf16/fp16 autocast, which would otherwise run bmm in half precision.
    with torch.autocast(w.device.type, enabled=False):
        return torch.cat([torch.bmm(w, h.float()) for h in hidden_states], dim=1)


def cls(hidden_states) -> torch.Tensor:
    """Position 0 of every layer: L tensors (B, T, D) -> (B, L, D) float32."""
    return torch.stack([h[:, 0].float() for h in hidden_states], dim=1)


def pool(hidden_states, mask, poolings) -> dict:
    """{pooling: (B, L, D) float32} for each name in `poolings` (see POOLINGS)."""
    out = {}
    for name in poolings:
        if name == "mean":
            out[name] = masked_mean(hidden_states, mask)
        elif name == "cls":
            out[name] = cls(hidden_states)
        else:
            raise ValueError(f"unknown pooling {name!r}; choose from {', '.join(POOLINGS)}")
    return out
