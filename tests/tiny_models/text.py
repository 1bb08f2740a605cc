"""Tiny text checkpoints (hidden size 32, 2 layers, random weights), each saved with its own tokenizer class
built from a small vocabulary (no download): BUILDERS maps each text family's name to `build(path) -> path`.

Byte-level BPE tokenizers (GPT-2, Qwen2, RoBERTa, CLIP) get the 256 byte symbols and no merges, so every
byte is a token; the others get single characters. Texts of different lengths then give different lengths.
"""
from __future__ import annotations

import os
import string

from featx.demo.tiny import build_tiny_bert, save_checkpoint

H, LAYERS, HEADS = 32, 2, 4
_CHARS = list(dict.fromkeys(string.ascii_letters + string.digits + string.punctuation))


def _byte_vocab(specials) -> dict:
    """specials first, then the 256 byte-level symbols of GPT-2's byte-to-unicode table."""
    from tokenizers import pre_tokenizers

    symbols = list(specials) + sorted(pre_tokenizers.ByteLevel.alphabet())
    return {s: i for i, s in enumerate(dict.fromkeys(symbols))}


def _char_vocab(specials, prefix="▁") -> dict:
    symbols = list(specials) + [prefix] + _CHARS + [prefix + c for c in _CHARS]
    return {s: i for i, s in enumerate(dict.fromkeys(symbols))}




def build_gpt2(path, seed=0):
    """GPT-2: byte-level BPE, no pad token, adds no special token (as openai-community/gpt2)."""
    import torch
    from transformers import GPT2Config, GPT2Model, GPT2Tokenizer

    tok = GPT2Tokenizer(vocab=_byte_vocab(["<|endoftext|>"]), merges=[])
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    return save_checkpoint(path, GPT2Model(cfg), tok)


def build_llama(path, seed=0):
    """Llama: byte-fallback BPE over characters, adds BOS <s> (as meta-llama checkpoints), no pad token."""
    import torch
    from transformers import LlamaConfig, LlamaModel, LlamaTokenizer

    vocab = _char_vocab(["<unk>", "<s>", "</s>"])
    tok = LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=H, intermediate_size=2 * H, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2)
    return save_checkpoint(path, LlamaModel(cfg), tok)


def build_qwen2(path, seed=0):
    """Qwen2: byte-level BPE, pad token <|endoftext|>, adds no special token."""
    import torch
    from transformers import Qwen2Config, Qwen2Model, Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab=_byte_vocab(["<|endoftext|>"]), merges=[])
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=H, intermediate_size=2 * H, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=128)
    return save_checkpoint(path, Qwen2Model(cfg), tok)


def build_qwen3(path, seed=0):
    """Qwen3: Qwen2's tokenizer, per-head q/k norms."""
    import torch
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

    tok = Qwen2Tokenizer(vocab=_byte_vocab(["<|endoftext|>"]), merges=[])
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=H, intermediate_size=2 * H, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    return save_checkpoint(path, Qwen3Model(cfg), tok)


def build_t5(path, seed=0, kind="T5"):
    """T5 (full encoder-decoder checkpoint; kind "MT5" or "UMT5" for its kin): Unigram tokenizer over
    characters, appends EOS </s>."""
    import torch
    import transformers as tr

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(s, -1.0) for s in _char_vocab([])]
    tok = tr.T5Tokenizer(vocab=pieces, extra_ids=0)
    torch.manual_seed(seed)
    cfg = getattr(tr, f"{kind}Config")(vocab_size=len(tok), d_model=H, d_kv=8, d_ff=2 * H, num_layers=LAYERS,
                                       num_decoder_layers=1, num_heads=HEADS, relative_attention_num_buckets=8,
                                       decoder_start_token_id=0)
    return save_checkpoint(path, getattr(tr, f"{kind}Model")(cfg), tok)


def build_roberta(path, seed=0, model_max_length=128):
    """RoBERTa: 130 position rows, of which 128 embed tokens (they are numbered from the padding index + 1);
    model_max_length None: a tokenizer saved without one (transformers' huge default)."""
    import torch
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    limit = {} if model_max_length is None else {"model_max_length": model_max_length}
    tok = RobertaTokenizer(vocab=_byte_vocab(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]), merges=[], **limit)
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=2 * H, max_position_embeddings=130, pad_token_id=1)
    return save_checkpoint(path, RobertaModel(cfg), tok)


