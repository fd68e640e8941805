"""ProtoOTMiner against brute-force pair enumeration and a plain-loop reference of its rule."""
import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import NTXentLoss
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_protoot.memory import PrototypeMemory
from pml_protoot.miners import ProtoOTMiner

DTYPES = [torch.float16, torch.float32, torch.float64]


def separated_memory(device, dtype, num_classes=3, per_domain=(9, 12), seed=0, **options):
    """Memory whose banks hold tight class clusters and whose prototypes sit at the class means.

    Returns the memory and the true class of every global index. Classes are assigned
    cyclically within each domain, so every domain holds every class.
    """
    generator = torch.Generator().manual_seed(seed)
    dim = num_classes + 2
    centers = torch.eye(num_classes, dim)
    domains = torch.cat([torch.full((n,), d) for d, n in enumerate(per_domain)])
    classes = torch.cat([torch.arange(n) % num_classes for n in per_domain])
    # Each domain adds its own small shift, so domains differ but classes stay separated.
    shifts = 0.2 * torch.eye(dim)[num_classes : num_classes + len(per_domain)]
    noise = 0.05 * torch.randn(len(classes), dim, generator=generator)
    keys = F.normalize(centers[classes] + shifts[domains] + noise, dim=1)
    memory = PrototypeMemory(domains, dim=dim, num_prototypes=num_classes, kmeans_nredo=1, **options)
    memory.fill(keys, torch.arange(len(classes)))
    memory.recluster(0)
    for slot in range(len(per_domain)):
        in_domain = domains == slot
        means = torch.stack([keys[in_domain & (classes == c)].mean(0) for c in range(num_classes)])
        memory.prototypes[slot] = F.normalize(means, dim=1)
        class_sizes = torch.bincount(classes[in_domain], minlength=num_classes)
        memory.class_marginals[slot] = class_sizes / in_domain.sum()
    return memory.to(device=device, dtype=dtype), classes


def pair_sets(a1, p, a2, n):
    return set(zip(a1.tolist(), p.tolist())), set(zip(a2.tolist(), n.tolist()))


def brute_force_pairs(anchor_classes, ref_classes, exclude_self):
    positives, negatives = set(), set()
    for i, j in itertools.product(range(len(anchor_classes)), range(len(ref_classes))):
        if anchor_classes[i] != ref_classes[j]:
            negatives.add((i, j))
        elif not (exclude_self and i == j):
            positives.add((i, j))
    return positives, negatives


@pytest.mark.parametrize("dtype", DTYPES)
def test_perfect_prototypes_mine_exactly_the_class_pairs(device, dtype):
    memory, classes = separated_memory(device, dtype)
    batch = torch.tensor([0, 4, 5, 8, 9, 10, 14, 17, 20])
    embeddings = torch.randn(len(batch), 5, device=device, dtype=dtype)
    a1, p, a2, n = ProtoOTMiner(memory, positives="agreement")(embeddings, batch.to(device))
    positives, negatives = pair_sets(a1, p, a2, n)
    batch_classes = classes[batch].tolist()
    expected_pos, expected_neg = brute_force_pairs(batch_classes, batch_classes, exclude_self=True)
    assert positives == expected_pos and negatives == expected_neg
    assert a1.device.type == torch.device(device).type
    # The batch mixes domains, so cross-domain positives are part of the check.
    assert any(memory.domain_of[batch[i]] != memory.domain_of[batch[j]] for i, j in positives)


@pytest.mark.parametrize("dtype", DTYPES)
def test_with_ref_emb_every_query_key_pair_of_a_sample_is_positive(device, dtype):
    memory, classes = separated_memory(device, dtype)
    batch = torch.tensor([1, 2, 3, 11, 12, 13])
    refs = torch.tensor([2, 3, 13, 19, 1, 12, 11])
    embeddings = torch.randn(len(batch), 5, device=device, dtype=dtype)
    ref_emb = torch.randn(len(refs), 5, device=device, dtype=dtype)
    mined = ProtoOTMiner(memory, positives="agreement")(embeddings, batch.to(device), ref_emb, refs.to(device))
    positives, negatives = pair_sets(*mined)
    expected = brute_force_pairs(classes[batch].tolist(), classes[refs].tolist(), exclude_self=False)
    assert (positives, negatives) == expected
    all_pairs = itertools.product(range(len(batch)), range(len(refs)))
    same_sample = {(i, j) for i, j in all_pairs if batch[i] == refs[j]}
    assert same_sample and same_sample <= positives


