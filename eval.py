"""Evaluate saved students, draw RAA's attention, summarise many runs.

    python eval.py --model deit_t --ckpt runs/x/best.pt --dataset cifar100     # top-1/top-5, printed and as JSON
    python eval.py --ckpt runs/x/last.pt --attn attn.png                      # RAA attention of a FOFA run (Fig. 3)
    python eval.py --summarize runs/evidence                                   # mean +- std over seeds, as markdown
    python eval.py --summarize runs/evidence --curves curves.png               # learning curves per pair
    python eval.py --summarize runs/paper --paper 1                            # next to Table 1
"""
import argparse
import csv
import glob
import json
import os
import statistics
from collections import defaultdict
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import models
import train


def accuracy(args):
    img_size = args.img_size or models.INPUT_SIZE.get(args.model, 224)
    train.family_recipe(args.model, img_size, 'model')  # an unknown model or one that cannot take --img-size
    nc, norm = data.num_classes(args.dataset, args.data_dir), data.NORM[args.dataset] or (None, None)
    try:
        net = train.create(args.model, nc, norm, args.ckpt)  # a file, PATH:ema, or 'timm' (ImageNet weights)
    except ValueError as e:
        raise SystemExit(str(e))
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
    rgb = np.stack([np.interp(v, range(len(COLORS)), c) for c in COLORS.T], -1)  # linear between the colours
    img = np.kron(rgb, np.ones((cell, cell, 1)))
    for b in range(1, 4):  # stage boundaries
        img[b * n // 4 * cell - 1, :] = img[:, b * n // 4 * cell - 1] = 255
    os.makedirs(os.path.dirname(os.path.abspath(args.attn)), exist_ok=True)
    Image.fromarray(img.astype(np.uint8)).save(args.attn)
    print(f'{args.attn}: RAA attention of {run.teacher} -> {run.student}, {n} queries in 4 stages')


def load_runs(root):
    """{pair: {config: {seed: [log records]}}} from <root>/<pair>/<config>/<seed>/log.jsonl,
    finished runs only (up to their --epochs; untested epochs may be left out of a log), and {(pair, config):
    'n diverged, m unfinished'} for the others."""
    runs, left = defaultdict(dict), defaultdict(lambda: [0, 0])
    for log in sorted(glob.glob(os.path.join(root, '*', '*', '*', 'log.jsonl'))):  # by name (a checkout has no times)
        pair, config, seed = log.split(os.sep)[-4:-1]
        records, seeds = [json.loads(line) for line in open(log)], runs[pair].setdefault(config, {})
        if records[-1]['epoch'] >= json.load(open(os.path.join(os.path.dirname(log), 'args.json')))['epochs']:
            seeds[seed] = records
        else:  # stopped by non-finite losses (train.MAX_NONFINITE), or still running
            left[pair, config][records[-1]['skipped_steps'] == 0] += 1
    runs = {pair: configs for pair, configs in runs.items() if any(configs.values())}  # pairs with a finished run
    if not runs:
        raise SystemExit(f'--summarize {root} holds no finished runs: expected <pair>/<config>/<seed>/log.jsonl files.')
    return runs, {k: f'{d} diverged, {u} unfinished' for k, (d, u) in left.items()}


def drift(r, tested):
    """Mean top-1 over the last 20% of the epochs minus over the 20% before: near 0 once a run has converged."""
    w = [[e['top1'] for e in r if e['epoch'] in tested and lo < e['epoch'] / r[-1]['epoch'] <= lo + 0.2]
         for lo in (0.6, 0.8)]
    return statistics.mean(w[1]) - statistics.mean(w[0]) if all(w) else None


def ms(xs):
    return f'{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.2f}' if xs else '-'


def diffs(final, a, b):  # paired: per-seed final top-1 a - b, over the seeds both configs finished
    return [final[a][s] - final[b][s] for s in final.get(a, {}) if s in final.get(b, {})]


def summarize(root, comparisons=()):
    """One markdown table per pair: final and best top-1 (mean +- std over seeds), the drift, the paired per-seed
    difference of the final top-1 to kd, raa and fofa (same seed and data order), the prompted teacher's final top-1;
    then one table of the paired differences A - B (comparisons 'A:B') with a column per pair."""
    (runs, left), finals = load_runs(root), {}
    for pair, configs in sorted(runs.items()):
        final = finals[pair] = {c: {s: r[-1]['top1'] for s, r in seeds.items()} for c, seeds in configs.items()}
        teacher = next((r[-1]['teacher_top1'] for seeds in configs.values() for r in seeds.values()
                        if r[-1]['teacher_top1']), None)
        tested = set.intersection(*({e['epoch'] for e in r if e['top1'] is not None}  # best: over epochs all tested
                                    for seeds in configs.values() for r in seeds.values()))
        print(f'\n{pair.replace("-", " -> ")}, teacher top-1 {teacher or 0:.2f}\n\n| config | seeds | final top-1 | '
              'best top-1 | last 20% - previous 20% | final - kd (paired) | final - raa (paired) | final - fofa (paired) '
              '| prompted teacher top-1 |\n|---|---|---|---|---|---|---|---|---|')
        for c, seeds in configs.items():
            seeds_note = f'{len(seeds)} ({left[pair, c]})' if (pair, c) in left else len(seeds)
            paired = lambda ref: ms(diffs(final, c, ref))
            prompted = [r[-1]['prompted_teacher_top1'] for r in seeds.values() if r[-1].get('prompted_teacher_top1')]
            best = [max(max(e['top1'], e['top1_ema'] or 0) for e in r if e['epoch'] in tested) for r in seeds.values()]
            drifts = [d for r in seeds.values() if (d := drift(r, tested)) is not None]
            print(f'| {c} | {seeds_note} | {ms(list(final[c].values()))} | {ms(best)} | {ms(drifts)} | '
                  f'{paired("kd")} | {paired("raa")} | {paired("fofa")} | {ms(prompted)} |')
    if comparisons:  # one column per pair
        print('\n| paired difference of the final top-1 | ' + ' | '.join(p.replace('-', ' -> ') for p in finals) + ' |\n'
              + '|---' * (len(finals) + 1) + '|')
    for a, b in (c.split(':') for c in comparisons):
        cells = (f'{ms(d)} (n = {len(d)})' if (d := diffs(f, a, b)) else '-' for f in finals.values())
        print(f'| {a} - {b} | ' + ' | '.join(cells) + ' |')
    return runs


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (90, 90, 200), (255, 187, 120),
           (152, 223, 138), (128, 0, 0), (0, 128, 128)]


