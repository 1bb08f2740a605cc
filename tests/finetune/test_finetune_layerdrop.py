"""LayerDrop in fine-tuning.

A wav2vec2-family checkpoint (WavLM, wav2vec2, HuBERT, data2vec-audio ...; transformers' default config has
layerdrop 0.1) skips whole blocks at random in train mode, and transformers then returns fewer hidden states: the
cut model took hidden_states[layer], so a step where a lower block was dropped trained on a later block's output,
and a cut at the last layer was `IndexError: tuple index out of range`, a traceback. Fine-tuning turns LayerDrop
off: the head sees the cut layer's hidden state on every step. Real tiny checkpoints, saved with layerdrop 0.9.
"""
import contextlib
import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from featx.cli.main import main

LAYERDROP = 0.9
BLOCKS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # conftest's: tiny fits are slow on two busy cores


def _with_layerdrop(path, layerdrop=LAYERDROP, field="layerdrop"):
    """The checkpoint at `path` rewritten with LayerDrop `layerdrop` (config `field`), no dropout and no SpecAugment
    masking (so that a train-mode forward can be compared with an eval-mode one: LayerDrop is the only difference
    left)."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for key in list(cfg):
        if key.endswith("dropout"):
            cfg[key] = 0.0
    cfg.update({field: layerdrop, "mask_time_prob": 0.0, "mask_feature_prob": 0.0})
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return path


def _build_wav2vec2(path, seed=0):
    """A random Wav2Vec2Model in wav2vec2-base's layout (group-norm conv features, no attention mask)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(seed)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=BLOCKS, num_attention_heads=4, intermediate_size=64,
                         conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="group",
                         do_stable_layer_norm=False)
    Wav2Vec2Model(cfg).eval().save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False,
                             return_attention_mask=False).save_pretrained(path)
    return path


# The config field of each checkpoint's LayerDrop.
FIELDS = {"wavlm": "layerdrop", "wav2vec2": "layerdrop", "w2v-bert": "layerdrop", "whisper": "encoder_layerdrop"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"wavlm": ..., "wav2vec2": ...}: tiny checkpoints of BLOCKS blocks with LayerDrop 0.9; w2v-BERT and
    Whisper (tests/tiny_models: 2 blocks) too."""
    from featx.demo.tiny import build_tiny_wavlm, quiet_libraries
    from tiny_models.audio import build_tiny_w2v_bert, build_tiny_whisper

    root = tmp_path_factory.mktemp("layerdrop")
    with quiet_libraries():
        paths = {"wavlm": build_tiny_wavlm(str(root / "wavlm"), num_layers=BLOCKS),
                 "wav2vec2": _build_wav2vec2(str(root / "wav2vec2")),
                 "w2v-bert": build_tiny_w2v_bert(str(root / "w2v-bert")),
                 "whisper": build_tiny_whisper(str(root / "whisper"))}
    return {name: _with_layerdrop(path, field=FIELDS[name]) for name, path in paths.items()}


def _waves():
    rng = np.random.default_rng(0)
    return [rng.standard_normal(8000).astype(np.float32), rng.standard_normal(6000).astype(np.float32)]


def test_the_checkpoints_really_drop_blocks_in_train_mode(checkpoints):
    """Not vacuous: a plain transformers forward of these checkpoints in train mode returns fewer hidden states
    than blocks + 1 (the cause of the bug), and all of them in eval mode."""
    from transformers import AutoModel

    x = torch.from_numpy(_waves()[0])[None]
    for name in ("wavlm", "wav2vec2"):
        model = AutoModel.from_pretrained(checkpoints[name])
        with torch.no_grad():
            counts = set()
            for seed in range(6):
                torch.manual_seed(seed)
                counts.add(len(model.train()(x, output_hidden_states=True).hidden_states))
            assert min(counts) < BLOCKS + 1, (name, counts)
            assert len(model.eval()(x, output_hidden_states=True).hidden_states) == BLOCKS + 1


# WavLM never drops its first block (transformers skips block 0 from LayerDrop), wav2vec2 drops any block: a cut at
# layer 1 of wav2vec2 gave block 2's output, silently; a cut at layer 2 or 3 was an IndexError or another block.
@pytest.mark.parametrize("name,layer", [("wavlm", 1), ("wavlm", 2), ("wavlm", BLOCKS), ("wav2vec2", 1),
                                        ("wav2vec2", BLOCKS), ("w2v-bert", 1), ("w2v-bert", 2), ("whisper", 1),
                                        ("whisper", 2)])
def test_the_cut_model_in_train_mode_gives_the_cut_layer_on_every_call(checkpoints, name, layer):
    from featx.encoders import load_encoder
    from featx.finetune import EncoderBranch
    from featx.finetune.model import block_list

    full = load_encoder(checkpoints[name])
    inputs = full.prepare(_waves())
    with torch.no_grad():
        reference, _ = full.forward(inputs)   # the whole model in eval mode: what extract caches
    branch = EncoderBranch(load_encoder(checkpoints[name]), layer=layer, train_blocks=-1).train()
    parent, attr = block_list(branch.encoder, branch.block_path)
    assert all(m.training for m in getattr(parent, attr))   # the trained blocks run in train mode
    for seed in range(8):
        torch.manual_seed(seed)
        with torch.no_grad():
            h, _ = branch(inputs)
        torch.testing.assert_close(h, reference[layer], rtol=1e-5, atol=1e-5, msg=f"{name} layer {layer} seed {seed}")
    assert branch.layerdrop_was == {FIELDS[name]: LAYERDROP}   # what the checkpoint had, for meta.json


def test_a_block_skipped_after_the_cut_is_a_featx_error_not_another_layer(checkpoints):
    """The branch checks every forward: LayerDrop turned on again behind its back (the checkpoint's own config
    object, set after the cut) gives fewer hidden states, a one-line FeatxError, never a later block's output."""
    from featx.encoders import load_encoder
    from featx.errors import FeatxError
    from featx.finetune import EncoderBranch

    encoder = load_encoder(checkpoints["wavlm"])
    inputs = encoder.prepare(_waves())
    branch = EncoderBranch(encoder, layer=BLOCKS, train_blocks=-1).train()
    branch.encoder.config.layerdrop = 1.0   # every block but WavLM's first skipped in train mode
    with pytest.raises(FeatxError, match=r"gave 2 hidden states, not 4 .*skipped in train mode"), torch.no_grad():
        branch(inputs)
    branch.eval()
    with torch.no_grad():
        assert branch(inputs)[0].shape[-1] == 32   # eval mode: no block skipped


