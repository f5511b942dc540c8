"""Datasets and loaders (CIFAR-100, image class folders, sklearn digits): int64 labels and images
in [0, 1], NOT normalised: each model normalises its own (teacher and student may differ)."""
import os
import random
import sys
import time

import numpy as np
import torch
import torchvision
from torchvision.datasets import CIFAR100, ImageFolder
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, auto_augment
from timm.data import create_transform

DATASETS = ('cifar100', 'imagenet', 'folder', 'digits')  # imagenet: a folder of ImageNet's layout
NUM_CLASSES = {'cifar100': 100, 'digits': 10}  # folders: their train/<class>/ folders
# the stats the models normalise with (digits: its train split at 32x32); None: each model's own
NORM = {'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)), 'imagenet': None,
        'digits': ((0.3056,) * 3, (0.3237,) * 3), 'folder': None}


def _posterize(img, bits_to_keep, **kwargs):
    # timm's RandAugment asks for 0 bits at magnitude 10 (reached with mstd0.5): Pillow >= 12 raises
    if bits_to_keep < 1:  # older Pillow returned a black image, which the recipe was trained with
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


auto_augment.NAME_TO_OP.update({k: _posterize for k, f in auto_augment.NAME_TO_OP.items()
                                if f is auto_augment.posterize})


def num_classes(dataset, data_dir=None):
    return NUM_CLASSES.get(dataset) or _imagefolder(data_dir, 'train')[1]


def _imagefolder(data_dir, split):  # the split's path and its number of classes
    path = os.path.join(data_dir or '', split)
    classes = [e for e in os.scandir(path) if e.is_dir()] if os.path.isdir(path) else []
    if not classes:
        raise SystemExit(f"Image folder {path} not found or without class folders: --data-dir "
                         "must contain train/<class>/ and val/<class>/ folders of images.")
    return path, len(classes)


