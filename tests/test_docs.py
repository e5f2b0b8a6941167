"""The documentation against the code: docs/CONFIG.md names every key add_evalnorm_config adds,
with its default; links resolve; the README stays short and starts with the two commands; and
nothing a user reads speaks of how the project was made."""

import ast
import re
from pathlib import Path

import pytest


def _project_root():
    here = Path(__file__).resolve().parent
    return next(p for p in (here, *here.parents) if (p / "pyproject.toml").is_file())


ROOT = _project_root()

# A table row of docs/CONFIG.md: | `KEY` | `DEFAULT` | meaning |
CONFIG_ROW = re.compile(
    r"^\|\s*`([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)+)`\s*\|\s*`([^`]*)`\s*\|", re.MULTILINE
)
EVALNORM_KEY = re.compile(r"\bMODEL\.EVALNORM(?:\.[A-Z][A-Z0-9_]*)*")
# [text](target) and ![alt](target), with an optional "title".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
PROCESS_WORDS = re.compile(
    r"\bissues?\b|\bsessions?\b|device[ -]pool|\bthis task\b|closing[ -]note|design[-_ ]notes",
    re.IGNORECASE,
)
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".sh", ".txt", ".toml", ".cfg", ".json"}


def markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def flatten(node, prefix=""):
    """{"A.B.C": value} for every leaf of a (yacs) config node."""
    leaves = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            leaves.update(flatten(value, name + "."))
        else:
            leaves[name] = value
    return leaves


def added_config():
    """Every key ``add_evalnorm_config`` adds to (or changes in) detectron2's config, full
    dotted name -> default, and the whole config it produces."""
    from detectron2.config import get_cfg

    from evalnorm_det import add_evalnorm_config

    before = flatten(get_cfg())
    cfg = get_cfg()
    add_evalnorm_config(cfg)
    after = flatten(cfg)
    added = {k: v for k, v in after.items() if k not in before or not same(before[k], v)}
    return added, cfg


def same(a, b):
    """Equal and of the same type (0 is not False, 1 is not 1.0), lists element by element."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def config_doc_rows(text):
    rows = {}
    for key, default in CONFIG_ROW.findall(text):
        assert key not in rows, f"docs/CONFIG.md describes {key} twice"
        rows[key] = default
    return rows


def exists_in(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_config_doc_matches_add_evalnorm_config():
    pytest.importorskip("detectron2")
    added, cfg = added_config()
    assert added, "add_evalnorm_config added no key"
    text = (ROOT / "docs" / "CONFIG.md").read_text()
    rows = config_doc_rows(text)
    missing = sorted(set(added) - set(rows))
    assert not missing, f"docs/CONFIG.md has no table row for {missing}"
    for key, value in added.items():
        try:
            documented = ast.literal_eval(rows[key])
        except (ValueError, SyntaxError):
            pytest.fail(f"docs/CONFIG.md: default of {key} is not a literal: `{rows[key]}`")
        assert same(documented, value), (
            f"docs/CONFIG.md gives {key} the default `{rows[key]}`; add_evalnorm_config sets {value!r}"
        )
    unknown = sorted(k for k in rows if not exists_in(cfg, k))
    assert not unknown, f"docs/CONFIG.md describes keys the config does not have: {unknown}"


def test_evalnorm_keys_named_in_the_docs_exist():
    pytest.importorskip("detectron2")
    _, cfg = added_config()
    for path in markdown_files():
        names = set(EVALNORM_KEY.findall(path.read_text()))
        unknown = sorted(n for n in names if not exists_in(cfg, n))
        assert not unknown, f"{path.relative_to(ROOT)} names keys that do not exist: {unknown}"


def github_anchors(markdown):
    """The anchors GitHub gives the headings of a markdown text."""
    anchors, seen = set(), {}
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_code or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def broken_links(path):
    """The relative links of a markdown file whose file, or heading anchor, does not exist."""
    text = path.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        missing_anchor = (
            linked.exists()
            and anchor
            and linked.suffix == ".md"
            and anchor not in github_anchors(linked.read_text())
        )
        if not linked.exists() or missing_anchor:
            broken.append(target)
    return broken


def test_relative_links_resolve():
    assert (ROOT / "docs").is_dir()
    for path in markdown_files():
        broken = broken_links(path)
        assert not broken, f"{path.relative_to(ROOT)}: links to nothing: {broken}"


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; the rest belongs in docs/"
    head = "\n".join(lines[:60])
    for command in ("make demo", "make test"):
        assert command in head, f"README.md does not name `{command}` in its first 60 lines"


def user_facing_files():
    yield ROOT / "README.md"
    for folder in ("docs", "configs", "tools", "evalnorm", "evalnorm_det"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts:
                yield path


def test_no_words_about_how_the_project_was_made():
    found = []
    for path in user_facing_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            match = PROCESS_WORDS.search(line)
            if match:
                found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r}")
    assert not found, "words about how the project was made:\n" + "\n".join(found)
