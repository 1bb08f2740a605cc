"""Image families beyond CLIP-style ViTs: class + register tokens (DINOv2 with registers, DINOv3), BEiT,
SigLIP 2's NaFlex tower (a variable number of patches per image) and ConvNeXt-style CNNs (feature maps of
differing widths per stage).

What `mean` covers is explicit for each family here and stored in the cache as attrs["mean_over"]:
  "patch tokens"      class token and register tokens excluded (DINOv2 with registers, DINOv3, BEiT);
  "valid patches"     every real patch of a NaFlex image, its padding patches excluded (SigLIP 2);
  "spatial positions" every position of a stage's feature map (ConvNeXt, ConvNeXt V2).
`cls` is position 0, the class token, and exists only for families that have one. The CLIP / ViT / DINOv2
adapters (featx.encoders.image) keep their mean over all tokens, class token included, so their caches keep
their numbers.
"""
from __future__ import annotations

import torch

from featx.encoders.image import ImageEncoder
from featx.encoders.pooling import spatial_means


class PatchTokenEncoder(ImageEncoder):
    """A ViT with a class token at position 0, then `num_register_tokens` register tokens, then the patches.

    forward's mask is True at the patch tokens only, so `mean` is the mean over patches; `cls` is position 0."""

    def __init__(self, name, **kw):
        super().__init__(name, **kw)
        self.num_prefix_tokens = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        self.attrs.update(mean_over="patch tokens", prefix_tokens=self.num_prefix_tokens)  # class + registers

    def forward(self, inputs):
        """(L tensors (B, T, D), (B, T) mask, False at the class and register tokens)."""
        hs, mask = super().forward(inputs)
        mask[:, :self.num_prefix_tokens] = False
        return hs, mask


class _NaFlexPatches:
    """A picklable preprocessor: one image -> {pixel_values (P, C*p*p), pixel_attention_mask (P,),
    spatial_shapes (2,)}: the checkpoint's processor, which pads every image to max_num_patches."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        out = self.processor(images=image, return_tensors="pt")
        return {k: out[k][0] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}


class Siglip2VisionEncoder(ImageEncoder):
    """The vision tower of a SigLIP 2 checkpoint (NaFlex: each image keeps its aspect ratio, as many patches as
    fit max_num_patches, padded to it). No class token; mean over the valid patches (pixel_attention_mask).
    Preprocessing is the checkpoint's processor only (its patch layout depends on each image's size)."""
    model_class = "Siglip2VisionModel"

    def __init__(self, name, **kw):
        super().__init__(name, **kw)
        self.attrs.update(max_num_patches=int(getattr(self.processor, "max_num_patches", 0) or 0),
                          mean_over="valid patches")

    def preprocessor(self):
        return _NaFlexPatches(self.processor)

    def shortest_side(self) -> int:
        return 0  # the patch grid follows each image's size: decode it at full scale

    def collate(self, feats):
        out = {}
        for k in feats[0]:
            buf = self.host_tensor((len(feats), *feats[0][k].shape), feats[0][k].dtype)
            out[k] = torch.stack([f[k] for f in feats], out=buf)
        return out

    def forward(self, inputs):
        """(L tensors (B, P, D), (B, P) mask of the real patches)."""
        inputs = {k: self.to_device(v) for k, v in inputs.items()}
        out = self.model(**inputs, output_hidden_states=True)
        return out.hidden_states, inputs["pixel_attention_mask"].bool()


class ConvNextEncoder(ImageEncoder):
    """ConvNeXt / ConvNeXt V2: hidden states are the stem's and each stage's feature maps (B, C_l, H_l, W_l).
    Each is averaged over its H_l * W_l positions here (the maps differ in size, so there is no common mask),
    giving one position (B, 1, C_l) per layer; layers are zero-padded to the widest stage by the pooling and
    their widths recorded in the cache (layer_widths). Mean only; no per-position sequences (--seq)."""
    sequences = False  # stages differ in width and in positions: no (T, L, D) sequence exists

    def _finish_load(self, model):
        self.model = model.eval().to(self.device)
        widths = [int(w) for w in model.config.hidden_sizes]
        self.layer_widths = [widths[0]] + widths  # the stem's output, then each stage's
        self.num_layers, self.hidden_size = len(self.layer_widths), max(widths)

    def __init__(self, name, **kw):
        super().__init__(name, **kw)
        self.attrs["mean_over"] = "spatial positions"

    def forward(self, inputs):
        """(L tensors (B, 1, C_l): each stage's map averaged over space, in float32; a (B, 1) mask)."""
        hs, _ = super().forward(inputs)
        pooled = spatial_means(hs)
        return pooled, torch.ones(pooled[0].shape[:2], dtype=torch.bool, device=pooled[0].device)
