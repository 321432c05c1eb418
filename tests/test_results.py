"""Results anyone can recompute: every table in README.md and docs/results.md that is marked

    <!-- gather results/<study>/glue [gather flags] -->
    ...tables as gather_glue_results.py printed them...
    <!-- end gather -->

is recomputed here from the committed files under results/ with gather_glue_results.py (the code users run)
and must match to the last printed digit; so is every table marked

    <!-- fixed_eval_report results/<study> [flags] -->  ...  <!-- end fixed_eval_report -->

with bench/fixed_eval_report.py (the paired differences on a fixed RTD evaluation set, from the committed
pretraining metrics). A committed study comes with its provenance and is reported somewhere. Tables whose run
files were not kept are in docs/history.md and say so ("not recomputable"). run_study.py's --results_dir
(what `make demo`, `make drop-upcycle-study`, ... pass) is what fills results/<study>/.
"""

import contextlib
import io
import json
import re
import shlex
import shutil
from pathlib import Path

import pandas as pd
import pytest

import gather_glue_results
import run_study
from bench import fixed_eval_report
from conftest import REPO_ROOT
from glue_results_fixture import make_pretraining_run, make_results_tree

RESULTS = REPO_ROOT / "results"
REPORTS = [REPO_ROOT / "README.md", REPO_ROOT / "docs" / "results.md"]
MARKED = re.compile(r"<!-- gather (?P<args>[^>]*?) -->\n(?P<body>.*?)<!-- end gather -->", re.S)
MARKED_FIXED_EVAL = re.compile(
    r"<!-- fixed_eval_report (?P<args>[^>]*?) -->\n(?P<body>.*?)<!-- end fixed_eval_report -->", re.S
)
NOT_RECOMPUTABLE = "not recomputable"


