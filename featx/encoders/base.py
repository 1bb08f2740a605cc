"""The interface every encoder adapter implements, and model loading shared by them."""
from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

from featx.device import autocast, weights_dtype
from featx.errors import FeatxError, first_line


@contextlib.contextmanager
def quiet_libraries():
    """transformers' and huggingface_hub's progress bars and log messages below errors, and Python warnings, off
    while the block runs (loading, saving: messages a featx user cannot act on); their state is restored after."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    bars, hub_bars_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # a CLIP vision tower loaded from a full CLIP checkpoint lists every text weight
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if not hub_bars_off:
            hub_utils.enable_progress_bars()


def from_pretrained(loader, name, what, **kwargs):
    """`loader.from_pretrained(name)` under quiet_libraries(), and a one-line FeatxError on failure.

    what "weights": a model's weights, which must all be in the checkpoint: transformers initialises the ones it
    lacks at random (and only logs them), so such a load is refused in one line (complete_weights). The model
    is returned alone, or with transformers' loading info when the call asks for output_loading_info."""
    weights = what == "weights"
    wants_info = kwargs.get("output_loading_info", False)
    if weights:
        kwargs["output_loading_info"] = True
    with quiet_libraries():
        try:
            loaded = loader.from_pretrained(name, **kwargs)
        except Exception as e:
            raise FeatxError(f"cannot load the {what} of model {name!r}: {first_line(e)[:200]}")
    if not weights:
        return loaded
    model, info = loaded
    complete_weights(name, model, info.get("missing_keys", ()))
    return (model, info) if wants_info else model


# Weights that never reach the hidden states featx reads: a base checkpoint saved from a task model (e.g. RoBERTa's
# from RobertaForMaskedLM) has none for its pooler, and transformers leaves it random; the embedding that replaces
# masked inputs in pre-training (wav2vec2-family masked_spec_embed, ViT-family mask_token) is used only when a
# mask is given, which featx never gives.
UNUSED_MODULES = ("pooler", "masked_spec_embed", "mask_token")


def saved_with(name, files) -> bool:
    """Whether checkpoint `name` (folder or hub id) holds one of `files` (e.g. a tokenizer's or an image
    processor's config): looked up in the folder, or in the hub cache / on the hub for an id; no weights are
    read. False where the hub cannot be reached and nothing is cached."""
    import os

    if os.path.isdir(str(name)):
        return any(os.path.isfile(os.path.join(str(name), f)) for f in files)
    from transformers.utils import cached_file

    for f in files:
        try:
            if cached_file(str(name), f, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False) is not None:
                return True
        except Exception:  # an unreachable hub or a gated repo: nothing featx can load
            continue
    return False


def complete_weights(name, model, missing) -> None:
    """One-line FeatxError naming checkpoint `name` and a few of the weights it lacks (`missing`: transformers'
    missing_keys, without the ones its model class expects to be missing), other than UNUSED_MODULES'."""
    missing = sorted(k for k in missing if not set(k.split(".")) & set(UNUSED_MODULES))
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FeatxError(f"model {name!r} lacks {len(missing)} weights of its {type(model).__name__} ({shown}): "
                         "transformers would initialise them at random; give a complete checkpoint")


def model_loader(model_class):
    """The class that loads an adapter's weights: `model_class` itself, or the transformers class of that name
    (e.g. "AutoModel", "CLIPVisionModel")."""
    if not isinstance(model_class, str):
        return model_class
    import transformers

    return getattr(transformers, model_class)


def preprocess_many(preprocess, inputs) -> list:
    """[preprocess(x) for x in inputs] (an Encoder.preprocessor()), in one call of its `many` when it has one."""
    many = getattr(preprocess, "many", None)
    return many(inputs) if many is not None else [preprocess(x) for x in inputs]


