"""The generated sections of docs/state-machine.md and its picture match the code (issue 4)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TOOLS = ROOT / "tools"


@pytest.fixture
def generator(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """tools/gen_state_diagram.py, loaded with tools/ on the path (it imports _svg)."""
    monkeypatch.syspath_prepend(str(TOOLS))
    spec = importlib.util.spec_from_file_location(
        "gen_state_diagram", TOOLS / "gen_state_diagram.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_state_machine_page_is_up_to_date(generator: ModuleType) -> None:
    """The committed page and picture equal their regeneration, byte for byte: run
    python tools/gen_state_diagram.py if not."""
    page = (DOCS / "state-machine.md").read_text(encoding="utf-8")
    assert generator.regenerate(page) == page
    picture = (DOCS / "images" / "state-machine.svg").read_text(encoding="utf-8")
    assert generator.render_svg() == picture
    assert generator.main(["--check"]) == 0


def test_diagram_has_every_state_changing_edge(generator: ModuleType) -> None:
    """Every edge between different states is drawn (named by its tooltip), every state is a
    box, and the page shows the picture instead of diagram source text."""
    from domainpolicy import TRANSITIONS, State

    svg = generator.render_svg()
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg"')
    drawn = 0
    for edge in TRANSITIONS:
        title = generator.edge_title(edge).replace(">", "&gt;")
        if edge.source is not edge.target:
            assert f'<g class="edge"><title>{title}</title>' in svg
            drawn += 1
        else:
            assert f"<title>{title}</title>" not in svg
    assert svg.count('<g class="edge">') == drawn
    for state in State:
        assert f'<g class="state"><title>{state.name}</title>' in svg
    assert "<script" not in svg
    assert "http://" not in svg.replace('xmlns="http://www.w3.org/2000/svg"', "")
    page = (DOCS / "state-machine.md").read_text(encoding="utf-8")
    assert "](images/state-machine.svg)" in page
    assert "```mermaid" not in page
