"""The metrics of experiments/metrics.py, pinned on the worked example of STYLE.md.

R[i][j] = score on experience j after training through experience i (T = 3); the
untrained model scores b = (0.10, 0.08, 0.06). Every expected number below is the
hand computation of STYLE.md ("Two definitions of forgetting, worked out").
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from forgetless.experiments import metrics

R = [
    [0.80, 0.10, 0.05],
    [0.95, 0.85, 0.10],
    [0.70, 0.50, 0.80],
]
BASELINE = [0.10, 0.08, 0.06]


def test_average_accuracy_is_mean_of_last_row():
    assert metrics.average_accuracy(R) == pytest.approx((0.70 + 0.50 + 0.80) / 3)
    assert metrics.average_accuracy(R) == pytest.approx(0.667, abs=5e-4)


def test_average_accuracy_after_each_step_averages_the_experiences_seen_so_far():
    assert metrics.average_accuracy_after(R, 0) == pytest.approx(0.80)
    assert metrics.average_accuracy_after(R, 1) == pytest.approx((0.95 + 0.85) / 2)
    assert metrics.average_accuracy_after(R, 2) == pytest.approx(metrics.average_accuracy(R))


def test_learning_accuracy_is_mean_of_the_diagonal():
    assert metrics.learning_accuracy(R) == pytest.approx((0.80 + 0.85 + 0.80) / 3)
    assert metrics.learning_accuracy(R) == pytest.approx(0.817, abs=5e-4)


def test_forgetting_is_drop_from_best_score_ever_reached():
    # exp 1: 0.95 - 0.70 = 0.25 (its best came after its own experience); exp 2: 0.85 - 0.50
    assert metrics.forgetting(R) == pytest.approx(0.30)


def test_backward_transfer_is_change_since_right_after_training():
    assert metrics.backward_transfer(R) == pytest.approx(-0.225)


def test_avalanche_stream_forgetting_equals_minus_bwt_and_differs_from_forgetting():
    # Avalanche's forgetting: mean of R[j][j] - R[T][j] = (0.10 + 0.35) / 2.
    avalanche_forgetting = np.mean([R[j][j] - R[-1][j] for j in range(len(R) - 1)])
    assert avalanche_forgetting == pytest.approx(0.225)
    assert -metrics.backward_transfer(R) == pytest.approx(avalanche_forgetting)
    assert metrics.forgetting(R) != pytest.approx(avalanche_forgetting)


def test_forward_transfer_compares_score_before_training_with_untrained_model():
    # ((0.10 - 0.08) + (0.10 - 0.06)) / 2
    assert metrics.forward_transfer(R, BASELINE) == pytest.approx(0.03)


def test_summarize_keys_every_final_metric_as_logged():
    assert metrics.summarize(R, BASELINE) == pytest.approx(
        {
            "avg_acc": 2.0 / 3,
            "learning_acc": 2.45 / 3,
            "forgetting": 0.30,
            "bwt": -0.225,
            "fwt": 0.03,
        }
    )


def test_metrics_accept_numpy_arrays_like_lists():
    assert metrics.summarize(np.array(R), np.array(BASELINE)) == metrics.summarize(R, BASELINE)


def test_single_experience_has_no_forgetting_or_transfer():
    one = [[0.9]]
    assert metrics.average_accuracy(one) == pytest.approx(0.9)
    assert metrics.average_accuracy_after(one, 0) == pytest.approx(0.9)
    assert metrics.learning_accuracy(one) == pytest.approx(0.9)
    assert metrics.forgetting(one) == 0.0
    assert metrics.backward_transfer(one) == 0.0
    assert metrics.forward_transfer(one, [0.1]) == 0.0


@pytest.mark.parametrize(
    "fn",
    [
        metrics.average_accuracy,
        metrics.learning_accuracy,
        metrics.forgetting,
        metrics.backward_transfer,
        lambda R: metrics.forward_transfer(R, BASELINE),
        lambda R: metrics.summarize(R, BASELINE),
    ],
)
def test_non_square_matrix_is_refused(fn):
    with pytest.raises(ValueError, match=r"T x T, got shape \(2, 3\)"):
        fn(R[:2])


def test_one_dimensional_scores_are_refused():
    with pytest.raises(ValueError, match="T x T"):
        metrics.average_accuracy([0.1, 0.2, 0.3])


# --- against avalanche-lib's own definitions ---------------------------------------------
#
# avalanche has no function of a matrix; its metrics are fed value by value, the way its
# evaluation loop does: after training experience i, each test experience j is scored,
# the score of j == i is the "initial" value and every other one a "last" value, and the
# "last" values are reset before each evaluation (GenericExperienceForgetting.before_eval).


def _feed_standalone(metric, R) -> dict[int, float]:
    for i, row in enumerate(R):
        metric.reset_last()
        for j, score in enumerate(row):
            metric.update(j, score, initial=(i == j))
    return metric.result()


def test_forgetting_and_bwt_match_avalanche_standalone_metrics():
    from avalanche.evaluation.metrics import BWT, Forgetting

    per_exp_forgetting = _feed_standalone(Forgetting(), R)
    per_exp_bwt = _feed_standalone(BWT(), R)
    # Only experiences trained on before the last one have both values.
    assert sorted(per_exp_forgetting) == [0, 1]
    assert per_exp_forgetting == pytest.approx({0: 0.10, 1: 0.35})
    assert np.mean(list(per_exp_bwt.values())) == pytest.approx(metrics.backward_transfer(R))
    assert np.mean(list(per_exp_forgetting.values())) == pytest.approx(
        -metrics.backward_transfer(R)
    )


def _scores_as_batch(score: float, n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and logits whose accuracy is exactly `score` (a multiple of 1/n)."""
    correct = round(score * n)
    assert correct == pytest.approx(score * n)
    y = torch.zeros(n, dtype=torch.long)
    logits = torch.zeros(n, 2)
    logits[:correct, 0] = 1.0
    logits[correct:, 1] = 1.0
    return y, logits


