"""Score discriminators on one fixed replaced-token-detection set, independent of each run's own generator.

A run's validation metrics (wikitext_trainer.py) corrupt the text with that run's own generator, so two
runs with different generators are not scored on the same task. This script builds a fixed evaluation set
once, from a reference pretraining run: its validation examples (the same data pipeline and flags, read
from its `training_args.json`), 15% of the real tokens chosen as ELECTRA masks them, and two corrupted
copies on exactly those positions:

- `generator`: replaced by samples of one fixed generator (the reference run's `generator/`, or --generator);
- `uniform`: replaced by tokens drawn uniformly from the vocabulary (special tokens excluded).

The set is saved (token ids, the chosen and the replaced positions, and what made it) and every later
call scores any number of discriminators on exactly those tokens: RTD loss, accuracy, ROC AUC,
replaced-token precision/recall/F1 over all real tokens (as training computes them), each MoE layer's
router entropy and expert load, and how far apart the experts' weights are (spread, as
bench/expert_divergence.py). Results go to a JSON (everything) and a CSV (one row per model and
corruption).

    python score_rtd.py --eval_set outputs/eval/rtd_eval.npz --reference_run outputs/pretrain/small \
        --discriminators outputs/pretrain/small outputs/pretrain/small-8x2 --output outputs/eval/scores.json

`wikitext_trainer.py --fixed_eval_set PATH` scores the discriminator on such a set at every evaluation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from input_checks import EXIT_BAD_INPUT, TOKENIZER_FILES, InputError
from outputs import write_atomically, write_json_atomically, write_text_atomically
from run_state import TRAINING_ARGS_FILE

EVAL_SET_VERSION = 1
CORRUPTIONS = ("generator", "uniform")
DEFAULT_MAX_EXAMPLES = 512
DEFAULT_SEED = 0
BATCH_SIZE = 32


# ----------------------------------------------------------------------------------------------------------
# The evaluation set: built once, saved as token ids and positions
# ----------------------------------------------------------------------------------------------------------


def vocabulary_fingerprint(tokenizer: Any) -> str:
    """A hash of the token -> id map: two tokenizers with the same fingerprint encode text the same way."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def reference_validation(run_dir: Path, max_examples: int) -> tuple[Any, dict[str, np.ndarray], dict]:
    """The reference run's tokenizer and first `max_examples` validation examples, via its own data flags."""
    from pretrain_data import describe_data_source, load_tokenizer, prepare_blocks

    args = argparse.Namespace(**json.loads((run_dir / TRAINING_ARGS_FILE).read_text()))
    source = describe_data_source(args)
    tokenizer = load_tokenizer(args, source)
    validation = prepare_blocks(args, tokenizer, source)["validation"]
    return tokenizer, {name: array[:max_examples] for name, array in validation.items()}, source


def replacement_ids(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """The ids uniform replacement draws from: the vocabulary without the special tokens."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[i for i in tokenizer.all_special_ids if i < vocab_size]] = False
    return allowed.nonzero().squeeze(1)


@torch.no_grad()
def corrupt_batch(
    batch: dict[str, torch.Tensor],
    generator_model: Any,
    tokenizer: Any,
    mask_prob: float,
    rng: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Choose the positions as ELECTRA masks them; replace them by generator samples and by uniform draws."""
    from rtd import mask_tokens, maskable_positions, replace_tokens, sample_tokens

    input_ids, types = batch["input_ids"], batch.get("token_type_ids")
    attention_mask = (input_ids != tokenizer.pad_token_id).long()
    unmaskable = torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id])
    maskable = maskable_positions(input_ids, attention_mask, unmaskable)
    masked_ids, chosen = mask_tokens(
        input_ids, maskable, attention_mask, tokenizer.mask_token_id, mask_prob, generator=rng
    )
    logits = generator_model(masked_ids, attention_mask=attention_mask, token_type_ids=types).logits
    generator_ids, _ = replace_tokens(input_ids, chosen, sample_tokens(logits[chosen], generator=rng))
    pool = replacement_ids(tokenizer, logits.shape[-1])
    uniform = pool[torch.randint(len(pool), (int(chosen.sum()),), generator=rng)]
    uniform_ids, _ = replace_tokens(input_ids, chosen, uniform)
    return {"chosen": chosen, "generator_input_ids": generator_ids, "uniform_input_ids": uniform_ids}


