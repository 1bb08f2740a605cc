"""Tiny native video encoders (hidden size 32, 2 layers, 32x32 frames, 4-frame clips, tubelets of 2 frames),
each saved with the processor its hub checkpoints carry."""

from featx.demo.tiny import save_checkpoint


SIZE, PATCH, FRAMES, TUBELET, HIDDEN = 32, 8, 4, 2, 32




def build_videomae(path, seed=0):
    """VideoMAEModel + VideoMAEImageProcessor (shortest edge, then a centre crop), as MCG-NJU/videomae-base."""
    import torch
    from transformers import VideoMAEConfig, VideoMAEImageProcessor, VideoMAEModel

    torch.manual_seed(seed)
    cfg = VideoMAEConfig(image_size=SIZE, patch_size=PATCH, num_frames=FRAMES, tubelet_size=TUBELET,
                         hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * HIDDEN)
    proc = VideoMAEImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return save_checkpoint(path, VideoMAEModel(cfg), proc)


def build_vjepa2(path, seed=0):
    """VJEPA2Model (encoder + predictor) + VJEPA2VideoProcessor, as facebook/vjepa2-vitl-fpc64-256."""
    import torch
    from transformers import VJEPA2Config, VJEPA2Model, VJEPA2VideoProcessor

    torch.manual_seed(seed)
    cfg = VJEPA2Config(crop_size=SIZE, frames_per_clip=FRAMES, tubelet_size=TUBELET, patch_size=PATCH,
                       hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2.0,
                       pred_hidden_size=HIDDEN, pred_num_hidden_layers=1, pred_num_attention_heads=2,
                       num_pooler_layers=1)
    proc = VJEPA2VideoProcessor(crop_size={"height": SIZE, "width": SIZE})
    return save_checkpoint(path, VJEPA2Model(cfg), proc)


def build_xclip(path, seed=0):
    """A full XCLIPModel + the VideoMAEImageProcessor that X-CLIP checkpoints carry as their processor's image part
    (ImageNet mean and std), as microsoft/xclip-base-patch32."""
    import torch
    from transformers import VideoMAEImageProcessor, XCLIPConfig, XCLIPModel

    torch.manual_seed(seed)
    vision = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                  image_size=SIZE, patch_size=PATCH, num_frames=FRAMES, mit_hidden_size=HIDDEN,
                  mit_intermediate_size=2 * HIDDEN, mit_num_hidden_layers=1, mit_num_attention_heads=2)
    text = dict(vocab_size=100, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=32)
    cfg = XCLIPConfig(text_config=text, vision_config=vision, projection_dim=HIDDEN, prompt_layers=1,
                      prompt_attention_heads=2)
    proc = VideoMAEImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return save_checkpoint(path, XCLIPModel(cfg), proc)


BUILDERS = {"videomae": build_videomae, "vjepa2": build_vjepa2, "xclip-vision": build_xclip}
