"""The report stage end to end on synthetic results directories: files, numbers, figures, notes, CLI, CKA."""
import dataclasses
import os
import re
import shutil
import subprocess

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from _report_fixtures import make_results_dir, write_cache
from featx.cli.main import main
from featx.errors import FeatxError
from featx.report import build_report, cka_matrix
from featx.report import plots
from featx.probing.results import derive_best_layers, load_results
from featx.report.results import SUMMARY_COLUMNS, findings, summary_table

matplotlib.use("Agg")
RANDOM_NOTE = "CLIP-ViT and WavLM here are randomly initialised tiny models."


def _caches(folder):
    """Two caches over overlapping items in different orders; returns (path_a, path_b, pooled_a, ids_a)."""
    rng = np.random.default_rng(0)
    n = 40
    Z = rng.normal(size=(n, 6))
    pooled_a = np.stack([np.tanh(Z @ rng.normal(size=(6, 16)) * (l + 1) / 3) for l in range(5)], axis=1)
    ids_a = np.array([f"clip{i:03d}" for i in range(n)])
    a = write_cache(os.path.join(folder, "text.h5"), ids_a, pooled_a, model="bert-base-uncased")
    # Cache b: the same items shuffled, a few not done, and one extra item; each layer an orthogonal map of a's.
    order = rng.permutation(n)
    Q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    pooled_b = np.concatenate([2.0 * pooled_a[order] @ Q, rng.normal(size=(1, 5, 16))])
    ids_b = np.concatenate([ids_a[order], ["only-in-b"]])
    done_b = np.ones(n + 1, bool)
    done_b[:3] = False
    b = write_cache(os.path.join(folder, "audio.h5"), ids_b, pooled_b, done=done_b,
                    model="/models/wavlm-tiny-random", modality="audio")
    return a, b, pooled_a, ids_a, set(ids_b[done_b])


