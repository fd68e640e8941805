"""The shared tensor helpers against plain loops."""
import pytest
import torch

from pml_protoot._tensors import one_hot_mask, one_hot_row_sums, sum_rows_by_group


def naive_row_sums(values, groups, num_groups):
    sums = [[0.0] * values.shape[1] for _ in range(num_groups)]
    for row, group in zip(values.double().tolist(), groups.tolist()):
        sums[group] = [total + value for total, value in zip(sums[group], row)]
    return torch.tensor(sums, dtype=torch.float64)


def grouped_rows(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(500, 6, generator=generator, dtype=torch.float64).to(dtype)
    groups = torch.randint(0, 7, (500,), generator=generator)
    groups[groups == 5] = 4  # group 5 stays empty: its sum is a row of zeros
    return values, groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("summer", [sum_rows_by_group, one_hot_row_sums], ids=["dispatch", "one_hot"])
def test_row_sums_by_group_match_a_loop(summer, dtype, device):
    values, groups = grouped_rows(dtype)
    sums = summer(values.to(device), groups.to(device), 8)  # group 7 beyond the largest id: zeros too
    assert sums.dtype == dtype and sums.device.type == torch.device(device).type and sums.shape == (8, 6)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(sums.cpu().double(), naive_row_sums(values, groups, 8), atol=tolerance, rtol=0)


def test_row_sums_by_group_give_the_same_bits_on_every_call(device):
    """CUDA's index_add_ adds with atomics in a varying order; the sums a memory caches must not vary."""
    values, groups = grouped_rows(torch.float32, seed=1)
    values, groups = values.repeat(40, 1).to(device), groups.repeat(40).to(device)  # many rows per group
    first = sum_rows_by_group(values, groups, 7)
    assert all(torch.equal(sum_rows_by_group(values, groups, 7), first) for _ in range(5))


def test_one_hot_mask_is_torchs_one_hot_as_booleans(device):
    classes = torch.tensor([2, 0, 4, 2, 1], device=device)
    expected = torch.nn.functional.one_hot(classes, 6).bool()
    assert torch.equal(one_hot_mask(classes, 6), expected)
    assert one_hot_mask(classes[:0], 6).shape == (0, 6)
