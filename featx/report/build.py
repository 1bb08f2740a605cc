"""build_report: results directories (probe, fuse, finetune) in, one HTML file, a Markdown summary and the PNGs out."""
from __future__ import annotations

import itertools
import os
import warnings

import pandas as pd

from featx.errors import FeatxError
from featx.report import plots
from featx.naming import cache_names, display_names, slug
from featx.report.cka import cache_cka, summary_cka
from featx.report.html import Section, write_html, write_markdown
from featx.probing.results import FIGURES, METRIC_LABELS, REPORT_HTML, REPORT_MD, figure_files, load_results
from featx.report.results import (DIFF_COLUMN, FINETUNE_COLUMN, LAYERS_COLUMN, SCORE_COLUMNS, diff_text,
                                  findings, summary_table)

TITLE = "featx layer-wise report"
# Up to this many caches, every pair gets its layer-by-layer CKA figure unless pairs are named.
MAX_CKA_PAIRS_AUTO = 4


def _fmt(table, results_name=None):
    """Numbers as text with 3 decimals for display ('best minus output' with more where a difference that is not
    zero needs them: never -0.000); prefix a 'results' column when several dirs are shown."""
    out = table.copy()
    for col in [c for c in out.columns if c in SCORE_COLUMNS or c == FINETUNE_COLUMN]:
        out[col] = out[col].map(diff_text if col == DIFF_COLUMN else lambda v: "–" if pd.isna(v) else f"{v:.3f}")
    out["fusion method"] = out["fusion method"].map(lambda v: "–" if pd.isna(v) else str(v))
    out["best layer"] = out["best layer"].map(lambda v: "–" if pd.isna(v) else str(int(v)))
    if LAYERS_COLUMN in out.columns:   # fine-tuned rows have no layers probed
        out[LAYERS_COLUMN] = out[LAYERS_COLUMN].map(lambda v: "–" if pd.isna(v) else str(v))
    out["metric"] = out["metric"].map(lambda m: METRIC_LABELS.get(m, m))
    if results_name is not None:
        out.insert(0, "results", results_name)
    return out


def _unique_names(results):
    """Each results directory named by its folder, with parent folders added where two would share a name
    (featx.naming.display_names, the one rule for names shown)."""
    for r, name in zip(results, display_names([r.path for r in results])):
        r.name = name
    return results


def _save(fig, out_dir, stem, pngs):
    path = plots.save(fig, os.path.join(out_dir, f"{slug(stem)}.png"))
    pngs.append(path)
    return path


def _result_sections(res, fig_dir, pngs, relative_depth):
    sections = []
    primary = res.primary_metric
    layer_figs = []
    fig = plots.plot_layer_curves(res, primary, relative_depth=relative_depth)
    if fig is not None:
        layer_figs.append((_save(fig, fig_dir, f"{res.name}_layers_{primary}", pngs),
                           f"{res.name}: {METRIC_LABELS.get(primary, primary)} by layer"))
    others = [m for m in res.metrics if m != primary]
    fig = plots.plot_layer_curves(res, others, relative_depth=relative_depth) if others else None
    if fig is not None:
        layer_figs.append((_save(fig, fig_dir, f"{res.name}_layers_other_metrics", pngs),
                           f"{res.name}: the other metrics by layer"))
    if not layer_figs and res.has_finetune:
        # A `featx finetune` folder: whole-model scores only, no layer axis to plot them on.
        sections.append(Section(f"{res.name}: fine-tuned model", level=2, paragraphs=[
            f"Task: {res.meta.get('task', 'unknown')}; no per-layer scores in these results. The fine-tuned "
            f"models' {res.eval_split} scores at {_headline_size(res)} (epoch chosen on dev) are in the "
            f"summary table."]))
    else:
        sections.append(Section(
            f"{res.name}: score against layer", level=2, figures=layer_figs,
            paragraphs=[f"Task: {res.meta.get('task', 'unknown')}; scores on the {res.eval_split} split at "
                        f"{_headline_size(res)}; primary metric {METRIC_LABELS.get(primary, primary)}. Stars mark the "
                        f"layer chosen on {res.selection_split}; the dashed grey line is the chance / majority "
                        "baseline" + ("; x is relative depth (layer / output layer)." if relative_depth else ".")]))
    fig = plots.plot_layer_weights(res)
    if fig is not None:
        sections.append(Section(f"{res.name}: learned layer weights", level=3, figures=[
            (_save(fig, fig_dir, f"{res.name}_layer_weights", pngs), f"{res.name}: learned layer weights")]))
    fig = plots.plot_learning_curves(res, primary)
    if fig is not None:
        sizes = ", ".join(_size_text(res, size) for size in sorted(res.rows["train_size"].unique(), key=res.labels_of))
        sections.append(Section(
            f"{res.name}: low-resource learning curves", level=3,
            paragraphs=[f"{METRIC_LABELS.get(primary, primary)} against training labels ({sizes}); the best "
                        f"and output layers are those chosen at {_headline_size(res)}."],
            figures=[(_save(fig, fig_dir, f"{res.name}_learning_{primary}", pngs),
                      f"{res.name}: learning curves ({METRIC_LABELS.get(primary, primary)})")]))
    return sections