@pytest.fixture(scope="module")
def mosi(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mosi")
    a, b, *_ = _caches(str(folder))
    results = make_results_dir(str(folder / "mosi"), notes=[RANDOM_NOTE],
                               caches=[a, b, str(folder / "missing.h5")])
    paths = build_report([results], str(folder / "report"), notes=["Synthetic numbers <for tests>."])
    return load_results(results), paths


def test_report_writes_self_contained_html_markdown_and_pngs(mosi):
    res, paths = mosi
    html = open(paths["html"], encoding="utf-8").read()
    md = open(paths["md"], encoding="utf-8").read()
    names = [os.path.basename(p) for p in paths["pngs"]]
    assert {"mosi_layers_mae.png", "mosi_layers_other_metrics.png", "mosi_layer_weights.png",
            "mosi_learning_mae.png"} <= set(names)
    # Every PNG is embedded; nothing is loaded from elsewhere.
    assert html.count('src="data:image/png;base64,') == len(paths["pngs"])
    assert not re.search(r'(src|href)="(?!data:)', html)
    for p in paths["pngs"]:
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 300 and img.shape[1] > 300
        assert f"]({os.path.relpath(p, os.path.dirname(paths['md']))})" in md
    # Notes at the top, escaped, before the summary.
    assert html.index(RANDOM_NOTE) < html.index("<h2>Summary")
    assert "Synthetic numbers &lt;for tests&gt;." in html
    assert md.index(RANDOM_NOTE) < md.index("## Summary")
    assert "cache not found: " in html and "missing.h5" in html


def test_summary_numbers_come_from_best_layers(mosi):
    res, paths = mosi
    best = pd.read_csv(os.path.join(res.path, "best_layers.csv"))
    bert = best[(best["encoder"] == "bert-base-uncased") & (best["metric"] == "mae")].iloc[0]
    table = summary_table(res)
    row = table[table["encoder"] == "bert-base-uncased"].iloc[0]
    assert list(table["metric"].unique()) == ["mae"]
    assert row["best layer"] == bert["best_layer"]
    # MAE: lower is better, so the signed gain is output minus best.
    assert row["best minus output"] == pytest.approx(bert["output_layer_value"] - bert["best_value"])
    fused = table[table["encoder"] == "V+A+T"].iloc[0]
    assert pd.isna(fused["best layer"]) and fused["fusion"] == pytest.approx(
        best[(best["encoder"] == "V+A+T") & (best["metric"] == "mae")]["fusion_value"].iloc[0])
    md = open(paths["md"], encoding="utf-8").read()
    line = next(l for l in md.splitlines() if l.startswith("| bert-base-uncased | text | MAE |"))
    assert f"| {int(bert['best_layer'])} | {bert['best_value']:.3f} | {bert['output_layer_value']:.3f} |" in line
    said = findings(res)
    assert any(s.startswith(f"bert-base-uncased: layer {int(bert['best_layer'])} beats the output layer on MAE")
               for s in said)
    assert [s for s in said if s.startswith("Fusion")] == [
        f"Fusion (V+A+T) reaches MAE {fused['fusion']:.3f}, against {bert['best_value']:.3f} for the best single "
        f"encoder on dev (bert-base-uncased, layer {int(bert['best_layer'])}), better by "
        f"{bert['best_value'] - fused['fusion']:.3f}."]
    # Probe runs repeat the chosen fusion's value on each encoder's row: still one sentence.
    repeated = dataclasses.replace(res, best_layers=res.best_layers.assign(
        fusion_score=res.best_layers["fusion_score"].max()))
    assert len([s for s in findings(repeated) if s.startswith("Fusion (the fused model)")]) == 1


def test_best_layers_derived_from_rows_match_the_probe_file(mosi):
    """Without best_layers.csv the reader applies the writer's rule (best_layer_table): the same primary-metric
    choice, and the fusion method best on dev."""
    res, _ = mosi
    derived = derive_best_layers(res).set_index(["encoder", "metric"]).sort_index()
    written = res.best_layers.set_index(["encoder", "metric"]).sort_index()
    single = [k for k in written.index[written["best_layer_score"].notna()] if k[1] == "mae"]
    assert len(single) == 3
    pd.testing.assert_series_equal(derived.loc[single, "best_dev_layer"].astype(int),
                                   written.loc[single, "best_dev_layer"].astype(int))
    for col in ("best_layer_score", "output_layer_score", "weighted_score"):
        np.testing.assert_allclose(derived.loc[single, col], written.loc[single, col])
    rows = res.rows[(res.rows["train_size"] == "1.0") & (res.rows["metric"] == "mae")]
    dev = rows[rows["method"].str.startswith("fusion") & (rows["split"] == "dev")].groupby("method")["value"].mean()
    assert set(derived["fusion_method"]) == {dev.idxmin()}
    test = rows[(rows["method"] == dev.idxmin()) & (rows["split"] == "test")]["value"].mean()
    np.testing.assert_allclose(derived.loc[single, "fusion_score"], test)


def _drawn(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def test_layer_curve_figure_marks_best_layer_and_chance(mosi):
    res, _ = mosi
    fig = plots.plot_layer_curves(res, "mae")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "layer" and ax.get_ylabel() == "MAE, lower is better"
    lines = {l.get_label().split(" (")[0]: l for l in ax.get_lines() if not l.get_label().startswith("_")}
    bert = lines["bert-base-uncased"]
    np.testing.assert_array_equal(bert.get_xdata(), np.arange(13))
    rows = res.rows[(res.rows["encoder"] == "bert-base-uncased") & (res.rows["metric"] == "mae")
                    & (res.rows["split"] == "test") & (res.rows["method"] == "layer") & (res.rows["train_size"] == "1.0")]
    np.testing.assert_allclose(bert.get_ydata(), rows.groupby("layer")["value"].mean())
    best = int(res.best_layers.query("encoder == 'bert-base-uncased' and metric == 'mae'")["best_dev_layer"].iloc[0])
    stars = [l for l in ax.get_lines() if l.get_marker() == "*" and l.get_color() == bert.get_color()]
    assert len(stars) == 1 and stars[0].get_xdata()[0] == best
    assert stars[0].get_ydata()[0] == pytest.approx(bert.get_ydata()[best])
    chance = [l for l in ax.get_lines() if l.get_label().startswith("chance")]
    assert chance and chance[0].get_ydata()[0] == pytest.approx(res.meta["chance"]["mae"])
    assert any(l.get_label().startswith("fusion-late V+A+T") for l in ax.get_lines())
    # The legend sits outside the data area.
    renderer = _drawn(fig)
    legend_box = fig.legends[0].get_window_extent(renderer)
    assert not legend_box.overlaps(ax.get_window_extent(renderer))


def test_relative_depth_puts_every_encoder_on_zero_to_one(mosi):
    res, _ = mosi
    fig = plots.plot_layer_curves(res, ["corr", "acc7"], relative_depth=True)
    assert len([a for a in fig.axes if a.get_visible()]) == 2
    for ax in fig.axes:
        assert ax.get_xlabel().startswith("relative depth")
        encoder_lines = [l for l in ax.get_lines() if l.get_marker() == "o"]
        assert len(encoder_lines) == 3
        for line in encoder_lines:
            x = np.asarray(line.get_xdata())
            assert x[0] == 0 and x[-1] == pytest.approx(1.0)


def test_learning_curves_and_layer_weights(mosi):
    res, _ = mosi
    fig = plots.plot_learning_curves(res, "mae")
    titles = [a.get_title() for a in fig.axes if a.get_visible()]
    assert titles == ["clip-vit-tiny-random (vision)", "wavlm-tiny-random (audio)", "bert-base-uncased (text)",
                      "V+A+T (multimodal)"]
    labels = [t.get_text() for t in fig.axes[2].get_legend().get_texts()]
    assert "weighted sum" in labels and "output layer (12)" in labels
    assert any(l.startswith("best layer (") for l in labels)
    fig = plots.plot_layer_weights(res)
    heights = [p.get_height() for p in fig.axes[2].patches]
    w = res.layer_weights[res.layer_weights["encoder"] == "bert-base-uncased"]
    assert sorted(w["train_size"].unique()) == ["0.1", "0.25", "0.5", "1.0"]
    # The bars are the full-data weights, not a mean over every training size.
    np.testing.assert_allclose(heights, w[w["train_size"] == "1.0"].groupby("layer")["weight"].mean())
    assert not np.allclose(heights, w.groupby("layer")["weight"].mean(), atol=1e-3)
    assert "at the full training part;" in " ".join(fig.get_suptitle().split())


def test_minimal_results_dir_without_optional_files(tmp_path):
    """Classification, cross-validation only, one training size, no fusion / weights / best_layers / meta notes,
    parquet instead of csv, and no modality column."""
    d = make_results_dir(str(tmp_path / "cls"), task="classification", train_sizes=(1.0,), splits=("cv",),
                         fusion=False, weights=False, best_layers=False)
    df = pd.read_parquet(os.path.join(d, "results.parquet")).drop(columns=["modality", "probe"])
    df.to_parquet(os.path.join(d, "results.parquet"))
    os.remove(os.path.join(d, "results.csv"))
    res = load_results(d)
    assert res.eval_split == "cv" and res.selection_split == "cv" and res.layer_weights is None
    assert plots.plot_learning_curves(res, "acc") is None and plots.plot_layer_weights(res) is None
    paths = build_report(d, str(tmp_path / "out"), relative_depth=True)
    assert [os.path.basename(p) for p in paths["pngs"]] == ["cls_layers_acc.png", "cls_layers_other_metrics.png"]
    html = open(paths["html"], encoding="utf-8").read()
    assert "chosen on cv" in html and "CKA skipped" in html and 'class="notes"' not in html


def test_same_named_results_dirs_are_told_apart(tmp_path):
    a = make_results_dir(str(tmp_path / "run1" / "res"), task="classification", train_sizes=(1.0,),
                         fusion=False, weights=False, encoders=[("bert", "text", 2, 1, 0.5)])
    b = make_results_dir(str(tmp_path / "run2" / "res"), task="classification", train_sizes=(1.0,),
                         fusion=False, weights=False, encoders=[("bert", "text", 2, 1, 0.6)], seed=1)
    paths = build_report([a, b], str(tmp_path / "out"), cka=False)
    assert sorted(os.path.basename(p) for p in paths["pngs"] if "layers_acc" in p) == [
        "run1-res_layers_acc.png", "run2-res_layers_acc.png"]
    md = open(paths["md"], encoding="utf-8").read()
    assert "| run1/res | bert | text | accuracy |" in md and "| run2/res | bert | text | accuracy |" in md


def test_results_dirs_that_share_their_parent_names_too_keep_figures_of_their_own(tmp_path):
    """x/a/res and y/a/res: one parent folder added was not enough (both were named a/res, and the second's
    figures overwrote the first's); names grow as featx.naming.display_names does."""
    dirs = [make_results_dir(str(tmp_path / top / "a" / "res"), task="classification", train_sizes=(1.0,),
                             fusion=False, weights=False, encoders=[("bert", "text", 2, 1, peak)], seed=seed)
            for top, peak, seed in (("x", 0.5, 0), ("y", 0.6, 1))]
    paths = build_report(dirs, str(tmp_path / "out"), cka=False)
    assert sorted(os.path.basename(p) for p in paths["pngs"] if "layers_acc" in p) == [
        "x-a-res_layers_acc.png", "y-a-res_layers_acc.png"]
    md = open(paths["md"], encoding="utf-8").read()
    assert "| x/a/res | bert | text | accuracy |" in md and "| y/a/res | bert | text | accuracy |" in md


def test_cli_report(tmp_path, capsys):
    d = make_results_dir(str(tmp_path / "res"), task="classification", train_sizes=(1.0,), fusion=False,
                         weights=False, encoders=[("bert", "text", 2, 1, 0.5)])
    out = tmp_path / "out"
    assert main(["report", d, "--out", str(out), "--no-cka", "--note", "bert is random", "--note", "second"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "report.html"), str(out / "summary.md")]
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<p>bert is random</p><p>second</p>" in html and "Representation similarity" not in html
    assert main(["report", str(tmp_path), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("featx report: error:") and "no results.csv" in err and "\n" not in err
    with pytest.raises(FeatxError, match="lacks the column"):
        pd.DataFrame({"encoder": ["x"], "layer": [0]}).to_csv(tmp_path / "results.csv", index=False)
        load_results(tmp_path)


def test_cache_cka_aligns_items_by_id(tmp_path):
    from featx.report import cache_cka

    a, b, pooled_a, ids_a, done_b = _caches(str(tmp_path))
    common = np.isin(ids_a, list(done_b))
    cross = cache_cka(a, b, debiased=True)
    assert cross.num_items == common.sum() == 37 and cross.matrix.shape == (5, 5)
    # b is a (shuffled) orthogonal map of a, so a-vs-b equals a-vs-a over the shared items.
    np.testing.assert_allclose(cross.matrix, cka_matrix(pooled_a[common], debiased=True), atol=1e-5)
    within = cache_cka(a, debiased=False)
    assert within.within and within.num_items == 40
    np.testing.assert_allclose(within.matrix, cka_matrix(pooled_a), atol=1e-5)


def test_report_has_cka_heatmaps(mosi):
    _, paths = mosi
    names = sorted(os.path.basename(p) for p in paths["pngs"] if "cka" in p)
    assert names == ["cka_audio.png", "cka_text.png", "cka_text__audio.png"]


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium to render the HTML")
def test_html_renders_in_headless_chromium(mosi, tmp_path):
    _, paths = mosi
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2400",
                    "file://" + paths["html"]], check=True, timeout=120, capture_output=True)
    img = matplotlib.image.imread(str(shot))[..., :3]
    assert img.shape[:2] == (2400, 1280)
    top = (img[:400] * 255).round().astype(int)
    # The notes box (background #fff4d6) is drawn near the top; the figures below are not blank.
    assert (np.abs(top - [0xff, 0xf4, 0xd6]).sum(-1) <= 3).sum() > 20000
    assert img[800:].std() > 0.1


# ------------------------------------------------------------------------------------------ finetune beside probes
def _text_manifest(folder, n=30):
    """Texts of featx.demo.tiny's vocabulary, label = the sentiment word's class; splits train/dev/test."""
    pos, neg = "good great happy love fun wonderful".split(), "bad awful sad hate boring terrible".split()
    rows = [{"id": f"t{i}", "text": f"the movie was {(pos if i % 2 else neg)[i % 6]}",
             "label": "pos" if i % 2 else "neg", "split": ["train", "train", "train", "dev", "test"][i % 5]}
            for i in range(n)]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "manifest.csv")
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_bert):
    """A real `featx finetune` results folder: tiny BERT cut at its last layer (2), two training sizes."""
    import torch

    from featx.finetune import finetune

    d = tmp_path_factory.mktemp("ft")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on two busy cores: one thread is far faster
    try:
        finetune(_text_manifest(str(d / "data")), [tiny_bert], str(d / "ft"), layers=["last"], epochs=2,
                 train_sizes=[0.5, 1.0], batch_size=8, lr=1e-3, progress=False, save_model=False)
    finally:
        torch.set_num_threads(threads)
    return str(d / "ft")


