"""The public Python API (``from models import load_model, sample``): the README's example runs as written,
and it gives what the command line gives for the same model, seed and settings."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from models import load_model, sample

ROOT = Path(__file__).resolve().parents[1]


def readme_python(section: str) -> str:
    """The one python block of a README section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return body.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_the_readme_python_example_runs_as_written(tmp_path):
    code = readme_python("Python API")
    assert "from models import load_model, sample" in code
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(3, 8, 8, 1)" in result.stdout


def test_sample_equals_the_command_line(tmp_path):
    subprocess.run([sys.executable, "-m", "service.cli", "sample", "--checkpoint", "digits", "--labels", "3,7",
                    "--seed", "5", "--steps", "12", "--latents-out", str(tmp_path / "cli.npy")],
                   cwd=ROOT, check=True, capture_output=True, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    out = sample(load_model("digits"), labels=[3, 7], seed=5, max_steps=12)
    assert np.array_equal(out.latents.numpy(), np.load(tmp_path / "cli.npy"))
    assert out.images.shape == (2, 8, 8, 1) and out.images.dtype == np.uint8


def test_settings_given_by_name_override_the_model_defaults():
    model = load_model("digits")
    short = sample(model, n=2, seed=0, max_steps=3, grad_norm_threshold=0.0, decode=False)
    assert short.steps == [3, 3] and short.images is None
    try:
        sample(model, n=1, max_step=3)
    except ValueError as exc:
        assert "unknown sampler setting max_step" in str(exc)
    else:
        raise AssertionError("a misspelt setting was accepted")


def test_energy_matching_samples_with_its_own_sampler_and_energies():
    out = sample("em-digits", n=2, seed=0, max_steps=4)
    assert out.steps == [4, 4] and len(out.energies) == 2
    assert torch.all(out.latents.abs() <= 1.0)                  # the SDE's final clamp to the pixel range