def test_triplets_are_every_anchor_positive_negative_combination(device):
    memory, classes = separated_memory(device, torch.float32)
    batch = torch.tensor([0, 1, 3, 9, 10, 12, 13])
    anchors, positives, negatives = ProtoOTMiner(memory, positives="agreement", type_of_tuple="triplets")(
        torch.randn(len(batch), 5, device=device), batch.to(device)
    )
    y = classes[batch].tolist()
    expected = {
        (a, p, n)
        for a, p, n in itertools.product(range(len(y)), repeat=3)
        if a != p and y[a] == y[p] and y[a] != y[n]
    }
    assert set(zip(anchors.tolist(), positives.tolist(), negatives.tolist())) == expected


def test_cross_domain_false_mines_same_domain_pairs_only(device):
    memory, classes = separated_memory(device, torch.float32)
    batch = torch.tensor([0, 4, 5, 9, 10, 13])
    miner = ProtoOTMiner(memory, positives="agreement", cross_domain=False)
    mined = miner(torch.randn(len(batch), 5, device=device), batch.to(device))
    domain = memory.domain_of.cpu()[batch]
    batch_classes = classes[batch].tolist()
    expected_pos, expected_neg = brute_force_pairs(batch_classes, batch_classes, exclude_self=True)
    same_domain = {(i, j) for i, j in itertools.product(range(len(batch)), repeat=2) if domain[i] == domain[j]}
    assert pair_sets(*mined) == (expected_pos & same_domain, expected_neg & same_domain)


def reference_pairs(memory, batch, refs=None):
    """The documented agreement rule, pair by pair, from memory.pseudo_labels (no shared code with
    the miner). ``refs=None``: the batch against itself, an embedding never its own positive."""
    domain_of, row_of = memory.domain_of.tolist(), memory.row_of.tolist()
    labels = {
        (a, b): memory.pseudo_labels(a, prototype_domain=b).tolist()
        for a in range(memory.num_domains)
        for b in range(memory.num_domains)
    }
    self_reference, refs = refs is None, batch if refs is None else refs
    positives, negatives, one_sided = set(), set(), 0
    for i, j in itertools.product(range(len(batch)), range(len(refs))):
        a, b = domain_of[batch[i]], domain_of[refs[j]]
        ri, rj = row_of[batch[i]], row_of[refs[j]]
        i_agrees = labels[(a, b)][ri] == labels[(b, b)][rj]
        j_agrees = labels[(b, a)][rj] == labels[(a, a)][ri]
        if i_agrees and j_agrees and not (self_reference and i == j):
            positives.add((i, j))
        elif not i_agrees and not j_agrees:
            negatives.add((i, j))
        one_sided += i_agrees != j_agrees
    return positives, negatives, one_sided


def random_memory(device):
    torch.manual_seed(3)
    domains = torch.tensor([0] * 15 + [1] * 10 + [2] * 12)
    memory = PrototypeMemory(domains, dim=6, num_prototypes=4, kmeans_nredo=1)
    memory.fill(F.normalize(torch.randn(len(domains), 6), dim=1), torch.arange(len(domains)))
    memory.recluster(0)
    return memory.to(device), len(domains)


def test_random_memory_matches_plain_loop_reference_and_drops_one_sided_pairs(device):
    memory, size = random_memory(device)
    batch = torch.randperm(size)[:16]
    miner = ProtoOTMiner(memory, positives="agreement")
    positives, negatives = pair_sets(*miner(torch.randn(16, 6, device=device), batch.to(device)))
    expected_pos, expected_neg, one_sided = reference_pairs(memory, batch.tolist())
    assert (positives, negatives) == (expected_pos, expected_neg)
    assert one_sided > 0, "the data must contain one-sided pairs for this test to check their exclusion"


