"""What each expert sees: per MoE layer and expert, its share of the tokens and which kinds of tokens they are.

    python bench/expert_tokens.py --eval_set outputs/eval/rtd_eval.npz \
        --models outputs/upcycle/pretrain/minilm-8x2-cont/discriminator --output outputs/eval/expert_tokens.csv

The text is the original (uncorrupted) validation examples of a score_rtd.py evaluation set, so every
model is read on the same tokens. Each real token goes to the router's top-k experts by probability (for
expert choice: the k experts it prefers, not those that took it). Per layer and expert:
- token_share: its share of the routed (token, expert) slots (the expert load; 1/E when balanced);
- share_<kind>: the share of its slots whose token is of that kind, corpus_<kind> the share among all real
  tokens, lift_<kind> their ratio (1 = no preference). Kinds: frequent (the most frequent token ids that
  together make up half of the text's non-special tokens), rare (the least frequent ids, the last 10% of
  them), punctuation, number (all digits), [CLS], [SEP];
- top_tokens: its most frequent tokens; distinctive_tokens: the tokens (seen at least MIN_COUNT times) with
  the largest share of their slots sent to this expert.
With --figure_dir, and in the notebook (parameter EXPERT_TOKENS_CSV), plot_expert_tokens draws per model a
layer x expert heatmap of the token shares beside one of the lifts (log2).
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from input_checks import EXIT_BAD_INPUT, InputError  # noqa: E402
from outputs import render_table, write_atomically, write_text_atomically  # noqa: E402
from score_rtd import check_vocabulary, discriminator_dir, load_eval_set  # noqa: E402

KINDS = ("frequent", "rare", "punctuation", "number", "cls", "sep")
FREQUENT_SHARE = 0.5  # frequent ids: together half of the non-special tokens
RARE_SHARE = 0.1  # rare ids: together the last 10%
MIN_COUNT = 5
TOP_TOKENS = 5
BATCH_SIZE = 32


def token_kinds(tokenizer, token_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per kind, a boolean over the vocabulary; frequent and rare from the counts of `token_ids` (the text)."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    stripped = [token.removeprefix("##") for token in vocab]
    special = np.zeros(len(vocab), dtype=bool)
    special[tokenizer.all_special_ids] = True
    kinds = {
        "punctuation": np.array([bool(t) and all(c in string.punctuation for c in t) for t in stripped]),
        "number": np.array([t.isdigit() for t in stripped]) & ~special,
        "cls": np.arange(len(vocab)) == tokenizer.cls_token_id,
        "sep": np.arange(len(vocab)) == tokenizer.sep_token_id,
    }
    counts = np.bincount(token_ids, minlength=len(vocab)).astype(float)
    counts[special] = 0
    order = np.argsort(-counts, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(counts[order])[:-1]]) / max(counts.sum(), 1.0)
    seen = counts[order] > 0
    kinds["frequent"] = np.zeros(len(vocab), dtype=bool)
    kinds["frequent"][order[seen & (before < FREQUENT_SHARE)]] = True
    kinds["rare"] = np.zeros(len(vocab), dtype=bool)
    kinds["rare"][order[seen & (before >= 1.0 - RARE_SHARE)]] = True
    return kinds


@torch.no_grad()
def routed_experts(model, arrays: dict[str, np.ndarray], pad_token_id: int) -> tuple[np.ndarray, dict]:
    """The real tokens' ids [N] and, per MoE layer (encoder index), each one's top-k experts [N, k]."""
    model.eval()
    captured: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if name.endswith("moe.router"):
            layer = int(name.split(".")[-3])
            top_k = module.top_k

            def hook(_module, _inputs, output, layer=layer, top_k=top_k):
                captured.setdefault(layer, []).append(output[1].topk(top_k, dim=-1).indices)

            hooks.append(module.register_forward_hook(hook))
    tokens, real_masks = [], []
    try:
        for start in range(0, len(arrays["input_ids"]), BATCH_SIZE):
            ids = torch.as_tensor(arrays["input_ids"][start : start + BATCH_SIZE], dtype=torch.long)
            real = ids != pad_token_id
            types = arrays.get("token_type_ids")
            extra = (
                {}
                if types is None
                else {"token_type_ids": torch.as_tensor(types[start : start + BATCH_SIZE])}
            )
            model(ids, attention_mask=real.long(), **{k: v.long() for k, v in extra.items()})
            tokens.append(ids[real])
            real_masks.append(real.reshape(-1))
    finally:
        for handle in hooks:
            handle.remove()
    real = torch.cat(real_masks)
    experts = {layer: torch.cat(chunks)[real].numpy() for layer, chunks in captured.items()}
    return torch.cat(tokens).numpy(), experts


def expert_statistics(
    tokens: np.ndarray, experts: np.ndarray, num_experts: int, kinds: dict[str, np.ndarray], vocab: list[str]
) -> list[dict]:
    """One row per expert of one layer: token share, kind shares and lifts, top and distinctive tokens."""
    slot_tokens = np.repeat(tokens, experts.shape[1])
    slot_experts = experts.reshape(-1)
    corpus = {kind: float(mask[tokens].mean()) for kind, mask in kinds.items()}
    all_counts = np.bincount(slot_tokens, minlength=len(vocab))
    rows = []
    for expert in range(num_experts):
        mine = slot_tokens[slot_experts == expert]
        row = {"expert": expert, "token_share": len(mine) / max(len(slot_tokens), 1)}
        for kind in KINDS:
            share = float(kinds[kind][mine].mean()) if len(mine) else 0.0
            row |= {f"share_{kind}": share, f"corpus_{kind}": corpus[kind]}
            row[f"lift_{kind}"] = share / corpus[kind] if corpus[kind] else float("nan")
        counts = np.bincount(mine, minlength=len(vocab))
        top = np.argsort(-counts, kind="stable")[:TOP_TOKENS]
        fraction = np.where(all_counts >= MIN_COUNT, counts / np.maximum(all_counts, 1), -1.0)
        distinctive = np.argsort(-fraction, kind="stable")[:TOP_TOKENS]
        row["top_tokens"] = " ".join(vocab[i] for i in top if counts[i] > 0)
        row["distinctive_tokens"] = " ".join(vocab[i] for i in distinctive if fraction[i] > 0)
        rows.append(row)
    return rows


def model_statistics(model_path: Path, arrays: dict[str, np.ndarray], meta: dict) -> list[dict]:
    from transformers import AutoModelForPreTraining, AutoTokenizer

    import modeling_electra  # noqa: F401  (registers electra_moe)

    model_dir = discriminator_dir(model_path)
    model = AutoModelForPreTraining.from_pretrained(model_dir)
    check_vocabulary(model_dir, model, meta, int(arrays["input_ids"].max()))
    if getattr(model.config, "num_experts", 1) < 2:
        raise InputError(f"--models {model_path} is dense: it has no experts to describe")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens, experts = routed_experts(model, arrays, meta["pad_token_id"])
    kinds = token_kinds(tokenizer, tokens)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    rows = []
    for layer, chosen in sorted(experts.items()):
        for row in expert_statistics(tokens, chosen, model.config.num_experts, kinds, vocab):
            rows.append({"model": str(model_path), "layer": layer, **row})
    return rows


def plot_expert_tokens(table: pd.DataFrame, kind: str, save) -> None:
    """Per model of `table` (this script's CSV), a figure of two layer x expert heatmaps: each expert's share
    of the routed slots (1/E when balanced) and log2 of the lift of `kind` tokens (0: no preference; +1: twice
    the text's share; blank: the kind does not occur in the text), handed to `save(fig, name)`."""
    import matplotlib.pyplot as plt

    for name, rows in table.groupby("model", sort=False):
        share = rows.pivot(index="layer", columns="expert", values="token_share")
        lift = rows.pivot(index="layer", columns="expert", values=f"lift_{kind}")
        fig, axes = plt.subplots(
            1, 2, figsize=(2 + 1.2 * share.shape[1], 1 + 0.9 * share.shape[0]), squeeze=False
        )
        panels = (
            (share, "token share", "viridis", None),
            (np.log2(lift.clip(1 / 8, 8)), f"log2 lift: {kind}", "coolwarm", 3),
        )
        for ax, (values, title, cmap, limit) in zip(axes[0], panels, strict=True):
            image = ax.imshow(values.to_numpy(dtype=float), cmap=cmap, aspect="auto",
                              vmin=-limit if limit else 0, vmax=limit)  # fmt: skip
            ax.set_xticks(range(values.shape[1]), values.columns)
            ax.set_yticks(range(values.shape[0]), values.index)
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
            ax.set_title(title)
            fig.colorbar(image, ax=ax)
        fig.suptitle(f"{name}: what each expert sees")
        save(fig, f"expert_tokens_{Path(str(name)).parent.name}_{Path(str(name)).name}")


def save_figures(figure_dir: Path):
    """A `save(fig, name)` for plot_expert_tokens that writes `figure_dir/<name>.png` atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name: str) -> None:
        write_atomically(
            figure_dir / f"{name}.png",
            lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"),
        )
        plt.close(fig)

    return save


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--eval_set", type=Path, required=True, help="a score_rtd.py evaluation set (.npz)")
    parser.add_argument(
        "--models", type=Path, nargs="+", required=True, help="saved MoE models or run folders"
    )
    parser.add_argument("--output", type=Path, required=True, help="the table as CSV")
    parser.add_argument("--figure_dir", type=Path, help="also draw each model's heatmaps there (PNG)")
    parser.add_argument("--figure_kind", default="punctuation", choices=KINDS, help="the lift drawn")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_argument_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.eval_set.is_file():
            raise InputError(f"--eval_set {args.eval_set} does not exist; build it with score_rtd.py")
        arrays, meta = load_eval_set(args.eval_set)
        rows = [row for path in args.models for row in model_statistics(path, arrays, meta)]
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    table = pd.DataFrame(rows)
    write_text_atomically(args.output, table.to_csv(index=False))
    shown = ["model", "layer", "expert", "token_share", *[f"lift_{kind}" for kind in KINDS], "top_tokens"]
    print(render_table(table[shown], floatfmt=".2f"))
    if args.figure_dir:
        plot_expert_tokens(table, args.figure_kind, save_figures(args.figure_dir))
        print(f"wrote the heatmaps to {args.figure_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
