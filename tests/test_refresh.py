"""PrototypeMemory(refresh_every=R): the cached-plan approximation against the full OT, written plainly."""
import math

import pytest
import torch
import torch.nn.functional as F

from pml_protoot.losses import ProtoOTLoss
from pml_protoot import memory as memory_module
from pml_protoot.memory import PrototypeMemory
from pml_protoot.ot import sinkhorn
from references import official_sinkhorn

DTYPES = [torch.float32, torch.float64]
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}
DOMAINS = [0] * 30 + [1] * 24
DIM, K, EPSILON = 6, 3, 0.05




def unit_keys(count, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(count, DIM, generator=generator, dtype=dtype), dim=1)


def ready_memory(refresh_every, dtype, device, seed=0, epsilon=EPSILON, **options):
    memory = PrototypeMemory(
        DOMAINS, DIM, K, kmeans_nredo=1, epsilon=epsilon, refresh_every=refresh_every, **options
    ).to(device=device, dtype=dtype)
    memory.fill(unit_keys(len(DOMAINS), seed, dtype).to(device), torch.arange(len(DOMAINS)))
    memory.recluster(epoch=0)
    return memory


def plan_row(key, prototypes, potentials):
    """One row of a cached plan, written out: p_k = exp(k.c_k/eps + g_k) / sum_j exp(k.c_j/eps + g_j)."""
    logits = [float(key @ c) / EPSILON + float(g) for c, g in zip(prototypes.double(), potentials.double())]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    return torch.tensor([w / sum(weights) for w in weights], dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [[0.4, 0.3, 0.1, 0.1, 0.1], [0.4, 0.3, 0.0, 0.2, 0.1]], ids=["positive", "zero_entry"])
def test_sinkhorn_potentials_reproduce_every_row_of_the_official_plan(dtype, beta, device):
    generator = torch.Generator().manual_seed(1)
    scores = (torch.rand(40, 5, generator=generator, dtype=torch.float64) * 2 - 1)
    beta = torch.tensor(beta, dtype=torch.float64)
    kept = beta > 0  # the official formula is 0/0 on a zero beta_k: that column's mass is 0
    plan = torch.zeros_like(scores)
    plan[:, kept] = official_sinkhorn(scores[:, kept], beta[kept])
    _, potentials = sinkhorn(scores.to(device, dtype), beta.to(device), EPSILON, 3, return_potentials=True)
    potentials = potentials.cpu()
    for n in range(len(scores)):
        # With identity prototypes, key @ c_k is scores[n, k].
        rebuilt = plan_row(scores[n], torch.eye(5, dtype=torch.float64), potentials)
        assert torch.allclose(rebuilt, plan[n], atol=TOLERANCE[dtype] * 10), n


