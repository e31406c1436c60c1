"""A Triton Inference Server model repository for exported artifacts (one model per artifact)."""
from __future__ import annotations

import shutil
from pathlib import Path

from rmt_deploy.runners import get_backend

from .export import gate_backend

_FILENAMES = {"onnx": "model.onnx", "engine": "model.plan"}     # Triton's default model file per artifact kind
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}


def _dims(shape: list, batched: bool) -> str:
    dims = shape[1:] if batched else shape
    return ", ".join(str(d) if isinstance(d, int) and d > 0 else "-1" for d in dims)


def config_pbtxt(name: str, platform: str, inputs: list[dict], outputs: list[dict], max_batch: int,
                 preferred_batch: list[int], max_queue_delay_us: int = 2000, backend: str | None = None) -> str:
    """config.pbtxt text; batch dimension implicit when ``max_batch`` > 0 (Triton's convention).
    ``backend``: a Triton backend named by ``backend:`` instead of ``platform:`` (OpenVINO's)."""
    batched = max_batch > 0

    def tensors(kind: str, specs: list[dict]) -> str:
        items = [f'  {{\n    name: "{t["name"]}"\n    data_type: {_TYPES[t["dtype"]]}\n'
                 f'    dims: [ {_dims(t["shape"], batched)} ]\n  }}' for t in specs]
        return f"{kind} [\n" + ",\n".join(items) + "\n]\n"

    runtime = f'backend: "{backend}"' if backend else f'platform: "{platform}"'
    text = f'name: "{name}"\n{runtime}\nmax_batch_size: {max_batch}\n'
    text += tensors("input", inputs) + tensors("output", outputs)
    if batched:
        preferred = ", ".join(str(b) for b in preferred_batch if b <= max_batch)
        text += (f"dynamic_batching {{\n  preferred_batch_size: [ {preferred} ]\n"
                 f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n")
    engine_platform = get_backend(gate_backend("engine")).platform      # engines run on the GPU only
    kind = "KIND_GPU" if platform == engine_platform else "KIND_AUTO"
    return text + f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n"


def write_triton_repo(repo: str | Path, export_dir: str | Path, manifest: dict, report=lambda text: None) -> list[Path]:
    """One Triton model per artifact in the manifest: ``<repo>/<model>_<format>_<precision>/``. A QDQ
    int8 ONNX file is an ordinary ONNX model to Triton's onnxruntime backend; NNCF's OpenVINO IR goes to
    Triton's openvino backend (model.xml + model.bin). A runtime precision (bf16: an fp32 file computed in
    bfloat16) is not a file of its own and is left out with a ``report``."""
    repo, export_dir = Path(repo), Path(export_dir)
    written = []
    for art in manifest["artifacts"]:
        source = export_dir / art["path"]
        if art["precision"] == "bf16" and art["path"].endswith("_fp32.onnx"):
            report(f"Triton: {art.get('backend')} bf16 left out (a runtime precision of {art['path']}, not a file)")
            continue
        # the platform of the backend the artifact is for (rmt-export's gate runs it there): Triton's backend for it
        platform = get_backend(art.get("backend") or gate_backend(art["kind"])).platform
        name = f'{manifest["model"]}_{manifest["task"]}_{art["format"]}_{art["precision"]}'
        max_batch = art.get("max_batch") or 0      # static-batch artifacts: full shapes, no batching
        model_dir = repo / name
        (model_dir / "1").mkdir(parents=True, exist_ok=True)
        if source.suffix == ".xml":                 # an OpenVINO IR: its weights file travels with it
            shutil.copyfile(source, model_dir / "1" / "model.xml")
            shutil.copyfile(source.with_suffix(".bin"), model_dir / "1" / "model.bin")
        else:
            shutil.copyfile(source, model_dir / "1" / _FILENAMES[art["kind"]])
        preferred = sorted({b for b in (1, 4, 8, 16, 32, 64, max_batch) if 0 < b <= max_batch})
        (model_dir / "config.pbtxt").write_text(
            config_pbtxt(name, platform, art["inputs"], art["outputs"], max_batch, preferred,
                         backend=platform if source.suffix == ".xml" else None))
        written.append(model_dir)
    return written
