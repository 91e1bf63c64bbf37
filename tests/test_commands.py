"""``python -m mlx_speech`` lists the commands and runs them; every command answers --version
(and --help) at once, without importing MLX."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO

from mlx_speech import __version__
from mlx_speech.commands import COMMANDS

MLX_IMPORT = re.compile(r"\|\s+mlx\.core$", re.M)  # -X importtime's line for the MLX import


def run(*args):
    return subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def test_the_package_lists_its_commands():
    r = run("-m", "mlx_speech")
    assert r.returncode == 0
    listed = [line.split()[0] for line in r.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS) == ["generate", "clone", "server", "convert"]
    bad = run("-m", "mlx_speech", "speak")
    assert bad.returncode == 2 and "unknown command 'speak'; choose one of: generate" in bad.stderr


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_version_without_importing_mlx(command):
    for args in (("-m", f"mlx_speech.{command}", "--version"), ("-m", "mlx_speech", command, "--version")):
        r = run(*args)
        assert r.returncode == 0, r.stderr[-500:]
        assert r.stdout.strip() == f"mlx-speech {__version__}"
        assert not MLX_IMPORT.search(r.stderr), f"{args} imported MLX"
