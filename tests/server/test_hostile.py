"""Hostile input against the real ``rmt-serve`` process on 127.0.0.1 (eager and ONNX Runtime): every
case gets a 4xx with the documented ``{"error"}`` body, within a bound on time and on the server's
resident memory (psutil on the server process, sampled during the case), and the server is ready
and serving afterwards. Raw sockets where httpx would not send what an attacker sends."""
from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image
from test_server import BAD_REQUESTS, encode, free_port, jpeg

from rmt_deploy.benchmarks.serve import batch_totals, wait_ready

SIZE = 64
TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MODEL = "tiny"
INFER = f"/v2/models/{MODEL}/infer"
HEADER_LENGTH = "Inference-Header-Content-Length"
SECONDS_PER_CASE = 5.0          # generous: the machine is shared; today's thin PNG alone takes 8-12 s
RSS_GROWTH_MB = 150.0           # today's thin PNG takes ~2 GB
COMMON_FLAGS = ["--model-name", MODEL, "--threads", "1", "--max-delay-ms", "0", "--max-upload-bytes", str(12 * 2**20),
                "--max-pixels", "4000000", "--header-timeout-s", "1", "--log-level", "info"]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def rmt_serve(flags: list[str], log: Path, env: dict[str, str] | None = None):
    """The server as users run it (``python -m rmt_deploy.server.cli``), its output in ``log``."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "rmt_deploy.server.cli", "--port", str(port), *flags],
                                   stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_ready(server.url, process, timeout=240)
        yield server
    finally:
        process.terminate()
        process.wait(60)


@pytest.fixture(scope="module")
def model_config(tmp_path_factory, tiny_config) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "tiny_config.json"
    path.write_text(json.dumps(tiny_config))
    return path


@pytest.fixture(scope="module", params=["eager", "onnxruntime"])
def server(request, tmp_path_factory, model_config, tiny_checkpoint):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "eager":
        model = ["--model", str(model_config), "--checkpoint", str(tiny_checkpoint)]
    else:
        export = pytest.importorskip("rmt_deploy.exporters.onnx_export")
        tiny_model = request.getfixturevalue("tiny_model")
        onnx = export.export_onnx(tiny_model, folder / "tiny.onnx", dynamic_batch=True, height=SIZE, width=SIZE)
        model = ["--backend", "onnxruntime", "--onnx", str(onnx)]
    flags = [*model, *COMMON_FLAGS, "--image-size", str(SIZE), "--max-batch-size", "4", "--max-queue-size", "16"]
    with rmt_serve(flags, folder / "server.log", {"RMT_API_KEY": TOKEN}) as running:
        yield running


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory, model_config, tiny_checkpoint):
    """A features model at 448 px, one image per batch and one in the queue: runner calls take long
    enough to hold the queue full, and the outputs are large (535k values per image)."""
    flags = ["--model", str(model_config), "--checkpoint", str(tiny_checkpoint), "--task", "features",
             *COMMON_FLAGS, "--image-size", "448", "--max-batch-size", "1", "--max-queue-size", "1",
             "--max-upload-bytes", str(64 * 2**20)]
    with rmt_serve(flags, tmp_path_factory.mktemp("slow") / "server.log") as running:
        yield running


# --- measuring a case ---------------------------------------------------------------------------

class PeakRss:
    """Peak resident-memory growth of a process while the block runs, sampled every 2 ms."""

    def __init__(self, pid: int):
        self.process, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> PeakRss:
        self.start = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def assert_ready_and_serving(server: Server) -> None:
    assert httpx.get(f"{server.url}/readyz", timeout=10).json() == {"status": "ready"}
    r = httpx.post(f"{server.url}/classify", content=jpeg(), headers={"content-type": "image/jpeg", **AUTH}, timeout=30)
    assert r.status_code == 200, r.text


def assert_refused(server: Server, send, status: int, words: str) -> httpx.Response:
    """``send()`` gets ``status`` with ``{"error": "...words..."}``, in bounded time and memory."""
    with PeakRss(server.process.pid) as rss:
        started = time.perf_counter()
        response = send()
        seconds = time.perf_counter() - started
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    assert set(body) == {"error"} and words in body["error"], body
    assert seconds < SECONDS_PER_CASE, f"{seconds:.1f} s"
    assert rss.growth_mb < RSS_GROWTH_MB, f"server RSS grew {rss.growth_mb:.0f} MB"
    assert_ready_and_serving(server)
    return response


def scrape(server: Server, sample: str) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- hostile requests ---------------------------------------------------------------------------

def png(width: int, height: int) -> bytes:
    return encode(Image.new("RGB", (width, height), (200, 30, 30)), "PNG", optimize=True)


def v2_json(value: str = "0.5", fill: str = "0.5", size: int = SIZE) -> bytes:
    """A JSON v2 request whose tensor is ``fill`` everywhere and the literal ``value`` at one position."""
    values = [fill] * (3 * size * size)
    values[17] = value
    return (f'{{"inputs": [{{"name": "images", "shape": [1, 3, {size}, {size}], "datatype": "FP32", '
            f'"data": [{",".join(values)}]}}]}}').encode()


def v2_binary(x: np.ndarray, header_length: bytes | None = None, outputs: list | None = None) -> dict:
    header = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         **({"outputs": outputs} if outputs else {})}).encode()
    return dict(content=header + x.astype("<f4").tobytes(),
                headers={HEADER_LENGTH: header_length if header_length is not None else str(len(header)), **AUTH})


def classify_body(data: bytes) -> dict:
    return dict(content=data, headers={"content-type": "image/png", **AUTH})


def nan_image() -> np.ndarray:
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    x[0, 1, 5, 5] = np.nan
    return x


HOSTILE = {   # name: (method, path, request keyword arguments, status, words in the error)
    "thin_png_1x8000": ("POST", "/classify", classify_body(png(1, 8000)), 400, "aspect ratio"),
    "thin_png_8000x1": ("POST", "/classify", classify_body(png(8000, 1)), 400, "aspect ratio"),
    "thin_png_1x3000000": ("POST", "/classify", classify_body(png(1, 3_000_000)), 400, "aspect ratio"),
    "json_null": ("POST", INFER, dict(content=v2_json("null"), headers=AUTH), 400, "'images'"),
    "json_nan_literal": ("POST", INFER, dict(content=v2_json("NaN"), headers=AUTH), 400, "'images'"),
    "json_infinity_literal": ("POST", INFER, dict(content=v2_json("-Infinity"), headers=AUTH), 400, "'images'"),
    "json_nan_string": ("POST", INFER, dict(content=v2_json('"nan"'), headers=AUTH), 400, "'images'"),
    "json_1e39": ("POST", INFER, dict(content=v2_json("1e39"), headers=AUTH), 400, "'images'"),
    "json_10_to_the_400": ("POST", INFER, dict(content=v2_json("1" + "0" * 400), headers=AUTH), 400, "'images'"),
    "json_boolean": ("POST", INFER, dict(content=v2_json("true", fill="false"), headers=AUTH), 400, "'images'"),
    "json_3e38_overflows_the_outputs": ("POST", INFER, dict(content=v2_json("3e38", fill="3e38"), headers=AUTH),
                                        422, "not finite"),
    "binary_nan": ("POST", INFER, v2_binary(nan_image()), 400, "'images'"),
    "binary_3e38_binary_outputs": ("POST", INFER, v2_binary(np.full((1, 3, SIZE, SIZE), 3e38, np.float32),
                                                            outputs=[{"name": "logits",
                                                                      "parameters": {"binary_data": True}}]),
                                   422, "not finite"),
    "header_length_superscript_two": ("POST", INFER, v2_binary(nan_image(), "²".encode("latin-1")), 400, HEADER_LENGTH),
    "header_length_arabic_digits": ("POST", INFER, v2_binary(nan_image(), "١٢".encode()), 400, HEADER_LENGTH),
    "header_length_signed": ("POST", INFER, v2_binary(nan_image(), b"+12"), 400, HEADER_LENGTH),
    "header_length_5000_digits": ("POST", INFER, v2_binary(nan_image(), b"9" * 5000), 400, HEADER_LENGTH),
    "unknown_version": ("POST", f"/v2/models/{MODEL}/versions/999/infer", v2_binary(np.zeros((1, 3, SIZE, SIZE))),
                        404, "no version '999'"),
    "unknown_version_metadata": ("GET", f"/v2/models/{MODEL}/versions/2", {}, 404, "no version '2'"),
    "unknown_path": ("GET", "/nothing/here", {}, 404, "Not Found"),
    "wrong_method": ("GET", "/classify", {}, 405, "Method Not Allowed"),
    "huge_header": ("GET", "/healthz", dict(headers={"x-padding": "a" * 2**20}), 431, "headers are above the limit"),
    **{f"existing_{name}": ("POST", "/classify", dict(request, headers={**request.get("headers", {}), **AUTH}),
                            status, words)
       for name, (request, status, words) in BAD_REQUESTS.items() if name != "too_large_streamed"},
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_request_is_a_bounded_4xx(server, case):
    method, path, request, status, words = HOSTILE[case]
    assert_refused(server, lambda: httpx.request(method, server.url + path, timeout=30, **request), status, words)


def test_streamed_upload_above_the_limit(server):
    def send():
        chunks = iter([b"\0" * 2**16] * 208)
        return httpx.post(f"{server.url}/classify", content=chunks, headers={"content-type": "image/jpeg", **AUTH},
                          timeout=30)
    assert_refused(server, send, 413, "limit")


def test_probes_send_a_content_type(server):
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready",
                 f"/v2/models/{MODEL}/versions/1/ready"):
        r = httpx.get(server.url + path, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), (path, r.headers)
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    assert httpx.post(f"{server.url}/v2/models/{MODEL}/versions/1/infer", timeout=30, **v2_binary(x)).status_code == 200


def test_a_broken_sibling_file_leaves_no_work_behind(server):
    """16-file requests with one broken file, one after another: each is a 400 and nothing of them is
    queued or inferred (today the 15 good images were queued, until others got 'queue full')."""
    files = [("file", (f"{i}.jpg", jpeg(i), "image/jpeg")) for i in range(15)] + [("file", ("bad.jpg", b"junk", "x"))]
    calls_before = scrape(server, "rmt_batch_size_count")
    for _ in range(6):
        r = httpx.post(f"{server.url}/classify", files=files, headers=AUTH, timeout=30)
        assert r.status_code == 400 and "not an image" in r.json()["error"], r.text
    assert scrape(server, "rmt_batch_size_count") == calls_before
    assert scrape(server, "rmt_queue_depth") == 0
    assert_ready_and_serving(server)


def test_batches_take_what_is_already_queued(server):
    """With --max-delay-ms 0, batches form only from requests that are already waiting: today none
    were ever taken (every batch had one image); they must now fill up under concurrent load."""
    x = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    images, calls = batch_totals(server.url, AUTH)        # what rmt-bench serve reports the mean batch from
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda _: client.post(server.url + INFER, **v2_binary(x)).status_code, range(96)))
    assert statuses == [200] * 96
    images_after, calls_after = batch_totals(server.url, AUTH)
    assert images_after - images == 96
    assert (images_after - images) / (calls_after - calls) > 1.5


# --- raw sockets: hang-ups, slow and oversized headers ------------------------------------------

def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    received, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([sock], [], [], 0.05)[0]:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


@pytest.mark.parametrize("content_type", ["image/jpeg", "multipart/form-data; boundary=xyz"])
def test_client_hanging_up_mid_upload_is_not_a_server_error(server, content_type):
    errors_500 = 'rmt_requests_total{endpoint="/classify",status="500"}'
    hangups = 'rmt_requests_total{endpoint="/classify",status="499"}'
    before = scrape(server, errors_500), scrape(server, hangups)
    log_before = len(server.log_text())
    head = (f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: 1000000\r\n\r\n").encode()
    prefix = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(head + prefix + b"\0" * 100_000)
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while scrape(server, hangups) == before[1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (scrape(server, errors_500), scrape(server, hangups)) == (before[0], before[1] + 1)
    new_log = server.log_text()[log_before:]
    assert "Traceback" not in new_log and "ERROR" not in new_log, new_log
    assert_ready_and_serving(server)


def test_slow_headers_are_cut_off(server):
    """Slowloris: a header line every 0.3 s never completes the request; the server answers 408 and
    closes after --header-timeout-s (1 s here) instead of holding the connection open."""
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started, received = time.monotonic(), b""
        while time.monotonic() - started < 20:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:          # the server has closed the connection
                break
            chunk = read_until_closed(sock, 0.3)
            received += chunk
            if chunk:
                break
        received += read_until_closed(sock, 3)
        seconds = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert json.loads(received.split(b"\r\n\r\n", 1)[1]) == {"error": "request headers not received within 1 s"}
    assert seconds < 12, "the connection was held open (the loop only gives up after 20 s)"
    assert_ready_and_serving(server)


def test_full_queue_refuses_before_the_body_is_sent(slow_server):
    """A busy server answers 503 to the request headers alone: the client never has to upload."""
    x = np.random.default_rng(1).standard_normal((1, 3, 448, 448)).astype(np.float32)
    head = ("POST /features HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            "Content-Length: 5000000\r\n\r\n").encode()
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(4) as pool:
        for _attempt in range(5):
            request = v2_binary(x, outputs=[{"name": "stage4", "parameters": {"binary_data": True}}])
            busy = [pool.submit(client.post, slow_server.url + INFER, **request) for _ in range(3)]
            deadline = time.monotonic() + 10
            while scrape(slow_server, "rmt_queue_depth") < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            with connect(slow_server) as sock:
                sock.sendall(head)
                answer = read_until_closed(sock, 2)
            [f.result() for f in busy]
            if answer:
                break
    assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
    assert b"queue full" in answer and b"retry-after: 1" in answer.lower()


def test_large_json_is_parsed_and_rendered_off_the_event_loop(slow_server):
    """A 12 MB JSON request whose answer is 535k floats as JSON: /healthz keeps answering meanwhile."""
    x = np.random.default_rng(2).standard_normal((1, 3, 448, 448)).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=10) as client:
        idle = []                   # /healthz on this machine, now, with no big request: the noise floor
        for _ in range(20):
            t = time.perf_counter()
            assert client.get(f"{slow_server.url}/healthz").status_code == 200
            idle.append(time.perf_counter() - t)
        big = pool.submit(httpx.post, slow_server.url + INFER, content=body, timeout=120)
        started, stalls = time.monotonic(), []
        while not big.done():
            t = time.perf_counter()
            assert client.get(f"{slow_server.url}/healthz").status_code == 200
            stalls.append(time.perf_counter() - t)
            time.sleep(0.01)
        seconds = time.monotonic() - started
        response = big.result()
    assert response.status_code == 200, response.text[:300]
    assert sum(len(o["data"]) for o in response.json()["outputs"]) == 32 * 112**2 + 64 * 56**2 + 128 * 28**2 + 256 * 14**2
    assert max(stalls) < max(0.25, 5 * max(idle), seconds / 5), (max(stalls), max(idle), seconds)


def test_empty_api_key_is_refused_at_start(model_config, tiny_checkpoint):
    result = subprocess.run([sys.executable, "-m", "rmt_deploy.server.cli", "--model", str(model_config),
                             "--checkpoint", str(tiny_checkpoint), "--port", str(free_port())],
                            env={**os.environ, "RMT_API_KEY": ""}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "RMT_API_KEY is set but empty" in result.stderr


def test_schemathesis_finds_no_server_error_and_no_response_off_the_schema(server):
    """Schema-driven fuzzing of every operation (the v2 ones included) with the token set: no 5xx, and
    every status, content type, header and body is one the published OpenAPI schema allows."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (content_type_conformance, not_a_server_error, response_headers_conformance,
                                     response_schema_conformance, status_code_conformance)

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance]
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures, operations = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        operations.append(f"{operation.method.upper()} {operation.path}")

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            response = case.call(base_url=server.url, headers=AUTH, timeout=30)
            try:
                case.validate_response(response, checks=checks, headers=AUTH)
            except Exception as exc:       # noqa: BLE001 -- schemathesis' FailureGroup lists every failed check
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {exc}"[:600])

        fuzz()
    assert {f"POST {INFER.replace(MODEL, '{model_name}')}", "GET /v2/models/{model_name}/ready"} <= set(operations)
    assert not failures, failures
    assert_ready_and_serving(server)


