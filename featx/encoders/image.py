"""Image encoders: ViTs AutoModel loads, and the vision tower of a CLIP or SigLIP checkpoint (full or vision-only).

Two ways to pixel values (a cache setting, `image_preprocess`): "batched-torch", where DataLoader workers only
decode images to uint8 and the checkpoint's own torchvision processor resizes, crops and normalises each whole
batch on the model's device; and "processor", the same processor called per image in the workers.
On the CPU the two give equal pixel values (to float rounding). On CUDA, torchvision resizes uint8 images in
float and rounds back, where the CPU kernel works in integers: a pixel may differ by one uint8 level (1/255
before normalisation; at most 1.5e-2 after CLIP's, measured on an H200 over JPEGs of 333x500 to 1280x720).

Where JPEGs are decoded (`image_decode`, a cache setting too; batched-torch only): "workers", with Pillow in the
DataLoader workers; or "device": the workers hand over the file's bytes and the model's device decodes each group's
JPEGs in batches (`torchvision.io.decode_jpeg`: nvJPEG on CUDA, its libjpeg-turbo in the main process on the CPU),
and Pillow in the workers decodes the rest (PNG, progressive or CMYK JPEGs, see featx.data.media.gpu_jpeg).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from featx.encoders.base import Encoder, from_pretrained, model_loader, saved_with
from featx.errors import OptionAdvice, first_line
from featx.settings import IMAGE_DECODES, IMAGE_PREPROCESS, one_of

_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # where an image processor is saved


def _decode_batches(inputs, batch_size):
    """[(item, input)] in runs of at most batch_size inputs and about DECODE_BYTES of JPEG bytes (one at least)."""
    part, size = [], 0
    for item in inputs:
        n = item[1].nbytes if _encoded(item[1]) else 0
        if part and (len(part) == batch_size or size + n > DECODE_BYTES):
            yield part
            part, size = [], 0
        part.append(item)
        size += n
    if part:
        yield part


def _pil_rgb(data) -> np.ndarray:
    """(H, W, 3) uint8 of a JPEG file's bytes (a uint8 tensor), decoded with Pillow: for one the device refuses."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
        return rgb_array(im.convert("RGB"))


class _Pixels:
    """One image -> (3, S, S) float pixel values with the checkpoint's processor (the "processor" path)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


JPEG_DECODERS = {"workers": "pil", "cpu": "torchvision", "cuda": "nvjpeg"}  # the cache's image_decode attribute
# JPEG bytes decoded on the device in one call at most (with batch_size images at most): decoded, about ten times
# as much, so that a batch of large photos (12 Mpx: 4 MB each, 36 MB decoded) does not fill the GPU at once
DECODE_BYTES = 64 << 20


def rgb_array(image) -> np.ndarray:
    """(H, W, 3) uint8 of an RGB PIL image or array: what workers hand over on the "batched-torch" path."""
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {a.shape} and dtype {a.dtype}")
    return a


def rgb_array_or_jpeg(image) -> np.ndarray:
    """rgb_array, with a JPEG file's bytes ((N,) uint8, for the device to decode) handed over as they are."""
    if isinstance(image, np.ndarray) and image.ndim == 1 and image.dtype == np.uint8:
        return image
    return rgb_array(image)


def _encoded(x) -> bool:
    """Whether an input is a JPEG file's bytes ((N,) uint8) rather than decoded pixels."""
    return x.ndim == 1


def _pinned(image) -> bool:
    """Whether an image (array or tensor) lies in pinned host memory (a view into a pinned chunk)."""
    if isinstance(image, np.ndarray):
        return image.flags.writeable and torch.from_numpy(image).is_pinned()  # read-only arrays are PIL's own
    return isinstance(image, torch.Tensor) and image.is_pinned()


def torchvision_processor(processor) -> bool:
    """Whether `processor` is a transformers image processor with the torchvision backend (batched uint8
    tensors in, on any device)."""
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:  # transformers < 5
        return False
    return isinstance(processor, TorchvisionBackend)


