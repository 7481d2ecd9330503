"""``reinseg report``: one static HTML page from one or more evaluation results.

The page (``DIR/index.html``, its pictures in ``DIR/images/``) needs no server and no network:
styles, the plots (SVG) and a few lines of script are inline. It shows, for each results file
(a model: frozen, Rein, ...): the mIoU per domain, per-class IoU bars per domain, the confusion
matrix per domain (each row, a true class, normalised to sum to 1), the classes that lose most
from the source domain to the targets, and a gallery per domain (image | ground truth | each
model's prediction and error map) of the best, median and worst images. The confusion matrices
and the gallery need results written by ``reinseg eval --save-examples N`` (reinseg.examples
gives the file format); plain results give the tables and bars.

The script at the end of the page checks that every picture loaded and writes what it found into
``#report-status`` (``data-images``, ``data-loaded``, ``data-errors``): the browser test reads it.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ModelResults", "load_results", "write_report", "error_map", "GENERATOR"]

GENERATOR = "reinseg report"
REPORT_SIDE = 320  # long side of the gallery's pictures
MODEL_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
LOSSES_SHOWN = 5
ERROR_COLOUR = (230, 25, 25)
GROUPS = ("best", "median", "worst")


@dataclass
class ModelResults:
    """One results file: its model's name, its path and its JSON (``domains`` -> scores)."""

    name: str
    path: Path
    data: dict

    @property
    def domains(self) -> dict[str, dict]:
        return self.data["domains"]

    def classes(self, domain: str) -> list[str]:
        return list(self.domains[domain]["IoU"])

    def whole_of(self, domain: str) -> str | None:
        """The domain ``domain`` is a part of (``acdc`` of an ACDC condition; ``cityscapes-c`` of a
        corruption at a severity), from the file's ``subdomains`` and ``corruptions``; else None."""
        subdomains = self.data.get("subdomains")
        for whole, parts in subdomains.items() if isinstance(subdomains, dict) else ():
            if isinstance(parts, list) and domain in parts:
                return whole
        corruptions = self.data.get("corruptions")
        return next(
            (b for b in (corruptions if isinstance(corruptions, dict) else ()) if domain.startswith(f"{b}/")), None
        )


def load_results(paths: list[str | Path], names: list[str] | None = None) -> list[ModelResults]:
    """Read and check results files (``reinseg eval``'s JSON); a model is named by ``names``, else
    by the file's ``model`` key, else by its stem (and its folder's name where stems repeat).

    Raises ValueError naming the file: missing, not JSON, without per-domain IoU, or holding
    another class list than the first file for the same domain.
    """
    if not paths:
        raise ValueError("no results file given")
    if names is not None and len(names) != len(paths):
        raise ValueError(f"--name given {len(names)} times for {len(paths)} results files")
    models = []
    for i, path in enumerate(map(Path, paths)):
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"results file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"results file {path} does not read as JSON: {err}") from None
        _check_results(data, path)
        name = names[i] if names else str(data.get("model") or path.stem)
        models.append(ModelResults(name, path, data))
    stems = [m.name for m in models]
    if not names and len(set(stems)) < len(stems):
        for model in models:
            model.name = f"{model.path.parent.name}/{model.name}"
    seen = [m.name for m in models]
    if len(set(seen)) < len(seen):
        raise ValueError(f"two results files have the same model name ({', '.join(seen)}): name them with --name")
    _check_same_classes(models)
    return models