def test_instance_positives_are_views_of_one_sample_and_negatives_keep_the_rule(device):
    memory, size = random_memory(device)
    samples = torch.randperm(size)[:8].tolist()
    two_views = samples + samples  # PML's two-view layout: both views, equal indices
    mined = ProtoOTMiner(memory)(torch.randn(16, 6, device=device), torch.tensor(two_views, device=device))
    expected_pos = {(i, j) for i in range(16) for j in range(16) if i != j and two_views[i] == two_views[j]}
    _, expected_neg, _ = reference_pairs(memory, two_views)
    assert pair_sets(*mined) == (expected_pos, expected_neg)
    assert len(expected_pos) == 16


def test_instance_positives_with_momentum_keys_as_references(device):
    memory, size = random_memory(device)
    batch, refs = torch.randperm(size)[:8].tolist(), torch.randperm(size)[:12].tolist()
    refs[3] = batch[5]  # at least one shared sample
    mined = ProtoOTMiner(memory)(
        torch.randn(8, 6, device=device), torch.tensor(batch, device=device),
        torch.randn(12, 6, device=device), torch.tensor(refs, device=device),
    )
    expected_pos = {(i, j) for i in range(8) for j in range(12) if batch[i] == refs[j]}
    _, expected_neg, _ = reference_pairs(memory, batch, refs)
    assert pair_sets(*mined) == (expected_pos, expected_neg)
    agreement = ProtoOTMiner(memory, positives="agreement")(
        torch.randn(8, 6, device=device), torch.tensor(batch, device=device),
        torch.randn(12, 6, device=device), torch.tensor(refs, device=device),
    )
    assert pair_sets(*agreement)[0] > expected_pos  # agreement adds pseudo-label pairs


def test_momentum_keys_without_ref_labels_share_the_queries_indices(device):
    """ref_labels=None with ref_emb means "the same indices as labels", as ProtoOTLoss takes it: the
    (query i, key i) diagonal stays positive, where PML's own miners leave it out."""
    memory, size = random_memory(device)
    batch = torch.randperm(size)[:8].to(device)
    queries, keys = torch.randn(8, 6, device=device), torch.randn(8, 6, device=device)
    given = ProtoOTMiner(memory)(queries, batch, keys, batch.clone())
    omitted = ProtoOTMiner(memory)(queries, batch, keys)
    assert all(torch.equal(a, b) for a, b in zip(given, omitted))
    assert pair_sets(*omitted)[0] == {(i, i) for i in range(8)}
    pml_pairs = lmu.get_all_pairs_indices(batch, None)  # PML drops the diagonal: no positive at all
    assert len(pml_pairs[0]) == 0
    with pytest.raises(ValueError, match="ref_labels=None means ref_emb holds the keys of labels' samples, one per "
                                         "label \\(8\\), got 5 rows"):
        ProtoOTMiner(memory)(queries, batch, keys[:5])


def test_ref_labels_of_the_embeddings_themselves_must_be_their_labels(device):
    """ref_emb is embeddings: a row's index cannot differ between the two sides; equal copies are fine."""
    memory, size = random_memory(device)
    batch = torch.tensor([0, 1, 2, 0, 1, 2], device=device)  # two views each: positives off the diagonal
    embeddings = torch.randn(6, 6, device=device)
    same = ProtoOTMiner(memory)(embeddings, batch, embeddings, batch.clone())
    assert all(torch.equal(a, b) for a, b in zip(same, ProtoOTMiner(memory)(embeddings, batch)))
    with pytest.raises(ValueError, match="ref_emb is embeddings, so ref_labels must be None or equal to labels"):
        ProtoOTMiner(memory)(embeddings, batch, embeddings, batch.flip(0))


def test_instance_positives_warn_when_no_sample_repeats(device):
    memory, _ = separated_memory(device, torch.float32)
    with pytest.warns(UserWarning, match="no positive pair") as caught:
        a1, _, a2, _ = ProtoOTMiner(memory)(torch.randn(4, 5, device=device), torch.tensor([0, 1, 10, 11]))
    assert len(a1) == 0 and len(a2) > 0
    assert caught[0].filename == __file__  # the user's call, not torch's Module.__call__


