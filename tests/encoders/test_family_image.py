"""Every image family through featx.extract (a real manifest of PNG and JPEG files of varied sizes) against a
direct transformers forward of each single image with the checkpoint's own processor, and batch 1 vs 8."""
import os

import numpy as np
import pandas as pd
import pytest
import torch

from featx import extract, open_cache
from featx.encoders import family_of, load_config
from featx.encoders.base import quiet_libraries
from featx.errors import FeatxError
from tiny_models.image import BUILDERS, build_convnext, build_dinov2

SIZES = [(40, 30), (64, 48), (25, 70), (33, 33), (90, 20), (50, 50)]
EQUAL, BATCH = 1e-4, 1e-5
FIGURES = {}  # family -> (equivalence, batch invariance) max abs diffs, printed at the end with -s

# family -> checkpoint builder; "dinov2" and "convnext-v1" are further model types of the vit / convnext families
CHECKPOINTS = {**BUILDERS, "dinov2": build_dinov2, "convnext-v1": lambda p: build_convnext(p, v2=False)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-models")
    return {name: build(str(root / name)) for name, build in CHECKPOINTS.items()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A manifest of 6 images, PNG and JPEG alternately, of varied sizes and aspect ratios."""
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rows = []
    for k, (w, h) in enumerate(SIZES):
        name = f"im{k}.{'png' if k % 2 == 0 else 'jpg'}"
        rng = np.random.default_rng(k)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / name, quality=90)
        rows.append({"id": f"i{k}", "image": name, "label": float(k % 2)})
    pd.DataFrame(rows).to_csv(d / "m.csv", index=False)
    return str(d / "m.csv")


def _direct_forward(model_path):
    """forward(image path) -> (L tensors (T, D) of a transformers forward of that one image with the
    checkpoint's processor, what featx's `mean` covers: a (T,) bool mask, or None for all positions)."""
    import transformers

    config = load_config(model_path)
    family = family_of(config, "image")
    loader = {"clip-vision": "CLIPVisionModel", "siglip-vision": "SiglipVisionModel",
              "siglip2-vision": "Siglip2VisionModel"}.get(family.name, "AutoModel")
    with quiet_libraries():  # a full SigLIP 2 checkpoint lists its text weights as unexpected
        model = getattr(transformers, loader).from_pretrained(model_path).eval()
        processor = transformers.AutoImageProcessor.from_pretrained(model_path)
    return lambda image_path: _direct(model, processor, family, config, image_path)


def _direct(model, processor, family, config, image_path):
    from PIL import Image

    inputs = processor(images=Image.open(image_path).convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True).hidden_states
    if family.name == "convnext":
        return [h[0].flatten(1).T for h in hs], None  # (C, H, W) -> (H*W, C)
    mask = torch.ones(hs[0].shape[1], dtype=torch.bool)
    if family.name == "siglip2-vision":
        mask = inputs["pixel_attention_mask"][0].bool()
    elif family.name in ("dinov2-registers", "dinov3-vit", "beit"):
        mask[:1 + getattr(config, "num_register_tokens", 0)] = False  # class (and register) tokens
    return [h[0] for h in hs], mask


def _pools(name):
    return ["mean"] if "cls" not in family_of(load_config(name), "image").poolings else ["mean", "cls"]


@pytest.mark.parametrize("family", list(CHECKPOINTS))
def test_every_layer_equals_a_direct_forward_and_batches_do_not_change_it(family, checkpoints, images, tmp_path):
    model = checkpoints[family]
    pools = _pools(model)
    kw = dict(pool=pools, dtype="float32", device="cpu", progress=False)
    one = extract(images, [model], tmp_path / "b1", batch_size=1, **kw).paths[0]
    many = extract(images, [model], tmp_path / "b8", batch_size=8, **kw).paths[0]
    folder = os.path.dirname(images)
    equal = batch = 0.0
    with open_cache(one) as a, open_cache(many) as b:
        assert a.done.all() and a.poolings == pools
        widths = a.layer_widths or [a.hidden_size] * a.num_layers
        forward = _direct_forward(model)
        for i, row in pd.read_csv(images).iterrows():
            states, mask = forward(os.path.join(folder, row["image"]))
            assert len(states) == a.num_layers
            want = {"mean": [s.mean(0) if mask is None else s[mask].mean(0) for s in states],
                    "cls": [s[0] for s in states]}
            for p in pools:
                got = a.pooled(p)[i]
                for layer, w in enumerate(want[p]):
                    assert w.shape[0] == widths[layer]
                    equal = max(equal, float(np.abs(got[layer, :len(w)] - w.numpy()).max()))
                    assert not got[layer, len(w):].any()  # the zero padding of a narrower stage
        for p in pools:
            batch = max(batch, float(np.abs(a.pooled(p) - b.pooled(p)).max()))
    FIGURES[family] = (equal, batch)
    print(f"\n{family}: equivalence max abs diff {equal:.2e}, batch 1 vs 8 max abs diff {batch:.2e}")
    assert equal <= EQUAL and batch <= BATCH


def test_register_and_class_tokens_are_outside_the_mean(checkpoints, images, tmp_path):
    """DINOv2 with registers: the stored mean is the patch tokens' mean, far from the mean over all tokens."""
    model = checkpoints["dinov2-registers"]
    path = extract(images, [model], tmp_path / "o", pool=["mean", "cls"], dtype="float32", device="cpu",
                   progress=False).paths[0]
    states, mask = _direct_forward(model)(os.path.join(os.path.dirname(images), "im0.png"))
    assert int((~mask).sum()) == 5  # class + 4 registers
    with open_cache(path) as c:
        assert c.attrs["mean_over"] == "patch tokens" and c.attrs["prefix_tokens"] == 5
        got = c.pooled("mean")[0, -1]
        cls = c.pooled("cls")[0, -1]
    last = states[-1]
    assert np.abs(got - last[5:].mean(0).numpy()).max() <= EQUAL
    assert np.abs(got - last.mean(0).numpy()).max() > 1e-3
    assert np.abs(cls - last[0].numpy()).max() <= EQUAL


def test_siglip2_naflex_masks_the_padding_patches(checkpoints, images, tmp_path):
    """Images of other aspect ratios fill fewer than max_num_patches: their padding never enters the mean."""
    from transformers import AutoImageProcessor
    from PIL import Image

    model = checkpoints["siglip2-vision"]
    processor = AutoImageProcessor.from_pretrained(model)
    folder = os.path.dirname(images)
    valid = [int(processor(images=Image.open(os.path.join(folder, f"im{k}.{'png' if k % 2 == 0 else 'jpg'}"))
                           .convert("RGB"), return_tensors="pt")["pixel_attention_mask"].sum())
             for k in range(len(SIZES))]
    assert min(valid) < max(valid) == 16  # padded batches do occur
    path = extract(images, [model], tmp_path / "o", dtype="float32", device="cpu", progress=False).paths[0]
    k = int(np.argmin(valid))
    states, mask = _direct_forward(model)(os.path.join(folder, f"im{k}.{'png' if k % 2 == 0 else 'jpg'}"))
    with open_cache(path) as c:
        assert c.attrs["mean_over"] == "valid patches" and c.poolings == ["mean"]
        got = c.pooled("mean")[k, -1]
    assert int(mask.sum()) < 16
    assert np.abs(got - states[-1][mask].mean(0).numpy()).max() <= EQUAL
    assert np.abs(got - states[-1].mean(0).numpy()).max() > 1e-3


def test_siglip2_full_checkpoint_loads_its_vision_tower(checkpoints):
    from featx.encoders import load_encoder

    enc = load_encoder(checkpoints["siglip2-vision"])
    assert type(enc.model).__name__ == "Siglip2VisionModel" and enc.num_layers == 3


def test_convnext_refuses_seq_in_one_line_before_any_work(checkpoints, images, tmp_path):
    with pytest.raises(FeatxError, match="--seq") as e:
        extract(images, [checkpoints["convnext"]], tmp_path / "o", seq=True, device="cpu", progress=False)
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "o")


def test_unsupported_image_model_type_fails_in_one_line(tmp_path, images):
    from transformers import ResNetConfig

    folder = tmp_path / "resnet"
    ResNetConfig().save_pretrained(folder)
    with pytest.raises(FeatxError, match="model type 'resnet' is not supported") as e:
        extract(images, [str(folder)], tmp_path / "o", device="cpu", progress=False)
    assert "\n" not in str(e.value)