def _check_results(data, path: Path) -> None:
    domains = data.get("domains") if isinstance(data, dict) else None
    if not isinstance(domains, dict) or not domains:
        raise ValueError(f"{path} is not a reinseg evaluation result: no 'domains' (write it with reinseg eval)")
    if not _percent(data.get("mean_mIoU")):
        raise ValueError(f"{path}: mean_mIoU is {data.get('mean_mIoU')!r}, not a percentage or null")
    for domain, scores in domains.items():
        if not isinstance(scores, dict) or not isinstance(scores.get("IoU"), dict) or "mIoU" not in scores:
            raise ValueError(f"{path}: domain {domain!r} has no 'mIoU' and per-class 'IoU'")
        # The page shows these numbers as they are: true, NaN, 5000 or a list were shown or crashed it.
        percents = {"mIoU": scores["mIoU"], "aAcc": scores.get("aAcc"), "mAcc": scores.get("mAcc")}
        percents.update({f"IoU[{c!r}]": v for c, v in scores["IoU"].items()})
        percents.update({f"Acc[{c!r}]": v for c, v in (scores.get("Acc") or {}).items()})
        percents.update(
            {f"images[{i}].mIoU": r.get("mIoU") for i, r in enumerate(scores.get("images", [])) if isinstance(r, dict)}
        )
        wrong = next((key for key, value in percents.items() if not _percent(value)), None)
        if wrong is not None:
            raise ValueError(f"{path}: domain {domain!r}: {wrong} is {percents[wrong]!r}, not a percentage or null")
        confusion = scores.get("confusion")
        k = len(scores["IoU"])
        if confusion is not None and (
            not isinstance(confusion, list)
            or len(confusion) != k
            or any(not isinstance(row, list) or len(row) != k + 1 for row in confusion)
            or any(not _count(c) for row in confusion for c in row)
        ):
            raise ValueError(f"{path}: the confusion matrix of domain {domain!r} is not {k} rows of {k + 1} counts")
        palette = scores.get("palette")
        if palette is not None and (
            not isinstance(palette, list)
            or any(
                not isinstance(c, list) or len(c) != 3 or not all(_count(v) and v <= 255 for v in c) for c in palette
            )
        ):
            raise ValueError(f"{path}: the palette of domain {domain!r} is not [r, g, b] colours of 0..255")
        examples = scores.get("examples", {})
        entries = (
            [e for g in (*GROUPS, "also") for e in (examples.get(g) or [])] if isinstance(examples, dict) else None
        )
        if entries is None or any(
            not isinstance(e, dict)
            or not isinstance(e.get("image"), str)
            or not isinstance(e.get("files"), dict)
            or any(not isinstance(e["files"].get(f), str) for f in ("image", "label", "prediction"))
            for e in entries
        ):
            raise ValueError(
                f"{path}: the examples of domain {domain!r} are not lists of "
                '{"image", "files": {"image", "label", "prediction"}} (see docs/report.md)'
            )
        if not all(isinstance(r, dict) and isinstance(r.get("image"), str) for r in scores.get("images", [])):
            raise ValueError(f"{path}: the per-image records of domain {domain!r} have no 'image'")


def _percent(value) -> bool:
    return value is None or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 100
    )


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_same_classes(models: list[ModelResults]) -> None:
    first = models[0]
    reference = next(iter(first.domains))
    for model in models[1:]:
        for domain in model.domains:
            theirs = model.classes(domain)
            against = domain if domain in first.domains else reference
            ours = first.classes(against)
            if theirs != ours:
                different = sorted(set(theirs) ^ set(ours))[:4] or ["(the same names in another order)"]
                raise ValueError(
                    f"{model.path}: domain {domain!r} is scored in {len(theirs)} classes, {first.path} "
                    f"({against!r}) in {len(ours)} other ones (differing: {', '.join(different)}): a report "
                    "compares results in one class list"
                )


def write_report(
    paths: list[str | Path],
    output: str | Path,
    names: list[str] | None = None,
    source: str | None = None,
    title: str = "reinseg evaluation report",
) -> Path:
    """Write ``output/index.html`` (and ``output/images/``) from results files; returns its path.

    ``source``: the source domain for the per-class losses (default: the first domain that is
    not in a file's ``mean_domains``, i.e. not a target). ``output`` is written whole and then
    put in place (an older report there is replaced); a folder that is not a report is refused.
    """
    from .checkpoints import atomic_directory

    models = load_results(paths, names)
    output = Path(output)
    _check_replaceable(output)
    domains = list(dict.fromkeys(d for m in models for d in m.domains))
    if source is not None and not any(source in m.domains for m in models):
        raise ValueError(f"--source {source!r} is not a domain of the results ({', '.join(domains)})")
    with atomic_directory(output) as staging:
        page = _page(models, domains, source, title, staging)
        (staging / "index.html").write_text(page, encoding="utf-8")
    return output / "index.html"


