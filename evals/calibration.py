"""Calibration of a model's confidence, as HELM reports it: the expected calibration error over
equal-mass bins of the top-choice probability. Plain Python.

Entry point: `expected_calibration_error`.
"""


def expected_calibration_error(confidences: list[float], correct: list, bins: int = 10) -> float:
    """Items sorted by confidence are cut into `bins` groups of equal size (equal mass; sizes
    differ by at most one when n is not a multiple), and
    ECE = sum over groups of (group size / n) * |accuracy in the group - mean confidence in it|.
    0 means the model is right exactly as often as it says; with fewer items than bins, some
    groups are empty and skipped."""
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences for {len(correct)} outcomes")
    if not confidences:
        raise ValueError("no items to measure calibration on")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    n = len(confidences)
    order = sorted(range(n), key=lambda i: confidences[i])  # stable: ties keep item order
    total = 0.0
    for b in range(bins):
        group = order[b * n // bins:(b + 1) * n // bins]
        if group:
            accuracy = sum(float(correct[i]) for i in group) / len(group)
            confidence = sum(confidences[i] for i in group) / len(group)
            total += len(group) / n * abs(accuracy - confidence)
    return total