def _finetune_score(ft_dir, metric):
    rows = pd.read_csv(os.path.join(ft_dir, "results.csv"))
    sel = rows[(rows["metric"] == metric) & (rows["split"] == "test") & (rows["train_size"] == 1.0)]
    assert len(sel) == 1 and set(sel["method"]) == {"finetune"} and sel["layer"].item() == 2
    return sel["value"].item()


def test_report_lists_finetune_rows_beside_probe_rows(finetuned, tiny_bert, tmp_path, capsys):
    probe = make_results_dir(str(tmp_path / "probe"), task="classification", train_sizes=(0.5, 1.0),
                             encoders=[(tiny_bert, "text", 2, 1, 0.5)], fusion=False)
    out = tmp_path / "out"
    assert main(["report", probe, finetuned, "--out", str(out), "--no-cka"]) == 0
    capsys.readouterr()
    md = (out / "summary.md").read_text(encoding="utf-8")
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "## Summary: best layer vs output layer vs weighted sum vs fusion vs fine-tuning" in md
    header = next(l for l in md.splitlines() if l.startswith("| results |"))
    assert header.endswith("| weighted sum | fusion method | fusion | fine-tuned |")
    # The finetune row: its test score at the full training size (not the mean with size 0.5), method finetune.
    acc, f1 = _finetune_score(finetuned, "acc"), _finetune_score(finetuned, "f1_macro")
    label = "tiny-bert finetune-concat (layer 2)"   # the display name; the path is in meta.json
    for metric, value in (("accuracy", acc), ("macro F1", f1)):
        assert f"| ft | {label} | text | {metric} | – | – | – | – | – | – | – | {value:.3f} |" in md
        assert f"<td>{value:.3f}</td>" in html
    # The probe rows of the same page keep their numbers and show '–' for fine-tuning.
    best = pd.read_csv(os.path.join(probe, "best_layers.csv")).query("metric == 'acc'").iloc[0]
    probe_row = next(l for l in md.splitlines() if l.startswith(f"| probe | {tiny_bert} | text | accuracy |"))
    assert f"| {int(best['best_layer'])} | {best['best_value']:.3f} |" in probe_row and probe_row.endswith("| – |")
    # Score-vs-layer plots for the probe folder only; the finetune folder gets its learning curve and a note.
    names = {os.path.basename(p.split("](")[1].rstrip(")")) for p in md.splitlines() if p.startswith("![")}
    assert {"probe_layers_acc.png", "probe_learning_acc.png", "ft_learning_f1_macro.png"} <= names
    assert not [n for n in names if n.startswith("ft_layers")]
    assert "## ft: fine-tuned model" in md
    table = summary_table(load_results(finetuned), ["acc"])
    assert table["fine-tuned"].tolist() == [pytest.approx(acc)] and table["best layer"].isna().all()