@pytest.mark.parametrize("dtype", DTYPES)
def test_refresh_every_one_gives_the_full_ot_assignments_every_step(dtype, device):
    memory = ready_memory(1, dtype, device)
    generator = torch.Generator().manual_seed(2)
    for step in range(4):
        indices = torch.randperm(30, generator=generator)[:6]
        memory.fill(unit_keys(6, 100 + step, dtype).to(device), indices)
        bank, prototypes = memory.bank(0).cpu().double(), memory.prototypes[0].cpu().double()
        plan = official_sinkhorn(bank @ prototypes.T, memory.class_marginals[0].cpu())
        rows = memory.row_of[indices.to(device)]
        labels = memory.step_pseudo_labels(0, rows)
        assert labels.tolist() == plan[rows.cpu()].argmax(dim=1).tolist()
        expected_prototypes = F.normalize(plan.T @ bank, dim=1)
        assert torch.allclose(memory.prototypes[0].cpu().double(), expected_prototypes, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cached_plan_between_refreshes_matches_the_refresh_plan_and_tracks_written_rows(dtype, device):
    refresh_every = 3
    memory = ready_memory(refresh_every, dtype, device)
    bank0, prototypes0 = memory.bank(0).cpu().double().clone(), memory.prototypes[0].cpu().double().clone()
    refresh_plan = official_sinkhorn(bank0 @ prototypes0.T, memory.class_marginals[0].cpu())
    all_rows = torch.arange(30, device=device)
    # Step 1 refreshes: exact labels for every row.
    assert memory.step_pseudo_labels(0, all_rows).tolist() == refresh_plan.argmax(dim=1).tolist()
    potentials = memory.column_potentials[0, 0].cpu()
    for n in range(30):  # unchanged rows: the cached formula is the refresh plan itself
        assert torch.allclose(plan_row(bank0[n], prototypes0, potentials), refresh_plan[n], atol=TOLERANCE[dtype] * 10)
    written = torch.tensor([2, 5, 7, 11])
    memory.fill(unit_keys(4, 7, dtype).to(device), written)
    labels = memory.step_pseudo_labels(0, all_rows)  # step 2: from the cache
    bank = memory.bank(0).cpu().double()
    expected_rows = torch.stack([plan_row(bank[n], prototypes0, potentials) for n in range(30)])
    assert labels.tolist() == expected_rows.argmax(dim=1).tolist()
    unchanged = [n for n in range(30) if n not in written.tolist()]
    assert labels[unchanged].tolist() == refresh_plan[unchanged].argmax(dim=1).tolist()
    # Prototypes: normalise(sum over the current bank of cached-plan rows times keys), by a loop.
    sums = sum(expected_rows[n][:, None] * bank[n][None, :] for n in range(30))
    assert torch.allclose(memory.prototypes[0].cpu().double(), F.normalize(sums, dim=1), atol=TOLERANCE[dtype])
    assert int(memory.refresh_countdown[0]) == 1


def test_refresh_is_due_every_r_steps_and_after_recluster(device):
    memory = ready_memory(2, torch.float64, device, reset_prototypes=True)
    rows = torch.arange(5, device=device)
    for step in range(5):
        memory.fill(unit_keys(5, 30 + step, torch.float64).to(device), torch.arange(5))
        due = step % 2 == 0
        bank, prototypes = memory.bank(0).cpu(), memory.prototypes[0].cpu()
        full = official_sinkhorn(bank @ prototypes.T, memory.class_marginals[0].cpu())[:5].argmax(dim=1)
        labels = memory.step_pseudo_labels(0, rows)
        if due:
            assert labels.tolist() == full.tolist(), step
        assert int(memory.refresh_countdown[0]) == (1 if due else 0)
    memory.fill(unit_keys(len(DOMAINS), 50, torch.float64).to(device), torch.arange(len(DOMAINS)))
    memory.recluster(epoch=1)  # resets the prototypes: the next step must use them, not the cached sums
    assert int(memory.refresh_countdown[0]) == 0 and not memory.potentials_valid.any()
    bank, prototypes = memory.bank(0).cpu(), memory.prototypes[0].cpu().clone()
    full = official_sinkhorn(bank @ prototypes.T, memory.class_marginals[0].cpu())
    assert memory.step_pseudo_labels(0, rows).tolist() == full[:5].argmax(dim=1).tolist()
    torch.testing.assert_close(memory.prototypes[0].cpu(), F.normalize(full.T @ bank, dim=1))


def test_cross_pseudo_labels_refresh_with_their_domain(device):
    memory = ready_memory(4, torch.float64, device)
    rows = torch.arange(6, device=device)
    memory.step_pseudo_labels(0, rows)
    memory.step_pseudo_labels(1, rows)
    bank, prototypes = memory.bank(0).cpu(), memory.prototypes[1].cpu()
    full = official_sinkhorn(bank @ prototypes.T, memory.class_marginals[0].cpu())
    assert memory.cross_pseudo_labels(0, 1, rows).tolist() == full[:6].argmax(dim=1).tolist()
    assert bool(memory.potentials_valid[0, 1])
    memory.step_pseudo_labels(0, rows)  # not a refresh: the cross plan stays cached
    assert bool(memory.potentials_valid[0, 1])
    assert memory.cross_pseudo_labels(0, 1, rows).tolist() == full[:6].argmax(dim=1).tolist()


def test_a_refresh_of_the_domain_renews_its_cross_plans(device):
    """Between refreshes the cross plan of bank 0 under domain 1's prototypes is cached; domain 0's
    next refresh must drop it, so that its cross labels follow domain 1's prototypes as they are then."""
    memory = ready_memory(2, torch.float64, device)
    rows, all_rows = torch.arange(6, device=device), torch.arange(30, device=device)
    memory.step_pseudo_labels(0, rows)  # domain 0 refreshes
    memory.cross_pseudo_labels(0, 1, rows)  # and caches its plan under domain 1's prototypes
    for step in range(4):  # domain 1's bank and prototypes move on
        memory.fill(unit_keys(24, 60 + step, torch.float64).to(device), torch.arange(30, 54))
        memory.step_pseudo_labels(1, rows)
    memory.step_pseudo_labels(0, rows)  # from the cache
    memory.step_pseudo_labels(0, rows)  # domain 0's next refresh
    assert not bool(memory.potentials_valid[0, 1])
    bank, prototypes = memory.bank(0).cpu(), memory.prototypes[1].cpu()
    full = official_sinkhorn(bank @ prototypes.T, memory.class_marginals[0].cpu())
    assert memory.cross_pseudo_labels(0, 1, all_rows).tolist() == full.argmax(dim=1).tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_prototype_means_accumulate_in_float32_at_least_on_any_device(dtype, device):
    memory = PrototypeMemory(DOMAINS, DIM, K, refresh_every=2).to(device=device, dtype=dtype)
    assert memory.prototype_means.dtype == torch.promote_types(dtype, torch.float32)
    assert memory.prototype_means.device.type == torch.device(device).type and memory.prototypes.dtype == dtype


def test_float32_means_survive_to_empty_and_assigning_loads():
    """A meta memory materialised by to_empty has no values to recast; a state_dict loaded with assign=True
    puts in its own tensors, a float16 one from an older checkpoint among them."""
    materialised = PrototypeMemory(DOMAINS, DIM, K, refresh_every=2).half().to("meta").to_empty(device="cpu")
    assert materialised.prototype_means.dtype == torch.float32 and materialised.prototype_means.device.type == "cpu"
    saved = PrototypeMemory(DOMAINS, DIM, K, refresh_every=2).state_dict()
    saved["prototype_means"] = saved["prototype_means"].half()
    memory = PrototypeMemory(DOMAINS, DIM, K, refresh_every=2).half()
    memory.load_state_dict(saved, assign=True)
    assert memory.prototype_means.dtype == torch.float32


def test_a_half_precision_memory_keeps_the_small_steps_of_the_prototype_means():
    """A batch moves the means of a 20,000-row bank by about 64 / 20,000 of a key: below a bfloat16 ulp.
    Between refreshes the means must follow those steps as a float32 memory of the same keys does
    (they rounded away: 4% of the movement lost at 20,000 rows, half of it at 200,000)."""
    rows_per_domain = 20_000
    generator = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(2 * rows_per_domain, 16, generator=generator), dim=1).bfloat16().float()
    new_keys = F.normalize(torch.randn(9 * 64, 16, generator=generator) + 3, dim=1).bfloat16().float()
    moves = []
    for dtype in (torch.bfloat16, torch.float32):
        memory = PrototypeMemory([0] * rows_per_domain + [1] * rows_per_domain, 16, 4, kmeans_nredo=1,
                                 refresh_every=10).to(dtype)
        memory.fill(keys, torch.arange(2 * rows_per_domain))
        memory.recluster(epoch=0)
        memory.step_pseudo_labels(0, torch.arange(4))  # the full OT: the cached plan starts here
        start = memory.prototype_means[0].clone()
        for batch in range(9):
            rows = torch.arange(batch * 64, (batch + 1) * 64)
            memory.fill(new_keys[rows], rows)
            memory.step_pseudo_labels(0, rows[:4])
        moves.append(memory.prototype_means[0].float() - start.float())
    assert (moves[0] - moves[1]).norm() / moves[1].norm() < 0.01


