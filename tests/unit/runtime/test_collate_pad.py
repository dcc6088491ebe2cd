"""``collate: pad`` ports: rows of different lengths pad to the longest with the port's
pad value (a sampled mutation session showed no runtime test collated one)."""
from __future__ import annotations

import torch

from mmpipe.dsl.plan import PortSpec
from mmpipe.runtime.batch import collate


def test_pad_to_the_longest_row_with_the_pad_value() -> None:
    spec = PortSpec("ids", "int64", ["B", "T"], collate="pad", pad_value=-1)
    out = collate([torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([5, 6])], spec)
    assert out.tolist() == [[1, 2, 3], [4, -1, -1], [5, 6, -1]]


def test_pad_leaves_equal_rows_alone_and_pads_the_last_axis() -> None:
    spec = PortSpec("x", "float32", ["B", "C", "T"], collate="pad", pad_value=0.5)
    same = [torch.zeros(2, 3), torch.ones(2, 3)]
    assert torch.equal(collate(same, spec), torch.stack(same))
    out = collate([torch.zeros(2, 1), torch.ones(2, 3)], spec)
    assert out.shape == (2, 2, 3) and out[0, :, 1:].eq(0.5).all() and out[0, :, 0].eq(0).all()
