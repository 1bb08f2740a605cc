"""Matplotlib figures of the report. Each function returns a Figure (no pyplot state), or None if there is nothing.

Figures use constrained layout and keep legends outside the data.
"""
from __future__ import annotations

import textwrap

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

from featx.naming import short_name, with_modality
from featx.probing.results import METRIC_LABELS, best_layer
from featx.report.results import full_data_weights, layer_curves, learning_curves, method_scores

_STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
          "xtick.labelsize": 10, "ytick.labelsize": 10, "figure.titlesize": 13, "axes.grid": True,
          "grid.alpha": 0.3, "savefig.dpi": 110}
_FUSION_STYLES = ["-.", ":", (0, (6, 2)), (0, (1, 1, 4, 1))]


def metric_label(res, metric, direction=True):
    """Axis label of a metric, e.g. 'MAE, lower is better'."""
    label = METRIC_LABELS.get(metric, metric)
    if not direction:
        return label
    return f"{label}, {'higher' if res.higher_is_better(metric) else 'lower'} is better"


def distinct_colors(n):
    """n colours, all different: tab10 up to 10, tab20 up to 20, then evenly spaced hues of a cyclic map."""
    if n <= 10:
        return list(matplotlib.colormaps["tab10"].colors[:n])
    if n <= 20:
        return list(matplotlib.colormaps["tab20"].colors[:n])
    cmap = matplotlib.colormaps["hsv"]
    # Alternate lightness so that neighbouring hues stay apart.
    return [tuple(c * (0.75 if i % 2 else 1.0) for c in cmap(i / n)[:3]) for i in range(n)]


def encoder_colors(res):
    """A fixed colour per encoder (in the order the encoders appear, each different), shared by all figures."""
    single = res.rows[~res.rows["method"].str.startswith("fusion") & (res.rows["method"] != "finetune")]
    encoders = list(dict.fromkeys(single["encoder"]))
    return dict(zip(encoders, distinct_colors(len(encoders))))