def _audio_manifest(folder, n=12):
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        t = np.arange(4000 + 400 * (i % 3)) / 16000
        sf.write(str(folder / f"a{i}.wav"), (0.3 * np.sin(2 * np.pi * (200 + 60 * (i % 3)) * t)).astype(np.float32),
                 16000)
        rows.append({"id": f"a{i}", "audio": f"a{i}.wav", "label": float(i % 3) + 0.1 * (i % 2),
                     "split": ["train", "train", "dev", "test"][i % 4]})
    path = folder / "m.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def _main(args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(args)
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("layers,cut", [("1", 1), (None, BLOCKS)])   # None: the default, --layers last
def test_finetune_of_a_checkpoint_with_layerdrop_runs_at_the_layer_asked_for(checkpoints, tmp_path, layers, cut):
    """`featx finetune` of a WavLM with layerdrop 0.9: the default last layer was an IndexError traceback; now it
    runs (every step's forward is checked to give the kept blocks + 1 hidden states), and meta.json says LayerDrop
    was off and what the checkpoint had."""
    manifest = _audio_manifest(tmp_path / "data")
    args = ["finetune", manifest, "--model", checkpoints["wavlm"], "--out", str(tmp_path / "ft"), "--epochs", "1",
            "--batch-size", "4", "--no-save-model", "-q"] + (["--layers", layers] if layers else [])
    status, _, err = _main(args)
    assert status == 0, err
    with open(tmp_path / "ft" / "meta.json") as f:
        meta = json.load(f)
    (encoder,) = meta["encoders"]
    assert encoder["layer"] == cut and encoder["layerdrop_off"] == {"layerdrop": LAYERDROP}
    assert any("LayerDrop off (layerdrop 0.9" in note for note in meta["notes"]), meta["notes"]
    assert pd.read_csv(tmp_path / "ft" / "results.csv")["value"].notna().all()