def _check_replaceable(output: Path) -> None:
    """Refuse to replace ``output`` unless it is empty or holds only what a report writes (its
    ``index.html`` and ``images/*.png``; a file browser's own files aside): files a user put
    there would be lost."""
    from .examples import BROWSER_FILES, holds_only

    if not output.exists():
        return
    if not output.is_dir():
        raise ValueError(f"--output {output} exists and is not a reinseg report: choose a new folder")
    entries = [entry for entry in output.iterdir() if entry.name not in BROWSER_FILES]
    if not entries:
        return
    index = output / "index.html"
    try:
        ours = index.is_file() and f'content="{GENERATOR}"' in index.read_text(errors="replace")[:2000]
    except OSError:
        ours = False
    if not ours:
        raise ValueError(f"--output {output} exists and is not a reinseg report: choose a new folder")
    for entry in entries:
        if entry == index or (entry.name == "images" and holds_only(entry, lambda name: Path(name).suffix == ".png")):
            continue
        raise ValueError(
            f"--output {output} holds {entry.name}, which a reinseg report did not write: the report would "
            "replace the folder; choose a new one"
        )


# -- the page -------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1600px; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.plots { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
figure { margin: 0; }
.legend span { display: inline-block; margin: 2px 10px 2px 0; font-size: .9em; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #888; vertical-align: -1px;
  margin-right: 4px; }
