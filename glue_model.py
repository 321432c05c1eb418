"""The checkpoint run_glue.py fine-tunes: resolved once into a `GlueCheckpoint`, then loaded per task.

`--model_name_or_path` may name
- a saved model folder (`<run>/discriminator`, a `--save_model` output, any ELECTRA / ElectraMoE folder);
- a pretraining run folder (its `discriminator/`);
- a pretraining checkpoint `<run>/checkpoints/checkpoint-N` (an intermediate discriminator, for learning
  curves): accelerate's state of the whole `ElectraPretrainingModel`; the discriminator's config and
  tokenizer come from the run folder (`discriminator/` once finished, else `model_config/`, written when the
  run starts) and its weights from the checkpoint's model file;
- a Hub id.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import modeling_electra  # noqa: F401  (registers model_type "electra_moe" with the Auto classes)
from flops import rtd_step_flops
from glue_tasks import DIAGNOSTIC_TASK, GlueTask
from input_checks import (
    InputError,
    check_tokenizer_path,
    finished_run_model,
    looks_like_local_path,
    unstated_moe_fields,
)
from modeling_electra_config import ElectraMoEConfig, config_kwargs, make_generator_config
from rtd import MASK_PROB
from run_state import MODEL_CONFIG_DIR, TRAINING_ARGS_FILE

logger = logging.getLogger(__name__)

# Checkpoints whose classification head --classifier_head chooses.
ELECTRA_MODEL_TYPES = ("electra", "electra_moe")
# What to do about a checkpoint folder saved without its tokenizer.
TOKENIZER_FIX_GLUE = (
    "pass --tokenizer_name with the tokenizer it was pretrained with, e.g. ../shared/data/electra-vocab"
)
PRETRAINING_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# accelerate's model file in a pretraining checkpoint (pickled, or safetensors).
CHECKPOINT_MODEL_FILES = ("pytorch_model.bin", "model.safetensors")
DISCRIMINATOR_PREFIX = "discriminator."


@dataclass(frozen=True)
class GlueCheckpoint:
    """What --model_name_or_path resolved to, read once: the later steps take this record."""

    path: str  # the folder (or Hub id) the weights load from
    kind: str  # "model", "pretraining_run", "pretraining_checkpoint" or "hub"
    config: dict[str, Any]  # its config.json as saved
    tokenizer: str  # tokenizer folder or Hub id
    pretraining_run: str | None = None  # the pretraining run folder, when there is one
    pretraining_step: int | None = None  # the pretraining step of these weights, when known
    pretraining_step_flops: float | None = None  # model FLOPs of one step of that run (flops.rtd_step_flops)

    def describe(self) -> dict[str, Any]:
        """For run_config.json."""
        return {
            "path": self.path,
            "kind": self.kind,
            "tokenizer": self.tokenizer,
            "pretraining_run": self.pretraining_run,
            "pretraining_step": self.pretraining_step,
            "pretraining_flops": self.pretraining_flops,
        }

    @property
    def pretraining_flops(self) -> float | None:
        """Training FLOPs spent on these weights: steps x FLOPs per step (full sequences, no padding)."""
        if self.pretraining_step is None or self.pretraining_step_flops is None:
            return None
        return self.pretraining_step * self.pretraining_step_flops


def resolve_glue_checkpoint(
    name_or_path: str, tokenizer_name: str | None, allow_generator: bool, workdir: Path
) -> GlueCheckpoint:
    """Resolve --model_name_or_path once; a pretraining checkpoint's discriminator is written to `workdir`."""
    path = Path(name_or_path)
    match = PRETRAINING_CHECKPOINT.match(path.name)
    if match and path.is_dir() and not (path / "config.json").is_file():
        record = discriminator_from_checkpoint(path, int(match.group(1)), workdir)
    else:
        folder = pretraining_run_model(path)
        kind = "pretraining_run" if Path(folder) != path else "model" if path.exists() else "hub"
        config = read_checkpoint_config(folder, "--model_name_or_path")
        run = Path(folder).parent if Path(folder).name == "discriminator" else None
        record = GlueCheckpoint(
            path=folder,
            kind=kind,
            config=config,
            tokenizer=folder,
            pretraining_run=str(run) if run else None,
            pretraining_step=finished_run_steps(run) if run else None,
            pretraining_step_flops=pretraining_step_flops(run) if run else None,
        )
    refuse_generator(record.path, record.config, allow_generator)
    check_moe_config_is_explicit(record.path, record.config)
    if tokenizer_name is not None:
        check_tokenizer_path(tokenizer_name)
        return GlueCheckpoint(**{**record.__dict__, "tokenizer": tokenizer_name})
    check_tokenizer_path(record.tokenizer, "--model_name_or_path", TOKENIZER_FIX_GLUE)
    return record


