"""PrototypeMemory against plain references: loops, the official Sinkhorn formula, brute-force matching."""
import itertools
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pml_protoot.memory import PrototypeMemory
from references import assert_memory_on, official_sinkhorn

FLOAT_DTYPES = [torch.float32, torch.float64]
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}




def filled_memory(domains, dim=4, num_prototypes=2, dtype=torch.float32, device="cpu", seed=0, **options):
    memory = PrototypeMemory(domains, dim, num_prototypes, kmeans_nredo=2, **options).to(device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(len(domains), dim, generator=generator, dtype=dtype), dim=1)
    memory.fill(keys.to(device), torch.arange(len(domains)))
    return memory, keys


def snapshot(memory):
    return {name: buffer.clone() for name, buffer in memory.state_dict().items()}


def assert_state_unchanged(memory, before):
    for name, buffer in memory.state_dict().items():
        assert torch.equal(buffer, before[name]), name


def blobs(sizes, dim, seed):
    """Well-separated unit-norm clusters: (points, cluster of each point)."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(len(sizes), dim, generator=generator), dim=1) * 5
    cluster = torch.cat([torch.full((size,), c) for c, size in enumerate(sizes)])
    points = centres[cluster] + 0.05 * torch.randn(len(cluster), dim, generator=generator)
    return F.normalize(points, dim=1), cluster


def test_domains_map_to_sorted_slots_and_rank_rows():
    domains = [5, 2, 5, 2, 9, 2, 9, 5]
    memory = PrototypeMemory(domains, dim=3, num_prototypes=2)
    distinct = sorted(set(domains))
    for index, domain in enumerate(domains):
        assert memory.domain_of[index] == distinct.index(domain)
        assert memory.row_of[index] == domains[:index].count(domain)
    assert memory.domain_ids.tolist() == distinct
    assert memory.num_domains == 3
    assert [memory.bank(slot).shape[0] for slot in range(3)] == [domains.count(d) for d in distinct]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float16])
def test_fill_writes_each_key_to_its_row(dtype, device):
    domains = [0, 1, 1, 0, 2, 1, 0, 2]
    memory = PrototypeMemory(domains, dim=3, num_prototypes=2).to(device)
    keys = torch.randn(5, 3, dtype=dtype, device=device)
    indices = torch.tensor([6, 1, 4, 3, 7])
    memory.fill(keys, indices)
    for position, index in enumerate(indices.tolist()):
        slot = sorted(set(domains)).index(domains[index])
        row = domains[:index].count(domains[index])
        assert torch.equal(memory.bank(slot)[row], keys[position].float())
    assert memory.written.tolist() == [index in indices.tolist() for index in range(len(domains))]


def test_fill_with_repeated_index_keeps_the_last_key():
    memory = PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=1)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    memory.fill(keys, [3, 0, 3])
    assert memory.bank(1)[1].tolist() == [3.0, 3.0]
    assert memory.bank(0)[0].tolist() == [0.0, 1.0]


def test_split_by_domain_matches_loop():
    domains = [3, 1, 3, 1, 7, 7, 1]
    memory = PrototypeMemory(domains, dim=2, num_prototypes=1)
    indices = [4, 0, 1, 6, 2]
    groups = memory.split_by_domain(indices)
    expected = []
    for slot, domain in enumerate(sorted(set(domains))):
        positions = [p for p, i in enumerate(indices) if domains[i] == domain]
        if positions:
            rows = [domains[: indices[p]].count(domain) for p in positions]
            expected.append((slot, positions, rows))
    assert [(slot, positions.tolist(), rows.tolist()) for slot, positions, rows in groups] == expected


def ready_memory(dtype, device, normalize_scores=False):
    """Two domains, random banks, random unit prototypes and random marginals, epoch 0."""
    memory, _ = filled_memory([0] * 7 + [1] * 5, dim=4, num_prototypes=3, dtype=dtype, device=device,
                              normalize_scores=normalize_scores)
    generator = torch.Generator().manual_seed(1)
    memory.prototypes.copy_(F.normalize(torch.randn(2, 3, 4, generator=generator, dtype=dtype), dim=2))
    memory.class_marginals.copy_(torch.softmax(torch.randn(2, 3, generator=generator, dtype=dtype), dim=1))
    memory.epoch.fill_(0)
    return memory


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("normalize_scores", [False, True])
@pytest.mark.parametrize("domain, prototype_domain", [(0, None), (1, None), (0, 1), (1, 0)])
def test_assign_equals_official_sinkhorn(dtype, normalize_scores, domain, prototype_domain, device):
    memory = ready_memory(dtype, device, normalize_scores)
    target = domain if prototype_domain is None else prototype_domain
    scores = memory.bank(domain).double().cpu() @ memory.prototypes[target].double().cpu().T
    if normalize_scores:
        scores = scores / scores.norm(dim=1, keepdim=True)
    expected = official_sinkhorn(scores, memory.class_marginals[domain].cpu(), memory.epsilon)
    assignment = memory.assign(domain, prototype_domain)
    assert assignment.dtype == dtype and assignment.device.type == torch.device(device).type
    torch.testing.assert_close(assignment.double().cpu(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    assert torch.equal(memory.pseudo_labels(domain, prototype_domain), assignment.argmax(1))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_update_prototypes_is_normalised_weighted_bank_sum(dtype, device):
    memory = ready_memory(dtype, device)
    assignment = torch.rand(5, 3, dtype=dtype, device=device)
    memory.update_prototypes(1, assignment)
    bank = memory.bank(1).cpu()
    for k in range(3):
        weighted = sum(assignment[n, k].cpu() * bank[n] for n in range(5))
        torch.testing.assert_close(memory.prototypes[1, k].cpu(), weighted / weighted.norm())


@pytest.mark.parametrize("refresh_every", [1, 3])
def test_half_precision_prototypes_of_a_bank_past_float16_range_match_float32(refresh_every):
    # 150,000 keys near one direction: the first coordinate of P^T M summed in float16 overflows (max 65,504).
    rows = 150_000
    generator = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.tensor([1.0, 0.2, 0.1, 0.0]) + 0.05 * torch.randn(2 * rows, 4, generator=generator), dim=1)
    prototypes = {}
    for dtype in (torch.float32, torch.float16):
        memory = PrototypeMemory([0] * rows + [1] * rows, 4, 2, kmeans_nredo=1, kmeans_niter=3,
                                 neighbour_search="exact", refresh_every=refresh_every).to(dtype)
        memory.fill(keys.to(dtype), torch.arange(2 * rows))
        memory.recluster(epoch=0)
        memory.step_pseudo_labels(0, torch.arange(4))
        memory.fill(keys[:4].to(dtype), torch.arange(4))  # a written batch updates the cached means
        memory.step_pseudo_labels(0, torch.arange(4))
        prototypes[dtype] = memory.prototypes[0].float()
    assert prototypes[torch.float16].isfinite().all()
    torch.testing.assert_close(prototypes[torch.float16], prototypes[torch.float32], atol=2e-3, rtol=0)


@pytest.mark.parametrize("scale, batch", [(2000.0, 64), (1e4, 1)])
def test_half_precision_refresh_update_of_large_keys_matches_float32(scale, batch):
    # Each key fits float16 (max 65,504), but a 64-key batch sum (about 115,000) or one key's
    # score / epsilon (1e5) does not: the cached means must still follow the written rows.
    generator = torch.Generator().manual_seed(0)
    keys = scale * (F.normalize(torch.randn(128, 3, generator=generator), dim=1) + torch.tensor([1.0, 0.0, 0.0]))
    means = {}
    for dtype in (torch.float32, torch.float16):
        memory = PrototypeMemory([0] * 64 + [1] * 64, 3, 1, kmeans_nredo=1, refresh_every=5).to(dtype)
        memory.fill(keys.to(dtype), torch.arange(128))
        memory.recluster(epoch=0)
        memory.step_pseudo_labels(0, torch.arange(4))  # the full OT: caches the plan and the means
        memory.fill((0.9 * keys[:batch]).to(dtype), torch.arange(batch))
        memory.step_pseudo_labels(0, torch.arange(4))  # between refreshes: the means moved by fill
        means[dtype] = memory.prototype_means[0].float()
    assert means[torch.float16].isfinite().all()
    torch.testing.assert_close(means[torch.float16], means[torch.float32], rtol=2e-3, atol=0)


@pytest.mark.parametrize("marginal_rule", ["official", "matched"])
def test_half_precision_cluster_size_marginals_past_float16_range(marginal_rule):
    # Two blobs of 60,000 and 20,000 rows: the counts' sum overflows float16.
    points, cluster = blobs((60_000, 20_000), dim=4, seed=0)
    memory = PrototypeMemory([0] * 80_000 + [1] * 80_000, 4, 2, marginal_rule=marginal_rule, kmeans_nredo=1,
                             kmeans_niter=5, neighbour_search="exact").half()
    memory.fill(torch.cat([points, points]).half(), torch.arange(160_000))
    memory.recluster(epoch=0)
    first_is_large = memory.prototypes[0].float() @ F.normalize(points[cluster == 0].mean(0), dim=0) > 0.9
    expected = torch.where(first_is_large, 0.75, 0.25)
    torch.testing.assert_close(memory.class_marginals[0].float(), expected, atol=1e-3, rtol=0)


def test_bfloat16_memory_reclusters_like_float32():
    memories = {}
    for dtype in (torch.float32, torch.bfloat16):
        memory, truths = blob_memory("official")
        memory.to(dtype).recluster(epoch=0)
        memories[dtype] = memory
    torch.testing.assert_close(memories[torch.bfloat16].class_marginals.float(),
                               memories[torch.float32].class_marginals, atol=1e-2, rtol=0)
    torch.testing.assert_close(memories[torch.bfloat16].prototypes.float(),
                               memories[torch.float32].prototypes, atol=2e-2, rtol=0)


def blob_memory(marginal_rule, sizes=((6, 3, 11), (4, 9, 5)), dim=5, **options):
    """Memory whose domains are well-separated blobs, so K-means has one right answer."""
    domains = sum(([slot] * sum(domain_sizes) for slot, domain_sizes in enumerate(sizes)), [])
    memory = PrototypeMemory(domains, dim, num_prototypes=3, marginal_rule=marginal_rule, kmeans_nredo=3, **options)
    truths = []
    for slot, domain_sizes in enumerate(sizes):
        points, cluster = blobs(domain_sizes, dim, seed=slot)
        memory.fill(points, torch.nonzero(memory.domain_of == slot).flatten())
        means = torch.stack([points[cluster == c].mean(0) for c in range(len(domain_sizes))])
        truths.append((F.normalize(means, dim=1), torch.tensor(domain_sizes, dtype=torch.float32)))
    return memory, truths


def true_cluster_of_each_prototype(prototypes, true_means):
    return (prototypes @ true_means.T).argmax(1)


@pytest.mark.parametrize("marginal_rule", ["official", "matched"])
def test_first_recluster_sets_centroids_and_cluster_sizes(marginal_rule):
    memory, truths = blob_memory(marginal_rule)
    memory.recluster(epoch=0)
    assert int(memory.epoch) == 0
    for slot, (true_means, true_sizes) in enumerate(truths):
        matched = true_cluster_of_each_prototype(memory.prototypes[slot], true_means)
        assert sorted(matched.tolist()) == [0, 1, 2]
        torch.testing.assert_close(memory.prototypes[slot], true_means[matched], atol=1e-2, rtol=0)
        torch.testing.assert_close(memory.class_marginals[slot], true_sizes[matched] / true_sizes.sum())


def brute_force_matching(centroids, prototypes):
    """``perm[cluster] = prototype`` maximising the summed cosine (all K! permutations tried)."""
    return max(
        itertools.permutations(range(len(centroids))),
        key=lambda perm: sum(float(centroids[c] @ prototypes[perm[c]]) for c in range(len(centroids))),
    )


def brute_force_matched_marginal(centroids, sizes, prototypes):
    """Cluster fractions in prototype order under the best cosine-sum permutation."""
    marginal = torch.empty(len(sizes))
    for cluster, prototype in enumerate(brute_force_matching(centroids, prototypes)):
        marginal[prototype] = sizes[cluster] / sizes.sum()
    return marginal


def scrambled_prototypes(memory, seed=3):
    """Permuted, perturbed unit prototypes: neither K-means order nor centroids, but still
    closest to one centroid each (so the matching is well defined)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(memory.prototypes.shape, generator=generator)
    return F.normalize(memory.prototypes[:, torch.tensor([1, 2, 0])] + 0.3 * noise, dim=2)