.gallery td, .gallery th { vertical-align: top; text-align: center; font-size: .85em; }
.gallery img { width: 200px; image-rendering: pixelated; display: block; }
.missing { width: 200px; color: #888; }
#report-status { color: #555; font-size: .85em; }
.note { color: #555; }
"""

# Registered before anything loads: a script error or a picture that fails to load is counted.
HEAD_SCRIPT = """
window.reportErrors = [];
window.addEventListener("error", function (e) {
  window.reportErrors.push(e.message || ("failed to load " + ((e.target && (e.target.src || e.target.href)) || "?")));
}, true);
"""

CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) loaded++;
  }
  var status = document.getElementById("report-status");
  status.dataset.images = images.length;
  status.dataset.loaded = loaded;
  status.dataset.errors = window.reportErrors.length;
  status.textContent = loaded === images.length && window.reportErrors.length === 0
    ? "all " + images.length + " pictures loaded"
    : (images.length - loaded) + " of " + images.length + " pictures did not load; " + window.reportErrors.join("; ");
});
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _num(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _page(models: list[ModelResults], domains: list[str], source: str | None, title: str, folder: Path) -> str:
    classes = models[0].classes(next(iter(models[0].domains)))
    palette = _palette(models, classes)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta name="generator" content="{GENERATOR}">',
        f"<title>{_e(title)}</title><style>{STYLE}</style><script>{HEAD_SCRIPT}</script></head><body>",
        f"<h1>{_e(title)}</h1>",
        "<p>Models: "
        + ", ".join(
            f'<span class="swatch" style="background:{MODEL_COLOURS[i % len(MODEL_COLOURS)]}"></span>'
            f"<b>{_e(m.name)}</b> ({_e(m.path.name)})"
            for i, m in enumerate(models)
        )
        + "</p>",
        '<p id="report-status">checking the pictures…</p>',
        "<h2>mIoU per domain</h2>",
        _miou_table(models, domains),
        "<h2>Per-class IoU</h2>",
        '<div class="plots">' + "".join(_class_bars(models, d) for d in domains) + "</div>",
        "<h2>Classes that lose most from source to target</h2>",
        _losses(models, source),
        "<h2>Examples</h2>",
        _legend(classes, palette),
        _gallery(models, domains, palette, folder),
        "<h2>Confusion matrices</h2>",
        '<p class="note">Row: the true class; column: the predicted one; each row sums to 1 '
        "(predictions outside the classes are counted but not drawn). Hover a cell for its value.</p>",
        _confusions(models, domains),
        f"<script>{CHECK_SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts)


def _palette(models: list[ModelResults], classes: list[str]) -> np.ndarray:
    """The classes' colours: as the results record them, else Cityscapes' (or the default)."""
    from .data.classes import default_palette

    for model in models:
        for scores in model.domains.values():
            if scores.get("palette") is not None and len(scores["palette"]) == len(classes):
                return np.asarray(scores["palette"], dtype=np.uint8)
    return default_palette(len(classes))


def protocol_name(model: ModelResults) -> str:
    """The test protocol a results file's top-level scores were evaluated under ("?" for results
    that record none)."""
    protocol = model.data.get("protocol")
    return str(protocol.get("name", "?")) if isinstance(protocol, dict) else "?"


def _protocol_settings(model: ModelResults) -> str:
    """A file's protocol parameters but its name and per-domain scales (windows, flip, ratios)."""
    protocol = model.data.get("protocol")
    if not isinstance(protocol, dict):
        return ""
    return json.dumps({k: v for k, v in protocol.items() if k not in ("name", "scales")}, sort_keys=True)


def _protocol_scale(model: ModelResults, domain: str) -> str:
    """The scale a file's protocol ran ``domain``'s images at (as recorded)."""
    protocol = model.data.get("protocol")
    scales = protocol.get("scales") if isinstance(protocol, dict) else None
    if not isinstance(scales, dict):
        return json.dumps(None)
    # a part (an ACDC condition evaluated with the others) ran at its whole's scale
    return json.dumps(scales.get(domain, scales.get(model.whole_of(domain) or "")))


def _miou_table(models: list[ModelResults], domains: list[str]) -> str:
    rows = [
        "<table><tr><th>model</th><th>protocol</th>"
        + "".join(f"<th>{_e(d)}</th>" for d in domains)
        + "<th>mean</th></tr>"
    ]
    for model in models:
        cells = [f'<td data-model="{_e(model.name)}" data-key="protocol">{_e(protocol_name(model))}</td>']
        for domain in domains:
            value = model.domains.get(domain, {}).get("mIoU")
            cells.append(
                f'<td data-model="{_e(model.name)}" data-domain="{_e(domain)}" data-key="mIoU">{_num(value)}</td>'
            )
        mean = model.data.get("mean_mIoU")
        over = ", ".join(model.data.get("mean_domains") or [])
        cells.append(
            f'<td data-model="{_e(model.name)}" data-key="mean_mIoU" title="over {_e(over)}">{_num(mean)}</td>'
        )
        rows.append(f"<tr><td>{_e(model.name)}</td>{''.join(cells)}</tr>")
    rows.append("</table>")
    notes = {", ".join(m.data.get("mean_domains") or []) for m in models}
    html = "".join(rows) + f'<p class="note">mean: over the target domains ({_e("; ".join(notes))}).</p>'
    protocols = sorted({protocol_name(m) for m in models})
    settings = {_protocol_settings(m) for m in models}
    # Each domain's scale among the files that evaluated it (files may cover other domains).
    scales = [{_protocol_scale(m, d) for m in models if d in m.domains} for d in domains]
    if len(protocols) > 1 or len(settings) > 1 or any(len(s) > 1 for s in scales):
        # The protocol moves mIoU by points (README, "Evaluation protocols"): never compare silently.
        # One name may also hold other settings (another version's default scales, model.test).
        html += (
            f'<p class="note" id="mixed-protocols"><b>These results were evaluated under different protocols '
            f"({_e(', '.join(protocols))}"
            + ("; different scales, windows or flips" if len(protocols) == 1 else "")
            + "): their numbers are not comparable.</b></p>"
        )
    others = [
        f"{model.name}: {', '.join(sorted(set(model.data['protocols']) - {protocol_name(model)}))}"
        for model in models
        if isinstance(model.data.get("protocols"), dict) and set(model.data["protocols"]) - {protocol_name(model)}
    ]
    if others:
        html += (
            f'<p class="note">Also in the files, not shown (the report reads each file\'s first protocol): '
            f"{_e('; '.join(others))}.</p>"
        )
    return html


def _class_bars(models: list[ModelResults], domain: str) -> str:
    present = [m for m in models if domain in m.domains]
    classes = present[0].classes(domain)
    bar, gap, label_w, plot_w, value_w = 9, 6, 90, 180, 42
    row_h = bar * len(present) + gap
    height = row_h * len(classes) + 24
    width = label_w + plot_w + value_w
    out = [
        f"<figure><figcaption><b>{_e(domain)}</b>: IoU per class (%)</figcaption>"
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">'
    ]
    for x in (0, 25, 50, 75, 100):
        gx = label_w + plot_w * x / 100
        out.append(f'<line x1="{gx}" y1="0" x2="{gx}" y2="{height - 16}" stroke="#ddd"/>')
        out.append(f'<text x="{gx}" y="{height - 4}" text-anchor="middle" fill="#666">{x}</text>')
    for c, name in enumerate(classes):
        y0 = c * row_h
        out.append(f'<text x="{label_w - 6}" y="{y0 + row_h / 2 + 1}" text-anchor="end">{_e(name)}</text>')
        for i, model in enumerate(present):
            value = model.domains[domain]["IoU"].get(name)
            y = y0 + i * bar
            colour = MODEL_COLOURS[models.index(model) % len(MODEL_COLOURS)]
            w = 0 if value is None else plot_w * max(0.0, min(value, 100.0)) / 100
            out.append(
                f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar - 1}" fill="{colour}">'
                f"<title>{_e(model.name)}, {_e(name)}: {_num(value)}</title></rect>"
            )
            out.append(
                f'<text x="{label_w + w + 3:.1f}" y="{y + bar - 1}" font-size="9" data-model="{_e(model.name)}" '
                f'data-domain="{_e(domain)}" data-class="{_e(name)}" data-key="IoU">{_num(value)}</text>'
            )
    out.append("</svg></figure>")
    return "".join(out)


