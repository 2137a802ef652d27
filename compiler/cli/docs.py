"""The README's command table, generated from the click commands themselves.

``python -m tqc.compiler.cli.docs`` prints it; README.md holds that text between ``<!-- commands:begin -->``
and ``<!-- commands:end -->``, and ``tests/test_readme.py`` fails when the two differ, so the table cannot
drift from the CLI. Conventions of a synopsis: required options and arguments bare, the others in brackets;
an option's placeholder is its default where it has one (``[--runs 200]``); in a list of choices the default
comes first (``[--target trt|ort-cpu|...]``); ``...`` after a placeholder means the option or argument repeats.
"""

from __future__ import annotations

import inspect

import click

BEGIN = "<!-- commands:begin -->"
END = "<!-- commands:end -->"


def _choices(param: click.Parameter) -> list[str]:
    """The choices of a click.Choice, the default first."""
    choices = [str(c) for c in param.type.choices]
    default = _default(param)
    if default in choices:
        choices.remove(default)
        choices.insert(0, default)
    return choices


def _default(param: click.Parameter) -> str | None:
    """The default as text, or None where there is none (required options hold click's UNSET sentinel)."""
    default = param.default
    if param.required or isinstance(default, bool) or not isinstance(default, (str, int, float)) or default == "":
        return None
    return str(default)


def _option_text(option: click.Option) -> str:
    """One option as the synopsis shows it: ``-o OUTPUT``, ``[--target trt|ort-cpu]``, ``[--layerwise]``."""
    name = option.opts[0]
    if option.is_flag and option.secondary_opts:
        text = f"{name}/{option.secondary_opts[0]}"
    elif option.is_flag:
        text = name
    elif isinstance(option.type, click.Choice):
        text = f"{name} {'|'.join(_choices(option))}"
    elif _default(option) is not None and not option.multiple:
        text = f"{name} {_default(option)}"
    else:
        longest = max(option.opts, key=len).lstrip("-")
        text = f"{name} {option.metavar or longest.upper().replace('-', '_')}"
    if option.multiple:
        text += " ..."
    return text if option.required else f"[{text}]"


def _argument_text(argument: click.Argument) -> str:
    text = argument.human_readable_name.upper()
    if argument.nargs == -1:
        text += " ..."
    return text if argument.required else f"[{text}]"


def synopsis(name: str, command: click.Command) -> str:
    """``tqc NAME`` with its arguments, then its options in declaration order (help left out)."""
    parts = [f"tqc {name}"] if name else ["tqc"]
    parts += [_argument_text(p) for p in command.params if isinstance(p, click.Argument)]
    parts += [_option_text(p) for p in command.params if isinstance(p, click.Option) and not p.hidden]
    if isinstance(command, click.Group):
        parts.append("COMMAND ...")
    return " ".join(parts)


def _one_line(text: str | None) -> str:
    return " ".join(inspect.cleandoc(text or "").split())


def description(command: click.Command) -> str:
    """The command's help, then the help of its required options (what ``-o`` writes, say)."""
    text = _one_line(command.help)
    for param in command.params:
        if isinstance(param, click.Option) and param.required and param.help:
            text += f" `{param.opts[0]}`: {_one_line(param.help)}"
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def command_table(group: click.Group | None = None) -> str:
    """The Markdown table: the ``tqc`` group's own options first, then every command by name."""
    if group is None:
        from tqc.compiler.cli.main import cli as group
    rows = ["| command | what |", "|---|---|"]
    rows.append(f"| `{_cell(synopsis('', group))}` | {_cell(_one_line(group.help))} |")
    for name in sorted(group.commands):
        command = group.commands[name]
        if command.hidden:
            continue
        rows.append(f"| `{_cell(synopsis(name, command))}` | {_cell(description(command))} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    print(command_table(), end="")


if __name__ == "__main__":
    main()
