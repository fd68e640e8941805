"""ProtoOTLoss against a loop re-implementation of the official ProtoOT loss (HCVLab/ProtoOT builder.py)."""
import logging
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance
from pytorch_metric_learning.reducers import DoNothingReducer, SumReducer
from pytorch_metric_learning.samplers import MPerClassSampler

from pml_protoot.losses import ProtoOTLoss
from pml_protoot.memory import PrototypeMemory, warn_if_class_labels
from pml_protoot.samplers import CrossDomainSampler
from references import assert_memory_on, official_sinkhorn

DIM, K = 5, 3


# ----------------------------------------------------------------------------- reference


def ot_assignment(bank, prototypes, beta, normalize_scores, epsilon):
    scores = bank @ prototypes.T
    if normalize_scores:
        scores = torch.stack([row / math.sqrt(sum(float(s) ** 2 for s in row)) for row in scores])
    return official_sinkhorn(scores, beta, epsilon).to(scores.dtype)


def contrast(query, positive_logit, negative_logits, target, temperature):
    """-log softmax of the positive against every negative but the target's, written out."""
    positive = math.exp(positive_logit / temperature)
    negatives = sum(math.exp(float(negative_logits[j]) / temperature) for j in range(len(negative_logits)) if j != target)
    return -math.log(positive / (positive + negatives))


def reference_loss(state, domains, queries, keys, labels, *, official, cross_weight, start_epoch,
                   temperature=0.2, weights=(1.0, 0.5, 0.1)):
    """Loop re-implementation of the official loss; returns (total loss, updated prototypes).

    ``official=False`` flips exactly the documented switches: nearest neighbour by key,
    Sinkhorn epsilon 0.1 instead of 0.05 on raw scores, raw cross-domain negatives.
    ``state`` is a memory state_dict (float64, CPU); ``queries``/``keys`` are float64 and
    L2-normalised here.
    """
    queries = torch.stack([q / math.sqrt(float(q @ q)) for q in queries.double().cpu()])
    keys = torch.stack([k / math.sqrt(float(k @ k)) for k in keys.double().cpu()])
    distinct = sorted(set(domains))
    slot_of = [distinct.index(d) for d in domains]
    row_of = [domains[:i].count(d) for i, d in enumerate(domains)]
    banks = [state[f"bank_{slot}"].double().clone() for slot in range(len(distinct))]
    prototypes = state["prototypes"].double().clone()
    betas = state["class_marginals"].double()
    for position, index in enumerate(labels):  # keys are written before any loss term
        banks[slot_of[index]][row_of[index]] = keys[position]
    present = sorted({slot_of[index] for index in labels})
    members = {d: [p for p, index in enumerate(labels) if slot_of[index] == d] for d in present}
    total = 0.0
    epsilon = 0.05 if official else 0.1
    for d in present:
        assignment = ot_assignment(banks[d], prototypes[d], betas[d], normalize_scores=official, epsilon=epsilon)
        domain_sum = 0.0
        for p in members[d]:
            q, row = queries[p], row_of[labels[p]]
            target = int(assignment[row].argmax())
            anchor = q if official else keys[p]
            neighbour = max((r for r in range(len(banks[d])) if r != row), key=lambda r: float(anchor @ banks[d][r]))
            negative_logits = [float(q @ c) for c in prototypes[d]]
            for weight, positive in zip(weights, (keys[p], banks[d][neighbour], prototypes[d][target])):
                domain_sum += weight * contrast(q, float(q @ positive), negative_logits, target, temperature)
        total += domain_sum / len(members[d])
        updated = assignment.T @ banks[d]
        prototypes[d] = torch.stack([c / math.sqrt(float(c @ c)) for c in updated])
    if int(state["epoch"]) >= start_epoch and len(present) > 1:
        for d in present:
            others = [o for o in present if o != d]
            targets = {o: ot_assignment(banks[d], prototypes[o], betas[d], official, epsilon) for o in others}
            domain_sum = 0.0
            for p in members[d]:
                q, row = queries[p], row_of[labels[p]]
                per_other = 0.0
                for o in others:
                    target = int(targets[o][row].argmax())
                    logits = [float(q @ c) for c in prototypes[o]]
                    norm = math.sqrt(sum(v * v for v in logits))
                    negative_logits = [v / norm for v in logits] if official else logits
                    per_other += contrast(q, logits[target], negative_logits, target, temperature)
                domain_sum += per_other / len(others)
            total += cross_weight * domain_sum / len(members[d])
    return total, prototypes