def test_matched_rule_follows_permuted_prototypes_and_official_rule_does_not():
    matched_memory, truths = blob_memory("matched")
    official_memory, _ = blob_memory("official")
    permutation = torch.tensor([2, 0, 1])
    for memory in (matched_memory, official_memory):
        memory.recluster(epoch=0)
        memory.prototypes.copy_(memory.prototypes[:, permutation])  # prototype order no longer K-means order
    official_before = official_memory.class_marginals.clone()
    matched_memory.recluster(epoch=1)
    official_memory.recluster(epoch=1)
    for slot, (true_means, true_sizes) in enumerate(truths):
        expected = brute_force_matched_marginal(true_means, true_sizes, matched_memory.prototypes[slot])
        torch.testing.assert_close(matched_memory.class_marginals[slot], expected)
    # The official rule keeps K-means order (same data and seed): stale w.r.t. the permuted prototypes.
    torch.testing.assert_close(official_memory.class_marginals, official_before)
    assert not torch.allclose(official_memory.class_marginals, matched_memory.class_marginals)


def test_assignment_rule_is_column_mass_of_current_assignment():
    memory, _ = blob_memory("assignment")
    memory.recluster(epoch=0)
    before = memory.class_marginals.clone()
    expected = [
        official_sinkhorn(memory.bank(slot) @ memory.prototypes[slot].T, before[slot], memory.epsilon).sum(0)
        / len(memory.bank(slot))
        for slot in range(2)
    ]
    memory.recluster(epoch=1)
    torch.testing.assert_close(memory.class_marginals.double(), torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_uniform_rule_and_prototypes_kept_after_first_call_without_reset():
    memory, _ = blob_memory("uniform")
    assert not memory.reset_prototypes  # the default, as the official code
    memory.recluster(epoch=0)
    memory.prototypes.copy_(scrambled_prototypes(memory))
    prototypes = memory.prototypes.clone()
    memory.recluster(epoch=1)
    assert torch.equal(memory.class_marginals, torch.full((2, 3), 1 / 3))
    assert torch.equal(memory.prototypes, prototypes)
    assert int(memory.epoch) == 1


def test_uniform_is_the_default_rule():
    assert PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=1).marginal_rule == "uniform"


