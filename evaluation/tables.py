"""The results as tables: for the terminal, for metrics.md, shaped like PaDiM's published tables.

Rows are categories plus their mean; columns image ROCAUC, pixel ROCAUC, PRO (and the
classifier's image ROCAUC when a model has one). A value that is undefined prints as n/a.
"""

from __future__ import annotations

SUMMARY_COLUMNS = [("image_rocauc", "image ROCAUC"), ("pixel_rocauc", "pixel ROCAUC"), ("pro", "PRO")]
CLASSIFIER_COLUMN = ("classifier_rocauc", "classifier ROCAUC")


def cell(value) -> str:
    """A metric as text: three decimals, or n/a where undefined."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summary_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """The summary columns; the classifier's only when some category has one."""
    columns = list(SUMMARY_COLUMNS)
    if any(row.get("classifier_rocauc") is not None for row in rows):
        columns.append(CLASSIFIER_COLUMN)
    return columns


def summary_table(rows: list[dict]) -> dict:
    """{"columns": [...], "rows": [{category, metric...}], "mean": {metric: mean over defined},
    "mean_over": {metric: how many categories define it}} (a category without masks has no pixel ROCAUC)."""
    columns = summary_columns(rows)
    table_rows = [{"category": row["category"], **{key: row.get(key) for key, _ in columns}} for row in rows]
    mean = {key: _mean([row.get(key) for row in rows]) for key, _ in columns}
    over = {key: sum(row.get(key) is not None for row in rows) for key, _ in columns}
    return {"columns": [key for key, _ in columns], "rows": table_rows, "mean": mean, "mean_over": over}


def mean_cells(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    """The mean row's cells; a mean over fewer categories than the table holds says over how many."""
    table = summary_table(rows)
    cells = []
    for key, _ in columns:
        over = table["mean_over"][key]
        cells.append(cell(table["mean"][key]) + (f" ({over} of {len(rows)})" if 0 < over < len(rows) else ""))
    return cells


def terminal_table(rows: list[dict]) -> str:
    """Fixed-width text: a row per category, its defect types indented below, the mean last."""
    columns = summary_columns(rows)
    lines = [f"{'category':<20}" + "".join(f" {title:>17}" for _, title in columns)]
    for row in rows:
        lines.append(f"{row['category']:<20}" + "".join(f" {cell(row.get(key)):>17}" for key, _ in columns))
        for kind, entry in row.get("per_defect", {}).items():
            values = "".join(f" {cell(entry.get(key)):>17}" for key, _ in columns)
            lines.append(f"  {kind:<18}{values}   ({entry['count']} images)")
    if len(rows) > 1:
        lines.append(f"{'mean':<20}" + "".join(f" {text:>17}" for text in mean_cells(rows, columns)))
    return "\n".join(lines)


# What the report's words mean, for a reader who does not know the methods (report.html and metrics.md open with it).
GLOSSARY = [
    ("image ROCAUC", "how well the image score (the anomaly map's maximum) ranks defect images above good ones: "
                     "1.0 perfect, 0.5 chance; it needs no threshold"),
    ("pixel ROCAUC", "the same for single pixels, all test images pooled: are defect pixels scored above good ones?"),
    ("PRO", "per-region overlap: the share of each defect region found, averaged over regions so a small defect counts "
            "as much as a large one, integrated until EVAL_PRO_FPR_LIMIT of the good pixels (0.3 by default) are flagged; 1.0 perfect"),
    ("honest goods", "good images the model never trained on (the validation images and, out-of-fold, training images "
                     "scored by a model fitted without them): the thresholds are chosen on them, never on the test set"),
    ("operating point", "the thresholds in force and what they give on this test set: recall is the share of defect "
                        "images found, the false-reject rate the share of good images flagged"),
    ("F1-max", "the best balance of precision and recall over every threshold, picked on the test set itself: optimistic"),
]


def markdown_summary(rows: list[dict]) -> str:
    """The PaDiM-style table in Markdown: categories down, metrics across, mean in bold (after the glossary)."""
    columns = summary_columns(rows)
    lines = [f"- **{term}**: {meaning}" for term, meaning in GLOSSARY] + [""]
    lines += ["| category | " + " | ".join(title for _, title in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row['category']} | " + " | ".join(cell(row.get(key)) for key, _ in columns) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{text}**" for text in mean_cells(rows, columns)) + " |")
    return "\n".join(lines)