# ----------------------------------------------------------------------------- fixtures
def random_memory(domains, dtype=torch.float64, device="cpu", epoch=5, seed=0, dim=DIM, num_prototypes=K, **options):
    """A ready memory with random banks, prototypes and marginals (no K-means needed)."""
    generator = torch.Generator().manual_seed(seed)
    memory = PrototypeMemory(domains, dim, num_prototypes, **options).to(device=device, dtype=dtype)
    memory.fill(F.normalize(torch.randn(len(domains), dim, generator=generator, dtype=dtype), dim=1).to(device),
                torch.arange(len(domains)))
    num_domains = len(set(domains))
    prototypes = torch.randn(num_domains, num_prototypes, dim, generator=generator, dtype=dtype)
    memory.prototypes.copy_(F.normalize(prototypes, dim=2))
    marginals = torch.randn(num_domains, num_prototypes, generator=generator, dtype=dtype)
    memory.class_marginals.copy_(torch.softmax(marginals, dim=1))
    memory.epoch.fill_(epoch)
    return memory


def random_batch(labels, dtype=torch.float64, device="cpu", seed=1, dim=DIM):
    """Raw (not normalised) queries and keys, as encoders would give them."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = (3 * torch.randn(len(labels), dim, generator=generator, dtype=torch.float64)).to(device, dtype)
    keys = (3 * torch.randn(len(labels), dim, generator=generator, dtype=torch.float64)).to(device, dtype)
    return embeddings.requires_grad_(), keys, torch.tensor(labels, device=device)


TWO_DOMAINS = [0] * 9 + [1] * 7
BATCH = [3, 12, 0, 15, 8, 9, 1]  # shuffled, both domains


def cpu_state(memory):
    return {name: buffer.cpu() for name, buffer in memory.state_dict().items()}


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("official", [True, False])
@pytest.mark.parametrize("epoch", [4, 5])
def test_loss_matches_loop_reference_float64(official, epoch, device):
    memory = random_memory(TWO_DOMAINS, device=device, epoch=epoch)
    loss_func = ProtoOTLoss(memory, cross_domain_weight=0.7, cross_domain_start_epoch=5, official=official)
    embeddings, keys, labels = random_batch(BATCH, device=device)
    expected, expected_prototypes = reference_loss(cpu_state(memory), TWO_DOMAINS, embeddings.detach(), keys,
                                                   BATCH, official=official, cross_weight=0.7, start_epoch=5)
    loss = loss_func(embeddings, labels, ref_emb=keys)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - expected) < 1e-5
    torch.testing.assert_close(memory.prototypes.cpu(), expected_prototypes, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.float16, 3e-2)])
@pytest.mark.parametrize("official", [True, False])
def test_loss_matches_reference_in_lower_precision(dtype, tolerance, official, device):
    memory = random_memory(TWO_DOMAINS, dtype=torch.float32, device=device)
    loss_func = ProtoOTLoss(memory, cross_domain_weight=0.7, cross_domain_start_epoch=0, official=official)
    embeddings, keys, labels = random_batch(BATCH, dtype=dtype, device=device)
    expected, _ = reference_loss(cpu_state(memory), TWO_DOMAINS, embeddings.detach(), keys, BATCH,
                                 official=official, cross_weight=0.7, start_epoch=0)
    loss = loss_func(embeddings, labels, ref_emb=keys)
    assert loss.dtype == dtype
    assert abs(loss.item() - expected) < tolerance * max(1.0, abs(expected))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory_dtype", [torch.float32, torch.float16])
def test_a_zero_key_or_query_in_half_precision_stays_a_zero_row(dtype, memory_dtype, device):
    """F.normalize of a zero row is the zero row in float32; in float16 its eps underflows: the call failed
    with "keys must be finite" (keys the caller never passed), or with a float16 memory gave a NaN loss."""
    memory = random_memory(TWO_DOMAINS, dtype=memory_dtype, device=device)
    embeddings, keys, labels = random_batch(BATCH, dtype=dtype, device=device)
    with torch.no_grad():
        keys[0], embeddings[1] = 0, 0
    loss = ProtoOTLoss(memory, cross_domain_start_epoch=0)(embeddings, labels, ref_emb=keys)
    slot, row = int(memory.domain_of[labels[0]]), int(memory.row_of[labels[0]])
    assert torch.isfinite(loss) and not memory.bank(slot)[row].any()  # (a zero query's gradient is 1/eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_embeddings_and_memory_compute_in_float32(dtype, device):
    """The package's dtype rule: half precision in, float32 arithmetic inside. The same rounded inputs,
    upcast, give the same loss and gradient to float32 rounding; with both embeddings and memory in
    half precision the logits, softmax and logsumexp ran in it (a gradient error of about eps, 4x this one)."""
    domains, size = [0] * 40 + [1] * 40, {"dim": 64, "num_prototypes": 20}
    memory = random_memory(domains, dtype=dtype, device=device, **size)
    upcast_memory = random_memory(domains, dtype=dtype, device=device, **size).float()
    batch = list(range(0, 80, 2))
    embeddings, keys, labels = random_batch(batch, dtype=dtype, device=device, dim=64)
    upcast = embeddings.detach().float().requires_grad_()
    loss = ProtoOTLoss(memory, cross_domain_start_epoch=0, temperature=0.05)(embeddings, labels, ref_emb=keys)
    expected = ProtoOTLoss(upcast_memory, cross_domain_start_epoch=0, temperature=0.05)(
        upcast, labels, ref_emb=keys.float()
    )
    loss.backward()
    expected.backward()
    assert loss.dtype == dtype
    assert abs(loss.item() - expected.item()) < 4 * torch.finfo(dtype).eps * abs(expected.item())
    error = (embeddings.grad.float() - upcast.grad).norm() / upcast.grad.norm()
    assert error < torch.finfo(dtype).eps / 2  # the unit roundoff of the gradient's own rounding to dtype


def test_three_domains_match_reference_with_mean_over_other_domains(device):
    domains = [2, 0, 1, 2, 0, 1, 2, 0, 1, 0, 2, 1, 1]
    memory = random_memory(domains, device=device)
    loss_func = ProtoOTLoss(memory, cross_domain_weight=0.5, cross_domain_start_epoch=0)
    for batch in ([0, 1, 2, 9, 12, 4], [0, 3, 1, 7]):  # all three domains; then only two of them
        embeddings, keys, labels = random_batch(batch, device=device)
        expected, _ = reference_loss(cpu_state(memory), domains, embeddings.detach(), keys, batch,
                                     official=False, cross_weight=0.5, start_epoch=0)
        assert abs(loss_func(embeddings, labels, ref_emb=keys).item() - expected) < 1e-5


def test_one_domain_batch_has_no_cross_domain_term(device):
    memory = random_memory(TWO_DOMAINS, device=device)
    loss_func = ProtoOTLoss(memory, cross_domain_start_epoch=0, reducer=DoNothingReducer())
    batch = [10, 14, 9]
    embeddings, keys, labels = random_batch(batch, device=device)
    expected, _ = reference_loss(cpu_state(memory), TWO_DOMAINS, embeddings.detach(), keys, batch,
                                 official=False, cross_weight=0.01, start_epoch=0)
    loss_dict = loss_func(embeddings, labels, ref_emb=keys)
    assert loss_dict["cross_domain"]["losses"] == 0
    assert loss_dict["cross_domain"]["reduction_type"] == "already_reduced"
    in_domain = loss_dict["in_domain"]["losses"]
    assert torch.isfinite(in_domain).all()
    assert abs(in_domain.mean().item() - expected) < 1e-5


def test_sub_losses_reduce_like_any_pml_loss(device):
    """Per-element losses are scaled by B / n_d: the mean is the sum over domains of per-domain means."""
    state = cpu_state(random_memory(TWO_DOMAINS, epoch=0))
    results = {}
    for name, reducer in [("mean", None), ("nothing", DoNothingReducer()), ("sum", SumReducer())]:
        memory = random_memory(TWO_DOMAINS, device=device)
        memory.load_state_dict(state)
        loss_func = ProtoOTLoss(memory, cross_domain_weight=0.3, cross_domain_start_epoch=0, reducer=reducer)
        embeddings, keys, labels = random_batch(BATCH, device=device)
        results[name] = loss_func(embeddings, labels, ref_emb=keys)
    losses = results["nothing"]
    assert set(losses) == {"in_domain", "cross_domain"}
    for sub_loss in losses.values():
        assert sub_loss["reduction_type"] == "element"
        assert sub_loss["indices"].tolist() == list(range(len(BATCH)))
    in_domain, cross = losses["in_domain"]["losses"], losses["cross_domain"]["losses"]
    torch.testing.assert_close(results["mean"], in_domain.mean() + cross.mean())
    torch.testing.assert_close(results["sum"], in_domain.sum() + cross.sum())
    in_domain_only, _ = reference_loss(state, TWO_DOMAINS, embeddings.detach(), keys, BATCH, official=False,
                                       cross_weight=0.3, start_epoch=1)
    assert abs(in_domain.mean().item() - in_domain_only) < 1e-5


def test_presets_differ_only_in_documented_switches(device):
    """Default preset with the documented switches flipped equals the official preset exactly."""
    results = []
    for official in (True, False):
        memory = random_memory(TWO_DOMAINS, device=device)
        options = {} if official else {"nearest_neighbour_by": "query", "normalize_cross_negatives": True}
        loss_func = ProtoOTLoss(memory, cross_domain_start_epoch=0, cross_domain_weight=0.5, official=official,
                                **options)
        if not official:
            memory.epsilon, memory.normalize_scores, memory.marginal_rule = 0.05, True, "official"
        embeddings, keys, labels = random_batch(BATCH, device=device)
        results.append((loss_func(embeddings, labels, ref_emb=keys), memory.prototypes.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    default_memory = random_memory(TWO_DOMAINS, device=device)
    default_loss = ProtoOTLoss(default_memory, cross_domain_start_epoch=0, cross_domain_weight=0.5)
    embeddings, keys, labels = random_batch(BATCH, device=device)
    assert not torch.allclose(default_loss(embeddings, labels, ref_emb=keys), results[0][0])


def test_official_preset_configures_the_memory_and_logs(caplog):
    memory = random_memory(TWO_DOMAINS, reset_prototypes=True)  # the preset overrides an explicit choice
    settings = ("epsilon", "normalize_scores", "marginal_rule", "reset_prototypes", "neighbour_search")
    assert [getattr(memory, name) for name in settings] == [0.1, False, "uniform", True, "auto"]
    with caplog.at_level(logging.INFO, logger="pml_protoot.losses"):
        loss_func = ProtoOTLoss(memory, official=True)
    assert [getattr(memory, name) for name in settings] == [0.05, True, "official", False, "exact"]
    assert (loss_func.nearest_neighbour_by, loss_func.normalize_cross_negatives) == ("query", True)
    expected = "official=True: setting memory.epsilon=0.05 (was 0.1), memory.normalize_scores=True (was False)"
    assert expected in caplog.text
    assert "memory.reset_prototypes=False (was True)" in caplog.text


def test_cross_domain_term_starts_at_start_epoch():
    weights = []
    for epoch in (99, 100, 150):
        memory = random_memory(TWO_DOMAINS, epoch=epoch)
        weights.append(ProtoOTLoss(memory).current_cross_domain_weight())
    assert weights == [0.0, 0.01, 0.01]


def test_an_empty_kmeans_cluster_gives_a_zero_marginal_that_training_steps_through():
    """Duplicate images leave a K-means cluster empty: with the official marginal rule beta_k = 0, Sinkhorn's
    column k has no mass, and the prototype update takes it as it is."""
    torch.manual_seed(0)
    memory = PrototypeMemory([0] * 6 + [1] * 6, dim=4, num_prototypes=3, kmeans_nredo=1)
    loss_func = ProtoOTLoss(memory, official=True)
    distinct = F.normalize(torch.randn(2, 4), dim=1)  # domain 0: 2 distinct keys, 3 clusters
    keys = torch.cat([distinct.repeat(3, 1), F.normalize(torch.randn(6, 4), dim=1)])
    memory.fill(keys, torch.arange(12))
    memory.recluster(epoch=0)
    assert (memory.class_marginals[0] == 0).any()
    indices = torch.tensor([0, 1, 6, 7])
    assert torch.isfinite(loss_func(F.normalize(torch.randn(4, 4), dim=1), indices, ref_emb=keys[indices]))


def test_record_keeper_sees_the_cross_domain_weight_in_use():
    """record-keeper logs the attributes in _record_these every iteration: the configured lambda is 0.01
    throughout, the weight in use 0 until the start epoch."""
    for epoch, in_use in ((99, 0.0), (100, 0.01)):
        loss_func = ProtoOTLoss(random_memory(TWO_DOMAINS, epoch=epoch))
        embeddings, keys, labels = random_batch(BATCH)
        loss_func(embeddings, labels, ref_emb=keys)
        recorded = {name: getattr(loss_func, name) for name in loss_func._record_these}
        assert recorded["cross_domain_weight"] == 0.01 and recorded["cross_domain_weight_in_use"] == in_use


# ----------------------------------------------------------------------------- gradients and state
def test_gradients_reach_embeddings_only(device):
    memory = random_memory(TWO_DOMAINS, device=device, epoch=0)
    loss_func = ProtoOTLoss(memory, cross_domain_start_epoch=0)
    embeddings, keys, labels = random_batch(BATCH, device=device)
    keys.requires_grad_()
    loss_func(embeddings, labels, ref_emb=keys).backward()
    assert embeddings.grad is not None and torch.isfinite(embeddings.grad).all() and embeddings.grad.abs().sum() > 0
    assert keys.grad is None
    assert all(not buffer.requires_grad for buffer in memory.buffers())


def test_gradcheck_small_double_case():
    memory = random_memory(TWO_DOMAINS, epoch=0)
    loss_func = ProtoOTLoss(memory, cross_domain_weight=0.5, cross_domain_start_epoch=0, official=True)
    state = {name: buffer.clone() for name, buffer in memory.state_dict().items()}
    embeddings, keys, labels = random_batch([2, 10, 5, 13])

    def loss_from_fresh_memory(embeddings):
        memory.load_state_dict(state)  # each call writes keys and updates prototypes
        return loss_func(embeddings, labels, ref_emb=keys)

    assert torch.autograd.gradcheck(loss_from_fresh_memory, (embeddings,))


def test_state_round_trip_gives_identical_losses(device):
    memory = random_memory(TWO_DOMAINS, epoch=0)
    loss_func = ProtoOTLoss(memory, cross_domain_start_epoch=0)
    embeddings, keys, labels = random_batch(BATCH)
    fresh_memory = PrototypeMemory(TWO_DOMAINS, DIM, K).double()
    fresh_loss = ProtoOTLoss(fresh_memory, cross_domain_start_epoch=0)
    fresh_loss.load_state_dict(loss_func.state_dict())  # the memory is a submodule of the loss
    fresh_loss.to(device)
    assert_memory_on(fresh_memory, device)
    on_device = fresh_loss(embeddings.detach().to(device), labels.to(device), ref_emb=keys.to(device))
    torch.testing.assert_close(on_device.cpu(), loss_func(embeddings.detach(), labels, ref_emb=keys))
    torch.testing.assert_close(fresh_memory.prototypes.cpu(), memory.prototypes)


# ----------------------------------------------------------------------------- bad input
def bad_calls():
    embeddings, keys, labels = random_batch(BATCH)
    nan_embeddings = embeddings.detach().clone()
    nan_embeddings[1, 2] = float("nan")
    inf_keys = keys.clone()
    inf_keys[0, 0] = float("inf")
    return [
        ("2-D labels", (embeddings, labels[None]), {"ref_emb": keys}, ValueError, "labels must be 1-D"),
        ("float labels", (embeddings, labels.double()), {"ref_emb": keys}, TypeError, "labels must hold integers"),
        ("labels out of range", (embeddings, labels + 10), {"ref_emb": keys}, ValueError, r"labels must lie in \[0, 16\)"),
        ("no labels", (embeddings,), {"ref_emb": keys}, ValueError, "labels must be the"),
        ("labels length", (embeddings, labels[:3]), {"ref_emb": keys}, ValueError, "labels must have length 7"),
        ("missing ref_emb", (embeddings, labels), {}, ValueError, "ref_emb must be the .* keys"),
        ("ref_emb rows", (embeddings, labels), {"ref_emb": keys[:3]}, ValueError, r"ref_emb must have shape \(7, 5\)"),
        ("embeddings dim", (embeddings[:, :4], labels), {"ref_emb": keys}, ValueError, r"embeddings must have shape .*5\), got \(7, 4\)"),
        ("ref_emb dim", (embeddings, labels), {"ref_emb": keys[:, :4]}, ValueError, "ref_emb must have shape"),
        ("NaN embeddings", (nan_embeddings, labels), {"ref_emb": keys}, ValueError, "embeddings must be finite"),
        ("inf keys", (embeddings, labels), {"ref_emb": inf_keys}, ValueError, "ref_emb must be finite"),
        ("indices_tuple", (embeddings, labels, (labels, labels, labels)), {"ref_emb": keys}, ValueError,
         "indices_tuple must be None"),
        ("ref_labels", (embeddings, labels), {"ref_emb": keys, "ref_labels": labels.flip(0)}, ValueError,
         "ref_labels must be None or equal to labels"),
    ]


@pytest.mark.parametrize("case", range(len(bad_calls())), ids=[case[0] for case in bad_calls()])
def test_bad_input_raises_and_writes_nothing(case):
    _, args, kwargs, error, message = bad_calls()[case]
    memory = random_memory(TWO_DOMAINS)
    loss_func = ProtoOTLoss(memory)
    before = {name: buffer.clone() for name, buffer in memory.state_dict().items()}
    with pytest.raises(error, match=message):
        loss_func(*args, **kwargs)
    for name, buffer in memory.state_dict().items():
        assert torch.equal(buffer, before[name]), name


def test_memory_never_reclustered_raises_and_writes_nothing():
    memory = PrototypeMemory(TWO_DOMAINS, DIM, K).double()
    loss_func = ProtoOTLoss(memory)
    embeddings, keys, labels = random_batch(BATCH)
    with pytest.raises(ValueError, match="memory must be filled and reclustered"):
        loss_func(embeddings, labels, ref_emb=keys)
    assert not memory.written.any()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"memory": "bank"}, TypeError, "memory must be a PrototypeMemory, got str"),
        # one prototype per domain: every softmax is over one entry, so the loss and its gradient are 0
        ({"memory": PrototypeMemory([0, 0, 1, 1], DIM, 1)}, ValueError,
         "ProtoOTLoss needs a memory with at least 2 prototypes per domain, got num_prototypes=1"),
        ({"temperature": 0}, ValueError, "temperature must be a finite number > 0, got 0"),
        ({"in_domain_weights": (1.0, 0.5)}, ValueError, "in_domain_weights must be 3 numbers"),
        ({"in_domain_weights": (1.0, -0.5, 0.1)}, ValueError, "in_domain_weights must be a finite number >= 0"),
        ({"cross_domain_weight": float("nan")}, ValueError, "cross_domain_weight must be a finite number"),
        ({"in_domain_weights": "abc"}, TypeError, "in_domain_weights must be a tuple of 3 numbers .*, got 'abc'"),
        ({"cross_domain_start_epoch": 1.5}, TypeError, "cross_domain_start_epoch must be a non-negative integer, got 1.5"),
        ({"cross_domain_start_epoch": -1}, ValueError, "cross_domain_start_epoch must be a non-negative integer, got -1"),
        ({"nearest_neighbour_by": "bank"}, ValueError, "nearest_neighbour_by must be one of"),
        ({"official": "no"}, TypeError, "official must be True or False, got 'no'"),
        ({"normalize_cross_negatives": 1}, TypeError, "normalize_cross_negatives must be True or False"),
        ({"distance": LpDistance()}, ValueError, "distance must be CosineSimilarity\\(\\).*got LpDistance"),
        ({"distance": DotProductSimilarity()}, ValueError, "distance must be CosineSimilarity"),
        # settings the loss would ignore: it never calls the distance
        ({"distance": CosineSimilarity(power=3)}, ValueError, "got CosineSimilarity with p=2, power=3"),
        ({"distance": type("MyCosine", (CosineSimilarity,), {})()}, ValueError, "got MyCosine with p=2, power=1"),
        ({"nearest_neighbour_by": ""}, ValueError, "nearest_neighbour_by must be one of .*, got ''"),
    ],
)
def test_bad_options_name_the_argument(kwargs, error, message):
    kwargs = {"memory": random_memory(TWO_DOMAINS), **kwargs}
    with pytest.raises(error, match=message):
        ProtoOTLoss(**kwargs)


@pytest.mark.parametrize("weights", [[2.0, 0.25, 0.5], torch.tensor([2.0, 0.25, 0.5]), np.array([2.0, 0.25, 0.5])],
                         ids=["list", "tensor", "array"])
def test_in_domain_weights_take_any_sequence_of_three_numbers(weights):
    loss_func = ProtoOTLoss(random_memory(TWO_DOMAINS), in_domain_weights=weights)
    assert loss_func.in_domain_weights == (2.0, 0.25, 0.5)
    assert all(type(weight) is float for weight in loss_func.in_domain_weights)
    with pytest.raises(ValueError, match="in_domain_weights must be a finite number >= 0"):
        ProtoOTLoss(random_memory(TWO_DOMAINS), in_domain_weights=torch.tensor([1.0, -0.5, 0.1]))


def test_distance_is_cosine_as_pml_reports_it():
    assert type(ProtoOTLoss(random_memory(TWO_DOMAINS)).distance) is CosineSimilarity
    ProtoOTLoss(random_memory(TWO_DOMAINS), distance=CosineSimilarity())  # the default, given explicitly


def test_empty_batch_gives_zero_loss_and_writes_nothing():
    """As PML's losses: an empty batch is a zero loss with a gradient path, not the NaN mean of nothing."""
    memory = random_memory(TWO_DOMAINS)
    state_before = {name: value.clone() for name, value in memory.state_dict().items()}
    embeddings = torch.zeros(0, memory.dim, requires_grad=True)
    loss = ProtoOTLoss(memory)(embeddings, torch.zeros(0, dtype=torch.long), ref_emb=torch.zeros(0, memory.dim))
    loss.backward()
    assert loss.item() == 0.0 and embeddings.grad.shape == (0, memory.dim)
    assert all(torch.equal(value, state_before[name]) for name, value in memory.state_dict().items())


