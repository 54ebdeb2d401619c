"""The quality judge: it ranks real > blurred > noise, is deterministic, and its floor is the real data's."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.digits_data import load_digits_split
from models.judge import Judge, JudgeConfig, as_judged_pixels, frechet_distance, precision_recall


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.shared()


def _blurred(x: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    return torch.nn.functional.avg_pool2d(padded, 3, stride=1)


def test_ranks_real_above_blurred_above_noise(judge):
    split = load_digits_split()
    real, labels = split.x_train[:400], split.y_train[:400].numpy()
    noise = torch.rand(400, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    s_real, s_blur, s_noise = (judge.score(x, labels) for x in (real, _blurred(real), noise))
    assert s_real.fd < s_blur.fd < s_noise.fd
    assert s_real.precision > s_blur.precision > s_noise.precision
    assert s_real.accuracy > s_noise.accuracy


def test_lost_variety_shows_in_recall_not_in_accuracy(judge):
    """One prototype per class: every sample is a clean, correctly classified digit, and recall collapses."""
    split = load_digits_split()
    protos = torch.stack([split.x_train[split.y_train == k][0] for k in range(10)])
    collapsed = protos.repeat(40, 1, 1, 1)
    labels = np.tile(np.arange(10), 40)
    s_real = judge.score(split.x_train[:400], split.y_train[:400].numpy())
    s_collapsed = judge.score(collapsed, labels)
    assert s_collapsed.accuracy >= 0.9
    assert s_collapsed.recall < 0.5 * s_real.recall
    assert s_collapsed.fd > 5 * s_real.fd


def test_deterministic_rebuild(judge):
    other = Judge(JudgeConfig())
    x = load_digits_split().x_test
    assert np.array_equal(other.features(x), judge.features(x))
    assert other.held_out_accuracy == judge.held_out_accuracy
    assert judge.held_out_accuracy >= 0.95


def test_floor_is_near_zero_and_far_below_the_ceiling(judge):
    floor, ceiling = judge.floor(300), judge.ceiling(300)
    assert floor.accuracy == 1.0 and floor.precision > 0.85 and floor.recall > 0.85
    assert ceiling.precision == 0.0 and ceiling.fd > 50 * floor.fd


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2.0 + 1.0
    # |mu|^2 = 3, traces 3 + 12, cross term 2 * tr(sqrt(4 I)) = 12 -> 3 + 15 - 12 = 6
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)


def test_precision_recall_of_a_subset():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 2))
    inside = real[real[:, 0] < -0.5] + 1e-3       # near real points, but only on one side: sharp, no coverage
    precision, recall = precision_recall(real, inside)
    assert precision == 1.0 and recall < 0.5
    assert precision_recall(real, real + 1e-3) == (1.0, 1.0)


def test_uint8_and_float_inputs_agree():
    x = load_digits_split().x_test[:20]
    as_uint8 = np.clip(np.rint(x.numpy()[:, 0] * 127.5 + 128), 0, 255).astype(np.uint8)
    assert torch.equal(as_judged_pixels(x), as_judged_pixels(as_uint8))
    assert torch.equal(as_judged_pixels(x), as_judged_pixels(np.repeat(as_uint8[..., None], 3, axis=-1)))
    with pytest.raises(ValueError, match="8x8 digits"):
        as_judged_pixels(np.zeros((10, 28, 28), np.uint8))


def test_eval_command_on_an_image_file(tmp_path, capsys):
    from service.cli import main
    split = load_digits_split()
    pixels = np.clip(np.rint(split.x_train[:200].numpy()[:, 0] * 127.5 + 128), 0, 255).astype(np.uint8)
    path = tmp_path / "real.npz"
    np.savez(path, arr_0=pixels[..., None], labels=split.y_train[:200].numpy())
    assert main(["eval", "--images", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"]["accuracy"] >= 0.98
    assert report["samples"]["fd"] < 0.1 * report["ceiling"]["fd"]
    assert main(["eval", "--images", str(tmp_path / "missing.npy")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_eval_command_samples_a_bundled_model(capsys):
    from service.cli import main
    assert main(["eval", "--model", "digits", "--per-class", "5", "--steps", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["max_steps"] == 5 and report["mean_steps"] <= 5
    assert report["samples"]["count"] == 50 and report["samples"]["fd"] < report["ceiling"]["fd"]


def test_precision_recall_in_blocks_equals_all_at_once(monkeypatch):
    """Blocks of rows keep memory flat for 50,000 samples and give exactly the one-shot figures."""
    import models.judge as judge_module
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(120, 16)), rng.normal(0.3, 1.2, size=(150, 16))

    def one_shot(real, fake, k=3):
        radii = lambda p: np.sort(np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1)), axis=1)[:, k]   # noqa: E731
        cross = np.sqrt(((fake[:, None] - real[None]) ** 2).sum(-1))
        return (float((cross <= radii(real)[None]).any(1).mean()), float((cross <= radii(fake)[:, None]).any(0).mean()))

    expected = one_shot(real, fake)
    monkeypatch.setattr(judge_module, "DISTANCE_BLOCK_ELEMENTS", 16 * 150 * 7)      # blocks of a few rows
    assert precision_recall(real, fake) == expected
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0