def _source_and_targets(model: ModelResults, source: str | None) -> tuple[str | None, list[str]]:
    targets = [d for d in (model.data.get("mean_domains") or []) if d in model.domains]
    if source is None:  # the first domain that is no target, nor a part of one (an ACDC condition)
        source = next((d for d in model.domains if d not in targets and model.whole_of(d) is None), None)
    if source not in model.domains:
        return None, targets
    return source, [d for d in (targets or model.domains) if d != source]


def _losses(models: list[ModelResults], source: str | None) -> str:
    out = []
    for model in models:
        src, targets = _source_and_targets(model, source)
        if src is None or not targets:
            out.append(
                f'<p class="note">{_e(model.name)}: no source domain among its results (evaluate on the '
                "source's validation split with <code>in_mean: false</code>, or give --source).</p>"
            )
            continue
        rows = []
        for name in model.classes(src):
            before = model.domains[src]["IoU"].get(name)
            after = [model.domains[t]["IoU"].get(name) for t in targets]
            after = [v for v in after if v is not None]
            if before is None or not after:
                continue
            mean = sum(after) / len(after)
            rows.append((before - mean, name, before, mean))
        rows.sort(key=lambda r: (-r[0], r[1]))
        table = [
            f"<h3>{_e(model.name)}: {_e(src)} → mean of {_e(', '.join(targets))}</h3>"
            f"<table><tr><th>class</th><th>IoU on {_e(src)}</th><th>mean IoU on the targets</th><th>loss</th></tr>"
        ]
        for drop, name, before, mean in rows[:LOSSES_SHOWN]:
            bar = f'<span class="swatch" style="width:{max(0.0, drop) * 2:.0f}px;background:#d62728"></span>'
            table.append(
                f"<tr><td>{_e(name)}</td><td>{_num(before)}</td><td>{_num(mean)}</td>"
                f'<td style="text-align:left">{bar} <span data-model="{_e(model.name)}" data-class="{_e(name)}" '
                f'data-key="loss">{_num(drop)}</span></td></tr>'
            )
        out.append("".join(table) + "</table>")
    return "".join(out)


def _confusions(models: list[ModelResults], domains: list[str]) -> str:
    figures = [
        _confusion_svg(m, d) for d in domains for m in models if m.domains.get(d, {}).get("confusion") is not None
    ]
    if not figures:
        return '<p class="note">No confusion matrix in these results: evaluate with <code>--save-examples N</code>.</p>'
    return f"<div class='plots'>{''.join(figures)}</div>"


