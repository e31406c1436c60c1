"""``rmt-serve --ray``: the real CLI as a subprocess on a real local Ray cluster (127.0.0.1), two Ray
Serve replicas of the tiny model at 64 px. Load spreads over both replicas; every limit and error of
rmt-serve comes back the same through Ray Serve's proxy; a replica killed under load costs only the
requests it was running and Ray Serve brings the count back to two; SIGTERM shuts Serve and the
local cluster down."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server import BAD_REQUESTS, free_port, jpeg

from rmt_deploy.benchmarks.serve import wait_ready

TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MODEL = "tiny"
REPLICA_HEADER = "x-rmt-replica"
CLIENT_TIMEOUT_S = 30.0         # a request without an answer by then counts as hanging
RESTORE_WITHIN_S = 60.0
SERVER_FLAGS = ["--replicas", "2", "--ray-num-cpus-per-replica", "1", "--threads", "1", "--image-size", "64",
                "--model-name", MODEL, "--max-batch-size", "4", "--max-delay-ms", "2",
                "--max-upload-bytes", str(12 * 2**20), "--max-pixels", "4000000", "--log-level", "warning"]


def cli_code(*flags: str, hide_ray: bool = False) -> subprocess.CompletedProcess:
    """rmt-serve's main() in a fresh interpreter (``hide_ray``: as if Ray were not installed)."""
    code = (("import sys; sys.modules['ray'] = None; " if hide_ray else "import sys; ") +
            f"from rmt_deploy.server.cli import main; sys.exit(main({list(flags)!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_without_ray_the_message_says_how_to_install_it():
    done = cli_code("--ray", "--replicas", "2", hide_ray=True)
    assert done.returncode == 2 and "pip install 'rmt-deploy[ray]'" in done.stderr, done.stderr


def test_replica_options_without_ray_are_refused():
    done = cli_code("--replicas", "2")
    assert done.returncode == 2 and "apply with --ray" in done.stderr, done.stderr
    done = cli_code("--ray", "--min-replicas", "3", "--max-replicas", "2")
    assert done.returncode == 2 and "above --max-replicas" in done.stderr, done.stderr


def test_ray_flag_takes_an_optional_address():
    from rmt_deploy.cli_args import LOCAL_CLUSTER
    from rmt_deploy.server.settings import parse_cli
    assert parse_cli(["--ray", "--replicas", "2"]).ray == LOCAL_CLUSTER
    assert parse_cli(["--ray"]).ray == LOCAL_CLUSTER
    assert parse_cli(["--ray", "ray://head:10001"]).ray == "ray://head:10001"
    assert parse_cli([]).ray is None


def test_deployment_options_map_replicas_and_autoscaling():
    pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    from rmt_deploy.server.ray_serve import app_builder, deployment_options
    from rmt_deploy.server.settings import parse_cli
    fixed = deployment_options(parse_cli(["--ray", "--replicas", "3", "--threads", "2", "--max-queue-size", "32"]))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2} and fixed["max_queued_requests"] == 32
    scaled = deployment_options(parse_cli(["--ray", "--min-replicas", "1", "--max-replicas", "4", "--replicas", "2"]))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
                                            "target_ongoing_requests": 8}
    from ray.serve import Application
    assert isinstance(app_builder({"model": "rmt_t", "image-size": "64", "replicas": "2"}), Application)
    with pytest.raises(ValueError, match=r"unknown rmt-serve setting\(s\) replica;"):
        app_builder({"model": "rmt_t", "replica": "2"})


def test_replicas_see_their_gpu_as_cuda_0():
    """Ray gives each replica its GPU through CUDA_VISIBLE_DEVICES: cuda:1 outside is cuda:0 inside."""
    from rmt_deploy.server.ray_serve import _for_replicas, deployment_options
    from rmt_deploy.server.settings import parse_cli
    settings = parse_cli(["--ray", "--device", "cuda:1"])
    assert _for_replicas(settings).device == "cuda:0"
    assert deployment_options(settings)["ray_actor_options"]["num_gpus"] == 1
    assert _for_replicas(parse_cli(["--ray"])).device == "cpu"


