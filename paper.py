"""The runs of Tables 1, 2, 4, 5 and 6 of the FOFA paper (arXiv 2501.08885), beside its numbers.

    python paper.py 1 --list                  # every run's command and state; runs nothing
    python paper.py 1 --dry-run --parallel 2  # every cell built at its input size, 2 steps on CPU
    python paper.py 1 --gpus 1 --parallel 8   # the runs, 8 at once, a GPU each
    python paper.py 1 --compare               # ours (mean +- std over seeds) beside the paper's

Tables 1 (CIFAR-100, 12 pairs) and 2 (ImageNet-1k, 4 pairs): the student from scratch, KD, DKD,
DIST, OFA, FitNet, CC, RKD, FOFA, and FBT and HCD beyond the paper's columns (CRD is not here).
On CIFAR-100 ConvNeXt-T -> DeiT-T: the RAA and AFP ladder (4), AFP's stages (5), N_q (6). A run per
cell and seed, RUNS/<dataset>/<teacher>-<student>/<config>/seed<N>, its output in its train.log:
finished runs are skipped, interrupted ones resumed. README says what to download first.
"""
import argparse
import contextlib
import csv
import io
import json
import math
import multiprocessing
import os
import pickle
import queue
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import namedtuple
from statistics import mean

import numpy as np
import torch
import torchvision
from PIL import Image

import data
import train
from report import METRICS, load_runs, markdown, ms, run_top1

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, 'train.py')
PAPER_NUMBERS = os.path.join(HERE, 'paper_numbers.csv')
PAIRS = {  # teacher-student, in the paper's order
    '1': ['swin_t-resnet18', 'vit_s-resnet18', 'mixer_b16-resnet18', 'swin_t-mobilenetv2',
          'vit_s-mobilenetv2', 'mixer_b16-mobilenetv2', 'convnext_t-deit_t', 'mixer_b16-deit_t',
          'convnext_t-swin_p', 'mixer_b16-swin_p', 'convnext_t-resmlp_s12', 'swin_t-resmlp_s12'],
    '2': ['swin_t-resnet18', 'mixer_b16-mobilenetv2', 'convnext_t-deit_t', 'swin_t-resmlp_s12'],
    '4': ['convnext_t-deit_t'], '5': ['convnext_t-deit_t'], '6': ['convnext_t-deit_t']}
COLUMNS = {'teacher': 'T.', 'scratch': 'S.', 'kd': 'KD', 'dkd': 'DKD', 'dist': 'DIST',
           'ofa': 'OFA', 'fitnet': 'FitNet', 'cc': 'CC', 'rkd': 'RKD', 'crd': 'CRD',
           'fofa': 'FOFA', 'fbt': 'FBT', 'hcd': 'HCD'}  # Tables 1-2: config -> column
AFP_SETS = ['1', '2', '3', '4', '12', '13', '14', '23', '24', '34', '123', '124', '134', '234']
ROWS = {  # Tables 4-6: config -> row
    '4': {'fitnet': 'Baseline (FitNet)', 'raa': 'RAA', 'afp_nofb': 'RAA + AFP w/o feedback',
          'fofa': 'RAA + AFP'},
    '5': {'fitnet': 'Baseline (FitNet)', **{f'afp{s}': ','.join(s) for s in AFP_SETS},
          'fofa': '1,2,3,4', 'paper_row5': "the paper's row 5", 'paper_row6': "the paper's row 6"},
    '6': {'fitnet': 'Baseline (FitNet)', 'nq36': '36', 'fofa': '64', 'nq80': '80', 'nq100': '100',
          'nq144': '144'}}
# no run of their own: T. (every run tests its teacher), S. (the scratch-<student>/ce runs), CRD
# (not implemented), N_q 80 (no 4 k^2: k x k per stage), Table 5's rows whose stages are unknown
NOT_RUN = {'teacher', 'scratch', 'crd', 'nq80', 'paper_row5', 'paper_row6'}
CIFAR_TEACHERS = {'convnext_t': 'convnext_tiny', 'swin_t': 'swin_tiny_patch4_window7_224',
                  'vit_s': 'vit_small_patch16_224', 'mixer_b16': 'mixer_b16_224'}  # OFA's files
IMAGENET_TEACHERS = {'convnext_t': 'convnext_tiny.fb_in1k',  # timm's weights
                     'swin_t': 'swin_tiny_patch4_window7_224.ms_in1k',
                     'mixer_b16': 'mixer_b16_224.goog_in21k_ft_in1k'}