def pretraining_run_model(path: Path) -> str:
    """A pretraining run dir (with discriminator/) resolves to its discriminator; anything else is as given."""
    model = finished_run_model(path)
    if model is not None and not (path / "config.json").is_file():
        return str(model)
    return str(path)


def run_model_spec(run: Path) -> Path | None:
    """The folder with a pretraining run's discriminator config and tokenizer: discriminator/ once finished,
    else model_config/ (written when the run starts); None for a run that has neither."""
    finished = finished_run_model(run)
    if finished is not None:
        return finished
    return run / MODEL_CONFIG_DIR if (run / MODEL_CONFIG_DIR / "config.json").is_file() else None


def finished_run_steps(run: Path) -> int | None:
    """The optimizer steps a finished pretraining run took (its training_args.json), if it says."""
    args_file = run / TRAINING_ARGS_FILE
    if not args_file.is_file():
        return None
    return json.loads(args_file.read_text()).get("total_steps")


def pretraining_step_flops(run: Path) -> float | None:
    """Model FLOPs of one optimizer step of pretraining run `run` (all processes), from its
    training_args.json and saved configs; None when the run does not record them."""
    args_file = run / TRAINING_ARGS_FILE
    spec = run_model_spec(run)
    if not args_file.is_file() or spec is None:
        return None
    args = json.loads(args_file.read_text())
    disc = ElectraMoEConfig.from_pretrained(spec)
    if (run / "generator" / "config.json").is_file():
        gen = ElectraMoEConfig.from_pretrained(run / "generator")
    else:
        gen = make_generator_config(disc, args.get("generator_size"), args.get("generator_moe", False))
    batch = args["batch_size"] * args.get("gradient_accumulation_steps", 1) * args.get("num_processes", 1)
    return rtd_step_flops(disc, gen, batch, args["max_seq_length"], args.get("mask_prob", MASK_PROB))


