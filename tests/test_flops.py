"""Parameter and multiply-add counts against the released layout, the spec and torch's flop counter."""
from __future__ import annotations

import torch
from conftest import TINY_CONFIG, random_released_state_dict
from reference_rmt import reference_forward

from rmt_deploy import VARIANTS
from rmt_deploy.flops import count_macs, count_params
from rmt_deploy.model import RMTConfig

torch.set_grad_enabled(False)


# ---- counting ----------------------------------------------------------------------------------

def test_parameter_counts_are_the_released_ones():
    expected = {"rmt_t": 14_334_216, "rmt_s": 26_967_240, "rmt_b": 54_154_896, "rmt_l": 95_464_864}
    assert {n: count_params(c) for n, c in VARIANTS.items()} == expected
    # the spec's table, in millions
    assert [round(count_params(VARIANTS[n]) / 1e6, 2) for n in expected] == [14.33, 26.97, 54.15, 95.46]


def test_mac_count_equals_flop_counter_on_the_spec_forward():
    from torch.utils.flop_counter import FlopCounterMode
    sd = random_released_state_dict(TINY_CONFIG, seed=6)
    for h, w in [(224, 224), (97, 131)]:
        with FlopCounterMode(display=False) as counter:
            reference_forward(sd, TINY_CONFIG, torch.randn(1, 3, h, w))
        assert count_macs(RMTConfig.from_dict(TINY_CONFIG), h, w)["total"] == counter.get_total_flops() // 2


def test_mac_counts_near_the_spec_figures():
    spec = {"rmt_t": 2.65, "rmt_s": 4.80, "rmt_b": 10.41, "rmt_l": 19.55}
    for name, g in spec.items():
        assert abs(count_macs(VARIANTS[name])["total"] / 1e9 - g) / g < 0.01
