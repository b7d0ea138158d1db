"""Writes docs/settings.md, the settings reference, from config.py's comments and settings.RULES.

Why generated: config.py is where a user edits a setting and where its comment is written, and
settings.RULES is what the scripts actually accept. A hand-written reference would drift from
both; this one is rebuilt by one command after a setting is added or changed:

    .venv/bin/python tools/settings_reference.py          # rewrites docs/settings.md
    .venv/bin/python tools/settings_reference.py --check  # exit 1 when docs/settings.md is stale

tests/test_docs.py fails while the page differs from what this script writes. Nothing here imports
torch: a rule whose wording depends on the machine (DEVICE) is written as this machine words it,
between markers the test ignores.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIG_FILE = ROOT / "config.py"
OUTPUT_FILE = ROOT / "docs" / "settings.md"

# Text that depends on the machine that runs the script sits between these markers.
MACHINE_START = "<!-- machine -->"
MACHINE_END = "<!-- /machine -->"
MACHINE_SPAN = re.compile(re.escape(MACHINE_START) + ".*?" + re.escape(MACHINE_END), re.S)

GROUP_HEADING = re.compile(r"^#\s*---\s*(?P<title>.*?)\s*-*\s*$")
DOCS_PATH = re.compile(r"\bdocs/(?P<page>[a-z_]+\.md)\b")


@dataclass
class Setting:
    """One constant of config.py as the reference shows it."""

    name: str
    default: str  # the value as written in config.py
    comment: list[str]  # the comment block right above it, '#' stripped, indentation kept
    inline: str  # the comment at the end of its line


@dataclass
class Group:
    """A `# --- Title ---` section of config.py and its settings, in file order."""

    title: str
    settings: list[Setting]


def _comments_by_line(source: str) -> dict[int, tuple[int, str]]:
    """Line number -> (column, text after '#') of every comment in `source`."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = (token.start[1], token.string[1:])
    return found


def read_config(source: str) -> list[Group]:
    """config.py's settings in groups, each with its comment block and inline comment.

    A comment block belongs to the setting directly below it (no blank line between); a group
    starts at each `# --- Title ---` line."""
    lines = source.splitlines()
    comments = _comments_by_line(source)
    assignments = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper():
                assignments[node.lineno] = node
    groups: list[Group] = []
    block: list[str] = []
    number = 0
    while number < len(lines):
        number += 1
        line = lines[number - 1]
        stripped = line.strip()
        heading = GROUP_HEADING.match(stripped)
        if heading:
            groups.append(Group(heading.group("title"), []))
            block = []
        elif stripped.startswith("#"):
            block.append(comments.get(number, (0, stripped[1:]))[1])
        elif number in assignments:
            node = assignments[number]
            value = ast.get_source_segment(source, node.value) or ""
            inline = ""
            for row in range(node.lineno, node.end_lineno + 1):
                column, text = comments.get(row, (0, ""))
                if text and column > 0:
                    inline = text.strip()
            if not groups:
                groups.append(Group("Other", []))
            groups[-1].settings.append(Setting(node.targets[0].id, value, block, inline))
            block = []
            number = node.end_lineno
        else:
            block = []
    return groups


def _link_docs(text: str) -> str:
    """`docs/x.md` in a comment -> a link to that page (this page lives in docs/)."""
    return DOCS_PATH.sub(lambda m: f"[docs/{m.group('page')}]({m.group('page')})", text)


def comment_markdown(comment: list[str]) -> list[str]:
    """A config.py comment block as markdown.

    Plain lines make paragraphs. A list item starts at a line indented by 1-3 spaces, at a line
    that starts with a quoted value and a colon ("shrink": ...), or, inside a list, at a line
    after one that ends with ';'. Inside a list, a line indented further, or one after a line that
    ends mid-sentence, continues the item; a line after one that ends with '.' ends the list."""
    out: list[str] = []
    in_list = False
    previous = ""
    for raw in comment:
        text = raw[1:] if raw.startswith(" ") else raw  # the space after '#'
        indent = len(text) - len(text.lstrip(" "))
        body = _link_docs(text.strip())
        if not body:
            continue
        quoted_item = indent == 0 and re.match(r'^"[^"]*":', body)
        if 1 <= indent <= 3 or quoted_item or (in_list and indent == 0 and previous.endswith(";")):
            if not in_list and out:
                out.append("")
            out.append(f"- {body}")
            in_list = True
        elif in_list and (indent >= 4 or not previous.endswith((".", ":"))):
            out.append(f"  {body}")
        else:
            if in_list:
                out.append("")
                in_list = False
            out.append(body)
        previous = body
    return out


def _sentence(text: str) -> str:
    """An inline comment as a sentence: a plain first word capitalized (not `test.py`, nor a one-letter
    symbol such as the paper's b), a full stop."""
    if re.match(r"^(a|[a-z]{2,})(?=[ ,;:])", text):
        text = text[0].upper() + text[1:]
    return _link_docs(text) + ("" if text.endswith(".") else ".")


