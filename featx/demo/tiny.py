"""Tiny, randomly initialised encoders built from transformers configs, saved with their processors.

Used by the tests and by `featx demo`: no weights can be downloaded where those run, so the models are
built on the spot and loaded back through the same `from_pretrained` path a user's checkpoint takes.
"""
from __future__ import annotations

import os
import string

from featx.encoders.base import quiet_libraries


def _vocab() -> dict:
    # A small WordPiece vocabulary: special tokens, ASCII characters and their ## continuations, some words.
    words = ("the a an is was and or not very good bad great awful happy sad movie film it i you this that "
             "love hate like boring fun funny terrible wonderful ok okay fine").split()
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + words
    return {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}


def save_checkpoint(path: str, model, *processors) -> str:
    """Save `model` (in eval mode) and its tokenizer / processors to folder `path`, quietly; returns `path`."""
    os.makedirs(path, exist_ok=True)
    with quiet_libraries():  # no 'Writing model shards' bar
        model.eval().save_pretrained(path)
        for p in processors:
            p.save_pretrained(path)
    return path


def build_tiny_bert(path: str, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> str:
    """Save a random BertModel (hidden_size, num_layers) and its WordPiece tokenizer to `path`."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    tok = BertTokenizerFast(vocab=_vocab(), do_lower_case=True, model_max_length=128)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=num_layers,
                     num_attention_heads=4, intermediate_size=hidden_size * 2, max_position_embeddings=128)
    with quiet_libraries():  # no 'Writing model shards' bar
        BertModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_clip(path: str, hidden_size: int = 32, num_layers: int = 2, image_size: int = 32,
                    patch_size: int = 8, vision_only: bool = False, seed: int = 0) -> str:
    """Save a random CLIP checkpoint (full CLIPModel, or CLIPVisionModel alone) and its image processor."""
    import torch
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig,
                              CLIPVisionModel)

    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    vcfg = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                            num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=16)
    if vision_only:
        model = CLIPVisionModel(vcfg)
    else:
        tcfg = CLIPTextConfig(vocab_size=100, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                              num_hidden_layers=num_layers, num_attention_heads=4, max_position_embeddings=32,
                              bos_token_id=0, eos_token_id=2, pad_token_id=1,
                              projection_dim=16)
        model = CLIPModel(CLIPConfig(text_config=tcfg.to_dict(), vision_config=vcfg.to_dict(), projection_dim=16))
    with quiet_libraries():
        model.eval().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(path)
    return path


def build_tiny_wavlm(path: str, hidden_size: int = 32, num_layers: int = 2, norm: str = "layer",
                     seed: int = 0) -> str:
    """Save a random WavLMModel and its feature extractor.

    norm="layer" is WavLM-Large's layout (layer-norm conv features, attention mask, stable layer norm);
    norm="group" is WavLM-Base's (group-norm conv features, no attention mask): padding changes its outputs.
    """
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    large = norm == "layer"
    cfg = WavLMConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
                      intermediate_size=hidden_size * 2, conv_dim=(32, 32, 32), conv_stride=(5, 4, 4),
                      conv_kernel=(10, 4, 4), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                      feat_extract_norm=norm, do_stable_layer_norm=large, num_buckets=32, max_bucket_distance=80)
    with quiet_libraries():
        WavLMModel(cfg).eval().save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=large,
                             return_attention_mask=large).save_pretrained(path)
    return path