def test_a_float16_memory_keeps_a_prototype_without_mass_finite():
    """Fewer distinct keys than prototypes leave a K-means cluster empty: its mean row is 0, which
    F.normalize turned into NaN in float16 (its eps underflows) and the loss followed."""
    memory = PrototypeMemory([0] * 30 + [1] * 30, dim=8, num_prototypes=4, kmeans_nredo=1, marginal_rule="matched",
                             refresh_every=10).half()
    two_keys = F.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    memory.fill(two_keys[torch.arange(60) % 2], torch.arange(60))
    memory.recluster(epoch=0)
    assert (memory.class_marginals == 0).any()  # the setting that needs it
    loss_func = ProtoOTLoss(memory, cross_domain_start_epoch=0)
    for _ in range(3):
        embeddings = torch.randn(4, 8, requires_grad=True)
        loss_func(embeddings, torch.tensor([0, 1, 30, 31]), ref_emb=two_keys[[0, 1, 0, 1]]).backward()
        assert torch.isfinite(embeddings.grad).all() and torch.isfinite(memory.prototypes).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_with_refresh_every_one_equals_the_default_loss(dtype, device):
    losses = []
    for refresh_every in (None, 1):
        options = {} if refresh_every is None else {"refresh_every": refresh_every}
        memory = PrototypeMemory(DOMAINS, DIM, K, kmeans_nredo=1, **options).to(device=device, dtype=dtype)
        memory.fill(unit_keys(len(DOMAINS), 0, dtype).to(device), torch.arange(len(DOMAINS)))
        memory.recluster(epoch=0)
        loss_func = ProtoOTLoss(memory, cross_domain_start_epoch=0)
        indices = torch.tensor([0, 3, 9, 30, 33, 40], device=device)
        queries, keys = unit_keys(6, 5, dtype).to(device), unit_keys(6, 6, dtype).to(device)
        losses.append((loss_func(queries, indices, ref_emb=keys), memory.prototypes.clone()))
    assert torch.equal(losses[0][0], losses[1][0]) and torch.equal(losses[0][1], losses[1][1])


