"""The generated sections of docs/state-machine.md match the code (issue 4)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_state_diagram", ROOT / "tools" / "gen_state_diagram.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_state_machine_page_is_up_to_date() -> None:
    """The committed page equals its regeneration: run python tools/gen_state_diagram.py if not."""
    generator = _generator()
    page = (DOCS / "state-machine.md").read_text(encoding="utf-8")
    assert generator.regenerate(page) == page


def test_diagram_has_every_state_changing_edge() -> None:
    """Every edge between different states appears in the mermaid diagram."""
    from domainpolicy import TRANSITIONS

    diagram = _generator().render_diagram()
    assert diagram.startswith("```mermaid\nstateDiagram-v2")
    for edge in TRANSITIONS:
        if edge.source is not edge.target:
            assert f"{edge.source.name} --> {edge.target.name}: {edge.event.value}" in diagram
