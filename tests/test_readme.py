"""The README stays a true front door: short, its Python runs as pasted, its commands parse.

Every fenced ``python`` block of README.md runs as a user would paste it: a fresh interpreter
in an empty temporary folder, on data the project ships (scikit-learn's digits). A ``bash``
block runs the same way unless the line before its fence says why it cannot run in CI::

    <!-- test_readme: skip: <reason> -->

(long trainings, downloads, the set-up itself). Such a block's ``train_md.py`` and
``md-doctor`` commands are still parsed by the real parsers, so a renamed or misspelt flag
fails here. The README's set-up and test commands must be the ones ``.ci/run`` runs, and every
relative link of the README and of the docs pages it introduces must name a file and heading
that exist. The Python blocks of those docs pages continue the README's example, so they are
compiled and their ``md_plugin`` imports resolved, not run.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# the docs pages that hold what moved out of the README (others' pages are linked, not checked)
GUIDES = ["timm-compat", "configuration", "data", "model-doctor", "api", "split-and-patch",
          "evidence"]  # fmt: skip
DOCS = [ROOT / "docs" / f"{name}.md" for name in GUIDES]
MAX_LINES = 300
SKIP = re.compile(r"<!--\s*test_readme:\s*skip:\s*(.+?)\s*-->")
FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    skip: str | None  # the reason given, or None


def code_blocks(path: Path) -> list[Block]:
    """Fenced blocks in order; the skip marker is read from the comment lines above a fence."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        assert j < len(lines), f"{path.name}:{start + 1}: unclosed code block"
        skip, k = None, start - 1
        while k >= 0 and lines[k].lstrip().startswith("<!--"):  # the comments just above
            hit = SKIP.search(lines[k])
            skip = hit.group(1) if hit else skip
            k -= 1
        blocks.append(Block(lang, "\n".join(lines[start + 1 : j]) + "\n", start + 1, skip))
        i = j + 1
    return blocks


def _ids(blocks: list[Block]) -> list[str]:
    return [f"line{b.line}" for b in blocks]


PY_BLOCKS = [b for b in code_blocks(README) if b.lang == "python"]
SH_BLOCKS = [b for b in code_blocks(README) if b.lang in ("bash", "sh", "shell")]


def _env() -> dict[str, str]:
    """This checkout's md_plugin first (a worktree's venv may point at another checkout)."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""),
        MPLBACKEND="Agg",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
    )


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; move reference material to docs/"


def test_python_blocks_are_never_skipped():
    assert PY_BLOCKS, "the README shows the Python API"
    assert [b.line for b in PY_BLOCKS if b.skip] == [], "every Python block must run as pasted"


@pytest.mark.parametrize("block", PY_BLOCKS, ids=_ids(PY_BLOCKS))
def test_python_block_runs_as_pasted(block, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(block.code)
    p = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, f"README.md:{block.line}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"


def test_shell_blocks_run_or_say_why_not(tmp_path):
    """Unmarked shell blocks run from the repository root's files (outputs stay in tmp)."""
    for name in ("train_md.py", "configs", "tests"):  # what the README's commands refer to
        (tmp_path / name).symlink_to(ROOT / name)
    for b in SH_BLOCKS:
        if b.skip:
            assert len(b.skip) > 10, f"README.md:{b.line}: say why the block cannot run"
            continue
        p = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", b.code], cwd=tmp_path, env=_env(),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert p.returncode == 0, f"README.md:{b.line}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"


# -- commands: parsed by the real parsers -----------------------------------------------------
def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block: continuations joined, comments dropped, split
    at ``&&``, ``;`` and ``|``."""
    text = code.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in words + ["&&"]:
            if w in ("&&", ";", "|", "||"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def _parse(cmd: list[str]) -> str | None:
    """Parse a train_md.py / md-doctor command line; returns what was parsed, or None."""
    script = next((i for i, w in enumerate(cmd) if w.endswith("train_md.py")), None)
    if script is not None and cmd[0] in ("python", "python3", "accelerate"):
        from md_plugin.train.args import parse_args

        parse_args(cmd[script + 1 :])
        return "train_md.py"
    if cmd[0] == "md-doctor" or cmd[:3] in (["python", "-m", "md_plugin"],):
        sub, rest = (cmd[1], cmd[2:]) if cmd[0] == "md-doctor" else (cmd[3], cmd[4:])
        if sub == "split":
            from md_plugin.splitter.cli import parse_split_args

            parse_split_args(rest)
        elif sub == "patch":
            from md_plugin.splitter.patch_cli import parse_patch_args

            parse_patch_args(rest)
        else:
            from md_plugin.cli import create_parser

            create_parser().parse_args([sub, *rest])
        return f"md-doctor {sub}"
    return None


def test_readme_commands_parse(monkeypatch):
    """Every train_md.py and md-doctor command of the README, run or not, parses."""
    monkeypatch.chdir(ROOT)  # the commands are written from the repository root
    parsed = []
    for b in SH_BLOCKS:
        for cmd in shell_commands(b.code):
            try:
                what = _parse(cmd)
            except SystemExit as e:  # argparse's own exit, should a parser not raise MDError
                pytest.fail(f"README.md:{b.line}: {shlex.join(cmd)} exits {e.code}")
            parsed += [what] if what else []
    assert {"train_md.py", "md-doctor split", "md-doctor patch"} <= set(parsed)


def test_setup_and_test_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    setup = next(b for b in SH_BLOCKS if "pip install" in b.code).code
    installs = [ln.replace(" -q", "") for ln in ci if ln.startswith("pip install")]
    assert len(installs) == 2
    for ln in installs:
        assert ln in setup, f"README's set-up lacks .ci/run's {ln!r}"
    assert "python3 -m venv .venv" in setup
    test_cmd = ci[-1]
    assert test_cmd == "python -m pytest -q"
    assert f"`{test_cmd}`" in README.read_text()


# -- links --------------------------------------------------------------------------------------
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        base = slug(line.lstrip("#"))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links in prose only
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.exists(), f"{page.name}: link to missing {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"


# -- the docs pages' Python: compiled, and their md_plugin imports exist ------------------------
DOC_PY = [(p, b) for p in DOCS for b in code_blocks(p) if b.lang == "python"]


@pytest.mark.parametrize("page,block", DOC_PY, ids=[f"{p.name}:{b.line}" for p, b in DOC_PY])
def test_docs_python_compiles_and_imports_exist(page, block):
    tree = ast.parse(block.code, filename=f"{page.name}:{block.line}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("md_plugin"):
            mod = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(mod, alias.name), f"{page.name}:{block.line}: {alias.name}"
