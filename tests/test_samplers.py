"""CrossDomainSampler: balanced blocks, coverage, determinism, passes, DDP shards, PML trainer use."""
from collections import Counter

import numpy
import pytest
import torch
from pytorch_metric_learning import losses, trainers

from pml_protoot.losses import ProtoOTLoss
from pml_protoot.memory import PrototypeMemory
from pml_protoot.samplers import CrossDomainSampler
from pml_protoot.trainers import ProtoOTTrainer

# Unequal domain sizes with non-contiguous ids, in shuffled positions.
SIZES = {0: 23, 3: 9, 7: 14}


def make_domains(sizes=SIZES, seed=0):
    domains = torch.cat([torch.full((n,), d) for d, n in sizes.items()])
    return domains[torch.randperm(len(domains), generator=torch.Generator().manual_seed(seed))]


def reference_num_blocks(sizes, batch_size, num_replicas):
    """Blocks per epoch written plainly: ceil(N_max / share), rounded up to a multiple of R."""
    share = batch_size // len(sizes)
    blocks = -(-max(sizes.values()) // share)
    while blocks % num_replicas:
        blocks += 1
    return blocks


def reference_pass(domains, batch_size, *, seed, epoch, pass_number=0, num_replicas=1, rank=0):
    """The documented algorithm written plainly, as a list of this rank's indices.

    The generator is seeded with 32 bits of ``SeedSequence([seed, epoch])`` for pass 0 (the
    single order per epoch of earlier releases) and of ``SeedSequence([seed, epoch],
    spawn_key=(p,))`` for pass ``p >= 1``; each domain, in ascending id order, draws whole
    ``randperm`` reshuffles until ``T * share`` indices exist; block ``t`` is the ``t``-th
    ``share`` of every domain in turn; rank ``r`` takes blocks ``r, r + R, ...``.
    """
    values = domains.tolist()
    ids = sorted(set(values))
    share = batch_size // len(ids)
    num_blocks = reference_num_blocks(Counter(values), batch_size, num_replicas)
    spawn_key = (pass_number,) if pass_number else ()
    state = numpy.random.SeedSequence([seed, epoch], spawn_key=spawn_key).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(state))
    streams = []
    for domain in ids:
        members = [i for i, value in enumerate(values) if value == domain]
        stream = []
        while len(stream) < num_blocks * share:
            stream += [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
        streams.append(stream)
    order = []
    for block in range(rank, num_blocks, num_replicas):
        for stream in streams:
            order += stream[block * share : (block + 1) * share]
    return order


def assert_valid_balanced_pass(order, domains, batch_size, sizes):
    """Blocks hold equal domain counts, the largest domain's first N_max entries are a permutation
    of it, and (single process) every sample appears."""
    order = torch.tensor(order)
    for block in order.view(-1, batch_size):
        counts = Counter(domains[block].tolist())
        assert set(counts) == set(sizes) and set(counts.values()) == {batch_size // len(sizes)}
    largest = max(sizes, key=sizes.get)
    first = order[domains[order] == largest][: sizes[largest]]
    assert sorted(first.tolist()) == torch.nonzero(domains == largest).flatten().tolist()
    assert set(order.tolist()) == set(range(len(domains)))


def batches_from_loader(sampler, batch_size, num_samples):
    dataset = torch.utils.data.TensorDataset(torch.arange(num_samples))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    return [batch[0] for batch in loader]


@pytest.mark.parametrize("batch_size", [3, 6, 12])
def test_every_dataloader_batch_holds_equal_domain_counts(batch_size):
    domains = make_domains()
    sampler = CrossDomainSampler(domains, batch_size, seed=1)
    batches = batches_from_loader(sampler, batch_size, len(domains))
    assert len(batches) * batch_size == len(sampler)
    for batch in batches:
        assert len(batch) == batch_size
        counts = Counter(domains[batch].tolist())
        assert set(counts) == set(SIZES)
        assert set(counts.values()) == {batch_size // len(SIZES)}


@pytest.mark.parametrize("batch_size,num_replicas", [(3, 1), (6, 1), (6, 2), (12, 3)])
def test_len_is_multiple_of_batch_size_and_matches_reference(batch_size, num_replicas):
    sampler = CrossDomainSampler(make_domains(), batch_size, num_replicas=num_replicas)
    expected_blocks = reference_num_blocks(SIZES, batch_size, num_replicas) // num_replicas
    assert len(sampler) % batch_size == 0
    assert len(sampler) == expected_blocks * batch_size == len(list(sampler))


def test_epoch_covers_largest_domain_once_and_every_sample_at_least_once():
    domains = make_domains()
    sampler = CrossDomainSampler(domains, 6, seed=3)
    order = torch.tensor(list(sampler))
    largest = max(SIZES, key=SIZES.get)
    largest_part = order[domains[order] == largest]
    # The first N_max of the largest domain are a permutation of it (the rest is padding).
    first = largest_part[: SIZES[largest]]
    assert sorted(first.tolist()) == torch.nonzero(domains == largest).flatten().tolist()
    assert set(order.tolist()) == set(range(len(domains)))


def test_smaller_domains_are_cycled_with_fresh_shuffles():
    domains = make_domains()
    sampler = CrossDomainSampler(domains, 3, seed=0)
    order = torch.tensor(list(sampler))
    small = order[domains[order] == 3].tolist()
    n = SIZES[3]
    cycles = [small[i : i + n] for i in range(0, len(small) - n + 1, n)]
    assert len(cycles) >= 2
    for cycle in cycles:
        assert sorted(cycle) == torch.nonzero(domains == 3).flatten().tolist()
    assert cycles[0] != cycles[1]


def test_same_seed_and_epoch_give_same_order_and_epochs_differ():
    domains = make_domains()
    a = CrossDomainSampler(domains, 6, seed=5)
    b = CrossDomainSampler(domains, 6, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    a.set_epoch(2)
    b.set_epoch(2)  # set_epoch restarts the epoch's passes: the same orders again
    assert [list(a), list(a)] == [list(b), list(b)]
    a.set_epoch(2)
    b.set_epoch(3)
    assert list(a) != list(b)
    other_seed = CrossDomainSampler(domains, 6, seed=6)
    other_seed.set_epoch(2)
    assert list(a) != list(other_seed)


@pytest.mark.parametrize("batch_size", [3, 6, 12])
def test_a_second_iteration_in_an_epoch_is_a_new_valid_balanced_pass(batch_size):
    domains = make_domains()
    sampler = CrossDomainSampler(domains, batch_size, seed=1)
    sampler.set_epoch(3)
    passes = [list(sampler) for _ in range(3)]
    for order in passes:
        assert len(order) == len(sampler)
        assert_valid_balanced_pass(order, domains, batch_size, SIZES)
    assert passes[0] != passes[1] and passes[1] != passes[2] and passes[0] != passes[2]
    # Through a DataLoader, as PML's trainers do when the data runs out mid-epoch.
    sampler.set_epoch(3)
    loader = torch.utils.data.DataLoader(torch.arange(len(domains)), batch_size=batch_size, sampler=sampler)
    assert [torch.cat(list(loader)).tolist() for _ in range(2)] == passes[:2]


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
@pytest.mark.parametrize("epoch", [0, 1, 5])
@pytest.mark.parametrize("num_replicas,rank", [(1, 0), (2, 1), (3, 0), (3, 2), (5, 4)])
# The second layout's first domain fills the pass exactly (12 = 6 blocks x 2): one shuffle, not two.
@pytest.mark.parametrize("sizes", [SIZES, {0: 12, 1: 8, 2: 12}], ids=["uneven", "one_domain_fills_the_pass"])
def test_passes_follow_the_documented_algorithm_and_the_first_is_the_old_single_order(
    seed, epoch, num_replicas, rank, sizes
):
    domains = make_domains(sizes)
    sampler = CrossDomainSampler(domains, 6, num_replicas=num_replicas, rank=rank, seed=seed)
    list(sampler)  # passes of an earlier epoch must not shift this epoch's
    sampler.set_epoch(epoch)
    for pass_number in range(3):
        expected = reference_pass(
            domains, 6, seed=seed, epoch=epoch, pass_number=pass_number, num_replicas=num_replicas, rank=rank
        )
        assert list(sampler) == expected, pass_number
    resumed = CrossDomainSampler(domains, 6, num_replicas=num_replicas, rank=rank)
    resumed.load_state_dict(sampler.state_dict())  # a loaded state starts the epoch's first pass
    assert list(resumed) == reference_pass(domains, 6, seed=seed, epoch=epoch, num_replicas=num_replicas, rank=rank)


@pytest.mark.parametrize("num_replicas", [2, 3])
def test_rank_shards_stay_disjoint_in_every_pass(num_replicas):
    sizes = {0: 24, 3: 9, 7: 14}
    domains = make_domains(sizes)
    samplers = [CrossDomainSampler(domains, 6, num_replicas=num_replicas, rank=r, seed=2) for r in range(num_replicas)]
    passes = []
    for _ in range(3):  # every rank makes the same number of passes
        shards = [torch.tensor(list(sampler)) for sampler in samplers]
        owned = [set(shard[domains[shard] == 0].tolist()) for shard in shards]
        assert sum(len(o) for o in owned) == sizes[0]
        assert set().union(*owned) == set(torch.nonzero(domains == 0).flatten().tolist())
        passes.append(torch.cat(shards).tolist())
    assert passes[0] != passes[1] != passes[2]


def test_state_dict_resumes_order():
    domains = make_domains()
    original = CrossDomainSampler(domains, 6, seed=11)
    original.set_epoch(4)
    resumed = CrossDomainSampler(domains, 6)
    resumed.load_state_dict(original.state_dict())
    assert resumed.state_dict() == {"epoch": 4, "seed": 11}
    assert list(resumed) == list(original)
    with pytest.raises(ValueError, match="epoch"):
        resumed.load_state_dict({"seed": 1})


def test_shuffle_false_keeps_index_order():
    domains = torch.tensor([1, 0, 1, 0, 1, 1])
    sampler = CrossDomainSampler(domains, 2, shuffle=False)
    # Reference: domain 0 = [1, 3] cycled, domain 1 = [0, 2, 4, 5]; blocks of one each.
    assert list(sampler) == [1, 0, 3, 2, 1, 4, 3, 5]


@pytest.mark.parametrize("num_replicas", [2, 3, 4])
def test_rank_shards_are_disjoint_equal_and_union_is_single_process_epoch(num_replicas):
    # 24 samples in the largest domain, share 2 -> 12 blocks: no padding for R in 2, 3, 4.
    sizes = {0: 24, 3: 9, 7: 14}
    domains = make_domains(sizes)
    batch_size = 6
    single = CrossDomainSampler(domains, batch_size, seed=2).epoch_blocks()
    shards = [
        torch.tensor(list(CrossDomainSampler(domains, batch_size, num_replicas=num_replicas, rank=r, seed=2)))
        for r in range(num_replicas)
    ]
    assert len({len(shard) for shard in shards}) == 1
    # Reference: deal the single-process blocks round-robin to ranks.
    for rank, shard in enumerate(shards):
        assert torch.equal(shard.view(-1, batch_size), single[rank::num_replicas])
    # The largest domain's samples (seen once per epoch) are split disjointly.
    owned = [set(s[domains[s] == 0].tolist()) for s in shards]
    assert sum(len(o) for o in owned) == sizes[0]
    assert set().union(*owned) == set(torch.nonzero(domains == 0).flatten().tolist())


def test_rank_shards_are_padded_to_equal_length():
    domains = make_domains()
    shards = [list(CrossDomainSampler(domains, 6, num_replicas=5, rank=r)) for r in range(5)]
    assert {len(shard) for shard in shards} == {reference_num_blocks(SIZES, 6, 5) // 5 * 6}


def test_never_reads_class_labels():
    class LabelFreeDomains:
        """Only domain ids are available; touching labels fails the test."""

        domain_ids = make_domains()

        @property
        def targets(self):
            raise AssertionError("the sampler read class labels")

        def __getitem__(self, index):
            raise AssertionError("the sampler read a sample")

    sampler = CrossDomainSampler(LabelFreeDomains().domain_ids, 6)
    assert len(list(sampler)) == len(sampler)


class RecordingDataset(torch.utils.data.Dataset):
    """Item ``i`` is ``(make_item(features[i]), i)``; ``fetched`` lists the indices read, in order."""

    def __init__(self, features, make_item):
        self.features, self.make_item, self.fetched = features, make_item, []

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index):
        self.fetched.append(index)
        return self.make_item(self.features[index]), index


def test_works_as_sampler_of_pml_metric_loss_only_trainer(device):
    domains = make_domains()
    n, dim, batch_size = len(domains), 4, 6
    features = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    dataset = RecordingDataset(features, lambda feature: feature)  # the global index stands in for the label
    sampler = CrossDomainSampler(domains, batch_size, seed=4)
    trunk = torch.nn.Linear(dim, 3).to(device)  # PML's trainers never move models; data goes to data_device
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": torch.nn.Identity()},
        optimizers={"trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=0.1)},
        batch_size=batch_size,
        loss_funcs={"metric_loss": losses.ContrastiveLoss()},
        dataset=dataset,
        sampler=sampler,
        iterations_per_epoch=2,
        data_device=device,
        dataloader_num_workers=0,
        end_of_epoch_hook=lambda t: sampler.set_epoch(t.epoch),
    )
    before = trunk.weight.detach().clone()
    trainer.train(num_epochs=1)
    assert sampler.epoch == 1
    expected = sampler_first_blocks(domains, batch_size, seed=4, count=2)
    assert dataset.fetched[: 2 * batch_size] == expected
    assert not torch.equal(before, trunk.weight)


def test_protoot_trainer_epoch_longer_than_one_pass_does_not_repeat_its_batches(device):
    # 32 samples in 2 domains, blocks of 8: one pass is 4 batches; the epoch is 2 passes.
    domains = torch.arange(2).repeat_interleave(16)
    n, dim, batch_size = len(domains), 4, 8
    features = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    two_views = RecordingDataset(features, lambda feature: (feature, feature))
    fetched = two_views.fetched
    torch.manual_seed(0)
    embedder = torch.nn.Linear(dim, 3).to(device)
    memory = PrototypeMemory(domains, dim=3, num_prototypes=2, kmeans_nredo=1)
    sampler = CrossDomainSampler(domains, batch_size, seed=4)
    trainer = ProtoOTTrainer(
        {"trunk": torch.nn.Identity(), "embedder": embedder},
        {"embedder_optimizer": torch.optim.SGD(embedder.parameters(), lr=0.1)},
        batch_size,
        {"metric_loss": ProtoOTLoss(memory)},
        two_views,
        memory,
        fill_dataset=torch.utils.data.TensorDataset(features, torch.zeros(n, dtype=torch.long)),
        sampler=sampler,
        iterations_per_epoch=8,
        data_device=torch.device(device),
        dataloader_num_workers=0,
    )
    fetched.clear()  # the trainer read item 0 when built, to check its layout
    trainer.train(1, 1)
    assert len(fetched) == 8 * batch_size
    first, second = fetched[: 4 * batch_size], fetched[4 * batch_size :]
    assert first != second  # the old sampler repeated batches 1-4 as batches 5-8
    for half in (first, second):
        assert_valid_balanced_pass(half, domains, batch_size, {0: 16, 1: 16})
    batches = torch.tensor(fetched).view(8, batch_size).sort(dim=1).values.tolist()
    assert len({tuple(batch) for batch in batches}) == 8  # no batch of the epoch repeats


def sampler_first_blocks(domains, batch_size, seed, count):
    return CrossDomainSampler(domains, batch_size, seed=seed).epoch_blocks()[:count].flatten().tolist()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(domains=[0, 0, 0], batch_size=2), ValueError, "at least two"),
        (dict(domains=[0, 1, 2], batch_size=4), ValueError, "divisible by the number of domains"),
        (dict(domains=[0, 1], batch_size=0), ValueError, "batch_size"),
        (dict(domains=[0.0, 1.0], batch_size=2), TypeError, "domains"),
        (dict(domains=[[0, 1]], batch_size=2), ValueError, "1-D"),
        (dict(domains=[0, 1], batch_size=2, num_replicas=2, rank=2), ValueError, "rank"),
        (dict(domains=[0, 1], batch_size=2, num_replicas=0), ValueError, "num_replicas"),
        (dict(domains=[0, 1], batch_size=2, seed=-1), ValueError, "seed"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    domains = kwargs.pop("domains")
    batch_size = kwargs.pop("batch_size")
    with pytest.raises(error, match=match):
        CrossDomainSampler(domains, batch_size, **kwargs)


def test_set_epoch_rejects_negative():
    with pytest.raises(ValueError, match="epoch"):
        CrossDomainSampler([0, 1], 2).set_epoch(-1)


def test_an_iterator_dropped_unread_uses_no_pass():
    """A multi-worker DataLoader without automatic batching makes its sampler's iterator twice and reads
    the second: the epoch must still start at its first pass."""
    domains = torch.tensor([0] * 6 + [1] * 10)
    sampler = CrossDomainSampler(domains, batch_size=4, seed=1)
    unread = iter(sampler)
    assert list(iter(sampler)) == sampler.epoch_blocks(0).flatten().tolist()
    assert list(unread) == sampler.epoch_blocks(1).flatten().tolist()  # taken when first read
    sampler.set_epoch(0)
    loader = torch.utils.data.DataLoader(torch.arange(16), batch_size=None, sampler=sampler, num_workers=2)
    assert [int(index) for index in loader] == sampler.epoch_blocks(0).flatten().tolist()
