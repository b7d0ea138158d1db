"""report.html: one page per eval run with every table and picture, openable straight from disk.

Pictures are linked by paths relative to the run folder, so the folder can be zipped, moved or
shared and the page still shows them.
"""

from __future__ import annotations

from html import escape
from urllib.parse import quote
from pathlib import Path

from evaluation.tables import GLOSSARY, OPERATING_ROWS, PIXEL_THRESHOLD_HEADER, cell, honest_goods_words, mean_cells, pixel_threshold_rows, summary_columns, summary_table

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1500px; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #eee; }
tr.mean td { font-weight: bold; }
.figures img { width: 380px; margin: 4px; border: 1px solid #ddd; }
.sheets img { width: 100%; max-width: 1200px; margin: 4px 0; border: 1px solid #ddd; }
.note { color: #a40; }
.muted { color: #666; font-size: 0.9em; }
"""


def _table(header: list[str], rows: list[list], row_class: list[str] | None = None) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = []
    for index, row in enumerate(rows):
        klass = f' class="{row_class[index]}"' if row_class and row_class[index] else ""
        body.append(f"<tr{klass}>" + "".join(f"<td>{escape(cell(v) if not isinstance(v, str) else v)}</td>" for v in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _summary(rows: list[dict]) -> str:
    columns = summary_columns(rows)
    table = summary_table(rows)
    body = [[row["category"]] + [row[key] for key, _ in columns] for row in table["rows"]]
    body.append(["mean"] + mean_cells(rows, columns))
    return _table(["category"] + [title for _, title in columns], body, [""] * len(table["rows"]) + ["mean"])


def _link(path: str) -> str:
    """A relative file path as a link: percent-encoded (a category named "lot #3" made every picture
    of it an anchor), then HTML-escaped."""
    return escape(quote(path))


def _category(metrics: dict) -> str:
    name = escape(metrics["category"])
    parts = [f'<h2 id="{name}">{name}</h2>']
    model = metrics.get("model")
    if model:
        updates = f", {model['updates']} updates" if model["updates"] else ""
        parts.append(f'<p class="muted">model {escape(model["folder"])} ({escape(str(model["type"]))}, {escape(str(model["backbone"]))}, '
                     f'id {escape(model["id"])}{updates}; scored with {escape(str(model.get("runtime", "torch")))})</p>')
    parts.append(
        f'<p class="muted">{metrics["n_images"]} test images ({metrics["n_good"]} good, {metrics["n_defect"]} defect); '
        f'pixel metrics over {metrics["n_pixel_images"]} images with ground truth at the model\'s '
        f'{metrics["resolution"][0]} x {metrics["resolution"][1]} (height x width) working size; PRO up to FPR {metrics["pro_fpr_limit"]:g}.</p>'
    )
    parts += [f'<p class="note">{escape(note)}</p>' for note in metrics.get("notes", [])]
    operating = metrics["operating"]
    confusion = operating["confusion"]
    parts.append(f"<h3>Operating point</h3><p>{escape(operating['source'])}; chosen on {escape(honest_goods_words(metrics))}, never on the test set.</p>")
    parts.append(_table(["metric", "value"], [[title, operating[key]] for key, title in OPERATING_ROWS]))
    parts.append(
        _table(
            ["truth \\ verdict", "defect", "good"],
            [["defect", confusion["true_defect"], confusion["false_good"]], ["good", confusion["false_defect"], confusion["true_good"]]],
        )
    )
    optimistic = [[f"F1-max, {name}", f"{best['f1']:.3f} at threshold {best['threshold']:.4g}"] for name, best in metrics.get("f1_max", {}).items() if best]
    if optimistic:
        parts.append("<p>Optimistic (threshold tuned on the test set itself, an upper bound):</p>" + _table(["metric", "value"], optimistic))
    threshold_rows = pixel_threshold_rows(metrics)
    if threshold_rows:
        parts.append("<h3>Pixel thresholds</h3><p>The map above the one in use is the predicted defect area (PIXEL_THRESHOLD_POLICY).</p>")
        parts.append(_table(PIXEL_THRESHOLD_HEADER, threshold_rows))
    with_classifier = metrics.get("classifier_rocauc") is not None
    per_defect = [
        [kind, entry["count"], entry["image_rocauc"]] + ([entry.get("classifier_rocauc")] if with_classifier else []) + [entry.get("pixel_rocauc"), entry.get("pro")]
        for kind, entry in metrics["per_defect"].items()
    ]
    if per_defect:  # a test set of goods only has no defect type to list
        header = ["defect type", "images", "image ROCAUC"] + (["classifier ROCAUC"] if with_classifier else []) + ["pixel ROCAUC", "PRO"]
        parts += ["<h3>Per defect type</h3>", _table(header, per_defect)]
    figures = metrics.get("figures", {})
    if figures:
        parts.append("<h3>Curves and histograms</h3><div class='figures'>")
        parts += [f'<a href="{_link(path)}"><img src="{_link(path)}" alt="{escape(title)}" title="{escape(title)}"></a>' for title, path in figures.items()]
        parts.append("</div>")
    sheets = metrics.get("sheets", [])
    if sheets:
        parts.append("<h3>Localization sheets</h3><div class='sheets'>")
        parts += [f'<a href="{_link(s["picture"])}"><img src="{_link(s["picture"])}" alt="{escape(s["reason"])}"></a>' for s in sheets]
        parts.append("</div>")
    return "\n".join(parts)


def write_report(folder: Path, rows: list[dict], overall_figures: dict[str, str], title: str) -> Path:
    """Write `folder`/report.html from the categories' metrics; picture paths are relative to `folder`."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{_STYLE}</style></head><body>"]
    parts.append(f"<h1>{escape(title)}</h1>")
    parts.append("<details open><summary>What the figures mean</summary><ul class='muted'>"
                 + "".join(f"<li><b>{escape(term)}</b>: {escape(meaning)}</li>" for term, meaning in GLOSSARY)
                 + "<li>more in docs/evaluation.md in the suite's folder</li></ul></details>")
    parts.append("<h2>Summary</h2>" + _summary(rows))
    if overall_figures:
        parts.append("<div class='figures'>")
        parts += [f'<a href="{_link(p)}"><img src="{_link(p)}" alt="{escape(t)}"></a>' for t, p in overall_figures.items()]
        parts.append("</div>")
    parts += [_category(row) for row in rows]
    parts.append("</body></html>")
    path = Path(folder) / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8", errors="backslashreplace")  # a non-UTF-8 file name must not fail the page
    return path