def test_update_prototypes_moves_them_to_assignment_weighted_bank_means(device):
    memory, _ = separated_memory(device, torch.float64)
    memory.prototypes.add_(0.1 * torch.randn_like(memory.prototypes))
    expected = []
    for slot in range(memory.num_domains):
        bank, assignment = memory.bank(slot), memory.assign(slot)
        means = torch.stack([(assignment[:, k : k + 1] * bank).sum(0) for k in range(memory.num_prototypes)])
        expected.append(means / means.norm(dim=1, keepdim=True))
    miner = ProtoOTMiner(memory, positives="agreement", update_prototypes=True)
    miner(torch.randn(4, 5, device=device), torch.tensor([0, 1, 10, 11]))
    torch.testing.assert_close(memory.prototypes, torch.stack(expected))


def test_update_prototypes_mines_with_the_prototypes_before_the_update(device):
    """Every domain's own and cross labels come from one set of prototypes, those before the step: the
    mined tuples equal those of a miner that updates nothing, on a copy of the memory."""
    memory, size = random_memory(device)
    memory.prototypes.add_(0.3 * torch.randn_like(memory.prototypes))  # far from a fixed point: updates move them
    frozen = copy.deepcopy(memory)
    batch, embeddings = torch.randperm(size)[:20].to(device), torch.randn(20, 6, device=device)
    updated = ProtoOTMiner(memory, positives="agreement", update_prototypes=True)(embeddings, batch)
    expected = ProtoOTMiner(frozen, positives="agreement")(embeddings, batch)
    assert not torch.equal(memory.prototypes, frozen.prototypes)
    assert all(torch.equal(got, want) for got, want in zip(updated, expected))


def test_without_update_prototypes_memory_is_untouched(device):
    memory, _ = separated_memory(device, torch.float32)
    before = {k: v.clone() for k, v in memory.state_dict().items()}
    ProtoOTMiner(memory, positives="agreement")(torch.randn(4, 5, device=device), torch.tensor([0, 1, 10, 11]))
    for key, value in memory.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_pml_loss_trains_on_mined_pairs(device):
    memory, _ = separated_memory(device, torch.float32)
    batch = torch.tensor([0, 1, 2, 3, 9, 10, 11, 12])
    embeddings = torch.randn(len(batch), 5, device=device, requires_grad=True)
    mined = ProtoOTMiner(memory, positives="agreement")(embeddings, batch.to(device))
    loss = NTXentLoss()(embeddings, batch.to(device), mined)
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(embeddings.grad).all() and embeddings.grad.abs().sum() > 0


def test_index_lists_are_taken_as_the_loss_takes_them(device):
    memory, _ = separated_memory(device, torch.float32)
    indices = [0, 1, 2, 8, 9, 10]
    embeddings = torch.randn(6, memory.dim, device=device)
    from_list = ProtoOTMiner(memory)(embeddings, indices, embeddings.clone(), indices)
    from_tensor = ProtoOTMiner(memory)(embeddings, torch.tensor(indices), embeddings.clone(), torch.tensor(indices))
    assert all(torch.equal(a, b) for a, b in zip(from_list, from_tensor))


def test_bad_input_is_rejected_with_the_argument_name(device):
    memory, _ = separated_memory(device, torch.float32)
    with pytest.raises(ValueError, match="type_of_tuple"):
        ProtoOTMiner(memory, type_of_tuple="quadruplets")
    with pytest.raises(ValueError, match="positives"):
        ProtoOTMiner(memory, positives="pseudo_labels")
    with pytest.raises(TypeError, match="memory must be a PrototypeMemory, got NoneType"):
        ProtoOTMiner(None)
    with pytest.raises(ValueError, match="ProtoOTMiner needs a memory with at least 2 prototypes per domain, got "
                                         "num_prototypes=1"):  # every pair would share its prototype: no negatives
        ProtoOTMiner(PrototypeMemory([0, 0, 1, 1], dim=2, num_prototypes=1))
    with pytest.raises(TypeError, match="cross_domain must be True or False, got 'no'"):
        ProtoOTMiner(memory, cross_domain="no")
    with pytest.raises(TypeError, match="update_prototypes must be True or False"):
        ProtoOTMiner(memory, update_prototypes=None)
    miner = ProtoOTMiner(memory)
    embeddings = torch.randn(2, 5, device=device)
    with pytest.raises(TypeError, match="labels"):
        miner(embeddings, torch.tensor([0.0, 1.0], device=device))
    with pytest.raises(ValueError, match="labels"):
        miner(embeddings, torch.tensor([0, 999], device=device))
    with pytest.raises(ValueError, match="ref_labels"):
        miner(embeddings, torch.tensor([0, 1]), torch.randn(1, 5, device=device), torch.tensor([-1]))
    fresh = PrototypeMemory([0, 0, 1, 1], dim=5, num_prototypes=2)
    with pytest.raises(ValueError, match="reclustered"):
        ProtoOTMiner(fresh)(torch.randn(2, 5), torch.tensor([0, 2]))