def test_a_finetune_folder_without_the_full_training_part_is_labelled_with_its_size(finetuned, tmp_path):
    """A finetune folder written before finetune added the full training part (1.0) holds only the sizes asked
    for: the report names the size its scores really have, never "the full training part"."""
    old = tmp_path / "ft"
    shutil.copytree(finetuned, old)
    rows = pd.read_csv(old / "results.csv", dtype={"train_size": str})
    rows[rows["train_size"] == "0.5"].to_csv(old / "results.csv", index=False)
    if (old / "results.parquet").exists():
        (old / "results.parquet").unlink()
    n = int(rows.loc[rows["train_size"] == "0.5", "train_labels"].iloc[0])
    build_report([str(old)], str(tmp_path / "report"), cka=False)
    text = (tmp_path / "report" / "summary.md").read_text()
    assert f"ft: no run at the full training part; its scores are at training size 0.5 ({n} labels)." in text
    assert "scores at the full training size" not in text
    assert f"test scores at training size 0.5 ({n} labels) (epoch chosen on dev)" in text


def test_single_probe_folder_report_has_no_finetune_column(mosi):
    res, paths = mosi
    assert list(summary_table(res).columns) == SUMMARY_COLUMNS and not res.has_finetune
    md = open(paths["md"], encoding="utf-8").read()
    assert "fine-tuned" not in md and "## Summary: best layer vs output layer vs weighted sum vs fusion\n" in md