def _headline_size(res) -> str:
    """'the full training size', or for results without a full-training-part run (a `featx finetune` folder
    written before finetune added it) the size the headline rows really have: 'training size 0.5 (12 labels)'."""
    if res.headline_is_full:
        return "the full training size"
    return f"training size {_size_text(res, res.full_train_size)}"


def _size_text(res, size):
    """'0.25 (45 labels)': a training size as given, with the number of labels it meant."""
    n = res.rows.loc[res.rows["train_size"] == size, "train_labels"].mean()
    return f"{size} ({n:.0f} labels)" if pd.notna(n) and str(size) != f"{n:.0f}" else str(size)


def _cka_section(cache_paths, fig_dir, pngs, debiased, pairs=None):
    """Within-cache CKA per cache, one output-layer summary matrix over all caches, and the layer-by-layer
    CKA of the pairs asked for (pairs: None = every pair for up to MAX_CKA_PAIRS_AUTO caches, "all", or a list
    of (a, b) naming caches by path, file stem or encoder name)."""
    section = Section("Representation similarity (linear CKA)", level=2)
    estimator = "debiased (Kornblith et al. 2019, unbiased HSIC of Song et al. 2012)" if debiased else "plain"
    section.paragraphs.append(f"Linear CKA between layers, {estimator} estimator, over the items done in both "
                              "caches (aligned by id).")
    found = [p for p in dict.fromkeys(cache_paths) if os.path.exists(p)]
    section.bullets += [f"cache not found: {p}" for p in dict.fromkeys(cache_paths) if p not in found]
    names = _cache_names(found)
    for x in found:
        _cka_figure(section, fig_dir, pngs, debiased, names, x)
    if len(found) > 2:
        _cka_summary(section, fig_dir, pngs, debiased, names, found)
    chosen = cka_pairs(pairs, found, names)
    if len(found) > 1 and not chosen:
        section.paragraphs.append("Layer-by-layer CKA between two encoders: ask for the pairs (cka_pairs).")
    for x, y in chosen:
        _cka_figure(section, fig_dir, pngs, debiased, names, x, y)
    return section


def _cache_names(paths):
    """{cache path: its encoder's display name} (the file stem where the cache cannot be read)."""
    from featx.cache import open_cache

    models, modalities = [], []
    for p in paths:
        try:
            with open_cache(p) as c:
                models.append(str(c.model))
                modalities.append(c.modality)
        except (FeatxError, OSError, KeyError):
            models.append(os.path.splitext(os.path.basename(p))[0])
            modalities.append(None)
    return dict(zip(paths, cache_names(models, modalities, paths)))