def test_the_prototype_update_runs_outside_the_callers_autocast():
    """A PML loop may run the miner inside torch.autocast: the memory's state is computed in its own dtype."""
    memory, _ = separated_memory("cpu", torch.float32)
    expected = copy.deepcopy(memory)
    indices = torch.tensor([0, 1, 2, 8, 9, 10]).repeat(2)  # two views of six samples
    embeddings = torch.randn(12, memory.dim)
    ProtoOTMiner(expected, update_prototypes=True)(embeddings, indices)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ProtoOTMiner(memory, update_prototypes=True)(embeddings, indices)
    assert torch.equal(memory.prototypes, expected.prototypes)


def test_class_labels_instead_of_sample_indices_warn_once(device):
    memory, _ = random_memory(device)
    miner = ProtoOTMiner(memory)
    embeddings = torch.randn(36, 6, device=device)
    class_labels = torch.tensor([0, 1, 2, 1] * 9, device=device)
    with pytest.warns(UserWarning, match="labels look like class labels: every value is below 7 .* and 1 occurs "
                                         "18 times") as caught:
        miner(embeddings, class_labels)
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        miner(embeddings, class_labels)  # once per miner
        ProtoOTMiner(memory)(embeddings, torch.randperm(37, device=device)[:18].repeat(2))  # two views of samples


def test_the_miner_steps_a_refreshing_memory_as_the_loss_does(device):
    """With update_prototypes and refresh_every=R, the miner's labels, prototypes and refresh caches are
    those of the memory's own step methods, which solve the full OT only at refreshes (it ran D x D every step)."""
    memory = separated_memory(device, torch.float32, refresh_every=3)[0]
    reference = copy.deepcopy(memory)
    miner = ProtoOTMiner(memory, update_prototypes=True, positives="agreement")
    solved = []
    sinkhorn = memory._sinkhorn
    memory._sinkhorn = lambda domain, scores, **options: solved.append(domain) or sinkhorn(domain, scores, **options)
    indices = torch.tensor([0, 4, 10, 20], device=device)
    counts = []
    for step in range(4):
        solved.clear()
        slots, own, cross = miner._step_pseudo_labels(indices)
        expected_cross = {(0, 1): reference._cross_pseudo_labels(0, 1, torch.tensor([0, 4], device=device)),
                          (1, 0): reference._cross_pseudo_labels(1, 0, torch.tensor([1, 11], device=device))}
        expected_own = [reference._step_pseudo_labels(0, torch.tensor([0, 4], device=device)),
                        reference._step_pseudo_labels(1, torch.tensor([1, 11], device=device))]
        counts.append(len(solved))
        assert own.tolist() == torch.cat(expected_own).tolist()
        assert cross[:2, 1].tolist() == expected_cross[(0, 1)].tolist()
        assert cross[2:, 0].tolist() == expected_cross[(1, 0)].tolist()
        for name in ("prototypes", "column_potentials", "refresh_countdown", "potentials_valid"):
            assert torch.equal(getattr(memory, name), getattr(reference, name)), (step, name)
    # A refresh solves the D own plans; the cross plans of a refreshed bank follow at their next use
    # (none is cached at the first step). D x D = 4 full plans a step before.
    assert counts == [4, 2, 0, 2]
