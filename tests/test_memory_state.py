"""PrototypeMemory as a stored object: pickling, checkpoints of another sample layout, bad bank rows."""
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

from pml_protoot.losses import ProtoOTLoss
from pml_protoot.memory import PrototypeMemory

DIM, K = 6, 3
DOMAINS = [0] * 120 + [1] * 90
# A coarse IVF (1 probed list of 8, small buffer): its neighbours depend on the index's history,
# so a copy that rebuilt the index instead of keeping it would answer differently.
SEARCHES = {
    "exact": {"neighbour_search": "exact"},
    "ivf": {"neighbour_search": "ivf", "ivf_nlist": 8, "ivf_nprobe": 1, "ivf_buffer_rows": 16},
    "exact-refresh": {"neighbour_search": "exact", "refresh_every": 3},
    "ivf-refresh": {"neighbour_search": "ivf", "ivf_nlist": 8, "ivf_nprobe": 1, "ivf_buffer_rows": 16,
                    "refresh_every": 3},
}


def unit_rows(count, seed):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(count, DIM, generator=generator), dim=1)


def used_memory(device, **options):
    """A reclustered memory whose IVF (if any) has rows moved to its buffer and flushed back."""
    memory = PrototypeMemory(DOMAINS, DIM, K, kmeans_nredo=1, **options).to(device)
    memory.fill(unit_rows(len(DOMAINS), 0).to(device), torch.arange(len(DOMAINS)))
    memory.recluster(epoch=0)
    for step in range(3):
        training_step(memory, seed=10 + step)
    return memory