def cka_pairs(pairs, paths, names):
    """The (path_a, path_b) pairs to draw: see _cka_section; an unknown name is a one-line error."""
    if pairs is None:
        pairs = "all" if len(paths) <= MAX_CKA_PAIRS_AUTO else []
    if pairs == "all":
        return list(itertools.combinations(paths, 2))
    lookup = {}
    for p in paths:
        for key in (p, os.path.abspath(p), os.path.splitext(os.path.basename(p))[0], names[p]):
            lookup.setdefault(str(key), p)
    out = []
    for a, b in pairs:
        missing = [k for k in (a, b) if str(k) not in lookup]
        if missing:
            raise FeatxError(f"CKA pair {a}:{b}: no cache named {missing[0]!r} (use a cache path, its file "
                             f"stem or an encoder name: {', '.join(names.values())})")
        out.append((lookup[str(a)], lookup[str(b)]))
    return list(dict.fromkeys(out))


def _cka_figure(section, fig_dir, pngs, debiased, names, x, y=None):
    try:
        result = cache_cka(x, y, debiased=debiased)
    except (FeatxError, OSError, KeyError) as e:
        section.bullets.append(f"CKA of {os.path.basename(x)}" + (f" and {os.path.basename(y)}" if y else "")
                               + f" skipped: {e}")
        return
    stem = f"cka_{os.path.splitext(os.path.basename(x))[0]}" + \
        (f"__{os.path.splitext(os.path.basename(y))[0]}" if y else "")
    what = f"within {names[x]}" if y is None else f"{names[x]} vs {names[y]}"
    result.name_x, result.name_y = names[x], names[y if y else x]
    section.figures.append((_save(plots.plot_cka(result), fig_dir, stem, pngs), f"CKA {what}"))


def _cka_summary(section, fig_dir, pngs, debiased, names, paths):
    try:
        summary = summary_cka(paths, debiased=debiased)
    except (FeatxError, OSError, KeyError) as e:
        section.bullets.append(f"CKA summary over {len(paths)} caches skipped: {e}")
        return
    fig = plots.plot_cka_summary(summary, [names[p] for p in paths])
    section.figures.append((_save(fig, fig_dir, "cka_summary", pngs),
                            f"CKA between the output layers of {len(paths)} encoders"))


def _summary_sections(results):
    """(the summary section: primary and next metric, with findings; the appendix: every metric)."""
    finetune = any(r.has_finetune for r in results)
    summary = Section("Summary: best layer vs output layer vs weighted sum vs fusion"
                      + (" vs fine-tuning" if finetune else ""), paragraphs=[
        "The primary metric and the next one. Scores on the "
        + " / ".join(dict.fromkeys(r.eval_split for r in results)) + " split ('cv': pooled cross-validation "
        "folds, where there is no test split), at the full training part, mean over seeds. The best layer and "
        "the fusion method are chosen on dev; 'best minus output' is positive when the best layer is better "
        "than the output layer (for MAE, when it is lower). "
        + ("'fine-tuned' is the jointly fine-tuned model's score, each run's epoch chosen on dev. "
           if finetune else "") + "'–' means not run."
        + "".join(f" {r.name}: no run at the full training part; its scores are at {_headline_size(r)}."
                  for r in results if not r.headline_is_full)])
    appendix = Section("All metrics", paragraphs=["The summary table for every metric."])
    for r in results:
        name = r.name if len(results) > 1 else None
        summary.tables.append(_fmt(summary_table(r, r.metrics[:2], finetune), name))  # for MSA: MAE and Corr
        summary.bullets += [f"{r.name}: {s}" if name else s for s in findings(r)]
        appendix.tables.append(_fmt(summary_table(r, r.metrics, finetune), name))
    if any(LAYERS_COLUMN in t.columns for t in summary.tables):
        summary.paragraphs[0] += (f" '{LAYERS_COLUMN}': the layers probed where they were not all of an encoder's "
                                  "(featx probe --layers); its best layer is the best of those, its weighted sum "
                                  "is over those, and an output layer outside them has no score ('–').")
    if len(results) > 1:
        summary.tables = [_concat(summary.tables)]
        appendix.tables = [_concat(appendix.tables)]
    return summary, appendix


