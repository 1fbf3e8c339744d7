"""Token relevance for text (an HTML page or a terminal line, one colour per token) and patch
relevance for images (a transformer's view of an image: one value per patch).

The colours are :mod:`lrponnx.app.render`'s: a diverging map (default ``coldnhot``) scaled symmetrically
by the largest |relevance| of the sequence (or a percentile of it), so 0 is the map's centre.

    >>> from lrponnx.app.render_text import token_html, token_terminal
    >>> out = explainer.explain(ids)                      # an int64 ids input: relevance [N, T]
    >>> print(token_terminal(tokens, out.relevance[0]))    # 24-bit ANSI background per token
    >>> Path("tokens.html").write_text(token_html(tokens, out.relevance[0]))
"""
from __future__ import annotations

import html
from typing import Sequence

import numpy as np

from lrponnx.app.render import DEFAULT_CMAP, colorize


def _values(tokens: Sequence[str], relevance) -> np.ndarray:
    r = np.asarray(relevance, dtype=np.float64).reshape(-1)
    if len(tokens) != r.size:
        raise ValueError(f"{len(tokens)} tokens but {r.size} relevance values")
    if not np.all(np.isfinite(r)):
        raise ValueError("relevance has NaN or inf values")
    return r


def token_colors(relevance, cmap: str = DEFAULT_CMAP, percentile: float | None = None) -> np.ndarray:
    """RGB uint8 [T, 3]: the colour of each token's relevance."""
    r = np.asarray(relevance, dtype=np.float64).reshape(1, -1)
    return colorize(r, cmap, percentile=percentile)[0]


def _ink(rgb) -> str:
    """Black or white text, whichever reads better on the background."""
    r, g, b = (int(c) for c in rgb)
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def token_html(tokens: Sequence[str], relevance, *, cmap: str = DEFAULT_CMAP, percentile: float | None = None,
               title: str | None = None) -> str:
    """A self-contained HTML page: each token on its relevance's colour, the value in its tooltip."""
    r = _values(tokens, relevance)
    colors = token_colors(r, cmap, percentile)
    spans = []
    for tok, v, c in zip(tokens, r, colors):
        spans.append(f'<span class="tok" style="background:rgb({c[0]},{c[1]},{c[2]});color:{_ink(c)}" '
                     f'title="{v:+.4g}">{html.escape(str(tok))}</span>')
    head = f"<h1>{html.escape(title)}</h1>\n" if title else ""
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>"
            f"{html.escape(title or 'token relevance')}</title>\n<style>body{{font-family:sans-serif;line-height:2}}"
            ".tok{padding:2px 3px;margin:1px;border-radius:3px;white-space:pre}</style></head>\n<body>\n"
            f"{head}<p>{' '.join(spans)}</p>\n<p>sum {r.sum():+.4g}; colour scale ±{np.abs(r).max():.4g} "
            f"({html.escape(cmap)})</p>\n</body></html>\n")


def token_terminal(tokens: Sequence[str], relevance, *, cmap: str = DEFAULT_CMAP,
                   percentile: float | None = None) -> str:
    """One line with a 24-bit ANSI background colour per token (reset after each)."""
    r = _values(tokens, relevance)
    colors = token_colors(r, cmap, percentile)
    parts = []
    for tok, c in zip(tokens, colors):
        fg = "30" if _ink(c) == "#000" else "97"
        parts.append(f"\x1b[{fg};48;2;{c[0]};{c[1]};{c[2]}m {tok} \x1b[0m")
    return "".join(parts)


def patch_relevance(relevance, patch: int | Sequence[int]) -> np.ndarray:
    """Relevance [C, H, W] (or [H, W]) summed over channels and over each ``patch`` x ``patch``
    block: [H / p, W / p], one value per transformer token (the class token has none)."""
    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim == 3:
        r = r.sum(0)
    if r.ndim != 2:
        raise ValueError(f"expected relevance [C, H, W] or [H, W], got shape {r.shape}")
    ph, pw = (patch, patch) if isinstance(patch, (int, np.integer)) else tuple(patch)
    H, W = r.shape
    if ph <= 0 or pw <= 0 or H % ph or W % pw:
        raise ValueError(f"a {H}x{W} image does not split into {ph}x{pw} patches")
    return r.reshape(H // ph, ph, W // pw, pw).sum((1, 3))
