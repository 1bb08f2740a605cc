"""Speech encoders of the wav2vec2 family (WavLM, wav2vec2, HuBERT, ...), with the checkpoint's feature extractor."""
from __future__ import annotations

import torch

from featx.encoders.base import Encoder, from_pretrained


class AudioEncoder(Encoder):
    modality = "audio"

    def __init__(self, name, *, config, device="cpu", trust_remote_code=False, **_):
        super().__init__(name, config=config, device=device, trust_remote_code=trust_remote_code)
        from transformers import AutoFeatureExtractor, AutoModel

        self.processor = from_pretrained(AutoFeatureExtractor, name, "feature extractor",
                                         trust_remote_code=trust_remote_code)
        self._finish_load(from_pretrained(AutoModel, name, "weights", config=config,
                                          trust_remote_code=trust_remote_code))
        self.sample_rate = int(self.processor.sampling_rate)
        # Group-norm conv features (wav2vec2-base, WavLM-base) normalise over the whole padded length, and
        # such checkpoints take no attention mask: padding would change their outputs, so they batch only
        # inputs of equal length.
        self.uses_mask = bool(getattr(self.processor, "return_attention_mask", False))
        self.attrs = {"sample_rate": self.sample_rate, "feat_extract_norm": getattr(config, "feat_extract_norm", "")}

    def size(self, raw):
        return int(raw.shape[0])

    def batch_key(self, raw):
        return None if self.uses_mask else int(raw.shape[0])

    def num_frames(self, num_samples) -> int:
        """How many encoder frames `num_samples` samples give (0: too short for the conv feature encoder)."""
        return int(self.model._get_feat_extract_output_lengths(torch.tensor(int(num_samples))))

    def prepare(self, raws):
        # Always ask for the mask so each input is normalised over its own samples only.
        out = self.processor(list(raws), sampling_rate=self.sample_rate, padding=True, return_attention_mask=True,
                             return_tensors="pt")
        return {"input_values": out["input_values"], "attention_mask": out["attention_mask"]}

    def forward(self, inputs):
        values = inputs["input_values"].to(self.device, non_blocking=True)
        sample_mask = inputs["attention_mask"].to(self.device, non_blocking=True)
        out = self.model(values, attention_mask=sample_mask if self.uses_mask else None, output_hidden_states=True)
        hs = out.hidden_states
        lengths = self.model._get_feat_extract_output_lengths(sample_mask.sum(-1))
        frames = torch.arange(hs[0].shape[1], device=hs[0].device)
        return hs, frames.unsqueeze(0) < lengths.unsqueeze(1)