def build_deberta_v2(path, seed=0):
    import torch
    from transformers import DebertaV2Config, DebertaV2Model, DebertaV2Tokenizer

    pieces = [(s, 0.0) for s in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] + \
             [(s, -1.0) for s in _char_vocab([])]
    tok = DebertaV2Tokenizer(vocab=pieces)
    torch.manual_seed(seed)
    cfg = DebertaV2Config(vocab_size=len(tok), hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          intermediate_size=2 * H, max_position_embeddings=128, relative_attention=True,
                          pos_att_type=["p2c", "c2p"], position_biased_input=False, max_relative_positions=-1,
                          position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True)
    return save_checkpoint(path, DebertaV2Model(cfg), tok)


def build_modernbert(path, seed=0):
    """ModernBERT with a WordPiece tokenizer ([CLS] ... [SEP]); local and global attention layers."""
    import torch
    from transformers import ModernBertConfig, ModernBertModel
    from transformers import AutoTokenizer

    build_tiny_bert(path)  # its tokenizer (the BERT weights are overwritten below)
    tok = AutoTokenizer.from_pretrained(path)
    for f in ("model.safetensors", "config.json"):
        os.remove(os.path.join(path, f))
    torch.manual_seed(seed)
    cfg = ModernBertConfig(vocab_size=len(tok), hidden_size=H, intermediate_size=2 * H, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, max_position_embeddings=128, local_attention=4,
                           global_attn_every_n_layers=2, pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
                           sep_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
                           eos_token_id=tok.sep_token_id)
    return save_checkpoint(path, ModernBertModel(cfg), tok)


def build_clip_text(path, seed=0):
    """A full CLIP checkpoint (both towers) saved with its image processor AND a CLIP tokenizer."""
    import torch
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTokenizer,
                              CLIPVisionConfig)

    vocab = _byte_vocab(["<|startoftext|>", "<|endoftext|>"])
    vocab.update({s + "</w>": len(vocab) + i for i, s in enumerate(sorted(vocab)[2:])})
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=48)
    torch.manual_seed(seed)
    tcfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=H, intermediate_size=2 * H, num_hidden_layers=LAYERS,
                          num_attention_heads=HEADS, max_position_embeddings=48, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, projection_dim=16)
    vcfg = CLIPVisionConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            image_size=32, patch_size=8, projection_dim=16)
    model = CLIPModel(CLIPConfig(text_config=tcfg.to_dict(), vision_config=vcfg.to_dict(), projection_dim=16))
    return save_checkpoint(path, model, tok,
                           CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))


def _build_siglip(path, seed, version):
    """A full SigLIP (1 or 2) checkpoint with a character tokenizer that appends EOS (SigLIP's tokenizer does;
    SigLIP 1's own is SentencePiece, which is not installed here: a Unigram T5Tokenizer stands in)."""
    import torch
    import transformers as tr

    prefix = "Siglip" if version == 1 else "Siglip2"
    if version == 1:
        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(s, -1.0) for s in _char_vocab([])]
        tok = tr.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=64)
    else:
        tok = tr.Siglip2Tokenizer(vocab=_char_vocab(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]), merges=[],
                                  model_max_length=64)
    torch.manual_seed(seed)
    tcfg = getattr(tr, f"{prefix}TextConfig")(vocab_size=len(tok), hidden_size=H, intermediate_size=2 * H,
                                              num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                              max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                                              bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    vcfg = getattr(tr, f"{prefix}VisionConfig")(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=LAYERS,
                                                num_attention_heads=HEADS, image_size=32, patch_size=8)
    config = getattr(tr, f"{prefix}Config")(text_config=tcfg.to_dict(), vision_config=vcfg.to_dict())
    return save_checkpoint(path, getattr(tr, f"{prefix}Model")(config), tok)


def build_siglip_text(path, seed=0):
    return _build_siglip(path, seed, 1)


def build_siglip2_text(path, seed=0):
    return _build_siglip(path, seed, 2)


BUILDERS = {"bert": build_tiny_bert, "modernbert": build_modernbert, "gpt2": build_gpt2, "llama": build_llama,
            "t5-encoder": build_t5, "clip-text": build_clip_text, "siglip-text": build_siglip_text,
            "siglip2-text": build_siglip2_text}
# Further model types served by the families above (bert: RoBERTa, DeBERTa-v2; llama: Qwen2, Qwen3;
# t5-encoder: UMT5).
MORE_BUILDERS = {"roberta": build_roberta, "deberta-v2": build_deberta_v2, "qwen2": build_qwen2, "qwen3": build_qwen3,
                 "umt5": lambda path: build_t5(path, kind="UMT5")}