def test_replica_health_reports_a_runner_that_fails_batch_after_batch(tmp_path, tiny_config, tiny_checkpoint):
    """What check_health tells Ray, on the real app and runner (in process): healthy while serving,
    unhealthy once the runner fails three batches in a row."""
    from fastapi.testclient import TestClient

    from rmt_deploy.server.app import create_app
    from rmt_deploy.server.ray_serve import replica_health_problem
    from rmt_deploy.server.settings import ServeSettings
    config = tmp_path / "tiny_config.json"
    config.write_text(json.dumps(tiny_config))
    settings = ServeSettings(model=str(config), checkpoint=tiny_checkpoint, image_size=64, max_delay_ms=0)
    image = {"content": jpeg(), "headers": {"content-type": "image/jpeg"}}
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.post("/classify", **image).status_code == 200
        assert replica_health_problem(client.app) is None
        client.app.state.server.model.runner.close()        # from now on every batch raises
        for failures in range(1, 4):
            assert client.post("/classify", **image).status_code == 500
            assert (replica_health_problem(client.app) is None) == (failures < 3)
        assert "3 batches in a row" in replica_health_problem(client.app)


# --- a real cluster ---------------------------------------------------------------------------------

@dataclass
class RayServer:
    url: str
    process: subprocess.Popen
    log: Path


@dataclass
class Outcome:
    status: int | None          # None: no HTTP answer (transport error or client timeout)
    replica: str | None
    error: str | None = None
    finished: float = 0.0       # time.monotonic() when the answer (or the error) came


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, tiny_config, tiny_checkpoint):
    pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    folder = tmp_path_factory.mktemp("ray_serve")
    config = folder / "tiny_config.json"
    config.write_text(json.dumps(tiny_config))
    port, log = free_port(), folder / "rmt-serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "rmt_deploy.server.cli", "--ray", "--port", str(port), "--model", str(config),
             "--checkpoint", str(tiny_checkpoint), *SERVER_FLAGS],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "RMT_API_KEY": TOKEN, "RAY_DEDUP_LOGS": "0"})
    server = RayServer(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_ready(server.url, process, timeout=180)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(90)


def classify(url: str, seed: int) -> Outcome:
    try:
        r = httpx.post(f"{url}/classify", content=jpeg(seed % 8), headers={**AUTH, "content-type": "image/jpeg"},
                       timeout=CLIENT_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return Outcome(None, None, f"{type(exc).__name__}: {exc}", time.monotonic())
    return Outcome(r.status_code, r.headers.get(REPLICA_HEADER), None if r.status_code == 200 else r.text[:200],
                   time.monotonic())


def load(url: str, requests: int, concurrency: int = 16, answered: list | None = None) -> list[Outcome]:
    """``requests`` classify calls, ``concurrency`` at a time; each outcome is also appended to
    ``answered`` as it comes, for a caller watching the progress."""
    answered = [] if answered is None else answered

    def one(i: int) -> Outcome:
        outcome = classify(url, i)
        answered.append(outcome)
        return outcome

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(requests)))


def replica_pids(url: str, rounds: int = 10) -> dict[str, int]:
    """{replica id: PID} from rmt_replica_info in /metrics. Each scrape lands on one replica, and
    one at a time they may all land on the same one: rounds of 8 scrapes at once, until two are seen."""
    found: dict[str, int] = {}
    for _ in range(rounds):
        with ThreadPoolExecutor(8) as pool:
            scrapes = list(pool.map(lambda _: httpx.get(f"{url}/metrics", timeout=10), range(8)))
        texts = [r.text for r in scrapes if r.status_code == 200]     # not the proxy's error for a dead replica
        for family in (f for text in texts for f in text_string_to_metric_families(text)):
            for sample in family.samples:
                if sample.name == "rmt_replica_info":
                    found[sample.labels["replica"]] = int(sample.labels["pid"])
        if len(found) >= 2:
            break
    return found


