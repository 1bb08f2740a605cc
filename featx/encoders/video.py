"""Native video encoders: one clip of the model's frame count per item, through the checkpoint's own processor.

A clip is `num_frames` frames sampled over the item's [start, end) by featx.data.video.video_clip (the
segment-centre rule, CLIP_SAMPLING); both are cache settings. The processor turns the clip (F, H, W, 3) uint8
into pixels (F, C, H', W'); clips have a fixed frame count, so a batch needs no padding and masks are all True.

- VideoMAE, V-JEPA 2: the tokens are tubelets (tubelet_size frames x patch x patch) and there is no class
  token, so `mean` (over every tubelet token) is the only pooling. V-JEPA 2 runs its encoder only (no predictor).
  Hidden states end before the final layer norm (VideoMAE's `fc_norm`/`layernorm`, V-JEPA 2's encoder norm).
- X-CLIP: its vision tower is a ViT over each frame, (B*F, 1+P, D), with cross-frame message tokens that the
  model itself drops after each layer. Per layer featx returns (B, 1 + F*(1+P), D): position 0 is the mean over
  frames of each frame's class token (`cls`) and is left out of the mask, so `mean` is over every token of every
  frame (class tokens included, as for CLIP images) and a --seq sequence is the F*(1+P) tokens, frame by frame.
  Not included: the multi-frame integration transformer and prompt generator on top of the tower.
"""
from __future__ import annotations

import torch

from featx.data.video import CLIP_SAMPLING
from featx.encoders.base import Encoder, from_pretrained, model_loader
from featx.errors import FeatxError, first_line

__all__ = ["VideoEncoder", "VideoMAEEncoder", "VJEPA2Encoder", "XCLIPVisionEncoder", "clip_frames"]


def clip_frames(config) -> int:
    """The number of frames a checkpoint's model takes per clip: `frames_per_clip` (V-JEPA 2), else `num_frames`
    of the config or of its vision_config (VideoMAE, X-CLIP). FeatxError when the config names none."""
    for cfg in (config, getattr(config, "vision_config", None)):
        for key in ("frames_per_clip", "num_frames"):
            n = getattr(cfg, key, None)
            if isinstance(n, int) and n > 0:
                return n
    raise FeatxError(f"model type {getattr(config, 'model_type', '?')!r}: its config gives no frame count "
                     "(num_frames or frames_per_clip)")


class _Clip:
    """Picklable preprocessor: a clip (F, H, W, 3) uint8 -> pixels (F, C, H', W') float32 with the processor."""

    def __init__(self, processor, video_processor):
        self.processor, self.video_processor = processor, video_processor

    def __call__(self, frames):
        # A video processor would otherwise sample frames again when its config says so: the clip is final.
        extra = {"do_sample_frames": False} if self.video_processor else {}
        out = self.processor(frames, return_tensors="pt", input_data_format="channels_last", **extra)
        pixels = out["pixel_values_videos" if "pixel_values_videos" in out else "pixel_values"]
        return pixels[0]


