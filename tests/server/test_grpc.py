"""KServe v2 over gRPC against a real server on 127.0.0.1, driven by Triton's own clients
(``tritonclient.grpc``, and its generated stub for typed contents): the same answers as
``tritonclient.http`` and ``/classify``, and the protocol's status codes for bad input, a missing
token, a full queue and a deadline; running calls finish on shutdown. Tiny model at 64 px."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from test_server import free_port, jpeg, live_server, make_settings, scrape, softmax

from rmt_deploy.preprocess import decode_image, preprocess

grpc = pytest.importorskip("grpc")
triton_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402

SIZE = 64
MODEL = "tiny"
TOKEN = "s3cret"
HEADERS = {"authorization": f"Bearer {TOKEN}"}   # passed as copies: tritonclient.http adds its own to the dict


def grpc_settings(model_files: dict, **overrides):
    return make_settings(model_files, **{"image_size": SIZE, "grpc_port": free_port(), **overrides})


@pytest.fixture(scope="module")
def served(model_files):
    """(http url, grpc address) of a server with a token."""
    settings = grpc_settings(model_files, api_key=TOKEN)
    with live_server(settings) as (_, url):
        yield url, f"127.0.0.1:{settings.grpc_port}"


def images(count: int = 3) -> np.ndarray:
    return np.stack([preprocess(decode_image(jpeg(seed)), SIZE) for seed in range(count)])


def grpc_input(x: np.ndarray, datatype: str = "FP32"):
    tensor = triton_grpc.InferInput("images", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def status_of(call) -> str:
    with pytest.raises(triton_grpc.InferenceServerException) as caught:
        call()
    return caught.value.status()


def test_grpc_answers_equal_http_and_classify(served):
    import tritonclient.http as triton_http
    url, address = served
    client = triton_grpc.InferenceServerClient(address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert "binary_tensor_data" in client.get_server_metadata().extensions
    metadata = client.get_model_metadata(MODEL)
    assert (metadata.inputs[0].name, metadata.inputs[0].datatype, list(metadata.inputs[0].shape)) == (
        "images", "FP32", [-1, 3, SIZE, SIZE])
    assert [o.name for o in metadata.outputs] == ["logits", "embedding", "stage1", "stage2", "stage3", "stage4"]
    assert [list(o.shape) for o in metadata.outputs[1:3]] == [[-1, 256], [-1, 32, -1, -1]] and metadata.versions == ["1"]

    x = images()
    raw = client.infer(MODEL, [grpc_input(x)], headers=dict(HEADERS)).as_numpy("logits")
    request = service_pb2.ModelInferRequest(model_name=MODEL, inputs=[service_pb2.ModelInferRequest.InferInputTensor(
        name="images", datatype="FP32", shape=x.shape, contents=service_pb2.InferTensorContents(
            fp32_contents=x.ravel().tolist()))])
    with grpc.insecure_channel(address) as channel:
        typed_response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=tuple(HEADERS.items()))
    typed = np.frombuffer(typed_response.raw_output_contents[0], "<f4").reshape(typed_response.outputs[0].shape)

    http_input = triton_http.InferInput("images", list(x.shape), "FP32")
    http_input.set_data_from_numpy(x, binary_data=True)
    over_http = triton_http.InferenceServerClient(url.removeprefix("http://")).infer(
        MODEL, [http_input], headers=dict(HEADERS)).as_numpy("logits")
    assert raw.shape == (3, 10)
    np.testing.assert_array_equal(raw, typed)
    np.testing.assert_allclose(raw, over_http, atol=1e-5)

    for seed in range(3):
        r = httpx.post(f"{url}/classify", params={"top_k": 3}, content=jpeg(seed), timeout=30,
                       headers={"content-type": "image/jpeg", **HEADERS})
        assert r.status_code == 200, r.text
        probs = softmax(raw[seed])
        predictions = r.json()["predictions"]
        assert [p["index"] for p in predictions] == np.argsort(-probs)[:3].tolist()
        np.testing.assert_allclose([p["score"] for p in predictions], np.sort(probs)[::-1][:3], atol=1e-4)


def test_grpc_errors_carry_the_protocol_status_codes(served):
    url, address = served
    client = triton_grpc.InferenceServerClient(address)
    x = images(1)
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    cases = {
        "wrong shape": (lambda: client.infer(MODEL, [grpc_input(np.zeros((1, 3, 16, 16), np.float32))],
                                             headers=dict(HEADERS)), "StatusCode.INVALID_ARGUMENT", "shape"),
        "wrong dtype": (lambda: client.infer(MODEL, [grpc_input(x.astype(np.float16), "FP16")], headers=dict(HEADERS)),
                        "StatusCode.INVALID_ARGUMENT", "datatype"),
        "not finite": (lambda: client.infer(MODEL, [grpc_input(nan)], headers=dict(HEADERS)),
                       "StatusCode.INVALID_ARGUMENT", "finite"),
        "unknown output": (lambda: client.infer(MODEL, [grpc_input(x)], headers=dict(HEADERS),
                                                outputs=[triton_grpc.InferRequestedOutput("stage9")]),
                           "StatusCode.INVALID_ARGUMENT", "unknown outputs"),
        "missing token": (lambda: client.infer(MODEL, [grpc_input(x)]), "StatusCode.UNAUTHENTICATED", "token"),
        "wrong token": (lambda: client.infer(MODEL, [grpc_input(x)], headers={"authorization": "Bearer nope"}),
                        "StatusCode.UNAUTHENTICATED", "token"),
        "unknown model": (lambda: client.infer("other", [grpc_input(x)], headers=dict(HEADERS)),
                          "StatusCode.NOT_FOUND", "unknown model"),
        "unknown version": (lambda: client.get_model_metadata(MODEL, model_version="2"),
                            "StatusCode.NOT_FOUND", "version"),
    }
    before = scrape(url, 'rmt_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"}')
    for case, (call, status, words) in cases.items():
        with pytest.raises(triton_grpc.InferenceServerException) as caught:
            call()
        assert caught.value.status() == status and words in caught.value.message(), (case, caught.value)
    after = scrape(url, 'rmt_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"}')
    assert after == before + 4
    assert client.infer(MODEL, [grpc_input(x)], headers=dict(HEADERS)).as_numpy("logits").shape == (1, 10)
    assert scrape(url, 'rmt_grpc_requests_total{code="OK",method="ModelInfer"}') >= 1


def _stream(address: str, requests: list[tuple[np.ndarray, list[str] | None]], headers=None) -> list:
    """Send ``requests`` (input, outputs asked) on one ModelStreamInfer stream; the (request id, result,
    error) answers in the order they came back."""
    answers, done = [], threading.Event()

    def callback(result, error):
        answers.append((None if result is None else result.get_response().id, result, error))
        if len(answers) == len(requests):
            done.set()

    client = triton_grpc.InferenceServerClient(address)
    client.start_stream(callback, headers=headers)
    try:
        for i, (x, outputs) in enumerate(requests):
            client.async_stream_infer(MODEL, [grpc_input(x)], request_id=str(i), outputs=outputs and [
                triton_grpc.InferRequestedOutput(name) for name in outputs])
        assert done.wait(60), f"{len(answers)} of {len(requests)} answered"
    finally:
        client.stop_stream()
        client.close()
    return answers


def test_stream_answers_each_request_in_order_errors_included(served):
    url, address = served
    x = images(3)
    logits = triton_grpc.InferenceServerClient(address).infer(MODEL, [grpc_input(x)], headers=dict(HEADERS)
                                                             ).as_numpy("logits")
    # (input, outputs asked, the unary logits it must equal or the words of its error)
    cases = [(x[:1], None, logits[:1]), (x[1:], ["logits"], logits[1:]),
             (np.zeros((1, 3, 16, 16), np.float32), None, "shape"), (x[2:], ["stage9"], "unknown outputs"),
             (x[:2], ["logits"], logits[:2])] * 2
    before = {code: scrape(url, f'rmt_grpc_requests_total{{code="{code}",method="ModelStreamInfer"}}')
              for code in ("OK", "INVALID_ARGUMENT")}
    answers = _stream(address, [(sent, outputs) for sent, outputs, _ in cases], headers=dict(HEADERS))
    assert len(answers) == len(cases)
    for i, ((_, outputs, expected), (request_id, result, error)) in enumerate(zip(cases, answers)):
        if isinstance(expected, str):           # answered by an error; the stream goes on
            assert result is None and expected in error.message(), (i, error)
            continue
        assert error is None and request_id == str(i), (i, error)       # in the order sent
        names = [o.name for o in result.get_response().outputs]
        assert names == (outputs or ["logits", "embedding", "stage1", "stage2", "stage3", "stage4"])
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-4, atol=1e-5)
    assert scrape(url, 'rmt_grpc_requests_total{code="OK",method="ModelStreamInfer"}') == before["OK"] + 6
    assert scrape(url, 'rmt_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelStreamInfer"}') == \
        before["INVALID_ARGUMENT"] + 4
    unauthenticated = _stream(address, [(x[:1], None)] * 2)
    assert [error is not None and "token" in error.message() for _, _, error in unauthenticated] == [True, True]


def test_full_queue_is_resource_exhausted_and_timeout_is_deadline_exceeded(model_files):
    settings = grpc_settings(model_files, image_size=224, max_queue_size=1, max_batch_size=1, max_delay_ms=0)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with live_server(settings) as (_, url):
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{settings.grpc_port}")

        def infer(_) -> str:
            try:
                client.infer(MODEL, [grpc_input(x)], client_timeout=60)
                return "OK"
            except triton_grpc.InferenceServerException as exc:
                return exc.status()

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(infer, range(32)))
        assert set(codes) <= {"OK", "StatusCode.RESOURCE_EXHAUSTED"} and "OK" in codes, codes
        assert "StatusCode.RESOURCE_EXHAUSTED" in codes, codes
        assert scrape(url, 'rmt_grpc_requests_total{code="RESOURCE_EXHAUSTED",method="ModelInfer"}') == codes.count(
            "StatusCode.RESOURCE_EXHAUSTED")
        assert infer(0) == "OK"
    settings = grpc_settings(model_files, request_timeout_s=0.001)
    with live_server(settings) as _:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{settings.grpc_port}")
        assert status_of(lambda: client.infer(MODEL, [grpc_input(images(1))])) == "StatusCode.DEADLINE_EXCEEDED"


def test_graceful_shutdown_finishes_running_grpc_calls(model_files):
    settings = grpc_settings(model_files, image_size=224, max_batch_size=1, max_delay_ms=0)
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with live_server(settings) as (server, _):
        batcher = server.config.app.state.server.batcher
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{settings.grpc_port}")
        with ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(client.infer, MODEL, [grpc_input(x)], client_timeout=60) for _ in range(4)]
            # one call runs and at least one waits behind it when the shutdown begins (how many of the
            # four have arrived by then depends on the machine's load, not on what is tested)
            deadline = time.monotonic() + 30
            while batcher.queued_images < 1 and not all(c.done() for c in calls) and time.monotonic() < deadline:
                time.sleep(0.001)
            assert batcher.queued_images >= 1, "no call was waiting behind a running one"
            server.should_exit = True
            assert [call.result().as_numpy("logits").shape for call in calls] == [(1, 10)] * 4
