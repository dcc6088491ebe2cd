"""UNet part costs for balancing: the FLOP estimate for a consistent model group, uniform
costs only when the group's block lists disagree (a mutation survivor made every model
uniform, moving the cuts of ``nodes.denoise.split``)."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")

from mmpipe.graphs.diffusion_load import SDModel  # noqa: E402
from mmpipe.graphs.diffusion_loop import unet_costs  # noqa: E402
from mmpipe.graphs.diffusion_unet import unet_cost_estimate  # noqa: E402


def test_a_consistent_model_group_gets_the_flop_estimate() -> None:
    m = SDModel()  # 2 down blocks, 2 up blocks, channels [32, 64], attention [False, True]
    costs = unet_costs(m, 32)
    assert costs == unet_cost_estimate([32, 64], [False, True], 2, 32)
    assert len(costs) == 5 and len(set(costs)) > 1


@pytest.mark.parametrize("change", [{"unet_channels": [32]}, {"unet_attention": [False]}, {"unet_up_blocks": 3}, {"unet_down_blocks": 3}])
def test_disagreeing_block_lists_fall_back_to_uniform_costs(change: dict) -> None:
    m = SDModel(**change)
    n = m.unet_down_blocks + 1 + m.unet_up_blocks
    assert unet_costs(m, 32) == [1.0] * n


def test_the_model_groups_own_costs_win() -> None:
    assert unet_costs(SDModel(unet_costs=[1, 2, 3, 2, 1]), 32) == [1.0, 2.0, 3.0, 2.0, 1.0]
