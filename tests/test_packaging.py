"""The distribution's metadata says what a packager and a user look for first."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_the_licence_file_ships_and_matches_the_declared_licence() -> None:
    """pyproject declares MIT and lists LICENSE (so the wheel carries it); the file is MIT."""
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in text


def test_supported_pythons_are_classified() -> None:
    """A classifier for every supported minor version, starting at requires-python."""
    assert PROJECT["requires-python"] == ">=3.11"
    versions = {
        c.rsplit(" :: ", 1)[1]
        for c in PROJECT["classifiers"]
        if c.startswith("Programming Language :: Python :: 3.")
    }
    assert versions == {"3.11", "3.12", "3.13"}


def test_project_urls_name_the_source_issues_and_changelog() -> None:
    """Project-URLs are there and use https."""
    urls = PROJECT["urls"]
    assert {"Source", "Issues", "Changelog", "Documentation"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())
