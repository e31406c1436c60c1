# GPU serving image: TensorRT + CUDA from NVIDIA's official container, rmt-serve as entrypoint.
# Build:  docker build -t rmt-serve .
# Run:    docker run --gpus all -p 8000:8000 -p 8001:8001 -v $PWD/exports:/models:ro rmt-serve \
#             --backend tensorrt --engine /models/rmt_t/rmt_t_fp16.engine
#         (rmt-export writes exports/<model>/<model>_<precision>.engine; RMT_HOST below binds all interfaces;
#         HTTP on 8000, KServe v2 gRPC on 8001 as in Triton: RMT_GRPC_PORT, empty to turn it off)
FROM nvcr.io/nvidia/tensorrt:25.01-py3

# MALLOC_ARENA_MAX: fewer glibc arenas keep the resident set from creeping up under a mix of batch
# sizes (each server thread's arena otherwise keeps its own freed blocks; figures: docs/benchmarks.md).
ENV PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=2 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RMT_HOST=0.0.0.0 \
    RMT_PORT=8000 \
    RMT_GRPC_PORT=8001 \
    RMT_DEVICE=cuda

WORKDIR /opt/rmt-deploy
COPY pyproject.toml README.md ./
COPY rmt_deploy ./rmt_deploy
COPY exporters ./exporters
COPY server ./server
COPY benchmarks ./benchmarks
COPY predict ./predict

# CUDA build of torch first so the package's torch pin is already satisfied by it.
RUN python -m pip install --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0 \
    && python -m pip install --no-cache-dir "./[gpu,grpc]" \
    && useradd --create-home --uid 10001 rmt

USER 10001
EXPOSE 8000 8001
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('RMT_PORT', '8000')}/readyz\", timeout=4)"]
ENTRYPOINT ["rmt-serve"]
