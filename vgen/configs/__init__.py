"""YAML presets shipped with vgen (package data)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

import yaml

__all__ = ["load_shape", "shape_names"]


@cache
def _shapes() -> dict[str, Any]:
    return yaml.safe_load(files(__package__).joinpath("shapes.yaml").read_text())


def shape_names() -> list[str]:
    """Names of the full-size model shapes in shapes.yaml."""
    return list(_shapes())


def load_shape(name: str) -> dict[str, Any]:
    """One shape preset: ``transformer`` class name, its ``config``, ``clip`` size, ``vae`` factors, ``text_tokens``."""
    shapes = _shapes()
    if name not in shapes:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(shapes)}")
    return shapes[name]
