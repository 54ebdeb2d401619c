"""EqM and Energy Matching networks, checkpoints, latent codecs and samplers.

The Python API for offline use (the CLI and the worker load and sample through the same functions)::

    from models import load_model, sample
    model = load_model("digits")             # a bundled name or a checkpoint file of any family
    out = sample(model, labels=[3, 3, 7], seed=0, max_steps=40)
    out.images, out.latents, out.steps, out.energies

The registry (``models/registry.py``) finds a file's family. The functions import torch when called,
so ``import models`` (and a command's ``--help``) needs none.
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



def sample(model, n=None, **options):
    """Images from a loaded model (or a name or file) with its recommended settings or any given by name
    (see ``models.offline.sample``)."""
    from models.offline import sample as run
    return run(model, n, **options)
