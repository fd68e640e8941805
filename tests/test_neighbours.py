"""Nearest-neighbour search of the memory: the IVF index + pending buffer against a brute-force loop."""
import pytest
import torch
import torch.nn.functional as F

import pml_protoot.memory as memory_module
from pml_protoot.losses import ProtoOTLoss
from pml_protoot.memory import BankIndex, PrototypeMemory, exact_nearest_rows

DTYPES = [torch.float32, torch.float64]
DIM, K = 8, 3
DOMAINS = [0] * 120 + [1] * 90


def unit_rows(count, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(count, DIM, generator=generator, dtype=torch.float64), dim=1).to(dtype)


def brute_force_nearest(anchors, bank, own_rows):
    """The row r != own with the largest anchor . bank[r], by a plain loop in float64."""
    anchors, bank = anchors.cpu().double(), bank.cpu().double()
    nearest = []
    for anchor, own in zip(anchors, own_rows.tolist()):
        candidates = [r for r in range(len(bank)) if r != own]
        nearest.append(max(candidates, key=lambda r: float(anchor @ bank[r])))
    return nearest


def ready_memory(dtype, device, **options):
    memory = PrototypeMemory(DOMAINS, DIM, K, kmeans_nredo=1, **options).to(device=device, dtype=dtype)
    memory.fill(unit_rows(len(DOMAINS), 0, dtype).to(device), torch.arange(len(DOMAINS)))
    memory.recluster(epoch=0)
    return memory


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_exhaustive_probing_equals_brute_force_and_excludes_the_own_row(dtype, device):
    bank = unit_rows(150, 1, dtype).to(device)
    index = BankIndex(bank, nlist=6, nprobe=6, buffer_rows=64)
    own_rows = torch.tensor([0, 7, 42, 149, 3, 3], device=device)
    # Anchors equal to their own rows: the own row is the true maximum and must be skipped.
    anchors = torch.cat([bank[own_rows[:4]], unit_rows(2, 2, dtype).to(device)])
    rows = index.search(anchors, own_rows, bank)
    assert rows.device == own_rows.device
    assert rows.tolist() == brute_force_nearest(anchors, bank, own_rows.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_written_after_the_build_are_searched_exactly_with_their_new_values(dtype, device):
    memory = ready_memory(dtype, device, neighbour_search="ivf", ivf_nlist=10, ivf_nprobe=1)
    anchors = unit_rows(4, 3, dtype).to(device)
    own_rows = torch.tensor([0, 1, 2, 3], device=device)
    old_nearest = brute_force_nearest(anchors, memory.bank(0), own_rows.cpu())
    # Rows 50..53 become near copies of the anchors; the old nearest rows move far away.
    memory.fill(F.normalize(anchors + 0.01, dim=1), torch.arange(50, 54))
    moved = [row for row in old_nearest if row not in range(50, 54)]
    memory.fill(-anchors[: len(moved)], torch.tensor(moved))
    rows = memory.nearest_rows(0, anchors, own_rows)
    assert rows.tolist() == [50, 51, 52, 53] == brute_force_nearest(anchors, memory.bank(0), own_rows.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
def test_search_stays_exact_across_buffer_flushes_with_exhaustive_probing(dtype, device):
    memory = ready_memory(dtype, device, neighbour_search="ivf", ivf_nlist=5, ivf_nprobe=5, ivf_buffer_rows=12)
    generator = torch.Generator().manual_seed(4)
    for step in range(8):
        indices = torch.randperm(120, generator=generator)[:7]
        memory.fill(unit_rows(7, 10 + step, dtype).to(device), indices)
        bank_index = memory._bank_indexes[0]
        # Every row lives in exactly one place, the IVF or the pending buffer, also right after a flush.
        assert bank_index.index.ntotal + len(bank_index.pending) == 120, step
        own_rows = memory.row_of[indices.to(device)]
        anchors = unit_rows(7, 30 + step, dtype).to(device)
        rows = memory.nearest_rows(0, anchors, own_rows)
        assert rows.tolist() == brute_force_nearest(anchors, memory.bank(0), own_rows.cpu()), step
        pending = memory._bank_indexes[0].pending
        assert len(pending) <= 12 + 7 and set(own_rows.tolist()) <= set(pending.tolist())


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_with_exhaustive_ivf_equals_the_exact_loss(dtype, device):
    results = []
    for options in ({}, {"neighbour_search": "ivf", "ivf_nlist": 4, "ivf_nprobe": 4, "refresh_every": 1}):
        memory = ready_memory(dtype, device, **options)
        loss_func = ProtoOTLoss(memory, cross_domain_start_epoch=0)
        indices = torch.tensor([0, 3, 9, 120, 130, 200], device=device)
        queries, keys = unit_rows(6, 5, dtype).to(device), unit_rows(6, 6, dtype).to(device)
        results.append((loss_func(queries, indices, ref_emb=keys), memory.prototypes.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_auto_uses_the_index_from_the_size_threshold_and_load_state_dict_rebuilds_it(monkeypatch, device):
    monkeypatch.setattr(memory_module, "AUTO_IVF_MIN_ROWS", 100)  # domain 0 has 120 rows, domain 1 has 90
    # Every step of refresh_every=1 solves the OT over the whole bank: there, exact search is worth its cost.
    exact_steps = ready_memory(torch.float32, device, neighbour_search="auto")
    assert (exact_steps.uses_ivf(0), exact_steps.uses_ivf(1)) == (False, False) and exact_steps._bank_indexes == {}
    memory = ready_memory(torch.float32, device, neighbour_search="auto", ivf_nprobe=1000, refresh_every=2)
    assert (memory.uses_ivf(0), memory.uses_ivf(1)) == (True, False)
    assert set(memory._bank_indexes) == {0}
    restored = PrototypeMemory(DOMAINS, DIM, K, neighbour_search="auto", ivf_nprobe=1000, refresh_every=2).to(device)
    restored.load_state_dict(memory.state_dict())
    assert restored._bank_indexes == {}
    anchors, own_rows = unit_rows(5, 7).to(device), torch.arange(5, device=device)
    expected = brute_force_nearest(anchors, memory.bank(0), own_rows.cpu())
    assert restored.nearest_rows(0, anchors, own_rows).tolist() == expected
    assert set(restored._bank_indexes) == {0}
    memory.load_state_dict(restored.state_dict())
    assert memory._bank_indexes == {}


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"neighbour_search": "faiss"}, ValueError, "neighbour_search must be one of"),
        ({"ivf_nprobe": 0}, ValueError, "ivf_nprobe must be a positive integer"),
        ({"ivf_nlist": 2.5}, TypeError, "ivf_nlist must be a positive integer"),
        ({"ivf_buffer_rows": -3}, ValueError, "ivf_buffer_rows must be a positive integer"),
    ],
)
def test_bad_neighbour_options_name_the_argument(options, error, message):
    with pytest.raises(error, match=message):
        PrototypeMemory(DOMAINS, DIM, K, **options)


