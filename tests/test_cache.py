"""The artifact cache's key (rmt_deploy.exporters.cache): a change to the exporter or to either INT8
recipe gives new file names, so a cached file of the old code is never reused."""
from __future__ import annotations

import shutil

import pytest

from rmt_deploy import qdq_layout, quantize
from rmt_deploy.exporters.cache import ArtifactCache


@pytest.mark.parametrize("module", [quantize, qdq_layout], ids=["quantize", "qdq_layout"])
def test_a_changed_int8_recipe_changes_the_cache_key(tmp_path, monkeypatch, module):
    copy = tmp_path / f"{module.__name__}.py"
    shutil.copyfile(module.__file__, copy)
    monkeypatch.setattr(module, "__file__", str(copy))
    before = ArtifactCache(tmp_path / "cache")._tag
    assert ArtifactCache(tmp_path / "cache")._tag == before          # the same sources: the same key
    copy.write_text(copy.read_text() + "\n# a changed recipe\n")
    assert ArtifactCache(tmp_path / "cache")._tag != before
