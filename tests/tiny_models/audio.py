"""Tiny randomly initialised audio checkpoints (hidden size ~32, 2 layers), saved with their feature extractors.

BUILDERS: {family name: build(path) -> path}; the family names are featx.encoders.registry.Family.name.
"""

from featx.demo.tiny import build_tiny_wavlm, save_checkpoint




def build_tiny_whisper(path, seed=0):
    """A full WhisperForConditionalGeneration (d_model 32, 2 encoder layers, 80 mel bins; the encoder still takes
    30 s = 3000 mel frames -> 1500 positions) and its WhisperFeatureExtractor."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=64, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_source_positions=1500, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1)
    return save_checkpoint(path, WhisperForConditionalGeneration(cfg), WhisperFeatureExtractor(feature_size=80))


def build_tiny_ast(path, seed=0):
    """An ASTModel (hidden 32, 2 layers) over 128 fbank frames (1.28 s) x 32 mel bins, and its ASTFeatureExtractor."""
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    torch.manual_seed(seed)
    cfg = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=16,
                    frequency_stride=10, time_stride=10, max_length=128, num_mel_bins=32)
    return save_checkpoint(path, ASTModel(cfg), ASTFeatureExtractor(num_mel_bins=32, max_length=128))


def build_tiny_clap(path, fusion=False, seed=0):
    """A full ClapModel whose HTSAT audio tower has 2 Swin stages (widths 16, 32) over a 64 x 64 spectrogram image
    (2 s at 16 kHz, 16 mel bins), and its ClapFeatureExtractor (truncation 'fusion' when `fusion`, else
    'rand_trunc')."""
    import torch
    from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapTextConfig

    torch.manual_seed(seed)
    audio = ClapAudioConfig(spec_size=64, num_mel_bins=16, patch_size=4, patch_stride=(4, 4), window_size=4,
                            depths=[1, 1], num_attention_heads=[2, 4], patch_embeds_hidden_size=16, hidden_size=32,
                            projection_dim=16, enable_fusion=fusion, mlp_ratio=2.0)
    text = ClapTextConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=40, projection_dim=16)
    cfg = ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=16)
    extractor = ClapFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=160, fft_window_size=400,
                                     max_length_s=2, frequency_max=8000, truncation="fusion" if fusion else "rand_trunc")
    return save_checkpoint(path, ClapModel(cfg), extractor)


def build_tiny_w2v_bert(path, seed=0):
    """A Wav2Vec2BertModel (hidden 32, 2 conformer layers) and its SeamlessM4TFeatureExtractor (80 mel bins,
    stacked by 2 -> 160 features per frame)."""
    import torch
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

    torch.manual_seed(seed)
    cfg = Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             feature_projection_input_dim=160, output_hidden_size=32, conv_depthwise_kernel_size=5,
                             left_max_position_embeddings=16, right_max_position_embeddings=4, add_adapter=False)
    return save_checkpoint(path, Wav2Vec2BertModel(cfg),
                           SeamlessM4TFeatureExtractor(feature_size=80, num_mel_bins=80, stride=2))


# model type -> (config class, model class) of the wav2vec2 family (featx.encoders.audio); WavLM: build_tiny_wavlm
_WAV2VEC2_TYPES = {"wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"), "hubert": ("HubertConfig", "HubertModel"),
                   "unispeech": ("UniSpeechConfig", "UniSpeechModel"),
                   "unispeech-sat": ("UniSpeechSatConfig", "UniSpeechSatModel"),
                   "data2vec-audio": ("Data2VecAudioConfig", "Data2VecAudioModel"),
                   "wav2vec2-conformer": ("Wav2Vec2ConformerConfig", "Wav2Vec2ConformerModel")}


def build_tiny_wav2vec2_family(path, model_type, norm="layer", mask=None, seed=0):
    """A random model of a wav2vec2-family `model_type` (hidden 32, 2 layers, 3 conv layers: 320 samples a frame)
    and its Wav2Vec2FeatureExtractor. norm="layer": the large checkpoints' layout (layer-norm conv features,
    stable layer norm, an extractor that normalises and returns the attention mask: wav2vec2-large-lv60,
    hubert-large, unispeech-sat-large, data2vec-audio-*); norm="group": the base ones' (group-norm conv
    features, no normalisation, no mask). mask: whether the extractor returns the attention mask (default: with
    layer norm). data2vec-audio: a stack of 2 positional convs of width 5 (its layout: 5 of 19);
    wav2vec2-conformer: relative positions and a depthwise conv of width 7 in each block."""
    import torch
    import transformers
    from transformers import Wav2Vec2FeatureExtractor

    config_class, model_class = (getattr(transformers, n) for n in _WAV2VEC2_TYPES[model_type])
    large, mask = norm == "layer", norm == "layer" if mask is None else mask
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4), num_conv_pos_embeddings=16,
                  num_conv_pos_embedding_groups=4, feat_extract_norm=norm)
    if model_type == "data2vec-audio":  # always layer-norm conv features and pre-norm blocks
        kwargs.update(num_conv_pos_embeddings=2, conv_pos_kernel_size=5)
        del kwargs["feat_extract_norm"]
    elif model_type == "wav2vec2-conformer":
        kwargs.update(position_embeddings_type="relative", conv_depthwise_kernel_size=7)
    else:
        kwargs.update(do_stable_layer_norm=large)
    torch.manual_seed(seed)
    return save_checkpoint(path, model_class(config_class(**kwargs)),
                           Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                    do_normalize=large, return_attention_mask=mask))


BUILDERS = {"wav2vec2": build_tiny_wavlm, "whisper": build_tiny_whisper, "ast": build_tiny_ast,
            "clap-audio": build_tiny_clap, "w2v-bert": build_tiny_w2v_bert}
