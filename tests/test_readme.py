"""The README's code runs as written, its commands are what CI runs, and no documentation link leaves the repository."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def code_blocks(markdown: str, language: str) -> list[str]:
    """The fenced code blocks of ``markdown`` in ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", markdown, flags=re.DOTALL | re.MULTILINE)


PYTHON_SNIPPETS = code_blocks(README, "python")


def test_the_readme_has_its_snippets():
    assert len(PYTHON_SNIPPETS) >= 4


@pytest.mark.parametrize("snippet", PYTHON_SNIPPETS, ids=[f"snippet{i}" for i in range(len(PYTHON_SNIPPETS))])
def test_readme_snippet_runs_on_its_own(snippet):
    """Each snippet in a fresh namespace: it imports what it uses, defines its inputs, and its asserts hold."""
    exec(compile(snippet, "README.md", "exec"), {"__name__": "readme_snippet"})


def test_ci_runs_the_readme_test_command():
    commands = [line for block in code_blocks(README, "bash") for line in block.splitlines()]
    test_command = next(c for c in commands if "pytest" in c)
    pytest_call = test_command.split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert f'python -m pip install -q -e ".[test]"' in ci and 'pip install -e ".[test]"' in test_command
    assert shlex.split(pytest_call) == ["python", "-m", "pytest", "-q", "-n", "2"]
    assert re.search(rf"^{re.escape(pytest_call)}$", ci, flags=re.MULTILINE)


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings of ``markdown``."""
    headings = re.findall(r"^#+ (.*)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_in_the_repository_and_resolve(document):
    text = document.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        assert not re.match(r"[a-z]+:", link), f"{document.name} links outside the repository: {link}"
        path, _, anchor = link.partition("#")
        target = (document.parent / path).resolve() if path else document
        assert target.is_relative_to(ROOT) and target.exists(), f"{document.name}: {link} does not resolve"
        if anchor and target.suffix == ".md":
            assert anchor in anchors(target.read_text()), f"{document.name}: no heading for #{anchor}"
