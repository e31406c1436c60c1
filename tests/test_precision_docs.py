"""README and docs/precision.md carry the registry's precision table verbatim (backend x device kind)."""
from __future__ import annotations

from pathlib import Path

import pytest

from rmt_deploy.runners import precision_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("doc", ["README.md", "docs/precision.md"])
def test_the_precision_table_is_the_registry_data(doc):
    table = precision_table()
    assert "| openvino | fp32, fp16, bf16, int8 | - |" in table
    assert table in (ROOT / doc).read_text(), f"{doc}: paste rmt_deploy.runners.precision_table() again"