def build_eval_set(
    blocks: dict[str, np.ndarray], generator_model: Any, tokenizer: Any, mask_prob: float, seed: int
) -> dict[str, np.ndarray]:
    """Arrays [examples, length]: input_ids (token_type_ids), chosen, and per corruption its input ids and
    replaced positions (a sample equal to the original token is not a replacement, as in training)."""
    generator_model.eval()
    rng = torch.Generator().manual_seed(seed)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(blocks["input_ids"]), BATCH_SIZE):
        batch = {k: torch.tensor(v[start : start + BATCH_SIZE], dtype=torch.long) for k, v in blocks.items()}
        for name, tensor in corrupt_batch(batch, generator_model, tokenizer, mask_prob, rng).items():
            parts.setdefault(name, []).append(tensor.numpy())
    arrays = {name: np.asarray(array) for name, array in blocks.items()}
    arrays.update({name: np.concatenate(chunks) for name, chunks in parts.items()})
    for kind in CORRUPTIONS:
        arrays[f"{kind}_input_ids"] = arrays[f"{kind}_input_ids"].astype(arrays["input_ids"].dtype)
        arrays[f"{kind}_replaced"] = arrays[f"{kind}_input_ids"] != arrays["input_ids"]
    return arrays


def save_eval_set(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, meta=np.array(json.dumps(meta)), **arrays)

    write_atomically(path, write)


def load_eval_set(path: Path, flag: str = "--eval_set") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        with np.load(path) as saved:
            arrays = {name: saved[name] for name in saved.files}
    except (OSError, ValueError) as error:
        raise InputError(
            f"{flag} {path} is not an evaluation set written by score_rtd.py ({error})"
        ) from None
    meta = json.loads(str(arrays.pop("meta", "{}")))
    if meta.get("version") != EVAL_SET_VERSION:
        raise InputError(f"{flag} {path} has version {meta.get('version')}, expected {EVAL_SET_VERSION}")
    return arrays, meta


def check_fixed_eval_set(path: str, tokenizer: Any) -> None:
    """wikitext_trainer.py --fixed_eval_set: the set must exist and use the run's vocabulary."""
    if not Path(path).is_file():
        raise InputError(f"--fixed_eval_set {path} does not exist; build it with score_rtd.py --eval_set")
    _, meta = load_eval_set(Path(path), "--fixed_eval_set")
    if meta["vocabulary"] != vocabulary_fingerprint(tokenizer):
        raise InputError(f"--fixed_eval_set {path} was built with another vocabulary than --tokenizer_name's")


def make_eval_set(args: argparse.Namespace) -> None:
    """Build the set from --reference_run (and its or --generator's generator) and save it to --eval_set."""
    from transformers import AutoModelForMaskedLM

    import modeling_electra  # noqa: F401  (registers electra_moe)

    if args.reference_run is None:
        raise InputError(
            f"--eval_set {args.eval_set} does not exist; pass --reference_run RUN_DIR to build it"
        )
    if not (args.reference_run / TRAINING_ARGS_FILE).is_file():
        raise InputError(
            f"--reference_run {args.reference_run} has no {TRAINING_ARGS_FILE}: pass a pretraining run folder"
        )
    generator_dir = args.generator or args.reference_run / "generator"
    if not (generator_dir / "config.json").is_file():
        flag = "--generator" if args.generator else "--reference_run's generator/"
        raise InputError(f"{flag} {generator_dir} is not a saved generator (no config.json)")
    tokenizer, blocks, source = reference_validation(args.reference_run, args.max_examples)
    run_args = json.loads((args.reference_run / TRAINING_ARGS_FILE).read_text())
    generator_model = AutoModelForMaskedLM.from_pretrained(generator_dir)
    arrays = build_eval_set(blocks, generator_model, tokenizer, run_args["mask_prob"], args.seed)
    meta = {
        "version": EVAL_SET_VERSION,
        "reference_run": str(args.reference_run),
        "generator": str(generator_dir),
        "data": source,
        "seed": args.seed,
        "mask_prob": run_args["mask_prob"],
        "examples": len(arrays["input_ids"]),
        "pad_token_id": tokenizer.pad_token_id,
        "vocabulary": vocabulary_fingerprint(tokenizer),
        "replaced_fraction": {k: float(arrays[f"{k}_replaced"].mean()) for k in CORRUPTIONS},
    }
    save_eval_set(args.eval_set, arrays, meta)
    print(f"wrote {meta['examples']} examples to {args.eval_set}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# Scoring a discriminator on the set
# ----------------------------------------------------------------------------------------------------------


def detection_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """RTD loss, accuracy, ROC AUC and replaced-token precision/recall/F1 (threshold logit 0) over tokens."""
    from sklearn.metrics import roc_auc_score

    loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(labels).float())
    predicted, actual = logits > 0, labels.astype(bool)
    true_positives = float((predicted & actual).sum())
    both = float(predicted.sum() + actual.sum())
    return {
        "rtd_loss": loss.item(),
        "accuracy": float((predicted == actual).mean()),
        "auc": float(roc_auc_score(actual, logits)) if 0 < actual.sum() < actual.size else float("nan"),
        "precision": true_positives / max(float(predicted.sum()), 1.0),
        "recall": true_positives / max(float(actual.sum()), 1.0),
        "f1": 2 * true_positives / max(both, 1.0),
        "replaced_fraction": float(actual.mean()),
    }