def _confusion_svg(model: ModelResults, domain: str) -> str:
    classes = model.classes(domain)
    matrix = np.asarray(model.domains[domain]["confusion"], dtype=np.float64)
    totals = matrix.sum(1, keepdims=True)
    fractions = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    k, cell, margin = len(classes), 16, 112
    size = margin + k * cell
    out = [
        f"<figure><figcaption><b>{_e(domain)}</b>: {_e(model.name)}</figcaption>"
        f'<svg xmlns="http://www.w3.org/2000/svg" data-model="{_e(model.name)}" data-domain="{_e(domain)}" '
        f'width="{size + 4}" height="{size + 4}" font-size="10">'
    ]
    for i, name in enumerate(classes):
        y = margin + i * cell
        out.append(f'<text x="{margin - 4}" y="{y + cell - 4}" text-anchor="end">{_e(name)}</text>')
        x = margin + i * cell + cell - 4
        out.append(f'<text transform="translate({x},{margin - 4}) rotate(-90)">{_e(name)}</text>')
    for t in range(k):
        for p in range(k):
            f = fractions[t, p]
            shade = tuple(round(255 - (255 - c) * f) for c in (8, 48, 107))
            fill = "#eee" if totals[t, 0] == 0 else f"rgb{shade}"
            out.append(
                f'<rect x="{margin + p * cell}" y="{margin + t * cell}" width="{cell - 1}" height="{cell - 1}" '
                f'fill="{fill}" data-true="{t}" data-pred="{p}" data-value="{f:.4f}"><title>{_e(classes[t])} → '
                f"{_e(classes[p])}: {f:.3f} of {int(totals[t, 0])} pixels</title></rect>"
            )
    out.append("</svg></figure>")
    return "".join(out)


def _legend(classes: list[str], palette: np.ndarray) -> str:
    entries = [
        f'<span><span class="swatch" style="background:rgb{tuple(int(v) for v in palette[i])}"></span>{_e(n)}</span>'
        for i, n in enumerate(classes)
    ]
    entries.append('<span><span class="swatch" style="background:#000"></span>ignored (not scored)</span>')
    entries.append(
        f'<span><span class="swatch" style="background:rgb{ERROR_COLOUR}"></span>error map: wrong '
        "(correct pixels show the image, darkened)</span>"
    )
    return f'<p class="legend">{"".join(entries)}</p>'


def error_map(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """(H, W, 3) uint8: wrong pixels in :data:`ERROR_COLOUR`, right ones the image darkened,
    ignored ones black. ``image`` (H, W, 3), ``label`` and ``prediction`` (H, W)."""
    grey = image.astype(np.float32).mean(-1, keepdims=True) * 0.4
    out = np.repeat(grey, 3, axis=-1).astype(np.uint8)
    out[(label != ignore_index) & (prediction != label)] = ERROR_COLOUR
    out[label == ignore_index] = 0
    return out


def _gallery(models: list[ModelResults], domains: list[str], palette: np.ndarray, folder: Path) -> str:
    from PIL import Image

    has_examples = [m for m in models if any("examples" in s for s in m.domains.values())]
    if not has_examples:
        return '<p class="note">No examples in these results: evaluate with <code>--save-examples N</code>.</p>'
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = palette
    out = []
    count = 0

    def save(array: np.ndarray, name: str) -> str:
        relative = f"images/{name}.png"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / relative, format="PNG", compress_level=6)
        return relative

    for domain in domains:
        # An image shown once per group, whichever models chose it; models that did not save it show a gap.
        rows: dict[str, dict[str, tuple[str, float]]] = {g: {} for g in GROUPS}
        saved: dict[str, dict[str, dict]] = {}  # image -> model name -> its example entry
        for model in has_examples:
            examples = model.domains.get(domain, {}).get("examples") or {}
            for group in (*GROUPS, "also"):  # "also": saved to be shown beside another model's choice
                for entry in examples.get(group, []):
                    if group != "also":
                        rows[group].setdefault(entry["image"], (model.name, entry.get("mIoU")))
                    saved.setdefault(entry["image"], {})[model.name] = entry
        if not any(rows.values()):
            continue
        per_image = {m.name: {r["image"]: r for r in m.domains.get(domain, {}).get("images", [])} for m in models}
        header = "<tr><th>image</th><th>ground truth</th>" + "".join(
            f"<th>{_e(m.name)}</th><th>{_e(m.name)}: errors</th>" for m in models
        )
        out.append(f"<h3>{_e(domain)}</h3><table class='gallery'>{header}</tr>")
        for group in GROUPS:
            for image_name, (chooser, score) in rows[group].items():
                entries = saved[image_name]
                first = next(iter(entries.values()))
                owner = next(m for m in models if m.name in entries)
                image = _read_png(owner, first, "image", 3)
                label = _read_png(owner, first, "label", 2)
                full_size = label.shape
                image, label = _shrink(image, label)
                stem = f"{count:04d}"
                count += 1
                cells = [
                    f'<img src="{save(image, stem + "_image")}" alt="image">',
                    f'<img src="{save(lut[label], stem + "_label")}" alt="ground truth">',
                ]
                for model in models:
                    entry = entries.get(model.name)
                    record = per_image[model.name].get(image_name, {})
                    if entry is None:
                        cells += ['<div class="missing">not saved</div>'] * 2
                        continue
                    prediction = _read_png(model, entry, "prediction", 2)
                    if prediction.shape != full_size:
                        raise ValueError(
                            f"{model.path}: the prediction of {image_name} is {prediction.shape[1]}x"
                            f"{prediction.shape[0]}, its label {full_size[1]}x{full_size[0]}"
                        )
                    prediction = _shrink(image, prediction, size_of=label)[1]
                    shown = f"mIoU {_num(record.get('mIoU', entry.get('mIoU')))}"
                    name = f"{stem}_{models.index(model)}"
                    cells.append(
                        f'<img src="{save(lut[prediction], name + "_prediction")}" alt="prediction">{_e(shown)}'
                    )
                    errors = save(error_map(image, label, prediction), name + "_errors")
                    cells.append(f'<img src="{errors}" alt="errors">')
                caption = f"{group} of {chooser} (mIoU {_num(score)}): {Path(image_name).name}"
                out.append(
                    f'<tr><td colspan="{2 + 2 * len(models)}" style="text-align:left"><b>{_e(caption)}</b></td></tr>'
                    "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
                )
        out.append("</table>")
    return "".join(out)


