"""The repository stands alone: no pointer to files outside it, and every docs/ page it names exists.

Users only ever see this repository, so design notes and the paper's numbers live in docs/design.md and
docs/paper.md; README.md, docstrings and comments must point there, with section numbers that exist.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCANNED_DIRS = ("iomm_jax/", "configs/", "bench/", "launch/", "docs/")
SCANNED_FILES = ("README.md", "Makefile")
# Pointers to material outside the repository (the files they name are not part of it).
FORBIDDEN = ("../shared", "shared/DESIGN", "DESIGN.md", "iomm-paper.md")  # case-sensitive: docs/design.md is fine
DOC_REF = re.compile(r"\bdocs/[\w./-]+\.md\b")
# "docs/design.md §4", "docs/design.md §2, §4", "docs/paper.md §2.3"
SECTION_REF = re.compile(r"\b(docs/[\w./-]+\.md)((?:\s*,?\s*§\d+(?:\.\d+)*)+)")
MD_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _repo_files() -> list[pathlib.Path]:
  """Tracked files plus new, not-ignored ones, restricted to the scanned folders and files."""
  if shutil.which("git") is None or not (ROOT / ".git").exists():
    pytest.skip("not a git checkout")
  out = subprocess.run(
      ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
  ).stdout.decode()
  names = sorted({n for n in out.split("\0") if n})
  keep = [n for n in names if n.startswith(SCANNED_DIRS) or n in SCANNED_FILES]
  return [ROOT / n for n in keep if (ROOT / n).is_file()]


def _text(path: pathlib.Path) -> str | None:
  try:
    return path.read_text(encoding="utf-8")
  except (UnicodeDecodeError, OSError):
    return None  # binary files cannot hold a readable pointer


def test_scanned_files_found():
  names = {p.relative_to(ROOT).as_posix() for p in _repo_files()}
  for must in ("README.md", "docs/design.md", "docs/paper.md", "iomm_jax/config.py"):
    assert must in names, f"{must} is missing from the repository (git ls-files)"


def test_no_pointers_outside_the_repository():
  hits = []
  for path in _repo_files():
    text = _text(path)
    if text is None:
      continue
    for lineno, line in enumerate(text.splitlines(), 1):
      for bad in FORBIDDEN:
        if bad in line:
          hits.append(f"{path.relative_to(ROOT)}:{lineno}: {bad!r} in {line.strip()!r}")
  assert not hits, (
      "these lines point outside the repository; point them at docs/design.md or docs/paper.md "
      "instead:\n" + "\n".join(hits)
  )


def test_named_docs_pages_exist():
  missing = []
  for path in _repo_files():
    text = _text(path)
    if text is None:
      continue
    for ref in sorted(set(DOC_REF.findall(text))):
      if not (ROOT / ref).is_file():
        missing.append(f"{path.relative_to(ROOT)} names {ref}, which does not exist")
  assert not missing, "\n".join(missing)


def _headings(page: pathlib.Path) -> set[str]:
  """Section numbers of a markdown page: '## 4. Conventions' → '4', '### 1.6 Sizes' → '1.6'."""
  found = set()
  for line in page.read_text(encoding="utf-8").splitlines():
    m = re.match(r"#+\s+(\d+(?:\.\d+)*)\.?\s", line)
    if m:
      found.add(m.group(1))
  return found


def test_section_references_exist():
  wrong = []
  for path in _repo_files():
    text = _text(path)
    if text is None:
      continue
    for ref, sections in SECTION_REF.findall(text):
      page = ROOT / ref
      if not page.is_file():
        continue  # reported by test_named_docs_pages_exist
      have = _headings(page)
      for sec in re.findall(r"§(\d+(?:\.\d+)*)", sections):
        if sec not in have:
          wrong.append(
              f"{path.relative_to(ROOT)} cites {ref} §{sec}, which has no such section "
              f"(sections: {', '.join(sorted(have))})"
          )
  assert not wrong, "\n".join(wrong)


def test_relative_links_in_docs_and_readme_resolve():
  broken = []
  for path in _repo_files():
    if path.suffix != ".md":
      continue
    for target in MD_LINK.findall(path.read_text(encoding="utf-8")):
      if "://" in target or target.startswith("mailto:"):
        continue
      if not (path.parent / target).exists():
        broken.append(f"{path.relative_to(ROOT)} links to {target}, which does not exist")
  assert not broken, "\n".join(broken)
