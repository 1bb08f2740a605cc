"""Image encoders: ViTs AutoModel loads, and the vision tower of a CLIP or SigLIP checkpoint (full or vision-only)."""
from __future__ import annotations

import torch

from featx.encoders.base import Encoder, from_pretrained, model_loader


class _Pixels:
    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class ImageEncoder(Encoder):
    modality = "image"

    def __init__(self, name, *, config, device="cpu", trust_remote_code=False, precision="fp32", **_):
        super().__init__(name, config=config, device=device, trust_remote_code=trust_remote_code,
                         precision=precision)
        from transformers import AutoImageProcessor
        from transformers.utils import is_torchvision_available

        self.processor = from_pretrained(AutoImageProcessor, name, "image processor",
                                         trust_remote_code=trust_remote_code)
        self._finish_load(from_pretrained(model_loader(self.model_class), name, "weights",
                                          trust_remote_code=trust_remote_code))
        size = getattr(self.processor, "crop_size", None) or getattr(self.processor, "size", None)
        # transformers 5 resizes with torchvision when it is installed (featx[vision]; about half the CPU time
        # per image) and with PIL otherwise; the two round differently, so the class is a setting of the cache.
        self.attrs = {"image_size": str(dict(size)) if size else "", "image_processor": type(self.processor).__name__}
        if type(self.processor).__name__.endswith("Pil") and not is_torchvision_available():
            self.advice.append("torchvision is not installed, so images are resized with PIL; install featx[vision] "
                               "(torchvision) for about 2x faster image preprocessing")

    def preprocessor(self):
        return _Pixels(self.processor)

    def shortest_side(self) -> int:
        """The largest side, in pixels, the processor resizes or crops to (0 when it does not say): an image
        whose shortest side is at least twice this is still downscaled by the processor."""
        sides = []
        for size in (getattr(self.processor, "size", None), getattr(self.processor, "crop_size", None)):
            size = dict(size) if size else {}
            sides += [int(v) for k, v in size.items() if k in ("shortest_edge", "height", "width") and v]
        return max(sides, default=0)

    def collate(self, feats):
        out = self.host_tensor((len(feats), *feats[0].shape), feats[0].dtype)
        return {"pixel_values": torch.stack(list(feats), out=out)}

    def forward(self, inputs):
        pixels = inputs["pixel_values"].to(self.device, non_blocking=True)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        hs = out.hidden_states
        return hs, torch.ones(hs[0].shape[:2], dtype=torch.bool, device=hs[0].device)


class CLIPVisionEncoder(ImageEncoder):
    """The vision tower of a CLIP checkpoint (full or vision-only); hidden states end before post_layernorm."""
    model_class = "CLIPVisionModel"


class SiglipVisionEncoder(ImageEncoder):
    """The vision tower of a SigLIP checkpoint (full or vision-only)."""
    model_class = "SiglipVisionModel"
