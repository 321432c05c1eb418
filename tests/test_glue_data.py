"""GLUE loaders: every task's original layout (fixtures), user files, and the real files when present."""

import json
from pathlib import Path

import pytest

from glue_tasks import GLUE_TASKS, NO_LABEL, TASKS, load_file_split, load_glue_dir_split

GLUE_FIXTURES = Path(__file__).parent / "fixtures" / "glue"

# Rows in each fixture split (malformed rows excluded); QQP train has one broken row split over two lines.
FIXTURE_ROWS = {
    "cola": {"train": 13, "validation": 8, "test": 6},
    "sst2": {"train": 13, "validation": 8, "test": 6},
    "mrpc": {"train": 12, "validation": 8, "test": 6},
    "stsb": {"train": 12, "validation": 8, "test": 6},
    "qqp": {"train": 12, "validation": 8, "test": 6},
    "mnli": {
        "train": 12,
        "validation_matched": 9,
        "validation_mismatched": 9,
        "test_matched": 6,
        "test_mismatched": 6,
    },
    "qnli": {"train": 12, "validation": 8, "test": 6},
    "rte": {"train": 12, "validation": 8, "test": 6},
    "wnli": {"train": 12, "validation": 8, "test": 6},
    "ax": {"test": 8},
}
# Hub `nyu-mll/glue` ClassLabel names (see ../shared/data/README.md): ids must match whatever the source.
HUB_LABEL_NAMES = {
    "cola": ["unacceptable", "acceptable"],
    "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qqp": ["not_duplicate", "duplicate"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
    "wnli": ["not_entailment", "entailment"],
    "ax": ["entailment", "neutral", "contradiction"],
}


def test_fixtures_cover_every_task_and_split():
    assert set(FIXTURE_ROWS) == set(GLUE_TASKS) | {"ax"}
    for task, rows in FIXTURE_ROWS.items():
        assert set(rows) == set(TASKS[task].splits)


@pytest.mark.parametrize("task", sorted(HUB_LABEL_NAMES))
def test_label_names_match_the_hub(task):
    assert list(TASKS[task].label_names) == HUB_LABEL_NAMES[task]
    assert TASKS["stsb"].is_regression and TASKS["stsb"].num_labels == 1


@pytest.mark.parametrize(("task", "split"), [(t, s) for t, splits in FIXTURE_ROWS.items() for s in splits])
def test_fixture_split_loads_in_hub_schema(task, split):
    data = load_glue_dir_split(GLUE_FIXTURES, task, split)
    spec = TASKS[task]
    assert len(data) == FIXTURE_ROWS[task][split]
    assert set(data.columns) == {*spec.text_columns, "label", "idx"}
    for column in spec.text_columns:
        assert all(isinstance(text, str) and text.strip() for text in data.columns[column])
    labels = data.columns["label"]
    if split.startswith("test"):
        assert labels == [NO_LABEL] * len(labels)
    elif spec.is_regression:
        assert all(0.0 <= score <= 5.0 for score in labels)
        assert len(set(labels)) > 2
    else:
        assert set(labels) == set(range(spec.num_labels)), "fixture splits hold every class"
    assert len(set(data.columns["idx"])) == len(data)


def test_cola_headerless_layout_and_stray_quotes():
    train = load_glue_dir_split(GLUE_FIXTURES, "cola", "train")
    assert train.columns["sentence"][:2] == ["the cat sat on the mat .", "a dog ran fast ."]
    assert train.columns["label"][:2] == [0, 1]
    assert train.columns["sentence"][-1] == 'he said " it was good .'
    assert train.columns["idx"] == list(range(13))
    test = load_glue_dir_split(GLUE_FIXTURES, "cola", "test")
    assert test.columns["idx"] == list(range(6))


def test_mrpc_byte_order_mark_and_quality_label():
    raw = (GLUE_FIXTURES / "MRPC" / "train.tsv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbfQuality"), "fixture keeps the BOM of the original file"
    train = load_glue_dir_split(GLUE_FIXTURES, "mrpc", "train")
    assert train.columns["label"][:3] == [0, 1, 0]
    assert train.columns["sentence1"][0] == "the cat sat on the mat ."


def test_qqp_malformed_rows_are_skipped_and_counted(caplog):
    train = load_glue_dir_split(GLUE_FIXTURES, "qqp", "train")
    assert train.num_malformed == 2
    assert 200 not in train.columns["idx"]
    assert "skipped 2 malformed" in caplog.text
    test = load_glue_dir_split(GLUE_FIXTURES, "qqp", "test")
    assert test.columns["idx"] == list(range(6))


def test_label_names_become_hub_ids():
    mnli = load_glue_dir_split(GLUE_FIXTURES, "mnli", "validation_matched")
    assert mnli.columns["label"][:3] == [1, 2, 0]  # neutral, contradiction, entailment
    assert mnli.columns["premise"][0] == "a dog ran fast ."
    rte = load_glue_dir_split(GLUE_FIXTURES, "rte", "train")
    assert rte.columns["label"][:2] == [0, 1]  # entailment, not_entailment
    wnli = load_glue_dir_split(GLUE_FIXTURES, "wnli", "validation")
    assert wnli.columns["label"][:2] == [1, 0]
    stsb = load_glue_dir_split(GLUE_FIXTURES, "stsb", "validation")
    assert stsb.columns["label"][:3] == [0.0, 0.7, 1.4]


def test_missing_glue_dir_or_column_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--glue_dir"):
        load_glue_dir_split(tmp_path, "rte", "train")
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_text("index\tsentence1\tlabel\n0\ta cat .\tentailment\n")
    with pytest.raises(ValueError, match="'sentence2'"):
        load_glue_dir_split(tmp_path, "rte", "train")


def test_user_files_csv_json_and_original_tsv(tmp_path):
    csv_file = tmp_path / "train.csv"
    csv_file.write_text(
        'sentence1,sentence2,label\n"a cat, sat .",a dog .,entailment\nthe mat .,"a ""big"" dog",1\n'
    )
    data = load_file_split(csv_file, "rte", "train")
    assert data.columns["sentence1"] == ["a cat, sat .", "the mat ."]
    assert data.columns["sentence2"][1] == 'a "big" dog'
    assert data.columns["label"] == [0, 1]

    json_file = tmp_path / "dev.jsonl"
    json_file.write_text(
        "\n".join(
            json.dumps({"sentence1": f"s{i}", "sentence2": "t", "label": i % 2, "idx": 10 + i})
            for i in range(3)
        )
    )
    data = load_file_split(json_file, "mrpc", "validation")
    assert data.columns["label"] == [0, 1, 0] and data.columns["idx"] == [10, 11, 12]

    original = load_file_split(GLUE_FIXTURES / "MRPC" / "dev.tsv", "mrpc", "validation")
    assert original.columns == load_glue_dir_split(GLUE_FIXTURES, "mrpc", "validation").columns

    test_file = tmp_path / "test.json"
    test_file.write_text(json.dumps([{"sentence": "a good movie ."}, {"sentence": "a bad movie ."}]))
    test = load_file_split(test_file, "sst2", "test")
    assert test.columns["label"] == [NO_LABEL, NO_LABEL] and test.columns["idx"] == [0, 1]

    no_label = tmp_path / "train.json"
    no_label.write_text(json.dumps([{"sentence": "a good movie ."}]))
    with pytest.raises(ValueError, match="needs a 'label' column"):
        load_file_split(no_label, "sst2", "train")
    parquet = tmp_path / "train.parquet"
    parquet.write_text("")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_file_split(parquet, "sst2", "train")


def test_bad_label_counts_as_malformed(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n2\ta\tb\t7\n")
    data = load_file_split(path, "rte", "train")
    assert len(data) == 1 and data.num_malformed == 2


# Row counts in ../shared/data/README.md (headers excluded).
REAL_ROWS = {
    "cola": {"train": 8551, "validation": 1043, "test": 1063},
    "sst2": {"train": 67349, "validation": 872},
    "rte": {"train": 2490, "validation": 277, "test": 3000},
    "wnli": {"train": 635, "validation": 71, "test": 146},
}


@pytest.mark.realdata
@pytest.mark.parametrize("task", sorted(REAL_ROWS))
def test_real_glue_files_load_completely(shared_data, task):
    glue_dir = shared_data / "glue_data"
    for split, rows in REAL_ROWS[task].items():
        data = load_glue_dir_split(glue_dir, task, split)
        assert len(data) == rows, f"{task} {split}"
        assert data.num_malformed == 0
        if not split.startswith("test"):
            assert set(data.columns["label"]) == set(range(TASKS[task].num_labels))
