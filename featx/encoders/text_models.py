"""Text adapters beyond the BERT-style encoders of featx.encoders.text: decoder LMs (GPT-2, Llama, Qwen), the
encoder of an encoder-decoder (T5 and kin), and the text tower of a CLIP or SigLIP checkpoint.

What each one feeds the model (every layer index 0 is the embedding output, L-1 the last block's output):
- DecoderLMEncoder: the tokenizer's tokens with the special tokens it adds by default (GPT-2 and Qwen: none;
  Llama: BOS `<s>`/`<|begin_of_text|>` before the text; recorded in the cache attribute `special_tokens`),
  padded on the right whatever the tokenizer's padding side (a causal model's real tokens then never see
  padding, and position ids 0..n-1 are those of the single unpadded item); the pad id of a tokenizer without
  one (GPT-2) only fills masked positions. Layer L-1 has the model's final norm applied (GPT-2 `ln_f`,
  Llama/Qwen `norm`): transformers reports it so.
- T5EncoderText: T5EncoderModel (the decoder is not loaded); T5's tokenizer appends EOS `</s>`; layer L-1 has
  the encoder's final_layer_norm applied. Mean pooling: T5 has no class token.
- CLIPTextEncoder: CLIPTextModel, tokens as CLIP's tokenizer makes them (BOS ... EOS, causal attention); layer
  L-1 is before final_layer_norm (as CLIP's vision tower in featx); CLIP's own text embedding is taken at EOS,
  which `last` pooling gives.
- SiglipTextEncoder: SigLIP (2)'s processor default: padded to max_length (64) with the tokenizer's attention
  mask fed as the processor returns it; pooling covers the real tokens only.
"""
from __future__ import annotations

import numpy as np
import torch

from featx.encoders.base import saved_with
from featx.encoders.text import TextEncoder

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def has_tokenizer(name) -> bool:
    """Whether checkpoint `name` (folder or hub id) was saved with a tokenizer (saved_with)."""
    return saved_with(name, _TOKENIZER_FILES)


def added_tokens(tokenizer) -> str:
    """The special tokens the tokenizer adds around a text by default, e.g. '<s> + text' or 'text + </s>'."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if start is None:  # the text's own tokens change with the special tokens: show them all
        return "'a b' -> " + " ".join(tokenizer.convert_ids_to_tokens(full))
    before = tokenizer.convert_ids_to_tokens(full[:start])
    after = tokenizer.convert_ids_to_tokens(full[start + len(plain):])
    return " + ".join([*before, "text", *after]) if before or after else "none"


class _Tokens:
    """text -> {"input_ids": (n,) int64} (picklable: runs in DataLoader workers); with `pad_to`, also the
    tokenizer's attention mask for a text padded to `pad_to` tokens."""

    def __init__(self, tokenizer, max_length, pad_to=None):
        self.tokenizer, self.max_length, self.pad_to = tokenizer, max_length, pad_to

    def __call__(self, text):
        if self.pad_to is None:
            ids = self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]
            return {"input_ids": np.asarray(ids, dtype=np.int64)}
        enc = self.tokenizer(text, truncation=True, max_length=self.pad_to, padding="max_length",
                             return_attention_mask=True)
        return {k: np.asarray(enc[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}


class DecoderLMEncoder(TextEncoder):
    """A decoder LM's hidden states (GPT-2, Llama, Qwen2/3): right-padded batches, explicit position ids."""

    def __init__(self, name, **kwargs):
        super().__init__(name, **kwargs)
        tok = self.tokenizer
        # Any id fills padding (masked, and after every real token under causal attention).
        self.pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
        self.attrs = {**self.attrs, "special_tokens": added_tokens(tok), "padding_side": "right"}

    def preprocessor(self):
        return _Tokens(self.tokenizer, self.max_length)

    def size(self, feats):
        return len(feats["input_ids"])

    def collate(self, feats):
        """{"input_ids", "attention_mask", "position_ids"}: (B, T) int64, padded on the right."""
        n = max(len(f["input_ids"]) for f in feats)
        ids = self.host_tensor((len(feats), n), torch.int64, self.pad_id)
        mask = self.host_tensor((len(feats), n), torch.int64, 0)
        for b, f in enumerate(feats):
            ids[b, :len(f["input_ids"])] = torch.from_numpy(f["input_ids"])
            mask[b, :len(f["input_ids"])] = 1
        positions = torch.arange(n, dtype=torch.int64).expand(len(feats), n).contiguous()
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}

    def forward(self, inputs):
        inputs = {k: self.to_device(v) for k, v in inputs.items()}
        out = self.model(**inputs, output_hidden_states=True, use_cache=False)
        return out.hidden_states, inputs["attention_mask"].bool()


class T5EncoderText(TextEncoder):
    """The encoder of a T5-style encoder-decoder checkpoint (T5, mT5, UMT5), loaded without its decoder."""

    _LOADERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}

    def __init__(self, name, *, config, **kwargs):
        self.model_class = self._LOADERS[config.model_type]
        super().__init__(name, config=config, **kwargs)
        self.attrs = {**self.attrs, "special_tokens": added_tokens(self.tokenizer)}


class _TextTower(TextEncoder):
    """The text tower of a two-tower checkpoint (full model or text-only): its text config drives the limits."""

    def __init__(self, name, *, config, **kwargs):
        super().__init__(name, config=getattr(config, "text_config", config), **kwargs)
        self.config = config

    @classmethod
    def unavailable(cls, name) -> str:
        """Why this tower cannot run for checkpoint `name` ('' when it can): a checkpoint saved without a
        tokenizer (e.g. a CLIP saved with its image processor only) has no text tower featx can feed."""
        return "" if has_tokenizer(name) else "no tokenizer saved with the checkpoint: its text tower cannot run"


class CLIPTextEncoder(_TextTower):
    """CLIP's text tower (CLIPTextModel): layer L-1 is before final_layer_norm; `last` = the EOS token."""
    model_class = "CLIPTextModel"

    def __init__(self, name, **kwargs):
        super().__init__(name, **kwargs)
        self.attrs = {**self.attrs, "special_tokens": added_tokens(self.tokenizer)}


class SiglipTextEncoder(_TextTower):
    """SigLIP's text tower: every text padded to max_length (SigLIP's processor default, as it was trained),
    the tokenizer's attention mask fed with it; pooling over the real tokens."""
    model_class = "SiglipTextModel"

    def __init__(self, name, **kwargs):
        super().__init__(name, **kwargs)
        self.attrs = {**self.attrs, "special_tokens": added_tokens(self.tokenizer), "padding": "max_length"}

    def preprocessor(self):
        return _Tokens(self.tokenizer, self.max_length, pad_to=self.max_length)

    def size(self, feats):
        return len(feats["input_ids"])  # max_length for every text: what a batch costs

    def collate(self, feats):
        """{"input_ids", "attention_mask"}: (B, max_length) int64."""
        return {k: torch.stack([torch.from_numpy(f[k]) for f in feats]) for k in ("input_ids", "attention_mask")}


class Siglip2TextEncoder(SiglipTextEncoder):
    model_class = "Siglip2TextModel"
