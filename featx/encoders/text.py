"""Text encoders that AutoModel loads (BERT, RoBERTa, MiniLM, ...), with the checkpoint's tokenizer."""
from __future__ import annotations

import torch

from featx.encoders.base import Encoder, from_pretrained


class TextEncoder(Encoder):
    modality = "text"

    def __init__(self, name, *, config, device="cpu", trust_remote_code=False, max_length=None, **_):
        super().__init__(name, config=config, device=device, trust_remote_code=trust_remote_code)
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = from_pretrained(AutoTokenizer, name, "tokenizer", trust_remote_code=trust_remote_code)
        self._finish_load(from_pretrained(AutoModel, name, "weights", config=config,
                                          trust_remote_code=trust_remote_code))
        limit = min(int(self.tokenizer.model_max_length or 512),
                    int(getattr(config, "max_position_embeddings", 512) or 512))
        self.max_length = int(max_length) if max_length else limit
        self.attrs = {"max_length": self.max_length}

    def size(self, raw):
        return len(raw)

    def prepare(self, raws):
        return dict(self.tokenizer(list(raws), padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    def forward(self, inputs):
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        out = self.model(**inputs, output_hidden_states=True)
        return out.hidden_states, inputs["attention_mask"].bool()