class ImageEncoder(Encoder):
    modality = "image"
    pinned_inputs = True  # pixels_of copies pinned images to the device one by one (see Encoder)

    @classmethod
    def unavailable(cls, name) -> str:
        """Why this encoder cannot run for checkpoint `name` ('' when it can): a checkpoint saved without an
        image processor (e.g. a SigLIP saved with its tokenizer only) has no image tower featx can feed."""
        return "" if saved_with(name, _PROCESSOR_FILES) else \
            "no image processor saved with the checkpoint: its image tower cannot run"

    def __init__(self, name, *, config, device="cpu", trust_remote_code=False, precision="fp32",
                 image_preprocess="batched-torch", image_decode="workers", **_):
        super().__init__(name, config=config, device=device, trust_remote_code=trust_remote_code,
                         precision=precision)
        from transformers import AutoImageProcessor
        from transformers.utils import is_torchvision_available

        self.processor = from_pretrained(AutoImageProcessor, name, "image processor",
                                         trust_remote_code=trust_remote_code)
        self._copy_stream = None  # CUDA: the stream pinned images cross to the device on (_copied)
        self._decode_stream = None  # CUDA: the current stream while the device decodes JPEGs (_decode_jpegs)
        self._finish_load(from_pretrained(model_loader(self.model_class), name, "weights",
                                          trust_remote_code=trust_remote_code, **self.weights_kwargs()))
        self.image_preprocess = self._preprocess_path(image_preprocess, self.processor)
        size = getattr(self.processor, "crop_size", None) or getattr(self.processor, "size", None)
        # transformers 5 resizes with torchvision when it is installed (featx[vision]; about half the CPU time
        # per image) and with PIL otherwise; the two round differently, so the class is a setting of the cache.
        self.decode_on_device = self.decode_path(image_decode, self.image_preprocess) == "device"
        self.attrs = {"image_size": str(dict(size)) if size else "", "image_processor": type(self.processor).__name__,
                      "image_preprocess": self.image_preprocess,
                      "image_decode": self.jpeg_decoder(self.decode_on_device, self.device.type)}
        if type(self.processor).__name__.endswith("Pil") and not is_torchvision_available():
            self.advice.append("torchvision is not installed, so images are resized with PIL; install featx[vision] "
                               "(torchvision) for about 2x faster image preprocessing")
        elif image_preprocess != self.image_preprocess and not self._own_inputs():
            self.advice.append(f"{type(self.processor).__name__} has no torchvision backend, so images are "
                               "preprocessed one by one with it (image_preprocess processor)")
        if image_decode == "device" and not self.decode_on_device:
            self.advice.append("JPEGs are decoded in the workers: decoding on the device needs the batched-torch "
                               "image preprocessing")
        elif self.decode_on_device and self.device.type == "cpu":
            self.advice.append(OptionAdvice("--image-decode device on the CPU decodes JPEGs in the main process, one "
                                            "by one; it is meant for CUDA (nvJPEG): --image-decode workers decodes "
                                            "faster on a CPU"))

    @classmethod
    def _own_inputs(cls) -> bool:
        """Whether a subclass makes its own per-image inputs (its own preprocessor or collate)."""
        return cls.preprocessor is not ImageEncoder.preprocessor or cls.collate is not ImageEncoder.collate

    @classmethod
    def _preprocess_path(cls, wanted, processor) -> str:
        """The image_preprocess path this class runs with `processor` when `wanted` is asked for: batched-torch
        needs a torchvision processor, and a subclass that makes its own per-image inputs keeps them
        (processor)."""
        wanted = one_of("image preprocessing", *IMAGE_PREPROCESS)(wanted)  # the settings' own check
        if wanted == "processor" or cls._own_inputs() or not torchvision_processor(processor):
            return "processor"
        return "batched-torch"

    @staticmethod
    def decode_path(wanted, preprocess_path) -> str:
        """Where JPEGs are decoded when `wanted` (featx.settings.IMAGE_DECODES) is asked for: on the device only
        on the batched-torch path (the processor path makes pixels in the workers)."""
        wanted = one_of("image decoding", *IMAGE_DECODES)(wanted)
        return "device" if wanted == "device" and preprocess_path == "batched-torch" else "workers"

    @staticmethod
    def jpeg_decoder(on_device, device_type) -> str:
        """The cache's image_decode attribute: which decoder made the pixels of JPEGs (JPEG_DECODERS)."""
        return JPEG_DECODERS[device_type if on_device else "workers"]

    @classmethod
    def preprocess_path(cls, name, wanted, trust_remote_code=False) -> str:
        """The image_preprocess path (the cache attribute) an encoder of this class runs for checkpoint `name`
        when `wanted` is asked for, known from the class and the checkpoint's image processor alone (no
        weights read): how `featx extract` tells a complete cache without loading the model."""
        wanted = one_of("image preprocessing", *IMAGE_PREPROCESS)(wanted)
        if wanted == "processor" or cls._own_inputs():
            return "processor"
        from transformers import AutoImageProcessor

        return cls._preprocess_path(wanted, from_pretrained(AutoImageProcessor, name, "image processor",
                                                            trust_remote_code=trust_remote_code))

    def preprocessor(self):
        """Per image, in the workers: uint8 (H, W, 3) on the batched-torch path (or a JPEG file's bytes, when the
        device decodes them), pixel values (3, S, S) on the processor path."""
        if self.image_preprocess != "batched-torch":
            return _Pixels(self.processor)
        return rgb_array_or_jpeg if self.decode_on_device else rgb_array

    def admit(self, inputs, batch_size):
        """Per group, in the main process, before batching: when the device decodes JPEGs, every input becomes its
        (3, S, S) pixel values on the device, made batch_size images (and DECODE_BYTES of JPEG) at a time, so that
        at most that many decoded images are held, and an image no decoder takes fails as an item. (inputs,
        failures [(item, reason)]); the inputs as they are otherwise."""
        if not self.decode_on_device or not any(_encoded(x) for _, x in inputs):
            return inputs, []
        out, failures = [], []
        for part in _decode_batches(inputs, max(1, batch_size)):
            images, bad = self._decoded([x for _, x in part])
            failures += [(part[k][0], reason) for k, reason in bad.items()]
            kept = [k for k in range(len(part)) if k not in bad]
            if kept:
                pixels = self.pixels_of([images[k] for k in kept])
                out += [(part[k][0], pixels[j]) for j, k in enumerate(kept)]
        return out, failures

    def _decoded(self, images):
        """The JPEG bytes among `images` decoded on the device ((3, H, W) uint8), in one batched call; when it
        fails, one by one, and an image the device cannot decode is decoded with Pillow. (images, {position:
        reason}) for those neither decodes."""
        at = [k for k, x in enumerate(images) if _encoded(x)]
        out, bad = list(images), {}
        if not at:
            return out, bad
        data = [torch.as_tensor(images[k]) for k in at]
        try:
            decoded = self._decode_jpegs(data)
        except RuntimeError:
            decoded = []
            for k, one in zip(at, data):
                try:
                    decoded += self._decode_jpegs([one])
                except RuntimeError:
                    try:
                        decoded.append(_pil_rgb(one))
                    except Exception as e:  # noqa: BLE001 - any decoder error fails the item alone
                        decoded.append(None)
                        bad[k] = f"cannot decode the JPEG: {first_line(e)}"
        for k, image in zip(at, decoded):
            out[k] = image
        return out, bad

    def _decode_jpegs(self, data):
        """[(3, H, W) uint8 on the device] of JPEG files' bytes (CPU uint8 tensors), decoded in one call.

        On CUDA, torchvision's decoder writes on a stream of its own into memory allocated on the current stream,
        and makes the current stream wait for it, but does not wait for the current stream first: memory freed
        there by work still queued (the group before, on the model's stream) could be written while that work
        reads it. So the call runs with a decoding stream of featx's own as the current one, the model's stream
        waits for it, and each image is marked as used on the model's stream (its memory is not reused before
        that stream is done with it)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.device.type != "cuda":
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        with self._beside("_decode_stream") as compute:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        for image in decoded:
            image.record_stream(compute)
        return decoded

    @contextlib.contextmanager
    def _beside(self, name):
        """CUDA work queued inside runs on a stream of this encoder's own, attribute `name` (one per kind of work,
        made once per device), as the current stream; the model's stream waits for it after. Yields the model's
        stream, for record_stream of what the work made. (A current stream's device has its index; self.device
        may be plain "cuda", which no stream's device equals.)"""
        compute = torch.cuda.current_stream(self.device)
        stream = getattr(self, name)
        if stream is None or stream.device != compute.device:
            stream = torch.cuda.Stream(compute.device)
            setattr(self, name, stream)
        with torch.cuda.stream(stream):
            yield compute
        compute.wait_stream(stream)

    def shortest_side(self) -> int:
        """The largest side, in pixels, the processor resizes or crops to (0 when it does not say): an image
        whose shortest side is at least twice this is still downscaled by the processor."""
        sides = []
        for size in (getattr(self.processor, "size", None), getattr(self.processor, "crop_size", None)):
            size = dict(size) if size else {}
            sides += [int(v) for k, v in size.items() if k in ("shortest_edge", "height", "width") and v]
        return max(sides, default=0)

    def collate(self, feats):
        """{"pixel_values": (B, 3, S, S)}: stacked on the host (processor path), or, on the batched-torch path,
        the checkpoint's processor run over the whole batch of uint8 images on the model's device (stacked there
        when `admit` already made them)."""
        if self.decode_on_device and all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in feats):
            return {"pixel_values": torch.stack(list(feats))}
        if self.image_preprocess == "batched-torch":
            return {"pixel_values": self.pixels_of(feats)}
        out = self.host_tensor((len(feats), *feats[0].shape), feats[0].dtype)
        return {"pixel_values": torch.stack(list(feats), out=out)}

    def pixels_of(self, images) -> torch.Tensor:
        """(B, 3, S, S) float32 pixel values on the model's device for B uint8 (H_b, W_b, 3) host arrays (or
        (3, H_b, W_b) tensors already on the device): images of one size are stacked on the host (pinned on CUDA),
        copied in one transfer and made channels-first there; then the checkpoint's own torchvision processor
        resizes, crops and normalises them in batches. Images already in pinned memory (the DataLoader's pin
        thread put them there) are copied to the device one by one, asynchronously, without the stack on the
        host."""
        groups = {}
        chw = [None] * len(images)
        for b, a in enumerate(images):
            if isinstance(a, torch.Tensor):  # (3, H, W), decoded by `admit` on the device
                chw[b] = a
            else:
                groups.setdefault(tuple(a.shape), []).append(b)
        for shape, members in groups.items():
            if self.device.type == "cuda" and all(_pinned(images[b]) for b in members):
                batch = self._copied((len(members), *shape), [images[b] for b in members])
            else:
                host = self.host_tensor((len(members), *shape), torch.uint8)
                np.stack([np.asarray(images[b]) for b in members], out=host.numpy())
                batch = host.to(self.device, non_blocking=True)
            batch = batch.permute(0, 3, 1, 2).contiguous()
            for j, b in enumerate(members):
                chw[b] = batch[j]
        out = self.processor(images=chw, return_tensors="pt", device=self.device, input_data_format="channels_first")
        return out["pixel_values"]

    def _copied(self, shape, images) -> torch.Tensor:
        """A (B, H, W, 3) uint8 device tensor of B pinned host images, copied on a stream of its own: the copies
        overlap the forward of the batch before, which the model's stream still runs (on that stream they would
        wait for it). The model's stream waits for them before it uses the tensor."""
        with self._beside("_copy_stream") as compute:
            batch = torch.empty(shape, dtype=torch.uint8, device=self.device)
            for j, image in enumerate(images):
                batch[j].copy_(torch.as_tensor(image), non_blocking=True)
        batch.record_stream(compute)  # its memory is not reused before the model's stream is done with it
        return batch

    def forward(self, inputs):
        pixels = self.to_device(inputs["pixel_values"])
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        hs = out.hidden_states
        return hs, torch.ones(hs[0].shape[:2], dtype=torch.bool, device=hs[0].device)


class CLIPVisionEncoder(ImageEncoder):
    """The vision tower of a CLIP checkpoint (full or vision-only); hidden states end before post_layernorm."""
    model_class = "CLIPVisionModel"


class SiglipVisionEncoder(ImageEncoder):
    """The vision tower of a SigLIP checkpoint (full or vision-only)."""
    model_class = "SiglipVisionModel"
