"""ProtoOTTrainer: learning, exact resume, label blindness, EMA keys, AMP, clipping, atomic checkpoints.

Data: two domains of low-dimensional synthetic "cached trunk features" (class centre +
domain shift + noise), trunk = nn.Identity(), a tiny MLP embedder: the feature-cache mode.
"""
import copy
import logging
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import NTXentLoss

from pml_protoot.data import (
    CachedTwoViewDataset,
    TwoViewDataset,
    eval_transform,
    make_synthetic_domains,
    moco_v2_transform,
)
from pml_protoot.losses import ProtoOTLoss
from pml_protoot.memory import PrototypeMemory
from pml_protoot.miners import ProtoOTMiner
from pml_protoot.samplers import CrossDomainSampler
from pml_protoot import trainers
from pml_protoot.trainers import ProtoOTTrainer

NUM_CLASSES, PER_CLASS, FEATURE_DIM, EMBED_DIM, BATCH = 4, 12, 16, 8, 16


def synthetic_features(seed=0):
    """(features (N, 16), class labels (N,), domains (N,)) for two domains of 4 classes x 12."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(NUM_CLASSES, FEATURE_DIM, generator=generator)
    domain_shift = 1.5 * torch.randn(2, FEATURE_DIM, generator=generator)
    classes = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS).repeat(2)
    domains = torch.arange(2).repeat_interleave(NUM_CLASSES * PER_CLASS)
    noise = 0.7 * torch.randn(len(classes), FEATURE_DIM, generator=generator)
    return centers[classes] + domain_shift[domains] + noise, classes, domains


class LabelledFeatures(torch.utils.data.Dataset):
    """Items (feature, class_label): what an evaluation dataset looks like."""

    def __init__(self, features, classes):
        self.features, self.classes = features, classes

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index):
        return self.features[index], int(self.classes[index])


def jitter(feature):
    """A random view of a cached feature (the augmentation of feature-cache mode)."""
    return feature + 0.1 * torch.randn_like(feature)


class RecordingNTXentLoss(NTXentLoss):
    """NTXentLoss that keeps each call's ``(embeddings, labels, ref_emb, loss)``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        loss = super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        self.calls.append((embeddings.detach(), labels.clone(), ref_emb.detach(), loss.detach()))
        return loss


def make_trainer(device, classes=None, seed=0, loss="protoot", trunk=None, views=jitter, cached_views=False,
                 batch_size=BATCH, mining_funcs=None, update_prototypes=True, reset_prototypes=False,
                 embedder_width=EMBED_DIM, **kwargs):
    """A fresh trainer on the synthetic set; ``classes`` replaces the class labels the dataset carries;
    ``cached_views``: a ``CachedTwoViewDataset`` of 4 fixed jittered views instead of fresh views;
    ``loss="ntxent"`` pairs NTXentLoss with ``mining_funcs`` (default: a ProtoOTMiner with ``update_prototypes``)."""
    features, true_classes, domains = synthetic_features()
    labelled = LabelledFeatures(features, true_classes if classes is None else classes)
    torch.manual_seed(seed)
    trunk = torch.nn.Identity() if trunk is None else trunk
    embedder = torch.nn.Sequential(
        torch.nn.Linear(FEATURE_DIM, 32), torch.nn.ReLU(), torch.nn.Linear(32, embedder_width)
    )
    trunk, embedder = trunk.to(device), embedder.to(device)
    memory = PrototypeMemory(domains, dim=EMBED_DIM, num_prototypes=NUM_CLASSES, kmeans_nredo=2,
                             reset_prototypes=reset_prototypes)
    if loss == "protoot":
        metric_loss = ProtoOTLoss(memory)
    elif loss == "infonce":
        metric_loss = RecordingNTXentLoss(temperature=0.2)
    else:
        metric_loss = NTXentLoss(temperature=0.2)
        mining_funcs = mining_funcs or {"tuple_miner": ProtoOTMiner(memory, update_prototypes=update_prototypes)}
    params = list(trunk.parameters()) + list(embedder.parameters())
    options = dict(momentum=0.9, sampler=CrossDomainSampler(domains, BATCH, seed=seed), fill_dataset=labelled)
    options.update(kwargs)
    trainer = ProtoOTTrainer(
        {"trunk": trunk, "embedder": embedder},
        {"embedder_optimizer": torch.optim.Adam(params, lr=0.01)},
        batch_size,
        {"metric_loss": metric_loss},
        cached_dataset(features, domains) if cached_views else TwoViewDataset(labelled, views, views),
        memory,
        mining_funcs=mining_funcs,
        data_device=torch.device(device),
        dataloader_num_workers=0,
        **options,
    )
    trainer.recorded_losses = []
    trainer.end_of_iteration_hook = lambda t: t.recorded_losses.append(t.losses["total_loss"].item())
    return trainer


def test_a_protoot_miner_that_never_moves_the_prototypes_warns_at_the_users_line():
    with pytest.warns(UserWarning, match="nothing moves the prototypes from their first K-means") as caught:
        trainer = make_trainer("cpu", loss="ntxent", update_prototypes=False)
    assert caught[0].filename == __file__
    trainer.train(1, 1)
    first = trainer.memory.prototypes.clone()
    trainer.train(2, 2)
    assert torch.equal(trainer.memory.prototypes, first)  # what the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_trainer("cpu", loss="ntxent")  # the miner moves them
        make_trainer("cpu", loss="ntxent", update_prototypes=False, reset_prototypes=True)  # every recluster does


def cached_dataset(features, domains):
    generator = torch.Generator().manual_seed(7)
    views = features + 0.1 * torch.randn(4, *features.shape, generator=generator)
    return CachedTwoViewDataset(views, domains, seed=3)


def draw_in_a_dataloader(trainer):
    """An end_of_epoch_hook doing what a PML tester does: iterate a DataLoader (it draws a seed)."""
    for _ in torch.utils.data.DataLoader(list(range(4)), batch_size=2, shuffle=True):
        pass


def precision_at_5(embeddings, classes, domains, query_domain, gallery_domain):
    """ProtoOT's micro P@5 by brute force: every relevant set here has R >= 5, so min(5, R) = 5."""
    queries, gallery = embeddings[domains == query_domain], embeddings[domains == gallery_domain]
    query_classes, gallery_classes = classes[domains == query_domain], classes[domains == gallery_domain]
    hits = 0
    for query, query_class in zip(queries, query_classes):
        nearest = sorted(range(len(gallery)), key=lambda j: -float(query @ gallery[j]))[:5]
        hits += sum(int(gallery_classes[j] == query_class) for j in nearest)
    return hits / (5 * len(queries))


