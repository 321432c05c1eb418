"""The generator and discriminator a pretraining run starts from (wikitext_trainer.py).

Their configs come from the `--model_size` preset and the flags (each MoE hyperparameter is declared once, in
modeling_electra_config.py, and validated by ElectraMoEConfig itself), or from a saved checkpoint's config
(`--init_discriminator_from` / `--init_generator_from`, checked by init_checkpoint.py); the generator's is
derived from the discriminator's by ELECTRA's size rule. Both are built fresh or loaded in fp32.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from torch import nn

from init_checkpoint import load_init_config
from input_checks import InputError

logger = logging.getLogger(__name__)


def model_shape_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the sizes the flags give (None if nothing), in the flags' terms; every other config
    check is ElectraMoEConfig's own, when build_model_configs builds it (before anything is written)."""
    from modeling_electra_config import PRESETS, SIZE_FIELDS

    sizes = {name: getattr(args, name) for name in SIZE_FIELDS}
    sizes = {name: PRESETS[args.model_size][name] if v is None else v for name, v in sizes.items()}
    too_small = [f"--{name} {value}" for name, value in sizes.items() if value < 1]
    if too_small:
        return f"{', '.join(too_small)}: model sizes must be >= 1"
    if sizes["hidden_size"] % sizes["num_attention_heads"] and not args.init_discriminator_from:
        return (
            f"--hidden_size {sizes['hidden_size']} is not a multiple of --num_attention_heads "
            f"{sizes['num_attention_heads']}: each attention head takes an equal share of the hidden size"
        )
    return None


def build_model_configs(
    args: argparse.Namespace, tokenizer_size: int, pad_token_id: int = 0
) -> tuple[Any, Any]:
    """Discriminator config from the size preset plus flags (or from --init_discriminator_from's config), and
    the generator config derived from it by ELECTRA's size rule (or --init_generator_from's)."""
    from modeling_electra_config import MOE_FIELDS, SIZE_FIELDS, ElectraMoEConfig, make_generator_config

    sizes = {name: getattr(args, name) for name in SIZE_FIELDS if getattr(args, name) is not None}
    moe = {name: getattr(args, name) for name in MOE_FIELDS}
    try:
        if args.init_discriminator_from:
            disc = load_init_config(args.init_discriminator_from, "--init_discriminator_from", args)
        else:
            disc = ElectraMoEConfig.from_preset(
                args.model_size, vocab_size=tokenizer_size, pad_token_id=pad_token_id, **sizes, **moe
            )
        if args.max_seq_length > disc.max_position_embeddings:
            raise ValueError(
                f"max_seq_length must be <= max_position_embeddings ({disc.max_position_embeddings})"
            )
        if args.init_generator_from:
            gen = load_init_config(args.init_generator_from, "--init_generator_from", args)
            shared = ("embedding_size", "vocab_size", "max_position_embeddings", "type_vocab_size")
            different = [f"{key} {getattr(gen, key)} vs {getattr(disc, key)}" for key in shared
                         if getattr(gen, key) != getattr(disc, key)]  # fmt: skip
            if different:
                raise ValueError(
                    f"--init_generator_from {args.init_generator_from} cannot share the discriminator's "
                    f"embeddings: {', '.join(different)}"
                )
        else:
            gen = make_generator_config(
                disc, generator_size=args.generator_size, generator_moe=args.generator_moe
            )
    except ValueError as error:
        raise InputError(str(error)) from error
    return disc, gen


def build_models(
    disc_config: Any,
    gen_config: Any,
    init_discriminator_from: str | None = None,
    init_generator_from: str | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Generator and discriminator: fresh, or with the weights saved in the --init_* folders (fp32)."""
    from modeling_electra import ElectraMoEForMaskedLM, ElectraMoEForPreTraining

    models = []
    for cls, config, path in (
        (ElectraMoEForMaskedLM, gen_config, init_generator_from),
        (ElectraMoEForPreTraining, disc_config, init_discriminator_from),
    ):
        if path is None:
            models.append(cls(config))
            continue
        model, info = cls.from_pretrained(path, config=config, dtype=torch.float32, output_loading_info=True)
        logger.info("%s from %s; newly initialised: %s", cls.__name__, path, info["missing_keys"] or "none")
        models.append(model)
    return models[0], models[1]