def curves(root, png, w=520, h=360, pad=40):
    """Test top-1 per epoch, mean over seeds, one line per config and one panel per pair, into a PNG (Pillow)."""
    runs = load_runs(root)[0]
    rows = max(-(-len(configs) // 3) for configs in runs.values())  # legend lines, under the panels
    img = Image.new('RGB', (w * len(runs), h + 12 * rows), 'white')
    draw = ImageDraw.Draw(img)
    for k, (pair, configs) in enumerate(sorted(runs.items())):
        x0, epochs = k * w + pad, max(r[-1]['epoch'] for seeds in configs.values() for r in seeds.values())
        to_xy = lambda e, acc: (x0 + (w - 2 * pad) * (e - 1) / max(epochs - 1, 1), h - pad - (h - 2 * pad) * acc / 100)
        draw.rectangle([x0, pad, x0 + w - 2 * pad, h - pad], outline='black')
        draw.text((x0, 8), f'{pair.replace("-", " -> ")}: test top-1 (%) per epoch, mean over seeds', fill='black')
        for acc in range(0, 101, 20):
            draw.text((x0 - 25, to_xy(1, acc)[1] - 5), str(acc), fill='gray')
        draw.text((x0 + w - 2 * pad - 30, h - pad + 5), f'{epochs} ep', fill='gray')
        for j, (c, seeds) in enumerate((c, seeds) for c, seeds in configs.items() if seeds):
            top1 = [{e['epoch']: e['top1'] for e in r if e['top1'] is not None} for r in seeds.values()]
            tested = sorted(set.intersection(*map(set, top1)))  # epochs tested in every seed (--eval-every)
            mean = [(e, statistics.mean(t[e] for t in top1)) for e in tested]
            draw.line([to_xy(e, a) for e, a in mean], fill=PALETTE[j % len(PALETTE)], width=2)
            draw.text((x0 + 150 * (j % 3), h - pad + 18 + 12 * (j // 3)), c, fill=PALETTE[j % len(PALETTE)])
    img.save(png)
    print(f'{png}: curves of {sum(len(c) for c in runs.values())} configs in {len(runs)} pairs')


PAPER_NUMBERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'paper_numbers.csv')
PAPER_GRID = {'teacher': 'T.', 'scratch': 'S.', 'kd': 'KD', 'dkd': 'DKD', 'dist': 'DIST',
              'ofa': 'OFA', 'fitnet': 'FitNet', 'cc': 'CC', 'rkd': 'RKD', 'crd': 'CRD',
              'fofa': 'FOFA', 'fbt': 'FBT', 'hcd': 'HCD'}  # Tables 1-2: config -> column
AFP_SETS = ['1', '2', '3', '4', '12', '13', '14', '23', '24', '34', '123', '124', '134', '234']
PAPER_ROWS = {  # Tables 4-6, all on ConvNeXt-T -> DeiT-T: config -> row
    '4': {'fitnet': 'Baseline (FitNet)', 'raa': 'RAA', 'afp_nofb': 'RAA + AFP w/o feedback',
          'fofa': 'RAA + AFP'},
    '5': {'fitnet': 'Baseline (FitNet)', **{f'afp{s}': ','.join(s) for s in AFP_SETS},
          'fofa': '1,2,3,4', 'paper_row5': "the paper's row 5", 'paper_row6': "the paper's row 6"},
    '6': {'fitnet': 'Baseline (FitNet)', 'nq36': '36', 'fofa': '64', 'nq80': '80', 'nq100': '100',
          'nq144': '144'}}


def run_top1(records, metric):
    """best: the best tested epoch's max(raw, EMA) top-1 (the official code's); last: the last
    epoch's raw top-1."""
    if metric == 'last':
        return records[-1]['top1']
    return max(max(e['top1'], e.get('top1_ema') or -1) for e in records if e['top1'] is not None)


def paper_table(root, table, metric):
    """The runs of paper.sh TABLE under root beside the paper's numbers (paper_numbers.csv, each
    with its source): per cell our mean +- std over the finished seeds / the paper's number
    (ours - paper), '-' where either is missing; Tables 1-2 end with the paper's last row, the
    mean gain over the student from scratch (S.)."""
    dataset = 'imagenet' if table == '2' else 'cifar100'
    runs, left = load_runs(os.path.join(root, dataset))
    with open(PAPER_NUMBERS, newline='') as f:
        rows = [r for r in csv.DictReader(f) if r['table'] == table]
    paper = {(r['pair'], r['config'], r['metric']): float(r['value']) for r in rows}
    ours = {}  # (pair, config, metric) -> one number per finished seed
    for pair, configs in runs.items():
        for c, seeds in configs.items():
            ours[pair, c, 'top1'] = [run_top1(r, metric) for r in seeds.values()]
            ours[pair, c, 'mem_gb'] = [max(e.get('peak_mem_gb') or 0 for e in r)
                                       for r in seeds.values()]
    pairs = list(dict.fromkeys(r['pair'] for r in rows if r['pair'] != 'average'))
    for pair in pairs:  # T.: the teacher's top-1 as the runs measured it; S.: --method ce alone
        teachers = [r[-1]['teacher_top1'] for seeds in runs.get(pair, {}).values()
                    for r in seeds.values() if r[-1]['teacher_top1'] is not None]
        ours[pair, 'teacher', 'top1'] = teachers[:1]
        student = pair.split('-')[1]
        ours[pair, 'scratch', 'top1'] = ours.get((f'scratch-{student}', 'ce', 'top1'), [])

    def cell(key):
        mine, theirs = ours.get(key) or [], paper.get(key)
        text = (ms(mine) if len(mine) > 1 else f'{mine[0]:.2f}' if mine else '-') + ' / '
        text += '-' if theirs is None else f'{theirs:.2f}'
        if mine and theirs is not None:
            text += f' ({statistics.mean(mine) - theirs:+.2f})'
        return text

    which = ("the last epoch's top-1, raw student" if metric == 'last' else
             "the best tested epoch's top-1 of max(raw, EMA student), the official code's metric")
    print(f"Table {table} ({dataset}): ours / the paper's (ours - paper). Ours: mean ± std over "
          f"the finished seeds of {which}. The paper's numbers: {PAPER_NUMBERS}.\n")
    if table in PAPER_ROWS:
        print(f'{pairs[0].replace("-", " -> ")}\n\n| config | top-1 | memory (GB) |\n|---|---|---|')
        for config, label in PAPER_ROWS[table].items():
            top1, mem = cell((pairs[0], config, 'top1')), cell((pairs[0], config, 'mem_gb'))
            print(f'| {label} | {top1} | {mem} |')
    else:
        print('| teacher -> student | ' + ' | '.join(PAPER_GRID.values()) + ' |\n'
              + '|---' * (len(PAPER_GRID) + 1) + '|')
        for pair in pairs:
            cells = ' | '.join(cell((pair, c, 'top1')) for c in PAPER_GRID)
            print(f'| {pair.replace("-", " -> ")} | {cells} |')
        mean = {k: statistics.mean(v) for k, v in ours.items() if v}
        gains = {c: [mean[p, c, 'top1'] - mean[p, 'scratch', 'top1'] for p in pairs
                     if (p, c, 'top1') in mean and (p, 'scratch', 'top1') in mean]
                 for c in list(PAPER_GRID)[2:]}  # ours: over the pairs with both, counted in ()
        ours.update({('average', c, 'gain'): [statistics.mean(g)] for c, g in gains.items() if g})
        cells = ' | '.join(cell(('average', c, 'gain')) + (f' ({len(g)})' if g else '')
                           for c, g in gains.items())
        print(f'| average gain over S. (pairs) | | | {cells} |')
    counts = [len(v) for (_, c, m), v in ours.items()
              if m == 'top1' and v and c not in ('teacher', 'scratch')]
    print(f'\nfinished seeds per cell: {min(counts, default=0)} to {max(counts, default=0)}')
    for r in rows:
        if r['note'] and r['metric'] != 'mem_gb' and r['pair'] != 'average':
            print(f"note, {r['pair']} {PAPER_GRID.get(r['config'], r['config'])}: {r['note']}")
    configs = set(PAPER_ROWS.get(table, {})) or {*PAPER_GRID, 'ce'}
    for (pair, config), text in sorted(left.items()):  # this table's runs that did not finish
        if (pair in pairs or pair.startswith('scratch-') and table in '12') and config in configs:
            print(f'left out, {pair}/{config}: {text}')


def main(argv=None):
    p = train.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', help='architecture of the checkpoint (models.MODELS or a timm name)')
    p.add_argument('--ckpt', help="best.pt / last.pt of a run, a timm checkpoint (PATH:ema: its EMA), or 'timm'")
    p.add_argument('--dataset', default='digits', choices=data.DATASETS)
    p.add_argument('--data-dir', default='data')
    p.add_argument('--img-size', type=train.COUNT, help="default: the model's (224, or 32 for *_mini)")
    p.add_argument('--batch-size', type=train.COUNT, default=100)
    p.add_argument('--workers', type=train.NATURAL, default=4)
    p.add_argument('--amp', action='store_true', help='bf16 autocast (as in training with --amp)')
    p.add_argument('--attn', metavar='PNG', help="draw RAA's attention map of a FOFA run's last.pt")
    p.add_argument('--summarize', metavar='DIR', help='tables of the runs under DIR (see evidence.sh)')
    p.add_argument('--curves', metavar='PNG', help='with --summarize: draw their learning curves')
    p.add_argument('--paired', nargs='+', default=(), metavar='A:B',
                   help='with --summarize: a table of the paired final top-1 differences A - B of configs')
    p.add_argument('--paper', choices=('1', '2', '4', '5', '6'), help="with --summarize: the runs "
                   "of paper.sh TABLE beside the paper's numbers (paper_numbers.csv)")
    p.add_argument('--metric', choices=('best', 'last'), default='best',
                   help="with --paper, a run's top-1: the best tested epoch's max(raw, EMA), the "
                   "official code's metric, or the last epoch's raw student")
    args = p.parse_args(argv)
    if args.summarize:
        root = train.check_path('--summarize', args.summarize, 'runs directory')
        if args.paper:
            return paper_table(root, args.paper, args.metric)
        if any(c.count(':') != 1 for c in args.paired):
            raise SystemExit('--paired takes configs in pairs, A:B (e.g. raa:fitnet).')
        return curves(root, args.curves) if args.curves else summarize(root, args.paired)
    if not args.ckpt:
        raise SystemExit('--ckpt is needed (or --summarize DIR).')
    train.check_path('--ckpt', None if args.ckpt == 'timm' else args.ckpt.removesuffix(':ema'), 'checkpoint file')
    train.check_path('--data-dir', args.data_dir if os.path.exists(args.data_dir) else None, 'dataset directory')
    if args.attn:
        train.check_path('--attn', args.attn, 'PNG file', new=True)
        return draw_attention(args)
    if not args.model:
        raise SystemExit('--model is needed: the architecture of the checkpoint.')
    return accuracy(args)


if __name__ == '__main__':
    main()
