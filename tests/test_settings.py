"""One set of sampling settings: ``SamplerParams`` (models/sampler.py) is the type; every other place that
names them (the API's request and response schemas, a model's defaults, the job record, the command
line, the Python API) is derived from it or held to it here, so a setting added in one place and not
the others fails this test. Defaults live once: the paper's in ``SamplerParams``, the SDE's in
``HeunSDEParams``."""
from __future__ import annotations

from dataclasses import asdict, fields

from models.family import SamplingDefaults
from models.heun_sde import HeunSDEParams
from models.offline import SETTINGS
from models.sampler import SamplerParams

SETTING_NAMES = [f.name for f in fields(SamplerParams)]
# The command line spells one setting differently (``--steps``, as the official --num-sampling-steps).
CLI_NAMES = {"max_steps": "steps"}


def test_the_settings_are_the_seven_of_the_sampler():
    assert SETTING_NAMES == ["sampler", "step_size", "mu", "max_steps", "grad_norm_threshold", "epsilon_max",
                             "time_cutoff"]


def test_the_job_record_holds_the_same_settings_with_the_same_defaults():
    from service.jobstore import SamplerSpec
    assert asdict(SamplerSpec()) == asdict(SamplerParams())


def test_the_api_request_and_response_name_every_setting():
    from service.api.schemas import ModelDefaults, SamplerSettings, SamplingOptions
    assert set(SETTING_NAMES) <= set(SamplingOptions.model_fields)
    assert list(SamplerSettings.model_fields) == SETTING_NAMES
    assert list(ModelDefaults.model_fields) == [f.name for f in fields(SamplingDefaults)]


def test_a_models_defaults_name_every_setting():
    assert set(SETTING_NAMES) <= {f.name for f in fields(SamplingDefaults)}


def test_the_command_line_and_the_python_api_take_every_setting():
    from service.cli import build_parser
    sample = build_parser()._subparsers._group_actions[0].choices["sample"]
    dests = {a.dest for a in sample._actions}
    assert {CLI_NAMES.get(n, n) for n in SETTING_NAMES} <= dests
    assert set(SETTING_NAMES) <= set(SETTINGS)


def test_the_paper_and_sde_defaults_are_written_once():
    from models.eqm import PAPER_GUIDANCE_SCALE
    from models.energy_matching import OFFICIAL_SAMPLER
    from service.cli.sample import PAPER_DEFAULTS
    paper = SamplerParams()
    assert PAPER_DEFAULTS == {"sampler": paper.sampler, "step_size": paper.step_size, "mu": paper.mu,
                              "max_steps": paper.max_steps, "grad_norm_threshold": paper.grad_norm_threshold,
                              "cfg_scale": PAPER_GUIDANCE_SCALE}     # the CLI's copy: its --help needs no torch
    assert OFFICIAL_SAMPLER == asdict(HeunSDEParams())
    assert HeunSDEParams().t_end == 3.25                             # the official CIFAR-10 t_end
