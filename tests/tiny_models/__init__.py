"""Tiny randomly initialised checkpoints of every encoder family featx supports, saved with their processors.

BUILDERS maps a family name (featx.encoders.registry.Family.name) to `build(path) -> path`, which saves a
tiny model (hidden size ~32, 2 layers) and its processor to `path`. Each modality's builders live in a module of
their own (text, image, audio, video); tests that run every family (finetune, `featx models`) iterate here.
"""
import importlib

BUILDERS: dict = {}

for _name in ("text", "image", "audio", "video"):
    try:
        _module = importlib.import_module(f"tiny_models.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"tiny_models.{_name}":
            raise
        continue
    BUILDERS.update(_module.BUILDERS)
