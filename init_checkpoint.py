"""Continued pretraining from saved models: the checks and config of `--init_discriminator_from DIR` and
`--init_generator_from DIR` (wikitext_trainer.py).

The checkpoint's config.json fixes the architecture (flags that contradict it are refused: the ARCHITECTURE
fields of modeling_electra_config.py), while the training-time router settings (its ROUTER_TRAINING fields)
come from this run's flags. Its vocabulary must be the tokenizer's and its weights must cover the encoder the
config describes; every problem is an InputError naming the flag, before any model is built.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from input_checks import TOKENIZER_FILES, InputError


def init_flags_error(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """Flags that contradict a checkpoint's architecture, or an --init_generator_from without a discriminator."""
    if args.init_generator_from and not args.init_discriminator_from:
        return "--init_generator_from needs --init_discriminator_from (the generator shares its embeddings)"
    if not args.init_discriminator_from:
        return None
    from modeling_electra_config import ARCHITECTURE_FIELDS

    fields = list(ARCHITECTURE_FIELDS)
    if args.init_generator_from:
        fields += ["generator_size", "generator_moe"]
    given = [f"--{name}" for name in fields if getattr(args, name) != parser.get_default(name)]
    if given:
        return (
            f"{', '.join(given)} cannot be combined with --init_discriminator_from: the architecture comes "
            "from the checkpoint's config.json"
        )
    return None


def load_init_config(path: str, flag: str, args: argparse.Namespace) -> Any:
    """The ElectraMoE config saved in `path`, with this run's training-time router settings."""
    from modeling_electra_config import ROUTER_TRAINING_FIELDS, ElectraMoEConfig, preset_name

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise InputError(
            f"{flag} {path} holds no config.json: pass a folder written by save_pretrained (a pretraining "
            "run's discriminator/ or generator/, or convert_bert_checkpoint.py's output)"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
        config = ElectraMoEConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise InputError(f"{flag} {path}: could not read its config.json ({error})") from error
    if model_type != ElectraMoEConfig.model_type:
        raise InputError(
            f"{flag} {path} holds a '{model_type}' model, not an ElectraMoE one; convert a BERT checkpoint "
            "with convert_bert_checkpoint.py first"
        )
    # Rebuilt, not patched attribute by attribute, so the config's defaults and checks apply to the new
    # settings (an expert-choice router keeps its capacity factor of 2 when --capacity_factor is not given).
    settings = dict(config.to_dict(), **{name: getattr(args, name) for name in ROUTER_TRAINING_FIELDS})
    try:
        config = ElectraMoEConfig.from_dict(settings)
    except ValueError as error:
        raise InputError(f"{flag} {path}: {error}") from error
    if config.model_size is None:  # e.g. a converted BERT: name its size if it is a preset's
        config.model_size = preset_name(config.hidden_size, config.num_hidden_layers)
    return config


def check_init_vocabulary(args: argparse.Namespace, tokenizer: Any, configs: tuple[Any, Any]) -> None:
    """A checkpoint's vocabulary must be the tokenizer's: same size, and the same tokens if it saved its own."""
    from transformers import AutoTokenizer

    for flag, path, config in (
        ("--init_discriminator_from", args.init_discriminator_from, configs[0]),
        ("--init_generator_from", args.init_generator_from, configs[1]),
    ):
        if path is None:
            continue
        fix = f"pass --tokenizer_name {path} (the checkpoint's own tokenizer)"
        if config.vocab_size != len(tokenizer):
            raise InputError(
                f"{flag} {path} has a vocabulary of {config.vocab_size} tokens, the tokenizer "
                f"{len(tokenizer)}: {fix}"
            )
        has_tokenizer = any((Path(path) / name).is_file() for name in TOKENIZER_FILES)
        if has_tokenizer and AutoTokenizer.from_pretrained(path).get_vocab() != tokenizer.get_vocab():
            raise InputError(
                f"{flag} {path} saved a tokenizer whose vocabulary differs from this run's: {fix}"
            )
        check_init_weights(flag, path, config)


def check_init_weights(flag: str, path: str, config: Any) -> None:
    """Every encoder weight of the config must be in the folder's safetensors (a run's or a converted model)."""
    from safetensors import safe_open

    from modeling_electra import ElectraMoEModel

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise InputError(f"{flag} {path} holds no *.safetensors weights (save_pretrained writes them)")
    saved = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            saved |= {key.removeprefix("electra.") for key in handle.keys()}  # noqa: SIM118 (not iterable)
    with torch.device("meta"):
        expected = set(ElectraMoEModel(config).state_dict())
    missing = sorted(key for key in expected - saved if not key.endswith("position_ids"))
    if missing:
        raise InputError(
            f"{flag} {path} lacks {len(missing)} encoder weights its config.json describes (e.g. {missing[:3]})"
        )