def model_weights(trainer):
    return {
        f"{name}.{key}": value.clone()
        for name, model in trainer.models.items()
        for key, value in model.state_dict().items()
    }


def test_short_training_raises_precision_at_5_on_every_domain_pair(device):
    features, classes, domains = synthetic_features()
    trainer = make_trainer(device)
    before = trainer.compute_keys(features).cpu()
    trainer.train(1, 3)
    after = trainer.compute_keys(features).cpu()
    for pair in [(0, 1), (1, 0)]:
        untrained = precision_at_5(before, classes, domains, *pair)
        trained = precision_at_5(after, classes, domains, *pair)
        assert trained > untrained + 0.2, (pair, untrained, trained)
    assert int(trainer.memory.epoch) == 2 and trainer.cross_domain_weight == 0.0


@pytest.mark.parametrize(
    "options",
    [{}, {"end_of_epoch_hook": draw_in_a_dataloader}, {"cached_views": True}],
    ids=["plain", "hook drawing random numbers", "cached views"],
)
def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path, options):
    uninterrupted = make_trainer("cpu", **options)
    uninterrupted.train(1, 3)

    first_half = make_trainer("cpu", checkpoint_dir=tmp_path, **options)
    first_half.train(1, 1)
    resumed = make_trainer("cpu", seed=123, **options)  # other initial weights: everything must come from the file
    start_epoch = resumed.load_checkpoint(tmp_path / "last.pth")
    resumed.train(start_epoch, 3)

    assert start_epoch == 2
    assert first_half.recorded_losses + resumed.recorded_losses == uninterrupted.recorded_losses
    expected, actual = model_weights(uninterrupted), model_weights(resumed)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    for key, value in uninterrupted.key_encoder.state_dict().items():
        assert torch.equal(value, resumed.key_encoder.state_dict()[key]), key
    for key, value in uninterrupted.memory.state_dict().items():
        assert torch.equal(value, resumed.memory.state_dict()[key]), key


def bfloat16_trainer(**options):
    trainer = make_trainer("cpu", **options)
    trainer.models["embedder"].to(torch.bfloat16)
    trainer.key_encoder.to(torch.bfloat16)
    trainer.dtype = torch.bfloat16
    return trainer


def test_resume_of_a_bfloat16_model_reproduces_the_uninterrupted_run(tmp_path):
    """timm's EMA rounds bfloat16 weights stochastically with a generator of its own: it must resume too."""
    uninterrupted = bfloat16_trainer()
    uninterrupted.train(1, 3)
    first_half = bfloat16_trainer(checkpoint_dir=tmp_path)
    first_half.train(1, 1)
    resumed = bfloat16_trainer(seed=123)
    resumed.train(resumed.load_checkpoint(tmp_path / "last.pth"), 3)
    assert first_half.recorded_losses + resumed.recorded_losses == uninterrupted.recorded_losses
    for key, value in uninterrupted.key_encoder.state_dict().items():
        assert torch.equal(value, resumed.key_encoder.state_dict()[key]), key


def test_random_states_of_more_gpus_than_this_process_sees_restore_those_it_has(monkeypatch):
    """A checkpoint saved on 4 GPUs resumed on 1: torch would index a generator that does not exist."""
    from pml_protoot import trainers

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    state = trainers._rng_state()
    state["cuda"] = [torch.full((8,), gpu, dtype=torch.uint8) for gpu in range(4)]
    trainers._set_rng_state(state)
    assert [int(gpu_state[0]) for gpu_state in restored] == [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainers._set_rng_state(state)  # a CPU-only resume leaves CUDA alone
    assert len(restored) == 1


def test_a_checkpoint_of_another_setup_is_refused_before_anything_is_restored(tmp_path):
    trainer = make_trainer("cpu", checkpoint_dir=tmp_path)
    trainer.train(1, 1)
    other = make_trainer("cpu", seed=5, sampler=None)
    before = model_weights(other)
    with pytest.raises(ValueError, match="holds a sampler state but this trainer's sampler \\(NoneType\\) has none"):
        other.load_checkpoint(tmp_path / "last.pth")
    other.optimizers["trunk_optimizer"] = other.optimizers["embedder_optimizer"]
    with pytest.raises(KeyError, match=r"holds no optimizers \['trunk_optimizer'\]"):
        other.load_checkpoint(tmp_path / "last.pth")
    assert all(torch.equal(value, model_weights(other)[key]) for key, value in before.items())


def test_a_file_that_is_no_checkpoint_is_refused_in_one_line(tmp_path):
    trainer = make_trainer("cpu")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save(trainer.models["embedder"].state_dict(), tmp_path / "weights.pth")  # a state dict, not a checkpoint
    with pytest.raises(ValueError, match=r"checkpoint '.*notes.txt' is not a file of tensors saved with torch.save"):
        trainer.load_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match=r"'.*weights.pth' is not a ProtoOTTrainer checkpoint .* of keys \['0.bias'"):
        trainer.load_checkpoint(tmp_path / "weights.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth' is not a file"):
        trainer.load_checkpoint(tmp_path / "absent.pth")
    torch.save(trainer.memory.state_dict(), tmp_path / "whole.pth")
    whole = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 2])  # torch raises a bare OSError("Invalid argument")
    with pytest.raises(ValueError, match=r"checkpoint '.*cut.pth' is not a file of tensors saved with torch.save"):
        trainer.load_checkpoint(tmp_path / "cut.pth")


def test_permuting_class_labels_leaves_training_identical(device):
    _, classes, _ = synthetic_features()
    permuted = classes[torch.randperm(len(classes), generator=torch.Generator().manual_seed(1))]
    assert not torch.equal(permuted, classes)
    original = make_trainer(device)  # each make_trainer seeds torch: train before building the next
    original.train(1, 2)
    relabelled = make_trainer(device, classes=permuted)
    relabelled.train(1, 2)
    assert original.recorded_losses == relabelled.recorded_losses
    expected, actual = model_weights(original), model_weights(relabelled)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_key_encoder_is_the_ema_of_parameters_and_buffers(device, dtype):
    trunk = torch.nn.Sequential(torch.nn.Linear(FEATURE_DIM, FEATURE_DIM), torch.nn.BatchNorm1d(FEATURE_DIM))
    trainer = make_trainer(device, trunk=trunk, momentum=0.75, dtype=dtype)
    trainer.models["trunk"].to(dtype)
    trainer.models["embedder"].to(dtype)
    trainer.key_encoder.to(dtype)
    trainer.key_encoder.module[0][0].weight.data.add_(1.0)  # make key and query encoders differ
    trainer.initialize_dataloader()
    trainer.fill_memory()
    trainer.epoch = 1
    trainer.start_epoch()
    key_before = {k: v.clone() for k, v in trainer.key_encoder.module.state_dict().items()}
    trainer.forward_and_backward()
    query_after = trainer.query_encoder.state_dict()
    for name, value in trainer.key_encoder.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.75 * key_before[name] + 0.25 * query_after[name])
        else:  # BatchNorm's num_batches_tracked is copied
            assert torch.equal(value, query_after[name])
    # the step changed the BatchNorm running mean, so the buffer check above is not vacuous
    assert not torch.equal(query_after["0.1.running_mean"], key_before["0.1.running_mean"])


