"""The classification benchmarks' official metrics, as plain functions on lists: accuracy, binary
F1, macro-F1 (CB), Matthews correlation (CoLA), Pearson and Spearman correlation (STS-B).
Each returns a fraction (or a correlation in [-1, 1]); 0.0 where it is undefined.
"""
import math


def accuracy(pred: list, gold: list) -> float:
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def f1_score(pred: list, gold: list, positive=1) -> float:
    """F1 of the positive class: 2TP / (2TP + FP + FN)."""
    tp = sum(p == positive and g == positive for p, g in zip(pred, gold))
    fp = sum(p == positive and g != positive for p, g in zip(pred, gold))
    fn = sum(p != positive and g == positive for p, g in zip(pred, gold))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def macro_f1(pred: list, gold: list, classes: list) -> float:
    """Mean over `classes` of each class's F1 against the rest (a class never seen scores 0)."""
    return sum(f1_score(pred, gold, c) for c in classes) / len(classes)


def matthews_corrcoef(pred: list, gold: list, positive=1) -> float:
    """(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); 0 when a margin is empty."""
    tp = sum(p == positive and g == positive for p, g in zip(pred, gold))
    tn = sum(p != positive and g != positive for p, g in zip(pred, gold))
    fp = sum(p == positive and g != positive for p, g in zip(pred, gold))
    fn = sum(p != positive and g == positive for p, g in zip(pred, gold))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def pearson(x: list[float], y: list[float]) -> float:
    """Covariance over the product of standard deviations; 0 when either is constant."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx, sy = math.sqrt(sum((a - mx) ** 2 for a in x)), math.sqrt(sum((b - my) ** 2 for b in y))
    return cov / (sx * sy) if sx and sy else 0.0


def average_ranks(x: list[float]) -> list[float]:
    """Ranks from 1; tied values share the mean of their ranks: [5, 1, 5] -> [2.5, 1, 2.5]."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and x[order[end + 1]] == x[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Pearson correlation of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))
