"""DataLoaders: presized training batches, server-identical validation batches."""

from __future__ import annotations

import dataclasses
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DistributedSampler

from visionrpc.server.model_config import InputSpec
from visionrpc.server.preprocess import decode_for_model, prepare
from visionrpc.training.data import make_loaders
from visionrpc.training.datasets import Dataset, read_biwi, read_pets, read_voc
from visionrpc.training.synthetic import make_biwi, make_pets, make_voc

EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def pets(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return read_pets(make_pets(tmp_path_factory.mktemp("pets"), breeds=4, per_breed=6))


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return read_voc(make_voc(tmp_path_factory.mktemp("voc"), images=20))


@pytest.fixture(scope="module")
def biwi(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = make_biwi(tmp_path_factory.mktemp("biwi"), people=2, frames_per_person=6)
    return read_biwi(root)


def test_classification_batches(pets: Dataset) -> None:
    loaders = make_loaders(pets, size=(32, 48), bs=4)
    images, targets = next(iter(loaders.train))
    assert images.shape == (4, 48, 72, 3) and images.dtype == torch.uint8
    assert targets.shape == (4,) and targets.dtype == torch.int64
    assert len(loaders.train) == len(pets.train) // 4  # the ragged last batch is dropped
    images, targets = next(iter(loaders.valid))
    assert images.shape == (4, 32, 48, 3) and images.dtype == torch.uint8
    assert (loaders.task, loaders.vocab) == ("classification", pets.vocab)
    assert loaders.spec == InputSpec(32, 48, "crop")
    labels = torch.cat([t for _, t in loaders.valid]).tolist()
    assert labels == [item.target for item in pets.valid]


def test_points_are_not_presized_but_resized_once_to_the_model_size(biwi: Dataset) -> None:
    # The book's BIWI recipe: one resample, as the validation frames get.
    loaders = make_loaders(biwi, size=(48, 64), bs=4)
    images, targets = next(iter(loaders.train))
    assert images.shape == (4, 48, 64, 3)
    assert targets.shape == (4, 1, 2)


def test_multilabel_targets_are_multi_hot(voc: Dataset) -> None:
    loaders = make_loaders(voc, size=(32, 32), presize=(40, 40), bs=5)
    images, targets = next(iter(loaders.train))
    assert images.shape == (5, 40, 40, 3)
    assert targets.shape == (5, len(voc.vocab)) and targets.dtype == torch.float32
    valid_targets = torch.cat([t for _, t in loaders.valid])
    for row, item in zip(valid_targets, voc.valid, strict=True):
        assert torch.nonzero(row).flatten().tolist() == list(item.target)  # type: ignore[arg-type]


@pytest.mark.parametrize("resize_method", ["crop", "squish", "pad"])
def test_valid_batches_are_the_servers_preprocessing_byte_for_byte(
    biwi: Dataset, resize_method: str
) -> None:
    loaders = make_loaders(biwi, size=(48, 64), bs=4, resize_method=resize_method)
    batches = [images.numpy() for images, _ in loaders.valid]
    served = [
        prepare(decode_for_model(item.path.read_bytes(), loaders.spec), loaders.spec)
        for item in biwi.valid
    ]
    assert np.array_equal(np.concatenate(batches), np.stack([pixels for pixels, _ in served]))
    assert loaders.valid_geometries == [geometry for _, geometry in served]


def test_point_targets_sit_on_the_head_in_both_frames(biwi: Dataset) -> None:
    loaders = make_loaders(biwi, size=(96, 128), presize=(144, 192), bs=4)
    train_items = loaders.train.dataset
    for index in range(len(biwi.train)):
        pixels, target = train_items[index]
        assert target.shape == (1, 2)
        # In the presized picture, the warm-toned head's centroid is where the target says.
        image = pixels.numpy().astype(np.int32)
        ys, xs = np.nonzero(image[..., 0] - image[..., 2] > 20)
        x = (float(target[0, 0]) + 1) / 2 * 192
        y = (float(target[0, 1]) + 1) / 2 * 144
        assert np.hypot(xs.mean() + 0.5 - x, ys.mean() + 0.5 - y) < 1.0
    targets = torch.cat([t for _, t in loaders.valid])
    for target, item, geometry in zip(targets, biwi.valid, loaders.valid_geometries, strict=True):
        back = geometry.normalized_to_original(float(target[0, 0]), float(target[0, 1]))
        assert np.allclose(back, item.target, atol=1e-3)


def test_valid_geometry_follows_exif_orientation(pets: Dataset, tmp_path: Path) -> None:
    rotated = tmp_path / "Abyssinian_1.jpg"
    with Image.open(pets.valid[0].path) as image:
        exif = image.getexif()
        exif[EXIF_ORIENTATION] = 6  # shown turned a quarter clockwise
        image.save(rotated, exif=exif)
        width, height = image.size
    dataset = dataclasses.replace(pets, valid=[dataclasses.replace(pets.valid[0], path=rotated)])
    loaders = make_loaders(dataset, size=(40, 40), bs=2)
    pixels, geometry = prepare(decode_for_model(rotated.read_bytes(), loaders.spec), loaders.spec)
    assert (geometry.original_width, geometry.original_height) == (height, width)
    assert loaders.valid_geometries == [geometry]
    assert np.array_equal(next(iter(loaders.valid))[0][0].numpy(), pixels)


def test_worker_processes_give_the_same_batches_while_grpc_runs_here(pets: Dataset) -> None:
    # A forked worker inherits a copy of gRPC's poller lock, held or not, and could hang
    # before its first batch: workers come from a fork server instead.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        here = make_loaders(pets, size=(24, 24), bs=8)
        workers = make_loaders(pets, size=(24, 24), bs=8, num_workers=1)
        context = workers.train.multiprocessing_context
        assert context is not None and context.get_start_method() == "forkserver"
        for (images, targets), (other_images, other_targets) in zip(
            here.valid, workers.valid, strict=True
        ):
            assert torch.equal(images, other_images) and torch.equal(targets, other_targets)
        assert torch.equal(next(iter(here.train))[0], next(iter(workers.train))[0])
    finally:
        server.stop(None)


def test_the_seed_fixes_the_training_order(pets: Dataset) -> None:
    def order(seed: int) -> list[int]:
        loaders = make_loaders(pets, size=(16, 16), bs=len(pets.train), seed=seed)
        return torch.cat([targets for _, targets in loaders.train]).tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == sorted(item.target for item in pets.train)


def test_a_dataset_smaller_than_a_batch_keeps_its_only_batch(pets: Dataset) -> None:
    loaders = make_loaders(pets, size=(16, 16), bs=1000)
    assert len(loaders.train) == 1 and len(loaders.valid) == 1


def test_distributed_loaders_shard_with_a_distributed_sampler(
    pets: Dataset, tmp_path: Path
) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        loaders = make_loaders(pets, size=(16, 16), bs=4, distributed=True)
    finally:
        dist.destroy_process_group()
    assert isinstance(loaders.train.sampler, DistributedSampler)
    assert isinstance(loaders.valid.sampler, DistributedSampler)
    assert loaders.valid.sampler.shuffle is False
    assert len(list(loaders.train)) == len(pets.train) // 4
    plain = make_loaders(pets, size=(16, 16), bs=4, distributed=True)
    assert not isinstance(plain.train.sampler, DistributedSampler)


def test_training_presize_crops_at_a_random_position_and_points_follow(biwi: Dataset) -> None:
    # Square windows of 4:3 frames: the window can travel a quarter of the width.
    loaders = make_loaders(biwi, size=(64, 64), presize=(96, 96), bs=4)
    train_items = loaders.train.dataset
    windows = set()
    for _ in range(6):
        pixels, target = train_items[0]
        assert pixels.shape == (96, 96, 3)
        windows.add(pixels.numpy().tobytes())
        image = pixels.numpy().astype(np.int32)
        ys, xs = np.nonzero(image[..., 0] - image[..., 2] > 20)
        if len(xs) > 50:  # the head is in this window (it can sit near the frame's edge)
            x = (float(target[0, 0]) + 1) / 2 * 96
            y = (float(target[0, 1]) + 1) / 2 * 96
            assert np.hypot(xs.mean() + 0.5 - x, ys.mean() + 0.5 - y) < 1.5
    assert len(windows) > 1
    # Validation keeps the server's centred crop: the same pixels every time.
    valid_items = loaders.valid.dataset
    assert torch.equal(valid_items[0][0], valid_items[0][0])
    data = biwi.valid[0].path.read_bytes()
    served, _ = prepare(decode_for_model(data, loaders.spec), loaders.spec)
    assert np.array_equal(valid_items[0][0].numpy(), served)
