"""Tiny image checkpoints, one builder per image family (featx.encoders.registry Family.name), each saved with
its image processor: ViTs at 32x32 pixels in 8x8 patches, hidden size 32, 2 layers."""
from __future__ import annotations


from featx.demo.tiny import build_tiny_clip, save_checkpoint

_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
_SIDE = {"height": 32, "width": 32}




def _seeded(seed):
    import torch

    torch.manual_seed(seed)


def build_vit(path, seed=0):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    _seeded(seed)
    model = ViTModel(ViTConfig(**_VIT, image_size=32, patch_size=8), add_pooling_layer=False)
    return save_checkpoint(path, model, ViTImageProcessor(size=_SIDE))


def build_dinov2(path, seed=0):
    """DINOv2 (the "vit" family too), with its BitImageProcessor: resize the shortest edge, centre crop."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    _seeded(seed)
    model = Dinov2Model(Dinov2Config(**_VIT, image_size=32, patch_size=8))
    return save_checkpoint(path, model, BitImageProcessor(size={"shortest_edge": 32}, crop_size=_SIDE))


def build_dinov2_registers(path, seed=0):
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    _seeded(seed)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**_VIT, image_size=32, patch_size=8,
                                                               num_register_tokens=4))
    return save_checkpoint(path, model, BitImageProcessor(size={"shortest_edge": 32}, crop_size=_SIDE))


def build_dinov3_vit(path, seed=0):
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

    _seeded(seed)
    model = DINOv3ViTModel(DINOv3ViTConfig(**_VIT, image_size=32, patch_size=8, num_register_tokens=4))
    return save_checkpoint(path, model, DINOv3ViTImageProcessor(size=_SIDE))


def build_beit(path, seed=0):
    from transformers import BeitConfig, BeitImageProcessor, BeitModel

    _seeded(seed)
    model = BeitModel(BeitConfig(**_VIT, image_size=32, patch_size=8, use_relative_position_bias=True))
    return save_checkpoint(path, model, BeitImageProcessor(size=_SIDE, crop_size=_SIDE, do_center_crop=False))


def build_siglip_vision(path, seed=0):
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    _seeded(seed)
    model = SiglipVisionModel(SiglipVisionConfig(**_VIT, image_size=32, patch_size=8))
    return save_checkpoint(path, model, SiglipImageProcessor(size=_SIDE))


def build_siglip2(path, seed=0, max_num_patches=16):
    """A full SigLIP 2 checkpoint (text and vision towers; model type "siglip2") with its NaFlex processor."""
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model

    _seeded(seed)
    cfg = Siglip2Config(text_config=dict(_VIT, vocab_size=100, max_position_embeddings=16),
                        vision_config=dict(_VIT, patch_size=8, num_patches=max_num_patches))
    return save_checkpoint(path, Siglip2Model(cfg),
                           Siglip2ImageProcessor(patch_size=8, max_num_patches=max_num_patches))


def build_convnext(path, seed=0, v2=True, widths=(8, 16, 24, 32)):
    """ConvNeXt V2 (or V1) with 4 stages of differing widths; its processor resizes to 32/crop_pct, crops 32."""
    from transformers import ConvNextConfig, ConvNextImageProcessor, ConvNextModel, ConvNextV2Config, ConvNextV2Model

    _seeded(seed)
    kw = dict(hidden_sizes=list(widths), depths=[1, 1, 1, 1], image_size=32)
    model = ConvNextV2Model(ConvNextV2Config(**kw)) if v2 else ConvNextModel(ConvNextConfig(**kw))
    return save_checkpoint(path, model, ConvNextImageProcessor(size={"shortest_edge": 32}))


BUILDERS = {
    "clip-vision": lambda path: build_tiny_clip(path),
    "siglip-vision": build_siglip_vision,
    "vit": build_vit,
    "dinov2-registers": build_dinov2_registers,
    "dinov3-vit": build_dinov3_vit,
    "beit": build_beit,
    "siglip2-vision": build_siglip2,
    "convnext": build_convnext,
}
