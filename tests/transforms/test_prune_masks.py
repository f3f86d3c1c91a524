"""The pruning masks on tensors: exact counts, the 2:4 layout, rows by L2 norm, determinism, dtypes."""

from __future__ import annotations

import pytest
import torch

from llmconv.errors import Unsupported, UsageError
from llmconv.transforms.prune import check_sparsity, pattern_holds, prune_tensor


def _w(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9])
def test_unstructured_zeroes_exactly_the_smallest_fraction(sparsity):
    w = _w(32, 48)
    out = prune_tensor(w, sparsity=sparsity, pattern="unstructured")
    k = round(sparsity * w.numel())
    assert int((out == 0).sum()) == k
    kept = out != 0
    assert torch.equal(out[kept], w[kept])  # survivors are untouched
    if 0 < k < w.numel():
        assert w[~kept].abs().max() <= w[kept].abs().min()


def test_unstructured_breaks_ties_by_position_and_is_deterministic():
    w = torch.ones(4, 4)
    a = prune_tensor(w, sparsity=0.25, pattern="unstructured")
    b = prune_tensor(w, sparsity=0.25, pattern="unstructured")
    assert torch.equal(a, b)
    assert a.reshape(-1)[:4].tolist() == [0.0] * 4 and int((a == 0).sum()) == 4


@pytest.mark.parametrize("in_axis", [0, 1])
def test_two_four_has_exactly_two_zeros_in_every_group_of_four_along_the_input(in_axis):
    w = _w(24, 40)
    out = prune_tensor(w, sparsity=0.5, pattern="2:4", in_axis=in_axis)
    groups = (out == 0).movedim(in_axis, -1).reshape(-1, 4)
    assert groups.sum(dim=1).tolist() == [2] * groups.shape[0]
    # The two zeroed in each group are its two smallest magnitudes.
    mags = w.abs().movedim(in_axis, -1).reshape(-1, 4)
    zeroed = (out == 0).movedim(in_axis, -1).reshape(-1, 4)
    assert bool((mags[zeroed].reshape(-1, 2).max(dim=1).values <= mags[~zeroed].reshape(-1, 2).min(dim=1).values).all())
    assert pattern_holds(out, sparsity=0.5, pattern="2:4", in_axis=in_axis)
    # Along the other axis the groups are not 2:4 in general: the axis matters.
    assert not pattern_holds(out, sparsity=0.5, pattern="2:4", in_axis=1 - in_axis)


def test_two_four_example_from_the_docstring():
    out = prune_tensor(torch.tensor([[1.0, -4.0, 2.0, 3.0]]), sparsity=0.5, pattern="2:4")
    assert out.tolist() == [[0.0, -4.0, 0.0, 3.0]]


def test_two_four_refuses_an_input_dimension_not_a_multiple_of_four():
    with pytest.raises(Unsupported, match=r"tensor 'w' has 6 input features, not a multiple of 4.*--exclude 'w'"):
        prune_tensor(_w(8, 6), sparsity=0.5, pattern="2:4", in_axis=1, name="w")


@pytest.mark.parametrize("in_axis", [0, 1])
def test_rows_zero_whole_output_rows_with_the_smallest_l2_norm(in_axis):
    w = _w(16, 12) if in_axis == 1 else _w(12, 16)  # 16 output rows either way
    out = prune_tensor(w, sparsity=0.25, pattern="rows", in_axis=in_axis)
    assert out.shape == w.shape
    rows = out.movedim(1 - in_axis, 0)  # [out, in]
    zero_rows = torch.all(rows == 0, dim=1)
    assert int(zero_rows.sum()) == 4
    norms = w.movedim(1 - in_axis, 0).norm(dim=1)
    assert set(torch.nonzero(zero_rows).flatten().tolist()) == set(torch.argsort(norms)[:4].tolist())
    assert torch.equal(rows[~zero_rows], w.movedim(1 - in_axis, 0)[~zero_rows])
    assert pattern_holds(out, sparsity=0.25, pattern="rows", in_axis=in_axis)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_pruning_keeps_dtype_and_shape(dtype):
    w = _w(8, 16).to(dtype)
    for pattern in ("unstructured", "2:4", "rows"):
        out = prune_tensor(w, sparsity=0.5, pattern=pattern)
        assert out.dtype == dtype and out.shape == w.shape
        assert pattern_holds(out, sparsity=0.5, pattern=pattern, in_axis=1)


def test_source_tensor_is_not_modified():
    w = _w(8, 8)
    before = w.clone()
    prune_tensor(w, sparsity=0.5, pattern="unstructured")
    assert torch.equal(w, before)


def test_pattern_check_detects_an_unpruned_tensor():
    w = _w(8, 8)
    assert not pattern_holds(w, sparsity=0.5, pattern="unstructured", in_axis=1)
    assert not pattern_holds(w, sparsity=0.5, pattern="2:4", in_axis=1)
    assert not pattern_holds(w, sparsity=0.25, pattern="rows", in_axis=1)


def test_sparsity_rules():
    assert check_sparsity(None, "2:4") == 0.5
    assert check_sparsity(0.5, "2:4") == 0.5
    assert check_sparsity(0.3, "rows") == 0.3
    with pytest.raises(UsageError, match="2:4 zeroes exactly half"):
        check_sparsity(0.7, "2:4")
    with pytest.raises(UsageError, match="needs --sparsity"):
        check_sparsity(None, "unstructured")
    with pytest.raises(UsageError, match="not a fraction"):
        check_sparsity(1.0, "unstructured")
    with pytest.raises(UsageError, match="unknown --pattern 'blocks'"):
        check_sparsity(0.5, "blocks")


def test_one_dimensional_tensors_are_refused():
    with pytest.raises(Unsupported, match="pruning takes 2-D weights"):
        prune_tensor(torch.ones(8), sparsity=0.5, pattern="unstructured")