def test_keys_use_running_batchnorm_statistics_not_the_batch(device):
    trunk = torch.nn.Sequential(torch.nn.Linear(FEATURE_DIM, FEATURE_DIM), torch.nn.BatchNorm1d(FEATURE_DIM))
    trainer = make_trainer(device, trunk=trunk)
    trainer.key_encoder.module[0][1].running_mean.normal_()
    features = synthetic_features()[0].to(device)
    encoder = trainer.key_encoder.module
    weight, bias = encoder[0][0].weight, encoder[0][0].bias
    bn = encoder[0][1]
    linear = features[:5] @ weight.T + bias
    normalised = (linear - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    expected = F.normalize(encoder[1](normalised), dim=1)
    torch.testing.assert_close(trainer.compute_keys(features)[:5], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(trainer.compute_keys(features[:5]), expected, rtol=1e-4, atol=1e-5)


def test_a_float64_key_encoder_gives_float64_keys(device):
    """Keys are normalised in the key encoder's float64, not rounded to float32 on the way to a float64 memory."""
    trainer = make_trainer(device, dtype=torch.float64)
    trainer.key_encoder.to(torch.float64)
    features = synthetic_features()[0].to(device, torch.float64)
    with torch.no_grad():
        expected = trainer.key_encoder.module(features)
        expected = expected / expected.norm(dim=1, keepdim=True)
    keys = trainer.compute_keys(features)
    assert keys.dtype == torch.float64
    torch.testing.assert_close(keys, expected, rtol=1e-13, atol=1e-15)


def test_a_float64_model_trains_the_loss_in_float64(device):
    """Its queries reach the loss as float64 (they were cast to float32), as its keys do."""
    trainer = make_trainer(device, dtype=torch.float64)
    for model in (trainer.models["trunk"], trainer.models["embedder"], trainer.key_encoder):
        model.to(torch.float64)
    trainer.memory.to(torch.float64)
    seen = []
    loss_func = trainer.loss_funcs["metric_loss"]
    forward = loss_func.forward
    loss_func.forward = lambda embeddings, labels, **kwargs: (
        seen.append((embeddings.dtype, kwargs["ref_emb"].dtype)) or forward(embeddings, labels, **kwargs))
    trainer.train(1, 1)
    assert seen and set(seen) == {(torch.float64, torch.float64)}


def assert_filled_with_the_key_encoders_features(trainer, device):
    """``fill_memory`` wrote each sample's key-encoder output of its clean feature into its bank row."""
    features, _, _ = synthetic_features()
    trainer.initialize_dataloader()
    trainer.fill_memory()
    with torch.no_grad():
        expected = F.normalize(trainer.key_encoder.module(features.to(device)), dim=1)
    for index in range(len(features)):
        slot, row = int(trainer.memory.domain_of[index]), int(trainer.memory.row_of[index])
        torch.testing.assert_close(trainer.memory.bank(slot)[row], expected[index])


def test_banks_are_filled_in_global_index_order_before_training(device):
    trainer = make_trainer(device)
    assert not trainer.memory.written.any()
    assert_filled_with_the_key_encoders_features(trainer, device)


class DictItems(torch.utils.data.Dataset):
    """Training items as ``{"views": (query, key), "index": i}``: read through a ``data_and_label_getter``."""

    def __init__(self, two_views):
        self.two_views = two_views

    def __len__(self):
        return len(self.two_views)

    def __getitem__(self, index):
        views, global_index = self.two_views[index]
        return {"views": views, "index": global_index}


def collate_training_items(items):
    """A collate_fn written for training items ``((query, key), index)`` only."""
    (queries, keys), indices = zip(*[view_pair for view_pair, _ in items]), [index for _, index in items]
    return (torch.stack(queries), torch.stack(keys)), torch.tensor(indices)


def test_bank_filling_reads_training_items_through_the_getter_and_fill_items_without_the_collate_fn(device):
    through_getter = make_trainer(device, fill_dataset=None, views=lambda feature: feature)
    through_getter.dataset = DictItems(through_getter.dataset)
    through_getter.data_and_label_getter = lambda batch: (batch["views"], batch["index"])
    with_collate = make_trainer(device, collate_fn=collate_training_items)  # fill_dataset: (feature, class) items
    for trainer in (through_getter, with_collate):
        assert_filled_with_the_key_encoders_features(trainer, device)
    with_collate.train(num_epochs=1)  # training items still go through the collate_fn


def test_bank_filling_takes_the_label_hierarchy_level_as_training_does(device):
    """PML's label_hierarchy_level picks a column of (B, L) labels in every training batch; the bank filling
    read the whole (B, 2) block and failed."""
    trainer = make_trainer(device, fill_dataset=None, views=lambda feature: feature, label_hierarchy_level=1)
    trainer.dataset = DictItems(trainer.dataset)
    trainer.data_and_label_getter = lambda batch: (batch["views"], torch.stack([-batch["index"], batch["index"]], 1))
    assert_filled_with_the_key_encoders_features(trainer, device)
    trainer.train(num_epochs=1)


def test_pml_label_mapping_is_refused(device):
    trainer = make_trainer(device)
    pml_arguments = (trainer.models, trainer.optimizers, BATCH, trainer.loss_funcs, trainer.dataset, trainer.memory)
    with pytest.raises(ValueError, match="set_min_label_to_zero is not supported: .*sample indices"):
        ProtoOTTrainer(*pml_arguments, set_min_label_to_zero=True)
    with pytest.raises(ValueError, match="dataset_labels is not supported"):
        ProtoOTTrainer(*pml_arguments, dataset_labels=torch.arange(4).repeat(24))
    ProtoOTTrainer(*pml_arguments, set_min_label_to_zero=False, dataset_labels=None)  # PML's defaults pass


def test_each_epoch_sets_the_sampler_epoch_and_reclusters(device, monkeypatch):
    trainer = make_trainer(device)
    sampler_epochs, recluster_epochs = [], []
    monkeypatch.setattr(trainer.sampler, "set_epoch", sampler_epochs.append)
    original_recluster = trainer.memory.recluster
    monkeypatch.setattr(
        trainer.memory, "recluster", lambda epoch: (recluster_epochs.append(epoch), original_recluster(epoch))
    )
    trainer.train(1, 2)
    assert sampler_epochs == [1, 2] and recluster_epochs == [0, 1]


def test_miner_with_a_pml_loss_trains(device):
    trainer = make_trainer(device, loss="ntxent")
    before = model_weights(trainer)
    trainer.train(1, 1)
    trainer.memory.check_ready()
    assert len(trainer.recorded_losses) == trainer.iterations_per_epoch
    assert all(torch.isfinite(torch.tensor(trainer.recorded_losses)))
    assert trainer.mining_funcs["tuple_miner"].num_pos_pairs > 0
    assert any(not torch.equal(value, model_weights(trainer)[key]) for key, value in before.items())


def test_a_stock_pml_miner_sees_each_querys_own_key_as_its_positive(device):
    """MultiSimilarityMiner with a huge epsilon keeps every pair: the positives are exactly the B
    (query, own key) pairs, and the mined loss equals InfoNCE over all pairs."""
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    miner = MultiSimilarityMiner(epsilon=10.0)
    trainer = make_trainer(device, loss="infonce", mining_funcs={"tuple_miner": miner})
    trainer.train(1, 1)
    assert miner.num_pos_pairs == BATCH
    for embeddings, labels, keys, loss in trainer.loss_funcs["metric_loss"].calls:
        plain = NTXentLoss(temperature=0.2)(embeddings, labels, ref_emb=keys, ref_labels=labels.clone())
        assert float(loss) > 0 and torch.allclose(loss, plain, atol=1e-6)


def test_a_batch_of_several_sampler_blocks_keeps_the_epochs_last_blocks(device):
    # 48 samples a domain, 12-sample blocks: 4 blocks an epoch, batches of 3 blocks.
    _, _, domains = synthetic_features()
    trainer = make_trainer(device, loss="infonce", batch_size=72, sampler=CrossDomainSampler(domains, 24))
    trainer.train(1, 1)
    seen = torch.cat([labels for _, labels, _, _ in trainer.loss_funcs["metric_loss"].calls]).cpu()
    assert trainer.iterations_per_epoch == 2
    assert sorted(seen.tolist()) == list(range(len(domains)))


def test_pml_loss_without_a_miner_is_infonce_with_each_querys_own_key_as_positive(device):
    """No miner: query i's positive is key i, every other key of the batch a negative (MoCo's InfoNCE)."""
    trainer = make_trainer(device, loss="infonce")
    trainer.train(1, 1)
    calls = trainer.loss_funcs["metric_loss"].calls
    assert len(calls) == trainer.iterations_per_epoch
    for embeddings, indices, keys, loss in calls:
        assert len(set(indices.tolist())) == len(indices)  # the sampler repeats no sample in a batch here
        logits = F.normalize(embeddings, dim=1) @ keys.T / 0.2
        infonce = -torch.diagonal(torch.log_softmax(logits, dim=1)).mean()
        assert float(loss) > 0.1
        torch.testing.assert_close(loss, infonce, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_amp_runs_the_forward_pass_in_reduced_precision(device, amp_dtype):
    trainer = make_trainer(device, amp_dtype=amp_dtype)
    output_dtypes = []
    trainer.models["embedder"].register_forward_hook(lambda module, inputs, out: output_dtypes.append(out.dtype))
    trainer.train(1, 1)
    assert output_dtypes and set(output_dtypes) == {amp_dtype}
    assert all(torch.isfinite(torch.tensor(trainer.recorded_losses)))
    assert trainer.grad_scaler.is_enabled() == (amp_dtype == torch.float16)


def test_gradient_clipping_bounds_the_sgd_step(device):
    trainer = make_trainer(device, grad_clip_norm=1e-3)
    params = list(trainer.query_encoder.parameters())
    trainer.optimizers = {"embedder_optimizer": torch.optim.SGD(params, lr=1.0)}
    trainer.initialize_dataloader()
    trainer.fill_memory()
    trainer.epoch = 1
    trainer.start_epoch()
    before = [p.detach().clone() for p in params]
    trainer.forward_and_backward()
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before)))
    # With lr = 1 the SGD step is the clipped gradient itself: norm exactly grad_clip_norm.
    assert float(step) == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_checkpoint_is_an_ordinary_file_under_the_umask(tmp_path, umask, mode):
    trainer = make_trainer("cpu")
    trainer.train(1, 1)
    path = tmp_path / "last.pth"
    previous = os.umask(umask)
    try:
        trainer.save_checkpoint(path)
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == mode


