"""The README stays true: its example prints what its comments say, CI runs its test command."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


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
    """.ci/run takes its command from the README's test-command block (the block exists)."""
    block = re.search(r"<!-- test-command -->\s*```console\n(.+?)\n```", README, re.S)
    assert block is not None
    assert "pytest" in block.group(1)
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    main = re.search(r"<!-- main-command -->\s*```console\n(.+?)\n```", README, re.S)
    assert main is not None
    replay = "domainpolicy replay examples/compromise.jsonl --config examples/tenants.toml"
    assert replay in main.group(1)
