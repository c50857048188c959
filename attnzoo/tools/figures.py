"""Pictures of what mechanisms see: receptive-field heat maps, attention patterns, attention over a photo (PNG)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap, LogNorm  # noqa: E402

from .receptive import AttentionMap, MechanismView  # noqa: E402

__all__ = ["MechanismView", "receptive_field_figure", "receptive_field_grid", "attention_overlay_figure"]

RF_CMAP, ATTN_CMAP = "magma", "viridis"
RF_FLOOR = 1e-5  # colour scale of receptive fields: five decades below the maximum, exact zeros black


def _mark(ax, query: Sequence[int]) -> None:
    ax.plot(query[1], query[0], marker="x", color="cyan", markersize=9, markeredgewidth=2.2)
    ax.plot(query[1], query[0], marker="o", markerfacecolor="none", color="white", markersize=11, markeredgewidth=1)


def _draw_field(fig, ax, values: np.ndarray, query: Sequence[int], title: str) -> None:
    peak = float(values.max()) if values.size else 0.0
    shown = np.ma.masked_less_equal(values / peak if peak > 0 else values, 0.0)
    colours = plt.get_cmap(RF_CMAP)(np.linspace(0.18, 1.0, 256))  # darkest used colour stays distinct from zero
    cmap = ListedColormap(colours).with_extremes(bad="black", under=colours[0])
    im = ax.imshow(shown, cmap=cmap, norm=LogNorm(vmin=RF_FLOOR, vmax=1.0), interpolation="nearest")
    _mark(ax, query)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).set_label("|∂y_q/∂x| / max (log; 0 is black)", fontsize=7)


def _draw_attention(fig, ax, amap: AttentionMap, title: str) -> None:
    im = ax.imshow(amap.weights, cmap=ATTN_CMAP, interpolation="nearest", vmin=0.0)
    if amap.query[0] >= 0:
        _mark(ax, amap.query)
    ax.set_title(f"{title}\n{describe(amap)}", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).set_label("attention weight (head mean)", fontsize=7)


def describe(amap: AttentionMap) -> str:
    """Which call, and where its query row and key grid come from when they are not the input tokens."""
    parts = [f"{amap.op} call {amap.call + 1}/{amap.calls}"]
    if not amap.query_on_canvas:
        g = amap.op_query_grid
        parts.append(f"query = op token ({amap.op_query[0]}, {amap.op_query[1]}) of {g[0]}×{g[1]}")
    if not amap.on_canvas:
        parts.append(f"keys = op grid {amap.weights.shape[0]}×{amap.weights.shape[1]}")
    if not (amap.on_canvas and amap.query_on_canvas):
        parts.append("op batch 0")
    if amap.extra_weight > 0.005:
        parts.append(f"{100 * amap.extra_weight:.0f}% on extra keys")
    text = ", ".join(parts)
    return text if len(text) < 48 else "\n".join([", ".join(parts[:2]), ", ".join(parts[2:])]).strip()


def _message(ax, text: str, color: str = "0.3") -> None:
    lines = textwrap.wrap(text, 34, break_long_words=False, break_on_hyphens=False)[:8]
    ax.text(0.5, 0.5, "\n".join(lines), ha="center", va="center", fontsize=7, color=color, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _short(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def receptive_field_figure(views: Sequence[MechanismView], size: int, path: Path, *, dpi: int = 100) -> None:
    """One row per mechanism: the receptive field for each query, then its attention pattern for each query."""
    n_q = max(len(v.queries) for v in views)
    with_attention = any(v.attention for v in views)
    cols = n_q * (2 if with_attention else 1)
    fig, axes = plt.subplots(
        len(views), cols, figsize=(3.4 * cols, 3.2 * len(views)), squeeze=False, constrained_layout=True
    )
    for r, view in enumerate(views):
        for c in range(cols):
            ax = axes[r][c]
            qi = c % n_q
            if view.error:
                _message(ax, f"{view.name}: {view.error}", color="firebrick") if c == 0 else ax.axis("off")
                continue
            query = view.queries[qi]
            if c < n_q:
                tokens = int(np.count_nonzero(view.fields[qi]))
                config = f", {_short(view.config)}" if view.config else ""
                title = f"{view.name}: receptive field of ({query[0]}, {query[1]})\n{tokens} tokens{config}"
                _draw_field(fig, ax, view.fields[qi], query, title)
            elif view.attention and view.attention[qi] is not None:
                _draw_attention(fig, ax, view.attention[qi], f"{view.name}: attention of ({query[0]}, {query[1]})")
            else:
                _message(ax, f"{view.name}: {view.attention_note or 'no attention weights'}")
    title = f"Gradient receptive field Σ|∂y[q]/∂x| over channels ({size}×{size} tokens)"
    title += " and exact attention" if with_attention else ""
    fig.suptitle(title if cols > 2 else title.replace(" over channels", "\nover channels"), fontsize=11)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def receptive_field_grid(views: Sequence[MechanismView], size: int, path: Path, *, dpi: int = 100) -> None:
    """One panel per mechanism (first query), in a near-square grid: the ``--all`` overview."""
    n = len(views)
    cols = max(1, min(8, math.ceil(math.sqrt(n * 1.4))))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols, 2.8 * rows), squeeze=False, constrained_layout=True)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        view = views[i]
        if view.error:
            ax.set_title(view.name, fontsize=9, color="firebrick")
            _message(ax, view.error, color="firebrick")
            continue
        tokens = int(np.count_nonzero(view.fields[0]))
        config = f"\n{_short(view.config)}" if view.config else ""
        _draw_field(fig, ax, view.fields[0], view.queries[0], f"{view.name} ({tokens} tokens){config}")
    q = views[0].queries[0] if views else (0, 0)
    fig.suptitle(
        f"Gradient receptive field of query ({q[0]}, {q[1]}) on {size}×{size} tokens, every mechanism", fontsize=12
    )
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def attention_overlay_figure(
    photo: np.ndarray,
    maps: Sequence[AttentionMap],
    grid: tuple[int, int],
    query: tuple[int, int],
    title: str,
    path: Path,
    *,
    dpi: int = 110,
) -> None:
    """The photo with the query's token marked, then each attention map upsampled over the photo."""
    from skimage.transform import resize

    h, w = photo.shape[:2]
    cell = (h / grid[0], w / grid[1])
    centre = ((query[0] + 0.5) * cell[0], (query[1] + 0.5) * cell[1])
    cols = 1 + max(1, len(maps))
    fig, axes = plt.subplots(1, cols, figsize=(4.2 * cols, 4.4), squeeze=False, constrained_layout=True)
    axes = axes[0]
    axes[0].imshow(photo)
    axes[0].add_patch(
        plt.Rectangle(
            (query[1] * cell[1], query[0] * cell[0]), cell[1], cell[0], fill=False, edgecolor="cyan", linewidth=2
        )
    )
    axes[0].set_title(f"photo, query token ({query[0]}, {query[1]}) of {grid[0]}×{grid[1]}", fontsize=9)
    if not maps:
        _message(axes[1], "no attention weights were recorded for this mechanism")
    for ax, amap in zip(axes[1:], maps):
        heat = resize(amap.weights, (h, w), order=0, anti_aliasing=False) if amap.on_canvas else None
        ax.imshow(photo if heat is not None else amap.weights, cmap=None if heat is not None else ATTN_CMAP)
        if heat is not None:
            im = ax.imshow(heat, cmap="inferno", alpha=0.6, vmin=0.0)
            if amap.query[0] >= 0:  # the row shown is the query token's own
                _mark(ax, (centre[0], centre[1]))
        else:
            im = ax.images[-1]
        ax.set_title(describe(amap), fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).set_label("attention weight (head mean)", fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