def test_failed_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer("cpu")
    trainer.train(1, 1)
    path = tmp_path / "ckpt.pth"
    trainer.save_checkpoint(path)
    good = path.read_bytes()

    def save_half_then_fail(obj, file):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(path)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(tmp_path / "new.pth")
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]
    assert path.read_bytes() == good


def test_batch_transform_equals_transforming_in_the_dataset(device):
    """Views transformed on the data device by the trainer train exactly as views transformed by the dataset."""
    calls = []

    def affine(views):
        calls.append((views.device.type, views.shape))
        return 2 * views + 1

    in_trainer = make_trainer(device, batch_transform=affine, fill_dataset=None)
    in_dataset = make_trainer(device, views=lambda feature: 2 * jitter(feature) + 1, fill_dataset=None)
    for trainer in (in_trainer, in_dataset):
        torch.manual_seed(1)
        trainer.train(num_epochs=2)
    steps = len(in_trainer.recorded_losses)
    fill_batches = math.ceil(len(in_trainer.dataset) / BATCH)
    assert len(calls) == fill_batches + 2 * steps  # bank filling's key views, then query and key views each step
    assert {device_type for device_type, _ in calls} == {device.type}
    torch.testing.assert_close(in_trainer.recorded_losses, in_dataset.recorded_losses)
    torch.testing.assert_close(model_weights(in_trainer), model_weights(in_dataset))


def test_batch_transform_leaves_the_fill_dataset_alone(device):
    calls = []
    trainer = make_trainer(device, batch_transform=lambda views: calls.append(len(views)) or views, iterations_per_epoch=1)
    trainer.train(num_epochs=1)
    assert calls == [BATCH, BATCH]  # one step's query and key views; the eval-view fill set is not transformed


