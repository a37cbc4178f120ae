"""The YAML training presets of ``configs/``, shipped as package data (``igpt.configs``) in every install."""
from __future__ import annotations

from importlib.resources import files

from igpt.errors import UserError


def packaged_config(name: str) -> str:
    """The path of the shipped preset ``name`` (e.g. ``cifar10-demo.yaml``), from a wheel or a checkout alike."""
    path = files("igpt.configs") / name
    if not path.is_file():
        shipped = sorted(p.name for p in files("igpt.configs").iterdir() if p.name.endswith(".yaml"))
        raise UserError(f"no shipped config {name!r}; the package has {shipped}")
    return str(path)
