"""The examples/ files do what the documentation says they do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from domainpolicy import DomainMatcher, parse_domains_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


def test_the_domains_example_compiles(tmp_path: Path) -> None:
    """examples/domains.tsv: every line is an entry or a comment, `compile` writes a snapshot,
    and the snapshot attributes a subdomain and a wildcard name as the file says."""
    items = list(parse_domains_file(EXAMPLES / "domains.tsv"))
    assert items
    assert all(not isinstance(item, str) for _, item in items)
    snapshot = tmp_path / "domains.snapshot"
    run = _run("-m", "domainpolicy", "compile", "examples/domains.tsv", "-o", str(snapshot))
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"8 entries, 3 tenants\nwrote {snapshot}: 8 accepted domains\n" in run.stdout
    matcher = DomainMatcher.load(snapshot)
    assert matcher.tenant_of("news.fabrikam.com") == "fabrikam"
    assert matcher.tenant_of("mail.woodgrove.example") == "woodgrove"
    assert matcher.tenant_of("bücher.example") == "contoso"


def test_the_aiosmtpd_example_without_the_extra_says_what_to_install(tmp_path: Path) -> None:
    """Without aiosmtpd the example relay prints one line naming the extra and exits 2."""
    code = (
        "import runpy, sys\n"
        "sys.modules['aiosmtpd'] = None  # as if the extra were not installed\n"
        "sys.argv = ['aiosmtpd_relay.py', '--help']\n"
        f"runpy.run_path({str(EXAMPLES / 'aiosmtpd_relay.py')!r}, run_name='__main__')\n"
    )
    run = _run("-c", code, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr == (
        "aiosmtpd_relay.py needs aiosmtpd: pip install 'domainpolicy[aiosmtpd]'\n"
    )