@pytest.mark.parametrize("to_array", [False, True], ids=["tensor", "array"])
def test_integer_fill_views_beside_a_batch_transform_are_refused_at_construction(to_array, device):
    """A fill set decoded like MoCoV2Augment's uint8 training images reached the trunk untransformed: a conv
    dtype error at the first bank-filling batch (a float one in 0-255 silently filled unnormalised banks)."""
    trainer = make_trainer(device)
    features = (trainer.fill_dataset.features * 10).clamp(0, 255).to(torch.uint8)
    items = [(row.numpy() if to_array else row, i) for i, row in enumerate(features)]
    shown = "uint8" if to_array else "torch.uint8"
    with pytest.raises(ValueError, match=rf"fill_dataset\[0\]'s eval view is of dtype {shown}: fill_dataset views "
                                         "reach the models as they are, not through batch_transform"):
        make_trainer(device, fill_dataset=items, batch_transform=lambda views: views.float())
    make_trainer(device, fill_dataset=items)  # without a batch_transform the models may take them as they are


def test_bad_arguments_are_rejected_with_their_names(device):
    with pytest.raises(ValueError, match="momentum"):
        make_trainer(device, momentum=1.5)
    with pytest.raises(ValueError, match="amp_dtype"):
        make_trainer(device, amp_dtype=torch.int8)
    with pytest.raises(ValueError, match="grad_clip_norm"):
        make_trainer(device, grad_clip_norm=0)
    with pytest.raises(TypeError, match="batch_transform must be callable or None, got str"):
        make_trainer(device, batch_transform="moco")
    trainer = make_trainer(device)
    pml_arguments = (trainer.models, trainer.optimizers, BATCH, trainer.loss_funcs, trainer.dataset)
    with pytest.raises(TypeError, match="memory"):
        ProtoOTTrainer(*pml_arguments, memory="bank")
    other_memory = PrototypeMemory([0, 0, 1, 1], dim=EMBED_DIM, num_prototypes=2)
    with pytest.raises(ValueError, match="another memory"):
        ProtoOTTrainer(*pml_arguments, memory=other_memory)
    with pytest.raises(ValueError, match=r"mining_funcs\['tuple_miner'\] is a ProtoOTMiner on another memory"):
        ProtoOTTrainer(
            trainer.models, trainer.optimizers, BATCH, {"metric_loss": NTXentLoss()}, trainer.dataset,
            memory=trainer.memory, mining_funcs={"tuple_miner": ProtoOTMiner(other_memory)},
        )
    with pytest.raises(ValueError, match=r"mining_funcs\['subset_batch_miner'\] is not supported"):
        ProtoOTTrainer(*pml_arguments, memory=trainer.memory, mining_funcs={"subset_batch_miner": object()})
    with pytest.raises(ValueError, match="query_view, key_view"):
        trainer.calculate_loss((torch.zeros(BATCH, FEATURE_DIM), torch.arange(BATCH)))


def test_arguments_that_failed_only_after_the_bank_filling_are_refused_at_construction(device, tmp_path, monkeypatch):
    trainer = make_trainer(device)
    args = (trainer.models, trainer.optimizers, BATCH, trainer.loss_funcs, trainer.dataset, trainer.memory)

    def build(*positional, **options):
        return ProtoOTTrainer(*positional, **{"sampler": trainer.sampler, **options})

    with pytest.raises(TypeError, match="batch_size must be a positive integer, got '8'"):
        build(*args[:2], "8", *args[3:])
    with pytest.raises(ValueError, match=r"loss_funcs must be a dict holding 'metric_loss' .*, got \{\}"):
        build(*args[:3], {}, *args[4:])
    n = trainer.memory.num_samples
    with pytest.raises(ValueError, match=rf"fill_dataset must hold one item per memory sample \({n}\), got 3"):
        build(*args, fill_dataset=trainer.fill_dataset.features[:3])
    # Rows instead of (row, label) pairs; the training set's ((view, view), i) items by mistake.
    for fill_dataset, shown in ((trainer.fill_dataset.features, "Tensor"),
                                (trainer.dataset, r"\(\(Tensor, Tensor\), int\)")):
        with pytest.raises(ValueError, match=rf"fill_dataset items must be \(eval_view, anything\) .* is {shown}$"):
            build(*args, fill_dataset=fill_dataset)
    # MetricLossOnly's (image, class_label) items as the training set: refused before the banks are filled.
    with pytest.raises(ValueError, match=r"dataset items must be \(\(query_view, key_view\), global_index\).*; "
                                         r"dataset\[0\] is \(Tensor, int\): \(image, class_label\) items, as "
                                         "MetricLossOnly takes, go through TwoViewDataset"):
        build(*args[:4], trainer.fill_dataset, trainer.memory)
    assert not trainer.memory.written.any()
    half = torch.utils.data.Subset(trainer.dataset, range(n // 2))
    with pytest.raises(ValueError, match=rf"dataset fills the banks .* every memory sample \({n}\), got {n // 2}"):
        build(*args[:4], half, trainer.memory, fill_dataset=None)
    # With a fill_dataset the training set may differ from the memory's samples: a Subset, or two passes an epoch.
    build(*args[:4], half, trainer.memory, fill_dataset=trainer.fill_dataset)
    build(*args[:4], torch.utils.data.ConcatDataset([trainer.dataset, trainer.dataset]), trainer.memory)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="checkpoint_dir '.*file' is a file, expected a folder"):
        build(*args, checkpoint_dir=tmp_path / "file")
    readonly = tmp_path / "readonly"  # refused now, not when the first epoch's checkpoint is written
    readonly.mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(os, "access", lambda path, mode: os.fspath(path) != str(readonly))  # root writes anywhere
        with pytest.raises(ValueError, match=f"checkpoint_dir '.*runs' cannot be created: '{readonly}' is not writable"):
            build(*args, checkpoint_dir=readonly / "runs")
    domains = trainer.memory.domain_ids[trainer.memory.domain_of].cpu()
    with pytest.raises(ValueError, match=r"sampler must be built on the memory's domains .*: the sampler's domains "
                                         r"split the samples otherwise than the memory's: sample 0 is in a domain of"):
        build(*args, sampler=CrossDomainSampler(domains.roll(1), BATCH))  # one sample in the other domain
    with pytest.raises(ValueError, match=rf"the sampler's domains cover {n - 1} samples, the memory's {n}$"):
        build(*args, sampler=CrossDomainSampler(domains[:-1], BATCH))
    build(*args, sampler=CrossDomainSampler(10 - domains, BATCH))  # the same domains under other ids


def test_pil_images_are_refused_at_construction_naming_the_dataset_and_the_remedy():
    """torch's collate failed on them at the first batch, naming neither the dataset nor the transform."""
    images = make_synthetic_domains(num_classes=2, images_per_class=(4, 4), image_size=16)
    memory = PrototypeMemory(images.domain_ids, dim=EMBED_DIM, num_prototypes=2)
    embedder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, EMBED_DIM))
    args = ({"trunk": torch.nn.Identity(), "embedder": embedder},
            {"embedder_optimizer": torch.optim.SGD(embedder.parameters(), lr=0.1)}, 4, {"metric_loss": ProtoOTLoss(memory)})
    tensor_views = TwoViewDataset(images, moco_v2_transform(16), moco_v2_transform(16))
    with pytest.raises(TypeError, match=r"fill_dataset items hold PIL images, .*transform=eval_transform\(\.\.\.\)"):
        ProtoOTTrainer(*args, tensor_views, memory, fill_dataset=images)
    with pytest.raises(TypeError, match=r"dataset views hold PIL images, .*views that make tensors, e\.g\. moco_v2"):
        ProtoOTTrainer(*args, TwoViewDataset(images, lambda image: image, lambda image: image), memory)
    key_view_only = TwoViewDataset(images, moco_v2_transform(16), lambda image: image)
    with pytest.raises(TypeError, match="dataset views hold PIL images"):
        ProtoOTTrainer(*args, key_view_only, memory)
    ProtoOTTrainer(*args, tensor_views, memory)  # what the messages ask for


