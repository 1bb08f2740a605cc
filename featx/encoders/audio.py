"""Speech encoders of the wav2vec2 family (WavLM, wav2vec2, HuBERT, ...), with the checkpoint's feature extractor."""
from __future__ import annotations

import types
import warnings

import numpy as np
import torch

from featx.encoders.base import Encoder, from_pretrained, model_loader
from featx.encoders.wavlm_sdpa import is_wavlm, use_sdpa_attention
from featx.settings import AUDIO_ATTENTIONS, one_of


class _Normalise:
    """One mono waveform (T,) -> the checkpoint's input values (T,) float32, as its feature extractor makes them.

    For a Wav2Vec2FeatureExtractor the extractor's own normalisation (zero_mean_unit_var_norm, the same arrays)
    is called directly: its __call__ around it costs about 4x as much per window (checked against it in tests)."""

    def __init__(self, processor, sample_rate):
        from transformers import Wav2Vec2FeatureExtractor

        self.processor, self.sample_rate = processor, sample_rate
        self.direct = type(processor) is Wav2Vec2FeatureExtractor

    def __call__(self, wav):
        if not self.direct:
            return self.processor(wav, sampling_rate=self.sample_rate, return_tensors="np")["input_values"][0]
        values = np.asarray(wav, dtype=np.float32)
        if not self.processor.do_normalize:
            return values
        return self.processor.zero_mean_unit_var_norm([values], None, self.processor.padding_value)[0]


def frame_mask(model, feature_vector_length, attention_mask, add_adapter=None):
    """The (B, T) bool mask of the frames over real samples, as transformers' wav2vec2-family
    `_get_feature_vector_attention_mask` makes it (frames before each row's output length), but compared in one
    kernel: transformers sets the last real frame by an index assignment, which waits for the GPU every batch.
    Set on the loaded model in place of that method. add_adapter goes on to the model's
    `_get_feat_extract_output_lengths` only when its caller gives it: HuBERT's and UniSpeech(-SAT)'s methods
    neither give nor take it."""
    extra = {} if add_adapter is None else {"add_adapter": add_adapter}
    lengths = model._get_feat_extract_output_lengths(attention_mask.sum(-1), **extra).to(torch.long)
    return torch.arange(feature_vector_length, device=attention_mask.device)[None, :] < lengths[:, None]


# Model types whose forward of a padded batch with the attention mask gives each item's real frames as its forward
# alone does (to float rounding; tests/encoders/test_family_audio.py checks each type against transformers): their
# one positional conv sees the padded frames zeroed, as a lone item's zero padding. data2vec-audio's stack of
# positional convs and wav2vec2-conformer's depthwise convs in each block carry padding into the last real frames.
PADS_EXACTLY = ("wav2vec2", "hubert", "wavlm", "unispeech", "unispeech-sat")


class AudioEncoder(Encoder):
    """wav2vec2-family speech encoders. audio_attention: how a WavLM runs its attention, "sdpa" (torch's fused
    scaled_dot_product_attention, featx.encoders.wavlm_sdpa) or "eager" (transformers' own); stored in the
    cache's attrs for WavLM models. Other models run transformers' attention as it is."""
    modality = "audio"

    def __init__(self, name, *, config, device="cpu", trust_remote_code=False, precision="fp32",
                 audio_attention=AUDIO_ATTENTIONS[0], **_):
        super().__init__(name, config=config, device=device, trust_remote_code=trust_remote_code,
                         precision=precision)
        from transformers import AutoFeatureExtractor

        self.processor = from_pretrained(AutoFeatureExtractor, name, "feature extractor",
                                         trust_remote_code=trust_remote_code)
        self._finish_load(from_pretrained(model_loader(self.model_class), name, "weights", config=config,
                                          trust_remote_code=trust_remote_code, **self.weights_kwargs()))
        self.sample_rate = int(self.processor.sampling_rate)
        if hasattr(self.model, "_get_feature_vector_attention_mask"):
            self.model._get_feature_vector_attention_mask = types.MethodType(frame_mask, self.model)
        self.uses_mask = bool(getattr(self.processor, "return_attention_mask", False))
        # Padding would change the outputs of group-norm conv features (wav2vec2-base, WavLM-base: normalised over
        # the whole padded length), of a checkpoint without the attention mask (it attends to the padding) and of
        # the model types not in PADS_EXACTLY: those batch only inputs of equal length.
        self.pads = (self.uses_mask and getattr(config, "feat_extract_norm", "") == "layer"
                     and getattr(config, "model_type", "") in PADS_EXACTLY)
        self.attrs = {"sample_rate": self.sample_rate, "feat_extract_norm": getattr(config, "feat_extract_norm", "")}
        if self.uses_mask and not self.pads:
            # featx padded every checkpoint with the mask before PADS_EXACTLY; these (data2vec-audio, conformer,
            # group-norm ones) then gave values that depended on their batch: a cache begun so (no such
            # attribute, schema.ATTRS_BEFORE_RECORDED) is not resumed
            self.attrs["audio_batching"] = "equal-lengths"
        if is_wavlm(self.model):
            # The two attentions differ at the 1e-6 level (fp32): a cache is resumed only with the one it began with.
            self.attrs["audio_attention"] = one_of("audio attention", *AUDIO_ATTENTIONS)(audio_attention)
            if audio_attention == "sdpa":
                use_sdpa_attention(self.model)

    def preprocessor(self):
        return _Normalise(self.processor, self.sample_rate)

    def size(self, feats):
        return int(feats.shape[0])

    def batch_key(self, feats):
        return None if self.pads else int(feats.shape[0])

    def num_frames(self, num_samples) -> int:
        """How many encoder frames `num_samples` samples give (0: too short for the conv feature encoder)."""
        return int(self.frames_of([int(num_samples)])[0])

    def frames_of(self, sizes) -> np.ndarray:
        """num_frames of each of `sizes` in one call (transformers' formula works elementwise; ~50 us a call)."""
        sizes = torch.as_tensor(np.asarray(sizes, np.int64))
        return self.model._get_feat_extract_output_lengths(sizes).numpy().astype(np.int64)

    def collate(self, feats):
        # Each input was normalised over its own samples; padding with the processor's value is what
        # the processor does when it pads a batch.
        n = max(f.shape[0] for f in feats)
        values = self.host_tensor((len(feats), n), torch.float32, float(self.processor.padding_value))
        mask = self.host_tensor((len(feats), n), torch.long, 0)
        v, m = values.numpy(), mask.numpy()  # numpy's slice assignment: a tenth of torch's per-row cost
        for b, f in enumerate(feats):
            v[b, :f.shape[0]] = f
            m[b, :f.shape[0]] = 1
        return {"input_values": values, "attention_mask": mask}

    def forward(self, inputs):
        values = self.to_device(inputs["input_values"])
        sample_mask = self.to_device(inputs["attention_mask"])
        with warnings.catch_warnings():  # WavLM under torch >= 2.1 warns on every padded batch; harmless here
            warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask", category=UserWarning)
            out = self.model(values, attention_mask=sample_mask if self.uses_mask else None,
                             output_hidden_states=True)
        hs = out.hidden_states
        lengths = self.model._get_feat_extract_output_lengths(sample_mask.sum(-1))
        frames = torch.arange(hs[0].shape[1], device=hs[0].device)
        return hs, frames.unsqueeze(0) < lengths.unsqueeze(1)
