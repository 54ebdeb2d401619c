"""The offline commands' defaults a new user meets: torch CPU threads, where training writes, progress and
"wrote" lines, and errors that come before torch is imported."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import BUNDLED
from service.cli import main
from service.cli.threads import SMALL_MODEL_BYTES, default_threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def torch_threads():
    """Restores torch's thread count after a test that lets a command set it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_threads_is_one_for_a_small_model_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:                     # sparse: its size, not its bytes, is what the rule reads
        f.truncate(SMALL_MODEL_BYTES + 1)
    assert default_threads("cpu", BUNDLED["digits"]) == 1
    assert default_threads("cpu", BUNDLED["em-digits"]) == 1
    assert default_threads("cpu", big) == 0          # a large model keeps torch's count (every core)
    assert default_threads("cuda:0", BUNDLED["digits"]) == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")       # the user's own setting wins over the rule
    assert default_threads("cpu", BUNDLED["digits"]) == 0


def test_eqm_sample_runs_the_digits_model_on_one_thread_by_default(tmp_path, monkeypatch, torch_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)                         # torch's default on a 2-core machine
    assert main(["sample", "--checkpoint", "digits", "--labels", "1,2", "--steps", "2",
                 "--images-out", str(tmp_path / "a.npy")]) == 0
    assert torch.get_num_threads() == 1
    assert main(["sample", "--checkpoint", "digits", "--labels", "1", "--steps", "2", "--threads", "2",
                 "--images-out", str(tmp_path / "b.npy")]) == 0
    assert torch.get_num_threads() == 2


def test_eqm_eval_runs_on_one_thread_by_default(tmp_path, monkeypatch, torch_threads, capsys):
    """The judge and the bundled models are small: eqm eval takes the offline commands' rule too."""
    import numpy as np
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    images = tmp_path / "noise.npy"
    np.save(images, np.random.default_rng(0).integers(0, 256, (50, 8, 8, 1), dtype=np.uint8))
    torch.set_num_threads(2)
    assert main(["eval", "--images", str(images), "--json"]) == 0
    assert torch.get_num_threads() == 1
    assert main(["eval", "--images", str(images), "--json", "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2
    capsys.readouterr()


def test_threads_flag_is_checked_and_documented(capsys):
    assert main(["sample", "--checkpoint", "digits", "--labels", "1", "--threads", "-1",
                 "--images-out", "never.npy"]) == 2
    assert main(["train-digits", "--threads", "-1", "--out", "never.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.count("--threads must be >= 0") == 2 and not Path("never.npy").exists()
    for command in ("sample", "eval", "eval-digits", "train-digits"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        help_text = text.rsplit("--threads THREADS", 1)[1][:80].strip()         # the option's own line, not the usage
        assert re.match(r"torch CPU threads[;( ]+default:? 1\b", help_text), (command, help_text)


def test_sample_help_names_every_bundled_model(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in BUNDLED), text


def test_train_digits_writes_to_the_current_folder_unless_told(tmp_path, monkeypatch, capsys, torch_threads):
    bundled = hashlib.sha256(BUNDLED["digits"].read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path)
    assert main(["train-digits", "--steps", "2", "--batch-size", "8", "--log-every", "1", "--no-progress"]) == 0
    assert (tmp_path / "digits.safetensors").is_file() and (tmp_path / "digits.json").is_file()
    assert hashlib.sha256(BUNDLED["digits"].read_bytes()).hexdigest() == bundled       # the shipped model is intact
    assert "wrote digits.safetensors" in capsys.readouterr().out


def test_em_digits_progress_counts_heun_steps_and_says_what_it_wrote(tmp_path, monkeypatch, capsys, torch_threads):
    monkeypatch.setattr("service.cli.common.PROGRESS_EVERY_S", 0.0)      # a line per step
    assert main(["sample", "--checkpoint", "em-digits", "--n", "2", "--steps", "3", "--images-out",
                 str(tmp_path / "em.npy"), "--energies-out", str(tmp_path / "v.npy"), "--out",
                 str(tmp_path / "png")]) == 0
    err = capsys.readouterr().err
    assert "sampling: step 3/3" in err and "/6" not in err, err
    assert f"wrote {tmp_path / 'em.npy'}: images, uint8 (2, 8, 8, 1)" in err
    assert f"wrote {tmp_path / 'v.npy'}: energies" in err and "wrote 2 PNG files" in err
    assert np.load(tmp_path / "v.npy").shape == (2,)


@pytest.mark.parametrize("argv, env, expected", [
    (["api"], {}, "eqm api: error: no Redis: set EQM_REDIS_URL"),
    (["api", "--redis-url", "redis://127.0.0.1:1", "--checkpoint", "nope.safetensors"], {},
     "eqm api: error: --checkpoint nope.safetensors: no such file"),
    (["serve", "--checkpoint", "nope.safetensors"], {}, "eqm serve: error: --checkpoint nope.safetensors: no such file"),
    (["serve"], {"EQM_CHECKPOINT": "nope.pt"}, "eqm serve: error: EQM_CHECKPOINT=nope.pt: no such file"),
    (["serve", "--threads", "-2"], {}, "eqm serve: error: --threads must be >= 0"),
    (["worker", "--checkpoint", "nope.safetensors"], {"EQM_REDIS_URL": "redis://127.0.0.1:1"},
     "eqm worker: error: --checkpoint nope.safetensors: no such file"),
    (["sample", "--checkpoint", "nope.pt", "--labels", "1", "--out", "x"], {},
     "eqm sample: error: --checkpoint nope.pt: no such file"),
])
def test_command_line_errors_come_before_torch_is_imported(argv, env, expected, tmp_path):
    """A wrong flag or setting is one line at once: torch (seconds to import) is never loaded for it."""
    code = ("import sys; from service.cli import main; status = main(sys.argv[1:]); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(status)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EQM_")}
    result = subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, capture_output=True, text=True,
                            env={**clean, "PYTHONPATH": str(ROOT), **env}, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(expected) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout.strip() == "no torch"
