"""Tests for data.py on CPU with data made on the fly (no network)."""
import hashlib
import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import data


def _md5(path):
    return hashlib.md5(open(path, 'rb').read()).hexdigest()


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """A small CIFAR-100 in torchvision's on-disk format. Python 3 pickles: str keys, as torchvision
    reads the original Python 2 pickles with encoding='latin1'. The md5 checks are passed by
    pointing the class's expected checksums at the fake files (monkeypatch restores them)."""
    folder = tmp_path / 'cifar-100-python'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (('train', 20), ('test', 10)):
        with open(folder / name, 'wb') as f:
            pickle.dump({'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         'fine_labels': [i % 100 for i in range(n)],
                         'coarse_labels': [i % 20 for i in range(n)],
                         'filenames': [f'{i}.png' for i in range(n)]}, f)
    with open(folder / 'meta', 'wb') as f:
        pickle.dump({'fine_label_names': [f'c{i}' for i in range(100)],
                     'coarse_label_names': [f's{i}' for i in range(20)]}, f)
    C = torchvision.datasets.CIFAR100
    monkeypatch.setattr(C, 'train_list', [['train', _md5(folder / 'train')]])
    monkeypatch.setattr(C, 'test_list', [['test', _md5(folder / 'test')]])
    monkeypatch.setattr(C, 'meta', dict(C.meta, md5=_md5(folder / 'meta')))
    return tmp_path


@pytest.fixture
def no_download(monkeypatch):
    def fail(*args, **kwargs):
        raise urllib.error.URLError('no network in tests')
    monkeypatch.setattr(torchvision.datasets.cifar, 'download_and_extract_archive', fail)


@pytest.mark.parametrize('recipe', ['cnn', 'vit'])
def test_cifar100(fake_cifar, no_download, recipe):
    train, val, mixup = data.build_loaders('cifar100', str(fake_cifar), img_size=32, batch_size=8,
                                           recipe=recipe, workers=0)
    assert (mixup is None) == (recipe == 'cnn')
    assert len(train) == 2  # 20 images, batch 8, drop_last
    batches = list(train)
    assert len(batches) == 2
    for x, y in batches + list(val):
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < 100
    if recipe == 'cnn':  # vit's random erasing fills with noise outside [0, 1]
        assert 0 <= x.min() and x.max() <= 1
    assert [len(y) for _, y in val] == [8, 2]
    x, y = next(iter(val))
    assert 0 <= x.min() and x.max() <= 1


@pytest.mark.parametrize('workers', [0, 2])
def test_cifar100_epoch_determinism(fake_cifar, no_download, workers):
    """Order and augmentation (RandomResizedCrop, flip, RandAugment, erasing) follow (seed, epoch),
    both in-process and in worker processes."""
    train, _, _ = data.build_loaders('cifar100', str(fake_cifar), 32, 8, recipe='vit', workers=workers)
    def first(epoch):
        data.set_epoch(train, epoch, seed=3)
        return next(iter(train))
    a, b, c = first(2), first(2), first(5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_cifar100_missing(tmp_path, no_download):
    with pytest.raises(SystemExit, match='cifar-100-python'):
        data.build_loaders('cifar100', str(tmp_path / 'nowhere'), 32, 8, workers=0)
    with pytest.raises(SystemExit, match='--data-dir'):
        data.build_loaders('cifar100', None, 32, 8, workers=0)


def _image_folder(root, n_classes=3, n_images=4):
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for c in range(n_classes):
            d = root / split / f'n{c:08d}'
            d.mkdir(parents=True)
            for i in range(n_images):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f'{i}.png')
    return root


