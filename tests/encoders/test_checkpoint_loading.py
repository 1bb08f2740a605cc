"""Loading an encoder's checkpoint: a checkpoint that lacks weights is refused in one line (transformers would
initialise them at random and featx would extract from a partly random model), in every command that loads
encoder weights; weights featx never runs (a pooler) may be missing."""
import os
import shutil
import subprocess
import sys

import pytest

from featx.cli.main import main
from featx.errors import FeatxError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _featx(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "featx", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def _without(src, dst, drop):
    """A copy of checkpoint folder `src` at `dst` whose safetensors lack the tensors for which drop(name) holds;
    returns (dst, the names dropped)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    dropped = []
    for f in os.listdir(dst):
        if f.endswith(".safetensors"):
            weights = load_file(os.path.join(dst, f))
            dropped += [k for k in weights if drop(k)]
            save_file({k: v for k, v in weights.items() if not drop(k)}, os.path.join(dst, f),
                      metadata={"format": "pt"})
    assert dropped
    return str(dst), sorted(dropped)


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_checkpoint_without_one_layers_weights_is_refused_naming_it_and_some_of_them(tmp_path, tiny_bert):
    from featx.encoders import load_encoder

    broken, dropped = _without(tiny_bert, tmp_path / "bert-no-layer-1", lambda k: ".layer.1." in k)
    with pytest.raises(FeatxError) as e:
        load_encoder(broken)
    msg = str(e.value)
    assert "\n" not in msg and repr(broken) in msg and f"lacks {len(dropped)} weights of its BertModel" in msg, msg
    assert "encoder.layer.1.attention.output.LayerNorm.bias" in msg, msg  # the first few, sorted
    load_encoder(tiny_bert)  # the complete checkpoint loads


def test_a_pooler_the_checkpoint_lacks_is_not_refused(tmp_path, tiny_bert):
    """A base checkpoint saved from a task model has no pooler weights; featx never runs the pooler."""
    from featx.encoders import load_encoder

    no_pooler, _ = _without(tiny_bert, tmp_path / "bert-no-pooler", lambda k: k.startswith("pooler."))
    assert load_encoder(no_pooler).num_layers == 3


def test_a_masking_embedding_the_checkpoint_lacks_is_not_refused(tmp_path, tiny_wavlm):
    """wav2vec2-family masked_spec_embed replaces masked frames in pre-training only; featx never masks."""
    from featx.encoders import load_encoder

    plain, dropped = _without(tiny_wavlm, tmp_path / "wavlm-no-mask", lambda k: k.endswith("masked_spec_embed"))
    assert dropped == ["masked_spec_embed"]
    assert load_encoder(plain).num_layers == load_encoder(tiny_wavlm).num_layers


@pytest.mark.parametrize("family,drop", [
    ("clip-vision", lambda k: "vision_model.encoder.layers.0." in k),  # the tower of a full CLIP checkpoint
    ("wav2vec2", lambda k: "encoder.layers.1.feed_forward" in k),
    ("whisper", lambda k: "encoder.layers.0.fc1" in k),  # loaded under a key mapping (encoder.)
    ("xclip-vision", lambda k: "vision_model.encoder.layers.0.mlp" in k),  # featx's own loader of the tower
])
def test_other_families_lacking_weights_are_refused(tmp_path, family, drop):
    from tiny_models import BUILDERS

    from featx.encoders import load_encoder

    built = BUILDERS[family](str(tmp_path / family))
    load_encoder(built)
    broken, dropped = _without(built, tmp_path / "broken", drop)
    with pytest.raises(FeatxError, match=rf"model '.*broken' lacks {len(dropped)} weights of its \w+ \("):
        load_encoder(broken)


def test_extract_predict_and_finetune_refuse_it_in_one_line(tmp_path, media, tiny_bert):
    model = str(shutil.copytree(tiny_bert, tmp_path / "bert"))
    assert main(["extract", media, "--model", model, "--out", str(tmp_path / "cache"), "-q"]) == 0
    cache = str(tmp_path / "cache" / "manifest__bert.h5")
    assert main(["probe", cache, "--out", str(tmp_path / "res"), "--probe", "ridge", "--save-classifier", "-q"]) == 0
    shutil.rmtree(model)
    _without(tiny_bert, model, lambda k: k.startswith("encoder.layer.0.output."))  # damaged after training

    done = _featx("extract", media, "--model", model, "--out", tmp_path / "cache2", "-q")
    line = _one_line(done.stderr)
    assert done.returncode == 1 and f"{model!r} lacks 4 weights" in line, done.stderr
    assert "encoder.layer.0.output.LayerNorm.bias" in line and not os.path.exists(tmp_path / "cache2" /
                                                                                 "manifest__bert.h5"), line

    done = _featx("predict", media, "--classifier", tmp_path / "res" / "classifier__bert.safetensors",
                  "--out", tmp_path / "p.csv", "-q")
    # the classifier's checkpoint fingerprint tells first that these are not the weights it was trained on
    assert done.returncode == 1 and "is not the checkpoint the classifier was trained on" in _one_line(
        done.stderr) and not os.path.exists(tmp_path / "p.csv"), done.stderr

    done = _featx("finetune", media, "--model", model, "--out", tmp_path / "ft", "--epochs", "1", "--no-save-model",
                  "-q", "--device", "cpu")
    assert done.returncode == 1 and "lacks 4 weights" in _one_line(done.stderr), done.stderr


def test_a_missing_local_folder_named_like_a_hub_id_is_called_a_missing_folder(tmp_path, media):
    """`--model mymodels/bert` where mymodels/ exists but has no bert: the folder does not exist (it blamed the
    hub); a hub id (`bert-base-uncased`, or a namespace that is no local folder) is still one the hub could not
    give, offline."""
    (tmp_path / "mymodels").mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO, HF_HOME=str(tmp_path / "hf"))  # nothing cached
    for model, expected in [("mymodels/bert", "model folder 'mymodels/bert' does not exist"),
                            ("bert-base-uncased", "the hub is unreachable or offline"),
                            ("google-bert/bert-base-uncased", "the hub is unreachable or offline")]:
        done = subprocess.run([sys.executable, "-m", "featx", "extract", media, "--model", model, "--out", "out",
                               "-q"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        line = _one_line(done.stderr)
        assert done.returncode == 1 and line.startswith("featx extract: error: ") and expected in line, line
        assert ("no folder of that name exists" in line) == (model != "mymodels/bert"), line
