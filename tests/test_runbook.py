"""The support runbook runs as written: its ``bash`` blocks, in order, against the bundled example,
and each ``text`` block after a command shows lines that command prints."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "docs" / "runbook-blocked-tenant.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)
SEPARATOR = "=== runbook block {} ==="


def _blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(RUNBOOK.read_text(encoding="utf-8"))]


def test_runbook_commands_run_against_the_example(tmp_path: Path) -> None:
    """Replay the example up to the block, then every step: each command exits 0, the shown
    outputs are what the commands print, and the tenant ends active."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    blocks = _blocks()
    commands = [(i, code) for i, (lang, code) in enumerate(blocks) if lang == "bash"]
    assert len(commands) >= 7
    script = ["set -euo pipefail", 'domainpolicy() { "$PYTHON" -m domainpolicy "$@"; }']
    for i, code in commands:
        script += [f"echo '{SEPARATOR.format(i)}'", code]
    env = {**os.environ, "PYTHON": sys.executable}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    run = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    outputs = dict.fromkeys((i for i, _ in commands), "")
    for part in run.stdout.split("=== runbook block ")[1:]:
        number, _, rest = part.partition(" ===\n")
        outputs[int(number)] = rest
    shown = 0
    for i, (lang, text) in enumerate(blocks):
        if lang != "text" or i == 0 or blocks[i - 1][0] != "bash":
            continue
        for line in text.splitlines():
            if "..." not in line:
                assert line in outputs[i - 1].splitlines(), (line, outputs[i - 1])
                shown += 1
    assert shown >= 10
    assert outputs[commands[-1][0]].startswith("tenant contoso: active\n")