def _title_and_page(title: str) -> tuple[str, str]:
    """A group heading without its "(docs/x.md)" pointer, and that pointer as a link ('' if none)."""
    match = re.search(r"\s*\((?P<inside>[^()]*docs/[a-z_]+\.md[^()]*)\)", title)
    if not match:
        return title, ""
    return title[: match.start()] + title[match.end():], _link_docs(match.group("inside"))


def allowed_text(rule, call_machine_rules: bool = True) -> str:
    """What the rule says a value may be; a callable's answer (it depends on the machine) marked."""
    if not callable(rule.allowed):
        return rule.allowed
    said = rule.allowed() if call_machine_rules else "(depends on the machine)"
    return f"{MACHINE_START}{said}{MACHINE_END} (checked on the machine that runs the script)"


INTRODUCTION = """\
# Settings reference

<!-- Generated by tools/settings_reference.py from config.py and settings.py: do not edit by hand.
     Run `.venv/bin/python tools/settings_reference.py` after changing a setting. -->

Every setting lives in `config.py`. Change one in two ways:

- edit its value in `config.py` (it then holds for every run), or
- give it for one run on the command line as `KEY=VALUE`:
  `python train.py DATASET_DIR=/data/bottles IMAGE_SIZE=auto CENTER_CROP=1.0`.

A value on the command line has the type of the default (ints are accepted where a float is
expected; a list or tuple where a tuple is expected). Every value, edited or given, is checked
before any work starts: a bad one is a one-line `error:` naming the setting and what is allowed,
and the script exits with code 2 ([reliability.md](reliability.md)).

`train.py` saves the settings that shape a model with it; `test.py` and `eval.py` use the model's
and say which `config.py` values it overrides.

The settings that matter first on your own parts: `DATASET_DIR`, `ANOMALY_MODEL`, `IMAGE_SIZE`
and `CENTER_CROP` ([geometry.md](geometry.md)), `BACKBONE` and `WEIGHTS`,
`IMAGE_FALSE_REJECT_RATE` (the image threshold) and `CLASSIFIER`.

Below, each group of `config.py` in its order: the setting, its default, what it may hold (from
`settings.RULES`), and its comment from `config.py`.
"""


def render(call_machine_rules: bool = True) -> str:
    """The whole page."""
    import settings  # imports config.py too

    source = CONFIG_FILE.read_text(encoding="utf-8")
    groups = read_config(source)
    out = [INTRODUCTION]
    titles = [_title_and_page(group.title) for group in groups]
    out.append("Groups: " + ", ".join(f"[{title}](#{_anchor(title)})" for title, _ in titles) + ".\n")
    for group, (title, page) in zip(groups, titles):
        out.append(f"## {title}\n")
        if page:
            out.append(f"More: {page}.\n")
        for setting in group.settings:
            out.append(f"### `{setting.name}`\n")
            rule = settings.RULES.get(setting.name)
            allowed = allowed_text(rule, call_machine_rules) if rule is not None else "no rule in settings.RULES"
            out.append(f"Default `{setting.default}`. Allowed: {allowed}.\n")
            body = comment_markdown(setting.comment)
            if setting.inline:
                if body and not body[-1].startswith(("-", " ")):
                    body.append("")
                body.append(_sentence(setting.inline))
            if body:
                out.append("\n".join(body) + "\n")
    out.append("## Rules between settings\n")
    for keys, _test, allowed in settings.CROSS_RULES:
        out.append(f"- {', '.join(f'`{key}`' for key in keys)}: {allowed}.")
    old = ", ".join(f"`{key}` (default {value})" for key, value in settings.OLD_GEOMETRY.items())
    out.append(
        f"\n## Old spellings\n\nStill read, on the command line or left in an old `config.py`: {old}. "
        "`RESIZE=R CROP=C` means `IMAGE_SIZE = (C, C)`, `CENTER_CROP = C / R`; giving both spellings "
        "at once is refused ([geometry.md](geometry.md)).\n"
    )
    missing = sorted(set(settings.defaults()) - {s.name for g in groups for s in g.settings})
    if missing:
        raise SystemExit(f"error: config.py settings the reader did not find: {', '.join(missing)}")
    return "\n".join(out).rstrip() + "\n"


def _anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


def comparable(text: str) -> str:
    """The page with machine-dependent text blanked, for comparing two machines' pages."""
    return MACHINE_SPAN.sub(MACHINE_START + MACHINE_END, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/settings.md is not what this script writes")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT_FILE.read_text(encoding="utf-8") if OUTPUT_FILE.exists() else ""
        if comparable(current) != comparable(text):
            print(f"{OUTPUT_FILE.relative_to(ROOT)} is out of date: run .venv/bin/python tools/settings_reference.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT_FILE.parent.mkdir(exist_ok=True)
    temporary = OUTPUT_FILE.with_name(f".{OUTPUT_FILE.name}.partial")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(OUTPUT_FILE)
    print(f"wrote {OUTPUT_FILE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
