"""Every command and every flag of the CLI says what it is for."""

from __future__ import annotations

import argparse

from qmrkit.cli import _parser


def _walk(parser: argparse.ArgumentParser, path: str = "qmrkit"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{path} {name}", "(the command itself)", helps.get(name)
                yield from _walk(sub, f"{path} {name}")
        else:
            yield path, "/".join(action.option_strings) or action.dest, action.help


def test_every_command_and_flag_has_help():
    items = list(_walk(_parser()))
    missing = [f"{cmd}: {flag}" for cmd, flag, text in items if not text or text == "==SUPPRESS=="]
    assert not missing, missing
    commands = {cmd for cmd, _, _ in items}
    # the walk really covers the tree (nested learn actions included)
    assert {"qmrkit fit", "qmrkit send", "qmrkit serve", "qmrkit learn train"} <= commands
    assert len(items) > 120
