"""Two gloo processes (spawned here, CPU) against one process with the same global batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pml_protoot.distributed import all_gather_rows, gather_strided, get_world_size
from pml_protoot.losses import ProtoOTLoss
from pml_protoot.memory import PrototypeMemory
from pml_protoot.samplers import CrossDomainSampler
from pml_protoot.testers import CrossDomainTester

WORLD_SIZE = 2
DOMAINS = [0] * 16 + [1] * 16
DIM_IN, DIM, K = 8, 4, 3
PER_RANK_BATCH = 8
STEPS = 2


def make_inputs():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(len(DOMAINS), DIM_IN, generator=generator)
    views = features + 0.1 * torch.randn(len(DOMAINS), DIM_IN, generator=generator)
    weight = torch.randn(DIM, DIM_IN, generator=generator) * 0.5
    return features, views, weight


def make_model(weight):
    model = torch.nn.Linear(DIM_IN, DIM, bias=False)
    with torch.no_grad():
        model.weight.copy_(weight)
    return model


def global_batches():
    """Per-step global batches: rank 0's block, then rank 1's (the all-gather order)."""
    sampler = CrossDomainSampler(DOMAINS, PER_RANK_BATCH, shuffle=True, seed=3)
    blocks = sampler.epoch_blocks()
    return [torch.cat([blocks[step * WORLD_SIZE + r] for r in range(WORLD_SIZE)]) for step in range(STEPS)]


def train(rank_indices):
    """A few ProtoOT steps of a linear model; ``rank_indices(step)`` gives this process's batch.

    Keys come from the current model without gradient (a momentum-free key encoder keeps
    the reference short). Returns banks, prototypes, the loss averaged over processes
    per step, and the trained weight.
    """
    features, views, weight = make_inputs()
    memory = PrototypeMemory(DOMAINS, DIM, K, kmeans_nredo=1, refresh_every=2)
    model = make_model(weight)
    trained = torch.nn.parallel.DistributedDataParallel(model) if get_world_size() > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    share = torch.arange(len(DOMAINS))[torch.arange(len(DOMAINS)) % get_world_size() == _rank()]
    with torch.no_grad():
        memory.fill(F.normalize(model(features[share]), dim=1), share)
    memory.recluster(epoch=0)
    loss_func = ProtoOTLoss(memory, cross_domain_start_epoch=0, cross_domain_weight=0.5)
    losses = []
    for step in range(STEPS):
        indices = rank_indices(step)
        with torch.no_grad():
            keys = F.normalize(model(features[indices]), dim=1)
        loss = loss_func(trained(views[indices]), indices, ref_emb=keys)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(all_gather_rows(loss.detach()[None]).mean())
    return {
        "banks": [memory.bank(slot).clone() for slot in range(memory.num_domains)],
        "prototypes": memory.prototypes.clone(),
        "losses": torch.stack(losses),
        "weight": model.weight.detach().clone(),
    }


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def domain_datasets():
    generator = torch.Generator().manual_seed(5)
    return {
        name: torch.utils.data.TensorDataset(torch.randn(size, DIM_IN, generator=generator),
                                             torch.randint(0, 3, (size,), generator=generator))
        for name, size in (("photo", 7), ("sketch", 10))
    }


def retrieval_scores(weight):
    tester = CrossDomainTester(dataloader_num_workers=0, batch_size=3)
    return tester.test(domain_datasets(), 0, make_model(weight))


def worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        batches = global_batches()
        state = train(lambda step: batches[step][rank * PER_RANK_BATCH : (rank + 1) * PER_RANK_BATCH])
        state["tester"] = retrieval_scores(make_inputs()[2])
        state["gathered"] = all_gather_rows(torch.full((rank + 1, 2), float(rank)))  # uneven row counts
        state["strided"] = gather_strided(torch.arange(rank, 5, WORLD_SIZE), 5)
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_states(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(str(folder / "init"), str(folder)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def test_two_processes_match_one_process_with_the_global_batch(two_process_states):
    batches = global_batches()
    single = train(lambda step: batches[step])
    for rank, state in enumerate(two_process_states):
        for slot, bank in enumerate(single["banks"]):
            assert torch.allclose(state["banks"][slot], bank, atol=1e-5), (rank, slot)
        assert torch.allclose(state["prototypes"], single["prototypes"], atol=1e-5), rank
        assert torch.allclose(state["losses"], single["losses"], atol=1e-5), rank
        assert torch.allclose(state["weight"], single["weight"], atol=1e-5), rank
    # The run did move things: the comparison is not between untouched copies.
    assert not torch.allclose(single["weight"], make_inputs()[2])


def test_two_process_tester_scores_equal_one_process(two_process_states):
    expected = retrieval_scores(make_inputs()[2])
    for state in two_process_states:
        assert state["tester"].keys() == expected.keys()
        for pair, metrics in expected.items():
            for metric, value in metrics.items():
                assert state["tester"][pair][metric] == pytest.approx(value, abs=1e-6), (pair, metric)


def test_gather_helpers_concatenate_in_rank_order(two_process_states):
    expected_rows = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for state in two_process_states:
        assert torch.equal(state["gathered"], expected_rows)
        assert state["strided"].tolist() == list(range(5))