@pytest.mark.parametrize(
    "marginal_rule, reset_prototypes, later_runs",
    [("uniform", False, 0), ("assignment", False, 0), ("uniform", True, 2), ("matched", False, 2), ("official", False, 2)],
)
def test_later_reclusters_run_kmeans_only_when_sizes_or_reset_need_it(marginal_rule, reset_prototypes, later_runs,
                                                                         caplog):
    """The INFO log says K-means ran, and what it did, only when it did."""
    memory, _ = blob_memory(marginal_rule, reset_prototypes=reset_prototypes)
    runs = []
    kmeans = memory._kmeans
    memory._kmeans = lambda bank: runs.append(len(bank)) or kmeans(bank)
    caplog.set_level(logging.INFO, logger="pml_protoot.memory")
    memory.recluster(epoch=0)
    assert runs == [20, 18]  # the first call always clusters both domains: it sets the prototypes
    assert caplog.messages == [f"K-means on 2 domains at epoch 0: marginals by rule {marginal_rule!r}, "
                               "set the prototypes"]
    caplog.clear()
    memory.recluster(epoch=1)
    assert len(runs) == 2 + later_runs and int(memory.epoch) == 1
    did = "reset the prototypes" if reset_prototypes else "kept them"
    assert caplog.messages == ([f"K-means on 2 domains at epoch 1: marginals by rule {marginal_rule!r}, {did}"]
                               if later_runs else [])