def test_state_dict_round_trips_the_cache_and_bad_refresh_every_is_rejected(device):
    memory = ready_memory(3, torch.float32, device)
    memory.step_pseudo_labels(0, torch.arange(4, device=device))
    restored = PrototypeMemory(DOMAINS, DIM, K, refresh_every=3).to(device)
    restored.load_state_dict(memory.state_dict())
    for name, buffer in memory.state_dict().items():
        assert torch.equal(restored.state_dict()[name], buffer), name
    assert "column_potentials" not in PrototypeMemory(DOMAINS, DIM, K).state_dict()
    for bad, error in ((0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="refresh_every"):
            PrototypeMemory(DOMAINS, DIM, K, refresh_every=bad)


@pytest.mark.parametrize("saved_every, loaded_every", [(1, 3), (3, 1)])
def test_a_checkpoint_of_another_refresh_every_loads_and_the_next_step_is_a_full_ot(saved_every, loaded_every, device):
    """The OT cache is derived state: switching refresh_every across a resume failed with torch's bare
    "Missing/Unexpected key(s)". A cached memory given none is due for a full OT in every domain."""
    saved = ready_memory(saved_every, torch.float64, device)
    saved.step_pseudo_labels(0, torch.arange(4, device=device))
    loaded = PrototypeMemory(DOMAINS, DIM, K, epsilon=EPSILON, refresh_every=loaded_every)
    loaded = loaded.to(device=device, dtype=torch.float64)
    loaded.load_state_dict(saved.state_dict())
    expected_keys = PrototypeMemory(DOMAINS, DIM, K, refresh_every=loaded_every).state_dict().keys()
    assert loaded.state_dict().keys() == expected_keys
    rows = torch.arange(5, device=device)
    for domain in (0, 1):
        bank, prototypes = loaded.bank(domain).cpu(), loaded.prototypes[domain].cpu().clone()
        full = official_sinkhorn(bank @ prototypes.T, loaded.class_marginals[domain].cpu())
        assert loaded.step_pseudo_labels(domain, rows).tolist() == full[:5].argmax(dim=1).tolist()
        torch.testing.assert_close(loaded.prototypes[domain].cpu(), F.normalize(full.T @ bank, dim=1))
    if loaded_every > 1:
        assert loaded.refresh_countdown.tolist() == [loaded_every - 1] * 2


def test_a_checkpoint_with_the_former_prototype_sums_loads_as_means(device):
    memory = ready_memory(3, torch.float64, device)
    memory.step_pseudo_labels(0, torch.arange(4, device=device))
    state = memory.state_dict()
    sizes = torch.tensor([DOMAINS.count(0), DOMAINS.count(1)], dtype=torch.float64, device=device)
    state["prototype_sums"] = state.pop("prototype_means") * sizes[:, None, None]  # the former format
    restored = PrototypeMemory(DOMAINS, DIM, K, kmeans_nredo=1, epsilon=EPSILON, refresh_every=3).to(device, torch.float64)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.prototype_means, memory.prototype_means)
    rows = torch.arange(6, device=device)
    assert restored.step_pseudo_labels(0, rows).tolist() == memory.step_pseudo_labels(0, rows).tolist()


