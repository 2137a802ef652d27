"""README.md and docs/*.md against the code, so the documentation cannot drift from it:

* the README's command table is the one ``python -m tqc.compiler.cli.docs`` generates from the click CLI;
* every ``tqc ...`` line of their code blocks parses against the CLI (commands, options, choices, ranges);
* every repository path they name exists, and none points outside the repository (such as a shared folder beside the clone);
* the README's test command is the one ``.ci/run`` runs, and its one Python block is the API example.

Only click and the CLI module are imported: no model, runtime or pass is loaded.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from tqc.compiler.cli.docs import BEGIN, END, command_table, synopsis
from tqc.compiler.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
NOT_SOURCE = {".venv", "build", "__pycache__", ".git", ".pytest_cache"}


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_readme_command_table_is_the_generated_one():
    text = README.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "README.md needs one command-table marker pair"
    held = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n") + "\n"
    assert held == command_table(), ("README.md's command table differs from the CLI: "
                                     "regenerate it with python -m tqc.compiler.cli.docs")


def test_generated_table_has_every_command_option_and_choice_of_the_cli():
    rows = {line.split("`")[1].split()[1]: line for line in command_table().splitlines()[3:]}
    assert sorted(rows) == sorted(name for name, command in cli.commands.items() if not command.hidden)
    for name, command in cli.commands.items():
        row = rows[name].replace("\\|", "|")
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.opts[0] in row, f"{name}: {param.opts[0]} missing from its row"
                if isinstance(param.type, click.Choice):
                    shown = re.search(re.escape(param.opts[0]) + r" ([^\s\]`]+)", row).group(1)
                    assert sorted(shown.split("|")) == sorted(map(str, param.type.choices)), (name, param.opts[0])
            elif isinstance(param, click.Argument):
                assert param.human_readable_name.upper() in row
        assert synopsis(name, command) in row


def _code_blocks(page: Path, languages=("", "sh", "shell", "bash", "console")) -> list[str]:
    return [body for language, body in FENCE.findall(page.read_text()) if language in languages]


def _tqc_invocations(page: Path) -> list[list[str]]:
    """Every ``tqc ...`` command in the page's shell blocks (``&&`` chains split, comments dropped); lines
    with ``...`` are abbreviations and are left out."""
    found = []
    for block in _code_blocks(page):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words and words[0] in ("tqc", ".venv/bin/tqc") and "..." not in words:
                    found.append(words[1:])
    return found


def _parse(args: list[str]) -> None:
    """Parse ``tqc ARGS`` the way click would before running it (types, choices, ranges, required options),
    without running anything."""
    args = list(args)
    while args and args[0].startswith("-"):
        assert args[0] in ("-q", "--quiet", "--debug"), f"unknown global option {args[0]}"
        args.pop(0)
    command = cli.get_command(click.Context(cli), args[0])
    assert command is not None, f"no command 'tqc {args[0]}'"
    command.make_context(args[0], args[1:])


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_tqc_example_parses_against_the_cli(page):
    invocations = _tqc_invocations(page)
    for args in invocations:
        try:
            _parse(args)
        except click.ClickException as exc:
            pytest.fail(f"{_page_id(page)}: 'tqc {shlex.join(args)}': {exc.format_message()}")


def test_readme_has_an_example_for_every_target():
    from tqc.compiler.core.target import TARGETS

    targets = {args[args.index("--target") + 1] for args in _tqc_invocations(README) if "--target" in args}
    assert targets >= set(TARGETS)


def _top_level() -> set[str]:
    return {p.name for p in ROOT.iterdir()
            if p.is_dir() and p.name not in NOT_SOURCE and not p.name.endswith(".egg-info")
            and (not p.name.startswith(".") or p.name == ".ci")}


def _named_paths(page: Path) -> list[str]:
    """Repository paths the page names: words starting with a top-level folder (``compiler/...``), and
    Markdown link targets (relative to the page)."""
    text = page.read_text()
    roots = "|".join(re.escape(name) for name in sorted(_top_level()))
    words = re.findall(rf"(?<![\w./~-])((?:{roots})/[\w./*-]*)", text)
    paths = [w.rstrip(".") for w in words]
    for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text):
        if not re.match(r"\w+://", target):
            paths.append(str((page.parent / target).resolve().relative_to(ROOT)))
    return paths


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_repository_path_named_exists(page):
    missing = [p for p in _named_paths(page) if not (list(ROOT.glob(p)) if "*" in p else (ROOT / p).exists())]
    assert not missing, f"{_page_id(page)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_no_page_points_outside_the_repository(page):
    lines = [f"{number}: {line.strip()}" for number, line in enumerate(page.read_text().splitlines(), 1)
             if re.search(r"(\.\./|/work/)shared\b|\]\(\.\./\.\.", line)]
    assert not lines, f"{_page_id(page)} points outside the repository: {lines}"


def test_readme_test_command_is_the_one_ci_runs():
    setup = README.read_text().split("## Set-up", 1)[1]
    commands = [body.strip() for body in _code_blocks(README) if body.strip() and body.strip() in setup]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert len(commands) >= 2 and commands[1] == ci


def test_readme_python_block_is_the_api_example_alone():
    text = README.read_text()
    blocks = FENCE.findall(text)
    python = [body for language, body in blocks if language == "python"]
    assert len(python) == 1, "README.md holds exactly one ```python block: the API example"
    begin, end = text.index("<!-- python-api:begin -->"), text.index("<!-- python-api:end -->")
    assert begin < text.index("```python") < end
    imports = re.findall(r"^\s*(?:from|import) ([\w.]+)", python[0], re.M)
    assert set(imports) <= {"tqc", "tqc.passes"}, imports