@pytest.mark.parametrize("marginal_rule", ["matched", "official", "uniform"])
def test_reset_prototypes_takes_the_centroids_matched_to_the_current_prototypes(marginal_rule):
    memory, truths = blob_memory(marginal_rule, reset_prototypes=True)
    memory.recluster(epoch=0)
    memory.prototypes.copy_(scrambled_prototypes(memory))
    before = memory.prototypes.clone()
    memory.recluster(epoch=1)
    for slot, (true_means, true_sizes) in enumerate(truths):
        matching = brute_force_matching(true_means, before[slot])
        expected = torch.empty_like(true_means)
        for cluster, prototype in enumerate(matching):
            expected[prototype] = true_means[cluster]
        torch.testing.assert_close(memory.prototypes[slot], expected, atol=1e-2, rtol=0)
        if marginal_rule == "matched":  # the marginals follow the same matching: beta_k is prototype k's cluster
            torch.testing.assert_close(
                memory.class_marginals[slot], brute_force_matched_marginal(true_means, true_sizes, before[slot])
            )
    assert torch.allclose(memory.prototypes.norm(dim=2), torch.ones(2, 3))


def test_kmeans_seed_is_used():
    runs = []
    for seed in (0, 0, 1):
        memory, _ = filled_memory([0] * 40 + [1] * 40, dim=3, num_prototypes=4, kmeans_seed=seed)
        memory.recluster(epoch=0)
        runs.append(memory.prototypes)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_kmeans_trains_on_up_to_2000_rows_per_prototype_as_the_official_code():
    """faiss subsamples to 256 rows per centroid by default; the official code trains on up to 2000.
    Lloyd's fixed point on every row: each prototype is the normalised mean of the rows nearest to it."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    keys = F.normalize(centres.repeat_interleave(600, dim=0) + 0.4 * torch.randn(1200, 4, generator=generator), dim=1)
    memory = PrototypeMemory([0] * 1200 + [1] * 2, dim=4, num_prototypes=2, kmeans_nredo=1)  # 1200 > 256 * 2
    memory.fill(torch.cat([keys, keys[:2]]), torch.arange(1202))
    memory.recluster(epoch=0)
    prototypes = memory.prototypes[0].double()
    nearest = torch.cdist(keys.double(), prototypes).argmin(dim=1)
    means = torch.stack([keys.double()[nearest == k].mean(dim=0) for k in range(2)])
    torch.testing.assert_close(prototypes, F.normalize(means, dim=1), atol=1e-5, rtol=0)


def test_state_dict_round_trips_exactly_and_to_moves_everything(device):
    memory, _ = filled_memory([1, 0, 1, 0, 1, 0, 2, 2], dim=3, num_prototypes=2, marginal_rule="official")
    memory.recluster(epoch=3)
    fresh = PrototypeMemory([1, 0, 1, 0, 1, 0, 2, 2], dim=3, num_prototypes=2)
    fresh.load_state_dict(memory.state_dict())
    expected_names = {"domain_ids", "domain_of", "row_of", "bank_0", "bank_1", "bank_2", "written", "prototypes",
                      "class_marginals", "epoch"}
    assert set(memory.state_dict()) == expected_names
    for name, buffer in memory.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], buffer), name
    moved = fresh.to(device)
    assert_memory_on(moved, device)
    torch.testing.assert_close(moved.assign(2).cpu(), memory.assign(2))


def test_bad_construction_arguments_name_the_argument():
    with pytest.raises(ValueError, match="domains must be 1-D"):
        PrototypeMemory([[0, 1], [1, 0]], dim=2, num_prototypes=1)
    with pytest.raises(TypeError, match="domains must hold integers"):
        PrototypeMemory([0.0, 1.0, 1.0, 0.0], dim=2, num_prototypes=1)
    with pytest.raises(ValueError, match="domains must hold at least 2 distinct"):
        PrototypeMemory([4, 4, 4], dim=2, num_prototypes=1)
    with pytest.raises(ValueError, match=r"num_prototypes must be at most .*\(2, domain 7\), got 3"):
        PrototypeMemory([0, 0, 0, 7, 7], dim=2, num_prototypes=3)
    with pytest.raises(ValueError, match="domains must give every domain at least 2 samples"):
        PrototypeMemory([0, 0, 1], dim=2, num_prototypes=1)
    with pytest.raises(ValueError, match="marginal_rule must be one of"):
        PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=1, marginal_rule="sizes")
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        PrototypeMemory([0, 0, 1, 1], dim=0, num_prototypes=1)
    with pytest.raises(ValueError, match=r"num_prototypes must be a positive integer, got np.int64\(0\)"):
        PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=np.int64(0))
    with pytest.raises(TypeError, match="reset_prototypes must be True or False, got 'False'"):
        PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=1, reset_prototypes="False")


def test_integer_arguments_may_be_numpy_or_tensor_scalars():
    """``labels.max() + 1`` and friends: NumPy integers and 0-d integer tensors are integers."""
    labels = np.array([0, 1, 2, 1])
    memory = PrototypeMemory([0, 0, 1, 1], dim=torch.tensor(4), num_prototypes=labels.max())
    assert (memory.dim, memory.num_prototypes) == (4, 2)
    assert type(memory.dim) is int and type(memory.num_prototypes) is int


def test_recluster_and_assign_refuse_an_unready_memory():
    memory = PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=1)
    with pytest.raises(ValueError, match="memory must be filled and reclustered"):
        memory.assign(0)
    memory.fill(torch.randn(3, 2), [0, 1, 2])
    with pytest.raises(ValueError, match=r"memory must be filled before recluster: 1 of 4"):
        memory.recluster(epoch=0)
    memory.fill(torch.randn(1, 2), [3])
    with pytest.raises(ValueError, match="epoch must be a non-negative integer, got -1"):
        memory.recluster(epoch=-1)
    with pytest.raises(ValueError, match=r"domain \(a domain slot\) must be an integer in \[0, 1\], got 2"):
        memory.bank(2)


@pytest.mark.parametrize(
    "keys, indices, error, message",
    [
        (torch.ones(2, 3), [0, 4], ValueError, r"indices must lie in \[0, 4\), got \[4\]"),
        (torch.ones(2, 3), [-1, 0], ValueError, "indices must lie in"),
        (torch.ones(2, 3), [[0, 1]], ValueError, "indices must be 1-D"),
        (torch.ones(2, 3), [0.0, 1.0], TypeError, "indices must hold integers"),
        (torch.ones(2, 2), [0, 1], ValueError, r"keys must have shape \(2, 3\), got \(2, 2\)"),
        (torch.ones(3, 3), [0, 1], ValueError, "keys must have shape"),
        (torch.tensor([[1.0, float("nan"), 0.0], [1.0, 0.0, 0.0]]), [0, 1], ValueError, "keys must be finite"),
        (torch.tensor([[1.0, float("inf"), 0.0], [1.0, 0.0, 0.0]]), [0, 1], ValueError, "keys must be finite"),
        (torch.ones(2, 3, dtype=torch.long), [0, 1], TypeError, "keys must be a floating-point tensor"),
    ],
)
def test_bad_fill_raises_and_writes_nothing(keys, indices, error, message):
    memory = PrototypeMemory([0, 0, 1, 1], dim=3, num_prototypes=1)
    before = snapshot(memory)
    with pytest.raises(error, match=message):
        memory.fill(keys, indices)
    assert_state_unchanged(memory, before)


@pytest.mark.parametrize("refresh_every", [1, 3])
def test_half_precision_fill_refuses_keys_past_float16_range_and_writes_nothing(refresh_every):
    memory, _ = filled_memory([0] * 4 + [1] * 4, dim=3, refresh_every=refresh_every)
    memory.half().recluster(epoch=0)
    memory.step_pseudo_labels(0, [0])
    before = snapshot(memory)
    keys = torch.ones(2, 3)
    keys[1, 2] = 1e5  # finite in float32, inf in float16
    with pytest.raises(ValueError, match=r"keys must be finite in the memory's dtype torch\.float16 \(\|x\| <= 65504\), "
                                         r"got 1 entries past it, largest \|x\| 1e\+05"):
        memory.fill(keys, [0, 4])
    assert_state_unchanged(memory, before)
    memory.fill(torch.full((2, 3), 65504.0), [0, 4])  # float16's largest value is still a key
    assert torch.equal(memory.bank(1)[0], torch.full((3,), 65504.0, dtype=torch.float16))


@pytest.mark.parametrize("bad", [float("nan"), -0.25, "zeros"])
def test_load_state_dict_refuses_class_marginals_sinkhorn_cannot_use_and_loads_nothing(bad):
    """Sinkhorn takes the memory's marginals unread: a checkpoint's must be checked on the way in."""
    source, _ = filled_memory([0] * 4 + [1] * 4, dim=3)
    source.recluster(epoch=0)
    state = snapshot(source)  # a copy: state_dict() shares the source's tensors
    if bad == "zeros":
        state["class_marginals"][1] = 0.0
    else:
        state["class_marginals"][0, 0] = bad
    memory = PrototypeMemory([0] * 4 + [1] * 4, dim=3, num_prototypes=source.num_prototypes)
    before = snapshot(memory)
    with pytest.raises(ValueError, match=r"state_dict\['class_marginals'\] must be finite, non-negative and not all "
                                         r"zero in any domain"):
        memory.load_state_dict(state)
    assert_state_unchanged(memory, before)
    memory.load_state_dict(source.state_dict())  # a good one loads
    assert torch.equal(memory.class_marginals, source.class_marginals)


def test_load_state_dict_refuses_banks_past_the_memory_dtype_range_and_loads_nothing():
    source = PrototypeMemory([0, 0, 1, 1], dim=3, num_prototypes=1)
    source.fill(torch.full((4, 3), 1e5), torch.arange(4))
    memory = PrototypeMemory([0, 0, 1, 1], dim=3, num_prototypes=1).half()
    before = snapshot(memory)
    with pytest.raises(ValueError, match=r"state_dict\['bank_0'\] must be finite in the memory's dtype torch\.float16"):
        memory.load_state_dict(source.state_dict())
    assert_state_unchanged(memory, before)
    memory.float().load_state_dict(source.state_dict())  # a float32 memory holds them
    assert torch.equal(memory.bank(1), source.bank(1))


@pytest.mark.parametrize("refresh_every", [1, 3])
def test_a_cast_to_half_precision_that_would_overflow_is_refused_and_changes_nothing(refresh_every):
    memory, _ = filled_memory([0] * 4 + [1] * 4, dim=3, refresh_every=refresh_every)
    memory.recluster(epoch=0)
    memory.fill(torch.tensor([[1.0, 2.0, 1e5]]), [5])  # finite in float32, inf in float16
    before = snapshot(memory)
    with pytest.raises(ValueError, match=r"memory\.bank_1 must be finite in the memory's dtype torch\.float16 "
                                         r"\(\|x\| <= 65504\), got 1 entries past it, largest \|x\| 1e\+05"):
        memory.half()
    assert_state_unchanged(memory, before)
    assert memory.bank(0).dtype == torch.float32
    memory.fill(torch.ones(1, 3), [5])
    assert memory.half().bank(1).dtype == torch.float16  # once every entry fits, the cast goes through
    expected = before["bank_1"].index_put((torch.tensor([1]),), torch.ones(1, 3))
    assert torch.equal(memory.bank(1), expected.half())


def test_bad_update_prototypes_input_names_assignment():
    memory = ready_memory(torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"assignment must have shape \(5, 3\)"):
        memory.update_prototypes(1, torch.rand(7, 3))
    before = memory.prototypes.clone()
    for bad, message in ((torch.randn(5, 3), r"entries in \[-"), (torch.zeros(5, 3), r"entries in \[0, 0\]")):
        with pytest.raises(ValueError, match=f"assignment must be a soft assignment .*{message}"):
            memory.update_prototypes(1, bad)  # raw scores; no mass at all
    assert torch.equal(memory.prototypes, before)
    zero_column = torch.rand(5, 3)
    zero_column[:, 1] = 0  # what Sinkhorn gives where beta_k = 0 (an empty K-means cluster)
    memory.update_prototypes(1, zero_column)
    assert memory.prototypes[1, 1].abs().sum() == 0 and memory.prototypes[1, 0].norm() == pytest.approx(1)


@pytest.mark.parametrize("target", ["meta", "device"])
def test_step_bookkeeping_stays_on_the_cpu_on_any_device(target, device):
    """int(memory.epoch) and the refresh countdown are read in Python every step: on a GPU each read
    of a device tensor would wait for all queued work."""
    target = device if target == "device" else target
    memory = PrototypeMemory([0] * 4 + [1] * 4, dim=3, num_prototypes=2, refresh_every=3).to(target).double()
    assert_memory_on(memory, target)
    assert {"refresh_countdown", "potentials_valid"} <= dict(memory.named_buffers()).keys()
    assert memory.prototypes.dtype == torch.float64 and memory.epoch.dtype == torch.long
    if target == "meta":
        return
    memory.fill(F.normalize(torch.randn(8, 3, dtype=torch.float64, device=device), dim=1), torch.arange(8))
    memory.recluster(epoch=2)
    memory.step_pseudo_labels(1, torch.tensor([0, 2], device=device))
    restored = PrototypeMemory([0] * 4 + [1] * 4, dim=3, num_prototypes=2, refresh_every=3).to(device).double()
    restored.load_state_dict(memory.state_dict())
    assert int(restored.epoch) == 2 and restored.refresh_countdown.tolist() == memory.refresh_countdown.tolist()
    assert restored.epoch.device.type == "cpu"


def test_step_bookkeeping_loaded_with_assign_comes_back_to_the_cpu(device):
    """load_state_dict(assign=True) puts in the saved tensors themselves, on whatever device they were saved."""
    source = PrototypeMemory([0] * 4 + [1] * 4, dim=3, num_prototypes=2, refresh_every=3)
    source.epoch.fill_(4)
    state = {name: value.to(device) for name, value in source.state_dict().items()}
    memory = PrototypeMemory([0] * 4 + [1] * 4, dim=3, num_prototypes=2, refresh_every=3)
    memory.load_state_dict(state, assign=True)
    assert memory.epoch.device.type == "cpu" and int(memory.epoch) == 4
