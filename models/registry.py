"""The registry of model families: which family a checkpoint file is, what it holds, and how it loads.

Each family is one folder under ``models/`` whose package exports ``FAMILY``, an object that
``claims(path)`` a file (cheaply: the file's header or lazily mapped keys), ``describe(path)``s it
without building the network, ``load(path)``s it into the ``GradientField`` seam and ``convert``s an
official checkpoint to safetensors. Everything above ``models/`` asks this module and never which
family a model is; a new family is a folder plus one line in ``FAMILIES``.
"""
from __future__ import annotations

import os
from pathlib import Path

from models import energy_matching, eqm
from models.family import Family, LoadedModel, ModelDescription
from models.files import resolve_checkpoint

# Asked in order; the first family that claims a file reads it. EqM claims every file no other family
# claims, so that a file of no family gets EqM's one-line reason (missing tensors, not a checkpoint, ...).
FAMILIES: list[Family] = [
    energy_matching.FAMILY,
    eqm.FAMILY,
]


def register(family: Family) -> None:
    """Ask ``family`` before the others (a family defined outside this tree, e.g. in a test)."""
    if family not in FAMILIES:
        FAMILIES.insert(0, family)


def unregister(family: Family) -> None:
    if family in FAMILIES:
        FAMILIES.remove(family)


def family_for(path: str | os.PathLike) -> Family:
    """The family of a checkpoint file (EqM, the last, takes what no other claims)."""
    path = Path(path)
    for family in FAMILIES:
        if family.claims(path):
            return family
    return FAMILIES[-1]


def load_model(checkpoint: str | os.PathLike, **options) -> LoadedModel:
    """A bundled model's name or a checkpoint file -> its network, spec and field, weights loaded ``strict``.

    ``options`` are the loading family's: ``weights`` (``ema``/``model``), ``device``, ``dtype``, and
    per family ``arch``, ``guidance_mode``, ``ebm`` (EqM) or ``overrides`` (Energy Matching training flags).
    """
    path = resolve_checkpoint(str(checkpoint))
    return family_for(path).load(path, **options)


def describe_model(checkpoint: str | os.PathLike, **options) -> ModelDescription:
    """What a checkpoint holds (architecture, sample shape, classes, codec, defaults, energy), weights unbuilt."""
    path = resolve_checkpoint(str(checkpoint))
    return family_for(path).describe(path, **options)


def convert_model(src: str | os.PathLike, dst: str | os.PathLike, **options) -> str:
    """An official checkpoint -> safetensors with the metadata later loads need; returns a one-line summary."""
    path = Path(src)
    return family_for(path).convert(path, Path(dst), **options)
