"""Integer arguments: every public class takes Python, NumPy and 0-d tensor integers alike, refuses
bools and floats, and names the argument, the expected range and the value given."""
import numpy as np
import pytest
import torch

from pml_protoot import CrossDomainSampler, FeatureCache, PrototypeMemory, ProtoOTLoss
from pml_protoot._checks import check_int
from pml_protoot.data import make_synthetic_domains

INTEGERS = [3, np.int64(3), np.int32(3), torch.tensor(3)]


@pytest.mark.parametrize("value", INTEGERS)
def test_integers_of_every_kind_come_back_as_int(value):
    assert check_int("n", value, low=0, high=3) == 3 and type(check_int("n", value)) is int


@pytest.mark.parametrize(
    "value, low, high, message",
    [
        (True, None, None, "n must be an integer, got True"),
        (np.bool_(True), None, None, "n must be an integer"),
        (3.0, None, None, r"n must be an integer, got 3.0"),
        (torch.tensor(3.0), None, None, r"n must be an integer, got tensor\(3.\)"),
        (torch.tensor([3]), None, None, r"n must be an integer, got tensor\(\[3\]\)"),
        ("3", None, None, "n must be an integer, got '3'"),
        (0, 1, None, "n must be a positive integer, got 0"),
        (-1, 0, None, "n must be a non-negative integer, got -1"),
        (1, 2, None, "n must be an integer >= 2, got 1"),
        (4, 0, 3, r"n must be an integer in \[0, 3\], got 4"),
        (np.int64(5), None, 3, r"n must be an integer <= 3, got np.int64\(5\)"),
    ],
)
def test_other_values_are_refused_naming_the_argument_and_range(value, low, high, message):
    with pytest.raises(ValueError, match=message):
        check_int("n", value, low=low, high=high)


def test_public_integer_arguments_take_numpy_and_tensor_integers():
    domains = [0, 0, 1, 1]
    memory = PrototypeMemory(domains, dim=2, num_prototypes=np.int64(2), kmeans_seed=np.int64(7))
    assert memory.kmeans_seed == 7 and type(memory.kmeans_seed) is int
    memory.fill(torch.nn.functional.normalize(torch.randn(4, 2), dim=1), torch.arange(4))
    memory.recluster(np.int64(0))
    assert int(memory.epoch) == 0 and memory.bank(np.int64(1)).shape == (2, 2)
    loss = ProtoOTLoss(memory, cross_domain_start_epoch=torch.tensor(2))
    assert loss.cross_domain_start_epoch == 2 and type(loss.cross_domain_start_epoch) is int
    sampler = CrossDomainSampler(domains, 2, num_replicas=2, rank=np.int64(1), seed=np.uint32(5))
    assert (sampler.rank, sampler.seed) == (1, 5)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=1, kmeans_seed=0.5),
         "kmeans_seed must be an integer, got 0.5"),
        (lambda: PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=1).recluster(-1), "epoch must be a non-negative"),
        (lambda: CrossDomainSampler([0, 1], 2, num_replicas=2, rank=2), r"rank must be an integer in \[0, 1\], got 2"),
        (lambda: CrossDomainSampler([0, 1], 2, seed=-1), "seed must be an integer in"),
        (lambda: make_synthetic_domains(None, num_classes=0), "num_classes must be an integer in"),
        (lambda: make_synthetic_domains(None, image_size=8), "image_size must be an integer >= 16, got 8"),
        (lambda: FeatureCache(make_synthetic_domains(None, image_size=16), torch.nn.Identity(), train_view=None,
                              eval_view=None, num_views=1), "num_views must be an integer >= 2, got 1"),
    ],
)
def test_public_integer_arguments_name_themselves_when_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()
