import numpy as np
import pytest
import torch
from torch import nn

from core import evaluation as ev

CLASSES = ["cat", "dog", "fox"]
TARGETS = [0, 0, 0, 0, 1, 1, 2]
PREDS = [0, 0, 1, 1, 1, 0, 2]


def test_confusion_rows_are_true_classes():
    cm = ev.confusion_matrix(TARGETS, PREDS, 3)
    assert cm.tolist() == [[2, 2, 0], [1, 1, 0], [0, 0, 1]]
    with pytest.raises(ValueError):
        ev.confusion_matrix([0, 1], [0], 3)


def test_accuracies():
    cm = ev.confusion_matrix(TARGETS, PREDS, 3)
    assert ev.per_class_accuracy(cm) == [0.5, 0.5, 1.0]
    assert ev.accuracy(cm) == pytest.approx(4 / 7)
    assert ev.balanced_accuracy(cm) == pytest.approx(2 / 3)


def test_class_without_samples_is_left_out_of_balanced_accuracy():
    cm = ev.confusion_matrix([0, 0, 1], [0, 1, 1], 3)
    assert ev.per_class_accuracy(cm)[2] is None
    assert ev.balanced_accuracy(cm) == pytest.approx(0.75)
    assert ev.balanced_accuracy(np.zeros((2, 2))) == 0.0


def test_confused_pairs_largest_first():
    cm = ev.confusion_matrix(TARGETS, PREDS, 3)
    pairs = ev.confused_pairs(cm, CLASSES)
    assert pairs == [{"true": "cat", "predicted": "dog", "count": 2, "rate": 0.5},
                     {"true": "dog", "predicted": "cat", "count": 1, "rate": 0.5}]
    assert ev.confused_pairs(cm, CLASSES, top=1)[0]["count"] == 2


def test_class_result_is_json_ready():
    import json

    result = ev.class_result(CLASSES, ev.confusion_matrix(TARGETS, PREDS, 3), train_counts=[10, 5, 1])
    again = json.loads(json.dumps(result))
    assert again["val_counts"] == [4, 2, 1] and again["correct"] == [2, 1, 1]
    assert again["train_counts"] == [10, 5, 1] and again["balanced_acc"] == pytest.approx(2 / 3)


class Fixed(nn.Module):
    """Returns the logits stored for each sample (the input is the sample's index)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x.long().view(-1)]


def test_predict_and_misclassified():
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 1.0], [9.0, 0, 0]])
    targets = torch.tensor([0, 0, 2, 1])
    loader = [(torch.arange(0, 2), targets[:2]), (torch.arange(2, 4), targets[2:])]
    preds = ev.predict(Fixed(logits), loader)
    assert preds.predicted.tolist() == [0, 1, 2, 0]
    assert preds.loss == pytest.approx(nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)
    wrong = ev.misclassified(preds, CLASSES, source=lambda i: f"img{i}.jpg")
    assert [w["source"] for w in wrong] == ["img3.jpg", "img1.jpg"]  # most confident mistake first
    assert wrong[0]["true"] == "dog" and wrong[0]["predicted"] == "cat" and wrong[0]["confidence"] > 0.99


def test_precision_recall_f1_and_top5():
    import torch

    from core.evaluation import class_result, predict

    confusion = np.array([[3, 1, 0], [0, 2, 2], [0, 0, 0]])
    r = class_result(["a", "b", "c"], confusion, top5_acc=0.9)
    assert r["per_class_acc"] == [0.75, 0.5, None]  # recall
    assert r["precision"] == [1.0, 2 / 3, 0.0]
    assert r["f1"] == [pytest.approx(2 * 0.75 / 1.75), pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)), 0.0]
    assert r["top5_acc"] is None  # 3 classes: always in the top 5, so not a figure
    assert class_result(list("abcdef"), np.eye(6, dtype=int), top5_acc=0.9)["top5_acc"] == 0.9
    # d has images but is never predicted, e neither has images nor is predicted: F1 = 2TP / (2TP + FP + FN)
    confusion = np.array([[3, 1, 0, 0, 0], [0, 2, 2, 0, 0], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    r = class_result(list("abcde"), confusion)
    assert r["precision"] == [0.75, 0.5, 0.0, None, None] and r["per_class_acc"] == [0.75, 0.5, None, 0.0, None]
    tp, fp, fn = np.diag(confusion), confusion.sum(0) - np.diag(confusion), confusion.sum(1) - np.diag(confusion)
    tp, fp, fn = tp[:4], fp[:4], fn[:4]  # e: 0 / 0
    assert r["f1"][:4] == pytest.approx((2 * tp / (2 * tp + fp + fn)).tolist()) and r["f1"][4] is None

    logits = torch.tensor([[9.0] + [0.0] * 6, [0, 9, 8, 7, 6, 5, 4.0], [9, 8, 7, 6, 5, 4, 3.0]])
    model = torch.nn.Identity()
    preds = predict(model, [(logits, torch.tensor([0, 6, 4]))])  # 0: top-1; 6: ranked 7th; 4: ranked 5th
    assert preds.in_top5.tolist() == [True, False, True] and preds.top5_accuracy == pytest.approx(2 / 3)


def test_flips_average_the_prediction_but_ood_scores_come_from_the_plain_view():
    import torch

    from core.evaluation import predict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    images, labels = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    plain, mirrored = model(images).detach(), model(images.flip(3)).detach()
    preds = predict(model, [(images, labels)], flip=True)
    averaged = (plain + mirrored) / 2
    assert preds.predicted.tolist() == averaged.argmax(1).tolist()
    assert np.allclose(preds.confidence, averaged.softmax(1).amax(1).numpy())
    assert np.allclose(preds.logsumexp, plain.logsumexp(1).numpy())  # what Explain computes for one image
    assert np.allclose(preds.view_confidence, plain.softmax(1).amax(1).numpy())
    assert not np.allclose(preds.logsumexp, averaged.logsumexp(1).numpy())