def discriminator_from_checkpoint(checkpoint: Path, step: int, workdir: Path) -> GlueCheckpoint:
    """Save the discriminator of pretraining checkpoint-N as a model folder under `workdir`."""
    run = checkpoint.parent.parent
    spec = run_model_spec(run)
    if spec is None:
        raise InputError(
            f"--model_name_or_path {checkpoint}: the run folder {run} has neither discriminator/config.json nor "
            f"{MODEL_CONFIG_DIR}/config.json, so the discriminator's architecture is unknown; point it at a "
            "checkpoint of a run started with this version of wikitext_trainer.py"
        )
    weights_file = next((checkpoint / f for f in CHECKPOINT_MODEL_FILES if (checkpoint / f).is_file()), None)
    if weights_file is None:
        raise InputError(
            f"--model_name_or_path {checkpoint} holds none of {', '.join(CHECKPOINT_MODEL_FILES)}; point it at "
            "a complete checkpoint-N folder of a pretraining run"
        )
    config = ElectraMoEConfig.from_pretrained(spec)
    state = load_state_file(weights_file)
    discriminator = {
        k[len(DISCRIMINATOR_PREFIX) :]: v for k, v in state.items() if k.startswith(DISCRIMINATOR_PREFIX)
    }
    model = modeling_electra.ElectraMoEForPreTraining(config)
    missing, unexpected = model.load_state_dict(discriminator, strict=False)
    if missing or unexpected:
        raise InputError(
            f"--model_name_or_path {checkpoint}: its discriminator weights do not fit {spec}/config.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    folder = workdir / f"{run.name}-checkpoint-{step}"
    model.save_pretrained(folder)
    logger.info(
        "pretraining checkpoint %s (step %d): discriminator from %s", checkpoint, step, weights_file.name
    )
    return GlueCheckpoint(
        path=str(folder),
        kind="pretraining_checkpoint",
        config=json.loads((folder / "config.json").read_text()),
        tokenizer=str(spec),
        pretraining_run=str(run),
        pretraining_step=step,
        pretraining_step_flops=pretraining_step_flops(run),
    )


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint_config(name_or_path: str, flag: str) -> dict[str, Any]:
    """config.json of a checkpoint directory or Hub id; a missing one is an InputError naming `flag`."""
    if not Path(name_or_path).exists() and looks_like_local_path(name_or_path):
        raise InputError(f"{flag} {name_or_path}: no such directory; point it at a checkpoint directory")
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name_or_path)
    except OSError as error:
        where = "has no config.json" if Path(name_or_path).is_dir() else "is not a local directory"
        reason = str(error).splitlines()[0]
        raise InputError(
            f"{flag} {name_or_path} {where} and could not be loaded ({reason}); point it at a saved model "
            "directory (a pretraining run's discriminator/, run directory or checkpoints/checkpoint-N)"
        ) from error
    return config_dict


def refuse_generator(checkpoint: str, config_dict: dict[str, Any], allowed: bool) -> None:
    """A masked-LM checkpoint (ELECTRA's generator) is not what GLUE fine-tunes, unless asked for."""
    masked_lm = [a for a in config_dict.get("architectures") or [] if a.endswith("ForMaskedLM")]
    if not masked_lm or allowed:
        return
    sibling = Path(checkpoint).parent / "discriminator"
    meant = f"--model_name_or_path {sibling}" if sibling.is_dir() else "the run's discriminator/ directory"
    raise InputError(
        f"{checkpoint} is a masked-LM (generator) checkpoint ({masked_lm[0]}); fine-tune the discriminator: "
        f"{meant} (or pass --allow_generator to fine-tune the generator anyway)"
    )


def check_moe_config_is_explicit(checkpoint: str, config_dict: dict[str, Any]) -> None:
    """An electra_moe config.json must state its MoE settings: a missing field must not fall back to a default."""
    missing = unstated_moe_fields(config_dict)
    if missing:
        raise InputError(f"{checkpoint}/config.json has model_type electra_moe but no {missing}; re-save it")


def default_model_name(name_or_path: str) -> str:
    """Results folder name: the pretraining run's name for `<run>/discriminator` (`<run>_step<N>` for
    `<run>/checkpoints/checkpoint-N`), the original model's name for a model saved by `--save_model`
    (`<run dir>/model`), else the checkpoint's folder or Hub name."""
    path = Path(name_or_path.rstrip("/"))
    saved_by_us = path.parent / "run_config.json"
    if saved_by_us.is_file():
        return json.loads(saved_by_us.read_text())["model_name"]
    match = PRETRAINING_CHECKPOINT.match(path.name)
    if match and path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name}_step{match.group(1)}"
    if path.name in ("discriminator", "generator") and path.parent.name:
        # <run>/discriminator is the run's model; a generator (--allow_generator) is filed apart from it.
        return path.parent.name + ("_generator" if path.name == "generator" else "")
    return path.name