def test_finetune_rows_in_a_probe_table_leave_the_layer_plots_alone(finetuned, tiny_bert, tmp_path):
    """Finetune rows appended to a probe's results.csv (layers 0..1 probed; the model was cut at layer 2)."""
    d = make_results_dir(str(tmp_path / "both"), task="classification", train_sizes=(0.5, 1.0),
                         encoders=[(tiny_bert, "text", 1, 1, 0.5)], fusion=False, weights=False)
    probe_rows = pd.read_csv(os.path.join(d, "results.csv"))
    both = pd.concat([probe_rows, pd.read_csv(os.path.join(finetuned, "results.csv"))], ignore_index=True)
    both.to_csv(os.path.join(d, "results.csv"), index=False)
    os.remove(os.path.join(d, "results.parquet"))
    res = load_results(d)
    assert res.has_finetune and res.last_layer(tiny_bert, "text") == 1
    acc = _finetune_score(finetuned, "acc")
    ax = plots.plot_layer_curves(res, "acc", relative_depth=True).axes[0]
    curve = next(l for l in ax.get_lines() if l.get_marker() == "o")
    np.testing.assert_allclose(curve.get_xdata(), [0.0, 1.0])
    flat = [l for l in ax.get_lines() if l.get_label().startswith("finetune tiny-bert")]
    assert len(flat) == 1 and flat[0].get_ydata()[0] == pytest.approx(acc)
    lc = plots.plot_learning_curves(res, "acc")
    labels = [t.get_text() for t in lc.axes[0].get_legend().get_texts()]
    assert "output layer (1)" in labels or "best = output layer (1)" in labels
    table = summary_table(res, ["acc"])
    assert table["encoder"].tolist() == [tiny_bert, "tiny-bert finetune-concat (layer 2)"]
    assert pd.isna(table["fine-tuned"][0]) and table["fine-tuned"][1] == pytest.approx(acc)
    paths = build_report(d, str(tmp_path / "out"), cka=False)
    assert any(p.endswith("both_layers_acc.png") for p in paths["pngs"])


