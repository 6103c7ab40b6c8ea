"""Datasets to PyTorch DataLoaders: presized training items, server-identical validation items.

Training items are decoded with the server's ``decode_for_model`` and presized on the CPU
with its ``prepare`` (classifiers larger than the model's input, fastai's presizing;
points at the model's size, as the book's BIWI model); with ``crop`` the
presize window sits at a random position in the picture each time an item is drawn, as
fastai's training-split RandomCrop. The learner moves a batch to the device and calls
``augment_batch``, which crops to the final size. Validation items take exactly the
server's path, ``prepare(decode_for_model(bytes, spec), spec)`` (a large JPEG decoded at a
reduced scale included), so a metric measured here is the metric of the served model.

Batches are ``(uint8 [N, H, W, 3], targets)``: int64 class indices (classification),
float multi-hot ``[N, C]`` (multilabel), or float ``[N, K, 2]`` points normalised to the
batch's frame (points).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import multiprocessing.context
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler
from torch.utils.data import Dataset as TorchDataset

from visionrpc.server.model_config import InputSpec
from visionrpc.server.preprocess import Geometry, decode_for_model, input_geometry, prepare
from visionrpc.server.views import IDENTITY, View

from .datasets import Dataset, Item

# Prepared items are kept in memory (num_workers=0) while the whole split fits in this budget.
CACHE_BYTES = 512 << 20
# The presize per task, as a factor of the model size. fastai presizes to 460 for 224 (about
# 2x); 1.5x leaves room for the batch's random crops and rotations at less CPU cost. Points
# are not presized, as the book's BIWI model: the frame is resampled once, to the model size,
# like the validation frames (bench/train_vs_fastai.py biwi, 8 seeds: 99.7 px at 1.5x, 78.9
# at 1x; biwi-large level).
PRESIZE_FACTOR: dict[str, float] = {"classification": 1.5, "multilabel": 1.5, "points": 1.0}


@dataclass
class DataLoaders:
    train: DataLoader[tuple[Tensor, Tensor]]
    valid: DataLoader[tuple[Tensor, Tensor]]
    task: str
    vocab: tuple[str, ...]
    spec: InputSpec
    # One per valid item, in dataset order: maps predicted points back to original pixels.
    valid_geometries: list[Geometry]


class PreparedItems(TorchDataset[tuple[Tensor, Tensor]]):
    """Items decoded and prepared to one InputSpec, with targets in that frame.

    ``random_crop`` (``crop`` specs only) keeps each picture resized to cover the spec and
    cuts the spec's window at a random position on every draw. The position depends on
    the seed, the index and how often this process drew it, so worker processes give the
    same first epoch as the main one.
    """

    def __init__(
        self,
        items: Sequence[Item],
        spec: InputSpec,
        task: str,
        classes: int,
        *,
        cache: bool,
        random_crop: bool = False,
        seed: int = 0,
        view: View = IDENTITY,
    ) -> None:
        self.items = list(items)
        self.spec = spec
        self.task = task
        self.classes = classes
        self.random_crop = random_crop and spec.resize_method == "crop"
        self.seed = seed
        # A TTA view (validation only): prepared as the server prepares that view.
        self.view = view
        self.draws: dict[int, int] = {}
        # Covering pictures are larger than the spec along one side; the budget is a guide.
        fits = len(self.items) * spec.height * spec.width * 3 <= CACHE_BYTES
        self.cache: dict[int, tuple[Tensor, Geometry]] | None = {} if cache and fits else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        pixels, geometry = self.prepared(index)
        if self.random_crop:
            pixels, geometry = self._window(index, pixels, geometry)
        return pixels, self.target(self.items[index], geometry)

    def prepared(self, index: int) -> tuple[Tensor, Geometry]:
        """The item's pixels (covering the spec with ``random_crop``) and their geometry."""
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        decoded = decode_for_model(self.items[index].path.read_bytes(), self.spec, (self.view,))
        spec = self.spec
        if self.random_crop:
            spec = _covering(decoded.image.width, decoded.image.height, self.spec)
        pixels, geometry = prepare(decoded, spec, self.view)
        # PIL's arrays are read-only, which torch tensors cannot express.
        example = torch.from_numpy(pixels.copy()), geometry
        if self.cache is not None:
            self.cache[index] = example
        return example

    def _window(self, index: int, pixels: Tensor, geometry: Geometry) -> tuple[Tensor, Geometry]:
        draw = self.draws.get(index, 0)
        self.draws[index] = draw + 1
        rng = random.Random(hash((self.seed, index, draw)))
        height, width = self.spec.height, self.spec.width
        top = rng.randint(0, pixels.shape[0] - height)
        left = rng.randint(0, pixels.shape[1] - width)
        window = pixels[top : top + height, left : left + width].contiguous()
        moved = dataclasses.replace(
            geometry,
            offset_x=geometry.offset_x + geometry.scale_x * left,
            offset_y=geometry.offset_y + geometry.scale_y * top,
            input_width=width,
            input_height=height,
        )
        return window, moved

    def target(self, item: Item, geometry: Geometry) -> Tensor:
        if self.task == "classification":
            return torch.tensor(item.target, dtype=torch.int64)
        if self.task == "multilabel":
            multi_hot = torch.zeros(self.classes, dtype=torch.float32)
            multi_hot[list(_as_tuple(item.target))] = 1.0
            return multi_hot
        coords = _as_tuple(item.target)
        points = [
            geometry.original_to_normalized(float(coords[i]), float(coords[i + 1]))
            for i in range(0, len(coords), 2)
        ]
        return torch.tensor(points, dtype=torch.float32)


