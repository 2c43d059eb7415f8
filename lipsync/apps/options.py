"""What every subcommand's parser shares (its own module, so that subcommands need not import the `lipsync`
command line that imports them)."""
from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default, also for options without a help text."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:  # nothing worth saying ("default: None")
            return action.help
        return super()._get_help_string(action)
