"""Request and response models: they validate input and are what /docs shows."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class TimingMs(BaseModel):
    decode: float = Field(description="decode + preprocess")
    queue: float = Field(description="wait for the batch to start")
    infer: float = Field(description="runner time of the batch")
    total: float = Field(description="from request start to response")


class Prediction(BaseModel):
    index: int
    label: str
    score: float = Field(description="softmax probability")


class ClassifyResponse(BaseModel):
    model: str
    backend: str
    precision: str
    predictions: list[Prediction]
    embedding: list[float] | None = Field(None, description="with ?embedding=true: the pooled pre-head vector")
    timing_ms: TimingMs


class ClassifyBatchResponse(BaseModel):
    results: list[ClassifyResponse] = Field(description="one entry per uploaded file, in upload order")


class StageFeature(BaseModel):
    name: str
    stride: int
    shape: list[int] = Field(description="NCHW shape of the full array (?format=npz returns it)")
    pooled: list[float] = Field(description="global average over H and W: one value per channel")


class FeaturesResponse(BaseModel):
    model: str
    backend: str
    precision: str
    features: list[StageFeature]
    embedding: list[float] | None = Field(None, description="the classifier's pooled pre-head vector (models "
                                                            "with a head)")
    timing_ms: TimingMs


class HealthStatus(BaseModel):
    status: str


# Open Inference Protocol (KServe v2) -------------------------------------------------------------

class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    # an extension field in the style of KServe v2's other objects: what the model computes in
    # ("precision": fp32 | fp16 | bf16 | int8), the backend, and how it was quantized where it was
    parameters: dict[str, str] | None = None


class InferInputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(None, description="row-major values (flat or nested); omitted with binary data")


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInputTensor]
    outputs: list[RequestedOutput] | None = None


class InferOutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[InferOutputTensor]