class WithDomainIds(torch.utils.data.Dataset):
    """``dataset``'s items under other ``domain_ids``."""

    def __init__(self, dataset, domain_ids):
        self.dataset, self.domain_ids = dataset, domain_ids

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]


def test_a_fill_dataset_in_another_domain_order_is_refused_at_construction():
    """With the domains listed in another order, the banks started from the other domain's images, silently
    (the domains are of one size here, so no length differed either)."""
    images = make_synthetic_domains(num_classes=2, images_per_class=4, image_size=16)
    memory = PrototypeMemory(images.domain_ids, dim=EMBED_DIM, num_prototypes=2)
    embedder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, EMBED_DIM))
    args = ({"trunk": torch.nn.Identity(), "embedder": embedder},
            {"embedder_optimizer": torch.optim.SGD(embedder.parameters(), lr=0.1)}, 4, {"metric_loss": ProtoOTLoss(memory)},
            TwoViewDataset(images, moco_v2_transform(16), moco_v2_transform(16)), memory)
    in_order = make_synthetic_domains(num_classes=2, images_per_class=4, image_size=16, transform=eval_transform(16))
    swapped = make_synthetic_domains(num_classes=2, images_per_class=4, image_size=16, domains=("outline", "filled"),
                                     transform=eval_transform(16))
    assert len(swapped) == len(in_order) and torch.equal(swapped.domain_ids, in_order.domain_ids)
    with pytest.raises(ValueError, match=r"fill_dataset must list the samples in the training dataset's order .*: its "
                                         r"domains are \['outline', 'filled'\], the dataset's \['filled', 'outline'\]"):
        ProtoOTTrainer(*args, fill_dataset=swapped)
    # Without domain names: domain_ids that move one sample to the other domain.
    with pytest.raises(ValueError, match=r"fill_dataset must list the samples in the memory's order .*: its domain_ids "
                                         r"split the samples otherwise than the memory's: sample 0 is in a domain "
                                         r"of 8 samples there, of 8 in the memory, 1 of them in both$"):
        ProtoOTTrainer(*args, fill_dataset=WithDomainIds(in_order, images.domain_ids.roll(1)))
    with pytest.raises(ValueError, match=r"sample 0 is in a domain of 8 samples there, of 8 in the memory, 1 of them "
                                         r"in both$"):
        ProtoOTTrainer(*args, fill_dataset=WithDomainIds(in_order, images.domain_ids.roll(1).numpy()))  # NumPy ids
    with pytest.raises(ValueError, match=r"fill_dataset.domain_ids must be 1-D, got shape \(16, 1\)"):
        ProtoOTTrainer(*args, fill_dataset=WithDomainIds(in_order, images.domain_ids[:, None]))
    ProtoOTTrainer(*args, fill_dataset=in_order)
    ProtoOTTrainer(*args, fill_dataset=WithDomainIds(in_order, 5 - images.domain_ids))  # the same domains, other ids
    in_order.domains = ["Filled", "Outline"]  # other names in the same order: the samples are where they should be
    ProtoOTTrainer(*args, fill_dataset=in_order)


class HierarchicalIndices(torch.utils.data.Dataset):
    """Items ``((query, key), index)`` with the index as ``kind``: PML's hierarchical ``(-i, i)`` label row
    (``label_hierarchy_level=1`` picks ``i``), or a 0-d NumPy integer array."""

    def __init__(self, two_views, kind):
        self.two_views, self.kind = two_views, kind

    def __len__(self):
        return len(self.two_views)

    def __getitem__(self, index):
        views, global_index = self.two_views[index]
        if self.kind == "row":
            return views, torch.tensor([-global_index, global_index])
        return views, np.array(global_index)


@pytest.mark.parametrize("kind", ["row", "numpy"])
def test_index_rows_and_arrays_pass_the_first_item_check_and_train(kind, device):
    """The layout check refused these valid indices, which training and the bank filling take."""
    trainer = make_trainer(device, fill_dataset=None, views=lambda feature: feature)
    options = {"label_hierarchy_level": 1} if kind == "row" else {}
    rebuilt = ProtoOTTrainer(trainer.models, trainer.optimizers, BATCH, trainer.loss_funcs,
                             HierarchicalIndices(trainer.dataset, kind), trainer.memory, sampler=trainer.sampler,
                             data_device=torch.device(device), dataloader_num_workers=0, **options)
    assert_filled_with_the_key_encoders_features(rebuilt, device)
    rebuilt.train(num_epochs=1)


def test_checking_the_first_items_leaves_the_random_streams_of_training_alone(device, monkeypatch):
    """Building a trainer reads the first items through their random views: what training then draws from
    torch's generator and from the dataset's own must be what it drew without the check."""
    def random_states_after_building(**options):
        trainer = make_trainer(device, **options)
        own = trainer.dataset.state_dict()["generator"] if options.get("cached_views") else None
        return torch.get_rng_state(), own

    settings = ({"views": lambda feature: feature + torch.randn_like(feature)}, {"cached_views": True})
    checked = [random_states_after_building(**options) for options in settings]
    monkeypatch.setattr(trainers, "_check_first_items", lambda *args: None)
    unchecked = [random_states_after_building(**options) for options in settings]
    for (global_state, own_state), (expected_global, expected_own) in zip(checked, unchecked):
        assert torch.equal(global_state, expected_global)
        assert own_state is expected_own is None or torch.equal(own_state, expected_own)