def test_memory_state_is_computed_in_its_dtype_inside_a_callers_autocast():
    """Under torch.autocast the loss's own products may run in bfloat16; the memory's updates may not."""
    states = []
    for autocast in (False, True):
        memory = random_memory(TWO_DOMAINS, dtype=torch.float32)
        loss_func = ProtoOTLoss(memory, cross_domain_start_epoch=0)
        embeddings, keys, labels = random_batch(BATCH, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss_func(embeddings, labels, ref_emb=keys)
        states.append(cpu_state(memory))
    for name, buffer in states[0].items():
        assert torch.equal(buffer, states[1][name]), name


@pytest.mark.parametrize("num_domains", [2, 4])
@pytest.mark.parametrize("cross", [True, False])
def test_a_step_reads_the_device_a_bounded_number_of_times(num_domains, cross, monkeypatch):
    """On a GPU each read of a device value (item, tolist, bool, int) waits for the queued work. A step
    (fill included) makes 3 reads per Sinkhorn (one a domain, D**2 with the cross term) and 9 for the
    batch; the memory's step bookkeeping stays on the CPU, so its reads are free and not counted. The
    first step's one-time label check runs before the count.
    At e75b4c1 the step made 49 / 151 reads at 2 / 4 domains with the cross term, 33 / 55 without."""
    size = 32
    memory = PrototypeMemory(sum([[d] * size for d in range(num_domains)], []), DIM, K, kmeans_nredo=1)
    memory.fill(F.normalize(torch.randn(num_domains * size, DIM), dim=1), torch.arange(num_domains * size))
    memory.recluster(0)
    loss_func = ProtoOTLoss(memory, cross_domain_start_epoch=0 if cross else 100)
    indices = torch.cat([torch.arange(d * size, d * size + 4) for d in range(num_domains)])
    loss_func(torch.randn(len(indices), DIM), indices, ref_emb=torch.randn(len(indices), DIM))  # the first step's checks
    host = {getattr(memory, name).untyped_storage().data_ptr() for name in ("epoch",)}
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if self.untyped_storage().data_ptr() not in host:
                reads.append(self)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    embeddings = torch.randn(len(indices), DIM, requires_grad=True)
    loss_func(embeddings, indices, ref_emb=torch.randn(len(indices), DIM))
    assert len(reads) <= (3 * num_domains**2 if cross else 3 * num_domains) + 9


def test_class_labels_instead_of_sample_indices_warn_once_at_the_users_line():
    """PML's labels are classes; ProtoOT's are sample indices. Class labels would silently address the
    memory's first samples: the first batch warns, naming the bound and the most frequent value."""
    domains = [0] * 40 + [1] * 40
    loss_func = ProtoOTLoss(random_memory(domains))
    embeddings, keys, _ = random_batch(range(36))
    class_labels = torch.tensor([0, 1, 2, 3] * 8 + [0, 1, 0, 2])
    with pytest.warns(UserWarning, match="labels look like class labels: every value is below 20 \\(half of the "
                                         "first domain's leading run\\) and 0 occurs 10 times in one batch") as caught:
        loss_func(embeddings, class_labels, ref_emb=keys)
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_func(embeddings, class_labels, ref_emb=keys)  # once per loss
        samples = [0, 1, 2, 3, 40, 41, 1, 2, 40, 41, 5, 6, 45, 46, 7, 8, 47, 48]  # with a reshuffle's repeats
        ProtoOTLoss(random_memory(domains))(embeddings, torch.tensor(samples * 2), ref_emb=keys)  # two views


def test_indices_repeated_at_most_twice_do_not_warn():
    """Two views of a sample, or a with-replacement draw, repeat an index twice; class labels repeat more."""
    memory = random_memory([0] * 400 + [1] * 400)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_class_labels(memory, "labels", torch.cat([torch.arange(30), torch.tensor([0, 1])]))
    with pytest.warns(UserWarning, match="0 occurs 3 times"):
        warn_if_class_labels(memory, "labels", torch.cat([torch.arange(30), torch.tensor([0, 0, 1])]))


def test_small_batches_and_interleaved_domains_are_not_checked():
    """A batch under 32 repeats indices by chance when drawn with replacement; with domains interleaved in
    index order, a cycled small domain's indices are all low (CrossDomainSampler(shuffle=False))."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_class_labels(random_memory([0] * 400 + [1] * 400), "labels", torch.tensor([0, 1, 2, 1] * 7))
        interleaved = [0, 1] * 10 + [0] * 80
        batch = torch.tensor(list(CrossDomainSampler(interleaved, 32, shuffle=False))[:32])
        warn_if_class_labels(random_memory(interleaved), "labels", batch.repeat(2))
    with pytest.warns(UserWarning, match="look like class labels"):  # the same labels in a batch of 32
        warn_if_class_labels(random_memory([0] * 400 + [1] * 400), "labels", torch.tensor([0, 1, 2, 1] * 8))


def test_a_small_first_batch_leaves_the_class_label_check_to_the_next_one():
    """A batch under 32 is not judged, so it does not use up the loss's one check."""
    loss_func = ProtoOTLoss(random_memory([0] * 400 + [1] * 400))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embeddings, keys, labels = random_batch(range(8))  # sample indices 0..7: too few to judge
        loss_func(embeddings, labels, ref_emb=keys)
    embeddings, keys, _ = random_batch(range(32))
    with pytest.warns(UserWarning, match="look like class labels"):
        loss_func(embeddings, torch.tensor([0, 1, 2, 1] * 8), ref_emb=keys)


def batches_of(sampler, batch_size, epochs=3):
    order = []
    for epoch in range(epochs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        order += list(sampler)
    return [torch.tensor(order[start:start + batch_size]) for start in range(0, len(order) - batch_size + 1, batch_size)]


SAMPLERS = ["cross_domain", "cross_domain_in_order", "m_per_class", "weighted", "sequential", "one_domain"]


def sampler_batches(sampler, domains, batch_size):
    """Batches of sample indices as a training loop would draw them, tiny domains cycled or drawn with replacement."""
    if sampler == "cross_domain":
        return batches_of(CrossDomainSampler(domains, batch_size, seed=3), batch_size)
    if sampler == "cross_domain_in_order":
        return batches_of(CrossDomainSampler(domains, batch_size, shuffle=False), batch_size)
    if sampler == "m_per_class":
        return batches_of(MPerClassSampler(domains, m=32, batch_size=batch_size, length_before_new_iter=20 * batch_size),
                          batch_size)
    if sampler == "weighted":
        weights = 1.0 / torch.bincount(torch.tensor(domains)).double()[domains]
        return batches_of(torch.utils.data.WeightedRandomSampler(weights, 20 * batch_size), batch_size)
    if sampler == "sequential":
        return batches_of(range(len(domains)), batch_size, epochs=1)
    first_domain = [index for index, domain in enumerate(domains) if domain == domains[0]]  # one domain a batch
    return [torch.tensor(first_domain)[torch.randint(len(first_domain), (batch_size,))] for _ in range(50)]


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("sizes", [(3, 40), (20, 500), (5, 7, 300), (6, 6), (300, 300)])
@pytest.mark.parametrize("views", [1, 2, 3])
def test_sample_indices_never_look_like_class_labels_whatever_the_sampler(sampler, sizes, views):
    """Samplers that cycle tiny domains, draw with replacement, keep index order or take one domain at a time;
    one to three views concatenated: no batch of theirs warns."""
    torch.manual_seed(0)
    domains = sum(([slot] * size for slot, size in enumerate(sizes)), [])
    memory = random_memory(domains)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in sampler_batches(sampler, domains, 32 * len(sizes)):
            warn_if_class_labels(memory, "labels", batch.repeat(views))


@pytest.mark.parametrize("num_classes, batch_size", [(7, 64), (10, 64), (65, 128), (345, 128)])
def test_class_labels_of_few_or_many_classes_are_caught(num_classes, batch_size):
    """Office-Home's 65 and DomainNet's 345 classes too: the batch need not hold every class, only one class
    three times (at 345 classes and batch 128 about 9 batches in 10 do)."""
    memory = random_memory([0] * 5000 + [1] * 5000)
    torch.manual_seed(0)
    caught = 0
    for _ in range(20):
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            warn_if_class_labels(memory, "labels", torch.randint(num_classes, (batch_size,)))
        caught += len(records)
    assert caught >= 16
