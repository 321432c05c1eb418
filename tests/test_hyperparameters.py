"""Each MoE hyperparameter is declared once (an ElectraMoEConfig field made with `hyperparameter()`); the
flags, the continued-pretraining checks, the resume comparison and the configs derive from it."""

from dataclasses import fields

import pytest

import convert_bert_checkpoint
import run_state
import wikitext_trainer as wt
from init_checkpoint import init_flags_error
from input_checks import InputError
from modeling_electra_config import (
    ARCHITECTURE,
    ARCHITECTURE_FIELDS,
    MOE_FIELDS,
    ROUTER_TRAINING,
    ROUTER_TRAINING_FIELDS,
    SIZE_FIELDS,
    ElectraMoEConfig,
    hyperparameter_fields,
)

# A value other than the default for each declared field, valid together with --num_experts 4.
NON_DEFAULT = {
    "top_k": 1, "moe_layers": [1], "moe_layer_frequency": 2, "expert_intermediate_size": 48,
    "capacity_factor": 1.5, "router_type": "noisy_topk", "expert_choice_scope": "batch",
    "norm_topk_prob": True, "router_jitter_noise": 0.1, "router_aux_loss_coef": 0.02,
    "router_z_loss_coef": 0.002, "moe_implementation": "loop",
}  # fmt: skip


def as_flags(values: dict) -> list[str]:
    argv = []
    for name, value in values.items():
        if value is True:
            argv.append(f"--{name}")
        else:
            argv += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    return argv


def test_every_declared_field_is_a_trainer_flag_with_the_fields_default():
    declared = {f.name: f for f in fields(ElectraMoEConfig) if "kind" in f.metadata}
    assert tuple(declared) == MOE_FIELDS and set(NON_DEFAULT) | {"num_experts"} == set(MOE_FIELDS)
    defaults = wt.parse_args([])
    for name, spec in declared.items():
        assert getattr(defaults, name) == spec.default, name
    for name in SIZE_FIELDS:
        assert getattr(defaults, name) is None, f"--{name} overrides the preset only when given"
    assert tuple(f.name for f in hyperparameter_fields(ROUTER_TRAINING)) == ROUTER_TRAINING_FIELDS
    assert (*SIZE_FIELDS, *(f.name for f in hyperparameter_fields(ARCHITECTURE))) == ARCHITECTURE_FIELDS
    assert set(ARCHITECTURE_FIELDS).isdisjoint(ROUTER_TRAINING_FIELDS)


def test_the_flags_reach_the_config_and_the_converter_takes_its_share():
    # expert_choice_scope is refused beside a token-choice router (it would be ignored): its own run.
    token_choice = {name: value for name, value in NON_DEFAULT.items() if name != "expert_choice_scope"}
    expert_choice = {"router_type": "expert_choice", "expert_choice_scope": "batch"}
    for values in (token_choice, expert_choice):
        args = wt.parse_args(["--model_size", "tiny", "--num_experts", "4", *as_flags(values)])
        disc, _ = wt.build_model_configs(args, 100)
        for name, value in values.items():
            assert getattr(disc, name) == value, name
    converter = convert_bert_checkpoint.parse_args(["--bert_path", "b", "--output_dir", "o", "--top_k", "1"])
    assert converter.top_k == 1 and converter.norm_topk_prob is True


def test_architecture_flags_are_refused_with_an_init_checkpoint_and_router_flags_are_not():
    parser = wt.build_argument_parser()
    for name in ARCHITECTURE_FIELDS:
        value = NON_DEFAULT.get(name, 64)
        args = parser.parse_args(["--init_discriminator_from", "d", *as_flags({name: value})])
        assert f"--{name}" in (init_flags_error(parser, args) or ""), name
    for name in ROUTER_TRAINING_FIELDS:
        args = parser.parse_args(["--init_discriminator_from", "d", *as_flags({name: NON_DEFAULT[name]})])
        assert init_flags_error(parser, args) is None, name


def test_a_resume_compares_every_hyperparameter_not_declared_changeable():
    changeable = {f.name for f in hyperparameter_fields() if f.metadata["changeable_on_resume"]}
    assert run_state.BOOKKEEPING_FLAGS | changeable == run_state.CHANGEABLE_ON_RESUME
    assert not set(MOE_FIELDS) & run_state.CHANGEABLE_ON_RESUME


def test_the_config_validates_what_the_flags_build():
    args = wt.parse_args(["--model_size", "tiny", "--num_experts", "4", "--top_k", "5"])
    with pytest.raises(InputError, match="top_k must be between 1 and num_experts=4"):
        wt.build_model_configs(args, 100)
