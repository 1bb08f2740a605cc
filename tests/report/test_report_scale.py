"""The report over many encoders stays legible and bounded: distinct colours, legends inside the figure, one CKA
summary matrix plus the pairs asked for; model names are text, never HTML, in summary.md."""
import os

import matplotlib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from _report_fixtures import make_results_dir, write_cache
from featx.errors import FeatxError
from featx.probing.results import load_results
from featx.report import build_report, plots

matplotlib.use("Agg")


def _encoders(n):
    return [(f"org/tiny-encoder-{e:02d}", "text", 3, 1 + e % 3, 0.3 + 0.01 * e) for e in range(n)]


def test_thirty_encoders_get_distinct_colours_and_a_legend_inside_the_figure(tmp_path):
    res = load_results(make_results_dir(str(tmp_path / "res"), encoders=_encoders(30), seeds=(0,),
                                        train_sizes=(1.0,), fusion=False, weights=False))
    colors = plots.encoder_colors(res)
    assert len(colors) == 30 and len(set(colors.values())) == 30
    fig = plots.plot_layer_curves(res, "mae")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    legend = fig.legends[0]
    texts = [t.get_text() for t in legend.get_texts()]
    assert sum(t.startswith("org/tiny-encoder-") for t in texts) == 30
    box = fig.bbox
    for t in legend.get_texts():
        ext = t.get_window_extent(canvas.get_renderer())
        assert box.x0 <= ext.x0 and ext.x1 <= box.x1 + 1 and box.y0 <= ext.y0 and ext.y1 <= box.y1 + 1, t.get_text()


def test_cka_is_one_summary_matrix_plus_the_pairs_asked_for(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"i{k:03d}" for k in range(40)]
    encoders = _encoders(6)
    caches = [write_cache(str(tmp_path / f"c{e}.h5"), ids, rng.standard_normal((40, 4, 8)), model=name)
              for e, (name, *_) in enumerate(encoders)]
    res = make_results_dir(str(tmp_path / "res"), encoders=encoders, seeds=(0,), train_sizes=(1.0,), fusion=False,
                           weights=False, caches=caches)
    paths = build_report([res], str(tmp_path / "rep"))
    names = sorted(os.path.basename(p) for p in paths["pngs"] if os.path.basename(p).startswith("cka_"))
    # Within each encoder, one summary matrix; no 15 pairwise figures unless asked for.
    assert names == sorted([f"cka_c{e}.png" for e in range(6)] + ["cka_summary.png"])
    paths = build_report([res], str(tmp_path / "rep2"), cka_pairs=[("c0", "org/tiny-encoder-03")])
    names = [os.path.basename(p) for p in paths["pngs"] if "__" in os.path.basename(p)]
    assert names == ["cka_c0__c3.png"]
    with pytest.raises(FeatxError, match="no cache named 'nope'"):
        build_report([res], str(tmp_path / "rep3"), cka_pairs=[("c0", "nope")])


def test_summary_matrix_matches_pairwise_cka(tmp_path):
    from featx.report.cka import cache_cka, summary_cka

    rng = np.random.default_rng(1)
    ids = [f"i{k:03d}" for k in range(30)]
    a = write_cache(str(tmp_path / "a.h5"), ids, rng.standard_normal((30, 3, 6)), model="a")
    b = write_cache(str(tmp_path / "b.h5"), ids[::-1], rng.standard_normal((30, 2, 5)), model="b")
    s = summary_cka([a, b])
    pair = cache_cka(a, b)
    assert s.matrix[0, 1] == pytest.approx(pair.matrix[-1, -1]) and s.matrix[0, 0] == pytest.approx(1.0)


def test_summary_md_escapes_html_in_model_names(tmp_path):
    evil = "<script>alert(1)</script>"
    res = make_results_dir(str(tmp_path / "res"), encoders=[(evil, "text", 3, 1, 0.4)], seeds=(0,),
                           train_sizes=(1.0,), fusion=False, weights=False)
    paths = build_report([res], str(tmp_path / "rep"), cka=False)
    md = open(paths["md"], encoding="utf-8").read()
    html = open(paths["html"], encoding="utf-8").read()
    assert "<script>" not in md and "&lt;script&gt;" in md
    assert "<script>" not in html
