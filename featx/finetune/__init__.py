"""Joint fine-tuning of one to three encoders with a small fusion head (Toledo & Marcacini, 2022).

model: the cut encoders and heads; data: decoding a manifest into model inputs; loop: one run's training;
checkpoints: per-epoch state; saved: the self-contained model/ folder for `featx predict`; api: `finetune`.
"""
from featx.finetune.api import FinetuneResult, FinetuneSettings, finetune
from featx.finetune.model import EncoderBranch, HeadSettings, JointModel
from featx.finetune.saved import FinetunedModel, load_finetuned

__all__ = ["EncoderBranch", "FinetuneResult", "FinetuneSettings", "FinetunedModel", "HeadSettings", "JointModel",
           "finetune", "load_finetuned"]
