"""The README and the pages of docs/ link to each other and to the repository's files: every relative link points
to a file that exists, and every ``#anchor`` to a heading of the page it names (GitHub's anchors)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

# [text](target) and ![alt](target), outside code; the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text):
    """The page without its fenced code blocks and inline code spans (links there are not links)."""
    lines, fence = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fence = not fence
            lines.append("")
            continue
        lines.append("" if fence else line)
    return re.sub(r"`[^`\n]*`", "", "\n".join(lines))


def anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to
    hyphens."""
    text = re.sub(r"`", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """The anchors of a page's headings (outside code), duplicates numbered -1, -2 as GitHub does."""
    seen, result = {}, set()
    fence = False
    for line in path.read_text().split("\n"):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        match = None if fence else re.match(r"#{1,6} +(.*?) *#*$", line)
        if match:
            base = anchor(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
    return result


def links(path):
    return [m.group(1) for m in LINK.finditer(prose(path.read_text()))]


def test_the_pages_exist_and_are_linked_from_the_readme():
    names = {p.name for p in PAGES[1:]}
    assert {"sampling.md", "what-happens-when.md", "evaluation.md", "reproduction.md", "gpu.md", "analysis.md",
            "api.md"} <= names
    readme_targets = {t.split("#")[0] for t in links(ROOT / "README.md")}
    assert {f"docs/{name}" for name in names} <= readme_targets


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    problems = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, fragment = target.partition("#")
        file = page if not path else (page.parent / path).resolve()
        if not file.exists():
            problems.append(f"{target}: no file {file}")
        elif fragment and (file.suffix != ".md" or fragment not in anchors(file)):
            problems.append(f"{target}: no heading #{fragment} in {file.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


def test_the_anchor_rule():
    assert anchor("Demo on a CPU: `make demo`") == "demo-on-a-cpu-make-demo"
    assert anchor("Relation to the upstream (TensorFlow) evaluator") == "relation-to-the-upstream-tensorflow-evaluator"
    assert anchor("What happens when...") == "what-happens-when"
    assert anchor("Reproducing the paper's ADM tables") == "reproducing-the-papers-adm-tables"
