"""Checkpoint formats (official train.py, bare, safetensors), conversion, and every error case."""
from __future__ import annotations

import argparse
import collections

import pytest
import torch

from models.eqm.checkpoint import CheckpointError, ModelSpec, convert, load_model, read_state_dict, save_safetensors
from models.eqm.network import EqM, EqMConfig, config_for
from service.cli import main as cli
from tinymodels import random_model

TINY = EqMConfig(arch="custom", input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
                 num_classes=10)


def randomised(cfg: EqMConfig, seed: int) -> EqM:
    return random_model(cfg, seed).train().requires_grad_(True)


def official_checkpoint(path, model_sd, ema_sd, **args):
    """What the official train.py writes: model, ema, opt and an argparse.Namespace."""
    ns = argparse.Namespace(model="EqM-B/2", image_size=256, num_classes=1000, uncond=True, ebm="none", **args)
    torch.save({"model": model_sd, "ema": ema_sd, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "args": ns}, path)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_official_format_loads_ema_by_default_and_model_on_request(tmp_path):
    model, ema = randomised(TINY, 1), randomised(TINY, 2)
    path = tmp_path / "0400000.pt"
    official_checkpoint(path, model.state_dict(), ema.state_dict())
    assert same_weights(load_model(path).model, ema)
    assert same_weights(load_model(path, weights="model").model, model)


def test_bare_state_dict_and_ddp_prefix(tmp_path):
    model = randomised(TINY, 3)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    assert same_weights(load_model(tmp_path / "bare.pt").model, model)
    prefixed = collections.OrderedDict(("module." + k, v) for k, v in model.state_dict().items())
    torch.save(prefixed, tmp_path / "ddp.pt")
    assert same_weights(load_model(tmp_path / "ddp.pt").model, model)


def test_architecture_is_read_off_the_shapes(tmp_path):
    cfg = config_for("EqM-S/8", input_size=16, num_classes=10)
    model = randomised(cfg, 4)
    torch.save(model.state_dict(), tmp_path / "s8.pt")
    loaded = load_model(tmp_path / "s8.pt")
    assert loaded.model.config == cfg
    assert loaded.spec.guided_channels == 3           # released EqM weights: official 3-channel guidance


def test_convert_roundtrip_keeps_metadata(tmp_path):
    ema = randomised(TINY, 5)
    official_checkpoint(tmp_path / "ck.pt", randomised(TINY, 6).state_dict(), ema.state_dict())
    assert cli(["convert", str(tmp_path / "ck.pt"), str(tmp_path / "ck.safetensors"), "--guidance-channels", "all"]) == 0
    state, meta = read_state_dict(tmp_path / "ck.safetensors")
    assert meta["guidance_mode"] == "all" and meta["input_size"] == "8" and meta["num_classes"] == "10"
    loaded = load_model(tmp_path / "ck.safetensors")
    assert same_weights(loaded.model, ema)
    # A custom shape has no registry entry for its head count: the safetensors file records what was used.
    assert loaded.model.config == load_model(tmp_path / "ck.pt").model.config
    assert loaded.spec.guided_channels == 4


def test_wrong_size_names_the_real_architecture(tmp_path):
    cfg = config_for("EqM-S/8", input_size=8, num_classes=10)
    torch.save(randomised(cfg, 7).state_dict(), tmp_path / "small.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "small.pt", arch="EqM-XL/2")
    assert "checkpoint is EqM-S/8" in str(err.value) and "not EqM-XL/2" in str(err.value)
    assert "\n" not in str(err.value)
    # Through the CLI: one line on stderr, no traceback, exit code 2.
    code = cli(["convert", str(tmp_path / "small.pt"), str(tmp_path / "x.safetensors"), "--arch", "EqM-B/2"])
    assert code == 2 and not (tmp_path / "x.safetensors").exists()


def test_cli_error_is_one_line(tmp_path, capsys):
    assert cli(["convert", str(tmp_path / "nope.pt"), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such file" in err and "Traceback" not in err


@pytest.mark.parametrize("content, message", [
    (b"", "file is empty"),
    (b"hello, this is text and not a checkpoint\n" * 10, "not a PyTorch checkpoint"),
])
def test_not_a_checkpoint(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_model(tmp_path)


def test_truncated_files(tmp_path):
    model = randomised(TINY, 8)
    torch.save(model.state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(tmp_path / "cut.pt")
    save_safetensors(model, ModelSpec(TINY), tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_model(tmp_path / "cut.safetensors")


def test_missing_and_unexpected_keys(tmp_path):
    sd = randomised(TINY, 9).state_dict()
    dropped = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    torch.save(dropped, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing 1 keys \(e.g. blocks.1.mlp.fc2.bias\)"):
        load_model(tmp_path / "missing.pt")
    extra = dict(sd, **{"blocks.0.attn.q_norm.weight": torch.ones(8)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected 1 keys \(e.g. blocks.0.attn.q_norm.weight\)"):
        load_model(tmp_path / "extra.pt")
    torch.save({"weight": torch.ones(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an EqM checkpoint"):
        load_model(tmp_path / "other.pt")


def test_inconsistent_shape_is_reported(tmp_path):
    sd = randomised(TINY, 10).state_dict()
    sd["blocks.1.attn.proj.weight"] = torch.zeros(16, 32)
    torch.save(sd, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"blocks.1.attn.proj.weight has shape \(16, 32\)"):
        load_model(tmp_path / "odd.pt")


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_arbitrary_objects_are_never_unpickled(tmp_path, capsys):
    sd = randomised(TINY, 11).state_dict()
    torch.save({"ema": sd, "model": sd, "args": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        load_model(tmp_path / "evil.pt")
    assert "this must never run" not in capsys.readouterr().out


def test_missing_ema_entry(tmp_path):
    sd = randomised(TINY, 12).state_dict()
    torch.save({"model": sd, "opt": {}}, tmp_path / "noema.pt")
    with pytest.raises(CheckpointError, match="has no 'ema' weights"):
        load_model(tmp_path / "noema.pt")
    assert same_weights(load_model(tmp_path / "noema.pt", weights="model").model, randomised(TINY, 12))


def test_convert_refuses_bad_destination(tmp_path):
    torch.save(randomised(TINY, 13).state_dict(), tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="must end in .safetensors"):
        convert(tmp_path / "a.pt", tmp_path / "a.bin")
    with pytest.raises(CheckpointError, match="output folder does not exist"):
        convert(tmp_path / "a.pt", tmp_path / "nope" / "a.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]
