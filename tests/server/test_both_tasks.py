"""Both tasks from one classification model, against real servers on 127.0.0.1: ``/classify`` (with
``?embedding=true``) and ``/features`` answered from one forward, equal to the eager model's logits,
embedding and stage maps; the same from an ONNX file exported with ``rmt-export --task all``
(parity-checked by the exporter); a classify-only file keeps 409 on /features. Tiny model, 64 px."""
from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
import torch
from test_server import jpeg, live_server, make_settings

from rmt_deploy.preprocess import decode_image, preprocess

SIZE = 64
IMAGE = {"content": jpeg(11), "headers": {"content-type": "image/jpeg"}, "timeout": 30}


@pytest.fixture(scope="module")
def reference(tiny_model) -> dict[str, np.ndarray]:
    """The eager model's logits, embedding and stage maps of IMAGE."""
    x = torch.from_numpy(preprocess(decode_image(IMAGE["content"]), SIZE)[None])
    with torch.inference_mode():
        tokens = tiny_model.forward_features(x)
        stages = tiny_model.forward_intermediates(x)
        outputs = {"logits": tiny_model(x), "embedding": tiny_model.forward_head(tokens, pre_logits=True)}
    return {**{k: v.numpy() for k, v in outputs.items()}, **{f"stage{i + 1}": s.numpy() for i, s in enumerate(stages)}}


def assert_serves_both(url: str, reference: dict[str, np.ndarray]) -> None:
    r = httpx.post(f"{url}/classify", params={"embedding": "true", "top_k": 3}, **IMAGE)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["index"] for p in body["predictions"]] == np.argsort(-reference["logits"][0])[:3].tolist()
    np.testing.assert_allclose(body["embedding"], reference["embedding"][0], atol=1e-4)
    assert httpx.post(f"{url}/classify", **IMAGE).json()["embedding"] is None      # only when asked

    r = httpx.post(f"{url}/features", params={"format": "npz"}, **IMAGE)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npz", r.text
    arrays = np.load(io.BytesIO(r.content))
    assert sorted(arrays.files) == ["embedding", "stage1", "stage2", "stage3", "stage4"]
    for name in arrays.files:
        np.testing.assert_allclose(arrays[name], reference[name], atol=1e-4, err_msg=name)

    summary = httpx.post(f"{url}/features", **IMAGE).json()
    assert [(f["name"], f["stride"], f["shape"]) for f in summary["features"]] == [
        (f"stage{i + 1}", 4 * 2 ** i, list(reference[f"stage{i + 1}"].shape)) for i in range(4)]
    np.testing.assert_allclose(summary["features"][3]["pooled"], reference["stage4"][0].mean(axis=(1, 2)), atol=1e-4)
    np.testing.assert_allclose(summary["embedding"], reference["embedding"][0], atol=1e-4)


def test_one_classification_server_answers_classify_and_features(model_files, reference):
    with live_server(make_settings(model_files, image_size=SIZE)) as (_, url):
        assert_serves_both(url, reference)


def test_exported_task_all_file_serves_both_and_a_classify_file_only_classify(tmp_path, model_files, reference):
    from rmt_deploy.exporters.cli import main as export_main
    files = {}
    for task in ("all", "classify"):
        out = tmp_path / task
        parity = [] if task == "all" else ["--skip-parity"]     # the new graph is checked; the other is today's
        assert export_main([*sum((["--" + k, v] for k, v in model_files.items()), []), "--task", task,
                            "--backends", "onnxruntime", "--dynamic-batch", "1:2:4", "--image-size", str(SIZE),
                            "--output", str(out), *parity]) == 0
        manifest = json.loads((out / "export.json").read_text())
        assert manifest["task"] == task
        assert task == "classify" or manifest["artifacts"][0]["parity"]["cosine"] > 0.9999
        files[task] = next(out.glob("*_fp32.onnx"))
    with live_server(make_settings({}, backend="onnxruntime", onnx=str(files["all"]))) as (_, url):
        assert_serves_both(url, reference)
    with live_server(make_settings({}, backend="onnxruntime", onnx=str(files["classify"]))) as (_, url):
        assert httpx.post(f"{url}/classify", **IMAGE).status_code == 200
        for path, params in (("/features", {}), ("/classify", {"embedding": "true"})):
            r = httpx.post(f"{url}{path}", params=params, **IMAGE)
            assert r.status_code == 409 and "--task all" in r.json()["error"], r.text