def training_step(memory, seed):
    """What ProtoOTLoss asks of the memory in one step; returns every output."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(DOMAINS), generator=generator)[:24]
    keys = unit_rows(24, seed).to(memory.bank(0).device)
    memory.fill(keys, indices)
    outputs = []
    for slot, positions, rows in memory.split_by_domain(indices):
        outputs.append(memory.step_pseudo_labels(slot, rows))
        outputs.append(memory.cross_pseudo_labels(slot, 1 - slot, rows))
        outputs.append(memory.nearest_rows(slot, keys[positions], rows))
    return outputs


def assert_same_state(copied, original):
    assert copied.state_dict().keys() == original.state_dict().keys()
    for name, buffer in original.state_dict().items():
        assert torch.equal(copied.state_dict()[name], buffer), name


def assert_same_behaviour(copied, original):
    assert_same_state(copied, original)
    for seed in range(20, 26):  # enough writes to flush the 16-row IVF buffers again
        for got, expected in zip(training_step(copied, seed), training_step(original, seed)):
            assert torch.equal(got, expected)
    assert_same_state(copied, original)


def torch_round_trip(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("round_trip", [lambda m: pickle.loads(pickle.dumps(m)), torch_round_trip])
def test_a_pickled_memory_behaves_like_the_original(search, round_trip, device):
    memory = used_memory(device, **SEARCHES[search])
    copied = round_trip(memory)
    assert set(copied._bank_indexes) == set(memory._bank_indexes)
    assert_same_behaviour(copied, memory)


@pytest.mark.parametrize("search", ["exact", "ivf"])
def test_a_saved_loss_holding_a_memory_gives_the_same_losses(search, device):
    loss_func = ProtoOTLoss(used_memory(device, **SEARCHES[search]), cross_domain_start_epoch=0)
    copied = torch_round_trip(loss_func)
    for seed in range(30, 34):
        indices = torch.randperm(len(DOMAINS), generator=torch.Generator().manual_seed(seed))[:16].to(device)
        queries, keys = unit_rows(16, seed).to(device), unit_rows(16, seed + 100).to(device)
        assert torch.equal(copied(queries, indices, ref_emb=keys), loss_func(queries, indices, ref_emb=keys))
    assert_same_state(copied.memory, loss_func.memory)


def layout(domains):
    """(domain id, rank among that domain's samples) of every global index, by a plain loop."""
    seen = {}
    places = []
    for domain in domains:
        places.append((domain, seen.get(domain, 0)))
        seen[domain] = seen.get(domain, 0) + 1
    return places


def saved_state(domains):
    memory = PrototypeMemory(domains, DIM, 2, kmeans_nredo=1)
    memory.fill(unit_rows(len(domains), 1), torch.arange(len(domains)))
    memory.recluster(epoch=0)
    return memory.state_dict()


@pytest.mark.parametrize(
    "saved_domains, new_domains",
    [
        ([1] * 10 + [0] * 8 + [1] * 2, [0] * 8 + [1] * 12),  # same bank sizes, files reordered
        ([0] * 8 + [1] * 12, [0] * 8 + [2] * 12),  # same order, another domain id
        ([0, 1] * 10, [1, 0] * 10),  # every sample moves
    ],
)
def test_load_state_dict_refuses_another_sample_layout(saved_domains, new_domains):
    differing = sum(a != b for a, b in zip(layout(saved_domains), layout(new_domains)))
    memory = PrototypeMemory(new_domains, DIM, 2)
    before = {name: buffer.clone() for name, buffer in memory.state_dict().items()}
    with pytest.raises(ValueError, match=rf"another sample order/domain assignment.*: {differing} of 20 indices"):
        memory.load_state_dict(saved_state(saved_domains))
    for name, buffer in memory.state_dict().items():
        assert torch.equal(buffer, before[name]), name
    loss_func = ProtoOTLoss(PrototypeMemory(new_domains, DIM, 2))  # nested: the "memory." prefix
    with pytest.raises(ValueError, match=f"{differing} of 20 indices"):
        loss_func.load_state_dict({"memory." + name: value for name, value in saved_state(saved_domains).items()})


def test_load_state_dict_refuses_another_sample_count_and_accepts_the_same_layout():
    memory = PrototypeMemory([0] * 8 + [1] * 13, DIM, 2)
    with pytest.raises(ValueError, match="20 sample indices, but this memory's domains give 21"):
        memory.load_state_dict(saved_state([0] * 8 + [1] * 12))
    same = PrototypeMemory([1] * 10 + [0] * 8 + [1] * 2, DIM, 2)
    same.load_state_dict(saved_state([1] * 10 + [0] * 8 + [1] * 2))
    assert int(same.epoch) == 0


def ready_memory(**options):
    memory = PrototypeMemory([0] * 8 + [1] * 12, DIM, 2, kmeans_nredo=1, **options)
    memory.fill(unit_rows(20, 2), torch.arange(20))
    memory.recluster(epoch=0)
    return memory


ROW_CALLS = {
    "step_pseudo_labels": lambda memory, rows: memory.step_pseudo_labels(0, rows),
    "cross_pseudo_labels": lambda memory, rows: memory.cross_pseudo_labels(0, 1, rows),
    "nearest_rows": lambda memory, rows: memory.nearest_rows(0, unit_rows(len(rows), 3), rows),
}


@pytest.mark.parametrize("method", ROW_CALLS)
@pytest.mark.parametrize("refresh_every", [1, 3])
@pytest.mark.parametrize("bad_row", [8, 100, -1])  # domain 0 has 8 rows; -1 would silently wrap
def test_bad_bank_rows_are_named_and_change_nothing(method, refresh_every, bad_row):
    memory = ready_memory(refresh_every=refresh_every)
    before = {name: buffer.clone() for name, buffer in memory.state_dict().items()}
    name = "own_rows" if method == "nearest_rows" else "rows"
    message = rf"{name} \(bank rows of domain slot 0\) must lie in \[0, 8\), got \[{bad_row}\]"
    with pytest.raises(ValueError, match=message):
        ROW_CALLS[method](memory, torch.tensor([0, bad_row]))
    for buffer_name, buffer in memory.state_dict().items():
        assert torch.equal(buffer, before[buffer_name]), buffer_name


@pytest.mark.parametrize("method", ROW_CALLS)
def test_rows_must_be_a_1d_integer_sequence(method):
    memory = ready_memory()
    with pytest.raises(TypeError, match="must hold integers, got dtype torch.float32"):
        ROW_CALLS[method](memory, torch.tensor([0.0, 1.0]))
    # a plain list of valid rows is accepted and answers like the tensor
    assert torch.equal(ROW_CALLS[method](ready_memory(), [0, 7]), ROW_CALLS[method](ready_memory(), torch.tensor([0, 7])))


def test_nearest_rows_needs_one_own_row_per_anchor():
    with pytest.raises(ValueError, match=r"own_rows must hold one row per anchor \(3\), got 2"):
        ready_memory().nearest_rows(0, unit_rows(3, 4), torch.tensor([0, 1]))