def expert_spread(weight_in: torch.Tensor) -> float:
    """‖W_e − mean_e W_e‖ / ‖mean_e W_e‖ averaged over the experts: 0 while they are copies of one FFN."""
    weight_in = weight_in.detach().float()
    mean = weight_in.mean(0)
    return ((weight_in - mean).flatten(1).norm(dim=1) / mean.norm()).mean().item()


def moe_spreads(model: Any) -> list[float]:
    """Per MoE layer of a discriminator (in layer order), its experts' spread of the FFN input weights."""
    return [
        expert_spread(module.weight_in)
        for name, module in model.named_modules()
        if name.endswith("moe.experts")
    ]


def corrupted_batches(arrays: dict[str, np.ndarray], kind: str, pad_token_id: int, batch_size: int):
    """(model inputs, real-token mask, replaced labels of the real tokens) per batch of one corruption."""
    for start in range(0, len(arrays["input_ids"]), batch_size):
        window = slice(start, start + batch_size)
        ids = torch.as_tensor(arrays[f"{kind}_input_ids"][window], dtype=torch.long)
        real = ids != pad_token_id
        inputs = {"input_ids": ids, "attention_mask": real.long()}
        if "token_type_ids" in arrays:
            inputs["token_type_ids"] = torch.as_tensor(arrays["token_type_ids"][window], dtype=torch.long)
        yield inputs, real, arrays[f"{kind}_replaced"][window][real.numpy()]


@torch.no_grad()
def score_corruption(model: Any, batches) -> dict[str, Any]:
    """Detection scores over all real tokens; for an MoE model, each layer's router entropy and expert load
    averaged over the batches weighted by their real tokens."""
    device = next(model.parameters()).device
    logits, labels, router = [], [], {}
    for inputs, real, replaced in batches:
        out = model(**{name: tensor.to(device) for name, tensor in inputs.items()})
        logits.append(out.logits.float().cpu()[real].numpy())
        labels.append(replaced)
        if out.expert_load is not None:
            for name in ("router_entropy", "expert_load"):
                router[name] = router.get(name, 0.0) + getattr(out, name).float().cpu() * len(replaced)
    scores = detection_scores(np.concatenate(logits), np.concatenate(labels))
    tokens = sum(len(chunk) for chunk in labels)
    return scores | {name: (total / tokens).tolist() for name, total in router.items()}