def legend_columns(n, per_column=18):
    """Legend columns so that no column holds more than `per_column` entries."""
    return max(1, -(-n // per_column))


def _suptitle(fig, text):
    """Set the figure title, wrapped to the figure's width (a one-panel figure is narrower than its title)."""
    fig.suptitle(textwrap.fill(text, max(40, int(fig.get_figwidth() * 10))))


def _panel_title(encoder, modality):
    """'bert (text)', wrapped so that titles of neighbouring panels do not run into each other."""
    return textwrap.fill(with_modality(short_name(encoder), modality), 34)


def _draw_layer_curves(ax, res, metric, curves, relative_depth, detailed):
    """Draw one metric's layer curves (layer_curves(res, metric), not empty) on `ax`; returns the largest number
    of seeds behind a point."""
    colors = encoder_colors(res)
    several = len(curves[["probe", "pooling"]].drop_duplicates()) > 1
    max_count = 1
    for (enc, mod, probe, pooling), g in curves.groupby(["encoder", "modality", "probe", "pooling"], sort=False):
        last = res.last_layer(enc, mod)
        x = g["layer"] / last if relative_depth else g["layer"]
        color = colors.get(enc)
        best = best_layer(res, enc, mod, metric)
        label = with_modality(short_name(enc), mod) + (f" {probe}/{pooling}" if several else "")
        if detailed and best is not None:
            probed = res.layers_probed(enc, mod)
            label += f": best layer {best} of {last}" if probed == "all" else \
                f": best layer {best} of layers {probed} (probed)"
        ax.plot(x, g["mean"], marker="o", ms=4, lw=1.8, color=color, label=label)
        if g["count"].max() > 1:
            ax.fill_between(x, g["mean"] - g["std"], g["mean"] + g["std"], color=color, alpha=0.18, lw=0)
            max_count = max(max_count, int(g["count"].max()))
        at = g[g["layer"] == best]
        if len(at):
            xb = at["layer"] / last if relative_depth else at["layer"]
            ax.plot(xb, at["mean"], ls="none", marker="*", ms=17 if detailed else 13, color=color, mec="black",
                    mew=1.0, zorder=5)
    # Whole-model scores (fusion, fine-tuning) have no layer axis: horizontal lines.
    fusion = method_scores(res, metric, sorted(m for m in set(res.rows["method"])
                                               if m.startswith("fusion") or m == "finetune"))
    for style, row in zip(_FUSION_STYLES, fusion.itertuples()):
        ax.axhline(row.mean, color="black", ls=style, lw=1.5,
                   label=f"{row.method} {short_name(row.encoder)}" + (f" ({row.mean:.3f})" if detailed else ""))
    chance = res.chance(metric)
    if chance is not None:
        ax.axhline(chance, color="0.35", ls="--", lw=1.3,
                   label="chance / majority" + (f" ({chance:.3g})" if detailed else ""))
    if relative_depth:
        ax.set_xlabel("relative depth (layer / output layer)")
        ax.set_xlim(-0.03, 1.03)
    else:
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric_label(res, metric))
    return max_count


def _legend_extras(res, max_count):
    extras = [Line2D([], [], ls="none", marker="*", ms=14, color="0.8", mec="black",
                     label=f"best layer (chosen on {res.selection_split})")]
    if max_count > 1:
        unit = "folds or seeds" if res.eval_split == "cv" else "seeds"
        extras.append(Patch(color="0.5", alpha=0.3, label=f"±1 s.d. over {max_count} {unit}"))
    return extras


def plot_layer_curves(res, metrics, relative_depth=False):
    """Score against layer (or relative depth) per encoder on the evaluated split: mean line, ±1 s.d. band over
    seeds, best layer starred, chance line, fusion models as horizontal lines.

    metrics: one metric (one large panel with values in the legend) or a list (a grid of panels, two columns).
    Returns a Figure, or None if none of the metrics has layer scores.
    """
    detailed = isinstance(metrics, str)
    curves = {m: layer_curves(res, m) for m in ([metrics] if detailed else metrics)}
    curves = {m: c for m, c in curves.items() if not c.empty}
    if not curves:
        return None
    metrics = list(curves)
    ncols = 1 if detailed else min(2, len(metrics))
    nrows = -(-len(metrics) // ncols)
    n_lines = len(next(iter(curves.values()))[["encoder", "modality", "probe", "pooling"]].drop_duplicates())
    with matplotlib.rc_context(_STYLE):
        size = (9 + 3.2 * (legend_columns(n_lines) - 1), max(4.6, 0.26 * min(n_lines, 18) + 1.5)) if detailed \
            else (4.8 * ncols, 3.3 * nrows + 1.2 + 0.25 * -(-n_lines // 3))
        fig = Figure(figsize=size, layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        counts = [_draw_layer_curves(ax, res, m, curves[m], relative_depth, detailed)
                  for ax, m in zip(axes.flat, metrics)]
        for ax in axes.flat[len(metrics):]:
            ax.set_visible(False)
        handles, _ = axes.flat[0].get_legend_handles_labels()
        handles += _legend_extras(res, max(counts))
        if detailed:
            axes[0, 0].set_title(f"{res.name}: {metric_label(res, metrics[0], False)} by layer "
                                 f"({res.eval_split} split)")
            fig.legend(handles=handles, loc="outside right upper", ncols=legend_columns(len(handles)),
                       fontsize=10 if len(handles) <= 18 else 8)
        else:
            fig.suptitle(f"{res.name}: every metric by layer ({res.eval_split} split)")
            fig.legend(handles=handles, loc="outside lower center", ncols=min(3 if len(handles) <= 12 else 5,
                                                                          len(handles)),
                       fontsize=10 if len(handles) <= 12 else 8)
    return fig


def plot_layer_weights(res):
    """Bars of the learned layer weights per encoder (mean ± s.d. over seeds), dashed uniform 1/L line; the
    weights fitted on the largest training size only, one panel per method when several learned weights.
    Returns a Figure or None when the results have no layer weights."""
    w = full_data_weights(res)
    if w is None or w.empty:
        return None
    colors = encoder_colors(res)
    by_method = w["method"].nunique() > 1
    groups = list(w.groupby(["encoder", "modality"] + (["method"] if by_method else []), sort=False))
    ncols = min(len(groups), 3 if len(groups) <= 9 else 5)
    nrows = -(-len(groups) // ncols)
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(4.6 * ncols, 3.6 * nrows + 0.5), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax, (key, g) in zip(axes.flat, groups):
            enc, mod = key[:2]
            stats = g.groupby("layer")["weight"].agg(["mean", "std"])
            spread = stats["std"] if g.groupby("layer").size().max() > 1 else None
            ax.bar(stats.index, stats["mean"], yerr=spread, capsize=2, color=colors.get(enc, "C0"), alpha=0.85)
            ax.axhline(1.0 / len(stats), color="0.35", ls="--", lw=1.2)
            ax.set_title(_panel_title(enc, mod) + (f"\n{key[2]}" if by_method else ""))
            ax.set_xlabel("layer")
            ax.set_ylabel("learned weight")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(axis="x", visible=False)
        for ax in axes.flat[len(groups):]:
            ax.set_visible(False)
        # layer_weights.csv holds one row per fold too, not only per seed: count the fits.
        fits = int(w.groupby(["encoder", "modality", "method", "layer"]).size().max())
        seeds = int(w["seed"].nunique())
        several = res.layer_weights["train_size"].nunique() > 1
        _suptitle(fig, f"{res.name}: learned layer weights (softmax), mean ± s.d. over {fits} fit{'s' * (fits > 1)}"
                  f" ({seeds} seed{'s' * (seeds > 1)})"
                  + (" at the full training part" if several else "")
                  + "; dashed = uniform 1/L")
    return fig


def plot_learning_curves(res, metric):
    """Score against the number of training labels (log axis, in increasing order): one panel per encoder (and
    one per fusion model), lines for the best layer, the output layer and whole-model methods. None without
    learning curves."""
    if not res.has_learning_curves:
        return None
    lc = learning_curves(res, metric)
    if lc.empty:
        return None
    colors = encoder_colors(res)
    groups = list(lc.groupby(["encoder", "modality"], sort=False))
    ncols = 2 if len(groups) == 4 else min(len(groups), 3 if len(groups) <= 9 else 5)
    nrows = -(-len(groups) // ncols)
    labels = lc["labels"]
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(3.9 * ncols, 3.9 * nrows + 0.5), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
        for ax, ((enc, mod), g) in zip(axes.flat, groups):
            for k, (line, h) in enumerate(g.groupby("line", sort=False)):
                h = h.sort_values("labels")
                style = _line_style(line, colors.get(enc), k)
                ax.errorbar(h["labels"], h["mean"], yerr=h["std"] if h["count"].max() > 1 else None,
                            capsize=3, lw=1.6, ms=5, label=line, **style)
            chance = res.chance(metric)
            if chance is not None:
                ax.axhline(chance, color="0.35", ls="--", lw=1.3, label="chance / majority")
            if labels.min() > 0:
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(FixedLocator(sorted(labels.unique())))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}" if v >= 10 else f"{v:g}"))
                ax.xaxis.set_minor_locator(NullLocator())
            ax.set_title(_panel_title(enc, mod))
            what = "training labels" if res.rows["train_labels"].notna().any() else "training size (as given)"
            ax.set_xlabel(what + (" (log scale)" if labels.min() > 0 else ""))
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=9, frameon=False)
        for ax in axes.flat[len(groups):]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel(metric_label(res, metric))
        _suptitle(fig, f"{res.name}: {metric_label(res, metric, False)} against training labels "
                  f"({res.eval_split} split, mean ± s.d. over seeds)")
    return fig


def _line_style(line, color, k):
    if line.startswith("best"):
        return {"color": color, "ls": "-", "marker": "o"}
    if line.startswith("output layer"):
        return {"color": color, "ls": "--", "marker": "s", "mfc": "white"}
    if line == "weighted sum":
        return {"color": color or "0.2", "ls": ":", "marker": "D"}
    return {"color": "black" if k == 0 else f"{0.2 + 0.2 * k:.1f}", "ls": _FUSION_STYLES[k % 4], "marker": "^"}


def plot_cka(result):
    """Heatmap of a CacheCKA: layers of X on the vertical axis, layers of Y on the horizontal one."""
    m = result.matrix
    lx, ly = m.shape
    name_x, name_y = short_name(result.name_x), short_name(result.name_y)
    kind = "debiased linear CKA" if result.debiased else "linear CKA"
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(min(2.6 + 0.32 * ly, 9.5), min(1.9 + 0.3 * lx, 8.5)), layout="constrained")
        ax = fig.add_subplot()
        im = ax.imshow(m, origin="lower", vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        fig.colorbar(im, ax=ax, label=kind, shrink=0.9)
        ax.set_xlabel(f"{name_y} layer")
        ax.set_ylabel(f"{name_x} layer")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(False)
        if max(lx, ly) <= 8:
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8.5,
                        color="black" if v > 0.6 else "white")
        what = f"within {name_x}" if result.within else f"{name_x} vs {name_y}"
        ax.set_title(f"CKA {what}\n{result.num_items} items, {result.pooling} pooling", fontsize=11)
    return fig


def plot_cka_summary(summary, names=None):
    """Heatmap of a SummaryCKA: output layer against output layer of every pair of encoders. names: display
    names in the order of summary.names (default: shortened model names)."""
    m = summary.matrix
    names = [short_name(n) for n in summary.names] if names is None else list(names)
    k = len(names)
    kind = "debiased linear CKA" if summary.debiased else "linear CKA"
    with matplotlib.rc_context(_STYLE):
        side = min(3.0 + 0.36 * k, 16)
        fig = Figure(figsize=(side + 1.5, side), layout="constrained")
        ax = fig.add_subplot()
        im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
        fig.colorbar(im, ax=ax, label=kind, shrink=0.8)
        ax.set_xticks(range(k), names, rotation=90, fontsize=9 if k <= 20 else 7)
        ax.set_yticks(range(k), names, fontsize=9 if k <= 20 else 7)
        ax.grid(False)
        if k <= 10:
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="black" if v > 0.6 else "white")
        ax.set_title(f"CKA between output layers\n{summary.num_items} items done in every cache, "
                     f"{summary.pooling} pooling", fontsize=11)
    return fig


def save(fig, path):
    """Write `fig` as PNG to `path`; returns the path."""
    fig.savefig(path, dpi=_STYLE["savefig.dpi"])
    return path