def _transform(dataset, img_size, recipe, train):
    vit = train and recipe == 'vit'
    mean, std = NORM[dataset] or (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    tf = create_transform(img_size, is_training=train, color_jitter=0., interpolation='bilinear',
                          auto_augment='rand-m9-mstd0.5-inc1' if vit else None, re_mode='pixel',
                          re_prob=0.25 if vit else 0., crop_pct=0.875, mean=mean, std=std)
    normalize = torchvision.transforms.Normalize
    if vit:  # RandAugment's fill and RandomErasing's noise live in normalised space: undone last
        tf.transforms.append(normalize([-m / s for m, s in zip(mean, std)], [1 / s for s in std]))
    else:  # the models normalise their own input: timm's Normalize is dropped
        tf.transforms = [t for t in tf.transforms if not isinstance(t, normalize)]
    return tf


def _image_datasets(dataset, data_dir, img_size, recipe):
    tf_train, tf_val = (_transform(dataset, img_size, recipe, t) for t in (True, False))
    if dataset == 'cifar100':
        try:  # download=True only fetches when the files are missing or corrupt
            train = CIFAR100(data_dir, True, tf_train, download=True)
            val = CIFAR100(data_dir, False, tf_val, download=True)
        except (OSError, RuntimeError) as e:
            folder = os.path.join(data_dir, CIFAR100.base_folder)
            raise SystemExit(f"CIFAR-100 not found in {folder} and download failed ({e}): download "
                             f"and extract {CIFAR100.url} into {data_dir} (--data-dir).")
    else:
        train_dir, val_dir = (_imagefolder(data_dir, split)[0] for split in ('train', 'val'))
        train, val = Folder(train_dir, tf_train), Folder(val_dir, tf_val)
        if train.classes != val.classes:
            raise SystemExit(f"{train_dir} and {val_dir} must contain the same class folders.")
    return SeededSamples(train), val


class Folder(ImageFolder):
    """An ImageFolder that replaces an image it cannot read by the next readable one of its split,
    the same on every rank and worker and after a resume, and names it once (NOTES.md, Data)."""
    def __init__(self, root, transform):
        super().__init__(root, transform, allow_empty=True)
        found = set(self.targets)
        empty = [os.path.join(root, c) for k, c in enumerate(self.classes) if k not in found]
        if empty:
            types = ', '.join(torchvision.datasets.folder.IMG_EXTENSIONS)
            raise SystemExit(f"No image ({types}) in {', '.join(empty)}: add images to each class "
                             "folder or remove the class from train/ and val/.")
        # per image, found unreadable by this process or one of its loader workers
        self.unreadable = torch.zeros(len(self), dtype=torch.bool).share_memory_()
        self[0]  # a split without a readable image stops here, not in a loader worker

    def __getitem__(self, index):  # the image at index or the next readable one, and its label
        for k in (i % len(self) for i in range(index, index + len(self))):
            path, target = self.samples[k]
            try:  # only the reading: a failing transform is a bug, not a bad file
                image = self.loader(path)
            except (OSError, Image.DecompressionBombError) as e:  # not an image, truncated, huge
                if not self.unreadable[k]:
                    print(f"warning: {path} cannot be read ({type(e).__name__}) and is replaced by "
                          "the next image of its split: remove or fix it.", file=sys.stderr)
                self.unreadable[k] = True
                continue
            return self.transform(image), target
        raise SystemExit(f"No image in {self.root} can be read: check its files.")


def _digits_datasets(img_size, train_fraction):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.
    x = torch.nn.functional.interpolate(x, img_size, mode='bilinear').clamp(0, 1)
    x, y = x.expand(-1, 3, -1, -1).contiguous(), torch.tensor(d.target, dtype=torch.int64)
    train_idx, val_idx = train_test_split(np.arange(len(y)), test_size=0.3, stratify=d.target,
                                          random_state=0)  # split and subset fixed across run seeds
    if train_fraction < 1:
        train_idx, _ = train_test_split(train_idx, train_size=train_fraction,
                                        stratify=d.target[train_idx], random_state=0)
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    # training images shift by up to img_size / 8 pixels (no flips: they change digits)
    shift = torchvision.transforms.RandomCrop(img_size, padding=max(1, img_size // 8))
    train = SeededSamples(TensorDataset(x[train_idx], y[train_idx]), shift)
    return train, TensorDataset(x[val_idx], y[val_idx])


def default_workers():
    """Loader processes: the cores this process may use over torchrun's local processes, >= 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return max(1, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1)))


class TimedLoader(DataLoader):
    """A DataLoader whose `wait` is the host's seconds in next(loader) in its last epoch."""
    wait = 0.0

    @property
    def unreadable(self):  # the training images found unreadable so far (Folder), for the log
        return int(getattr(self.dataset.dataset, 'unreadable', torch.zeros(0)).sum())

    def __iter__(self):
        t0, self.wait = time.perf_counter(), 0.0
        for batch in super().__iter__():
            self.wait += time.perf_counter() - t0
            yield batch
            t0 = time.perf_counter()  # the step runs outside next()
        self.wait += time.perf_counter() - t0


def seed_globals(*key, cuda=True):
    """Seeds Python's, NumPy's and torch's generators (CUDA's unless cuda=False: the per-image
    transforms run on the CPU) from a key of small integers; nearby keys give unrelated streams."""
    s = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])
    random.seed(s)
    np.random.seed(s % 2**32)
    (torch if cuda else torch.default_generator).manual_seed(s)


class SeededSamples(torch.utils.data.Dataset):
    """A training set whose sample (index, seed, epoch) is augmented from that key alone."""
    def __init__(self, dataset, augment=torch.nn.Identity()):
        self.dataset, self.augment = dataset, augment

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        i, seed, epoch = key
        seed_globals(seed, epoch, i, cuda=False)  # same on any rank, loader worker or resumed step
        image, label = self.dataset[i]
        return self.augment(image), label  # after the dataset's own transform


class EpochSampler(DistributedSampler):
    """DistributedSampler's permutation of (seed, epoch) as (index, seed, epoch) keys, rank r taking
    every world_size-th (N processes step as one N-fold batch), less the first `skip` (resume)."""
    skip = 0

    def __iter__(self):
        return iter([(i, self.seed, self.epoch) for i in list(super().__iter__())[self.skip:]])

    def __len__(self):
        return self.num_samples - self.skip


def build_loaders(dataset, data_dir, img_size, batch_size, recipe='cnn', workers=4, rank=0,
                  world_size=1, seed=0, train_fraction=1.0, pin_memory=False):
    """(train_loader, val_loader, Mixup or None): train.py applies Mixup/CutMix to each batch."""
    if recipe == 'vit' and batch_size % 2:
        raise SystemExit(f"Mixup/CutMix needs an even --batch-size, got {batch_size}.")
    if dataset == 'digits':
        train_set, val_set = _digits_datasets(img_size, train_fraction)
        workers = 0  # upsampled once, held in memory as tensors
    else:
        train_set, val_set = _image_datasets(dataset, data_dir, img_size, recipe)
    train_sampler = EpochSampler(train_set, world_size, rank, seed=seed, drop_last=True)
    # drop_last: FOFA keeps per-sample feedback from the previous batch: the batch size is fixed.
    # generator: iter() draws the workers' base seeds from it, not from the global RNG
    kw = dict(num_workers=workers, pin_memory=pin_memory)
    train_loader = TimedLoader(train_set, batch_size, sampler=train_sampler, drop_last=True,
                               generator=torch.Generator().manual_seed(seed), **kw)
    if len(train_loader) == 0:
        raise SystemExit(f"Training set has {len(train_set)} images per process, fewer than "
                         f"--batch-size {batch_size}: lower the batch size.")
    val_shard = range(rank, len(val_set), world_size)  # disjoint; one process: all, in order
    val_loader = DataLoader(val_set, 4 * batch_size, sampler=val_shard, **kw)  # no grad: 4x
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch',
                  label_smoothing=0.1, num_classes=num_classes(dataset, data_dir))  # soft targets
    return train_loader, val_loader, mixup if recipe == 'vit' else None  # the vit recipe's


def set_epoch(loader, epoch, seed, step=0):
    """Order and augmentations from `step` on, set by (seed, epoch) alone: bit-exact resumes."""
    loader.sampler.seed = seed
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip = step * loader.batch_size  # earlier batches are not loaded
