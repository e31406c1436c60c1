"""The Open Inference Protocol (KServe v2) without its transport: model and version lookup, metadata,
input tensor checks (name, datatype, shape, finite float32 values) and output checks. The HTTP router
(`routers/v2.py`) and the gRPC service (`grpc_api.py`) both answer through these, so both protocols
refuse the same inputs with the same messages; each maps `ApiError`'s status to its own codes."""
from __future__ import annotations

import numpy as np

from rmt_deploy import __version__
from rmt_deploy.runners import INPUT_NAME, get_backend

from .errors import ApiError
from .model_host import ServedModel
from .schemas import ModelMetadata, ServerMetadata, TensorMetadata

FLOAT32_MAX = float(np.finfo(np.float32).max)
MODEL_VERSION = "1"
_DATATYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}    # numpy dtype -> KServe v2 datatype


def check_model(served: ServedModel, model_name: str, version: str | None) -> None:
    """404 unless the request names this server's model (and its only version, "1"; empty: the latest)."""
    if model_name != served.name:
        raise ApiError(404, f"unknown model {model_name!r}; this server serves {served.name!r}")
    if version not in (None, "", MODEL_VERSION):
        raise ApiError(404, f"model {model_name!r} has no version {version!r}; its only version is '1'")


def server_metadata(extensions: list[str]) -> ServerMetadata:
    return ServerMetadata(name="rmt-deploy", version=__version__, extensions=extensions)


def model_metadata(served: ServedModel) -> ModelMetadata:
    size = served.image_size
    dtypes = served.artifact.output_dtypes if served.artifact else ("float32",) * len(served.output_names)
    outputs = [TensorMetadata(name=n, datatype=_DATATYPES[dtype], shape=served.output_shape(n, c))
               for n, c, dtype in zip(served.output_names, served.output_channels, dtypes)]
    return ModelMetadata(name=served.name, versions=[MODEL_VERSION], platform=get_backend(served.runner.backend).platform,
                         inputs=[TensorMetadata(name=INPUT_NAME, datatype="FP32", shape=[-1, 3, size, size])],
                         outputs=outputs, parameters=_parameters(served.runner))


def _parameters(runner) -> dict[str, str]:
    """The precision the runner computes in, its backend, and the quantizer / calibration of an int8 file."""
    extra = runner.metadata().extra
    found = {"precision": runner.precision, "backend": runner.backend}
    found.update({key.removeprefix("rmt."): str(extra[key]) for key in ("rmt.quantizer", "rmt.calibration",
                                                                         "inference_precision") if key in extra})
    return found


def check_input(names: list[str], datatype: str, shape: list[int], size: int, max_batch: int) -> int:
    """400 unless the request has the one FP32 input [N, 3, S, S] with 1 <= N <= max_batch; its value count."""
    if names != [INPUT_NAME]:
        raise ApiError(400, f"expected exactly one input named {INPUT_NAME!r}, got {names}")
    if datatype != "FP32":
        raise ApiError(400, f"input {INPUT_NAME!r} has datatype {datatype}; the model expects FP32")
    if len(shape) != 4 or list(shape[1:]) != [3, size, size] or not 1 <= shape[0] <= max_batch:
        raise ApiError(400, f"input {INPUT_NAME!r} has shape {list(shape)}; the model expects [N, 3, {size}, {size}] "
                            f"with 1 <= N <= {max_batch}")
    return int(np.prod(shape))


def raw_values(data: bytes, name: str, count: int) -> np.ndarray:
    """Little-endian FP32 values of a raw (binary) tensor of ``count`` values."""
    if len(data) != count * 4:
        raise ApiError(400, f"raw data of input {name!r} has {len(data)} bytes; {count} FP32 values need {count * 4}")
    return np.frombuffer(data, dtype="<f4")


def finite_float32(values: np.ndarray, name: str, count: int) -> np.ndarray:
    """400 naming the tensor unless it has ``count`` values, each a finite float32 (NaN, infinities and
    numbers beyond float32's range would only come back as NaN outputs)."""
    if values.size != count:
        raise ApiError(400, f"input {name!r} has {values.size} values; its shape needs {count}")
    if values.dtype.kind not in "iuf":
        raise ApiError(400, f"input {name!r} data holds values that are not numbers (null, strings, booleans, "
                            "or integers beyond 64 bits)")
    if values.dtype.kind == "f" and not (np.isfinite(values).all() and np.abs(values).max(initial=0) <= FLOAT32_MAX):
        raise ApiError(400, f"input {name!r} holds values that are not finite float32 numbers (NaN, Infinity, "
                            f"or beyond +-{FLOAT32_MAX:.4g})")
    return values.astype(np.float32, copy=False)


def requested_outputs(requested: list[str], output_names: list[str]) -> list[str]:
    """The outputs to send: those named (400 for one the model lacks), or all of them."""
    unknown = set(requested) - set(output_names)
    if unknown:
        raise ApiError(400, f"unknown outputs {sorted(unknown)}; the model has {output_names}")
    return requested or list(output_names)


def finite_output(outputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The output as contiguous little-endian FP32; 422 when it is not finite (absurd inputs such as
    3e38 overflow)."""
    array = np.ascontiguousarray(outputs[name], dtype="<f4")
    if not np.isfinite(array).all():
        raise ApiError(422, f"output {name!r} is not finite (NaN or infinity): the input values are outside "
                            "the range the model computes in")
    return array
