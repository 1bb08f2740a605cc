"""WavLM's gated relative-position attention through torch's fused scaled_dot_product_attention (SDPA).

transformers runs WavLM's attention (WavLMAttention) through F.multi_head_attention_forward with
need_weights=True: the (B*H, T, T) scores and probabilities are materialised, and the (H, T, T) position bias
is first repeated B times. Here the same sums run through SDPA on the model's own modules and weights:

    bias[b, h, i, j] = gate[b, h, i] * pos[h, i, j]            (+ -inf where key j is padding)
    gate[b, h, i]    = a * (c_h * g - 1) + 2,  (a, g) = sigmoid(sum of 4 of gru_rel_pos_linear(x[b, i, h]))
    out              = out_proj(softmax(q k^T / sqrt(d) + bias) v)

so the bias is an additive float mask to SDPA (which takes the key padding mask in the same tensor), and the
position bias is kept (1, H, T, T) and broadcast over the batch instead of repeated.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def is_wavlm(model) -> bool:
    """Whether `model` (a transformers model) is a WavLM, whose attention this module can run."""
    return getattr(getattr(model, "config", None), "model_type", "") == "wavlm"


def use_sdpa_attention(model) -> int:
    """Run every WavLMAttention of `model` (a loaded WavLMModel or a model holding one) through SDPA, in place:
    each module's forward is replaced on that instance, its weights are used as they are. Returns how many
    attention modules were switched (0 for a model without WavLM attention)."""
    from transformers.models.wavlm.modeling_wavlm import WavLMAttention

    switched = 0
    for module in model.modules():
        if isinstance(module, WavLMAttention):
            module.forward = types.MethodType(sdpa_attention_forward, module)
            switched += 1
    return switched


def gated_position_bias(module, hidden_states, position_bias):
    """The gated relative-position bias of one layer.

    hidden_states: (B, T, D), the attention's input. position_bias: (1, H, T, T), the first layer's.
    Returns (B, H, T, T): gate (B, H, T, 1) times position_bias, as WavLMAttention computes it.
    """
    b, t, _ = hidden_states.shape
    heads = hidden_states.view(b, t, module.num_heads, -1).transpose(1, 2)            # (B, H, T, d)
    proj = module.gru_rel_pos_linear(heads).view(b, module.num_heads, t, 2, 4).sum(-1)
    gate_a, gate_b = torch.sigmoid(proj).chunk(2, dim=-1)                              # (B, H, T, 1) each
    gate = gate_a * (gate_b * module.gru_rel_pos_const - 1.0) + 2.0
    return gate * position_bias


def sdpa_attention_forward(self, hidden_states, attention_mask=None, position_bias=None, index=0, **kwargs):
    """WavLMAttention.forward's signature and results, through SDPA.

    hidden_states: (B, T, D). attention_mask: (B, T), true (or 1) at real frames, or None. position_bias:
    None in the first layer (it computes the bias), else the (1, H, T, T) bias the first layer returned.
    Returns (attn_output (B, T, D), None (no attention weights), position_bias (1, H, T, T)).
    """
    b, t, dim = hidden_states.shape
    if position_bias is None:
        position_bias = self.compute_bias(t, t).unsqueeze(0)                          # (1, H, T, T)
    bias = gated_position_bias(self, hidden_states, position_bias)
    if attention_mask is not None:
        bias = bias.masked_fill(attention_mask[:, None, None, :].ne(1), float("-inf"))

    def heads(proj):
        return proj(hidden_states).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
    # Under autocast q is bf16/fp16 while the bias (fp32 embedding times the gate) is fp32: SDPA takes one dtype.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                         dropout_p=self.dropout if self.training else 0.0)
    out = self.out_proj(out.transpose(1, 2).reshape(b, t, dim))
    return out, None, position_bias