def run_gather(args: list[str], tmp_path: Path) -> str:
    """gather_glue_results.py's printed tables, its CSVs written to tmp_path (the committed ones untouched)."""
    outputs = [f"--output_{kind}={tmp_path / f'{kind}.csv'}" for kind in ("long", "summary", "scores")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = gather_glue_results.main([*args, *outputs])
    assert status == 0, f"gather {args} exited {status}"
    return printed.getvalue()


def squeezed(text: str) -> str:
    """`text` with each run of spaces and tabs made one space (column widths vary with the widest cell)."""
    return re.sub(r"[ \t]+", " ", text.strip())


def tables(text: str) -> list[str]:
    """Split gather's output (or a doc's copy of it) into its titled tables, whitespace-normalised."""
    blocks = re.split(r"\n\s*(?=\*\*)", text.strip())
    return [squeezed(block) for block in blocks if block.strip()]


def marked_tables(marker: re.Pattern = MARKED) -> list[tuple[str, list[str], str]]:
    """(document, arguments, body) of every table in the reports marked with `marker`."""
    found = []
    for report in REPORTS:
        for match in marker.finditer(report.read_text()):
            found.append((report.name, shlex.split(match["args"]), match["body"]))
    return found


def committed_studies() -> list[Path]:
    return sorted(path for path in RESULTS.iterdir() if path.is_dir()) if RESULTS.is_dir() else []


def test_every_marked_table_is_what_gather_prints_from_the_committed_files(tmp_path):
    marked = marked_tables()
    assert any(name == "README.md" for name, _, _ in marked), "README's results need a recomputable table"
    for number, (name, args, body) in enumerate(marked):
        assert args and args[0].startswith("results/"), f"{name}: {args} does not read a committed folder"
        assert (REPO_ROOT / args[0]).is_dir(), f"{name}: {args[0]} is not committed"
        out = tmp_path / str(number)
        out.mkdir()
        printed = tables(run_gather([str(REPO_ROOT / args[0]), *args[1:]], out))
        shown = tables(body)
        assert shown, f"{name}: an empty marked table for {args}"
        for table in shown:
            assert table in printed, f"{name}: this table is not what gather prints from {args}:\n{table}"


def test_every_marked_fixed_eval_table_is_what_the_report_prints_from_the_committed_metrics(tmp_path, capsys):
    """The report reads results/<study>/pretrain/*/metrics.jsonl (copied: it writes beside them) and must print
    the marked table and write the committed curves.csv and paired_differences.csv, digit for digit."""
    marked = marked_tables(MARKED_FIXED_EVAL)
    assert marked, "no fixed-evaluation table in the reports (the Drop-Upcycling study's)"
    for number, (name, args, body) in enumerate(marked):
        committed = REPO_ROOT / args[0]
        assert args[0].startswith("results/") and committed.is_dir(), f"{name}: {args[0]} is not committed"
        copy = tmp_path / str(number)
        shutil.copytree(committed / "pretrain", copy / "pretrain")
        capsys.readouterr()
        assert fixed_eval_report.main(["--study_dir", str(copy), *args[1:]]) == 0
        printed = squeezed(capsys.readouterr().out)
        assert squeezed(body) in printed, f"{name}: not what the report prints from {args}"
        for csv in ("curves.csv", "paired_differences.csv"):
            assert (copy / "fixed_eval" / csv).read_text() == (committed / "fixed_eval" / csv).read_text(), (
                csv
            )


@pytest.mark.parametrize("study", committed_studies(), ids=lambda path: path.name)
def test_a_committed_study_has_provenance_csvs_gather_reproduces_and_a_report(study, tmp_path):
    provenance = json.loads((study / "study.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", provenance["commit"]), provenance["commit"]
    assert provenance["command"].startswith("python run_study.py")
    assert not list(study.rglob("*.safetensors")) and not list(study.rglob("*.bin")), "weights committed"
    glue = study / "glue"
    baseline = provenance["study"]["glue"].get("baseline")
    run_gather([str(glue), *(["--baseline", baseline] if baseline else [])], tmp_path)
    for kind in ("long", "summary", "scores"):
        # Everything but where the files were read from (the study's output folder, then results/).
        committed = pd.read_csv(glue / f"glue_results_{kind}.csv").drop(columns="path", errors="ignore")
        recomputed = pd.read_csv(tmp_path / f"{kind}.csv").drop(columns="path", errors="ignore")
        pd.testing.assert_frame_equal(recomputed, committed, check_exact=False)
    for name in provenance["study"].get("pretrain", {}).get("models", {}):
        records = (study / "pretrain" / name / "metrics.jsonl").read_text().splitlines()
        assert json.loads(records[-1])["step"] > 0
        assert (study / "pretrain" / name / "training_args.json").is_file()
    reported = {args[0] for _, args, _ in [*marked_tables(), *marked_tables(MARKED_FIXED_EVAL)]}
    assert any(Path(path).parts[:2] == ("results", study.name) for path in reported), (
        f"{study} is in no report"
    )


def test_copy_results_keeps_the_small_files_and_gather_reads_them_alike(tmp_path, monkeypatch):
    """run_study.copy_results on a study output tree: per-run JSON, CSVs and the gather log, no weights."""
    output = tmp_path / "study"
    make_results_tree(output / "glue")
    shutil.rmtree(
        output / "glue" / "original_study_4experts"
    )  # the original study's layout; no study writes it
    for name in ("dense", "moe"):
        run = make_pretraining_run(output / "pretrain" / name)
        (run / "training_args.json").write_text("{}")
        (run / "discriminator").mkdir()
        (run / "discriminator" / "model.safetensors").write_bytes(b"weights")
    (output / "glue" / "dense" / "rte" / "seed_1" / "model.safetensors").write_bytes(b"weights")
    (output / "glue" / "dense" / "rte" / "seed_1" / "run_config.json").write_text('{"seed": 1}')
    (output / "logs").mkdir()
    (output / "logs" / "gather.log").write_text("the tables\n")
    config = REPO_ROOT / "study_configs" / "demo.json"
    monkeypatch.setattr("sys.argv", ["run_study.py", "--config", str(config)])

    results = tmp_path / "results" / "demo"
    (results / "stale").mkdir(parents=True)  # replaced whole
    run_study.copy_results(output, results, run_study.study_provenance(config))

    assert not (results / "stale").exists() and not list(results.rglob("*.safetensors"))
    assert (results / "glue" / "dense" / "rte" / "seed_1" / "run_config.json").read_text() == '{"seed": 1}'
    for name in ("dense", "moe"):
        assert (results / "pretrain" / name / "metrics.jsonl").read_bytes() == (
            output / "pretrain" / name / "metrics.jsonl"
        ).read_bytes()
    assert (results / "logs" / "gather.log").read_text() == "the tables\n"
    provenance = json.loads((results / "study.json").read_text())
    assert provenance["study"] == json.loads(config.read_text())
    assert provenance["command"] == f"python run_study.py --config {config}"
    assert run_gather([str(results / "glue")], tmp_path / "a") == run_gather(
        [str(output / "glue")], tmp_path / "b"
    )


def test_unkept_tables_say_so():
    """Tables whose run files were not kept are labelled, with the command that reproduces them."""
    text = (REPO_ROOT / "docs" / "history.md").read_text()
    assert text.lower().count(NOT_RECOMPUTABLE) >= 8
    for line in text.splitlines():
        if NOT_RECOMPUTABLE in line.lower() and "run files" in line:
            assert "`" in line, f"no rerun command: {line}"