def test_report_refuses_a_folder_that_is_not_results_in_one_line(tmp_path, capsys):
    good = make_results_dir(str(tmp_path / "res"), task="classification", train_sizes=(1.0,), fusion=False,
                            weights=False, encoders=[("bert", "text", 2, 1, 0.5)])
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    bad_csv = tmp_path / "bad"
    bad_csv.mkdir()
    (bad_csv / "results.csv").write_text("encoder,layer\n\"bert,0\n")
    for other, said in ((tmp_path / "empty", "is not a featx results directory"),
                        (tmp_path / "file.txt", "is not a directory"),
                        (bad_csv, "cannot read results")):
        assert main(["report", good, str(other), "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("featx report: error:") and said in err and err.count("\n") == 1, err


def test_report_plots_the_full_data_weights_of_a_real_probe_run(tmp_path, one_torch_thread):
    from _synthetic import planted, standard_splits, write_cache as write_planted
    from featx.probing.sweep import run_probe

    ids, splits = [f"i{i}" for i in range(200)], standard_splits(200)
    X, y = planted(n=200, num_layers=4, dim=8, k=3, seed=4)
    Xb, _ = planted(n=200, num_layers=3, dim=8, k=1, seed=5)
    a = write_planted(tmp_path / "a.h5", X, ids, y, splits, model="toy/a")
    b = write_planted(tmp_path / "b.h5", Xb, ids, y, splits, model="toy/b", modality="audio")
    run_probe([a, b], tmp_path / "res", probe="batched", weighted=True, fusion=["gated"], fusion_layer="weighted",
              train_sizes=[0.1, 1.0], seeds=2, progress=False)
    res = load_results(tmp_path / "res")
    w = res.layer_weights
    assert sorted(w["train_size"].unique()) == ["0.1", "1.0"] and set(w["method"]) == {"weighted", "fusion-gated"}
    fig = plots.plot_layer_weights(res)
    # One panel per encoder and method: the weighted sum's and the gated fusion's weights are not averaged.
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["toy/a (text)\nweighted", "toy/b (audio)\nweighted", "toy/a (text)\nfusion-gated",
                      "toy/b (audio)\nfusion-gated"]
    heights = [p.get_height() for p in fig.axes[0].patches]
    wa = w[(w["encoder"] == "toy/a") & (w["method"] == "weighted")]
    np.testing.assert_allclose(heights, wa[wa["train_size"] == "1.0"].groupby("layer")["weight"].mean())
    assert int(np.argmax(heights)) == 3
    # A layer_weights.csv from before train_size / method: every row of an encoder is plotted, as before.
    pd.read_csv(tmp_path / "res" / "layer_weights.csv").drop(columns=["train_size", "method"]).to_csv(
        tmp_path / "res" / "layer_weights.csv", index=False)
    old = load_results(tmp_path / "res")
    heights = [p.get_height() for p in plots.plot_layer_weights(old).axes[0].patches]
    np.testing.assert_allclose(heights, w[w["encoder"] == "toy/a"].groupby("layer")["weight"].mean())


def test_a_best_layer_that_is_the_output_layer_is_said_so(mosi):
    res, _ = mosi
    b = res.best_layers.copy()
    bert = (b["encoder"] == "bert-base-uncased")
    last = res.last_layer("bert-base-uncased", b.loc[bert, "modality"].iloc[0])
    b.loc[bert, "best_dev_layer"] = last
    b.loc[bert, "best_layer_score"] = b.loc[bert, "output_layer_score"]
    said = findings(dataclasses.replace(res, best_layers=b))
    mine = [s for s in said if s.startswith("bert-base-uncased:")]
    assert mine == [f"bert-base-uncased: the layer chosen on dev is the output layer ({last}), MAE "
                    f"{b.loc[bert & (b['metric'] == 'mae'), 'output_layer_score'].iloc[0]:.3f}."]


def test_fusion_is_compared_with_the_single_encoder_best_on_dev_not_on_test(tmp_path):
    """The fusion sentence took "the best single encoder" by its test score (tiny-wavlm, test MAE 0.769) although
    MiniLM was best on dev (0.684 vs 0.768): selection on test. Now the encoder is chosen on dev, as its layer and
    the fusion method are, and its test score is the one compared."""
    rows = []
    for enc, mod, dev, test in (("enc-a", "text", (1.3, 1.0), (1.4, 1.2)), ("enc-b", "audio", (1.4, 1.1), (1.5, 0.8))):
        for layer in range(2):
            for split, value in (("dev", dev[layer]), ("test", test[layer])):
                rows.append(dict(encoder=enc, modality=mod, num_layers=2, layer=layer, pooling="mean", probe="ridge",
                                 method="layer", train_size="1.0", train_labels=30.0, seed=0, split=split,
                                 metric="mae", value=value))
    for split, value in (("dev", 0.9), ("test", 1.0)):
        rows.append(dict(encoder="enc-a+enc-b", modality="text+audio", num_layers=-1, layer=-1, pooling="mean",
                         probe="concat-ridge", method="fusion-early", train_size="1.0", train_labels=30.0, seed=0,
                         split=split, metric="mae", value=value))
    folder = tmp_path / "res"
    folder.mkdir()
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    (folder / "meta.json").write_text('{"task": "regression", "primary_metric": "mae", "higher_is_better": false}')
    said = [s for s in findings(load_results(folder)) if s.startswith("Fusion")]
    assert said == ["Fusion (early fusion, chosen on dev) reaches MAE 1.000, against 1.200 for the best single encoder "
                    "on dev (enc-a, layer 1), better by 0.200."], said


def test_sizes_that_came_to_the_same_labels_are_one_point_of_the_learning_curve(tmp_path):
    """Tables written before probe ran such sizes once hold 0.01 and 0.05 both at 2 labels with the same scores:
    drawn once, not twice at the same x."""
    from featx.report.results import learning_curves

    rows = []
    for size, labels in (("0.01", 2.0), ("0.05", 2.0), ("1.0", 36.0)):
        for layer in range(2):
            for split in ("dev", "test"):
                rows.append(dict(encoder="e", modality="text", num_layers=2, layer=layer, pooling="mean",
                                 probe="ridge", method="layer", train_size=size, train_labels=labels, seed=0,
                                 split=split, metric="mae", value=1.0 + layer / 10 + (labels < 3)))
    folder = tmp_path / "res"
    folder.mkdir()
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    lc = learning_curves(load_results(folder), "mae")
    assert sorted(lc["labels"]) == [2.0, 2.0, 36.0, 36.0] and list(lc["train_size"]).count("0.05") == 0


def test_a_report_written_again_into_its_folder_keeps_only_its_own_figures(tmp_path):
    # two results folders, then one: the second report's figures/ held the first's figures of the other folder
    dirs = [make_results_dir(str(tmp_path / name), task="classification", train_sizes=(1.0,), fusion=False,
                             weights=False, encoders=[("bert", "text", 2, 1, peak)], seed=seed)
            for name, peak, seed in (("one", 0.5, 0), ("two", 0.6, 1))]
    out = tmp_path / "out"
    first = build_report(dirs, str(out), cka=False)
    (out / "figures" / "notes.txt").write_text("mine")
    assert any("two" in os.path.basename(p) for p in first["pngs"])
    with pytest.warns(UserWarning, match="figure\\(s\\) of an earlier report, removed"):
        second = build_report(dirs[:1], str(out), cka=False)
    assert sorted(os.listdir(out / "figures")) == sorted([os.path.basename(p) for p in second["pngs"]] + ["notes.txt"])
    assert not any("two" in n for n in os.listdir(out / "figures"))


def test_scores_that_differ_are_never_shown_as_a_tie_or_minus_zero(mosi):
    """Trial 3: 'layer 1 ties with the output layer on MAE (0.205 vs 0.205)' and 'best minus output -0.000' for
    0.20497 against 0.20462 (the output layer better)."""
    from featx.report.build import _fmt

    res, _ = mosi
    b = res.best_layers.copy()
    bert = (b["encoder"] == "bert-base-uncased") & (b["metric"] == "mae")
    layer = int(b.loc[bert, "best_dev_layer"].iloc[0])
    b.loc[bert, ["best_layer_score", "output_layer_score"]] = [0.20497, 0.20462]
    near = dataclasses.replace(res, best_layers=b)
    mine = [s for s in findings(near) if s.startswith("bert-base-uncased:")]
    assert mine == [f"bert-base-uncased: layer {layer} trails the output layer on MAE (0.2050 vs 0.2046, worse by "
                    "less than 0.001)."], mine
    shown = _fmt(summary_table(near)).set_index("encoder").loc["bert-base-uncased"]
    assert shown["best minus output"] == "-0.0004" and shown["best-layer score"] == "0.205", shown
    # equal scores are a tie, with 0.000 (not -0.000)
    b.loc[bert, "best_layer_score"] = 0.20462
    tie = dataclasses.replace(res, best_layers=b)
    mine = [s for s in findings(tie) if s.startswith("bert-base-uncased:")]
    assert mine == [f"bert-base-uncased: layer {layer} ties with the output layer on MAE (0.205 vs 0.205)."], mine
    assert _fmt(summary_table(tie)).set_index("encoder").loc["bert-base-uncased", "best minus output"] == "0.000"
