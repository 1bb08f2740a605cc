"""Text encoders that AutoModel loads (BERT, RoBERTa, MiniLM, ...), with the checkpoint's tokenizer."""
from __future__ import annotations

import itertools
import sys

import numpy as np
import torch

from featx.encoders.base import Encoder, from_pretrained, model_loader
from featx.errors import FeatxError


class _Tokenize:
    """Text -> {input_ids, attention_mask, ...: (T,) int64 arrays} with the checkpoint's tokenizer, truncated to
    max_length: one text (__call__) or a chunk of texts in one batch call of the fast tokenizer (many)."""

    def __init__(self, tokenizer, max_length):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, text):
        # int64 arrays: they cross from DataLoader workers as bytes, and collate fills a batch from them fast
        return {k: np.asarray(v, dtype=np.int64)
                for k, v in self.tokenizer(text, truncation=True, max_length=self.max_length).items()}

    def many(self, texts) -> list:
        """[__call__(t) for t in texts], from one batch call: each key's ids are read into one flat array and
        every text gets views of it (no per-token Python work past the tokenizer's own)."""
        if not len(texts):
            return []
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        lengths = np.fromiter(map(len, enc["input_ids"]), np.int64, len(texts))
        ends = np.cumsum(lengths)
        total = int(ends[-1])
        if any(sum(map(len, v)) != total for v in enc.values()):  # a key not one value per token: item by item
            return [self(t) for t in texts]
        spans = list(zip([0, *ends[:-1].tolist()], ends.tolist()))  # slices: a quarter of np.split's time
        views = {}
        for k, v in enc.items():
            flat = np.fromiter(itertools.chain.from_iterable(v), np.int64, total)
            views[k] = [flat[a:b] for a, b in spans]
        return [dict(zip(views, row)) for row in zip(*views.values())]


def position_table_size(model) -> int | None:
    """The number of token positions `model`'s absolute position table embeds (None: it has none, e.g. rotary or
    relative positions). A table made with a padding_idx p (RoBERTa, XLM-R, CamemBERT, Longformer, MPNet, ...:
    transformers' create_position_ids_from_input_ids) numbers the tokens from p + 1, so p + 1 rows are never a
    token's: RoBERTa's 514 rows embed 512 positions."""
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Embedding) and ("position" in last or last == "wpe"):
            pad = module.padding_idx
            return int(module.num_embeddings) - (0 if pad is None else int(pad) + 1)
    return None


def rotary_positions(model) -> bool:
    """Whether `model` encodes positions with rotary embeddings (Llama, Qwen, ModernBERT, ...: a module of a
    *Rotary* class). Such a model runs on past its config's max_position_embeddings, at positions it was
    never trained on."""
    return any("Rotary" in type(m).__name__ for m in model.modules())


class TextEncoder(Encoder):
    modality = "text"

    def __init__(self, name, *, config, device="cpu", trust_remote_code=False, max_length=None, precision="fp32", **_):
        super().__init__(name, config=config, device=device, trust_remote_code=trust_remote_code,
                         precision=precision)
        from transformers import AutoTokenizer

        self.tokenizer = from_pretrained(AutoTokenizer, name, "tokenizer", trust_remote_code=trust_remote_code)
        self._finish_load(from_pretrained(model_loader(self.model_class), name, "weights", config=config,
                                          trust_remote_code=trust_remote_code, **self.weights_kwargs()))
        table = position_table_size(self.model)
        limit = min(int(self.tokenizer.model_max_length or 512),
                    int(getattr(config, "max_position_embeddings", 512) or 512), table or sys.maxsize)
        if max_length and table and int(max_length) > table:
            raise FeatxError(f"{name}: max_length {int(max_length)} is more than the {table} positions the model "
                             f"embeds; give at most {table}, or leave max_length out (default {limit})")
        trained = int(getattr(config, "max_position_embeddings", 0) or 0)
        if max_length and not table and trained and int(max_length) > trained and rotary_positions(self.model):
            raise FeatxError(f"{name}: max_length {int(max_length)} is more than the {trained} positions the model "
                             "was trained on (max_position_embeddings; its rotary positions would run on past them, "
                             f"untrained); give at most {trained}, or leave max_length out (default {limit})")
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
        lengths = np.fromiter((len(f["input_ids"]) for f in feats), np.int64, len(feats))
        n = int(lengths.max())
        positions = np.arange(n)
        # the valid positions of each row: a (B, n) mask whose True cells, row by row, take the row's values
        valid = positions >= (n - lengths)[:, None] if tok.padding_side == "left" else positions < lengths[:, None]
        out = {}
        for k in feats[0]:
            out[k] = self.host_tensor((len(feats), n), torch.int64, pads[k])
            out[k].numpy()[valid] = np.concatenate([f[k] for f in feats])
        return out

    def forward(self, inputs):
        mask = inputs["attention_mask"]
        # A batch without padding runs without its all-ones mask, which is what the model assumes when it has
        # none: transformers then skips checking the mask on the device (a wait for the GPU every batch, which
        # keeps this thread from queueing the next one). The mask is checked here, on the host copy.
        unpadded = mask.device.type == "cpu" and bool(mask.all())
        inputs = {k: self.to_device(v) for k, v in inputs.items()}
        out = self.model(**{k: v for k, v in inputs.items() if not (unpadded and k == "attention_mask")},
                         output_hidden_states=True)
        return out.hidden_states, inputs["attention_mask"].bool()
