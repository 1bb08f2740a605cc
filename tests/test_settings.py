"""Typed settings: each option parsed once, recipes read safely and merged under the command line."""
import os
import time

import pytest

from featx.errors import FeatxError
from featx.settings import (ExtractSettings, FinetuneSettings, FuseSettings, ProbeSettings, TrainSize,
                            build_settings, check_out_dir, check_out_file, merge, read_recipe)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg.strip(), msg
    return msg


def test_merge_command_line_wins_also_when_it_equals_the_default():
    defaults = {"seeds": 1, "train_sizes": "1.0", "fusion": "early,late,gated", "folds": 5}
    recipe = {"seeds": 3, "train_sizes": [0.25, 0.5, 1.0], "fusion": "early,late"}
    given = {"seeds": "1", "train_sizes": "1.0", "fusion": "early,late,gated"}
    assert merge(defaults, recipe, given) == {"seeds": "1", "train_sizes": "1.0", "fusion": "early,late,gated",
                                              "folds": 5}
    assert merge(defaults, recipe, {})["seeds"] == 3
    assert merge(defaults, {}, {})["folds"] == 5


def test_build_settings_types_every_value_once(tmp_path):
    recipe = tmp_path / "p.yaml"
    recipe.write_text("caches: [a.h5, sub/b.h5]\nout: res\nseeds: 3\ntrain-sizes: [0.25, 0.5, 1.0]\n"
                      "fusion: early,late\nlayers: 1,2\nweighted: true\n")
    s = build_settings(FuseSettings, {"seeds": "1", "train_sizes": "1.0", "fusion": "early,late,gated"},
                       recipe=str(recipe))
    assert s.seeds == [0] and s.train_sizes == [TrainSize("fraction", 1.0)]
    assert s.fusion == ["early", "late", "gated"] and s.layers == [1, 2] and s.weighted is True
    # relative paths in a recipe resolve against its folder
    assert s.caches == [str(tmp_path / "a.h5"), str(tmp_path / "sub" / "b.h5")] and s.out == str(tmp_path / "res")
    assert build_settings(ProbeSettings, {}, recipe=str(recipe)).seeds == [0, 1, 2]


@pytest.mark.parametrize("text,expect", [
    ("batch-size: eight", "batch-size: must be a whole number, not 'eight'"),
    ("batch_size: 2.5", "batch-size: must be a whole number"),
    ("batch-size: 0", "batch-size: must be at least 1"),
    ("batch-size: .inf", "batch-size: must be a whole number"),
    ("max-audio-seconds: fast", "max-audio-seconds: must be a number"),
    ("dtype: float64", "dtype: unknown dtype 'float64'; choose from float16, float32"),
    ("pool: max", "unknown pooling 'max'"),
    ("seq: maybe", "seq: must be true or false"),
    ("model: {a: 1}", "model must be a value or a list of values"),
    ("methd: early", "unknown key 'methd'"),
])
def test_a_bad_recipe_value_is_one_line_naming_the_key(tmp_path, text, expect):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"manifest: m.csv\nmodel: [x]\nout: o\n{text}\n")
    with pytest.raises(FeatxError) as e:
        build_settings(ExtractSettings, {}, recipe=str(recipe))
    assert expect in _one_line(e) and str(recipe) in str(e.value)


def test_the_same_value_on_the_command_line_gives_the_same_one_line_error():
    with pytest.raises(FeatxError) as e:
        build_settings(ExtractSettings, {"manifest": "m", "model": ["x"], "out": "o", "batch_size": "eight"})
    assert _one_line(e) == "--batch-size: must be a whole number, not 'eight'"


def test_seeds_zero_is_refused_everywhere():
    for cls, extra in ((ProbeSettings, {"caches": ["a.h5"], "out": "o"}),
                       (FinetuneSettings, {"manifest": "m", "model": ["x"], "out": "o"})):
        with pytest.raises(FeatxError, match="at least 1") as e:
            build_settings(cls, dict(extra, seeds="0"))
        _one_line(e)
    with pytest.raises(FeatxError, match="at least 1"):
        ProbeSettings(caches=["a.h5"], out="o", seeds=0)   # the Python API validates the same way


