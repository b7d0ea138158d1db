"""The documentation a user reads: the settings reference matches config.py and settings.py, the
README stays short and gives CI's test command, and every relative link leads somewhere.

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


def test_the_readme_stays_short():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300 and len(text) <= 30_000, "README.md: at most 300 lines and 30,000 characters; move detail into docs/"


def test_the_readme_gives_the_test_command_ci_runs():
    """CI (.ci/run) calls the README's test command: the two must stay the same line."""
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command in README.read_text(encoding="utf-8")


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, spaces to '-')."""
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        found.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    """A link to a file that is not there, or to a heading a page does not have, fails."""
    broken = []
    for match in LINK.finditer(FENCE.sub("", page.read_text(encoding="utf-8"))):
        target = match.group("target")
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"
