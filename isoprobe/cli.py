"""The ``isoprobe`` command line: a click group; each command parses options and calls one function."""

from __future__ import annotations

import click

from isoprobe import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="isoprobe")
def main() -> None:
    """Measure how deep networks keep or lose the geometry of their inputs.

    \b
    Examples:
      isoprobe beta relu tanh --gain 1 --gain 2
      isoprobe gpt2 --init random --text "The quick brown fox jumps over the lazy dog."
      isoprobe repro fig3 --quick --out results/
    """


# Each command is registered below by its own section; keep sections independent.