def test_bank_index_and_nearest_rows_reject_bad_input():
    bank = unit_rows(20, 8)
    with pytest.raises(ValueError, match="nlist must be at most the bank's 20 rows, got 21"):
        BankIndex(bank, nlist=21, nprobe=1, buffer_rows=8)
    with pytest.raises(ValueError, match=r"nprobe must be at most nlist \(4\), got 5"):
        BankIndex(bank, nlist=4, nprobe=5, buffer_rows=8)
    memory = ready_memory(torch.float32, "cpu", neighbour_search="ivf")
    with pytest.raises(ValueError, match="anchors must have shape"):
        memory.nearest_rows(0, torch.zeros(2, DIM + 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"domain \(a domain slot\) must be an integer"):
        memory.nearest_rows(2, torch.zeros(2, DIM), torch.tensor([0, 1]))


def test_exact_search_takes_the_first_of_tied_rows(device):
    """The brute-force reference (argmax) takes the first of equal scores; so must the search, whatever
    reduction it uses."""
    bank = unit_rows(20, 5, torch.float32).to(device)
    bank[[3, 9, 14]] = bank[11].clone()  # three copies of row 11, which is each anchor's own row
    anchors = bank[[11, 11]]
    own_rows = torch.tensor([11, 3], device=device)
    assert exact_nearest_rows(anchors, bank, own_rows).tolist() == [3, 9]
