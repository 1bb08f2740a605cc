"""`featx models`: the supported families as a table (text, JSON, Markdown = README's), and what featx would run
for one model from its config alone; unsupported or unreachable models fail with one line.

Run as a script, this module rewrites README's table from the registry:
    HF_HUB_OFFLINE=1 python tests/cli/test_models.py
"""
import json
import os
import re
import sys

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
BEGIN, END = "<!-- featx models --markdown: begin", "<!-- featx models --markdown: end -->"


def run(capsys, *args):
    from featx.cli.main import main

    rc = main(["models", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def config_only(folder, config):
    """A model folder holding only config.json: what `featx models MODEL` may read."""
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(str(folder))
    assert os.listdir(folder) == ["config.json"]
    return str(folder)


def readme_table(text):
    start = text.index(BEGIN)
    return text[text.index("\n", start) + 1:text.index(END)]


def write_readme():
    from featx.encoders.registry import markdown_table

    with open(README, encoding="utf-8") as f:
        text = f.read()
    new = text.replace(readme_table(text), markdown_table(), 1)
    with open(README, "w", encoding="utf-8") as f:
        f.write(new)
    return new != text


# ------------------------------------------------------------------------------------------ the list
def test_lists_every_family_as_an_aligned_table(capsys):
    from featx.encoders import families

    rc, out, err = run(capsys)
    assert rc == 0 and not err
    lines = out.splitlines()
    header = lines[0]
    starts = [header.index(c) for c in ("family", "modality", "model types", "poolings", "fine-tune", "example")]
    assert starts == sorted(starts) and len(lines) == 1 + len(families())
    for line, family in zip(lines[1:], families()):
        # every cell starts where its header does: the columns line up
        cells = [line[s:].split("  ")[0] for s in starts]
        assert cells == [family.name, family.modality, ", ".join(family.model_types), ", ".join(family.poolings),
                         "yes" if family.block_path else "no", family.example], line
        if family.note:
            assert line.endswith(family.note)


def test_json_list_gives_each_family_as_json_values(capsys):
    from featx.encoders import families

    rc, out, _ = run(capsys, "--json")
    got = json.loads(out)
    assert rc == 0 and [d["family"] for d in got] == [f.name for f in families()]
    albert = next(d for d in got if d["family"] == "albert")
    assert albert["finetune"] is False and albert["block_path"] == "" and "share weights" in albert["note"]
    siglip = next(d for d in got if d["family"] == "siglip-vision")
    assert siglip["poolings"] == ["mean"] and "siglip" in siglip["model_types"]


def test_readme_table_is_the_registrys(capsys):
    """README's "Supported models" table is generated; after adding a family regenerate it with
    `python tests/cli/test_models.py` (or paste `featx models --markdown`)."""
    from featx.encoders import families

    rc, out, _ = run(capsys, "--markdown")
    assert rc == 0
    rows = [r for r in out.splitlines() if r.startswith("| `")]
    assert [re.match(r"\| `([^`]+)`", r).group(1) for r in rows] == [f.name for f in families()]
    with open(README, encoding="utf-8") as f:
        table = readme_table(f.read())
    assert table == out, ("README.md's Supported models table differs from the registry; regenerate it with "
                          "`HF_HUB_OFFLINE=1 python tests/cli/test_models.py`")


# ------------------------------------------------------------------------------------------ one model
def test_a_model_is_described_from_its_config_alone(tmp_path, capsys):
    from transformers import BertConfig, CLIPConfig

    bert = config_only(tmp_path / "bert", BertConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4))
    rc, out, err = run(capsys, bert)
    assert rc == 0 and not err
    assert re.search(r"family\s+bert \(text\): featx.encoders.text:TextEncoder", out)
    assert re.search(r"layers\s+4 \(3 blocks", out) and re.search(r"hidden size\s+48\n", out)
    assert re.search(r"poolings\s+mean, cls\n", out) and re.search(r"fine-tune\s+yes \(blocks at encoder.layer\)", out)

    # A full CLIP checkpoint: the image tower's numbers come from its vision_config, not from the text tower's.
    clip = config_only(tmp_path / "clip", CLIPConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        text_config=dict(hidden_size=40, num_hidden_layers=5, num_attention_heads=4, intermediate_size=80)))
    rc, out, _ = run(capsys, clip, "--json")
    d = json.loads(out)
    assert rc == 0 and d["model_type"] == "clip"
    image = next(t for t in d["towers"] if t["modality"] == "image")
    assert (image["family"], image["num_layers"], image["hidden_size"]) == ("clip-vision", 3, 32)
    for tower in d["towers"]:  # every tower featx has for CLIP (a text tower too, once one is registered)
        expected = (3, 32) if tower["modality"] == "image" else (6, 40)
        assert (tower["num_layers"], tower["hidden_size"]) == expected, tower
    assert d["towers"][0]["modality"] == "image"  # the primary tower first


def test_a_family_that_cannot_be_fine_tuned_says_why(tmp_path, capsys):
    from transformers import AlbertConfig

    albert = config_only(tmp_path / "albert", AlbertConfig(hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=4, intermediate_size=64))
    rc, out, _ = run(capsys, albert)
    assert rc == 0 and re.search(r"fine-tune\s+no \(its layers share weights", out)


def test_unsupported_and_unreachable_models_fail_with_one_line(tmp_path, capsys):
    from transformers import T5Config

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "featx-nonesuch", "hidden_size": 8}))
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "featx-custom",
                                                    "auto_map": {"AutoConfig": "configuration.MyConfig"}}))
    broken = tmp_path / "broken"  # a type transformers knows, with a bad value: not called unsupported
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": "abc"}))
    known_elsewhere = config_only(tmp_path / "t5", T5Config(d_model=32, num_layers=2, num_heads=4, d_ff=64))
    from featx.encoders.registry import families_of, load_config
    from featx.errors import FeatxError

    try:
        families_of(load_config(known_elsewhere))
        cases = []   # a T5 family is registered: nothing to refuse
    except FeatxError:
        cases = [(known_elsewhere, "model type 't5' is not supported by featx")]
    cases += [(str(unknown), "model type 'featx-nonesuch'"), (str(broken), "has no usable config.json"), (str(custom), "--trust-remote-code"),
              (str(tmp_path / "misspelled") + "/", "does not exist"),
              ("featx-test-org/no-such-model", "hub is unreachable or offline")]
    for model, expected in cases:
        rc, out, err = run(capsys, model)
        lines = err.strip().splitlines()
        assert rc == 1 and not out and len(lines) == 1, (model, err)
        assert lines[0].startswith("featx models: error:") and expected in lines[0], lines[0]
    rc, _, err = run(capsys, str(unknown))
    assert "--trust-remote-code" in err  # a type nobody knows may be custom code: the flag is named
    rc, _, err = run(capsys, str(unknown), "--markdown")
    assert rc == 1 and "--markdown" in err


if __name__ == "__main__":  # rewrite README's table from the registry
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    print("README.md table " + ("updated" if write_readme() else "already up to date"))
