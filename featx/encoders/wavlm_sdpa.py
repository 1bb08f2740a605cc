"""WavLM's gated relative-position attention through torch's fused scaled_dot_product_attention (SDPA).

transformers runs WavLM's attention (WavLMAttention) through F.multi_head_attention_forward with
need_weights=True: the (B*H, T, T) scores and probabilities are materialised, and the (H, T, T) position bias
is first repeated B times. Here the same sums run through SDPA on the model's own modules and weights:

    bias[b, h, i, j] = key[b, j] + gate[b, h, i] * pos[h, i, j],   key[b, j] = 0 at real frames, -inf at padding
    gate[b, h, i]    = a * (c_h * g - 1) + 2,  (a, g) = sigmoid(sum of 4 of gru_rel_pos_linear(x[b, i, h]))
    out              = out_proj(softmax(q k^T / sqrt(d) + bias) v)

so the bias is an additive float mask to SDPA, which takes the key padding in the same tensor (no query row is
fully masked: every item has a real frame). The position bias is kept (1, H, T, T) and broadcast over the batch
instead of repeated, and the (B, H, T, T) bias is written once, by one addcmul, directly in the attention's
compute dtype (q's: bf16/fp16 under autocast, else fp32), with the key padding folded in: it writes 2 bytes an
element under bf16, where an fp32 product, an fp32 masked_fill and a cast to bf16 moved 18 (10 unpadded); both
also read the (1, H, T, T) fp32 position bias, at most once per batch item. Its rows are allocated with a stride
that is a multiple of 16, so that SDPA's memory-efficient CUDA kernel does not copy it into a padded one (it
does for strides not a multiple of 8: 4 more bytes an element). (With gradients, in finetuning, the fp32 bias is
formed and then cast, contiguous: out= takes no gradient.)

Numerics: the gate is computed in fp32 (under autocast too) from gru_rel_pos_linear's output, and the sum
key + gate * pos is formed in fp32 from the fp32 position bias and rounded to the compute dtype once, as
transformers' eager attention does (its fp32 bias is cast to bf16 for the scores' baddbmm under autocast).
In fp32 the result equals the eager attention's to rounding.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F


ROW_ALIGN = 16   # elements: the bias's row stride, a multiple of the 8 SDPA's memory-efficient kernel wants


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


def position_gate(module, hidden_states):
    """The gate of one layer's relative-position bias, as WavLMAttention computes it, in fp32.

    hidden_states: (B, T, D), the attention's input. Returns (B, H, T, 1) float32 (under autocast the projection
    runs in bf16/fp16; its sum over 4, the sigmoid and the rest run in fp32).
    """
    b, t, _ = hidden_states.shape
    heads = hidden_states.view(b, t, module.num_heads, -1).transpose(1, 2)            # (B, H, T, d)
    proj = module.gru_rel_pos_linear(heads).float().view(b, module.num_heads, t, 2, 4).sum(-1)
    gate_a, gate_b = torch.sigmoid(proj).chunk(2, dim=-1)                              # (B, H, T, 1) each
    return gate_a * (gate_b * module.gru_rel_pos_const.float() - 1.0) + 2.0


def attention_bias(module, hidden_states, position_bias, attention_mask=None, dtype=None):
    """The additive attention mask of one layer: gated position bias plus key padding, in one pass.

    hidden_states: (B, T, D), the attention's input. position_bias: (1, H, T, T), the first layer's.
    attention_mask: (B, T), true (or 1) at real frames, or None. dtype: the bias's dtype (SDPA's q dtype;
    default position_bias's). Returns (B, H, T, T) `dtype`: key + gate * position_bias, computed in fp32 and
    rounded to `dtype` once as it is written (key: 0 at real frames, -inf at padded keys); without gradients
    its rows are ROW_ALIGN-strided (a view of (B, H, T, T rounded up)), which SDPA takes without a copy.
    """
    b, t, _ = hidden_states.shape
    dtype = dtype or position_bias.dtype
    gate = position_gate(module, hidden_states)
    key = None
    if attention_mask is not None:
        key = torch.zeros(b, 1, 1, t, dtype=gate.dtype, device=gate.device)
        key.masked_fill_(attention_mask[:, None, None, :].ne(1), float("-inf"))
    if torch.is_grad_enabled() and (gate.requires_grad or position_bias.requires_grad):
        # Training (featx finetune): out= takes no gradient, so the fp32 bias is formed, then cast.
        return (gate * position_bias if key is None else torch.addcmul(key, gate, position_bias)).to(dtype)
    # out= in another dtype: on CUDA the fp32 result is cast as it is stored, in the same kernel. Rows are
    # allocated ROW_ALIGN-aligned: SDPA's memory-efficient CUDA kernel copies a mask whose strides are not
    # multiples of 8 into a padded one (T frames, 50 a second: a multiple of 8 for one length in 8).
    row = -(-t // ROW_ALIGN) * ROW_ALIGN
    bias = torch.empty(b, module.num_heads, t, row, dtype=dtype, device=hidden_states.device)[..., :t]
    if key is None:
        return torch.mul(gate, position_bias, out=bias)
    return torch.addcmul(key, gate, position_bias, out=bias)


def sdpa_attention_forward(self, hidden_states, attention_mask=None, position_bias=None, index=0, **kwargs):
    """WavLMAttention.forward's signature and results, through SDPA.

    hidden_states: (B, T, D). attention_mask: (B, T), true (or 1) at real frames, or None. position_bias:
    None in the first layer (it computes the bias), else the (1, H, T, T) bias the first layer returned.
    Returns (attn_output (B, T, D), None (no attention weights), position_bias (1, H, T, T) in its own dtype, for
    the next layer).
    """
    b, t, dim = hidden_states.shape
    if position_bias is None:
        position_bias = self.compute_bias(t, t).unsqueeze(0)                          # (1, H, T, T)

    def heads(proj):
        return proj(hidden_states).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
    # SDPA takes one dtype: under autocast q is bf16/fp16, and the bias is written in it.
    bias = attention_bias(self, hidden_states, position_bias, attention_mask, dtype=q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
    out = self.out_proj(out.transpose(1, 2).reshape(b, t, dim))
    return out, None, position_bias