def test_imagenet_folder(tmp_path):
    root = _image_folder(tmp_path)
    assert data.num_classes('imagenet', str(root)) == 3
    train, val, mixup = data.build_loaders('imagenet', str(root), img_size=32, batch_size=4,
                                           recipe='vit', workers=0)
    assert len(train) == 3 and mixup.num_classes == 3
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and y.max() < 3
    seen = torch.cat([y for _, y in val])
    assert sorted(seen.tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_imagenet_missing(tmp_path):
    with pytest.raises(SystemExit, match=str(tmp_path / 'train')):
        data.build_loaders('imagenet', str(tmp_path), 32, 8, workers=0)
    with pytest.raises(SystemExit, match='train/<class>'):
        data.num_classes('imagenet', str(tmp_path))
    (tmp_path / 'train' / 'a').mkdir(parents=True)
    with pytest.raises(SystemExit, match=str(tmp_path / 'val')):
        data.build_loaders('imagenet', str(tmp_path), 32, 8, workers=0)


def _all_labels(loader):
    return torch.cat([y for _, y in loader])


def test_digits_split_and_determinism():
    train, val, mixup = data.build_loaders('digits', None, img_size=32, batch_size=64, seed=0)
    assert mixup is None and train.num_workers == 0
    n_train, n_val = len(train.dataset), len(val.dataset)
    assert n_train + n_val == 1797 and n_val == 540
    counts = torch.bincount(val.dataset.tensors[1], minlength=10)
    assert counts.min() >= 50 and counts.max() <= 56  # stratified: ~54 per class
    x, y = next(iter(train))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.5
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    # the split does not depend on the run seed
    train2, val2, _ = data.build_loaders('digits', None, 32, 64, seed=123)
    assert torch.equal(val.dataset.tensors[0], val2.dataset.tensors[0])
    assert torch.equal(train.dataset.tensors[0], train2.dataset.tensors[0])
    # order and augmentation are a function of (seed, epoch) only
    def first(loader, epoch, seed):
        data.set_epoch(loader, epoch, seed)
        return next(iter(loader))
    a, b, c = first(train, 3, 7), first(train2, 3, 7), first(train, 4, 7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # same samples in a different order would still differ: check the shift itself is seeded
    data.set_epoch(train, 3, 7)
    epoch = list(train)
    data.set_epoch(train, 3, 7)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(epoch, train))


def test_digits_train_fraction():
    full, _, _ = data.build_loaders('digits', None, 32, 16)
    sub, _, _ = data.build_loaders('digits', None, 32, 16, train_fraction=0.2, seed=1)
    sub2, _, _ = data.build_loaders('digits', None, 32, 16, train_fraction=0.2, seed=2)
    n = len(sub.dataset)
    assert abs(n - 0.2 * len(full.dataset)) <= 1
    assert torch.equal(sub.dataset.tensors[0], sub2.dataset.tensors[0])  # fixed subset
    counts = torch.bincount(sub.dataset.tensors[1], minlength=10)
    assert counts.min() >= n // 10 - 2 and counts.max() <= n // 10 + 2  # stratified
    # the subset is drawn from the training part, never from the val set
    full_rows = {tuple(r.flatten()[::7].tolist()) for r in full.dataset.tensors[0]}
    assert all(tuple(r.flatten()[::7].tolist()) in full_rows for r in sub.dataset.tensors[0])


def test_digits_vit_mixup():
    train, _, mixup = data.build_loaders('digits', None, 32, 16, recipe='vit')
    assert mixup is not None
    x, y = next(iter(train))
    xm, ym = mixup(x, y)
    assert xm.shape == x.shape and ym.shape == (16, 10)
    assert torch.allclose(ym.sum(1), torch.ones(16))
    assert ym.min() > 0  # label smoothing is folded in


def test_digits_distributed_shards():
    trains, vals = [], []
    for r in range(2):
        train, val, _ = data.build_loaders('digits', None, 32, 16, distributed=True, rank=r,
                                           world_size=2, seed=5)
        data.set_epoch(train, 1, 5)
        trains.append(list(train.sampler))
        vals.append(list(val.sampler))
        assert len(list(val)) == len(val)
    n_train, n_val = len(train.dataset), len(val.dataset)
    assert not set(trains[0]) & set(trains[1])
    assert len(trains[0]) == len(trains[1]) == n_train // 2
    assert sorted(vals[0] + vals[1]) == list(range(n_val))


def test_randaugment_posterize_zero_bits():
    """timm's RandAugment reaches posterize(bits=0) at magnitude 10, which Pillow >= 12 rejects."""
    from timm.data.auto_augment import AugmentOp
    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    out = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)(img)
    assert np.asarray(out).max() == 0
    assert np.asarray(AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=5)(img)).max() > 0


def test_bad_arguments():
    with pytest.raises(SystemExit, match='Unknown dataset'):
        data.build_loaders('mnist', None, 32, 8)
    with pytest.raises(SystemExit, match='batch-size'):
        data.build_loaders('digits', None, 32, 5000)
    with pytest.raises(SystemExit, match='even'):
        data.build_loaders('digits', None, 32, 15, recipe='vit')