def test_a_repeated_seed_is_refused_in_one_line_everywhere(tmp_path, capsys):
    """`--seeds 3,3` ran seed 3 once, silently: the run had fewer seeds than the user named."""
    from featx.cli.main import main

    for cls, extra in ((ProbeSettings, {"caches": ["a.h5"], "out": "o"}),
                       (FuseSettings, {"caches": ["a.h5"], "out": "o"}),
                       (FinetuneSettings, {"manifest": "m", "model": ["x"], "out": "o"})):
        with pytest.raises(FeatxError) as e:
            build_settings(cls, dict(extra, seeds="3,7,3"))
        assert _one_line(e) == "--seeds: names seed 3 twice (3,7,3); name each seed once"
    with pytest.raises(FeatxError, match="seed 1 twice"):
        ProbeSettings(caches=["a.h5"], out="o", seeds=[1, 1])   # the Python API validates the same way
    recipe = tmp_path / "r.yaml"
    recipe.write_text("caches: [a.h5]\nout: o\nseeds: [0, 0]\n")
    with pytest.raises(FeatxError, match="seeds: names seed 0 twice"):
        build_settings(ProbeSettings, {}, recipe=str(recipe))
    capsys.readouterr()
    assert main(["probe", "a.h5", "--out", str(tmp_path / "o"), "--seeds", "3,3"]) == 1
    assert capsys.readouterr().err == "featx probe: error: --seeds: names seed 3 twice (3,3); name each seed once\n"
    assert ProbeSettings(caches=["a.h5"], out="o", seeds="3,7").seeds == [3, 7]


