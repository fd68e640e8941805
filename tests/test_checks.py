"""Integer and real arguments: every public class takes Python, NumPy and 0-d tensor numbers alike,
refuses bools (and floats where an integer is due), and names the argument, the expected range and
the value given."""
import numpy as np
import pytest
import torch

from pml_protoot import (
    CachedTwoViewDataset,
    CrossDomainSampler,
    FeatureCache,
    PrecisionAtKCalculator,
    PrototypeMemory,
    ProtoOTLoss,
    sinkhorn,
)
from pml_protoot._checks import check_int, check_number
from pml_protoot.data import make_synthetic_domains

INTEGERS = [3, np.int64(3), np.int32(3), torch.tensor(3)]


@pytest.mark.parametrize("value", INTEGERS)
def test_integers_of_every_kind_come_back_as_int(value):
    assert check_int("n", value, low=0, high=3) == 3 and type(check_int("n", value)) is int


@pytest.mark.parametrize(
    "value, low, high, error, message",
    [  # not integers: TypeError, as range(3.0) raises; integers out of range: ValueError
        (True, None, None, TypeError, "n must be an integer, got True"),
        (np.bool_(True), None, None, TypeError, "n must be an integer"),
        (3.0, None, None, TypeError, r"n must be an integer, got 3.0"),
        (torch.tensor(3.0), None, None, TypeError, r"n must be an integer, got tensor\(3.\)"),
        (torch.tensor([3]), None, None, TypeError, r"n must be an integer, got tensor\(\[3\]\)"),
        ("3", None, None, TypeError, "n must be an integer, got '3'"),
        (0, 1, None, ValueError, "n must be a positive integer, got 0"),
        (-1, 0, None, ValueError, "n must be a non-negative integer, got -1"),
        (1, 2, None, ValueError, "n must be an integer >= 2, got 1"),
        (4, 0, 3, ValueError, r"n must be an integer in \[0, 3\], got 4"),
        (np.int64(5), None, 3, ValueError, r"n must be an integer <= 3, got np.int64\(5\)"),
    ],
)
def test_other_values_are_refused_naming_the_argument_and_range(value, low, high, error, message):
    with pytest.raises(error, match=message):
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
    "build, error, message",
    [
        (lambda: PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=1, kmeans_seed=0.5),
         TypeError, r"kmeans_seed must be an integer in \[-2147483648, 2147483647\], got 0.5"),
        (lambda: PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=1, kmeans_seed=2**40),
         ValueError, r"kmeans_seed must be an integer in \[-2147483648, 2147483647\], got 1099511627776"),
        (lambda: PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=1).recluster(-1),
         ValueError, "epoch must be a non-negative"),
        (lambda: make_synthetic_domains(None, seed=-1), ValueError, "seed must be a non-negative integer, got -1"),
        (lambda: make_synthetic_domains(None, seed="3"), TypeError, "seed must be a non-negative integer, got '3'"),
        (lambda: CachedTwoViewDataset(torch.zeros(1, 4, 2), [0, 0, 1, 1]),
         ValueError, r"V >= 2 views, got \(1, 4, 2\)"),
        (lambda: CachedTwoViewDataset(torch.zeros(2, 4, 2), [0, 1]), ValueError, r"one domain per sample \(4\), got 2"),
        (lambda: CachedTwoViewDataset([[[0.0]], [[0.0]]], [0]), TypeError, r"\(V, N, F\) tensor .*, got list"),
        (lambda: CachedTwoViewDataset(torch.zeros(2, 4, 2), [0, 0, 1, 1], seed=1.5),
         TypeError, "seed must be a non-negative integer, got 1.5"),
        (lambda: CrossDomainSampler([0, 1], 2, num_replicas=2, rank=2),
         ValueError, r"rank must be an integer in \[0, 1\], got 2"),
        (lambda: CrossDomainSampler([0, 1], 2, seed=-1), ValueError, "seed must be an integer in"),
        (lambda: make_synthetic_domains(None, num_classes=0), ValueError, "num_classes must be an integer in"),
        (lambda: make_synthetic_domains(None, image_size=8), ValueError, "image_size must be an integer >= 16, got 8"),
        (lambda: FeatureCache(make_synthetic_domains(None, image_size=16), torch.nn.Identity(), train_view=str,
                              eval_view=str, num_views=1), ValueError, "num_views must be an integer >= 2, got 1"),
    ],
)
def test_public_integer_arguments_name_themselves_when_refused(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_the_sampler_refuses_a_shuffle_that_is_not_a_bool():
    with pytest.raises(TypeError, match="shuffle must be True or False, got 'no'"):
        CrossDomainSampler([0, 1], 2, shuffle="no")


@pytest.mark.parametrize("value", [0.5, np.float32(0.5), np.float64(0.5), torch.tensor(0.5), np.array(0.5)])
def test_real_numbers_of_every_kind_come_back_as_float(value):
    assert check_number("x", value, low=0, high=1) == 0.5 and type(check_number("x", value)) is float


@pytest.mark.parametrize(
    "value, options, error, message",
    [
        ("a", {}, TypeError, "x must be a real number, got str"),
        (True, {}, TypeError, "x must be a real number, got bool"),
        (torch.tensor([0.5]), {}, TypeError, "x must be a real number, got Tensor"),
        (1j, {}, TypeError, "x must be a real number, got complex"),
        (float("nan"), {}, ValueError, "x must be a finite number, got nan"),
        (float("inf"), {"low": 0}, ValueError, "x must be a finite number >= 0, got inf"),
        (0, {"low": 0, "strict": True}, ValueError, "x must be a finite number > 0, got 0"),
        (-0.1, {"low": 0}, ValueError, r"x must be a finite number >= 0, got -0.1"),
        (1.5, {"low": 0, "high": 1}, ValueError, r"x must be a finite number in \[0, 1\], got 1.5"),
        (0.0, {"low": 0, "high": 1, "strict": True}, ValueError, r"in \(0, 1\], got 0.0"),
        (2, {"high": 1}, ValueError, "x must be a finite number <= 1, got 2"),
    ],
)
def test_other_numbers_are_refused_naming_the_argument_and_range(value, options, error, message):
    with pytest.raises(error, match=message):
        check_number("x", value, **options)


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=1, epsilon="a"), TypeError,
         "epsilon must be a real number, got str"),
        (lambda: PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=1, epsilon=float("inf")), ValueError,
         "epsilon must be a finite number > 0, got inf"),
        (lambda: ProtoOTLoss(PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=2), temperature=-1), ValueError,
         "temperature must be a finite number > 0, got -1"),
        (lambda: sinkhorn(torch.rand(3, 2), epsilon=0), ValueError, "epsilon must be a finite number > 0, got 0"),
    ],
)
def test_public_real_arguments_name_themselves_when_refused(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_public_real_arguments_take_numpy_and_tensor_numbers():
    memory = PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=2, epsilon=np.float32(0.25))
    loss = ProtoOTLoss(memory, temperature=torch.tensor(0.5), cross_domain_weight=np.float64(0.75))
    assert (memory.epsilon, loss.temperature, loss.cross_domain_weight) == (0.25, 0.5, 0.75)