def test_bwt_matches_avalanche_stream_plugin_metrics_after_every_experience():
    """Drive avalanche's StreamForgetting / StreamBWT through their evaluation callbacks.

    A stub stands in for the avalanche strategy: it carries the experience ids and one
    minibatch per test experience whose accuracy is R[i][j]; avalanche computes the
    accuracies itself (TaskAwareAccuracy) and averages the per-experience differences.
    """
    from avalanche.evaluation.metrics import StreamBWT, StreamForgetting

    plugin_metrics = {"forgetting": StreamForgetting(), "bwt": StreamBWT()}
    test_stream = SimpleNamespace(name="test")
    for i, row in enumerate(R):
        strategy = SimpleNamespace(
            experience=SimpleNamespace(current_experience=i),
            is_eval=False,
            clock=SimpleNamespace(train_iterations=i),
        )
        for m in plugin_metrics.values():
            m.before_training_exp(strategy)
        strategy.is_eval = True
        for m in plugin_metrics.values():
            m.before_eval(strategy)
        for j, score in enumerate(row):
            strategy.experience = SimpleNamespace(
                current_experience=j, origin_stream=test_stream, task_labels=[0]
            )
            strategy.mb_y, strategy.mb_output = _scores_as_batch(score)
            for m in plugin_metrics.values():
                m.before_eval_exp(strategy)
                m.after_eval_iteration(strategy)
                m.after_eval_exp(strategy)
        got = {k: m.after_eval(strategy)[0].value for k, m in plugin_metrics.items()}
        seen = np.asarray(R)[: i + 1, : i + 1]
        assert got["bwt"] == pytest.approx(metrics.backward_transfer(seen))
        assert got["forgetting"] == pytest.approx(-metrics.backward_transfer(seen))
    assert got["forgetting"] == pytest.approx(0.225)
    # Ours differs on purpose: exp 1 improved after its own experience (0.80 -> 0.95).
    assert metrics.forgetting(R) == pytest.approx(0.30)


def test_forward_transfer_refuses_baseline_of_wrong_length():
    with pytest.raises(ValueError, match="baseline"):
        metrics.forward_transfer(R, BASELINE[:2])
