"""Tests for gptforge.cli: dispatch, help and one-line errors.

    .venv/bin/python -m pytest tests/test_cli.py
"""

import subprocess
import sys

from gptforge.cli import main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    assert "usage: gptforge COMMAND" in capsys.readouterr().out


def test_unknown_command_is_a_one_line_error(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptforge: error: unknown command 'trian'") and err.count("\n") == 1


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "gptforge", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: gptforge" in result.stdout
