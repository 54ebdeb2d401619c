"""``eqm sample`` as a person uses it: help that states the bundled model's defaults, a wrong checkpoint
path said at once, progress on long runs, and the names of the files it wrote."""
from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from models import resolve_checkpoint

ROOT = Path(__file__).resolve().parent.parent
needs_digits = pytest.mark.skipif(not resolve_checkpoint("digits").is_file(), reason="the bundled digits model is missing")


def eqm(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@needs_digits
def test_help_states_the_bundled_models_defaults_beside_the_papers():
    from service.cli.sample import bundled_defaults
    digits = bundled_defaults()
    assert digits["step_size"] == 0.05 and digits["max_steps"] == 7           # what the file records
    out = " ".join(eqm("sample", "--help").stdout.split())
    assert "(digits 0.05), else 0.0017" in out and "(digits 7), else 249" in out, out
    assert "bundled digits model does: NAG-GD, step size 0.05, mu 0.3, 7 updates, CFG 1.0, stop below " \
           "gradient norm 3.0" in out, out


def test_a_missing_checkpoint_is_one_line_at_once(tmp_path):
    started = time.monotonic()
    result = eqm("sample", "--checkpoint", str(tmp_path / "EqM-XL-2.pt"), "--labels", "1", "--out", str(tmp_path))
    elapsed = time.monotonic() - started
    from models import BUNDLED
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"eqm sample: error: --checkpoint {tmp_path / 'EqM-XL-2.pt'}: no such file (a checkpoint file: .pt or "
        f".safetensors, or a bundled model: {', '.join(sorted(BUNDLED))})"]
    # The check runs before torch is imported: a bound that the model load (torch import included) never met.
    assert elapsed < 3.0, elapsed
    result = eqm("sample", "--checkpoint", str(tmp_path), "--labels", "1", "--out", str(tmp_path))
    assert "a folder, not a checkpoint file" in result.stderr


@needs_digits
def test_names_the_files_it_wrote(tmp_path):
    result = eqm("sample", "--checkpoint", "digits", "--labels", "0,1,2", "--out", "pngs", "--images-out", "i.npy",
                 "--latents-out", "l.npy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote l.npy: latents, float32 (3, 1, 8, 8)" in result.stderr
    assert "wrote i.npy: images, uint8 (3, 8, 8, 1)" in result.stderr
    assert "wrote 3 PNG files to pngs/: 000000.png .. 000002.png" in result.stderr
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert np.load(tmp_path / "i.npy").shape == (3, 8, 8, 1)


def test_progress_without_a_terminal_prints_lines(monkeypatch):
    from service.cli import common
    monkeypatch.setattr(common, "PROGRESS_EVERY_S", 0.05)
    stream = io.StringIO()
    report = common.progress_bar(100, stream)
    for step in range(1, 101):
        report(step, 100)
        time.sleep(0.002)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.startswith("sampling: step ") for line in lines), lines
    assert lines[-1].startswith("sampling: step 100/100")
    steps = [int(line.split()[2].split("/")[0]) for line in lines]
    assert steps == sorted(steps)
