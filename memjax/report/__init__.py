"""The audit report: sections of metrics, figures and tables written as one HTML page.

A report is staged in a temporary folder beside its destination and renamed into place
only when every file is written, so a failed or interrupted run never leaves a report
that looks complete.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memjax._io import umask_mode
from memjax.errors import InputError


@dataclasses.dataclass
class Section:
    """One part of the report: a title, a paragraph, metric rows and figure files."""

    title: str
    text: str = ""
    metrics: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    figures: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, caption)
    files: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, caption)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def render_html(title: str, sections: list[Section]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             "</title><style>body{font-family:system-ui,sans-serif;max-width:60em;margin:2em "
             "auto;padding:0 1em;color:#222}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
             "td.num{text-align:right;font-variant-numeric:tabular-nums}figure{margin:1em 0}"
             "figcaption{font-size:.9em;color:#555}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        if section.metrics:
            parts.append("<table>")
            for name, value in section.metrics:
                cls = " class='num'" if isinstance(value, (int, float)) else ""
                parts.append(f"<tr><th>{html.escape(name)}</th><td{cls}>{_format(value)}</td></tr>")
            parts.append("</table>")
        for file, caption in section.figures:
            parts.append(f"<figure><img src='{html.escape(file)}' alt='{html.escape(caption)}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        for file, caption in section.files:
            parts.append(f"<p><a href='{html.escape(file)}'>{html.escape(file)}</a>: "
                         f"{html.escape(caption)}</p>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out_dir: str | os.PathLike, title: str,
                 build: Callable[[Path], list[Section]]) -> Path:
    """Build a report into a staging folder, then move it to ``out_dir`` in one rename.

    Args:
      out_dir: destination folder; an existing report there is replaced only on success.
      title: page title.
      build: ``build(staging_dir) -> sections``; writes its figures and data files into
        the staging folder (paths in sections are relative to it).

    In a multi-host run only process 0 builds and writes it; the others return the path.

    Returns:
      The report folder. It holds ``index.html`` and ``metrics.json`` (every section's
      metrics), plus whatever ``build`` wrote.
    """
    out_dir = Path(out_dir).absolute()
    import jax

    if jax.process_index() != 0:  # several hosts: process 0 writes the one report
        return out_dir
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(umask_mode(0o777))  # mkdtemp makes 0700 folders; match ordinary ones
    try:
        sections = build(staging)
        metrics = {s.title: {name: value for name, value in s.metrics} for s in sections}
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
        (staging / "index.html").write_text(render_html(title, sections))
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, trash / "old")
            os.replace(staging, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


#: What every report folder holds; a folder with other files is not a report.
REPORT_FILES = ("index.html", "metrics.json")


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a file, or a folder that holds files but is not a report (a
    user's folder given as ``--out`` by mistake would otherwise be deleted)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"--out {str(out_dir)!r} is a file; expected a report folder (or a "
                         "new path)")
    if any(out_dir.iterdir()) and not all((out_dir / f).is_file() for f in REPORT_FILES):
        raise InputError(f"--out {str(out_dir)!r} holds files but is not a memjax report "
                         f"(no {' and '.join(REPORT_FILES)}); choose a new folder, or an "
                         "earlier report to replace")


def plot_top_images(images, scores, titles, path: str | os.PathLike, suptitle: str,
                    count: int = 16) -> None:
    """The ``count`` highest-``scores`` images [N, H, W, 1] in two rows, each titled by
    ``titles(i)`` (i: the image's index), saved to ``path`` (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    top = np.argsort(-np.asarray(scores))[:count]
    fig, axes = plt.subplots(2, count // 2, figsize=(count // 2 * 1.1, 2.8))
    for ax, i in zip(axes.ravel(), top, strict=True):
        ax.imshow(images[i][..., 0], cmap="gray_r")
        ax.set_title(titles(i), fontsize=7)
        ax.axis("off")
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
