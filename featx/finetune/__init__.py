"""Joint fine-tuning of unimodal encoders with a small fusion head (Toledo & Marcacini, 2022)."""
from featx.finetune.train import FinetunedModel, finetune, load_finetuned

__all__ = ["FinetunedModel", "finetune", "load_finetuned"]
