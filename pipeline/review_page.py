"""The review page of serve.py: the latest inspected images and the reviewer's corrections.

The server keeps its own copy of each of the latest SERVE_RECENT images (the bytes it received or
read), under an id it made; a correction copies that copy into REVIEW_DIR/good/ or
REVIEW_DIR/defect/ as <id>.<format>, so nothing a client sends (a file name, a path) ever names a
file on disk. Pictures are drawn when the page shows an image, not when it is inspected.
"""

from __future__ import annotations

import html
import io
import itertools
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import numpy as np
from PIL import Image

from pipeline.inspection import Inspection, Inspector, PictureDrawer
from pipeline.pictures import png_bytes

LABELS = ("good", "defect")
PAGE_PREVIEW_SIZE = 320  # longest side of the overlays on the page
# the file ending a stored copy gets, by format: all in IMAGE_EXTENSIONS, so that an update reads it
_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "MPO": ".jpg", "GIF": ".gif", "WEBP": ".webp", "PPM": ".ppm"}


def image_suffix(data: bytes) -> str | None:
    """The file ending for these image bytes, from their header (None for a format outside IMAGE_EXTENSIONS)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return _SUFFIXES.get(image.format or "")
    except (OSError, ValueError, SyntaxError):
        return None


@dataclass
class RecentImage:
    """One inspected image as the page shows it."""

    id: str  # made by the server: the only name a stored copy ever gets
    source: str  # "http" or "folder"
    name: str  # what the sender or the folder called it: shown, never used as a path
    data: bytes
    inspection: Inspection
    drawer: PictureDrawer  # how the model that judged it draws pictures (not the model: a swapped-out one must be freed)
    received: float = field(default_factory=time.time)
    correction: str = ""  # "good" / "defect" once the reviewer said so
    overlay_png: bytes = b""  # drawn on first view


class RecentImages:
    """The latest inspected images (both sources), the verdict counts, and corrections."""

    def __init__(self, keep: int, review_dir: Path, draw: Callable[[PictureDrawer, Inspection, np.ndarray, int], tuple]) -> None:
        self.keep = keep
        self._draw = draw  # (drawer, inspection, rgb, preview size) -> `PictureDrawer.pictures`' arrays, made where torch runs
        self.review_dir = Path(review_dir)
        self._images: OrderedDict[str, RecentImage] = OrderedDict()
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self.counts = {"good": 0, "defect": 0}
        # ids name the corrections' files: the start time and a random part, so a restart within the
        # same second (or a second server) never reuses one and overwrites a correction
        self._stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"

    def add(self, source: str, name: str, data: bytes, inspection: Inspection, inspector: Inspector) -> str:
        """Keep this image (dropping the oldest beyond `keep`) with how `inspector` draws its pictures,
        not `inspector` itself (a model swapped out must be freed); returns its id."""
        drawer = inspector.drawer
        with self._lock:
            image_id = f"{self._stamp}-{next(self._counter):06d}"
            self._images[image_id] = RecentImage(image_id, source, name, data, inspection, drawer)
            self.counts[inspection.verdict] += 1
            while len(self._images) > self.keep:
                self._images.popitem(last=False)
        return image_id

    def get(self, image_id: str) -> RecentImage | None:
        with self._lock:
            return self._images.get(image_id)

    def latest(self) -> list[RecentImage]:
        with self._lock:
            return list(reversed(self._images.values()))

    def overlay(self, image: RecentImage) -> bytes:
        """The heat-map overlay of a kept image as PNG, drawn once."""
        if not image.overlay_png:
            overlay, _ = self._draw(image.drawer, image.inspection, image.drawer.rgb(image.data, image.id), PAGE_PREVIEW_SIZE)
            image.overlay_png = png_bytes(overlay)
        return image.overlay_png

    def mask(self, image: RecentImage) -> bytes:
        """The predicted defect mask of a kept image at its own size, as PNG."""
        _, mask = self._draw(image.drawer, image.inspection, image.drawer.rgb(image.data, image.id), 64)
        return png_bytes(mask)

    def correct(self, image: RecentImage, label: str) -> Path:
        """Copy the kept image into REVIEW_DIR/<label>/<id>.<format> (atomically; a copy under the
        other label from an earlier correction is removed); returns the copy's path."""
        target_dir = self.review_dir / label
        target_dir.mkdir(parents=True, exist_ok=True)
        suffix, data = image_suffix(image.data), image.data
        if suffix is None:  # a format the updates would not read (an icon, a JPEG 2000): the pixels as inspected, in PNG
            suffix, data = ".png", png_bytes(image.drawer.rgb(image.data, image.id))
        file_name = image.id + suffix
        temporary = target_dir / f".{file_name}.partial"
        try:
            temporary.write_bytes(data)
            os.replace(temporary, target_dir / file_name)
        except OSError:  # a full or read-only disk: no partial copy left for an update to trip on
            temporary.unlink(missing_ok=True)
            raise
        for other in LABELS:
            if other != label:
                (self.review_dir / other / file_name).unlink(missing_ok=True)
        image.correction = label
        return target_dir / file_name


