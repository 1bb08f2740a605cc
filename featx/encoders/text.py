"""Text encoders that AutoModel loads (BERT, RoBERTa, MiniLM, ...), with the checkpoint's tokenizer."""
from __future__ import annotations

import numpy as np
import torch

from featx.encoders.base import Encoder, from_pretrained, model_loader


class _Tokenize:
    def __init__(self, tokenizer, max_length):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, text):
        # int64 arrays: they cross from DataLoader workers as bytes, and collate fills a batch from them fast
        return {k: np.asarray(v, dtype=np.int64)
                for k, v in self.tokenizer(text, truncation=True, max_length=self.max_length).items()}


class TextEncoder(Encoder):
    modality = "text"

    def __init__(self, name, *, config, device="cpu", trust_remote_code=False, max_length=None, precision="fp32", **_):
        super().__init__(name, config=config, device=device, trust_remote_code=trust_remote_code,
                         precision=precision)
        from transformers import AutoTokenizer

        self.tokenizer = from_pretrained(AutoTokenizer, name, "tokenizer", trust_remote_code=trust_remote_code)
        self._finish_load(from_pretrained(model_loader(self.model_class), name, "weights", config=config,
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
        """What `tokenizer.pad(feats, padding=True, return_tensors="pt")` returns (tested against it), filled with
        numpy: tokenizer.pad walks every token in Python (~0.3 ms per 128-token input, which caps a GPU run)."""
        tok = self.tokenizer
        pads = {"input_ids": tok.pad_token_id, "token_type_ids": tok.pad_token_type_id, "attention_mask": 0}
        if tok.pad_token_id is None or any(k not in pads for k in feats[0]):
            return dict(tok.pad([{k: v.tolist() for k, v in f.items()} for f in feats], padding=True,
                                return_tensors="pt"))
        n, left = max(len(f["input_ids"]) for f in feats), tok.padding_side == "left"
        out = {}
        for k in feats[0]:
            out[k] = self.host_tensor((len(feats), n), torch.int64, pads[k])
            a = out[k].numpy()
            for b, f in enumerate(feats):
                v = f[k]
                if left:
                    a[b, n - len(v):] = v
                else:
                    a[b, :len(v)] = v
        return out

    def forward(self, inputs):
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        out = self.model(**inputs, output_hidden_states=True)
        return out.hidden_states, inputs["attention_mask"].bool()
