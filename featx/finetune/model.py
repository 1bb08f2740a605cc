"""The joint model: encoders cut at a layer (EncoderBranch) and a fusion head over their hidden states.

Each branch is a featx encoder cut at a chosen layer: its block list is truncated to the blocks that hidden state
`layer` (0 = embeddings output, L-1 = last) needs, and that hidden state is what the head sees, the same tensor
`featx extract` caches. The block list is found at the encoder family's `block_path` (featx.encoders.registry),
of the tower the branch runs (CLIP: image or text); a family without one cannot be fine-tuned.
`train_blocks=k` trains the top k kept blocks only (embeddings and lower blocks frozen and run in eval mode);
-1 trains everything, 0 freezes the encoder. The conv feature encoder of speech models is always frozen.
LayerDrop is turned off (layerdrop_off): in train mode it skips whole blocks at random, and the hidden state at
`layer` would then be a later block's output. Dropout and stochastic depth (drop_path: a block's residual branch
dropped per item, every block still giving its hidden state) stay as the checkpoint sets them.

Heads:
- "concat" (Toledo & Marcacini): per modality pooled hidden state -> Linear(D, proj) + ReLU; the M projections
  as M tokens through one transformer encoder layer; flattened -> MLP.
- "gated": featx.probing.fusion's gated model (Ando et al.) over the cut layer's sequences.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from featx.device import autocast
from featx.encoders.pooling import pool
from featx.encoders.registry import block_path, family_of
from featx.errors import FeatxError
from featx.probing.fusion import gated_model
from featx.settings import HEADS, defaults_of
from featx.settings import FinetuneSettings as FinetuneOptions

_OPTIONS = defaults_of(FinetuneOptions)   # the head's defaults are featx finetune's
# Modules whose output never reaches the hidden states (always frozen: they would get no gradient).
UNUSED_MODULES = ("pooler", "post_layernorm")
# Config fields of LayerDrop (Fan et al. 2019; wav2vec2 family, w2v-BERT: layerdrop; Whisper: encoder_layerdrop):
# in train mode each block is skipped with that probability, and transformers records the hidden states of the
# blocks that ran, so fewer come back and hidden_states[layer] is a later block's output (or out of range).
LAYERDROP_FIELDS = ("layerdrop", "encoder_layerdrop", "decoder_layerdrop")


@dataclass(frozen=True)
class HeadSettings:
    """The fusion head: kind (concat | gated), pooling of each branch (concat), projection size per modality
    (concat), MLP / gated fusion size, attention heads, dropout."""
    head: str = _OPTIONS["head"]
    pooling: str = _OPTIONS["pool"]
    proj_size: int = _OPTIONS["proj_size"]
    hidden_size: int = _OPTIONS["hidden_size"]
    heads: int = _OPTIONS["heads"]
    dropout: float = _OPTIONS["dropout"]


def block_list(model, path):
    """(parent module, attribute name) of the model's list of transformer blocks at dotted `path` (the one its
    encoder family names: featx.encoders.registry.block_path)."""
    *parents, name = path.split(".")
    obj = model
    for p in parents:
        obj = getattr(obj, p)
    return obj, name


def _layerdrop_settings(model):
    """(holder, name, value, in a config) of every LayerDrop probability above 0 in `model`: the LAYERDROP_FIELDS
    of every config its modules hold (a tower's config too) and every module's own `layerdrop` (Whisper's encoder
    copies encoder_layerdrop when it is built)."""
    for module in model.modules():
        holders = [(module, ("layerdrop",), False)]
        config = getattr(module, "config", None)
        if config is not None and not isinstance(config, dict):
            holders.append((config, LAYERDROP_FIELDS, True))
        for holder, names, in_config in holders:
            for name in names:
                value = getattr(holder, name, None)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                    yield holder, name, float(value), in_config


def layerdrop_of(model) -> dict:
    """{config field: probability} of the LayerDrop that is on in `model` (a module's own copy of a config's
    value is not said again; {"layerdrop": p} for a module's own that no config holds); empty: none."""
    found = list(_layerdrop_settings(model))
    out = {}
    for _, name, value, in_config in found:
        if in_config:
            out.setdefault(name, value)
    for _, name, value, in_config in found if not out else ():
        out.setdefault(name, value)
    return out


def layerdrop_off(model) -> dict:
    """Turn LayerDrop off in `model` (every probability _layerdrop_settings finds set to 0); returns what
    layerdrop_of gave before."""
    was = layerdrop_of(model)
    for holder, name, _, _ in list(_layerdrop_settings(model)):
        setattr(holder, name, 0.0)
    return was


def kept_blocks(layer, num_layers) -> int:
    """Blocks a branch cut at hidden state `layer` of `num_layers` keeps: one above the cut, up to all of them.

    Some models normalise their last block's output into their last hidden state (GPT-2's ln_f, Llama's norm):
    cut just at `layer`, hidden state `layer` would come out normalised, unlike the one extract caches. With one
    block above the cut it is that block's input, as in the whole model (the block above runs, frozen; a model
    with no blocks would return no hidden states)."""
    return min(int(layer) + 1, int(num_layers) - 1)


class EncoderBranch(nn.Module):
    """One encoder cut at hidden state `layer`, with all but its top `train_blocks` kept blocks frozen.

    forward(inputs) -> (hidden_states[layer] (B, T, D_layer), mask (B, T) bool), D_layer = hidden_size: the cut
    layer's width (layer_widths[layer] for a CNN's stages). The block list is truncated to kept_blocks(layer, L)
    blocks, so at most one block above the cut runs (frozen). LayerDrop is off (layerdrop_off; `layerdrop_was`:
    the checkpoint's values), so every call, in train mode too, gives the kept blocks + 1 hidden states; a
    forward that gives another number is a FeatxError, never another layer's values.
    """

    def __init__(self, adapter, layer, train_blocks=-1):
        super().__init__()
        L = adapter.num_layers
        layer = int(layer)
        layer = layer + L if layer < 0 else layer
        if not 0 <= layer < L:
            raise FeatxError(f"{adapter.name}: layer {layer} out of range 0..{L - 1}")
        self.adapter, self.layer, self.num_layers = adapter, layer, L
        self.modality = adapter.modality
        self.hidden_size = int(adapter.layer_widths[layer]) if adapter.layer_widths else adapter.hidden_size
        self.family = family_of(adapter.config, adapter.modality)
        self.encoder = adapter.model
        self.block_path = block_path(adapter.config, self.encoder, adapter.modality)  # of the branch's tower
        parent, attr = block_list(self.encoder, self.block_path)
        self.kept = kept_blocks(layer, L)
        setattr(parent, attr, nn.ModuleList(list(getattr(parent, attr))[:self.kept]))
        self.layerdrop_was = layerdrop_off(self.encoder)
        self._freeze(list(getattr(parent, attr)), int(train_blocks))

    def _freeze(self, blocks, train_blocks):
        """Freeze all but the top `train_blocks` blocks below the cut (-1: train everything)."""
        used = blocks[:self.layer]
        k = len(used) if train_blocks < 0 else min(train_blocks, len(used))
        self.train_all = train_blocks < 0
        self.encoder.requires_grad_(self.train_all)
        self.trainable_blocks = used[len(used) - k:] if k else []
        for block in self.trainable_blocks:
            block.requires_grad_(True)
        for block in blocks[self.layer:]:  # the block kept above the cut gets no gradient: frozen
            block.requires_grad_(False)
        for name in UNUSED_MODULES:
            for holder in (self.encoder, getattr(self.encoder, "vision_model", None)):
                if holder is not None and isinstance(getattr(holder, name, None), nn.Module):
                    getattr(holder, name).requires_grad_(False)
        if hasattr(self.encoder, "freeze_feature_encoder"):  # speech: the conv feature encoder stays as trained
            self.encoder.freeze_feature_encoder()

    def train(self, mode=True):
        super().train(mode)
        if mode and not self.train_all:  # frozen parts behave as the feature extractor did: no dropout
            self.encoder.eval()
            for block in self.trainable_blocks:
                block.train(True)
        return self

    def forward(self, inputs):
        hidden_states, mask = self.adapter.forward(inputs)
        if len(hidden_states) != self.kept + 1:  # a block skipped: hidden_states[layer] would be another layer
            raise FeatxError(f"{self.adapter.name}: the encoder cut at layer {self.layer} gave {len(hidden_states)} "
                             f"hidden states, not {self.kept + 1} (its {self.kept} kept blocks + the embeddings): "
                             f"a block was skipped{' in train mode' if self.training else ''}; featx cannot tell "
                             "which layer each one is")
        return hidden_states[self.layer], mask


class ConcatHead(nn.Module):
    """Toledo & Marcacini's head: per modality Linear(D_m, proj) + ReLU on the pooled hidden state; the M
    projections as M tokens through one transformer encoder layer; flattened -> Linear + ReLU + dropout ->
    Linear(out_dim). forward(seqs: M x (B, T, D_m), masks: M x (B, T)) -> (B, out_dim)."""

    def __init__(self, dims, out_dim, proj_size=32, hidden_size=128, heads=4, dropout=0.1, pooling="mean"):
        super().__init__()
        self.pooling = pooling
        self.proj = nn.ModuleList([nn.Sequential(nn.Linear(d, proj_size), nn.ReLU()) for d in dims])
        nhead = heads if proj_size % heads == 0 else 1
        self.mix = nn.TransformerEncoderLayer(proj_size, nhead, dim_feedforward=4 * proj_size, dropout=dropout,
                                              batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(proj_size * len(dims), hidden_size), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_size, out_dim))

    def forward(self, seqs, masks):
        tokens = torch.stack([p(pool([h], m, [self.pooling])[self.pooling][:, 0])
                              for p, h, m in zip(self.proj, seqs, masks)], dim=1)
        return self.mlp(self.mix(tokens).flatten(1))


class GatedHead(nn.Module):
    """Ando et al.'s gated fusion over the cut layer's sequences, reusing featx.probing.fusion's model with a
    single layer per modality (its layer-weighted sum over one layer is the identity).
    forward(seqs: M x (B, T, D_m), masks: M x (B, T)) -> (B, out_dim)."""

    def __init__(self, dims, out_dim, hidden_size=128, heads=4, dropout=0.1):
        super().__init__()
        self.model = gated_model(list(dims), [1] * len(dims), hidden_size, heads, dropout, out_dim)

    def forward(self, seqs, masks):
        args = []
        for h, m in zip(seqs, masks):
            args += [h.float().unsqueeze(2), m]
        return self.model(*args)


class JointModel(nn.Module):
    """Branches (EncoderBranch) + a fusion head. forward(inputs: one prepared dict per branch) -> (B, out_dim)."""

    def __init__(self, branches, head):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.head = head

    def forward(self, inputs):
        seqs, masks = zip(*[b(x) for b, x in zip(self.branches, inputs)])
        return self.head(list(seqs), list(masks)).float()

    def trainable_state(self) -> dict:
        """name -> tensor of every trainable parameter (what a checkpoint holds)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}


def make_head(settings: HeadSettings, dims, out_dim) -> nn.Module:
    """The fusion head over branches of hidden sizes `dims`, with `out_dim` outputs."""
    s = settings
    if s.head == "concat":
        return ConcatHead(dims, out_dim, s.proj_size, s.hidden_size, s.heads, s.dropout, s.pooling)
    if s.head == "gated":
        return GatedHead(dims, out_dim, s.hidden_size, s.heads, s.dropout)
    raise FeatxError(f"unknown head {s.head!r}; choose from {', '.join(HEADS)}")


@torch.no_grad()
def predict(model, batches, coding, device, precision):
    """(N,) predictions (labels, or values in the label's units) of `model` in eval mode for an iterable of
    prepared batches (one dict per branch each); `coding` (featx.finetune.data.TargetCoding) decodes them."""
    out = predict_outputs(model, batches, device, precision)
    return coding.decode(out) if out is not None else coding.empty()


@torch.no_grad()
def predict_outputs(model, batches, device, precision):
    """(N, out_dim) float32 outputs of `model` in eval mode (logits for classes) for prepared batches; None
    when there are none."""
    model.eval()
    outs = []
    for inputs in batches:
        with autocast(device, precision):
            outs.append(model(inputs).float())
    return torch.cat(outs) if outs else None


def build_model(encoders, layers, train_blocks, head: HeadSettings, out_dim) -> JointModel:
    """The joint model of encoder adapters cut at `layers`, `train_blocks` top blocks trainable in each."""
    branches = [EncoderBranch(a, k, b) for a, k, b in zip(encoders, layers, train_blocks)]
    return JointModel(branches, make_head(head, [b.hidden_size for b in branches], out_dim))