def choose_classifier_head(requested: str | None, config_dict: dict[str, Any]) -> str | None:
    """The head to fine-tune with: `requested`, else the checkpoint's own when it is already a sequence
    classifier (transformers' for an `ElectraForSequenceClassification`), else ELECTRA's. None: the model
    type has no choice (not an ELECTRA checkpoint), its Auto class decides."""
    model_type = config_dict.get("model_type")
    if model_type not in ELECTRA_MODEL_TYPES:
        if requested == "electra":
            raise ValueError(
                f"--classifier_head electra needs an ELECTRA or ElectraMoE checkpoint, not model_type "
                f"{model_type!r}; leave the flag out to use the checkpoint's own head"
            )
        return None
    if requested is not None:
        return requested
    if any(name.endswith("ForSequenceClassification") for name in config_dict.get("architectures") or []):
        return config_dict.get("classifier_head", "hf")
    return "electra"


def classification_config(checkpoint: GlueCheckpoint, task: GlueTask, head: str | None) -> PretrainedConfig:
    """The checkpoint's config with the task's labels and the classifier head.

    transformers' ELECTRA has only its own head: with ELECTRA's, a plain ELECTRA checkpoint is read into
    the dense ElectraMoE model (the same weights under the same names, the same function).
    """
    label_kwargs: dict[str, Any] = {"num_labels": task.num_labels, "finetuning_task": task.name}
    if task.is_regression:
        label_kwargs["problem_type"] = "regression"
    else:
        label_kwargs["problem_type"] = "single_label_classification"
        label_kwargs["id2label"] = dict(enumerate(task.label_names))
        label_kwargs["label2id"] = {name: i for i, name in enumerate(task.label_names)}
    config_class = CONFIG_MAPPING[checkpoint.config["model_type"]]
    config = config_class.from_dict(dict(checkpoint.config), **label_kwargs)
    if head is None:
        return config
    if config.model_type == "electra" and head == "electra":
        return ElectraMoEConfig(**config_kwargs(config), num_experts=1, classifier_head=head)
    if config.model_type == "electra_moe":
        config.classifier_head = head
    return config


def load_model(
    checkpoint: GlueCheckpoint, task: GlueTask, random_init: bool = False, classifier_head: str | None = None
) -> tuple[transformers.PreTrainedTokenizerBase, PreTrainedModel]:
    """Load the tokenizer and a sequence-classification model; only the head may be newly initialised.

    With `random_init` every weight is fresh (seeded by the caller): the checkpoint gives only the
    architecture, MoE settings included, so the baseline differs from the pretrained run in weights alone.
    `classifier_head` (ELECTRA checkpoints): see `choose_classifier_head`.
    """
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.tokenizer)
    head = choose_classifier_head(classifier_head, checkpoint.config)
    config = classification_config(checkpoint, task, head)
    if random_init:
        logger.info(
            "--random_init: %s gives the architecture only; all weights are freshly initialised",
            checkpoint.path,
        )
        return tokenizer, AutoModelForSequenceClassification.from_config(config)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        checkpoint.path, config=config, output_loading_info=True, ignore_mismatched_sizes=True
    )
    check_loaded_weights(checkpoint.path, task, model, info)
    return tokenizer, model


def check_loaded_weights(path: str, task: GlueTask, model: PreTrainedModel, info: dict[str, Any]) -> None:
    """Every encoder weight must come from the checkpoint; AX needs a trained MNLI head."""
    body_prefix = model.base_model_prefix + "."
    missing = sorted(info["missing_keys"])
    mismatched = sorted(
        str(entry[0] if isinstance(entry, (tuple, list)) else entry) for entry in info["mismatched_keys"]
    )
    body_missing = [key for key in missing + mismatched if key.startswith(body_prefix)]
    if body_missing:
        raise ValueError(
            f"{path} has no usable weights for {len(body_missing)} encoder parameters "
            f"(e.g. {body_missing[:4]}): they would be trained from random values. Point "
            "--model_name_or_path at a pretrained discriminator (or its pretraining run directory)."
        )
    new_head = missing + mismatched
    if task.name == DIAGNOSTIC_TASK and new_head:
        raise ValueError(
            f"{path} has no trained MNLI head ({new_head[:2]} would be random): AX predictions need a "
            "checkpoint fine-tuned on MNLI (run_glue.py --task_name mnli --save_model, then its model/ dir)"
        )
    if new_head:
        logger.info("new classification head: %s", new_head)
