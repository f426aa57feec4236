"""Every option and argument of every `raysseg` command says what it does in --help (issue 18, item 10)."""

from __future__ import annotations

import argparse

from raysseg.apps.cli import parser


def _commands(p: argparse.ArgumentParser, path: str = "raysseg"):
    """(command path, its parser) for the program and every sub-command, at any depth."""
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"{path} {name}: the command has no help"
                yield from _commands(sub, f"{path} {name}")


def test_every_cli_option_has_help():
    missing = []
    commands = list(_commands(parser()))
    for path, p in commands:
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "options without help: " + ", ".join(missing)
    assert len(commands) > 15  # the walk reached the nested commands (data synth, storage serve, ...)


def test_help_renders_for_every_command(capsys):
    for _, p in _commands(parser()):
        p.format_help()  # a bad format string in a help text (e.g. a lone %) raises here