@pytest.mark.slow
def test_two_replicas_answer_every_request(ray_server):
    outcomes = load(ray_server.url, 200)
    assert [o for o in outcomes if o.status != 200] == []
    assert len({o.replica for o in outcomes}) == 2, "both replicas should have answered"
    same_image = [httpx.post(f"{ray_server.url}/classify", content=jpeg(3), timeout=30,
                             headers={**AUTH, "content-type": "image/jpeg"}) for _ in range(12)]
    by_replica = {r.headers[REPLICA_HEADER]: r.json()["predictions"] for r in same_image}
    assert len(set(map(json.dumps, by_replica.values()))) == 1, "replicas disagree on one image"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_errors_and_limits_are_rmt_serves(ray_server, case):
    request, status, words = BAD_REQUESTS[case]
    request = {**request, "headers": {**request.get("headers", {}), **AUTH}}
    if not isinstance(request.get("content", b""), bytes):     # a streamed body: test_server's iterator is spent
        request["content"] = iter([b"\0" * 2**16] * 208)
    r = httpx.post(f"{ray_server.url}/classify", timeout=30, **request)
    assert r.status_code == status and words in r.json()["error"], r.text
    assert r.headers[REPLICA_HEADER]


@pytest.mark.slow
def test_token_routing_errors_and_health_through_the_proxy(ray_server):
    url = ray_server.url
    r = httpx.post(f"{url}/classify", content=jpeg(), headers={"content-type": "image/jpeg"}, timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "bearer token" in r.json()["error"]
    r = httpx.get(f"{url}/no/such/path", timeout=30)
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    r = httpx.get(f"{url}/classify", timeout=30)
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert httpx.get(f"{url}/readyz", timeout=30).json() == {"status": "ready"}
    r = httpx.get(f"{url}/v2/models/{MODEL}", timeout=30)
    assert r.status_code == 200 and r.json()["name"] == MODEL


@pytest.mark.slow
def test_killed_replica_loses_only_its_requests_and_is_replaced(ray_server):
    url = ray_server.url
    before = replica_pids(url)
    assert len(before) == 2, f"/metrics named only {before}"
    victim, victim_pid = next(iter(before.items()))
    with ThreadPoolExecutor(1) as background:
        answered: list[Outcome] = []
        running = background.submit(load, url, 160, 16, answered)
        deadline = time.monotonic() + 60
        while len(answered) < 16 and time.monotonic() < deadline:      # load on both replicas
            time.sleep(0.01)
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        outcomes = running.result(timeout=CLIENT_TIMEOUT_S * 12)
    assert sum(o.finished > killed_at for o in outcomes) >= 16, "the kill should land while the load runs"
    print(f"killed replica {victim} under load: {sum(o.status != 200 for o in outcomes)} of {len(outcomes)} failed")
    no_answer = [o for o in outcomes if o.status is None]
    assert no_answer == [], "every request gets an answer (none hangs, the proxy stays up)"
    failed = [o for o in outcomes if o.status != 200]
    # at most what the killed replica was running: it holds at most the 16 concurrent requests
    assert len(failed) <= 16 and all(o.status >= 500 for o in failed), failed
    assert all(o.replica != victim for o in failed if o.replica), "a failure came from a surviving replica"

    # until Ray notices the death (its health check), Serve's status still counts the dead replica
    # RUNNING: restored means /readyz 200 with two live replicas, the victim not among them
    statuses = []
    while True:
        assert time.monotonic() - killed_at < RESTORE_WITHIN_S, f"not restored in time; /readyz said {statuses[-5:]}"
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)
        except httpx.TimeoutException:
            continue
        statuses.append(r.json()["status"])
        if r.status_code == 200:
            pids = replica_pids(url, rounds=1)
            if len(pids) == 2 and victim_pid not in pids.values():
                break
        time.sleep(0.3)
    assert any(status.startswith("replicas ") for status in statuses), f"/readyz never waited: {set(statuses)}"
    print(f"2 replicas ready again {time.monotonic() - killed_at:.1f} s after the kill; /readyz said {set(statuses)}")
    after = load(url, 48)
    assert [o for o in after if o.status != 200] == []
    answering = {o.replica for o in after}
    assert victim not in answering and len(answering) == 2, answering


@pytest.mark.slow
def test_sigterm_shuts_down_serve_and_the_local_cluster(ray_server):
    process = psutil.Process(ray_server.process.pid)
    cluster = process.children(recursive=True)          # raylet, GCS, the replicas' workers...
    assert cluster
    ray_server.process.send_signal(signal.SIGTERM)
    assert ray_server.process.wait(90) == 0, ray_server.log.read_text()[-3000:]
    _, alive = psutil.wait_procs(cluster, timeout=30)
    assert alive == [], [p.info for p in alive if p.is_running()]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{ray_server.url}/healthz", timeout=5)
    assert "shutting down Ray Serve" in ray_server.log.read_text()
