"""featx.data.mmsa and `featx manifest mmsa` on a small MMSA-layout dataset: label.csv + Raw/<video_id>/<clip_id>.mp4."""
import os

import pandas as pd
import pytest

from featx.cli.main import main
from featx.errors import FeatxError
from featx.data.manifest import read_manifest
from featx.data.mmsa import missing_report, mmsa_manifest

LABELS = "".join(line + "\n" for line in [
    "video_id,clip_id,text,label,label_T,annotation,mode",
    'vidA,1,"well, it was ""great""",2.4,2.0,Positive,train',  # CSV quoting: a comma and quotes in the text
    "vidA,2,not my thing,-1.2,-0.8,Negative,valid",
    "vidB,0001,fine i guess,0.0,0.2,Neutral,test",
    "vidB,2,this clip has no video,1.0,1.0,Positive,test",
])


@pytest.fixture
def dataset(tmp_path):
    """MMSA layout with three videos present and vidB/2.mp4 missing."""
    root = tmp_path / "MOSI"
    (root / "Raw" / "vidA").mkdir(parents=True)
    (root / "Raw" / "vidB").mkdir()
    (root / "label.csv").write_text(LABELS, encoding="utf-8")
    videos = [root / "Raw" / "vidA" / "1.mp4", root / "Raw" / "vidA" / "2.mp4", root / "Raw" / "vidB" / "0001.mp4"]
    pytest.importorskip("av")
    from featx.data.video import build_tiny_video

    for v in videos:
        build_tiny_video(v, seconds=1.0, tone_hz=None)
    return root


def test_manifest_keeps_labels_splits_and_lists_the_missing_video(dataset, tmp_path):
    out = tmp_path / "out" / "manifest.csv"
    manifest, missing = mmsa_manifest(dataset / "label.csv", dataset / "Raw", out)
    assert manifest["id"].tolist() == ["vidA$_$1", "vidA$_$2", "vidB$_$0001"]  # CH-SIMS style zeros kept
    assert manifest.columns.tolist()[:5] == ["id", "text", "video", "label", "split"]
    assert {"video_id", "clip_id", "annotation", "label_T"} <= set(manifest.columns) and "mode" not in manifest
    assert manifest["split"].tolist() == ["train", "dev", "test"]
    assert manifest["label"].tolist() == [2.4, -1.2, 0.0]
    assert manifest["text"][0] == 'well, it was "great"'
    assert missing == [("vidB$_$2", str(dataset / "Raw" / "vidB" / "2.mp4"))]
    assert open(missing_report(out), encoding="utf-8").read() == f"vidB$_$2\t{dataset / 'Raw' / 'vidB' / '2.mp4'}\n"

    # Written relative to the manifest's folder, the paths resolve through featx's own manifest reader.
    assert not os.path.isabs(manifest["video"][0])
    back = read_manifest(out)
    assert back["id"].tolist() == manifest["id"].tolist()
    assert [os.path.realpath(p) for p in back["video"]] == \
           [os.path.realpath(dataset / "Raw" / v) for v in ("vidA/1.mp4", "vidA/2.mp4", "vidB/0001.mp4")]
    from featx.data.video import video_frames

    frames, _ = video_frames(back["video"][2])
    assert len(frames) == 3  # 1 s at 3 fps


def test_label_column_picks_a_modality_label(dataset, tmp_path):
    manifest, _ = mmsa_manifest(dataset / "label.csv", out=tmp_path / "m.jsonl", label_column="label_T")
    assert manifest["label"].tolist() == [2.0, -0.8, 0.2]
    assert manifest["label_M"].tolist() == [2.4, -1.2, 0.0]  # MMSA's multimodal label, kept
    assert "label_T" not in manifest
    back = pd.read_json(tmp_path / "m.jsonl", lines=True)
    assert back["label"].tolist() == [2.0, -0.8, 0.2]


def test_cli_exits_2_when_videos_are_missing_and_says_where_they_are_listed(dataset, tmp_path, capsys):
    out = str(tmp_path / "manifest.csv")
    argv = ["manifest", "mmsa", str(dataset / "label.csv"), "--raw", str(dataset / "Raw"), "--out", out]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out.strip() == f"wrote {out}: 3 items (train 1, dev 1, test 1)"
    assert captured.err.strip() == f"1 video(s) not found, left out of the manifest: listed in {out}.missing.txt"
    assert main(argv + ["--allow-missing"]) == 0

    # Once the video is there, the run is clean and the old list of missing videos is gone.
    (dataset / "Raw" / "vidB" / "2.mp4").write_bytes(b"")
    assert main(argv[:3] + ["--out", out]) == 0  # --raw defaults to Raw beside label.csv
    assert len(pd.read_csv(out)) == 4 and not os.path.exists(out + ".missing.txt")


@pytest.mark.parametrize("change, reason", [
    (lambda t: t.replace(",mode", ",split"), "no mode column"),
    (lambda t: t.replace(",valid", ",holdout"), "unknown mode value(s) ['holdout']"),
    (lambda t: t.replace("2.4,2.0", "high,2.0"), "no numeric label (lines [2])"),
    (lambda t: t.replace("vidA,2,", "vidA,1,"), "duplicate video_id/clip_id: vidA$_$1"),
])
def test_bad_labels_are_one_line_errors(dataset, tmp_path, capsys, change, reason):
    (dataset / "label.csv").write_text(change(LABELS), encoding="utf-8")
    assert main(["manifest", "mmsa", str(dataset / "label.csv"), "--out", str(tmp_path / "m.csv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("featx manifest: error:") and reason in err and err.count("\n") == 1
    assert not (tmp_path / "m.csv").exists()


def test_wrong_raw_folder_or_extension_is_an_error_not_an_empty_manifest(dataset, tmp_path):
    with pytest.raises(FeatxError, match="none of the 4 videos .* check --raw and --ext"):
        mmsa_manifest(dataset / "label.csv", dataset / "Raw", tmp_path / "m.csv", ext="avi")
    with pytest.raises(FeatxError, match="video folder not found"):
        mmsa_manifest(dataset / "label.csv", dataset / "Videos", tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()
