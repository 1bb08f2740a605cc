"""Encoder adapters, one per family, chosen from the checkpoint's config.model_type through the registry.

Each adapter has the same small interface (featx.encoders.base.Encoder): `prepare` a batch of decoded
inputs with the checkpoint's own processor, `forward` it, and get all L = num_hidden_layers + 1 hidden
states with a (B, T) validity mask.
"""
from featx.encoders.registry import (Family, block_path, families, families_of, family_of, load_config, load_encoder,
                                     modality_of, register_family)

__all__ = ["Family", "block_path", "families", "families_of", "family_of", "load_config", "load_encoder", "modality_of",
           "register_family"]
