"""The bundled digits EqM: weights load, samples look like the requested digits, CLI round trips."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import BUNDLED, resolve_checkpoint
from models import load_model
from models.files import CheckpointError
from models.codecs import IdentityCodec
from models.eqm.digits import (CLASS_NAMES, DIGITS_DEFAULTS, TrainConfig, digits_config, eqm_loss, load_digits_split,
                           to_uint8_images)
from models.sampler import Condition, noise_for_seed, sample
from service.cli import main

WEIGHTS = BUNDLED["digits"]


@pytest.fixture(scope="module")
def digits():
    return load_model(resolve_checkpoint("digits"))


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


def _sample(loaded, labels, params=DIGITS_DEFAULTS.params, cfg_scale=DIGITS_DEFAULTS.cfg_scale, seed=0):
    cfg = loaded.model.config
    start = torch.stack([noise_for_seed(seed + i, (1, 8, 8)) for i in range(len(labels))])
    conditions = [Condition(labels=(int(y),), cfg_scale=cfg_scale) for y in labels]
    return sample(loaded.model, start, conditions, params, null_label=cfg.null_label,
                  guided_channels=loaded.spec.guided_channels)


def test_bundled_weights_load_with_their_metadata(digits):
    assert WEIGHTS.stat().st_size <= 5_000_000
    assert digits.model.config == digits_config()
    assert digits.spec.codec == "identity" and digits.spec.guided_channels == 1
    assert digits.spec.class_names == CLASS_NAMES
    # `eqm sample` and the service read the recommended sampler from the file: it must match the code's.
    assert digits.spec.sampler_defaults == DIGITS_DEFAULTS.for_checkpoint()
    record = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert record["model_config"] == digits_config().to_dict()
    assert record["loss_log"] and record["command"].startswith("eqm train-digits")
    assert record["sampler_defaults"] == DIGITS_DEFAULTS.to_dict()


def test_bundled_model_samples_images_of_the_right_shape(digits):
    result = _sample(digits, [0, 5, 9])
    assert result.latents.shape == (3, 1, 8, 8) and torch.isfinite(result.latents).all()
    images = IdentityCodec(1, 8).decode(result.latents)
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8


def test_split_is_fixed_stratified_and_matches_the_codec_scale(split):
    assert split.x_train.shape == (1437, 1, 8, 8) and split.x_test.shape == (360, 1, 8, 8)
    assert torch.bincount(split.y_test).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    assert split.x_train.min() == -1.0 and split.x_train.max() == 1.0
    # The float training data and the uint8 images a user sees agree to within rounding.
    as_images = IdentityCodec(1, 8).encode(to_uint8_images((split.x_test.flatten(1).numpy() + 1) * 8))
    assert torch.allclose(as_images, split.x_test, atol=1 / 127.5)


def test_training_target_points_from_noise_to_data():
    # The network is trained on the descent direction: target . (x - x_g) > 0, so x + eta*f moves to the data.
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8) * 2 - 1

    class Probe(torch.nn.Module):
        def forward(self, x_g, y):
            self.x_g = x_g
            return torch.zeros_like(x_g)

    probe = Probe()
    gen = torch.Generator().manual_seed(0)
    loss_of_zero = eqm_loss(probe, x, torch.zeros(64, dtype=torch.long), TrainConfig(), gen)
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(64, 1, 1, 1, generator=gen)
    eps = torch.randn(x.shape, generator=gen)
    target = (x - eps) * 4.0 * torch.clamp((1 - g) / 0.2, max=1.0)
    assert torch.allclose(loss_of_zero, target.pow(2).mean())
    assert ((target * (x - probe.x_g)).flatten(1).sum(1) >= 0).all()


@pytest.mark.slow
def test_samples_are_recognised_as_the_requested_digits(digits, split):
    """A broken sampler, sign flip or damaged weights drops this far below the bound."""
    from sklearn.svm import SVC
    clf = SVC(C=10.0, gamma="scale").fit(split.x_train.flatten(1).numpy(), split.y_train.numpy())
    labels = np.repeat(np.arange(10), 12)
    result = _sample(digits, labels, seed=5000)
    images = IdentityCodec(1, 8).decode(result.latents)
    predicted = clf.predict(images.reshape(len(labels), -1) / 127.5 - 1.0)
    assert (predicted == labels).mean() >= 0.7


def test_corrupted_weight_file_is_a_checkpoint_error(tmp_path):
    data = WEIGHTS.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(data[:8] + b"\x00\xff" * 32 + data[72:])
    for path in (truncated, garbled):
        with pytest.raises(CheckpointError):
            load_model(path)


def test_cli_sample_with_the_bundled_name_writes_uint8_images(tmp_path):
    out = tmp_path / "digits.npy"
    assert main(["sample", "--checkpoint", "digits", "--labels", "0,1,2,3,4,5,6,7,8,9",
                 "--images-out", str(out)]) == 0
    images = np.load(out)
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
    assert images.std() > 10          # not a blank image


def test_cli_train_digits_writes_a_loadable_model_and_record(tmp_path):
    out = tmp_path / "tiny.safetensors"
    assert main(["train-digits", "--steps", "2", "--batch-size", "8", "--log-every", "1", "--no-progress",
                 "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["steps"] == 2 and len(record["loss_log"]) == 2
    assert load_model(out).model.config == digits_config()


def test_cli_train_digits_rejects_bad_arguments(tmp_path, capsys):
    assert main(["train-digits", "--steps", "0", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert main(["train-digits", "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "--steps must be >= 1" in err and "must end in .safetensors" in err


@pytest.mark.slow
def test_eval_digits_quick_reports_without_touching_the_measured_results(capsys):
    """The CI smoke run of the quality report: every stage runs, the measured section and grid stay as they are."""
    from service.cli.eval_digits import ROOT
    results, grid = ROOT / "bench" / "RESULTS.md", ROOT / "bench" / "digits_samples.png"

    def measured():
        # Only this report's section: other benchmarks may rewrite theirs while the test runs.
        text = results.read_text(encoding="utf-8") if results.exists() else ""
        section = text.partition("## Digits model quality")[2].partition("\n## ")[0]
        return section, grid.read_bytes() if grid.exists() else None

    before = measured()
    assert main(["eval-digits", "--quick"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## Digits model quality") and "OOD AUROC" in out and "Composition" in out
    assert measured() == before
