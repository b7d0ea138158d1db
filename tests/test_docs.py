"""The documentation a user reads: the settings reference matches config.py and settings.py.

Fast and torch-free: tools/settings_reference.py imports settings (and so config), nothing else."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import settings_reference  # noqa: E402

import settings  # noqa: E402

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def test_every_setting_has_its_entry_in_the_settings_reference():
    page = (DOCS / "settings.md").read_text(encoding="utf-8")
    missing = [key for key in settings.defaults() if f"### `{key}`" not in page]
    assert not missing, f"docs/settings.md lacks {missing}: run .venv/bin/python tools/settings_reference.py"


def test_the_settings_reference_is_what_the_script_writes_now():
    page = (DOCS / "settings.md").read_text(encoding="utf-8")
    fresh = settings_reference.render(call_machine_rules=False)
    assert settings_reference.comparable(page) == settings_reference.comparable(fresh), (
        "docs/settings.md is out of date: run .venv/bin/python tools/settings_reference.py"
    )


def test_the_reference_shows_comments_defaults_and_rules():
    """A setting's entry holds config.py's comment, its default and the rule's wording."""
    groups = settings_reference.read_config(settings_reference.CONFIG_FILE.read_text(encoding="utf-8"))
    by_name = {s.name: (g.title, s) for g in groups for s in g.settings}
    assert set(by_name) == set(settings.defaults())
    title, image_size = by_name["IMAGE_SIZE"]
    assert title.startswith("Geometry") and any('"auto"' in line for line in image_size.comment)
    page = settings_reference.render(call_machine_rules=False)
    entry = page[page.index("### `CORESET_RATIO`") :].split("###", 2)[1]
    assert "Default `0.1`" in entry and settings.RULES["CORESET_RATIO"].allowed in entry and "greedy k-center" in entry