def test_losses_and_miners_the_step_would_misuse_or_ignore_are_refused(device):
    from pytorch_metric_learning.losses import (
        CrossBatchMemory, FastAPLoss, HistogramLoss, MultipleLosses, MultiSimilarityLoss, ProxyAnchorLoss,
        SelfSupervisedLoss, VICRegLoss,
    )
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    trainer = make_trainer(device)  # a ProtoOTLoss on trainer.memory

    def build(loss_funcs, mining_funcs=None):
        return ProtoOTTrainer(
            trainer.models, trainer.optimizers, BATCH, loss_funcs, trainer.dataset, trainer.memory,
            mining_funcs=mining_funcs,
        )

    for miner in (ProtoOTMiner(trainer.memory), MultiSimilarityMiner()):
        with pytest.raises(ValueError, match=rf"\['tuple_miner'\] \({type(miner).__name__}\) would be ignored"):
            build(trainer.loss_funcs, {"tuple_miner": miner})
    with pytest.raises(ValueError, match="SelfSupervisedLoss.*pass the loss it wraps \\(NTXentLoss\\)"):
        build({"metric_loss": SelfSupervisedLoss(NTXentLoss())})
    with pytest.raises(ValueError, match="CrossBatchMemory.*pass the loss it wraps \\(NTXentLoss\\)"):
        build({"metric_loss": CrossBatchMemory(NTXentLoss(), EMBED_DIM)})
    build({"metric_loss": NTXentLoss()}, {"tuple_miner": ProtoOTMiner(trainer.memory, update_prototypes=True)})
    # Losses that refuse ref_emb fail at construction, not at the first step after the banks are filled.
    refusing = (FastAPLoss(), HistogramLoss(), ProxyAnchorLoss(NUM_CLASSES, EMBED_DIM), VICRegLoss(),
                MultipleLosses([NTXentLoss()]))  # the last two: "labels are ref_labels ...", no ref_emb argument
    for loss in refusing:
        with pytest.raises(ValueError, match=rf"\({type(loss).__name__}\) does not take ref_emb and ref_labels"):
            build({"metric_loss": loss})
    assert not trainer.memory.written.any()
    build({"metric_loss": MultiSimilarityLoss()})


def test_angular_loss_beside_a_protoot_miner_warns_that_the_dropped_negatives_still_reach_it():
    """AngularLoss keeps only the mined positives and takes every other sample as a negative: the value is the
    same whatever negatives the tuples hold, which is what the warning says."""
    from pytorch_metric_learning.losses import AngularLoss

    trainer = make_trainer("cpu")
    with pytest.warns(UserWarning, match="AngularLoss, which takes only the positive pairs") as caught:
        miner = ProtoOTMiner(trainer.memory, update_prototypes=True)
        ProtoOTTrainer(trainer.models, trainer.optimizers, BATCH, {"metric_loss": AngularLoss()}, trainer.dataset,
                       trainer.memory, mining_funcs={"tuple_miner": miner})
    assert caught[0].filename == __file__
    embeddings, keys, labels = torch.randn(6, 4), torch.randn(6, 4), torch.arange(6)
    positives = (torch.arange(6), torch.arange(6))
    others = torch.tensor([j for i in range(6) for j in range(6) if j != i])
    every_negative = (torch.arange(6).repeat_interleave(5), others)
    loss = AngularLoss()
    with_all = loss(embeddings, labels, (*positives, *every_negative), ref_emb=keys, ref_labels=labels)
    one_negative = (torch.tensor([0]), torch.tensor([1]))  # it needs one to run, then ignores which
    with_one = loss(embeddings, labels, (*positives, *one_negative), ref_emb=keys, ref_labels=labels)
    assert torch.equal(with_all, with_one)


def test_a_pml_loss_that_ignores_ref_emb_is_refused():
    """PML's ThresholdConsistentMarginLoss gives the same value whatever keys it is given (it indexes its
    pairs into the queries), so the trainer refuses it; the first half checks that premise."""
    from pytorch_metric_learning import losses

    tcm_loss = getattr(losses, "ThresholdConsistentMarginLoss", None)
    if tcm_loss is None:
        pytest.skip("this PML has no ThresholdConsistentMarginLoss")
    generator = torch.Generator().manual_seed(0)
    queries, keys, other_keys = F.normalize(torch.randn(3, 8, 16, generator=generator), dim=2)
    labels = torch.arange(8) % 4
    with_keys = tcm_loss()(queries, labels, ref_emb=keys, ref_labels=labels)
    assert with_keys > 0 and with_keys == tcm_loss()(queries, labels, ref_emb=other_keys, ref_labels=labels)
    trainer = make_trainer("cpu")
    with pytest.raises(ValueError, match="ThresholdConsistentMarginLoss, which takes ref_emb but indexes its pairs"):
        ProtoOTTrainer(trainer.models, trainer.optimizers, BATCH, {"metric_loss": tcm_loss()}, trainer.dataset,
                       trainer.memory)


