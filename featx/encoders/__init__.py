"""Encoder adapters, one per family, chosen from the checkpoint's config.model_type.

Each adapter has the same small interface (featx.encoders.base.Encoder): `prepare` a batch of decoded
inputs with the checkpoint's own processor, `forward` it, and get all L = num_hidden_layers + 1 hidden
states with a (B, T) validity mask.
"""
from __future__ import annotations

from featx.errors import FeatxError, first_line

IMAGE_TYPES = {"clip", "clip_vision_model", "siglip", "siglip_vision_model", "vit", "dinov2"}
AUDIO_TYPES = {"wavlm", "wav2vec2", "wav2vec2-conformer", "hubert", "data2vec-audio", "unispeech", "unispeech-sat"}


def load_config(name, trust_remote_code=False):
    """The checkpoint's transformers config; FeatxError (one line, naming the model) when it cannot load."""
    import os

    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError, HTTP errors: the user needs the model name and what to do
        if os.path.isdir(str(name)):
            raise FeatxError(f"cannot load model {name!r}: the folder has no usable config.json "
                             f"({first_line(e)[:160]})")
        raise FeatxError(f"cannot load model {name!r}: check the hub id or folder; featx found no local copy and "
                         "the hub is unreachable or offline (download it while online, or pass a local folder)")


def modality_of(config) -> str:
    """'image', 'audio' or 'text' from config.model_type (text for anything AutoModel loads otherwise)."""
    kind = getattr(config, "model_type", "")
    if kind in IMAGE_TYPES:
        return "image"
    if kind in AUDIO_TYPES:
        return "audio"
    return "text"


def load_encoder(name, *, config=None, device="cpu", trust_remote_code=False, **settings):
    """The adapter for checkpoint `name` (hub id or local folder), its model loaded in eval mode on `device`.

    settings: max_length (text), max_audio_seconds (audio).
    """
    config = config or load_config(name, trust_remote_code)
    modality = modality_of(config)
    if modality == "image":
        from featx.encoders.image import ImageEncoder as cls
    elif modality == "audio":
        from featx.encoders.audio import AudioEncoder as cls
    else:
        from featx.encoders.text import TextEncoder as cls
    return cls(name, config=config, device=device, trust_remote_code=trust_remote_code, **settings)
