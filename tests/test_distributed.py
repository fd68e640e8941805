"""Two gloo processes (spawned here, CPU) against one process with the same global batch."""
import logging
import operator
import os
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pml_protoot.data import TwoViewDataset
from pml_protoot.distributed import all_gather_objects, all_gather_rows, gather_strided, get_world_size
from pml_protoot.losses import ProtoOTLoss
from pml_protoot.memory import PrototypeMemory
from pml_protoot.miners import ProtoOTMiner
from pml_protoot.samplers import CrossDomainSampler
from pml_protoot.testers import CrossDomainTester
from pml_protoot.trainers import ProtoOTTrainer

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


def domain_datasets(sizes=(("photo", 7), ("sketch", 10))):
    generator = torch.Generator().manual_seed(5)
    return {
        name: torch.utils.data.TensorDataset(torch.randn(size, DIM_IN, generator=generator),
                                             torch.randint(0, 3, (size,), generator=generator))
        for name, size in sizes
    }


TINY_DOMAINS = (("photo", 1), ("sketch", 5))  # photo has fewer images than there are ranks


def retrieval_scores(weight, sizes=(("photo", 7), ("sketch", 10))):
    tester = CrossDomainTester(dataloader_num_workers=0, batch_size=3)
    return tester.test(domain_datasets(sizes), 0, make_model(weight))


TRAINER_EPOCHS = 2
HIDDEN = 6


def run_trainer(freeze_trunk=False):
    """Train :func:`make_trainer` for ``TRAINER_EPOCHS``; return everything the runs must share."""
    trainer, losses = make_trainer(freeze_trunk)
    initial = {k: v.clone() for k, v in trainer.query_encoder.state_dict().items()}
    trainer.train(1, TRAINER_EPOCHS)
    memory = trainer.memory
    return {
        "initial": initial,
        "wrapped_in_ddp": trainer.distributed_query_encoder is not None,
        "banks": [memory.bank(slot).clone() for slot in range(memory.num_domains)],
        "prototypes": memory.prototypes.clone(),
        "class_marginals": memory.class_marginals.clone(),
        "losses": torch.stack(losses),
        "query_encoder": {k: v.clone() for k, v in trainer.query_encoder.state_dict().items()},
        "key_encoder": {k: v.clone() for k, v in trainer.key_encoder.module.state_dict().items()},
    }