def test_batches_stay_domain_balanced_or_the_batch_size_is_refused(device):
    _, _, domains = synthetic_features()
    with pytest.raises(ValueError, match=r"batch_size must be a multiple of the sampler's batch_size \(12\), got 16"):
        make_trainer(device, sampler=CrossDomainSampler(domains, 12))
    # Two sampler blocks a batch (one process doing what two ranks do): every batch stays balanced.
    trainer = make_trainer(device, sampler=CrossDomainSampler(domains, BATCH // 2))
    trainer.initialize_dataloader()
    for (_, _), indices in trainer.dataloader:
        assert torch.bincount(domains[indices], minlength=2).tolist() == [BATCH // 2, BATCH // 2]


def test_data_device_may_be_a_string_as_in_pml():
    trainer = make_trainer("cpu")
    string_device = ProtoOTTrainer(
        trainer.models, trainer.optimizers, BATCH, trainer.loss_funcs, trainer.dataset, trainer.memory,
        sampler=trainer.sampler, data_device="cpu", dataloader_num_workers=0,
    )
    string_device.train(1, 1)
    assert string_device.data_device == torch.device("cpu") and int(trainer.memory.epoch) == 0


def test_under_distributed_a_sampler_sharded_for_another_world_is_refused(monkeypatch, caplog):
    import pml_protoot.trainers as trainers

    monkeypatch.setattr(trainers, "is_distributed", lambda: True)
    monkeypatch.setattr(trainers, "get_world_size", lambda: 2)
    monkeypatch.setattr(trainers, "get_rank", lambda: 1)
    _, _, domains = synthetic_features()
    with pytest.raises(ValueError, match=r"CrossDomainSampler\(num_replicas=2, rank=1\), got num_replicas=1, rank=0"):
        make_trainer("cpu", sampler=CrossDomainSampler(domains, BATCH))
    with caplog.at_level("WARNING", logger="pml_protoot.trainers"):
        trainers._check_sampler_shards(None)
    assert "every rank trains on every sample" in caplog.text
    trainers._check_sampler_shards(CrossDomainSampler(domains, BATCH, num_replicas=2, rank=1))  # the right shard


def test_each_epoch_logs_its_mean_loss(caplog):
    trainer = make_trainer("cpu")
    with caplog.at_level("INFO", logger="pml_protoot.trainers"):
        trainer.train(1, 2)
    steps = trainer.iterations_per_epoch
    for epoch, losses in ((1, trainer.recorded_losses[:steps]), (2, trainer.recorded_losses[steps:])):
        assert f"epoch {epoch}: mean total_loss {sum(losses) / steps:.5f} over {steps} steps" in caplog.text


@pytest.mark.parametrize("steps, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)])
def test_an_epoch_length_that_is_no_positive_integer_is_refused(steps, error):
    # PML takes 0 for one pass and runs range(-3), no step at all, without a word
    with pytest.raises(error, match="iterations_per_epoch must be a positive integer"):
        make_trainer("cpu", iterations_per_epoch=steps)


@pytest.mark.parametrize("start_epoch, num_epochs, error",
                         [(0, 1, ValueError), (1, -1, ValueError), (1, 2.0, TypeError)])
def test_train_refuses_epochs_that_are_no_epoch_numbers(start_epoch, num_epochs, error):
    trainer = make_trainer("cpu")
    with pytest.raises(error, match="start_epoch must|num_epochs must"):
        trainer.train(start_epoch, num_epochs)
    assert not bool(trainer.memory.written.any())  # refused before the bank filling


def test_train_with_no_epoch_to_run_says_so_and_trains_nothing(caplog):
    trainer = make_trainer("cpu")
    before = copy.deepcopy(trainer.models["embedder"].state_dict())
    with caplog.at_level("WARNING", logger="pml_protoot.trainers"):
        trainer.train(3, 2)
    assert "train(start_epoch=3, num_epochs=2): no epoch to run" in caplog.text
    assert trainer.recorded_losses == []
    for name, value in trainer.models["embedder"].state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_a_rounding_generator_state_of_another_device_type_is_skipped_with_a_warning(tmp_path, caplog):
    trainer = make_trainer("cpu", checkpoint_dir=tmp_path)
    trainer.train(1, 1)
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    if state["key_encoder_rounding_rng"] is None:
        pytest.skip("this timm's ModelEmaV3 has no stochastic-rounding generator")
    state["key_encoder_rounding_rng"] = {"device": "cuda", "state": torch.zeros(16, dtype=torch.uint8)}
    torch.save(state, tmp_path / "from_cuda.pth")
    resumed = make_trainer("cpu", seed=3)
    with caplog.at_level("WARNING", logger="pml_protoot.trainers"):
        assert resumed.load_checkpoint(tmp_path / "from_cuda.pth") == 2
    assert "rounding generator is a cuda one, this key encoder's a cpu one" in caplog.text


def test_a_checkpoint_without_the_dataset_state_this_trainer_needs_is_refused(tmp_path):
    plain = make_trainer("cpu", checkpoint_dir=tmp_path)  # TwoViewDataset: no random state of its own
    plain.train(1, 1)
    cached = make_trainer("cpu", cached_views=True)  # CachedTwoViewDataset: has one
    with pytest.raises(ValueError, match="lacks a dataset state but this trainer's dataset .* has one"):
        cached.load_checkpoint(tmp_path / "last.pth")
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    del state["dataset"]  # a checkpoint from before datasets had a state still resumes
    torch.save(state, tmp_path / "older.pth")
    assert cached.load_checkpoint(tmp_path / "older.pth") == 2


def test_wrapping_only_some_trained_models_in_ddp_is_refused(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        trainer = make_trainer("cpu", trunk=torch.nn.Linear(FEATURE_DIM, FEATURE_DIM))
        models = dict(trainer.models, trunk=torch.nn.parallel.DistributedDataParallel(trainer.models["trunk"]))
        with pytest.raises(ValueError, match=r"models \['trunk'\] are wrapped in DistributedDataParallel but "
                                             r"\['embedder'\] are not"):
            ProtoOTTrainer(models, trainer.optimizers, BATCH, trainer.loss_funcs, trainer.dataset, trainer.memory)
        models["embedder"] = torch.nn.parallel.DistributedDataParallel(trainer.models["embedder"])
        ProtoOTTrainer(models, trainer.optimizers, BATCH, trainer.loss_funcs, trainer.dataset, trainer.memory)
    finally:
        dist.destroy_process_group()


def test_one_info_line_an_epoch_and_one_for_each_event(tmp_path, caplog):
    """A 200-epoch run logged four INFO lines an epoch; now the epoch's loss, and the cross-domain
    weight and checkpoint path only when they are new."""
    trainer = make_trainer("cpu", checkpoint_dir=tmp_path)
    trainer.loss_funcs["metric_loss"].cross_domain_start_epoch = 2  # memory epoch 2 = PML epoch 3
    caplog.set_level(logging.INFO, logger="pml_protoot.trainers")
    trainer.train(num_epochs=4)
    messages = [record.getMessage() for record in caplog.records
                if record.name == "pml_protoot.trainers" and not record.getMessage().startswith("filled memory banks")]
    path, steps = os.path.join(tmp_path, "last.pth"), trainer.iterations_per_epoch
    mean = [f"mean total_loss {sum(trainer.recorded_losses[e * steps:(e + 1) * steps]) / steps:.5f} over {steps} steps"
            for e in range(4)]
    assert messages == [
        "epoch 1: memory epoch 0, cross-domain weight 0", f"epoch 1: {mean[0]}", f"saved checkpoint of epoch 1 to {path}",
        f"epoch 2: {mean[1]}",
        "epoch 3: memory epoch 2, cross-domain weight 0.01", f"epoch 3: {mean[2]}",
        f"epoch 4: {mean[3]}",
    ]


def test_an_embedder_of_another_width_than_the_memory_is_named_at_the_first_fill_batch():
    """It failed inside memory.fill as "keys must have shape (8, 4), got (8, 6)"."""
    trainer = make_trainer("cpu", embedder_width=EMBED_DIM + 2)
    with pytest.raises(ValueError, match=rf"the models output embeddings of shape \({EMBED_DIM + 2},\) a sample, the "
                                         rf"memory holds rows of dim={EMBED_DIM}: build PrototypeMemory"):
        trainer.train(num_epochs=1)
    assert not trainer.memory.written.any()
