"""Checkpoints: every released format, EMA or raw weights, config inference, strict and safe loading
with readable errors."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import TINY_CONFIG, random_released_state_dict
from model_helpers import rel_err, variant_dict
from reference_rmt import reference_forward

from rmt_deploy import CheckpointError, create_model

torch.set_grad_enabled(False)


# ---- checkpoint formats ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_weight_sets():
    return random_released_state_dict(TINY_CONFIG, seed=3), random_released_state_dict(TINY_CONFIG, seed=4)


def _logits(path, **kw):
    return create_model(TINY_CONFIG, checkpoint=str(path), **kw)(torch.ones(1, 3, 64, 64))


def test_deit_format_prefers_ema_and_can_choose_raw(tmp_path, two_weight_sets):
    raw, ema = two_weight_sets
    path = tmp_path / "deit.pth"
    torch.save({"model": raw, "model_ema": ema, "optimizer": {"state": {}}, "epoch": 299,
                "args": argparse.Namespace(model="custom", lr=1e-3), "max_accuracy": 84.1}, path)
    expect_ema = reference_forward(ema, TINY_CONFIG, torch.ones(1, 3, 64, 64))
    expect_raw = reference_forward(raw, TINY_CONFIG, torch.ones(1, 3, 64, 64))
    assert rel_err(_logits(path), expect_ema) <= 1e-5
    assert rel_err(_logits(path, weights="ema"), expect_ema) <= 1e-5
    assert rel_err(_logits(path, weights="model"), expect_raw) <= 1e-5
    assert create_model(TINY_CONFIG, checkpoint=str(path)).checkpoint["weights"] == "ema"


def test_rmt_t_defaults_to_raw_weights(tmp_path):
    """The published RMT-T accuracy is its raw weights; S/B/L are EMA."""
    from rmt_deploy.checkpoint import read_checkpoint
    a, b = {"x": torch.zeros(1)}, {"x": torch.ones(1)}
    path = tmp_path / "t.pth"
    torch.save({"model": a, "model_ema": b, "args": argparse.Namespace(model="RMT_T3")}, path)
    assert read_checkpoint(path).weights == "model"
    torch.save({"model": a, "model_ema": b, "args": argparse.Namespace(model="RMT_S")}, path)
    assert read_checkpoint(path).weights == "ema"


def test_timm_saver_mmdet_plain_and_module_prefix(tmp_path, two_weight_sets):
    raw, ema = two_weight_sets
    x = torch.ones(1, 3, 64, 64)
    want = reference_forward(raw, TINY_CONFIG, x)
    cases = {
        "timm": {"state_dict": raw, "arch": "custom", "epoch": 3, "version": 2, "args": argparse.Namespace()},
        "plain": raw,
        "module": {f"module.{k}": v for k, v in raw.items()},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        assert rel_err(_logits(tmp_path / f"{name}.pth"), want) <= 1e-5, name
    backbone = {f"backbone.{k}": v for k, v in raw.items() if not k.startswith(("proj.", "norm.", "head."))}
    norms = {f"backbone.extra_norms.{i}.{p}": torch.rand(c) for i, c in enumerate(TINY_CONFIG["embed_dims"])
             for p in ("weight", "bias")}
    det = {"meta": {"epoch": 12}, "state_dict": {**backbone, **norms, "neck.lateral.weight": torch.zeros(3),
                                                  "rpn_head.conv.weight": torch.zeros(3)}}
    torch.save(det, tmp_path / "det.pth")
    model = create_model(TINY_CONFIG, checkpoint=str(tmp_path / "det.pth"), features_only=True)
    sd = {k.removeprefix("backbone."): v for k, v in {**backbone, **norms}.items()}
    for got, ref in zip(model(x), reference_forward(sd, TINY_CONFIG, x, features=True)):
        assert rel_err(got, ref) <= 1e-5
    assert model.checkpoint["format"] == "mmdet"


def test_auto_variant_from_shapes_and_released_names(tmp_path):
    cfg = variant_dict("rmt_t", num_classes=1000)
    sd = random_released_state_dict(cfg, seed=5)
    path = tmp_path / "rmt_t.pth"
    torch.save({"model": sd, "args": argparse.Namespace(model="RMT_T3")}, path)
    assert create_model("auto", checkpoint=str(path)).config.name == "rmt_t"
    torch.save(sd, path)
    assert create_model("auto", checkpoint=str(path)).config.name == "rmt_t"


def test_unknown_architecture_needs_a_config(tmp_checkpoint_unknown):
    with pytest.raises(CheckpointError, match="matches no released variant"):
        create_model("auto", checkpoint=str(tmp_checkpoint_unknown))


def test_json_config_file_is_named_after_the_file(tmp_path):
    """rmt-export, rmt-serve and rmt-bench all pass --model through create_model: one name for one file."""
    (tmp_path / "my_rmt.json").write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "named.json").write_text(json.dumps({**TINY_CONFIG, "name": "rmt_small_det"}))
    assert create_model(str(tmp_path / "my_rmt.json")).config.name == "my_rmt"
    assert create_model(tmp_path / "named.json").config.name == "rmt_small_det"
    with pytest.raises(ValueError, match="not found"):
        create_model(str(tmp_path / "missing.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json must hold a JSON object"):
        create_model(str(tmp_path / "list.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json is not JSON"):
        create_model(str(tmp_path / "broken.json"))
    with pytest.raises(ValueError, match="unknown RMT variant 'rmt_xl'"):
        create_model("rmt_xl")


@pytest.fixture
def tmp_checkpoint_unknown(tmp_path, two_weight_sets):
    torch.save(two_weight_sets[0], tmp_path / "u.pth")
    return tmp_path / "u.pth"


# ---- strict, safe loading ---------------------------------------------------------------------

def test_wrong_variant_names_missing_unexpected_and_shapes(tiny_checkpoint):
    with pytest.raises(CheckpointError) as info:
        create_model("rmt_t", checkpoint=str(tiny_checkpoint))
    msg = str(info.value)
    assert "does not fit the rmt_t model" in msg
    assert "missing keys" in msg and "layers.2.blocks.2..7" in msg      # grouped, not a wall
    assert "wrong shapes" in msg and "patch_embed.proj.0.weight" in msg
    assert len(msg.splitlines()) < 60


def test_missing_and_unexpected_keys_are_reported(tmp_path, two_weight_sets):
    sd = dict(two_weight_sets[0])
    del sd["layers.1.blocks.0.ffn.fc1.weight"]
    sd["layers.1.blocks.0.ffn.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        create_model(TINY_CONFIG, checkpoint=str(tmp_path / "bad.pth"))
    assert "layers.1.blocks.0.ffn.fc1.weight" in str(info.value)
    assert "layers.1.blocks.0.ffn.extra.weight" in str(info.value)


def test_relpos_buffers_checked_and_rescaled_decay_accepted(tmp_path, two_weight_sets):
    sd = dict(two_weight_sets[0])
    sd["layers.0.Relpos.angle"] = sd["layers.0.Relpos.angle"] * 2
    torch.save(sd, tmp_path / "angle.pth")
    with pytest.raises(CheckpointError, match="Relpos buffers differ"):
        create_model(TINY_CONFIG, checkpoint=str(tmp_path / "angle.pth"))
    sd = dict(two_weight_sets[0])
    sd["layers.0.Relpos.decay"] = sd["layers.0.Relpos.decay"] * (224 / 384)   # fine-tuned at 384
    torch.save(sd, tmp_path / "decay.pth")
    x = torch.randn(1, 3, 64, 64)
    assert rel_err(create_model(TINY_CONFIG, checkpoint=str(tmp_path / "decay.pth"))(x),
                   reference_forward(sd, TINY_CONFIG, x)) <= 1e-5


class Payload:
    """Unpickling this would call os.system: weights-only loading must refuse it."""

    def __reduce__(self):
        import os
        return os.system, ("echo pwned > /dev/null",)


def test_code_executing_pickles_are_refused(tmp_path, two_weight_sets):
    path = tmp_path / "evil.pth"
    torch.save({"model": two_weight_sets[0], "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        create_model(TINY_CONFIG, checkpoint=str(path))


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError):
        create_model(TINY_CONFIG, checkpoint=str(tmp_path / "x.pth"))
    with pytest.raises(CheckpointError, match="not found"):
        create_model(TINY_CONFIG, checkpoint=str(tmp_path / "missing.pth"))
