"""The documentation against the repository: the README stays short, every
relative link and anchor resolves, every command names a module and flag
file that exist, CI runs the README's commands, and no text cites a
tracker's issue numbers (a reader has no tracker)."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300
# The text searched for issue references: the project's own files only.
SCANNED_DIRS = ("mosp_jax", "bridge", "experiments", "tests", "docs", ".ci")
SCANNED_SUFFIXES = (".py", ".md", ".flags", ".sh")
ISSUE_REF = re.compile(r"[Ii]ssue [0-9]|issue [0-9]+")

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _slug(heading: str) -> str:
  """GitHub's anchor of a Markdown heading."""
  text = heading.strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
  text = _FENCE.sub("", page.read_text(encoding="utf-8"))
  return {_slug(m.group(1))
          for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def _links(page: pathlib.Path) -> list[str]:
  text = _FENCE.sub("", page.read_text(encoding="utf-8"))
  return [m.group(1) for m in _LINK.finditer(text)]


def _commands(page: pathlib.Path) -> list[str]:
  """Indented or fenced shell lines of a page, continuations joined."""
  lines = page.read_text(encoding="utf-8").splitlines()
  out: list[str] = []
  joined = ""
  for line in lines:
    if line.startswith("    ") or joined:
      joined += " " + line.strip().rstrip("\\")
      if not line.rstrip().endswith("\\"):
        out.append(joined.strip())
        joined = ""
  return out


def test_slug_matches_github():
  assert _slug("Errors and resume") == "errors-and-resume"
  assert _slug("The solver API (`mosp_jax/solvers/`)") == (
      "the-solver-api-mosp_jaxsolvers")


def test_readme_is_short():
  n = len(README.read_text(encoding="utf-8").splitlines())
  assert n <= README_MAX_LINES, f"README.md has {n} lines"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
  broken = []
  for link in _links(page):
    if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
      continue
    path, _, anchor = link.partition("#")
    target = (page.parent / path).resolve() if path else page
    if not target.exists():
      broken.append(link)
    elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
      broken.append(link)
  assert not broken, f"{page.name}: broken links {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_name_existing_modules_and_flag_files(page):
  missing = []
  for command in _commands(page):
    for module in re.findall(r"python -m ([\w.]+)", command):
      if module.split(".")[0] not in ("mosp_jax", "bridge", "experiments"):
        continue  # pip, pytest, mypy, ruff
      path = ROOT / module.replace(".", "/")
      if not (path.with_suffix(".py").exists()
              or (path / "__main__.py").exists()):
        missing.append(module)
    for flagfile in re.findall(r"--flagfile=(\S+)", command):
      if not (ROOT / flagfile).exists():
        missing.append(flagfile)
  assert not missing, f"{page.name}: {missing}"


def test_ci_runs_the_readme_install_and_test_commands():
  readme = README.read_text(encoding="utf-8").splitlines()
  ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
  install = [x.strip() for x in readme
             if x.startswith("    python -m pip install")]
  test = [x.strip() for x in readme
          if x.startswith("    python -m ruff check .")]
  assert len(install) == 1 and len(test) == 1
  assert install[0] in ci and test[0] in ci
  for step in ("ruff check .", "python -m mypy", "python -m pytest -q"):
    assert step in test[0]


def test_docs_pages_start_with_how_to_reproduce():
  for page in sorted((ROOT / "docs").glob("*.md")):
    if page.name == "METHOD_NOTES.md":
      continue
    headings = re.findall(r"^## (.+)$", page.read_text(encoding="utf-8"),
                          re.M)
    assert headings[:1] == ["How to reproduce"], page.name


def test_no_issue_numbers():
  files = [p for p in ROOT.glob("*") if p.suffix in SCANNED_SUFFIXES]
  for d in SCANNED_DIRS:
    files += [p for p in (ROOT / d).rglob("*")
              if p.suffix in SCANNED_SUFFIXES and p.is_file()]
  found = []
  for f in files:
    for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
      if ISSUE_REF.search(line):
        found.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
  assert len(files) > 50 and not found, "\n".join(found)
