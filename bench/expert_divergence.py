"""How far upcycled experts moved apart, and from the dense FFN they were copied from.

    python bench/expert_divergence.py --dense outputs/upcycle/converted/minilm-dense \
        --compare outputs/upcycle/pretrain/minilm-dense-cont/discriminator \
        outputs/upcycle/pretrain/minilm-8x2-cont/discriminator outputs/upcycle/pretrain/minilm-ec-cont/discriminator

Reads the saved weights only (safetensors). Per layer, for the FFN's input projection W (hidden → intermediate):
- moved: ‖W_e − W_dense‖ / ‖W_dense‖, averaged over the experts e (a dense model has one "expert");
- spread: ‖W_e − mean_e W_e‖ / ‖mean_e W_e‖, averaged over e: 0 while the experts are still copies.
Upcycled experts start as copies of W_dense (moved = spread = 0); continued pretraining can only make them
differ through the tokens the router sends them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from input_checks import EXIT_BAD_INPUT  # noqa: E402
from outputs import render_table  # noqa: E402
from score_rtd import expert_spread  # noqa: E402

DENSE_SUFFIX = "intermediate.dense.weight"  # (intermediate, hidden), nn.Linear's layout
EXPERT_SUFFIX = "moe.experts.weight_in"  # (experts, hidden, intermediate)


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}: pass a saved ElectraMoE model folder")
    weights = {}
    for file in files:
        weights.update(load_file(file))
    return weights


def ffn_input_weights(weights: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Layer index → the FFN input projections as (experts, hidden, intermediate); 1 expert when dense."""
    layers = {}
    for key, tensor in weights.items():
        parts = key.split(".")
        if "layer" not in parts:
            continue
        layer = int(parts[parts.index("layer") + 1])
        if key.endswith(EXPERT_SUFFIX):
            layers[layer] = tensor.float()
        elif key.endswith(DENSE_SUFFIX):
            layers[layer] = tensor.float().T.unsqueeze(0)
    return layers


def divergence(dense: dict[int, torch.Tensor], model: dict[int, torch.Tensor]) -> list[dict[str, float]]:
    """Per layer: how far the model's experts moved from the dense FFN, and their spread around their mean."""
    if sorted(dense) != sorted(model):
        raise ValueError(f"layers differ: dense {sorted(dense)}, compared {sorted(model)}")
    rows = []
    for layer in sorted(model):
        experts, reference = model[layer], dense[layer][0]
        if experts.shape[1:] != reference.shape:
            raise ValueError(
                f"layer {layer}: FFN shape {tuple(experts.shape[1:])} vs dense {tuple(reference.shape)}"
            )
        moved = ((experts - reference).flatten(1).norm(dim=1) / reference.norm()).mean().item()
        spread = expert_spread(experts)
        rows.append({"layer": layer, "experts": experts.shape[0], "moved": moved, "spread": spread})
    return rows


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dense", type=Path, required=True, help="the dense model the experts were copied from"
    )
    parser.add_argument("--compare", type=Path, nargs="+", required=True, help="saved models, dense or MoE")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_argument_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        dense = ffn_input_weights(load_weights(args.dense))
        rows = []
        for model_dir in args.compare:
            for row in divergence(dense, ffn_input_weights(load_weights(model_dir))):
                rows.append({"model": str(model_dir), **row})
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(render_table(pd.DataFrame(rows), floatfmt=".2e"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