class Encoder:
    """One model family behind one interface.

    Attributes: name, modality ('text' | 'image' | 'audio' | 'video'), model, num_layers (L, with index 0 the
    embedding output), hidden_size (D: the widest layer's width), layer_widths (None when every layer is D
    wide, else each layer's width: pooled values are zero-padded to D and the cache records the widths),
    attrs (the settings that change the numbers, stored in the cache).
    """

    modality = ""
    layer_widths = None
    sequences = True  # False: no per-position sequence (--seq is refused before any work), e.g. CNN stages
    # True: collate copies decoded inputs lying in pinned memory straight to the device (images), so on CUDA the
    # DataLoader's pin thread pins the workers' chunks; False: collate copies them into a batch on the host anyway
    # (padding texts and audio), and pinning each chunk first would only copy it once more
    pinned_inputs = False
    model_class = "AutoModel"  # what loads the weights: a transformers class name or a class with from_pretrained

    def __init__(self, name, *, config, device="cpu", trust_remote_code=False, precision="fp32"):
        self.name = str(name)
        self.precision = precision  # resolved: fp32 | bf16 | fp16 (featx.device.resolve_precision)
        self.config = config
        self.device = torch.device(device)
        self.trust_remote_code = trust_remote_code
        self.model = None
        self.attrs = {}
        # lines a user can act on (e.g. a package that makes this encoder faster); a featx.errors.OptionAdvice
        # for one that names an option of featx extract
        self.advice = []

    def weights_kwargs(self) -> dict:
        """from_pretrained's keyword arguments for the precision's weights: dtype=torch.bfloat16 for bf16-weights
        (transformers then keeps the modules a model declares fp32-only in fp32), else none (as saved)."""
        dtype = weights_dtype(self.precision)
        return {} if dtype is None else {"dtype": dtype}

    def to_device(self, tensor):
        """A batch tensor on the model's device, copied asynchronously from pinned memory; floating-point inputs
        (pixels, samples, spectrograms) in the weights' dtype under bf16-weights (masks and ids as they are)."""
        dtype = weights_dtype(self.precision) if tensor.is_floating_point() else None
        return tensor.to(self.device, dtype=dtype, non_blocking=True)

    def _finish_load(self, model):
        self.model = model.eval().to(self.device)
        cfg = getattr(model.config, "vision_config", model.config) if self.modality == "image" else model.config
        self.num_layers = int(cfg.num_hidden_layers) + 1
        self.hidden_size = int(cfg.hidden_size)

    # --- what the pipeline calls -------------------------------------------------------------
    def preprocessor(self):
        """A picklable callable (no model inside, so it runs in DataLoader workers) that turns one decoded
        input (text, PIL image, waveform) into model inputs with the checkpoint's own processor. It may also
        have a method `many(inputs) -> [model inputs]` that does a list of them at once (a fast tokenizer's
        batch call): the pipeline then calls that once per chunk of items."""
        raise NotImplementedError

    def size(self, feats) -> int:
        """A cost of one preprocessed input, for sorting by length (tokens, samples; 1 for images)."""
        return 1

    def batch_key(self, feats):
        """Inputs batch together only when their keys are equal (None: anything goes)."""
        return None

    def frames_of(self, sizes) -> np.ndarray:
        """Audio encoders: (n,) int64 encoder positions (num_frames) of inputs of `sizes` samples."""
        return np.array([self.num_frames(s) for s in sizes], np.int64)

    def admit(self, inputs, batch_size):
        """Per group, in the main process, before batching: [(item index, input)] -> (inputs, failures [(item
        index, one-line reason)]). Image encoders decode JPEGs on the device here; the inputs as they are."""
        return inputs, []

    def collate(self, feats) -> dict:
        """Tensors for a batch of preprocessed inputs (padding as the processor pads): CPU tensors made with
        host_tensor, or device tensors where the encoder preprocesses whole batches on its device."""
        raise NotImplementedError

    def host_tensor(self, shape, dtype, fill=None):
        """A CPU tensor for a batch (filled with `fill` unless None). For a CUDA model it is pinned memory from
        torch's caching host allocator: the batch is copied once, into memory that is reused (no fresh pages
        to fault in per batch, and a block is not reused before its copy to the device has finished), instead
        of being stacked into fresh memory and then copied again by pin_memory()."""
        pin = self.device.type == "cuda"
        if fill is None:
            return torch.empty(shape, dtype=dtype, pin_memory=pin)
        return torch.full(shape, fill, dtype=dtype, pin_memory=pin)

    def prepare(self, raws) -> dict:
        """collate's tensors for a batch of decoded inputs: preprocess them (together when the preprocessor
        has `many`), then collate."""
        return self.collate(preprocess_many(self.preprocessor(), raws))

    def forward(self, inputs):
        """(hidden_states, mask): L tensors (B, T, D) and a (B, T) bool mask of valid positions."""
        raise NotImplementedError

    def autocast(self):
        """The forward's autocast for the encoder's resolved precision (none for fp32)."""
        return autocast(self.device, self.precision)