def _concat(tables):
    """One table of several results folders' (a folder without a 'layers probed' column probed all layers)."""
    out = pd.concat(tables, ignore_index=True)
    if LAYERS_COLUMN in out.columns:
        out[LAYERS_COLUMN] = out[LAYERS_COLUMN].fillna("all")
        cols = [c for c in out.columns if c != LAYERS_COLUMN]
        cols.insert(cols.index("best layer") + 1, LAYERS_COLUMN)
        out = out[cols]
    return out


def build_report(results_dirs, out, caches=None, relative_depth=False, notes=(), cka=True, debiased=True,
                 cka_pairs=None):
    """Write report.html (self-contained), summary.md and figures/*.png under `out`.

    results_dirs: one path or a list of results directories written by `featx probe`, `featx fuse` or
    `featx finetune`; their rows share the summary tables (a 'results' column names the folder of each row, and
    a 'fine-tuned' column holds each fine-tuned model's dev-selected test score when any folder has one).
    caches: HDF5 caches for the CKA heatmaps (default: those listed in each meta.json).
    notes: text shown at the top, e.g. which models are randomly initialised; each meta.json's "notes" are added.
    cka_pairs: the cross-encoder layer-by-layer CKA figures: None (every pair when there are at most
    MAX_CKA_PAIRS_AUTO caches), "all", or a list of (a, b) by cache path, file stem or encoder name; with more
    than two caches, one summary matrix (output layer vs output layer) is always drawn.
    Returns {"html": path, "md": path, "pngs": [paths]}.
    """
    if isinstance(results_dirs, (str, os.PathLike)):
        results_dirs = [results_dirs]
    if not results_dirs:
        raise FeatxError("featx report needs at least one results directory")
    results = _unique_names([load_results(d) for d in results_dirs])
    out = os.path.abspath(str(out))
    fig_dir = os.path.join(out, FIGURES)
    os.makedirs(fig_dir, exist_ok=True)

    all_notes = [str(n) for n in notes]
    all_notes += [n if len(results) == 1 else f"{r.name}: {n}" for r in results for n in r.notes]
    all_notes = list(dict.fromkeys(all_notes))
    meta_lines = [f"Results: {', '.join(r.path for r in results)}"]

    summary, appendix = _summary_sections(results)

    pngs = []
    sections = [summary]
    for r in results:
        sections += _result_sections(r, fig_dir, pngs, relative_depth)
    if cka:
        cache_paths = [str(c) for c in caches] if caches is not None else [c for r in results for c in r.caches]
        if cache_paths:
            sections.append(_cka_section(cache_paths, fig_dir, pngs, debiased, cka_pairs))
        else:
            sections.append(Section("Representation similarity (linear CKA)", paragraphs=[
                "No caches given (--cache) or listed in meta.json; CKA skipped."]))
    sections.append(appendix)

    html_path = write_html(os.path.join(out, REPORT_HTML), TITLE, sections, all_notes, meta_lines)
    md_path = write_markdown(os.path.join(out, REPORT_MD), TITLE, sections, all_notes, meta_lines)
    _remove_stale_figures(out, pngs)
    return {"html": html_path, "md": md_path, "pngs": pngs}


def _remove_stale_figures(out, pngs):
    """Remove the figures/*.png of `out` (featx.probing.results.figure_files) that this report did not write: an
    earlier report's into the same --out (of other results, encoders or caches), which would otherwise sit beside
    this one's as if they were its own; said in one warning. Files other than PNGs are left alone."""
    written = {os.path.abspath(p) for p in pngs}
    stale = [f for f in figure_files(out) if os.path.abspath(os.path.join(out, f)) not in written]
    for f in stale:
        os.remove(os.path.join(out, f))
    if stale:
        names = [os.path.basename(f) for f in stale]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.warn(f"{os.path.join(out, FIGURES)} held {len(stale)} figure(s) of an earlier report, removed: "
                      f"{shown}")

