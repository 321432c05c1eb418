"""`make demo`: a short offline smoke run of the ELECTRA-MoE model.

Builds a tiny 4-expert top-2 discriminator and fits replaced/original labels on a fixed random batch for a
few steps, printing the loss, the router losses and the expert load, so a fresh install proves the model
trains end to end on this machine.
"""

import argparse
import sys

import torch
from tqdm.auto import tqdm

from modeling_electra import ElectraMoEConfig, ElectraMoEForPreTraining

DEMO_VOCAB_SIZE = 1000
DEMO_BATCH_SIZE = 8
DEMO_SEQ_LEN = 64
REPLACED_FRACTION = 0.15


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--num_experts", type=int, default=4)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    input_ids = torch.randint(5, DEMO_VOCAB_SIZE, (DEMO_BATCH_SIZE, DEMO_SEQ_LEN))
    labels = (torch.rand(input_ids.shape) < REPLACED_FRACTION).long()
    attention_mask = torch.ones_like(input_ids)

    config = ElectraMoEConfig.from_preset(
        "tiny", vocab_size=DEMO_VOCAB_SIZE, num_experts=args.num_experts, top_k=args.top_k
    )
    model = ElectraMoEForPreTraining(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    print(
        f"tiny ELECTRA-MoE: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{config.num_experts} experts, top-{config.top_k}, MoE layers {config.moe_layer_indices}"
    )

    first = last = None
    for _ in (bar := tqdm(range(args.steps), desc="smoke steps")):
        out = model(input_ids, attention_mask=attention_mask, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        last = out.loss.item()
        first = first if first is not None else last
        bar.set_postfix(loss=f"{last:.4f}", aux=f"{out.aux_loss.item():.3f}")
    load = out.expert_load.mean(0).tolist() if out.expert_load is not None else []
    print(f"loss {first:.4f} -> {last:.4f}; expert load (mean over layers) {[round(x, 3) for x in load]}")
    if not last < first:
        print("error: the loss did not fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
