"""Text encoders that AutoModel loads (BERT, RoBERTa, MiniLM, ...), with the checkpoint's tokenizer."""
from __future__ import annotations

from featx.encoders.base import Encoder, from_pretrained


class _Tokenize:
    def __init__(self, tokenizer, max_length):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, text):
        return dict(self.tokenizer(text, truncation=True, max_length=self.max_length))


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

    def preprocessor(self):
        return _Tokenize(self.tokenizer, self.max_length)

    def size(self, feats):
        return len(feats["input_ids"])

    def collate(self, feats):
        return dict(self.tokenizer.pad(list(feats), padding=True, return_tensors="pt"))

    def forward(self, inputs):
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        out = self.model(**inputs, output_hidden_states=True)
        return out.hidden_states, inputs["attention_mask"].bool()
