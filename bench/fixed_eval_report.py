"""Learning curves and paired differences on the fixed RTD evaluation set, from a study's pretraining runs.

    python bench/fixed_eval_report.py --study_dir outputs/drop_upcycle --baseline dense

Reads `<study_dir>/pretrain/<arm>-cont-s<seed>/metrics.jsonl` (the `fixed_*` metrics that
`wikitext_trainer.py --fixed_eval_set` logs at every evaluation) and writes to `<study_dir>/fixed_eval/`:
- curves.csv: arm, seed, step and each scalar fixed metric (mean router entropy and expert spread over the
  MoE layers, and the load imbalance: the busiest expert's share of the slots times the number of experts,
  1 when balanced, E when one expert takes everything, averaged over the MoE layers);
- paired_differences.csv: at every evaluated step, each arm minus the baseline arm over the seeds both ran
  (same seed: same data order and masks), the mean difference with its 95% confidence interval (Student t
  over seeds), the paired t-test p-value and the number of pairs (gather_glue_results.paired_difference);
- learning_curves.png: the mean over seeds of each metric against the step, one line per arm, with the
  per-seed curves faint.
Printed: each arm's mean over seeds at the last step with its 95% CI, then the last step's differences
(--metrics: only those metrics' rows).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from gather_glue_results import interval, paired_difference  # noqa: E402
from input_checks import EXIT_BAD_INPUT  # noqa: E402
from outputs import render_table, write_atomically, write_text_atomically  # noqa: E402

RUN_NAME = re.compile(r"^(?P<arm>.+)-cont-s(?P<seed>\d+)$")
METRICS = ("generator_auc", "generator_rtd_loss", "uniform_auc", "uniform_rtd_loss", "generator_f1")
LAYER_MEANS = ("generator_router_entropy", "expert_spread")  # per MoE layer in the logs: averaged here
LOAD = "generator_expert_load"  # per MoE layer and expert in the logs: the load imbalance here
REPORTED = (*METRICS, *LAYER_MEANS, "load_imbalance")  # every metric of curves.csv, in report order


def read_curves(study_dir: Path) -> pd.DataFrame:
    """One row per run and evaluation with a fixed-set score: arm, seed, step and the scalar metrics."""
    rows = []
    for metrics in sorted((study_dir / "pretrain").glob("*/metrics.jsonl")):
        match = RUN_NAME.match(metrics.parent.name)
        if match is None:
            continue
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if record.get("split") != "validation" or "fixed_generator_auc" not in record:
                continue
            row = {"arm": match["arm"], "seed": int(match["seed"]), "step": record["step"]}
            row |= {name: record[f"fixed_{name}"] for name in METRICS}
            row |= {
                name: float(np.mean(record[f"fixed_{name}"]))
                for name in LAYER_MEANS
                if f"fixed_{name}" in record
            }
            if f"fixed_{LOAD}" in record:
                load = np.asarray(record[f"fixed_{LOAD}"], dtype=float)  # (MoE layers, experts)
                row["load_imbalance"] = float(np.mean(load.max(axis=1) * load.shape[1]))
            rows.append(row)
    if not rows:
        raise FileNotFoundError(
            f"no fixed_* metrics in {study_dir}/pretrain/<arm>-cont-s<seed>/metrics.jsonl"
        )
    # A resumed run may log a step twice: keep the last.
    return pd.DataFrame(rows).drop_duplicates(["arm", "seed", "step"], keep="last")


def paired_differences(curves: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Each arm minus `baseline`, per step and metric, over the seeds both ran."""
    if baseline not in set(curves["arm"]):
        raise ValueError(f"--baseline {baseline} is not one of the arms {sorted(set(curves['arm']))}")
    rows = []
    metrics = [m for m in REPORTED if m in curves]
    for (arm, step), runs in curves.groupby(["arm", "step"]):
        if arm == baseline:
            continue
        reference = curves[(curves["arm"] == baseline) & (curves["step"] == step)].set_index("seed")
        for metric in metrics:
            if reference[metric].notna().any():
                difference = paired_difference(runs.set_index("seed")[metric], reference[metric])
                rows.append({"arm": arm, "baseline": baseline, "step": step, "metric": metric, **difference})
    return pd.DataFrame(rows)


def last_step_means(curves: pd.DataFrame) -> pd.DataFrame:
    """Each arm's metrics at the last evaluated step: mean over seeds, 95% CI and the number of seeds."""
    last = curves[curves["step"] == curves["step"].max()]
    rows = []
    for arm, runs in last.groupby("arm"):
        for metric in [m for m in REPORTED if m in runs]:
            values = runs[metric].dropna()
            if len(values):
                summary = interval(values)
                rows.append({"arm": arm, "step": runs["step"].iloc[0], "metric": metric, "mean": summary["mean"],
                             "ci95_low": summary["ci95_low"], "ci95_high": summary["ci95_high"], "n": summary["n"]})  # fmt: skip
    return pd.DataFrame(rows)


def plot_curves(curves: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in REPORTED if m in curves and curves[m].notna().any()]
    columns = min(4, len(metrics))
    rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for index, (arm, runs) in enumerate(curves.groupby("arm")):
            color = f"C{index}"
            for _, seed_runs in runs.groupby("seed"):
                ax.plot(seed_runs["step"], seed_runs[metric], color=color, alpha=0.25, linewidth=0.8)
            mean = runs.groupby("step")[metric].mean()
            ax.plot(mean.index, mean.to_numpy(), color=color, label=arm, linewidth=2)
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("step")
    axes.flat[0].legend()
    fig.suptitle("fixed evaluation set: mean over seeds (faint: each seed)")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study_dir", type=Path, required=True, help="a run_study.py output folder")
    parser.add_argument("--baseline", default="dense", help="the arm every other arm is compared with")
    parser.add_argument("--metrics", nargs="+", help="print only these metrics' rows (default: all)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_argument_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        curves = read_curves(args.study_dir)
        differences = paired_differences(curves, args.baseline)
        means = last_step_means(curves)
        unknown = sorted(set(args.metrics or ()) - set(means["metric"]))
        if unknown:
            raise ValueError(f"--metrics {unknown}: not among {sorted(set(means['metric']))}")
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = args.study_dir / "fixed_eval"
    write_text_atomically(out / "curves.csv", curves.to_csv(index=False))
    write_text_atomically(out / "paired_differences.csv", differences.to_csv(index=False))
    plot_curves(curves, out / "learning_curves.png")
    last = differences[differences["step"] == differences["step"].max()]
    if args.metrics:
        means, last = (table[table["metric"].isin(args.metrics)] for table in (means, last))
    print(render_table(means, floatfmt=".4f"))
    print()
    print(render_table(last.drop(columns=["baseline"]), floatfmt=".4f"))
    print(f"wrote {out}/curves.csv, paired_differences.csv and learning_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
