"""paper.sh --dry-run: every cell of a table built at its input size and trained 2 steps on CPU.

    python paper_dry_run.py DIR < cells   # a line per cell: its label, its train.py arguments

DIR gets a fake CIFAR-100 (cifar-100-python: 4 training images of noise, 1 test image) and a
fake ImageFolder (imagenet/: 2 classes of 2 training images and 1 validation image) where it has
none: two steps of batch 2, and tests as small as they get (a cell tests its teacher, its student,
the EMA student and more). The cells run in this one process: torch and timm load once.
Prints one line per cell: ok and its loss, or why it failed.
"""
import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import shlex
import shutil
import sys
import time

import numpy as np
import torchvision
from PIL import Image

import train


def md5(path):
    with open(path, 'rb') as f:
        return hashlib.md5(f.read()).hexdigest()


def fake_cifar(root, sizes=(('train', 4), ('test', 1))):
    """torchvision's CIFAR-100 files (pickles of uint8 rows): random pixels, labels 0, 1, 2..."""
    folder = os.path.join(root, 'cifar-100-python')
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in sizes:
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(os.path.join(folder, name), 'wb') as f:
            pickle.dump({'data': images, 'fine_labels': list(range(n)),
                         'coarse_labels': list(range(n)),
                         'filenames': [f'{i}.png' for i in range(n)]}, f)
    with open(os.path.join(folder, 'meta'), 'wb') as f:
        pickle.dump({'fine_label_names': [f'c{i}' for i in range(100)],
                     'coarse_label_names': [f's{i}' for i in range(20)]}, f)


def fake_imagefolder(root, classes=2, sizes=(('train', 2), ('val', 1))):
    """train/ and val/ class folders of small random PNGs (resized to the cell's input size)."""
    rng = np.random.default_rng(0)
    for split, n in sizes:
        for c in range(classes):
            folder = os.path.join(root, split, f'n{c:08d}')
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                image = rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)
                Image.fromarray(image).save(os.path.join(folder, f'{i}.png'))


def accept_cifar_files(root):
    """torchvision checks CIFAR-100 against the real files' md5 sums: here, these files' own."""
    folder = os.path.join(root, 'cifar-100-python')
    cifar = torchvision.datasets.CIFAR100
    cifar.train_list = [['train', md5(os.path.join(folder, 'train'))]]
    cifar.test_list = [['test', md5(os.path.join(folder, 'test'))]]
    cifar.meta = {**cifar.meta, 'md5': md5(os.path.join(folder, 'meta'))}


def run_cell(label, argv, root):
    """train.main(argv), its output held back; prints one line from the run's last log record, or
    train.py's one-sentence error. Any other exception is a bug: its traceback goes through."""
    start, printed, line = time.time(), io.StringIO(), f'{label}: FAIL, traceback below'
    try:
        out = train.get_args(argv).out
        with contextlib.redirect_stdout(printed):
            train.main(argv)
        with open(os.path.join(out, 'log.jsonl')) as f:
            rec = json.loads(f.readlines()[-1])
        with open(os.path.join(out, 'args.json')) as f:
            img_size = json.load(f)['img_size']
        if os.path.abspath(out).startswith(os.path.abspath(root) + os.sep):
            shutil.rmtree(out)  # its checkpoints (0.4 GB with a Mixer-B teacher): of no more use
        ok = rec['skipped_steps'] == 0 and math.isfinite(rec['total'])
        line = (f"{label}: {'ok' if ok else 'FAIL: a non-finite loss'}, {img_size} px, "
                f"loss {rec['total']:.4g}, {time.time() - start:.1f} s")
        return ok
    except SystemExit as e:
        line = f'{label}: FAIL: {e}'
        return False
    finally:  # one whole line per cell: processes running side by side print between them
        print(line, flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit('usage: python paper_dry_run.py DIR < cells (paper.sh --dry-run writes).')
    root = argv[0]
    if not os.path.isdir(os.path.join(root, 'cifar-100-python')):
        fake_cifar(root)
    if not os.path.isdir(os.path.join(root, 'imagenet')):
        fake_imagefolder(os.path.join(root, 'imagenet'))
    accept_cifar_files(root)
    cells = [shlex.split(line) for line in sys.stdin if line.strip()]
    start = time.time()
    failed = sum(not run_cell(words[0], words[1:], root) for words in cells)
    print(f'{len(cells) - failed} of {len(cells)} cells built and stepped in '
          f'{time.time() - start:.0f} s')
    if failed:
        raise SystemExit(f'{failed} of {len(cells)} cells failed the dry run.')


if __name__ == '__main__':
    main()