def _read_png(model: ModelResults, entry: dict, name: str, ndim: int) -> np.ndarray:
    """Example ``entry``'s file ``name`` (image, label or prediction), checked against the digest
    the results recorded for it, where they did (an evaluation killed between replacing the
    examples and writing its results left the new pictures beside the old numbers)."""
    import io

    from PIL import Image

    from .data.io import RASTER_FORMATS
    from .examples import file_digest

    relative = entry["files"][name]
    folder = model.path.parent
    path = folder / relative
    # A results file names its examples relative to itself; it may not copy other files on this
    # disk into a report that is then shared.
    # Resolved: a symbolic link inside the folder may not lead out of it either.
    if Path(relative).is_absolute() or not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{model.path}: example file {relative!r} is outside the results' folder {folder}")
    try:
        data = path.read_bytes()
        digests = entry.get("sha256")
        recorded = digests.get(name) if isinstance(digests, dict) else None
        if recorded is not None and file_digest(data) != recorded:
            raise ValueError(
                f"{model.path}: example file {path} is not the one saved with these results (another "
                "evaluation's, e.g. one interrupted after it replaced the examples): evaluate again with "
                "--save-examples"
            )
        with Image.open(io.BytesIO(data), formats=RASTER_FORMATS) as picture:
            array = np.asarray(picture.convert("RGB") if ndim == 3 else picture)
    except FileNotFoundError:
        raise ValueError(f"{model.path}: example file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{model.path}: example file {path} is a folder") from None
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"{model.path}: example file {path} does not read: {err}") from None
    if array.ndim != ndim:
        raise ValueError(f"{model.path}: example file {path} has shape {array.shape}, not {ndim} dimensions")
    return array


def _shrink(image: np.ndarray, label: np.ndarray, size_of: np.ndarray | None = None):
    """``image`` and ``label`` with the long side at most :data:`REPORT_SIDE` (or ``label`` at
    the size of ``size_of``); class maps nearest, the image by area."""
    from PIL import Image

    h, w = (size_of if size_of is not None else label).shape[:2]
    scale = REPORT_SIDE / max(h, w)
    if size_of is None and scale < 1:
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
    if image.shape[:2] != (h, w):
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BOX))
    if label.shape != (h, w):
        label = np.asarray(Image.fromarray(label).resize((w, h), Image.Resampling.NEAREST))
    return image, label
