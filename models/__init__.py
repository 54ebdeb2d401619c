"""EqM and Energy Matching networks, checkpoints, latent codecs and samplers.

``load_model`` / ``describe_model`` take a bundled name or a checkpoint file of any family: the registry
(``models/registry.py``) finds a file's family. The functions import torch when called, so
``import models`` (and a command's ``--help``) needs none.
"""
from __future__ import annotations

from models.files import BUNDLED, WEIGHTS_DIR, resolve_checkpoint  # noqa: F401  (their public names)


def load_model(checkpoint, **options):
    """A bundled name or a checkpoint file of any family -> ``LoadedModel`` (see ``models.registry``)."""
    from models.registry import load_model as load
    return load(checkpoint, **options)


def describe_model(checkpoint, **options):
    """What a checkpoint holds, without building its network (see ``models.registry``)."""
    from models.registry import describe_model as describe
    return describe(checkpoint, **options)


