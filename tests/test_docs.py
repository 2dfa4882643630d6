"""The documentation belongs to the repository (issue 24.2): a clone has README.md, docs/ and bench/'s
reports, and nothing else. Every markdown link resolves to a file inside the repository, and no path a
document mentions leads out of it (`../shared/DESIGN.md` did, five times) or names a document that is
not there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

DOCUMENTS = sorted(
    p for p in REPO.rglob("*.md") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)
)
# absolute paths a document may name: scratch outputs of recorded commands, the system's own files
SCRATCH = ("/tmp/", "/proc/", "/dev/")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a path in backticks or bare: something/with/slashes, or a file name ending in .md
MENTION = re.compile(r"(?<![\w.~/-])((?:\.\.?/|/)?[\w.-]+(?:/[\w.*<>-]+)+|[\w.-]+\.md)\b")


def _outside(path: Path) -> bool:
    return not path.resolve().is_relative_to(REPO.resolve())


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve_inside_the_repository(document):
    text = document.read_text()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):  # a web address, or this page's anchor
            continue
        path = (document.parent / target.split("#")[0]).resolve()
        assert not _outside(path), f"{document.name} links {target}, outside the repository"
        assert path.exists(), f"{document.name} links {target}, which the repository does not hold"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_mentioned_paths_stay_inside_and_mentioned_documents_exist(document):
    text = LINK.sub(" ", document.read_text())
    text = re.sub(r"https?://\S+", " ", text)
    for mention in MENTION.findall(text):
        if mention.startswith("../") or (mention.startswith("/") and not mention.startswith(SCRATCH)):
            for base in (REPO, document.parent):  # a command's path (from the root), or the page's own
                assert not _outside(base / mention), f"{document.name} mentions {mention}, out of the repo"
        if mention.endswith(".md") and "<" not in mention and "*" not in mention:
            name = Path(mention).name
            held = [p for p in DOCUMENTS if p.name == name]
            assert held, f"{document.name} mentions {mention}, which the repository does not hold"


def test_readme_sends_readers_to_every_page_of_docs():
    readme = (REPO / "README.md").read_text()
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert pages and all(f"](docs/{page})" in readme for page in pages), pages