Cell = namedtuple('Cell', 'dataset pair config batch epochs flags')  # batch: the global batch


def recipe(dataset, student, args):
    """(global batch, epochs, train.py flags): the official recipes, with the learning rate not
    scaled with the batch. ImageNet, CNN students: cosine, where the official rate drops 10x every
    30 epochs; ViT/MLP students: lowest rate 1e-5, the official 1e-6."""
    if dataset == 'cifar100':
        return 128, 300, ['--dataset', 'cifar100', '--data-dir', args.data, '--ema', '0.9998']
    imagenet = ['--dataset', 'imagenet', '--data-dir', args.imagenet]
    if student in ('resnet18', 'mobilenetv2'):
        sgd = ['--lr', '0.1', '--wd', '1e-4', '--warmup-epochs', '3', '--ema', '0.9998']
        return 256, 100, imagenet + sgd
    return 512, 300, imagenet + ['--ema', '0.99996']


def method_flags(config, dataset):
    if config == 'raa':  # Table 4: FitNet + RAA
        return ['--method', 'fofa', '--afp-stages', 'none']
    if config == 'afp_nofb':  # + AFP without the student's feedback
        return ['--method', 'fofa', '--no-feedback']
    if config.startswith('afp'):  # Table 5: afp134 = --afp-stages 1,3,4
        return ['--method', 'fofa', '--afp-stages', ','.join(config[3:])]
    if config.startswith('nq'):
        return ['--method', 'fofa', '--nq', config[2:]]
    if config == 'fofa' and dataset == 'imagenet':
        return ['--method', 'fofa', '--nq', '144']  # the paper's ImageNet setting
    return ['--method', config]


def teacher_flags(dataset, teacher, args):
    if args.dry_run:
        return ['--teacher', teacher, '--teacher-ckpt', 'random']
    if dataset == 'cifar100':
        ckpt = os.path.join(args.teachers, f'{CIFAR_TEACHERS[teacher]}_cifar100.pth')
        return ['--teacher', teacher, '--teacher-ckpt', ckpt]
    return ['--teacher', IMAGENET_TEACHERS[teacher], '--teacher-ckpt', 'timm']


def cells(args):
    """The table's cells that match --only: the students from scratch (Tables 1-2), then every
    config on every pair."""
    dataset = 'imagenet' if args.table == '2' else 'cifar100'
    found = []
    if args.table in ('1', '2'):
        for student in dict.fromkeys(pair.split('-')[1] for pair in PAIRS[args.table]):
            batch, epochs, flags = recipe(dataset, student, args)
            found.append(Cell(dataset, f'scratch-{student}', 'ce', batch, epochs,
                              ['--student', student, '--method', 'ce'] + flags))
    for pair in PAIRS[args.table]:
        teacher, student = pair.split('-')
        batch, epochs, flags = recipe(dataset, student, args)
        for config in ROWS.get(args.table, COLUMNS):
            if config not in NOT_RUN:
                method = teacher_flags(dataset, teacher, args) + ['--student', student]
                method += method_flags(config, dataset)
                found.append(Cell(dataset, pair, config, batch, epochs, method + flags))
    found = [cell for cell in found if re.search(args.only, f'{cell.pair}/{cell.config}')]
    if not found:
        raise SystemExit(f'--only {args.only} matches no cell of Table {args.table}.')
    return found


def last_epoch(out):
    try:
        with open(os.path.join(out, 'log.jsonl')) as f:
            return json.loads(f.readlines()[-1])['epoch']
    except (FileNotFoundError, IndexError, json.JSONDecodeError):  # not started, or cut short
        return 0