def test_an_empty_index_list_is_an_empty_integer_tensor():
    """torch.as_tensor([]) is float32: an empty list was refused as 'must hold integers, got dtype torch.float32'."""
    from pml_protoot._checks import as_index_tensor

    for empty in ([], ()):
        index = as_index_tensor("indices", empty)
        assert index.dtype == torch.long and index.shape == (0,)
    with pytest.raises(ValueError, match=r"domains must hold at least 2 distinct domain ids, got \[\]"):
        PrototypeMemory([], dim=2, num_prototypes=2)
    memory = PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=2)
    memory.fill(torch.nn.functional.normalize(torch.randn(4, 2), dim=1), torch.arange(4))
    memory.recluster(0)
    loss = ProtoOTLoss(memory)(torch.zeros(0, 2), [], ref_emb=torch.zeros(0, 2))  # an empty batch, as a list
    assert loss == 0


def test_index_arguments_of_names_say_what_they_hold():
    """Domain names as domains, or class names as labels: the message said 'a 1-D integer sequence, got list', which
    a list is, or repeated torch's conversion error naming no argument."""
    with pytest.raises(TypeError, match=r"^domains must be a 1-D integer sequence or tensor, got a list holding "
                                        r"str 'photo'$"):
        PrototypeMemory(["photo"] * 3 + ["sketch"] * 3, dim=2, num_prototypes=2)
    with pytest.raises(TypeError, match=r"^domains must be a 1-D integer sequence or tensor, got a tuple holding "
                                        r"str 'sketch'$"):
        CrossDomainSampler((0, 0, "sketch", "sketch"), batch_size=2)
    calculator = PrecisionAtKCalculator(k_values=(1,))
    embeddings = torch.randn(4, 3)
    with pytest.raises(TypeError, match=r"^query_labels must be a 1-D integer sequence or tensor, got a numpy array "
                                        r"of dtype <U3$"):
        calculator.get_accuracy(embeddings, np.array(["dog"] * 4), embeddings, np.arange(4))
    with pytest.raises(TypeError, match=r"^reference_labels must hold integers, got dtype torch.float64$"):
        calculator.get_accuracy(embeddings, np.arange(4), embeddings, np.arange(4.0))
    for labels in (np.arange(4, dtype=np.uint8), np.arange(4), list(range(4))):  # every integer kind still scores
        assert calculator.get_accuracy(embeddings, labels, embeddings, labels)["precision_at_1"] == 1


@pytest.mark.parametrize("indices", [np.array([3, 1, 0, 2])[::-1], np.array([2, 0, 1, 3], dtype=">i8"),
                                     np.array([2, 0, 1, 3], dtype=np.uint8)])
def test_numpy_indices_of_any_layout_are_taken(indices):
    """Reversed (argsort(...)[::-1]) and big-endian arrays were refused: torch takes neither as they are."""
    from pml_protoot._checks import as_index_tensor

    assert as_index_tensor("indices", indices).tolist() == [int(index) for index in indices]
    assert as_index_tensor("indices", np.array([])).dtype == torch.long  # an empty array holds no float to refuse
