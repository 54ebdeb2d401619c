"""EqM and Energy Matching networks, checkpoints, latent codecs and samplers."""
from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# Models that ship inside the package, loadable by name (e.g. ``--checkpoint digits``).
BUNDLED = {"digits": WEIGHTS_DIR / "digits.safetensors",
           "digits-e": WEIGHTS_DIR / "digits-e.safetensors",    # EqM-E (dot energy), same architecture
           "em-digits": WEIGHTS_DIR / "em-digits.safetensors"}  # Energy Matching (models/em_digits.py)


def resolve_checkpoint(name_or_path: str) -> Path:
    """A bundled model's name, or a path, -> the file to load."""
    return BUNDLED.get(name_or_path, Path(name_or_path))