def runs_to_do(args):
    """Prints every run's state and command; returns (label, run directory, command) of those to
    do: not started, or to resume."""
    launch = [sys.executable, os.path.relpath(TRAIN)]
    if args.gpus > 1:
        launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
                  str(args.gpus), os.path.relpath(TRAIN)]
    todo = []
    for cell in cells(args):
        if cell.batch % args.gpus:
            raise SystemExit(f'the global batch {cell.batch} of {cell.pair}/{cell.config} is not '
                             f'a multiple of --gpus {args.gpus}.')
        per_gpu = cell.batch // args.gpus
        for seed in args.seeds:
            out = os.path.join(args.runs, cell.dataset, cell.pair, cell.config, f'seed{seed}')
            label = f'{cell.dataset} {cell.pair}/{cell.config} seed {seed}'
            command = launch + cell.flags + ['--epochs', str(cell.epochs), '--batch-size',
                                             str(per_gpu), '--seed', str(seed), '--out', out]
            if args.parallel > 1:  # the processes of the runs at once share the cores
                workers = data.default_workers() // (args.parallel * args.gpus)
                command += ['--workers', str(max(1, workers))]
            done = last_epoch(out)
            state = 'to run'
            if done >= cell.epochs:
                state = 'done'
            elif os.path.isfile(os.path.join(out, 'last.pt')):
                state, command = f'resumes after epoch {done}', command + ['--resume']
            print(f'# {label}: global batch {cell.batch} = {args.gpus} GPU(s) x {per_gpu}, {state}')
            print(shlex.join(command))
            if state != 'done':
                todo.append((label, out, command))
    print(f'# Table {args.table}: {len(todo)} runs to do', flush=True)
    return todo