def _number(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


_STYLE = (
    "body{font-family:sans-serif;margin:1em}.card{display:inline-block;vertical-align:top;margin:.5em;padding:.5em;"
    "border:3px solid #999;width:" + str(PAGE_PREVIEW_SIZE) + "px}.card.defect{border-color:#c00}.card.good{border-color:#080}"
    ".verdict{font-weight:bold;font-size:1.2em}form{display:inline}.note{color:#a60}"
)


def render_refusal() -> str:
    """What a server with SERVE_TOKEN answers a page request without it (status 401)."""
    return (
        f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Inspection review</title><style>{_STYLE}</style></head><body>"
        "<h1>Inspection review</h1><p class=\"note\">This server needs its token: open this page as /?token=&lt;SERVE_TOKEN&gt;</p>"
        "</body></html>"
    )


def render_page(recent: RecentImages, model_line: str, token: str, note: str) -> str:
    """The review page as one HTML document: counts, then one card per image, newest first. `token`
    (the server's, "" when it has none) is carried by the buttons and the pictures' addresses."""
    hidden = f'<input type="hidden" name="token" value="{html.escape(token)}">' if token else ""
    query = f"?token={html.escape(quote(token, safe=''))}" if token else ""  # a # or & in the token would end the query
    cards = []
    for image in recent.latest():
        result = image.inspection
        buttons = ""
        for label in LABELS:
            buttons += (
                f'<form method="post" action="/review/{image.id}{query}">{hidden}'
                f'<input type="hidden" name="label" value="{label}">'
                f'<button type="submit" class="mark-{label}" data-id="{image.id}">this is {"good" if label == "good" else "a defect"}</button></form>'
            )
        corrected = f'<p class="correction">reviewer: {image.correction}</p>' if image.correction else ""
        cards.append(
            f'<div class="card {result.verdict}" id="image-{image.id}" data-verdict="{result.verdict}">'
            f'<img src="/pictures/{image.id}/overlay.png{query}" alt="heat map of {html.escape(image.name)}" width="{PAGE_PREVIEW_SIZE}">'
            f'<p class="verdict">{result.verdict}</p>'
            f'<p>score {_number(result.image_score)} ({_number(result.normalized_score, 3)} x threshold)'
            + (f", classifier {_number(result.classifier_probability, 3)}" if result.classifier_probability is not None else "")
            + f"</p><p class=\"name\">{html.escape(image.name)} &middot; {image.source} &middot; "
            f"{time.strftime('%H:%M:%S', time.localtime(image.received))}</p>{corrected}{buttons}</div>"
        )
    warning = f'<p class="note">{html.escape(note)}</p>' if note else ""
    body = "".join(cards) or "<p>No image inspected yet.</p>"
    return (
        f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Inspection review</title><style>{_STYLE}</style></head><body>"
        f"<h1>Inspection review</h1><p>{html.escape(model_line)}</p>"
        f'<p class="counts">good <span id="count-good">{recent.counts["good"]}</span> &middot; '
        f'defect <span id="count-defect">{recent.counts["defect"]}</span> &middot; <a href="/{query}">refresh</a></p>'
        f"{warning}<div id=\"images\">{body}</div></body></html>"
    )