def test_renamed_recipe_keys_say_their_new_name(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("caches: [a.h5]\nout: o\nmethod: early,late\n")
    with pytest.raises(FeatxError, match="unknown key 'method' \\(it is now 'fusion'\\)"):
        build_settings(ProbeSettings, {}, recipe=str(recipe))
    recipe.write_text("manifest: m.csv\nmodel: [x]\nout: o\npooling: cls\n")
    with pytest.raises(FeatxError, match="it is now 'pool'"):
        build_settings(FinetuneSettings, {}, recipe=str(recipe))


def test_trust_remote_code_is_refused_in_a_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("manifest: m.csv\nmodel: [x]\nout: o\ntrust_remote_code: true\n")
    with pytest.raises(FeatxError, match="trust-remote-code can only be given on the command line") as e:
        build_settings(ExtractSettings, {}, recipe=str(recipe))
    _one_line(e)
    s = build_settings(ExtractSettings, {"manifest": "m", "model": ["x"], "out": "o", "trust_remote_code": True})
    assert s.trust_remote_code is True


def test_yaml_alias_bomb_fails_fast_with_one_line(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for k in range(1, 12):
        lines.append(f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 10) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(FeatxError, match="YAML aliases") as e:
        read_recipe(str(bomb))
    assert time.perf_counter() - t0 < 2
    _one_line(e)


def test_recipe_size_encoding_and_shape_are_one_line(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("note: " + "x" * (1 << 20) + "\n")
    with pytest.raises(FeatxError, match="larger than 1 MB") as e:
        read_recipe(str(big))
    _one_line(e)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("out: caf\xe9\n".encode("latin-1"))
    with pytest.raises(FeatxError, match="not UTF-8") as e:
        read_recipe(str(latin))
    _one_line(e)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(FeatxError) as e:
        read_recipe(str(deep))
    _one_line(e)
    for text, expect in (("- a\n- b\n", "must be a YAML mapping"), ("a: [\n", "not valid YAML"),
                         ("1: x\n", "is not a name")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(FeatxError, match=expect) as e:
            read_recipe(str(bad))
        _one_line(e)
    with pytest.raises(FeatxError, match="no such file"):
        read_recipe(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("recipe,cls", [("extract/paper.yaml", ExtractSettings), ("probe/mosi.yaml", ProbeSettings),
                                        ("probe/mosi.yaml", FuseSettings), ("probe/low_resource.yaml", ProbeSettings),
                                        ("probe/finetune.yaml", FinetuneSettings),
                                        ("featx/demo/recipes/extract.yaml", ExtractSettings),
                                        ("featx/demo/recipes/probe.yaml", ProbeSettings),
                                        ("featx/demo/recipes/probe.yaml", FuseSettings)])
def test_the_repos_recipes_are_accepted_by_their_commands(recipe, cls):
    s = build_settings(cls, {}, recipe=os.path.join(REPO, recipe))
    assert os.path.isabs(s.out)


def test_out_checks(tmp_path):
    f = tmp_path / "f.csv"
    f.write_text("id\n")
    with pytest.raises(FeatxError, match="is a file"):
        check_out_dir(str(f))
    assert check_out_dir(str(tmp_path / "new")) and check_out_dir(str(tmp_path))
    with pytest.raises(FeatxError, match="is a folder"):
        check_out_file(str(tmp_path))
    with pytest.raises(FeatxError, match="overwrite the input"):
        check_out_file(str(f), inputs=[str(f)])
    with pytest.raises(FeatxError, match="overwrite the input"):
        check_out_file(os.path.join(str(tmp_path), ".", "f.csv"), inputs=[str(f)])
    assert check_out_file(str(tmp_path / "g.csv"), inputs=[str(f)])


def test_the_python_api_parses_with_the_command_line_options_defaults_and_checks(tmp_path):
    from featx.extraction import extract
    from featx.finetune import FinetuneSettings as FinetuneRun
    from featx.finetune import HeadSettings, finetune
    from featx.probing.sweep import SweepSettings, run_probe
    from featx.settings import defaults_of

    # one declaration: the library's settings are the command line's options plus what follows from them
    assert issubclass(FinetuneRun, FinetuneSettings) and issubclass(SweepSettings, ProbeSettings)
    head = vars(HeadSettings())
    assert head == {k: defaults_of(FinetuneSettings)["pool" if k == "pooling" else k] for k in head}
    # values the old library functions took without a check (a negative dropout, a stride of 0, "maybe")
    with pytest.raises(FeatxError, match="--dropout must be at least 0"):
        finetune(str(tmp_path / "m.csv"), ["x"], tmp_path / "o", dropout=-0.5)
    with pytest.raises(FeatxError, match="--seq-stride must be at least 1"):
        extract(tmp_path / "m.csv", ["x"], tmp_path / "o", seq_stride=0)
    with pytest.raises(FeatxError, match="--weighted must be true or false"):
        run_probe([str(tmp_path / "a.h5")], tmp_path / "o", weighted="maybe")
    assert not os.path.exists(tmp_path / "o")


def test_max_image_pixels_and_cka_pairs_are_options_with_one_default():
    from featx.settings import MAX_IMAGE_PIXELS, ReportSettings, build_settings, parse_cka_pairs

    base = {"manifest": "m.csv", "model": ["x"], "out": "o"}
    assert build_settings(ExtractSettings, base).kwargs()["max_image_pixels"] == MAX_IMAGE_PIXELS
    assert build_settings(ExtractSettings, dict(base, max_image_pixels="1500")).kwargs()["max_image_pixels"] == 1500
    with pytest.raises(FeatxError, match="max-image-pixels"):
        build_settings(ExtractSettings, dict(base, max_image_pixels="many"))
    assert parse_cka_pairs("a.h5:b.h5, text:audio") == [("a.h5", "b.h5"), ("text", "audio")]
    assert parse_cka_pairs("ALL") == "all" and parse_cka_pairs(None) is None
    with pytest.raises(FeatxError, match="A:B"):
        parse_cka_pairs("lonely")
    r = build_settings(ReportSettings, {"results": ["r"], "out": "o", "cka_pairs": "text:audio"})
    assert r.kwargs()["cka_pairs"] == [("text", "audio")]
