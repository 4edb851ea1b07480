"""The README stays true: its example prints what its comments say, CI runs its test command."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _command(marker: str) -> str:
    """The one command of the README's ``<!-- marker -->`` console block."""
    block = re.search(rf"<!-- {marker} -->\s*```console\n(.+?)\n```", README, re.S)
    assert block is not None, f"README.md has no <!-- {marker} --> block"
    return block.group(1).strip()


def test_readme_example_prints_what_its_comments_say() -> None:
    """Every `print(...)  # expected` line in the README example prints the expected text."""
    code = README.split("```python\n", 1)[1].split("```", 1)[0]
    expected = [
        line.split("#", 1)[1].strip().split(" (")[0]
        for line in code.splitlines()
        if "print(" in line and "#" in line
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    printed = out.getvalue().splitlines()
    # The loop prints once per message; its comment shows the first and the last line.
    loop = [line for line in printed if line.startswith(("unregistered_allowed", "blocked"))]
    assert loop == ["unregistered_allowed 2.1.0", "unregistered_allowed 2.1.0", "blocked 5.7.750"]
    others = [line for line in printed if line not in loop]
    assert others == [e for e in expected if not e.startswith("unregistered_allowed")]


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run extracts exactly the README's test-command block (its own extraction code, run
    here), and the main command replays the bundled log."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    extractor = re.search(r"python3 - <<'PY'\n(.+?)\nPY\n", ci, re.S)
    assert extractor is not None
    extracted = subprocess.run(
        [sys.executable, "-c", extractor.group(1)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert extracted == _command("test-command")
    assert "pytest" in extracted
    replay = "domainpolicy replay examples/compromise.jsonl --config examples/tenants.toml"
    assert _command("main-command").endswith(replay)


@pytest.mark.parametrize("marker", ["main-command", "test-command"])
def test_readme_commands_work_on_a_stock_debian(marker: str) -> None:
    """Each command runs as written where there is no ``python`` and the system Python refuses
    ``pip install`` (PEP 668): ``python3`` only, a virtual environment created and activated
    before anything is installed, and Debian's ``python3-venv`` (which provides ``ensurepip``,
    what ``python3 -m venv`` needs) installed when it is missing, as redis-server is."""
    command = _command(marker)
    assert re.search(r"\bpython\b", command) is None, "use python3: Debian has no python"
    assert "sudo" not in command
    make, activate = "python3 -m venv .venv", ". .venv/bin/activate"
    install = command.index("python3 -m pip install ")
    assert command.index(make) < command.index(activate) < install
    assert command.count("pip install") == 1
    check = "python3 -c 'import ensurepip' 2>/dev/null"
    apt = "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
    assert command.index(check) < command.index(apt) < command.index(make)
    packages = command.split(apt, 1)[1].split(")", 1)[0].split()
    assert "python3-venv" in packages
    if marker == "test-command":
        assert {"redis-server", "chromium", "chromium-driver"} <= set(packages)
        assert command.startswith(
            "(command -v redis-server >/dev/null && command -v chromedriver >/dev/null && "
            + check
            + " || ("
        )


@pytest.mark.parametrize("marker", ["main-command", "test-command"])
def test_readme_commands_are_valid_bash(marker: str) -> None:
    """``bash -n`` accepts each command (CI runs the test command with ``bash -euo pipefail``)."""
    subprocess.run(["bash", "-n", "-c", _command(marker)], check=True)
