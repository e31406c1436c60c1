"""The parity gate's comparison: specific errors per kind of mismatch."""
from __future__ import annotations

import numpy as np
import pytest

from rmt_deploy.parity import Tolerance, ValueMismatchError, compare


def test_compare_raises_specific_errors():
    ref = {"logits": np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])}
    bad = {"logits": ref["logits"] * 1.01}
    report = compare(ref, bad, Tolerance(topk_identical=0))
    assert not report.passed
    with pytest.raises(ValueMismatchError) as info:
        report.raise_for_failure()
    assert "max_rel" in str(info.value)
    assert compare(ref, {"other": ref["logits"]}, Tolerance()).problems[0][0].__name__ == "OutputNamesMismatchError"
