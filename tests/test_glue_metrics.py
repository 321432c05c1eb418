"""GLUE metrics against hand-computed values, including degenerate inputs."""

import math

import numpy as np
import pytest

from glue_tasks import eval_metric_keys, glue_metrics, task_score


def test_accuracy_tasks():
    assert glue_metrics("sst2", [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}
    assert glue_metrics("mnli", [0, 1, 2, 2], [0, 1, 2, 0]) == {"accuracy": 0.75}


def test_cola_matthews_by_hand():
    # TP=1, FP=1, TN=2, FN=0 -> (1*2 - 1*0) / sqrt(2*1*3*2)
    result = glue_metrics("cola", [1, 1, 0, 0], [1, 0, 0, 0])
    assert result == {"matthews_correlation": pytest.approx(2 / math.sqrt(12))}


def test_mrpc_f1_accuracy_and_combined_score():
    # TP=2, FP=1, FN=0 -> precision 2/3, recall 1, F1 0.8; accuracy 3/4
    result = glue_metrics("mrpc", [1, 1, 1, 0], [1, 0, 1, 0])
    assert result == pytest.approx({"f1": 0.8, "accuracy": 0.75, "combined_score": 0.775})
    assert set(glue_metrics("qqp", [1, 0], [1, 0])) == {"f1", "accuracy", "combined_score"}


def test_stsb_pearson_spearman_by_hand():
    # deviations (-1,0,1) and (-4/3,-1/3,5/3): covariance sum 3, squares 2 and 14/3
    result = glue_metrics("stsb", np.array([[1.0], [2.0], [3.0]]), [1.0, 2.0, 4.0])
    assert result["pearson"] == pytest.approx(3 / math.sqrt(2 * 14 / 3))
    assert result["spearmanr"] == pytest.approx(1.0)
    assert result["combined_score"] == pytest.approx((result["pearson"] + 1.0) / 2)


@pytest.mark.filterwarnings("error")
def test_constant_predictions_give_zero_not_nan():
    labels = [1, 0, 1, 0, 1]
    assert glue_metrics("cola", [1] * 5, labels) == {"matthews_correlation": 0.0}
    assert glue_metrics("cola", [0] * 5, labels) == {"matthews_correlation": 0.0}
    assert glue_metrics("mrpc", [0] * 5, labels) == {"f1": 0.0, "accuracy": 0.4, "combined_score": 0.2}
    stsb = glue_metrics("stsb", [2.5] * 5, [0.0, 1.0, 2.0, 3.0, 4.0])
    assert stsb == {"pearson": 0.0, "spearmanr": 0.0, "combined_score": 0.0}
    assert glue_metrics("stsb", [1.0], [3.0])["pearson"] == 0.0


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        glue_metrics("rte", [0, 1, 0], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        glue_metrics("rte", [], [])


def test_metric_keys_and_task_score():
    assert eval_metric_keys("mnli") == ["eval_accuracy", "eval_accuracy_mm"]
    assert eval_metric_keys("stsb") == ["eval_pearson", "eval_spearmanr"]
    assert eval_metric_keys("cola") == ["eval_matthews_correlation"]
    assert task_score(
        "mnli", {"eval_accuracy": 0.8, "eval_accuracy_mm": 0.7, "eval_loss": 5.0}
    ) == pytest.approx(0.75)
    assert task_score("mrpc", {"eval_f1": 0.9, "eval_accuracy": 0.8}) == pytest.approx(0.85)
    with pytest.raises(KeyError, match="eval_spearmanr"):
        task_score("stsb", {"eval_pearson": 0.5})


def test_electra_paper_score_convention():
    """ELECTRA reports one metric per task: MCC, Spearman, else accuracy (MNLI matched)."""
    metrics = {"eval_f1": 0.9, "eval_accuracy": 0.8, "eval_accuracy_mm": 0.7, "eval_pearson": 0.6,
               "eval_spearmanr": 0.5, "eval_matthews_correlation": 0.4}  # fmt: skip
    expected = {"cola": 0.4, "stsb": 0.5, "mrpc": 0.8, "qqp": 0.8, "mnli": 0.8, "rte": 0.8, "sst2": 0.8}
    for task, value in expected.items():
        assert task_score(task, metrics, "electra") == pytest.approx(value), task
    assert task_score("stsb", metrics, "glue") == pytest.approx(0.55)
    with pytest.raises(ValueError, match="convention"):
        task_score("rte", metrics, "paper")
