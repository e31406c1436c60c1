"""The artifact description: written as rmt.* keys, read back the same; files written before it had
every key still load; the eager model describes itself."""
from __future__ import annotations

from rmt_deploy import create_model
from rmt_deploy.artifact import ArtifactDescription, ExportPlan, Range


def test_metadata_round_trip(tiny_model):
    described = ArtifactDescription.from_model(tiny_model, precision="fp16", height=64, width=96, batch=Range(1, 2, 8))
    keys = described.to_metadata()
    assert all(key.startswith("rmt.") for key in keys) and keys["rmt.model"] == tiny_model.config.name
    assert ArtifactDescription.from_metadata({**keys, "other": "kept apart"}) == described
    assert ArtifactDescription.from_metadata({"producer": "someone else"}) is None


def test_files_from_before_the_description_still_load():
    """An engine sidecar of an older rmt-export: sizes as numbers, no outputs, strides or batch keys."""
    old = {"rmt.model": "rmt_t", "rmt.task": "features", "rmt.height": 224, "rmt.width": "dynamic",
           "rmt.num_classes": "0", "precision": "fp16", "tensorrt_version": "10.3.0"}
    described = ArtifactDescription.from_metadata(old)
    assert (described.height, described.width, described.batch) == (224, None, None)
    assert described.output_names == ("stage1", "stage2", "stage3", "stage4")
    assert described.output_strides == (4, 8, 16, 32) and described.output_dtypes == ("float32",) * 4
    assert described.extra["tensorrt_version"] == "10.3.0"


def test_features_model_describes_its_strides(tiny_config):
    model = create_model(tiny_config, features_only=True)
    described = ArtifactDescription.from_model(model)
    assert described.task == "features" and described.num_classes == 0
    assert dict(zip(described.output_names, described.output_strides)) == dict(
        zip(model.output_names, model.stage_strides))
    assert described.to_dict()["batch"] is None and described.checkpoint_sha256 is None


def test_export_plan_names_one_precision_for_prepare():
    plan = ExportPlan(precisions=("fp32", "fp16"))
    one = plan.for_one("fp16", portable=True)
    assert one.precision == "fp16" and one.precisions == ("fp16",) and one.portable and not plan.portable