def run_all(args, todo):
    """--parallel runs at once, each on --gpus GPUs of its own, the next run to do when one ends."""
    waiting, failed = queue.SimpleQueue(), []
    for run in todo:
        waiting.put(run)
    # timm's ImageNet teachers (Table 2) come from its cache, downloaded before (README)
    env = {**os.environ, 'HF_HUB_OFFLINE': os.environ.get('HF_HUB_OFFLINE', '1')}

    def worker(slot):
        gpus = ','.join(str(g) for g in range(slot * args.gpus, (slot + 1) * args.gpus))
        env_of_slot = {**env, 'CUDA_VISIBLE_DEVICES': gpus} if args.parallel > 1 else env
        while True:
            try:
                label, out, command = waiting.get_nowait()
            except queue.Empty:
                return
            os.makedirs(out, exist_ok=True)
            log = os.path.join(out, 'train.log')
            print(f'started {label} (log: {log})', flush=True)
            with open(log, 'a') as f:
                run = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env_of_slot)
            with open(log) as f:
                lines = f.read().splitlines()
            last_line = lines[-1] if lines else ''
            print(f"{'FAILED' if run.returncode else 'finished'} {label}: {last_line}", flush=True)
            if run.returncode:
                failed.append(label)

    threads = [threading.Thread(target=worker, args=(slot,), daemon=True)
               for slot in range(args.parallel)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        raise SystemExit('interrupted: the same command resumes the runs.') from None
    if failed:
        raise SystemExit(f'{len(failed)} of {len(todo)} runs failed: see the FAILED lines and '
                         'their train.log.')
    print(f'# Table {args.table}: all runs finished; '
          f'{shlex.join(["python", "paper.py", args.table, "--compare", "--runs", args.runs])}')


def fake_data(root):
    """A CIFAR-100 of noise in torchvision's files (4 training images, 1 test image) and an
    ImageFolder imagenet/ (2 classes of 2 training images and 1 validation image)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 3072), dtype=np.uint8)  # 32 x 32 x 3 per image
    files = {'train': {'data': pixels[:4], 'fine_labels': [0, 1, 2, 3]},
             'test': {'data': pixels[4:], 'fine_labels': [0]},
             'meta': {'fine_label_names': [f'c{i}' for i in range(100)]}}
    os.makedirs(f'{root}/cifar-100-python')
    for name, content in files.items():
        with open(f'{root}/cifar-100-python/{name}', 'wb') as f:
            pickle.dump(content, f)
    for split, n in (('train', 2), ('val', 1)):
        for c in range(2):
            os.makedirs(f'{root}/imagenet/{split}/n{c}')
            for i in range(n):
                image = rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)
                Image.fromarray(image).save(f'{root}/imagenet/{split}/n{c}/{i}.png')


def dry_run_process(threads):
    """A dry-run process: --parallel of them share the cores. torchvision checks CIFAR-100 against
    the real files' md5 sums; with none (None) it checks that the files exist."""
    torch.set_num_threads(threads)
    cifar = torchvision.datasets.CIFAR100
    cifar.train_list, cifar.test_list = [['train', None]], [['test', None]]
    cifar.meta = {**cifar.meta, 'md5': None}


def dry_run_cell(label, argv):
    """train.main(argv), its output held back; prints one line from the run's last log record, or
    train.py's one-sentence error. Any other exception is a bug: its traceback goes through."""
    out = argv[argv.index('--out') + 1]
    start, line = time.time(), f'{label}: FAIL, traceback below'
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            train.main(argv)
        with open(os.path.join(out, 'log.jsonl')) as f:
            record = json.loads(f.readlines()[-1])
        with open(os.path.join(out, 'args.json')) as f:
            img_size = json.load(f)['img_size']
        ok = record['skipped_steps'] == 0 and math.isfinite(record['total'])
        line = (f"{label}: {'ok' if ok else 'FAIL: a non-finite loss'}, {img_size} px, "
                f"loss {record['total']:.4g}, {time.time() - start:.1f} s")
        return ok
    except SystemExit as e:
        line = f'{label}: FAIL: {e}'
        return False
    finally:  # one whole line per cell: the processes print side by side
        print(line, flush=True)
        shutil.rmtree(out, ignore_errors=True)  # its checkpoints: 0.4 GB with a Mixer-B teacher


def dry_run(args, root):
    """Every cell built at its input size and trained 2 steps of batch 2 on CPU: fake data in root,
    random teachers, --parallel processes (torch and timm load once in each)."""
    args.data, args.imagenet = root, os.path.join(root, 'imagenet')
    jobs = []
    for i, cell in enumerate(cells(args)):
        label = f'{cell.dataset} {cell.pair}/{cell.config} (global batch {cell.batch})'
        steps = ['--epochs', '1', '--batch-size', '2', '--seed', '0']  # 4 fake images: 2 steps
        out = ['--out', os.path.join(root, f'run{i}'), '--overwrite']
        # --workers 0: a pool's processes may not start loader processes
        jobs.append((label, cell.flags + steps + ['--workers', '0'] + out))
    fake_data(root)
    threads = max(1, data.default_workers() // args.parallel)  # the usable cores, shared
    start = time.time()
    spawn = multiprocessing.get_context('spawn')  # not fork: this process may have run torch
    with spawn.Pool(args.parallel, initializer=dry_run_process, initargs=(threads,)) as pool:
        passed = sum(pool.starmap(dry_run_cell, jobs, chunksize=1))
    print(f'# Table {args.table}: {passed} of {len(jobs)} cells built and stepped in '
          f'{time.time() - start:.0f} s')
    if passed < len(jobs):
        raise SystemExit(f'{len(jobs) - passed} of {len(jobs)} cells failed the dry run: see the '
                         'lines above.')


def compare(root, table, metric):
    """The table's runs beside PAPER_NUMBERS, cell by cell; Tables 1-2 end with the paper's last
    row, the mean gain over the student from scratch (S.)."""
    dataset = 'imagenet' if table == '2' else 'cifar100'
    runs, left = load_runs(os.path.join(root, dataset))
    with open(PAPER_NUMBERS, newline='') as f:
        rows = [r for r in csv.DictReader(f) if r['table'] == table]
    paper = {(r['pair'], r['config'], r['metric']): float(r['value']) for r in rows}
    pairs = PAIRS[table]
    ours = {}  # (pair, config, metric) -> one number per finished seed
    for pair, configs in runs.items():
        for c, seeds in configs.items():
            ours[pair, c, 'top1'] = [run_top1(r, metric) for r in seeds.values()]
            ours[pair, c, 'mem_gb'] = [max(e.get('peak_mem_gb') or 0 for e in r)
                                       for r in seeds.values()]
    for pair in pairs:  # T.: the teacher's top-1 as the runs measured it; S.: --method ce alone
        teachers = [r[-1]['teacher_top1'] for seeds in runs.get(pair, {}).values()
                    for r in seeds.values() if r[-1]['teacher_top1'] is not None]
        ours[pair, 'teacher', 'top1'] = teachers[:1]
        student = pair.split('-')[1]
        ours[pair, 'scratch', 'top1'] = ours.get((f'scratch-{student}', 'ce', 'top1'), [])

    def cell(key, n_pairs=0):  # ours / the paper's (ours - paper), '-' where missing; (n_pairs)
        mine, theirs = ours.get(key), paper.get(key)
        text = (ms(mine) if len(mine) > 1 else f'{mine[0]:.2f}') if mine else '-'
        text += ' / -' if theirs is None else f' / {theirs:.2f}'
        if mine and theirs is not None:
            text += f' ({mean(mine) - theirs:+.2f})'
        return text + (f' ({n_pairs})' if n_pairs else '')

    print(f"Table {table} ({dataset}): ours / the paper's (ours - paper). Ours: mean ± std over "
          f"the finished seeds of {METRICS[metric]}. The paper's numbers: {PAPER_NUMBERS}.\n")
    if table in ROWS:
        print(f'{pairs[0].replace("-", " -> ")}\n')
        print(markdown('config', 'top-1', 'memory (GB)', head=True))
        for config, label in ROWS[table].items():
            print(markdown(label, *(cell((pairs[0], config, m)) for m in ('top1', 'mem_gb'))))
    else:
        print(markdown('teacher -> student', *COLUMNS.values(), head=True))
        for pair in pairs:
            print(markdown(pair.replace('-', ' -> '), *(cell((pair, c, 'top1')) for c in COLUMNS)))
        gains = {c: [mean(ours[p, c, 'top1']) - mean(ours[p, 'scratch', 'top1']) for p in pairs
                     if ours.get((p, c, 'top1')) and ours[p, 'scratch', 'top1']]
                 for c in list(COLUMNS)[2:]}  # ours: over the pairs with both, counted in ()
        ours.update({('average', c, 'gain'): [mean(g)] for c, g in gains.items() if g})
        cells_of_gains = (cell(('average', c, 'gain'), len(g)) for c, g in gains.items())
        print(f'| average gain over S. (pairs) | | | {" | ".join(cells_of_gains)} |')
    counts = [len(v) for (_, c, m), v in ours.items()
              if m == 'top1' and v and c not in ('teacher', 'scratch')]
    print(f'\nfinished seeds per cell: {min(counts, default=0)} to {max(counts, default=0)}')
    for r in rows:
        if r['note'] and r['metric'] != 'mem_gb' and r['pair'] != 'average':
            print(f"note, {r['pair']} {COLUMNS.get(r['config'], r['config'])}: {r['note']}")
    configs = set(ROWS.get(table, {})) or {*COLUMNS, 'ce'}
    for (pair, config), text in sorted(left.items()):  # this table's runs that did not finish
        scratch = pair.startswith('scratch-') and table in ('1', '2')
        if (pair in pairs or scratch) and config in configs:
            print(f'left out, {pair}/{config}: {text}')


def parser():
    p = train.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('table', choices=tuple(PAIRS), help="the paper's table: its runs, unless "
                   '--list, --dry-run or --compare')
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--list', action='store_true', help="every run's command, global batch and "
                      'state; runs nothing')
    mode.add_argument('--dry-run', action='store_true', help='every cell built at its input size '
                      'and trained 2 steps on CPU, with random teachers and fake data')
    mode.add_argument('--compare', action='store_true',
                      help="our runs beside the paper's numbers (paper_numbers.csv)")
    p.add_argument('--metric', choices=tuple(METRICS), default='best',
                   help="with --compare, a run's top-1: " + '; or '.join(METRICS.values()))
    p.add_argument('--seeds', nargs='+', type=train.NATURAL, default=[0, 1, 2], metavar='N',
                   help='the paper averages 3 trials (default: 0 1 2)')
    p.add_argument('--gpus', type=train.COUNT, default=1,
                   help="processes (GPUs) per run, each with the cell's global batch / GPUS")
    p.add_argument('--parallel', type=train.COUNT, default=1, help='runs at once, each on GPUS '
                   'GPUs of its own (--dry-run: processes sharing the cores)')
    p.add_argument('--only', default='', metavar='REGEX', help="the cells whose <pair>/<config> "
                   "match, e.g. '^swin_t-resnet18/' or '/fofa$'")
    p.add_argument('--runs', default='runs/paper', help='the runs (default: %(default)s)')
    p.add_argument('--data', default='data', help='CIFAR-100 root (default: %(default)s)')
    p.add_argument('--imagenet', default='data/imagenet',
                   help='ImageNet-1k: train/ and val/ class folders (default: %(default)s)')
    p.add_argument('--teachers', default='teachers',
                   help="OFA's CIFAR-100 teachers, <name>_cifar100.pth (default: %(default)s)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        re.compile(args.only)
    except re.error as e:
        raise SystemExit(f'--only {args.only} is not a regular expression ({e}).')
    if args.compare:
        return compare(train.check_path('--runs', args.runs, 'runs directory'), args.table,
                       args.metric)
    if args.dry_run:
        with tempfile.TemporaryDirectory() as root:
            return dry_run(args, root)
    train.check_path('--runs', args.runs, 'runs directory', new=True)
    todo = runs_to_do(args)
    if not args.list:
        run_all(args, todo)


if __name__ == '__main__':
    main()
