"""Pool hidden states over positions: `mean` over valid positions only, `cls` = position 0, `last` = the last
valid position of each row (a decoder LM's last real token, under left or right padding).

Layers whose widths differ (a CNN's stages: 96, 192, 384, 768 channels) are zero-padded at the end to
`width`; the cache records each layer's real width (`layer_widths`) and readers cut the padding off."""
from __future__ import annotations

import torch

from featx.settings import POOLINGS


def _padded(values, width):
    """(B, D_l) float32 tensors -> (B, L, width), each zero-padded at the end to `width` (None: all equal)."""
    if width is not None:
        values = [v if v.shape[-1] == width else torch.nn.functional.pad(v, (0, width - v.shape[-1]))
                  for v in values]
    return torch.stack(values, dim=1)


def masked_mean(hidden_states, mask, width=None) -> torch.Tensor:
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
        if width is None:
            return torch.cat([torch.bmm(w, h.float()) for h in hidden_states], dim=1)
        return _padded([torch.bmm(w, h.float())[:, 0] for h in hidden_states], width)


def cls(hidden_states, width=None) -> torch.Tensor:
    """Position 0 of every layer: L tensors (B, T, D) -> (B, L, D) float32."""
    return _padded([h[:, 0].float() for h in hidden_states], width)


def last_positions(mask) -> torch.Tensor:
    """(B,) index of the last True of each row of a (B, T) bool mask (right or left padding alike)."""
    t = mask.shape[1]
    return (t - 1) - torch.flip(mask.to(torch.int8), dims=[1]).argmax(dim=1)


def last(hidden_states, mask, width=None) -> torch.Tensor:
    """The last valid position of every layer: L tensors (B, T, D) -> (B, L, D) float32."""
    rows = torch.arange(mask.shape[0], device=mask.device)
    at = last_positions(mask)
    return _padded([h[rows, at].float() for h in hidden_states], width)


def spatial_means(feature_maps) -> list:
    """Each (B, C_l, *spatial) feature map (a CNN stage, a Swin stage) averaged over its positions, in float32:
    L tensors (B, 1, C_l), one position per layer (maps of differing sizes share no mask)."""
    return [h.float().flatten(2).mean(dim=2).unsqueeze(1) for h in feature_maps]


def pool(hidden_states, mask, poolings, width=None) -> dict:
    """{pooling: (B, L, width or D) float32} for each name in `poolings` (see POOLINGS). width: pad layers of
    differing widths to it (None: every layer has the same width)."""
    out = {}
    for name in poolings:
        if name == "mean":
            out[name] = masked_mean(hidden_states, mask, width)
        elif name == "cls":
            out[name] = cls(hidden_states, width)
        elif name == "last":
            out[name] = last(hidden_states, mask, width)
        else:
            raise ValueError(f"unknown pooling {name!r}; choose from {', '.join(POOLINGS)}")
    return out