@pytest.mark.parametrize("epsilon", [EPSILON, 1e-6])
def test_a_half_precision_memory_caches_its_potentials_in_float32(epsilon, device):
    """The potentials reach about max |S| / epsilon: past float16's 65,504 at epsilon 1e-6, where a float16
    cache refused the refresh (ValueError). They stay in float32, as the prototype means do."""
    memory = ready_memory(3, torch.float16, device, seed=4, epsilon=epsilon)
    rows = torch.arange(30, device=device)
    memory.step_pseudo_labels(0, rows)
    potentials = memory.column_potentials[0, 0]
    assert memory.column_potentials.dtype == torch.float32 and potentials.isfinite().all()
    assert memory.state_dict()["column_potentials"].dtype == torch.float32
    memory.step_pseudo_labels(0, rows)  # from the cache

@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("epsilon", [0.05, 1e-3, 1e-4])
def test_cached_labels_of_unchanged_rows_are_the_refresh_labels_at_any_epsilon(epsilon, dtype, device):
    """The cached potentials are Sinkhorn's own: at a tiny epsilon, where a plan's off-argmax entries
    underflow, they still carry the class marginal."""
    domains = [0] * 200 + [1] * 150
    memory = PrototypeMemory(domains, DIM, 5, kmeans_nredo=1, epsilon=epsilon, refresh_every=3).to(device, dtype)
    keys = unit_keys(350, 9, dtype)
    keys[:200] += 0.8 * keys[0]  # one crowded region: the marginal must push rows off their nearest prototype
    memory.fill(F.normalize(keys, dim=1).to(device), torch.arange(350))
    memory.recluster(epoch=0)
    rows = torch.arange(200, device=device)
    refreshed = memory.step_pseudo_labels(0, rows)
    nearest = (memory.bank(0) @ memory.reference_prototypes[0, 0].T).argmax(dim=1)
    assert (refreshed != nearest).any()  # the marginal matters here
    assert memory.step_pseudo_labels(0, rows).tolist() == refreshed.tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_memory_scores_its_bank_in_float32_a_chunk_of_rows_at_a_time(dtype, device, monkeypatch):
    """It scored in its own dtype, so cached labels of unchanged rows could differ from the full plan's."""
    monkeypatch.setattr(memory_module, "SCORE_CHUNK_ROWS", 7)  # 30 rows: 5 chunks, the last one short
    memory = ready_memory(1, dtype, device)
    scores = memory.bank(0).float() @ memory.prototypes[1].float().T  # upcast first, written plainly
    expected = sinkhorn(scores, memory.class_marginals[0], EPSILON, memory.sinkhorn_iterations)
    torch.testing.assert_close(memory.assign(0, 1), expected, rtol=0, atol=1e-6)