def score_discriminator(
    model: Any, arrays: dict[str, np.ndarray], pad_token_id: int, batch_size: int
) -> dict:
    """`{"expert_spread": [per MoE layer], "generator": scores, "uniform": scores}` (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    result: dict[str, Any] = {"expert_spread": moe_spreads(model)}
    for kind in CORRUPTIONS:
        result[kind] = score_corruption(model, corrupted_batches(arrays, kind, pad_token_id, batch_size))
    model.train(was_training)
    return result


def flat_scores(result: dict[str, Any]) -> dict[str, Any]:
    """One level of keys, e.g. `generator_auc`, `uniform_router_entropy` (lists stay lists)."""
    flat = {"expert_spread": result["expert_spread"]} if result["expert_spread"] else {}
    for kind in CORRUPTIONS:
        flat.update({f"{kind}_{name}": value for name, value in result[kind].items()})
    return flat


def check_vocabulary(model_dir: Path, model: Any, meta: dict[str, Any], max_id: int) -> None:
    """The discriminator must read the set's token ids as the set's tokenizer wrote them."""
    from transformers import AutoTokenizer

    has_tokenizer = any((model_dir / name).is_file() for name in TOKENIZER_FILES)
    if (
        has_tokenizer
        and vocabulary_fingerprint(AutoTokenizer.from_pretrained(model_dir)) != meta["vocabulary"]
    ):
        raise InputError(f"{model_dir}'s tokenizer differs from the evaluation set's ({meta['generator']})")
    if model.config.vocab_size <= max_id:
        raise InputError(f"{model_dir} has {model.config.vocab_size} token ids; the set uses id {max_id}")


def discriminator_dir(path: Path) -> Path:
    """A saved discriminator folder, or a pretraining run folder holding one in discriminator/."""
    if (path / "config.json").is_file():
        return path
    if (path / "discriminator" / "config.json").is_file():
        return path / "discriminator"
    raise InputError(f"--discriminators {path} is neither a saved model nor a run folder with discriminator/")


def score_fixed_eval_set(model: Any, path: str, batch_size: int) -> dict[str, Any]:
    """What wikitext_trainer.py --fixed_eval_set logs at each evaluation: `fixed_<corruption>_<score>`."""
    arrays, meta = load_eval_set(Path(path), "--fixed_eval_set")
    scores = score_discriminator(model, arrays, meta["pad_token_id"], batch_size)
    return {f"fixed_{name}": value for name, value in flat_scores(scores).items()}


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--eval_set", type=Path, required=True, help="the set (.npz); built if it does not exist"
    )
    parser.add_argument("--reference_run", type=Path, help="pretraining run folder whose data builds the set")
    parser.add_argument(
        "--generator", type=Path, help="generator that corrupts the set (default: RUN/generator)"
    )
    parser.add_argument("--max_examples", type=int, default=DEFAULT_MAX_EXAMPLES, help="validation examples")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="positions, samples, uniform draws")
    parser.add_argument(
        "--discriminators", type=Path, nargs="*", default=[], help="saved models or run folders"
    )
    parser.add_argument("--output", type=Path, help="scores .json (and a .csv beside it)")
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    if args.discriminators and args.output is None:
        parser.error("--discriminators needs --output FILE.json")
    if args.max_examples < 1 or args.batch_size < 1:
        parser.error("--max_examples and --batch_size must be >= 1")
    return args


def score_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import AutoModelForPreTraining

    arrays, meta = load_eval_set(args.eval_set)
    max_id = int(max(arrays[f"{kind}_input_ids"].max() for kind in CORRUPTIONS))
    records = []
    for path in args.discriminators:
        model_dir = discriminator_dir(path)
        model = AutoModelForPreTraining.from_pretrained(model_dir)
        check_vocabulary(model_dir, model, meta, max_id)
        scores = score_discriminator(model, arrays, meta["pad_token_id"], args.batch_size)
        records.append({"model": str(path), "upcycling": getattr(model.config, "upcycling", None), **scores})
        print(f"scored {path}: generator AUC {scores['generator']['auc']:.4f}", file=sys.stderr)
    return records


def csv_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model and corruption; per-layer lists become `<name>_l<i>` columns (load: its max)."""
    rows = []
    for record in records:
        for kind in CORRUPTIONS:
            row = {"model": record["model"], "corruption": kind}
            for name, value in record[kind].items():
                if name == "expert_load":
                    row.update({f"expert_load_max_l{i}": max(layer) for i, layer in enumerate(value)})
                elif isinstance(value, list):
                    row.update({f"{name}_l{i}": item for i, item in enumerate(value)})
                else:
                    row[name] = value
            row.update({f"expert_spread_l{i}": item for i, item in enumerate(record["expert_spread"])})
            rows.append(row)
    return rows


def write_scores(output: Path, eval_set: Path, records: list[dict[str, Any]]) -> None:
    import pandas as pd

    _, meta = load_eval_set(eval_set)
    write_json_atomically(output, {"eval_set": str(eval_set), "eval_set_meta": meta, "models": records})
    write_text_atomically(output.with_suffix(".csv"), pd.DataFrame(csv_rows(records)).to_csv(index=False))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for path in args.discriminators:
            discriminator_dir(path)  # every folder is checked before the set is built or a model scored
        if not args.eval_set.exists():
            make_eval_set(args)
        records = score_all(args)  # every model is scored before anything is written
        if args.output is not None:
            write_scores(args.output, args.eval_set, records)
            print(f"wrote {args.output} and {args.output.with_suffix('.csv')}", file=sys.stderr)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
