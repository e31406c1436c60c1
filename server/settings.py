"""Every serving option in one place: ``rmt-serve --flag`` and ``RMT_FLAG`` environment variables
both land here, so the CLI, the container and the tests configure the server the same way."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, CliApp, CliSettingsSource, CliSuppress, SettingsConfigDict

from rmt_deploy.checkpoint import WEIGHT_CHOICES
from rmt_deploy.cli_args import ray_flag_options
from rmt_deploy.runners import backend_names, get_backend, precision_names



class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RMT_", cli_kebab_case=True, cli_prog_name="rmt-serve",
                                      cli_implicit_flags=True, extra="ignore")

    model: str = Field("rmt_t", description="variant name (rmt_t, rmt_s, ...), 'auto' (from the checkpoint) "
                                            "or a JSON config file; eager/compile backends only")
    checkpoint: Path | None = Field(None, description="released .pth checkpoint (random weights without one)")
    weights: Literal[WEIGHT_CHOICES] = Field("auto", description="EMA or raw weights of the checkpoint (auto: EMA "
                                             "when present, raw for RMT-T)")
    task: Literal["classify", "features"] = Field("classify", description="eager/compile only: the classifier "
                                                  "(serves /classify and /features from one forward) or the backbone "
                                                  "alone (/features); ONNX/TensorRT files say which")
    backend: str = Field(backend_names()[0], description=f"one of {', '.join(backend_names())}")
    onnx: Path | None = Field(None, description="ONNX file (fp32, fp16 or QDQ int8) for the ONNX backends, or "
                                                "an OpenVINO IR .xml (NNCF int8) for openvino")
    engine: Path | None = Field(None, description="TensorRT engine for --backend tensorrt")
    device: str = "cpu"
    precision: str = Field("fp32", description=f"one of {', '.join(precision_names())} where the backend runs it "
                           "(a file's own precision by default; bf16 with openvino computes an fp32 file in bfloat16)")
    threads: int | None = Field(None, ge=1, description="intra-op threads for inference")
    instances: int = Field(1, ge=1, le=64, description="model instances fed by the one batcher, each running "
                           "batches with --threads threads (Triton's instance_group)")
    image_size: int = Field(224, ge=32, le=1024, description="input resolution (the ONNX/engine file's own wins)")
    model_name: str | None = Field(None, description="name in responses and /v2/models/{name}; default: the "
                                                         "model's (variant, or the config file's stem)")

    host: str = Field("127.0.0.1", description="bind address; loopback unless told otherwise")
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int | None = Field(None, ge=0, le=65535, description="also serve KServe v2 over gRPC on this port "
                                  "(needs the grpc extra); off unless given")
    max_batch_size: int = Field(8, ge=1, le=256, description="largest batch the dynamic batcher forms")
    max_delay_ms: float = Field(5.0, ge=0, le=1000, description="how long the first request waits for company")
    max_queue_size: int = Field(64, ge=1, description="images waiting for inference before 503")
    request_timeout_s: float = Field(30.0, gt=0, description="per-request deadline before 504")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="request body limit (413)")
    max_pixels: int = Field(40_000_000, ge=1024, description="decoded pixel limit against decompression bombs")
    max_files: int = Field(16, ge=1, description="files per multipart /classify request")
    decode_workers: int = Field(2, ge=1, description="threads that decode and preprocess images")
    graceful_timeout_s: float = Field(30.0, ge=0, description="how long shutdown waits for in-flight requests")
    header_timeout_s: float = Field(10.0, gt=0, description="a request's headers must arrive within this (408)")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="request line + headers limit (431)")
    keep_alive_timeout_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after this")
    warmup: bool = Field(True, description="run one batch before /readyz turns ready")
    api_key: CliSuppress[SecretStr | None] = Field(None, description="bearer token for inference endpoints "
                                                                    "(RMT_API_KEY; environment only)")
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins; none: CORS off")
    log_level: str = "info"
    # rmt-serve --ray: the same app on Ray Serve replicas (server/ray_serve.py, docs/scale-out.md)
    ray: str | None = Field(None, description="serve on Ray Serve: a cluster address (ray://HOST:10001, HOST:6379, "
                                              "auto) to join, or no value (or 'local') for a local cluster")
    replicas: int = Field(1, ge=1, description="--ray: replicas, each with its own runner and batcher (with an "
                                               "autoscaling range: the initial number)")
    min_replicas: int | None = Field(None, ge=0, description="--ray: autoscaling range, lowest")
    max_replicas: int | None = Field(None, ge=1, description="--ray: autoscaling range, highest")
    ray_num_cpus_per_replica: float | None = Field(None, gt=0, description="--ray: CPUs Ray reserves per replica "
                                                                           "(default: --threads, or 1)")

    @field_validator("api_key")
    @classmethod
    def _api_key_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("RMT_API_KEY is set but empty: set a token, or unset it to serve without one")
        return value

    @field_validator("grpc_port", mode="before")
    @classmethod
    def _empty_grpc_port_is_off(cls, value):
        """``RMT_GRPC_PORT=`` turns off the gRPC port the container image sets."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        get_backend(value)      # ValueError naming the known backends
        return value

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, value: str) -> str:
        if value not in precision_names():
            raise ValueError(f"unknown precision {value!r}; choose from {', '.join(precision_names())}")
        return value

    @model_validator(mode="after")
    def _backend_has_its_file(self) -> "ServeSettings":
        kind = get_backend(self.backend).artifact
        if kind != "model" and getattr(self, kind) is None:
            raise ValueError(f"--backend {self.backend} needs --{kind} FILE")
        return self

    @model_validator(mode="after")
    def _replicas_need_ray(self) -> "ServeSettings":
        replica_options = {"replicas", "min_replicas", "max_replicas", "ray_num_cpus_per_replica"}
        if self.ray is None and replica_options & self.model_fields_set:
            raise ValueError("--replicas, --min-replicas, --max-replicas and --ray-num-cpus-per-replica apply "
                             "with --ray")
        low, high = self.min_replicas, self.max_replicas
        if low is not None and high is not None and low > high:
            raise ValueError(f"--min-replicas {low} is above --max-replicas {high}")
        return self


def _ray_flag_takes_an_optional_address(parser, *names, **kwargs):
    """``--ray`` alone means a local cluster, ``--ray ADDRESS`` joins one (as in rmt-predict); the
    settings' CLI has no optional values, so the argparse argument gets one here."""
    if "--ray" in names:
        kwargs.update(ray_flag_options())
    return parser.add_argument(*names, **kwargs)


def parse_cli(argv: list[str]) -> ServeSettings:
    """Flags (then RMT_* variables, then defaults) -> settings; raises ValidationError / SettingsError."""
    source = CliSettingsSource(ServeSettings, add_argument_method=_ray_flag_takes_an_optional_address)
    return CliApp.run(ServeSettings, cli_args=argv, cli_settings_source=source)