def test_a_client_gone_while_queued_leaves_no_work_behind(slow_server):
    """A request whose client hangs up while its image waits for the runner is withdrawn: only the
    request that was already running is inferred, and the hang-up is counted as 499, not 500. (Tried
    up to five times: the hang-up must land while the other request still runs.)"""
    x = np.random.default_rng(3).standard_normal((1, 3, 448, 448)).astype(np.float32)
    request = v2_binary(x, outputs=[{"name": "stage4", "parameters": {"binary_data": True}}])
    raw = (f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(request['content'])}\r\n"
           f"{HEADER_LENGTH}: {request['headers'][HEADER_LENGTH]}\r\n\r\n").encode() + request["content"]
    hangups = 'rmt_requests_total{endpoint="/v2/models/{model_name}/infer",status="499"}'
    with ThreadPoolExecutor(1) as pool:
        for _attempt in range(5):
            calls, gone = scrape(slow_server, "rmt_batch_size_count"), scrape(slow_server, hangups)
            running = pool.submit(httpx.post, slow_server.url + INFER, timeout=60, **request)
            time.sleep(0.05)
            with connect(slow_server) as sock:
                sock.sendall(raw)
                deadline = time.monotonic() + 5
                while scrape(slow_server, "rmt_queue_depth") < 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
            assert running.result().status_code == 200
            deadline = time.monotonic() + 10
            while scrape(slow_server, hangups) == gone and time.monotonic() < deadline:
                time.sleep(0.05)
            counted = scrape(slow_server, hangups) == gone + 1
            # the queue is first in, first out: once a later request is answered, the hung-up image
            # would have been inferred before it, had it been taken
            assert httpx.post(slow_server.url + INFER, timeout=60, **request).status_code == 200
            # an attempt whose hang-up landed after the running request ended proves nothing: try again
            if counted and scrape(slow_server, "rmt_batch_size_count") == calls + 2:
                break
    assert counted, "no hang-up while queued was counted as 499"
    assert scrape(slow_server, "rmt_batch_size_count") == calls + 2, "every hung-up request was inferred"
    assert scrape(slow_server, "rmt_queue_depth") == 0
