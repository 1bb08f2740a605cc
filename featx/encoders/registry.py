"""The encoder-family registry: config.model_type -> the adapter that runs it, its modality and its blocks.

Adding a family is one adapter module (a subclass of featx.encoders.base.Encoder) plus one `register_family`
call naming the model types it serves; `featx extract`, `finetune` and `predict` then accept those models.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from featx.errors import FeatxError, first_line


@dataclass(frozen=True)
class Family:
    """name: short family name. model_types: the config.model_type values it serves. modality: text | image |
    audio | video (the manifest column it reads; a model type may have one family per modality, e.g. CLIP's
    image and text towers: the first registered that is not a `tower` is its primary one). adapter:
    "module:Class" of its Encoder subclass (imported only when a model of the family loads).
    block_path: dotted path of the model's list of transformer blocks (fine-tuning cuts and freezes there).
    poolings: the poolings it supports. example: a hub id, for `featx models` and the README.
    config_path: the attribute of the checkpoint's config that holds this tower's config when it has several
    (None: the modality's usual one, TOWER_CONFIGS; "": the config itself); a config without it is the tower's.
    layers_field / width_field: the (sub)config's number of blocks and hidden width (Whisper: "encoder_layers",
    "d_model"); a list (ConvNeXt's "hidden_sizes") counts its entries / takes its widest. describe_config reads
    them; fine-tuning writes the kept number of blocks back (set_num_blocks).
    tower: a second tower of its model types (CLIP's text tower): never their primary family, whatever the
    order of registration."""
    name: str
    model_types: tuple
    modality: str
    adapter: str
    block_path: str
    poolings: tuple = ("mean", "cls")
    example: str = ""
    note: str = ""
    config_path: str = None
    layers_field: str = "num_hidden_layers"
    width_field: str = "hidden_size"
    tower: bool = False

    def adapter_class(self):
        module, cls = self.adapter.split(":")
        return getattr(importlib.import_module(module), cls)


_FAMILIES: dict = {}       # name -> Family
_BY_TYPE: dict = {}        # model_type -> {modality: Family}, the primary (first registered) modality first


def register_family(family: Family) -> Family:
    """Register `family`; a (model type, modality) already served by another family is taken over by this one."""
    old = _FAMILIES.get(family.name)
    if old is not None:  # re-registering a name replaces it everywhere it served
        for t in old.model_types:
            if _BY_TYPE.get(t, {}).get(old.modality) is old:
                del _BY_TYPE[t][old.modality]
    _FAMILIES[family.name] = family
    for t in family.model_types:
        _BY_TYPE.setdefault(t, {})[family.modality] = family
        _BY_TYPE[t] = dict(sorted(_BY_TYPE[t].items(), key=lambda item: item[1].tower))  # primary first
    return family


def unregister_family(name) -> None:
    """Remove the family `name` (a plug-in's, or a test's) from every (model type, modality) it serves."""
    family = _FAMILIES.pop(name, None)
    for t in family.model_types if family else ():
        if _BY_TYPE.get(t, {}).get(family.modality) is family:
            del _BY_TYPE[t][family.modality]


def families() -> list:
    return list(_FAMILIES.values())


def families_of(config) -> list:
    """Every family serving config.model_type (one per modality: a CLIP checkpoint has an image and a text
    tower), the primary one first; FeatxError (one line) for a type no family serves."""
    kind = getattr(config, "model_type", "")
    if not _BY_TYPE.get(kind):
        raise FeatxError(f"model type {kind!r} is not supported by featx (supported: "
                         f"{', '.join(sorted(t for t, f in _BY_TYPE.items() if f))}); see `featx models`"
                         + ("" if getattr(config, "auto_map", None) is None else
                            " (its checkpoint has custom code: featx runs it only with --trust-remote-code and "
                            "an adapter registered for its model type)"))
    return list(_BY_TYPE[kind].values())


def family_of(config, modality=None) -> Family:
    """The family serving config.model_type (its primary one, or the one for `modality`); FeatxError (one line)
    for a type no family serves, or no family of that modality."""
    found = families_of(config)
    if modality is None:
        return found[0]
    for family in found:
        if family.modality == modality:
            return family
    raise FeatxError(f"model type {config.model_type!r} has no {modality} encoder in featx (it serves "
                     f"{', '.join(f.modality for f in found)})")


def modality_of(config) -> str:
    """'text', 'image', 'audio' or 'video': the modality of the model's primary family."""
    return family_of(config).modality


def block_path(config, model=None, modality=None) -> str:
    """The dotted path of the loaded model's block list (e.g. "encoder.layer") for config's family (the one of
    `modality` for a checkpoint with several towers): with
    `model`, the first of the family's alternatives that is a torch ModuleList on it, else the first one.

    FeatxError (one line) for an unsupported model type, a family whose blocks cannot be cut, or a model
    that has none of the family's block paths."""
    family = family_of(config, modality)
    if not family.block_path:
        raise FeatxError(f"model type {config.model_type!r} ({family.name}) cannot be fine-tuned by featx: "
                         f"{family.note or 'its blocks are not a list that can be cut'}")
    paths = family.block_path.split("|")
    if model is None:
        return paths[0]
    import torch

    for path in paths:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList):
            return path
    raise FeatxError(f"cannot fine-tune {type(model).__name__}: it has no block list at {' or '.join(paths)}")


# Where a multi-tower checkpoint's config keeps each modality's tower (CLIP, SigLIP, CLAP, X-CLIP).
TOWER_CONFIGS = {"text": "text_config", "image": "vision_config", "audio": "audio_config", "video": "vision_config"}


def tower_config(config, family: Family):
    """The (sub)config of `family`'s tower: config.<config_path> when the checkpoint has it (a full CLIP
    checkpoint's vision_config), else the config itself (a vision-only checkpoint)."""
    path = TOWER_CONFIGS.get(family.modality, "") if family.config_path is None else family.config_path
    return (getattr(config, path, None) if path else None) or config


def describe_config(config, family: Family) -> dict:
    """{"num_layers": L (blocks + 1: index 0 is the embedding output), "hidden_size": D (the widest layer)} of
    `family`'s tower, read from the config only (no weights), through the family's config_path, layers_field
    and width_field. FeatxError (one line) when the config lacks them."""
    sub = tower_config(config, family)
    blocks, width = getattr(sub, family.layers_field, None), getattr(sub, family.width_field, None)
    if blocks is None or width is None:
        raise FeatxError(f"model type {config.model_type!r} ({family.name}): its config has no "
                         f"{family.layers_field if blocks is None else family.width_field!r}")
    blocks = len(blocks) if isinstance(blocks, (list, tuple)) else int(blocks)
    width = max(width) if isinstance(width, (list, tuple)) else int(width)
    return {"num_layers": blocks + 1, "hidden_size": int(width)}


def set_num_blocks(config, family: Family, blocks: int) -> None:
    """Record in `config` (a model's own config) that its tower keeps `blocks` blocks (a truncated model)."""
    sub = tower_config(config, family)
    if isinstance(getattr(sub, family.layers_field, None), (list, tuple)):
        setattr(sub, family.layers_field, list(getattr(sub, family.layers_field))[:blocks])
    else:
        setattr(sub, family.layers_field, int(blocks))


def describe_model(name, config) -> dict:
    """What `featx models MODEL` reports: the model, its model type and one dict per tower (primary first):
    family, adapter, modality, num_layers, hidden_size, poolings, finetune (bool), block_path, note.
    Reads only the config; FeatxError (one line) for an unsupported model type."""
    towers = []
    for family in families_of(config):
        towers.append({"family": family.name, "adapter": family.adapter, "modality": family.modality,
                       **describe_config(config, family), "poolings": list(family.poolings),
                       "finetune": bool(family.block_path), "block_path": family.block_path, "note": family.note})
    return {"model": str(name), "model_type": config.model_type, "towers": towers}


TABLE_COLUMNS = ("family", "modality", "model types", "poolings", "fine-tune", "example", "note")


def family_info(family: Family) -> dict:
    """A family as JSON values (`featx models --json`): family, modality, model_types, poolings, finetune (bool),
    block_path, adapter, example, note."""
    f = family
    return {"family": f.name, "modality": f.modality, "model_types": list(f.model_types), "poolings": list(f.poolings),
            "finetune": bool(f.block_path), "block_path": f.block_path, "adapter": f.adapter, "example": f.example,
            "note": f.note}


def family_rows() -> list:
    """One row per registered family, in registration order: {column of TABLE_COLUMNS: text}."""
    rows = []
    for d in map(family_info, families()):
        rows.append({"family": d["family"], "modality": d["modality"], "model types": ", ".join(d["model_types"]),
                     "poolings": ", ".join(d["poolings"]), "fine-tune": "yes" if d["finetune"] else "no",
                     "example": d["example"], "note": d["note"]})
    return rows


def markdown_table() -> str:
    """The supported families as a Markdown table (README's "Supported models"; `featx models --markdown`)."""
    def cell(text, code=False):
        text = str(text).replace("|", "\\|")
        return f"`{text}`" if code and text else text

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in family_rows():
        lines.append("| " + " | ".join(cell(row[c], code=c in ("family", "example")) for c in TABLE_COLUMNS)
                     + " |")
    return "\n".join(lines) + "\n"


def _looks_like_path(name) -> bool:
    """True for a name only a folder can have: absolute, ./ ../ ~, a backslash, several '/', a trailing '/'."""
    return name.startswith(("/", os.sep, ".", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def check_model_name(name) -> None:
    """FeatxError (one line) at once for a model that is neither an existing folder nor a valid hub id: a
    misspelled folder must not be looked up on the hub (and retried) as if it were a model id."""
    name = os.fspath(name) if isinstance(name, os.PathLike) else str(name)
    if os.path.isdir(name):
        return
    if _looks_like_path(name):
        if os.path.exists(name):
            raise FeatxError(f"model {name!r} is a file, not a model folder")
        raise FeatxError(f"model folder {name!r} does not exist")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FeatxError(f"model {name!r} is neither an existing folder nor a valid hub id "
                         "(namespace/name of letters, digits, '-', '_', '.')") from None


def _folder_config_error(folder, trust_remote_code):
    """Why transformers could not load the config.json of `folder` when it names a model type (custom code, or
    a type transformers does not know), read as plain JSON; None when it names none."""
    import json

    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
        kind = raw.get("model_type") if isinstance(raw, dict) else None
    except (OSError, ValueError):
        return None
    from transformers import CONFIG_MAPPING

    if not isinstance(kind, str) or not kind or (kind in CONFIG_MAPPING and not raw.get("auto_map")):
        return None  # a type transformers knows: something else in the file is wrong
    if raw.get("auto_map") and not trust_remote_code:
        return (f"model {folder!r} (model type {kind!r}) ships its own Python code: featx loads it only with "
                "--trust-remote-code, and runs it only when a featx family serves its model type (`featx models`)")
    return (f"model type {kind!r} of {folder!r} is not supported: transformers does not know it and no featx family "
            "serves it (`featx models` lists them; a checkpoint with custom code needs --trust-remote-code)")


def load_config(name, trust_remote_code=False):
    """The checkpoint's transformers config; FeatxError (one line, naming the model) when it cannot load."""
    from transformers import AutoConfig

    check_model_name(name)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError, HTTP errors: the user needs the model name and what to do
        if os.path.isdir(str(name)):
            raise FeatxError(_folder_config_error(str(name), trust_remote_code) or
                             f"cannot load model {name!r}: the folder has no usable config.json "
                             f"({first_line(e)[:160]})")
        raise FeatxError(_not_found(str(name)))


def _not_found(name) -> str:
    """Why model `name`, a valid hub id that is no existing folder, could not be loaded: a name whose first part
    is a local folder ("mymodels/bert" where mymodels/ exists) was meant as a folder; otherwise it is either."""
    head, _, tail = name.partition("/")
    if tail and os.path.isdir(head):
        return (f"model folder {name!r} does not exist (the folder {head!r} has no {tail!r}), and no hub model of "
                "that id could be loaded either")
    return (f"cannot load model {name!r}: no folder of that name exists, and as a hub id featx found no local copy "
            "and the hub is unreachable or offline (download it while online, or pass a local folder)")


def load_encoder(name, *, config=None, device="cpu", trust_remote_code=False, precision="fp32", modality=None,
                 **settings):
    """The adapter for checkpoint `name` (hub id or local folder), its model loaded in eval mode on `device`.

    modality: which tower of a checkpoint that has several (CLIP: image or text); None: its primary one.
    precision: a resolved precision (fp32 | bf16 | fp16) for the forward's autocast.
    settings: max_length (text), max_audio_seconds (audio).
    """
    config = config or load_config(name, trust_remote_code)
    cls = family_of(config, modality).adapter_class()
    return cls(name, config=config, device=device, trust_remote_code=trust_remote_code, precision=precision,
               **settings)


# --- the families featx ships. Each modality's section is kept apart so that families are added side by side.
_TEXT = "featx.encoders.text:TextEncoder"
_IMAGE = "featx.encoders.image:ImageEncoder"
register_family(Family("bert", ("bert", "roberta", "xlm-roberta", "electra", "mpnet", "deberta", "deberta-v2",
                                "camembert"), "text", _TEXT, "encoder.layer", example="bert-large-uncased"))
register_family(Family("distilbert", ("distilbert",), "text", _TEXT, "transformer.layer",
                       example="distilbert-base-uncased"))
register_family(Family("albert", ("albert",), "text", _TEXT, "", example="albert-base-v2",
                       note="its layers share weights: extract only, no fine-tuning"))
_TEXT_MODELS = "featx.encoders.text_models"
register_family(Family("modernbert", ("modernbert",), "text", _TEXT, "layers", example="answerdotai/ModernBERT-base",
                       note="cls = [CLS]; padding masked (sdpa/eager attention on the CPU)"))
_DECODER_NOTE = ("hidden states of every layer, L-1 with the final norm applied ({}); padded on the right with "
                 "position ids 0..n-1; special tokens as the tokenizer adds them ({}); last = the last real token")
register_family(Family("gpt2", ("gpt2",), "text", f"{_TEXT_MODELS}:DecoderLMEncoder", "h",
                       poolings=("mean", "last"), example="openai-community/gpt2",
                       note=_DECODER_NOTE.format("ln_f", "none; no pad token needed")))
register_family(Family("llama", ("llama", "qwen2", "qwen3"), "text", f"{_TEXT_MODELS}:DecoderLMEncoder",
                       "layers", poolings=("mean", "last"), example="meta-llama/Llama-3.2-1B",
                       note=_DECODER_NOTE.format("norm", "Llama: BOS first; Qwen: none")))
register_family(Family("t5-encoder", ("t5", "mt5", "umt5"), "text", f"{_TEXT_MODELS}:T5EncoderText",
                       "encoder.block", poolings=("mean",), example="google-t5/t5-base",
                       note="the encoder only (T5EncoderModel); EOS </s> appended; L-1 after final_layer_norm; "
                            "no class token: mean pooling"))
register_family(Family("clip-text", ("clip", "clip_text_model"), "text", f"{_TEXT_MODELS}:CLIPTextEncoder",
                       "encoder.layers|text_model.encoder.layers", poolings=("mean", "last"),
                       example="openai/clip-vit-large-patch14", tower=True,
                       note="the text tower (causal); L-1 before final_layer_norm; last = EOS, CLIP's text "
                            "embedding token; only when the checkpoint has a tokenizer"))
register_family(Family("siglip-text", ("siglip", "siglip_text_model"), "text", f"{_TEXT_MODELS}:SiglipTextEncoder",
                       "encoder.layers|text_model.encoder.layers", poolings=("mean", "last"),
                       example="google/siglip-base-patch16-224", tower=True,
                       note="the text tower; padded to max_length (64) as trained, pooling over the real tokens; "
                            "only when the checkpoint has a tokenizer"))
register_family(Family("siglip2-text", ("siglip2", "siglip2_text_model"), "text",
                       f"{_TEXT_MODELS}:Siglip2TextEncoder",
                       "encoder.layers|text_model.encoder.layers", poolings=("mean", "last"),
                       example="google/siglip2-base-patch16-224", tower=True,
                       note="the text tower; padded to max_length (64) as its processor does, pooling over the "
                            "real tokens; only when the checkpoint has a tokenizer"))
# --- end of text families


# --- image families
register_family(Family("clip-vision", ("clip", "clip_vision_model"), "image",
                       "featx.encoders.image:CLIPVisionEncoder", "encoder.layers|vision_model.encoder.layers",
                       example="openai/clip-vit-large-patch14",
                       note="the vision tower; hidden states end before post_layernorm"))
register_family(Family("siglip-vision", ("siglip", "siglip_vision_model"), "image",
                       "featx.encoders.image:SiglipVisionEncoder", "encoder.layers|vision_model.encoder.layers",
                       poolings=("mean",), example="google/siglip-base-patch16-224",
                       note="no class token: mean pooling only"))
register_family(Family("vit", ("vit", "dinov2"), "image", _IMAGE, "encoder.layer|layers",
                       example="facebook/dinov2-base",
                       note="mean over all tokens, class token included"))
_VISION = "featx.encoders.vision"
register_family(Family("dinov2-registers", ("dinov2_with_registers",), "image", f"{_VISION}:PatchTokenEncoder",
                       "encoder.layer", example="facebook/dinov2-with-registers-base",
                       note="cls = the class token; mean over the patch tokens (class and register tokens left out)"))
register_family(Family("dinov3-vit", ("dinov3_vit",), "image", f"{_VISION}:PatchTokenEncoder", "model.layer|layer",
                       example="facebook/dinov3-vits16-pretrain-lvd1689m",
                       note="cls = the class token; mean over the patch tokens (class and register tokens left out)"))
register_family(Family("beit", ("beit",), "image", f"{_VISION}:PatchTokenEncoder",
                       "layers|encoder.layer", example="microsoft/beit-base-patch16-224-pt22k",
                       note="cls = the class token; mean over the patch tokens (class token left out)"))
register_family(Family("siglip2-vision", ("siglip2", "siglip2_vision_model"), "image",
                       f"{_VISION}:Siglip2VisionEncoder", "encoder.layers|vision_model.encoder.layers",
                       poolings=("mean",), example="google/siglip2-base-patch16-naflex",
                       note="NaFlex: no class token; mean over each image's valid patches (padding masked)"))
register_family(Family("convnext", ("convnext", "convnextv2"), "image", f"{_VISION}:ConvNextEncoder", "",
                       poolings=("mean",), layers_field="num_stages", width_field="hidden_sizes", example="facebook/convnextv2-tiny-22k-224",
                       note="stage feature maps averaged over space; stages differ in width (the cache records "
                            "layer_widths); no --seq; its stages are not a block list: extract only"))
# --- end of image families


# --- audio families
register_family(Family("wav2vec2", ("wavlm", "wav2vec2", "wav2vec2-conformer", "hubert", "data2vec-audio",
                                    "unispeech", "unispeech-sat"), "audio", "featx.encoders.audio:AudioEncoder",
                       "encoder.layers", poolings=("mean",), example="microsoft/wavlm-large",
                       note="no class token: mean pooling over the real frames; inputs of different lengths share a "
                            "padded batch only where that leaves each one's values as alone: layer-norm conv features "
                            "with the attention mask (wavlm-large, wav2vec2-large-lv60, hubert-large, "
                            "unispeech(-sat)-large); data2vec-audio, wav2vec2-conformer, group-norm (base) and "
                            "maskless checkpoints batch only equal lengths (mostly one input at a time)"))
_SPEECH = "featx.encoders.speech:"
register_family(Family("whisper", ("whisper",), "audio", _SPEECH + "WhisperEncoderAdapter", "layers",
                       poolings=("mean",), example="openai/whisper-large-v3",
                       note="the encoder; windows of at most 30 s, each padded to 30 s: mean over the positions "
                            "that cover real audio"))
register_family(Family("ast", ("audio-spectrogram-transformer",), "audio", _SPEECH + "ASTEncoder", "layers|encoder.layer",
                       example="MIT/ast-finetuned-audioset-10-10-0.4593",
                       note="windows of at most max_length fbank frames (10.24 s); cls = position 0; mean over the "
                            "patches over real audio (not the distillation token); audio longer than one window is cut "
                            "into near-equal windows: mean is over all windows' real patches, cls the mean of the "
                            "windows' class tokens, weighted by each window's real patches (near-equal weights)"))
register_family(Family("clap-audio", ("clap", "clap_audio_model"), "audio", _SPEECH + "ClapAudioEncoder", "",
                       poolings=("mean",), layers_field="depths", example="laion/clap-htsat-unfused",
                       note="the HTSAT audio tower; windows of at most max_length_s (10 s); each stage's mean over "
                            "its map (stages differ in width): extract only, no fine-tuning"))
register_family(Family("w2v-bert", ("wav2vec2-bert",), "audio", _SPEECH + "W2vBertEncoder", "encoder.layers",
                       poolings=("mean",), example="facebook/w2v-bert-2.0",
                       note="fbank input features; mean over the real frames"))
# --- end of audio families


# --- video families
_VIDEO = "featx.encoders.video"
register_family(Family("videomae", ("videomae",), "video", f"{_VIDEO}:VideoMAEEncoder", "encoder.layer",
                       poolings=("mean",), example="MCG-NJU/videomae-base",
                       note="a clip of num_frames frames; tubelet tokens, no class token: mean pooling only"))
register_family(Family("vjepa2", ("vjepa2",), "video", f"{_VIDEO}:VJEPA2Encoder", "encoder.layer",
                       poolings=("mean",), example="facebook/vjepa2-vitl-fpc64-256",
                       note="a clip of frames_per_clip frames; the encoder only (no predictor); tubelet tokens, "
                            "no class token: mean pooling only"))
register_family(Family("xclip-vision", ("xclip", "xclip_vision_model"), "video", f"{_VIDEO}:XCLIPVisionEncoder", "encoder.layers",
                       example="microsoft/xclip-base-patch32",
                       note="the vision tower over a clip of num_frames frames: mean over every token of every "
                            "frame; cls = the mean over frames of each frame's class token"))
# --- end of video families