class VideoEncoder(Encoder):
    """A native video encoder over clips of `clip_frames` frames; hidden states (B, T, D) of tubelet tokens.

    processors: the transformers Auto classes tried in turn for the checkpoint's processor (the first that
    loads is used and its class stored in the cache). pixel_key: the model's pixel argument."""
    modality = "video"
    processors = ("AutoImageProcessor", "AutoVideoProcessor")
    pixel_key = "pixel_values"

    def __init__(self, name, *, config, device="cpu", trust_remote_code=False, precision="fp32", **_):
        super().__init__(name, config=config, device=device, trust_remote_code=trust_remote_code,
                         precision=precision)
        self.clip_frames = clip_frames(config)
        self.processor = self._load_processor(name, trust_remote_code)
        self._finish_load(from_pretrained(model_loader(self.model_class), name, "weights",
                                          trust_remote_code=trust_remote_code, **self.weights_kwargs()))
        size = getattr(self.processor, "crop_size", None) or getattr(self.processor, "size", None)
        self.attrs = {"num_frames": self.clip_frames, "clip_sampling": CLIP_SAMPLING,
                      "video_processor": type(self.processor).__name__, "image_size": str(dict(size)) if size else ""}

    def _load_processor(self, name, trust_remote_code):
        import transformers

        errors = []
        for loader in self.processors:
            try:
                return from_pretrained(getattr(transformers, loader), name, "video processor",
                                       trust_remote_code=trust_remote_code)
            except FeatxError as e:
                errors.append(first_line(e))
        raise FeatxError(errors[-1])

    def preprocessor(self):
        return _Clip(self.processor, "VideoProcessor" in type(self.processor).__name__)

    def batch_key(self, feats):
        # A processor that resizes without cropping gives each aspect ratio its own size.
        return tuple(feats.shape)

    def collate(self, feats):
        out = self.host_tensor((len(feats), *feats[0].shape), feats[0].dtype)
        return {self.pixel_key: torch.stack(list(feats), out=out)}

    def hidden_states(self, pixels):
        """L tensors (B, T, D) of the model on pixels (B, F, C, H, W)."""
        return self.model(**{self.pixel_key: pixels}, output_hidden_states=True).hidden_states

    def forward(self, inputs):
        hs = self.hidden_states(self.to_device(inputs[self.pixel_key]))
        return hs, torch.ones(hs[0].shape[:2], dtype=torch.bool, device=hs[0].device)


class VideoMAEEncoder(VideoEncoder):
    """VideoMAE (tubelet tokens, no class token), with its VideoMAEImageProcessor."""


class VJEPA2Encoder(VideoEncoder):
    """V-JEPA 2's encoder (tubelet tokens with 3-D RoPE, no class token); its predictor is not run."""
    processors = ("AutoVideoProcessor",)
    pixel_key = "pixel_values_videos"

    def hidden_states(self, pixels):
        return self.model(pixel_values_videos=pixels, skip_predictor=True, output_hidden_states=True).hidden_states


class _XCLIPVisionTower:
    """Loads the vision tower of a full X-CLIP checkpoint (XCLIPVisionModel.from_pretrained would not find
    its weights under the checkpoint's `vision_model.` prefix and leave them random)."""

    @staticmethod
    def from_pretrained(name, **kwargs):
        from transformers import AutoConfig, XCLIPModel, XCLIPVisionModel

        config = kwargs.pop("config", None) or AutoConfig.from_pretrained(
            name, trust_remote_code=kwargs.get("trust_remote_code", False))
        if config.model_type == "xclip_vision_model":  # a vision tower saved alone (a fine-tuned encoder)
            return XCLIPVisionModel.from_pretrained(name, config=config, **kwargs)
        if not kwargs.get("output_loading_info"):
            return XCLIPModel.from_pretrained(name, config=config, **kwargs).vision_model
        model, info = XCLIPModel.from_pretrained(name, config=config, **kwargs)
        tower = "vision_model."  # only the tower's own weights matter (the text tower is not run)
        return model.vision_model, {**info, "missing_keys": {k[len(tower):] for k in info.get("missing_keys", ())
                                                             if k.startswith(tower)}}


class XCLIPVisionEncoder(VideoEncoder):
    """X-CLIP's vision tower: a ViT per frame with cross-frame message tokens (see the module docstring)."""
    model_class = _XCLIPVisionTower

    def forward(self, inputs):
        pixels = self.to_device(inputs["pixel_values"])
        b, f = pixels.shape[:2]
        # The message tokens join the frames of each clip: its F frames must be consecutive rows, as here.
        hs = self.model(pixel_values=pixels.flatten(0, 1), output_hidden_states=True).hidden_states
        hs = [h.view(b, f, *h.shape[1:]) for h in hs]  # (B, F, 1+P, D)
        out = [torch.cat([h[:, :, 0].mean(1, keepdim=True), h.flatten(1, 2)], dim=1) for h in hs]
        mask = torch.ones(out[0].shape[:2], dtype=torch.bool, device=out[0].device)
        mask[:, 0] = False  # the class-token summary: read by `cls`, not part of `mean` or a sequence
        return out, mask
