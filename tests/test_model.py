"""The RMT model: conformance vectors, fast path == spec, features, caches, torch.export."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import CONFORMANCE, TINY_CONFIG, random_released_state_dict
from model_helpers import rel_err, variant_dict
from reference_rmt import reference_forward

from rmt_deploy import VARIANTS, create_model

torch.set_grad_enabled(False)


needs_conformance = pytest.mark.skipif(not (CONFORMANCE / "tiny_cls.pth").is_file(),
                                       reason="../shared/conformance is not beside the checkout")


# ---- conformance vectors from the original implementation -------------------------------------

@needs_conformance
@pytest.mark.parametrize("name", ["tiny_cls", "tiny_tl"])
def test_conformance_logits(name):
    cfg = json.loads((CONFORMANCE / "tiny_config.json").read_text())
    model = create_model(cfg, checkpoint=str(CONFORMANCE / f"{name}.pth"))
    x = torch.from_numpy(np.load(CONFORMANCE / "input_cls.npy"))
    assert rel_err(model(x), np.load(CONFORMANCE / f"{name}_logits.npy")) <= 1e-5


@needs_conformance
def test_conformance_detection_features():
    cfg = json.loads((CONFORMANCE / "tiny_config.json").read_text())
    model = create_model(cfg, checkpoint=str(CONFORMANCE / "tiny_det.pth"), features_only=True)
    feats = model(torch.from_numpy(np.load(CONFORMANCE / "input_det.npy")))
    ref = np.load(CONFORMANCE / "tiny_det_features.npz")
    assert len(feats) == 4
    for i, f in enumerate(feats):
        assert rel_err(f, ref[f"stage{i}"]) <= 1e-5


# ---- fast fused path == plain spec formulation ------------------------------------------------

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fast_path_matches_spec_on_every_variant(name, tmp_path):
    # Full depth is not needed to prove each block type equal; one block per stage keeps it fast.
    cfg = variant_dict(name, depths=[1, 1, 2, 1], num_classes=17, projection=1024)
    sd = random_released_state_dict(cfg, seed=1)
    path = tmp_path / "w.pth"
    torch.save({"model": sd}, path)
    model = create_model(cfg, checkpoint=str(path))
    exported = copy.deepcopy(model).to_export_layout()
    for size in [(64, 64), (97, 131)]:
        x = torch.randn(2, 3, *size)
        want = reference_forward(sd, cfg, x)
        assert rel_err(model(x), want) <= 1e-5, size                # SDPA, complex rotary
        assert rel_err(exported(x), want) <= 1e-5, size             # SDPA, half-swap rotary
    graph = torch.export.export(model, (x,)).module()               # explicit attention, pair-swap rotary
    assert rel_err(graph(x), want) <= 1e-5


def test_fast_path_matches_spec_token_label_and_features(tmp_path):
    sd = random_released_state_dict(TINY_CONFIG, seed=2, token_label=True)
    path = tmp_path / "tl.pth"
    torch.save({"state_dict": sd, "arch": "custom"}, path)
    model = create_model(TINY_CONFIG, checkpoint=str(path))
    assert hasattr(model, "aux_head"), "token-label checkpoint not recognised"
    x = torch.randn(2, 3, 75, 101)
    assert rel_err(model(x), reference_forward(sd, TINY_CONFIG, x)) <= 1e-5
    feats = create_model(TINY_CONFIG, checkpoint=str(path), features_only=True)(x)
    for got, want in zip(feats, reference_forward(sd, TINY_CONFIG, x, features=True)):
        assert rel_err(got, want) <= 1e-5


def test_features_at_odd_and_detection_like_sizes(tiny_checkpoint):
    model = create_model(TINY_CONFIG, checkpoint=str(tiny_checkpoint), features_only=True)
    for h, w in [(97, 131), (200, 333), (64, 64)]:
        feats = model(torch.randn(1, 3, h, w))
        expected = []
        h, w = math.ceil(math.ceil(h / 2) / 2), math.ceil(math.ceil(w / 2) / 2)   # stem: two stride-2 convs
        for _ in range(4):
            expected.append((h, w))
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        assert [tuple(f.shape[2:]) for f in feats] == expected
        assert [f.shape[1] for f in feats] == TINY_CONFIG["embed_dims"]


def test_stride_four_then_ceil_halving(tiny_checkpoint):
    model = create_model(TINY_CONFIG, checkpoint=str(tiny_checkpoint), features_only=True)
    shapes = [tuple(f.shape[2:]) for f in model(torch.randn(1, 3, 97, 131))]
    assert shapes == [(25, 33), (13, 17), (7, 9), (4, 5)]


def test_decomposed_and_full_stages_both_cached_per_resolution(tiny_model):
    tiny_model(torch.randn(1, 3, 64, 64))
    caches = [len(stage.Relpos._cache) for stage in tiny_model.layers]
    tiny_model(torch.randn(1, 3, 64, 64))
    assert [len(stage.Relpos._cache) for stage in tiny_model.layers] == caches == [1, 1, 1, 1]


def test_torch_export_rmt_t_at_224():
    model = create_model("rmt_t").to_export_layout()
    with torch.inference_mode():
        model(torch.randn(1, 3, 224, 224))
    program = torch.export.export(model, (torch.randn(1, 3, 224, 224),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any(t.startswith(("aten.arange", "aten.sin", "aten.cos")) for t in targets), \
        "position tables rebuilt inside the graph"
    assert not any("copy_" in t or t.endswith("_.Tensor") for t in targets), "in-place op in the graph"
