"""Speech/audio encoders that take spectrogram features: Whisper's encoder, the Audio Spectrogram Transformer,
CLAP's audio tower and w2v-BERT 2.0, each with its checkpoint's own feature extractor.

Their inputs are decoded windows of samples (T,) at the feature extractor's rate, as for the wav2vec2 family
(featx.encoders.audio), so length sorting, the too-short check and batch budgets work in samples; `collate`
runs the feature extractor on each window alone (as a direct call on that one clip does) and keeps the
window's length, from which the mask over the positions that cover real audio follows.

Fixed-length models (Whisper: 30 s, AST: max_length fbank frames, CLAP: max_length_s) set
`max_window_seconds`: extract cuts audio into windows no longer than that (whatever --max-audio-seconds asks),
so their feature extractors never truncate (CLAP's would crop at random); the cache records it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from featx.encoders.base import Encoder, from_pretrained, model_loader
from featx.encoders.pooling import spatial_means


class _Samples:
    """The preprocessor: a decoded window as contiguous float32 samples (T,)."""

    def __call__(self, wav):
        return np.ascontiguousarray(wav, dtype=np.float32)


class SpeechEncoder(Encoder):
    """An audio encoder over the feature extractor's spectrogram features of each window.

    weights_prefix: a regular expression for the prefix the tower's weights carry in a full checkpoint of the
    model type (Whisper's "model.encoder."); it is removed on loading, and a tower whose weights are not all in
    the checkpoint fails instead of running with random ones.
    """

    modality = "audio"
    weights_prefix = None

    def __init__(self, name, *, config, device="cpu", trust_remote_code=False, precision="fp32", **_):
        super().__init__(name, config=config, device=device, trust_remote_code=trust_remote_code,
                         precision=precision)
        from transformers import AutoFeatureExtractor

        self.processor = from_pretrained(AutoFeatureExtractor, name, "feature extractor",
                                         trust_remote_code=trust_remote_code)
        self.sample_rate = int(self.processor.sampling_rate)
        self._finish_load(self._load_weights(name, trust_remote_code))
        self.attrs = {"sample_rate": self.sample_rate, "feature_extractor": type(self.processor).__name__}
        self.max_window_seconds = self.longest_window()  # extract's windows are never longer
        if self.max_window_seconds:
            self.attrs["max_window_seconds"] = self.max_window_seconds

    def longest_window(self):
        """Seconds of audio the feature extractor takes without cutting any off (None: any length)."""
        return None

    def _load_weights(self, name, trust_remote_code):
        kwargs = {"trust_remote_code": trust_remote_code, **self.weights_kwargs()}
        if self.weights_prefix:
            kwargs.update(key_mapping={self.weights_prefix: ""})
        model = from_pretrained(self.loader(), name, "weights", **kwargs)  # refused when it lacks weights
        if not self.weights_prefix:
            return model
        # transformers would save the tower with the loading regex "reversed" into its keys ("?encoder.conv1.bias");
        # saved, it is a model of its own (a fine-tuned encoder), under its own keys
        model.__dict__.pop("_weight_conversions", None)
        return model

    def loader(self):
        """The class whose from_pretrained loads the weights."""
        return model_loader(self.model_class)

    def preprocessor(self):
        return _Samples()

    def size(self, wav) -> int:
        return int(wav.shape[0])

    def features(self, wav) -> dict:
        """The feature extractor's output for one window (T,) samples: numpy arrays with a batch axis of 1."""
        return self.processor(wav, sampling_rate=self.sample_rate, return_tensors="np")

    def stack(self, arrays, dtype=torch.float32):
        """(B, ...) host tensor of equally shaped (1, ...) numpy arrays."""
        out = self.host_tensor((len(arrays), *arrays[0].shape[1:]), dtype)
        for b, a in enumerate(arrays):
            out[b] = torch.from_numpy(np.asarray(a[0]))
        return out


class WhisperEncoderAdapter(SpeechEncoder):
    """Whisper's encoder (from a full Whisper checkpoint or an encoder-only one). The feature extractor pads each
    window to 30 s (3000 log-mel frames, which the encoder requires); the conv stem halves them to 1500 positions,
    of which the first ceil(samples / 320) cover real audio: pooling and the sequence keep those only."""

    weights_prefix = r"^(?:model\.)?encoder\."

    def longest_window(self):
        return float(self.processor.n_samples) / self.sample_rate

    def loader(self):
        from transformers.models.whisper.modeling_whisper import WhisperEncoder  # not exported at the top level

        return WhisperEncoder

    def size(self, wav) -> int:
        return int(self.processor.n_samples)  # every window costs 30 s of compute

    def num_frames(self, num_samples) -> int:
        """Encoder positions that cover `num_samples` samples: one per 2 hops of 160 samples, at most 1500."""
        positions = self.processor.n_samples // (2 * self.processor.hop_length)
        return min(positions, math.ceil(int(num_samples) / (2 * self.processor.hop_length)))

    def collate(self, wavs):
        return {"input_features": self.stack([self.features(w)["input_features"] for w in wavs]),
                "frames": torch.tensor([self.num_frames(w.shape[0]) for w in wavs])}

    def forward(self, inputs):
        features = self.to_device(inputs["input_features"])
        cut, last = len(self.model.layers) < int(self.config.encoder_layers), []
        # transformers gives the encoder's final layer norm as the last hidden state; when fine-tuning has cut the
        # blocks, the last kept block's own output is that layer's value, as in an uncut forward
        hook = self.model.layers[-1].register_forward_hook(lambda m, i, o: last.append(o)) if cut else None
        try:
            hs = self.model(features, output_hidden_states=True).hidden_states
        finally:
            if hook is not None:
                hook.remove()
        if cut:
            hs = (*hs[:-1], last[-1][0] if isinstance(last[-1], tuple) else last[-1])
        positions = torch.arange(hs[0].shape[1], device=hs[0].device)
        return hs, positions.unsqueeze(0) < inputs["frames"].to(hs[0].device).unsqueeze(1)


class ASTEncoder(SpeechEncoder):
    """The Audio Spectrogram Transformer. Its feature extractor pads or cuts each window to max_length fbank
    frames (10 ms each); the tokens are [cls, distillation, patches (frequency-major: f * t_dim + t)].
    `cls` = position 0. `mean` = the patch tokens whose time span starts within the real frames (not the
    distillation token, not patches over padding only)."""

    model_class = "ASTModel"

    def __init__(self, name, **kwargs):
        super().__init__(name, **kwargs)
        c = self.config
        self.time_patches = (c.max_length - c.patch_size) // c.time_stride + 1
        self.freq_patches = (c.num_mel_bins - c.patch_size) // c.frequency_stride + 1

    def longest_window(self):
        return int(self.processor.max_length) / 100  # fbank frames every 10 ms

    def size(self, wav) -> int:
        return int(round(self.max_window_seconds * self.sample_rate))  # every window is max_length frames

    def fbank_frames(self, num_samples) -> int:
        """Real fbank frames (25 ms windows every 10 ms) of `num_samples` samples, at most max_length."""
        hop, win = self.sample_rate // 100, self.sample_rate * 25 // 1000
        return 0 if num_samples < win else min(int(self.processor.max_length), 1 + (int(num_samples) - win) // hop)

    def real_columns(self, frames) -> int:
        """Time columns of patches over real audio: column t covers fbank frames [t * stride, t * stride + patch)."""
        return min(self.time_patches, math.ceil(int(frames) / self.config.time_stride))

    def num_frames(self, num_samples) -> int:
        """Patch tokens over real audio: its time columns times the frequency rows."""
        return self.real_columns(self.fbank_frames(num_samples)) * self.freq_patches

    def collate(self, wavs):
        return {"input_values": self.stack([self.features(w)["input_values"] for w in wavs]),
                "frames": torch.tensor([self.fbank_frames(w.shape[0]) for w in wavs])}

    def forward(self, inputs):
        values = self.to_device(inputs["input_values"])
        hs = self.model(values, output_hidden_states=True).hidden_states
        columns = torch.tensor([self.real_columns(f) for f in inputs["frames"]], device=hs[0].device)
        t = torch.arange(self.time_patches, device=hs[0].device).repeat(self.freq_patches)  # each patch's column
        patches = t.unsqueeze(0) < columns.unsqueeze(1)
        tokens = torch.zeros(len(columns), 2, dtype=torch.bool, device=hs[0].device)  # cls, distillation
        return hs, torch.cat([tokens, patches], dim=1)


class ClapAudioEncoder(SpeechEncoder):
    """CLAP's HTSAT audio tower (from a full CLAP checkpoint or an audio-only one). The feature extractor fills
    each window to max_length_s (its `padding`: 'repeatpad' repeats the clip, then pads with zeros); featx
    windows are never longer, so it never crops ('rand_trunc' and 'fusion' would crop at random). In 'fusion'
    mode a lone clip is marked is_longer (the extractor marks one clip of each call at random when none is
    longer): featx calls it per window, so each window is processed as that one clip alone is.

    Hidden states: the patch embedding and each Swin stage's output, (B, C_l, H_l, W_l) maps of differing
    widths and sizes, each averaged over its positions here (`mean`: over the whole filled spectrogram, the
    repeats included), so every layer is one position (B, 1, C_l); layer_widths records the widths."""
    sequences = False  # stages differ in width and positions: no per-position sequence (--seq)

    model_class = "ClapAudioModel"
    weights_prefix = r"^audio_model\."

    def __init__(self, name, **kwargs):
        super().__init__(name, **kwargs)
        c = self.model.config
        self.attrs.update(truncation=str(self.processor.truncation), padding=str(self.processor.padding),
                          enable_fusion=bool(c.enable_fusion))
        stages = len(c.depths)
        self.layer_widths = [int(c.patch_embeds_hidden_size * 2 ** min(i, stages - 1)) for i in range(stages + 1)]
        self.num_layers, self.hidden_size = stages + 1, max(self.layer_widths)

    def longest_window(self):
        return float(self.processor.nb_max_samples) / self.sample_rate

    def size(self, wav) -> int:
        return int(self.processor.nb_max_samples)  # every window is filled to max_length_s

    def num_frames(self, num_samples) -> int:
        return 1 if num_samples > 0 else 0  # one position per layer: its mean over the spectrogram

    def collate(self, wavs):
        feats = [self.features(w) for w in wavs]
        return {"input_features": self.stack([f["input_features"] for f in feats]),
                "is_longer": self.stack([f["is_longer"] for f in feats], torch.bool)}

    def forward(self, inputs):
        out = self.model(input_features=self.to_device(inputs["input_features"]),
                         is_longer=self.to_device(inputs["is_longer"]), output_hidden_states=True)
        hs = spatial_means(out.hidden_states)  # (B, 1, C_l)
        return hs, torch.ones(hs[0].shape[:2], dtype=torch.bool, device=hs[0].device)


class W2vBertEncoder(SpeechEncoder):
    """w2v-BERT 2.0 (Wav2Vec2BertModel): 80 log-mel fbank frames per 10 ms, normalised per clip, stacked by 2
    (160 features per 20 ms frame) by SeamlessM4TFeatureExtractor, with its attention mask (a last frame made
    of padding is masked). Batches are padded as the extractor pads them (zeros, mask 0); pooling covers the
    real frames."""

    model_class = "Wav2Vec2BertModel"

    def num_frames(self, num_samples) -> int:
        """Real stacked frames: fbank frames (25 ms windows every 10 ms) over the stride, rounded down."""
        hop, win = self.sample_rate // 100, self.sample_rate * 25 // 1000
        fbank = 0 if num_samples < win else 1 + (int(num_samples) - win) // hop
        return fbank // int(self.processor.stride)

    def collate(self, wavs):
        feats = [self.features(w) for w in wavs]
        n = max(f["input_features"].shape[1] for f in feats)
        dim = feats[0]["input_features"].shape[2]
        values = self.host_tensor((len(feats), n, dim), torch.float32, float(self.processor.padding_value))
        mask = self.host_tensor((len(feats), n), torch.long, 0)
        for b, f in enumerate(feats):
            k = f["input_features"].shape[1]
            values[b, :k] = torch.from_numpy(f["input_features"][0])
            mask[b, :k] = torch.from_numpy(f["attention_mask"][0].astype(np.int64))
        return {"input_features": values, "attention_mask": mask}

    def forward(self, inputs):
        mask = self.to_device(inputs["attention_mask"])
        out = self.model(self.to_device(inputs["input_features"]), attention_mask=mask,
                         output_hidden_states=True)
        return out.hidden_states, mask.bool()
