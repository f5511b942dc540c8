"""Evaluate saved students, draw RAA's attention, summarise many runs.

    python eval.py --model deit_t --ckpt runs/x/best.pt --dataset cifar100     # top-1/top-5, printed and as JSON
    python eval.py --ckpt runs/x/last.pt --attn attn.png                      # RAA attention of a FOFA run (Fig. 3)
    python eval.py --summarize runs/evidence                                   # mean +- std over seeds, as markdown
"""
import argparse
import glob
import json
import os
import statistics
from collections import defaultdict
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image

import data
import models
import train


def accuracy(args):
    img_size = args.img_size or models.INPUT_SIZE.get(args.model, 224)
    train.family_recipe(args.model, img_size, 'model')  # an unknown model or one that cannot take --img-size
    nc = data.num_classes(args.dataset, args.data_dir)
    norm = data.NORM[args.dataset] or (None, None)
    net = models.create(args.model, nc, mean=norm[0], std=norm[1])
    train.load_weights(args.ckpt, net.net, f'{args.model} ({nc} classes)')
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    _, val_loader, _ = data.build_loaders(args.dataset, args.data_dir, img_size, args.batch_size, workers=args.workers)
    ctx = torch.autocast(device, torch.bfloat16) if args.amp else nullcontext()
    top1, top5 = train.evaluate(net.to(device), val_loader, device, ctx)
    print(f'{args.model} {args.ckpt}: top-1 {top1:.2f} top-5 {top5:.2f}')
    print(json.dumps({'model': args.model, 'ckpt': args.ckpt, 'dataset': args.dataset, 'top1': top1, 'top5': top5}))
    return top1, top5


COLORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)  # viridis


def draw_attention(args):
    """RAA's attention over a validation batch, averaged over images and heads: row = query, column = key, both in
    (stage, patch) order, stage boundaries in white. Needs the last.pt of a FOFA run (it holds RAA's weights)."""
    ck = train.read_checkpoint(args.ckpt, '--ckpt')
    run = train.get_args(['--student', 'unknown'])  # defaults for flags newer than the run
    vars(run).update(ck.get('args', {}))
    if getattr(run, 'method', None) != 'fofa' or getattr(run, 'no_raa', True) or 'model' not in ck:
        raise SystemExit(f'{args.ckpt} is not the last.pt of a FOFA run with RAA: --attn needs its RAA weights.')
    run.teacher_ckpt = None  # RAA only sees the student; the teacher's architecture fixes the aligners' shapes
    model = train.build(run, data.num_classes(run.dataset, run.data_dir)).eval()
    model.load_state_dict(ck['model'])
    _, val_loader, _ = data.build_loaders(run.dataset, run.data_dir, run.img_size, args.batch_size, workers=0)
    model.raa.keep_attn = True
    with torch.no_grad():
        model.raa(model.student(next(iter(val_loader))[0])[1])
    attn = model.raa.attn.mean((0, 1))  # (N_q, N_q)
    n, cell = attn.shape[0], max(1, 512 // attn.shape[0])
    v = ((attn - attn.min()) / (attn.max() - attn.min() + 1e-12)).numpy() * (len(COLORS) - 1)  # min-max contrast
    lo = np.floor(v).clip(0, len(COLORS) - 2).astype(int)
    rgb = COLORS[lo] + (v - lo)[..., None] * (COLORS[lo + 1] - COLORS[lo])
    img = np.kron(rgb, np.ones((cell, cell, 1)))
    for b in range(1, 4):  # stage boundaries
        img[b * n // 4 * cell - 1, :] = img[:, b * n // 4 * cell - 1] = 255
    os.makedirs(os.path.dirname(os.path.abspath(args.attn)), exist_ok=True)
    Image.fromarray(img.astype(np.uint8)).save(args.attn)
    print(f'{args.attn}: RAA attention of {run.teacher} -> {run.student}, {n} queries in 4 stages')


def summarize(root):
    """Markdown table of <root>/<pair>/<config>/<seed>/log.jsonl: final and best top-1, mean +- std over seeds.
    Configs keep the order in which they were run."""
    runs, teacher = defaultdict(list), {}
    for log in sorted(glob.glob(os.path.join(root, '*', '*', '*', 'log.jsonl')), key=os.path.getmtime):
        recs = [json.loads(line) for line in open(log)]
        pair, config = log.split(os.sep)[-4:-2]
        runs[pair, config].append((recs[-1]['top1'], max(max(r['top1'], r['top1_ema'] or 0) for r in recs)))
        if recs[-1].get('teacher_top1') is not None:
            teacher[pair] = recs[-1]['teacher_top1']
    if not runs:
        raise SystemExit(f'--summarize {root} holds no runs: expected {root}/<pair>/<config>/<seed>/log.jsonl files.')
    ms = lambda xs: f'{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.2f}'
    lines = ['| teacher -> student | teacher top-1 | config | seeds | final top-1 | best top-1 |',
             '|---|---|---|---|---|---|']
    for (pair, config), r in sorted(runs.items(), key=lambda kv: kv[0][0]):  # stable: run order within a pair
        t = f'{teacher[pair]:.2f}' if pair in teacher else '-'
        lines.append(f'| {pair.replace("-", " -> ")} | {t} | {config} | {len(r)} | {ms([a for a, _ in r])} | '
                     f'{ms([b for _, b in r])} |')
    print('\n'.join(lines))
    return runs


def main(argv=None):
    p = train.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', help='architecture of the checkpoint (models.MODELS or a timm name)')
    p.add_argument('--ckpt', help='best.pt / last.pt of a run, or any timm state_dict')
    p.add_argument('--dataset', default='digits', choices=data.DATASETS)
    p.add_argument('--data-dir', default='data')
    p.add_argument('--img-size', type=train.COUNT, help="default: the model's (224, or 32 for *_mini)")
    p.add_argument('--batch-size', type=train.COUNT, default=100)
    p.add_argument('--workers', type=train.NATURAL, default=4)
    p.add_argument('--amp', action='store_true', help='bf16 autocast (as in training with --amp)')
    p.add_argument('--attn', metavar='PNG', help="draw RAA's attention map of a FOFA run's last.pt")
    p.add_argument('--summarize', metavar='DIR', help='table of the runs under DIR (see evidence.sh)')
    args = p.parse_args(argv)
    if args.summarize:
        return summarize(train.check_path('--summarize', args.summarize, 'runs directory'))
    if not args.ckpt:
        raise SystemExit('--ckpt is needed (or --summarize DIR).')
    train.check_path('--ckpt', args.ckpt, 'checkpoint file')
    train.check_path('--data-dir', args.data_dir if os.path.exists(args.data_dir) else None, 'dataset directory')
    if args.attn:
        train.check_path('--attn', args.attn, 'PNG file', new=True)
        return draw_attention(args)
    if not args.model:
        raise SystemExit('--model is needed: the architecture of the checkpoint.')
    return accuracy(args)


if __name__ == '__main__':
    main()