OPERATING_ROWS = [
    ("precision", "precision"),
    ("recall", "recall"),
    ("f1", "F1"),
    ("false_reject_rate", "false-reject rate (good judged defect)"),
    ("escape_rate", "escape rate (defect judged good)"),
    ("accuracy", "accuracy"),
    ("image_threshold", "image score threshold in force"),
    ("classifier_threshold", "classifier threshold in force (n/a: no classifier)"),
]


PIXEL_THRESHOLD_HEADER = [
    "pixel threshold",
    "level",
    "in use",
    "how it was set",
    "good validation pixels at or above (validation images only)",
    "good test pixels at or above",
    "defect pixels at or above",
]


def _share(value) -> str:
    return "n/a" if value is None else f"{100 * value:.3g} %"


def pixel_threshold_rows(metrics: dict) -> list[list[str]]:
    """One row per pixel threshold the model carries (PIXEL_THRESHOLD_POLICY chooses the one in use):
    its level, how it was set, and how often good and defect pixels reach it."""
    rows = []
    for name, entry in metrics.get("pixel_thresholds", {}).items():
        if name == "chebyshev":
            how = (f"{'' if entry['in_use'] else 'an alternative, not in use: '}a bound that holds for any distribution of the "
                   f"good pixels: at most {_share(entry['bound'])} of them flagged (docs/models.md)")
        else:
            how = f"flags {_share(entry['rate'])} of the honest good pixels (their quantile: validation and out-of-fold maps)"
        rows.append([
            name, f"{entry['threshold']:.6g}", "yes" if entry["in_use"] else "no", how,
            _share(entry.get("validation_exceedance")), _share(entry["test_good_exceedance"]), _share(entry["test_defect_pixel_recall"]),
        ])
    return rows


def honest_goods_words(metrics: dict) -> str:
    """Which goods the operating point was chosen on: with updates, the goods they added too (scored
    before the model learned them), which then may outnumber the validation goods."""
    updates = (metrics.get("model") or {}).get("updates") or 0
    added = f" and goods added by {updates} update{'s' if updates != 1 else ''}" if updates else ""
    return f"honest goods (validation, out-of-fold{added})"


def markdown_category(metrics: dict) -> str:
    """One category's details: operating point, confusion matrix, optimistic F1-max, per defect type, notes."""
    operating = metrics["operating"]
    confusion = operating["confusion"]
    lines = [f"## {metrics['category']}", ""]
    for note in metrics.get("notes", []):
        lines.append(f"- note: {note}")
    lines += [
        "",
        f"Operating point ({operating['source']}; threshold chosen on {honest_goods_words(metrics)}, not on the test set):",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {title} | {cell(operating[key])} |" for key, title in OPERATING_ROWS]
    lines += [
        "",
        "| | judged defect | judged good |",
        "|---|---|---|",
        f"| defect | {confusion['true_defect']} | {confusion['false_good']} |",
        f"| good | {confusion['false_defect']} | {confusion['true_good']} |",
        "",
    ]
    for name, best in metrics.get("f1_max", {}).items():
        if best is not None:
            lines.append(f"F1-max of the {name} over test thresholds (optimistic): {best['f1']:.3f} at {best['threshold']:.4g}")
    threshold_rows = pixel_threshold_rows(metrics)
    if threshold_rows:
        lines += ["", "Pixel thresholds (the map above the one in use is the predicted defect area):", ""]
        lines += ["| " + " | ".join(PIXEL_THRESHOLD_HEADER) + " |", "|---" * len(PIXEL_THRESHOLD_HEADER) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in threshold_rows]
    keys = ["image_rocauc"] + (["classifier_rocauc"] if metrics.get("classifier_rocauc") is not None else []) + ["pixel_rocauc", "pro"]
    titles = {"image_rocauc": "image ROCAUC", "classifier_rocauc": "classifier ROCAUC", "pixel_rocauc": "pixel ROCAUC", "pro": "PRO"}
    if metrics["per_defect"]:  # a test set of goods only has no defect type to list
        lines += ["", "| defect type | images | " + " | ".join(titles[k] for k in keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for kind, entry in metrics["per_defect"].items():
        lines.append(f"| {kind} | {entry['count']} | " + " | ".join(cell(entry.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"