def make_loaders(
    dataset: Dataset,
    *,
    size: tuple[int, int],
    presize: tuple[int, int] | None = None,
    bs: int = 32,
    resize_method: str = "crop",
    num_workers: int = 0,
    seed: int = 42,
    distributed: bool = False,
) -> DataLoaders:
    """DataLoaders for training at ``size`` (height, width) with the server's preprocessing."""
    spec = InputSpec(size[0], size[1], resize_method)
    if presize is None:
        factor = PRESIZE_FACTOR[dataset.task]
        presize = (round(size[0] * factor), round(size[1] * factor))
    classes = len(dataset.vocab)
    # Worker processes would each fill a cache of their own: only cache in this process.
    cache = num_workers == 0
    train_spec = InputSpec(presize[0], presize[1], resize_method)
    train_items = PreparedItems(
        dataset.train, train_spec, dataset.task, classes, cache=cache, random_crop=True, seed=seed
    )
    valid_items = PreparedItems(dataset.valid, spec, dataset.task, classes, cache=cache)
    shard = distributed and dist.is_available() and dist.is_initialized()
    train_sampler: Sampler[int]
    if shard:
        train_sampler = DistributedSampler(train_items, shuffle=True, seed=seed)
        valid_sampler: Sampler[int] | None = DistributedSampler(valid_items, shuffle=False)
    else:
        shuffle_generator = torch.Generator().manual_seed(seed)
        train_sampler = RandomSampler(train_items, generator=shuffle_generator)
        valid_sampler = None

    def loader(
        items: PreparedItems, sampler: Sampler[int] | None, drop_last: bool
    ) -> DataLoader[tuple[Tensor, Tensor]]:
        return DataLoader(
            items,
            batch_size=bs,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=num_workers > 0,
            multiprocessing_context=worker_context() if num_workers > 0 else None,
        )

    return DataLoaders(
        # A last batch of one breaks BatchNorm; a dataset smaller than a batch keeps it.
        train=loader(train_items, train_sampler, drop_last=len(train_items) > bs),
        valid=loader(valid_items, valid_sampler, drop_last=False),
        task=dataset.task,
        vocab=dataset.vocab,
        spec=spec,
        valid_geometries=[_geometry(item, spec) for item in dataset.valid],
    )


def worker_context() -> multiprocessing.context.BaseContext | None:
    """Where worker processes come from: a fork server where the platform has one.

    Forking this process copies whatever threads it runs into a child that has only one: a
    gRPC channel's or server's poller (a ``Client`` opened in the same program, a test
    server) can leave a lock held there, and the worker hangs before its first batch.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return None


def _covering(width: int, height: int, spec: InputSpec) -> InputSpec:
    """A squish to the smallest size at the picture's aspect that covers ``spec``."""
    scale = max(spec.height / height, spec.width / width)
    return InputSpec(
        max(spec.height, math.ceil(height * scale - 1e-6)),
        max(spec.width, math.ceil(width * scale - 1e-6)),
        "squish",
    )


def _geometry(item: Item, spec: InputSpec) -> Geometry:
    """The geometry ``prepare`` gives this item, from its header alone (no full decode)."""
    return input_geometry(item.path.read_bytes(), spec)


def _as_tuple(target: int | tuple[int, ...] | tuple[float, ...]) -> tuple[int | float, ...]:
    return (target,) if isinstance(target, int) else target