def make_trainer(freeze_trunk=False, **kwargs):
    """``ProtoOTTrainer`` on a linear trunk + linear embedder, on this process's share, and the
    list that collects its per-step losses (averaged over processes).

    The sampler shards per-rank blocks of ``PER_RANK_BATCH``: rank ``r`` trains on blocks
    ``r, r + W, ...``, so global step ``t`` is blocks ``W t .. W t + W - 1``. One process
    with ``batch_size = W * PER_RANK_BATCH`` over the unsharded blocks sees exactly that
    global batch, in the same order. Views are fixed (query = noisy copy, key = clean
    feature) so both runs read identical data. Every rank's batch holds the same number
    of samples of each domain, so the mean of the ranks' ProtoOT losses (sum over domains
    of per-domain means) is the global batch's loss, and DDP's gradient average is its
    gradient. ``kwargs`` go to the trainer.
    """
    world_size, rank = get_world_size(), _rank()
    features, views, _ = make_inputs()
    generator = torch.Generator().manual_seed(1)
    trunk = torch.nn.Linear(DIM_IN, HIDDEN)
    embedder = torch.nn.Linear(HIDDEN, DIM)
    with torch.no_grad():
        for parameter in [*trunk.parameters(), *embedder.parameters()]:
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    memory = PrototypeMemory(DOMAINS, DIM, K, kmeans_nredo=1)
    loss_func = ProtoOTLoss(memory, cross_domain_start_epoch=0, cross_domain_weight=0.5)
    trained = [embedder] if freeze_trunk else [trunk, embedder]
    optimizer = torch.optim.SGD([p for model in trained for p in model.parameters()], lr=0.5)
    losses = []

    def record_loss(trainer):  # a collective: every rank records every step
        losses.append(all_gather_rows(trainer.losses["total_loss"].detach()[None]).mean())

    trainer = ProtoOTTrainer(
        {"trunk": trunk, "embedder": embedder},
        {"embedder_optimizer": optimizer},
        PER_RANK_BATCH * (WORLD_SIZE // world_size),
        {"metric_loss": loss_func},
        TwoViewDataset(
            torch.utils.data.TensorDataset(torch.stack([views, features], dim=1), torch.zeros(len(DOMAINS))),
            operator.itemgetter(0),
            operator.itemgetter(1),
        ),
        memory,
        momentum=0.5,
        sampler=CrossDomainSampler(DOMAINS, PER_RANK_BATCH, num_replicas=world_size, rank=rank, seed=3),
        fill_dataset=torch.utils.data.TensorDataset(features, torch.zeros(len(DOMAINS))),
        freeze_these=("trunk",) if freeze_trunk else (),
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
        end_of_iteration_hook=record_loss,
        **kwargs,
    )
    return trainer, losses


def add_noise(views):
    """A random ``batch_transform``: its draws come from each process's own torch RNG."""
    return views + 0.3 * torch.randn_like(views)


def resumed_and_uninterrupted(folder):
    """Query encoders after two epochs of a run whose ranks are seeded apart and draw noise:
    continued in the same process, and resumed from the epoch-1 checkpoint by a new trainer
    after every RNG was reseeded (as in a fresh process)."""
    torch.manual_seed(100 + _rank())
    trainer, _ = make_trainer(batch_transform=add_noise, checkpoint_dir=str(folder))
    trainer.train(1, 1)
    if _rank() == 0:
        os.replace(folder / "last.pth", folder / "epoch1.pth")
    dist.barrier()
    trainer.train(2, 2)
    torch.manual_seed(999)
    resumed, _ = make_trainer(batch_transform=add_noise)
    resumed.train(resumed.load_checkpoint(folder / "epoch1.pth"), 2)
    return {name: trainer.query_encoder.state_dict() for name, trainer in
            (("uninterrupted", trainer), ("resumed", resumed))}


def checkpoint_on_rank_0_only(folder):
    """``checkpoint_dir`` on rank 0 alone (only rank 0 writes anyway): trains, and the checkpoint holds
    rank 0's random states only; returns the checkpoint's ``"rank_states"``."""
    trainer, _ = make_trainer(checkpoint_dir=str(folder / "rank0") if _rank() == 0 else None)
    trainer.train(1, 1)
    dist.barrier()
    return torch.load(folder / "rank0" / "last.pth", weights_only=True)["rank_states"]


SPLIT_STEPS = 3


def split_domain_memory(refresh_every, mode, steps=SPLIT_STEPS):
    """Memory state after steps whose batch on rank ``r`` holds domain ``r`` only (one process:
    both), through the loss or the prototype-updating miner. Keys are fixed (the features), so
    the global batch alone decides the state: every rank must end where one process does."""
    features, views, _ = make_inputs()
    keys = F.normalize(features, dim=1)
    memory = PrototypeMemory(DOMAINS, DIM_IN, K, kmeans_nredo=1, refresh_every=refresh_every)
    share = torch.arange(_rank(), len(DOMAINS), get_world_size())
    memory.fill(keys[share], share)
    memory.recluster(epoch=0)
    loss = ProtoOTLoss(memory, cross_domain_start_epoch=0, cross_domain_weight=0.5)
    miner = ProtoOTMiner(memory, update_prototypes=True)
    domains = [_rank()] if get_world_size() > 1 else list(range(WORLD_SIZE))
    for step in range(steps):
        indices = torch.cat([torch.arange(4 * step, 4 * step + 4) + DOMAINS.index(d) for d in domains])
        queries = F.normalize(views[indices], dim=1)
        if mode == "loss":
            loss(queries, indices, ref_emb=keys[indices])
        else:
            memory.fill(keys[indices], indices)
            miner(queries, indices, keys[indices], indices.clone())
    return {name: value.clone() for name, value in memory.state_dict().items()}


SPLIT_VARIANTS = [(refresh_every, mode) for refresh_every in (1, 3) for mode in ("loss", "miner")]


def worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        batches = global_batches()
        state = train(lambda step: batches[step][rank * PER_RANK_BATCH : (rank + 1) * PER_RANK_BATCH])
        state["tester"] = retrieval_scores(make_inputs()[2])
        state["tester_tiny"] = retrieval_scores(make_inputs()[2], TINY_DOMAINS)
        state["gathered"] = all_gather_rows(torch.full((rank + 1, 2), float(rank)))  # uneven row counts
        state["strided"] = gather_strided(torch.arange(rank, 5, WORLD_SIZE), 5)
        state["objects"] = all_gather_objects({"rank": rank, "rows": torch.full((rank,), rank)})
        state["trainer"] = run_trainer()
        state["trainer_frozen_trunk"] = run_trainer(freeze_trunk=True)
        state["resume"] = resumed_and_uninterrupted(pathlib.Path(out_dir))
        state["split_domains"] = {variant: split_domain_memory(*variant) for variant in SPLIT_VARIANTS}
        state["rank_0_checkpoints"] = checkpoint_on_rank_0_only(pathlib.Path(out_dir))
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_states(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(str(folder / "init"), str(folder)), nprocs=WORLD_SIZE, join=True)
    states = [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    return {"states": states, "checkpoint": folder / "epoch1.pth"}


def test_two_processes_match_one_process_with_the_global_batch(two_process_states):
    batches = global_batches()
    single = train(lambda step: batches[step])
    for rank, state in enumerate(two_process_states["states"]):
        for slot, bank in enumerate(single["banks"]):
            assert torch.allclose(state["banks"][slot], bank, atol=1e-5), (rank, slot)
        assert torch.allclose(state["prototypes"], single["prototypes"], atol=1e-5), rank
        assert torch.allclose(state["losses"], single["losses"], atol=1e-5), rank
        assert torch.allclose(state["weight"], single["weight"], atol=1e-5), rank
    # The run did move things: the comparison is not between untouched copies.
    assert not torch.allclose(single["weight"], make_inputs()[2])


@pytest.mark.filterwarnings("ignore:.*no item of their class:UserWarning")  # the one-image domain's queries
@pytest.mark.parametrize("key, sizes", [("tester", (("photo", 7), ("sketch", 10))), ("tester_tiny", TINY_DOMAINS)])
def test_two_process_tester_scores_equal_one_process(two_process_states, key, sizes):
    expected = retrieval_scores(make_inputs()[2], sizes)
    for state in two_process_states["states"]:
        assert state[key].keys() == expected.keys()
        for pair, metrics in expected.items():
            for metric, value in metrics.items():
                assert state[key][pair][metric] == pytest.approx(value, abs=1e-6), (pair, metric)


def test_gather_helpers_concatenate_in_rank_order(two_process_states):
    expected_rows = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for state in two_process_states["states"]:
        assert torch.equal(state["gathered"], expected_rows)
        assert state["strided"].tolist() == list(range(5))
        assert [(entry["rank"], entry["rows"].tolist()) for entry in state["objects"]] == [(0, []), (1, [1])]


def assert_same_trainer_state(state, expected, label):
    for slot, bank in enumerate(expected["banks"]):
        assert torch.allclose(state["banks"][slot], bank, atol=1e-5), (label, slot)
    for name in ("prototypes", "class_marginals", "losses"):
        assert torch.allclose(state[name], expected[name], atol=1e-5), (label, name)
    for encoder in ("query_encoder", "key_encoder"):
        assert state[encoder].keys() == expected[encoder].keys()
        for key, value in expected[encoder].items():
            assert torch.allclose(state[encoder][key], value, atol=1e-5), (label, encoder, key)


@pytest.mark.parametrize("variant", ["trainer", "trainer_frozen_trunk"])
def test_two_process_trainer_matches_one_process_with_the_global_batch(two_process_states, variant):
    single = run_trainer(freeze_trunk=variant == "trainer_frozen_trunk")
    assert not single["wrapped_in_ddp"]
    assert len(single["losses"]) == TRAINER_EPOCHS * len(DOMAINS) // (WORLD_SIZE * PER_RANK_BATCH)
    for rank, state in enumerate(two_process_states["states"]):
        assert state[variant]["wrapped_in_ddp"], rank
        assert_same_trainer_state(state[variant], single, (variant, rank))
    # Training moved the trained weights and the key encoder (the comparison is not
    # between untouched copies), and a frozen trunk stayed put.
    for key, initial in single["initial"].items():
        frozen = variant == "trainer_frozen_trunk" and key.startswith("0.")
        assert torch.equal(single["query_encoder"][key], initial) == frozen, key
        assert torch.equal(single["key_encoder"][key], initial) == frozen, key


def test_two_process_resume_restores_each_rank_its_own_random_state(two_process_states):
    states = two_process_states["states"]
    for rank, state in enumerate(states):
        uninterrupted, resumed = state["resume"]["uninterrupted"], state["resume"]["resumed"]
        for key, value in uninterrupted.items():
            assert torch.equal(resumed[key], value), (rank, key)
    checkpoint = torch.load(two_process_states["checkpoint"], weights_only=True)
    rank_rngs = [rank_state["rng"]["torch"] for rank_state in checkpoint["rank_states"]]
    assert len(rank_rngs) == WORLD_SIZE and not torch.equal(*rank_rngs)  # the ranks were seeded apart
    assert torch.equal(checkpoint["rng"]["torch"], rank_rngs[0])


def test_resume_by_another_number_of_processes_warns_and_uses_rank_0s_state(two_process_states, caplog):
    trainer, _ = make_trainer()
    with caplog.at_level(logging.WARNING, logger="pml_protoot.trainers"):
        assert trainer.load_checkpoint(two_process_states["checkpoint"]) == 2
    assert "saved by 2 processes, resumed by 1" in caplog.text
    checkpoint = torch.load(two_process_states["checkpoint"], weights_only=True)
    assert torch.equal(torch.get_rng_state(), checkpoint["rank_states"][0]["rng"]["torch"])


@pytest.mark.parametrize("variant", SPLIT_VARIANTS)
def test_ranks_whose_batches_lack_a_domain_keep_the_memory_of_one_process(two_process_states, variant):
    """Rank 0's batches hold only domain 0 and rank 1's only domain 1: each rank still moves both
    domains' prototypes (and refresh caches), as one process with the global batch does."""
    single = split_domain_memory(*variant)
    for rank, state in enumerate(two_process_states["states"]):
        memory_state = state["split_domains"][variant]
        assert memory_state.keys() == single.keys()
        for name, value in single.items():
            assert torch.allclose(memory_state[name].double(), value.double(), atol=1e-5), (rank, name)
    # The steps did move the prototypes: the comparison is not between untouched copies.
    assert not torch.allclose(single["prototypes"], split_domain_memory(*variant, steps=0)["prototypes"])


def test_a_checkpoint_dir_on_rank_0_only_trains_and_saves_rank_0s_states(two_process_states):
    assert [state["rank_0_checkpoints"] for state in two_process_states["states"]] == [None, None]
