"""Evaluate saved students, draw RAA's attention, summarise many runs.

    python eval.py --model deit_t --ckpt runs/x/best.pt --dataset cifar100  # top-1, top-5 (+ JSON)
    python eval.py --ckpt runs/x/last.pt --attn attn.png                    # RAA attention (Fig. 3)
    python eval.py --summarize runs/evidence                                # mean +- std over seeds
    python eval.py --summarize runs/evidence --curves curves.png            # learning curves
    python eval.py --summarize runs/paper --paper 1                         # next to Table 1
"""
import argparse
import csv
import glob
import json
import os
from collections import defaultdict
from statistics import mean, stdev

import numpy as np
import torch

import data
import models
import train


def accuracy(args):
    img_size = args.img_size or models.INPUT_SIZE.get(args.model, 224)
    train.family_recipe(args.model, img_size, 'model')  # an unknown model, or a size it cannot take
    classes, norm = data.num_classes(args.dataset, args.data_dir), data.NORM[args.dataset]
    try:  # --ckpt: a file, PATH:ema, or 'timm' (ImageNet weights)
        net = models.create(args.model, classes, args.ckpt, *(norm or (None, None)))
    except ValueError as e:
        raise SystemExit(str(e))
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    val = data.build_loaders(args.dataset, args.data_dir, img_size, args.batch_size,
                             workers=args.workers)[1]
    ctx = torch.autocast(device, torch.bfloat16, enabled=args.amp)
    top1, top5 = train.evaluate(net.to(device), val, device, ctx)
    print(f'{args.model} {args.ckpt}: top-1 {top1:.2f} top-5 {top5:.2f}')
    run = {'model': args.model, 'ckpt': args.ckpt, 'dataset': args.dataset}
    print(json.dumps({**run, 'top1': top1, 'top5': top5}))
    return top1, top5


def draw_attention(args):
    """RAA's attention (Eq. 4) of a FOFA run's last.pt, mean over a validation batch and heads."""
    ck = models.read_checkpoint(args.ckpt, '--ckpt')
    run = train.get_args(['--student', 'unknown'])  # defaults for flags newer than the run
    vars(run).update(ck.get('args', {}))
    if run.method != 'fofa' or getattr(run, 'no_raa', False) or 'model' not in ck:  # no_raa: old
        raise SystemExit(f'{args.ckpt} is not the last.pt of a FOFA run with RAA: --attn needs it.')
    run.teacher_ckpt = None  # RAA sees the student only; the teacher's architecture fixes shapes
    model = train.build(run, data.num_classes(run.dataset, run.data_dir)).eval()
    model.load_state_dict(ck['model'])
    val = data.build_loaders(run.dataset, run.data_dir, run.img_size, args.batch_size, workers=0)[1]
    model.raa.keep_attn = True
    with torch.no_grad():
        model.raa(model.student(next(iter(val))[0])[1])
    attn = model.raa.attn.mean((0, 1)).numpy()  # (N_q, N_q): N_q / 4 queries per stage
    from matplotlib.figure import Figure  # here only: training never imports matplotlib; Agg draws
    ax, n = Figure(figsize=(6.4, 5.4), layout='constrained').subplots(), len(attn)
    shown = ax.imshow(attn, extent=(0, n, n, 0), interpolation='nearest')  # token i: [i, i + 1]
    ax.figure.colorbar(shown, label='attention weight (mean over images and heads)')
    centres, stages = [(s + 0.5) * n / 4 for s in range(4)], [f'stage {s}' for s in range(1, 5)]
    ax.set(xticks=centres, xticklabels=stages, yticks=centres, yticklabels=stages,
           xlabel='key (student stage, patch)', ylabel='query (student stage, patch)',
           title=f'RAA attention: {run.teacher} -> {run.student}\n$N_q$ = {n}, {run.dataset}, '
                 f'epoch {ck.get("epoch", "?")}')
    ax.hlines([n / 4, n / 2, 3 * n / 4], 0, n, colors='white', linewidth=1)  # stage boundaries
    ax.vlines([n / 4, n / 2, 3 * n / 4], 0, n, colors='white', linewidth=1)
    os.makedirs(os.path.dirname(os.path.abspath(args.attn)), exist_ok=True)  # --attn a/new/x.png
    ax.figure.savefig(args.attn, dpi=120)
    print(f'{args.attn}: RAA attention of {run.teacher} -> {run.student}, {n} queries, 4 stages')
    return attn


def load_runs(root):
    """{pair: {config: {seed: log records}}} of the finished runs (last epoch >= --epochs), and
    {(pair, config): 'n diverged, m unfinished'} for the others."""
    runs, left = defaultdict(dict), defaultdict(lambda: [0, 0])
    for log in sorted(glob.glob(os.path.join(root, '*', '*', '*', 'log.jsonl'))):  # by name
        pair, config, seed = log.split(os.sep)[-4:-1]
        records, seeds = [json.loads(line) for line in open(log)], runs[pair].setdefault(config, {})
        epochs = json.load(open(os.path.join(os.path.dirname(log), 'args.json')))['epochs']
        if records[-1]['epoch'] >= epochs:
            seeds[seed] = records
        else:  # stopped by non-finite losses (train.MAX_NONFINITE), or still running
            left[pair, config][records[-1]['skipped_steps'] == 0] += 1
    runs = {pair: configs for pair, configs in runs.items() if any(configs.values())}
    if not runs:
        raise SystemExit(f'--summarize {root} holds no finished runs: expected '
                         '<pair>/<config>/<seed>/log.jsonl files.')
    return runs, {k: f'{d} diverged, {u} unfinished' for k, (d, u) in left.items()}


def run_top1(records, metric):  # a run's top-1, as METRICS[metric] says
    if metric == 'last':
        return records[-1]['top1']
    return max(max(e['top1'], e.get('top1_ema') or 0) for e in records if e['top1'] is not None)


def drift(records, tested):
    """Mean top-1 over the last 20% of the epochs minus over the 20% before: ~0 once converged."""
    end = records[-1]['epoch']
    w = [[e['top1'] for e in records if e['epoch'] in tested and lo < e['epoch'] / end <= lo + 0.2]
         for lo in (0.6, 0.8)]
    return mean(w[1]) - mean(w[0]) if all(w) else None


def ms(xs):  # 'mean ± std', '-' for none
    return f'{mean(xs):.2f} ± {stdev(xs) if len(xs) > 1 else 0:.2f}' if xs else '-'


def diffs(final, a, b):  # paired: final top-1 a - b per seed, over the seeds both finished
    return [final[a][s] - final[b][s] for s in final.get(a, {}) if s in final.get(b, {})]


def markdown(*cells, head=False):  # a table row; head: the table's first two lines
    line = '| ' + ' | '.join(map(str, cells)) + ' |'
    return line + '\n' + '|---' * len(cells) + '|' if head else line


def summarize(root, comparisons=()):
    """Markdown tables of mean +- std over seeds: per pair and config, final and best top-1, drift,
    paired (same seed) differences to kd, raa and fofa, prompted teacher; then 'A:B' comparisons."""
    (runs, left), finals, refs = load_runs(root), {}, ('kd', 'raa', 'fofa')
    for pair, configs in sorted(runs.items()):
        final = finals[pair] = {c: {s: r[-1]['top1'] for s, r in seeds.items()}
                                for c, seeds in configs.items()}
        logs = [r for seeds in configs.values() for r in seeds.values()]
        teacher = next((r[-1]['teacher_top1'] for r in logs if r[-1]['teacher_top1']), 0)
        # best top-1 and drift: over the epochs tested in every run of the pair
        tested = set.intersection(*({e['epoch'] for e in r if e['top1'] is not None} for r in logs))
        print(f'\n{pair.replace("-", " -> ")}, teacher top-1 {teacher:.2f}\n')
        print(markdown('config', 'seeds', 'final top-1', 'best top-1', 'last 20% - previous 20%',
                       *(f'final - {ref} (paired)' for ref in refs), 'prompted teacher top-1',
                       head=True))
        for c, seeds in configs.items():
            note = f' ({left[pair, c]})' if (pair, c) in left else ''
            prompted = [p for r in seeds.values() if (p := r[-1].get('prompted_teacher_top1'))]
            best = [run_top1([e for e in r if e['epoch'] in tested], 'best')
                    for r in seeds.values()]
            drifts = [d for r in seeds.values() if (d := drift(r, tested)) is not None]
            print(markdown(c, f'{len(seeds)}{note}', ms(final[c].values()), ms(best), ms(drifts),
                           *(ms(diffs(final, c, ref)) for ref in refs), ms(prompted)))
    if comparisons:  # one column per pair
        pairs = (pair.replace('-', ' -> ') for pair in finals)
        print('\n' + markdown('paired difference of the final top-1', *pairs, head=True))
    for a, b in (c.split(':') for c in comparisons):
        paired = (diffs(f, a, b) for f in finals.values())
        print(markdown(f'{a} - {b}', *(f'{ms(d)} (n = {len(d)})' if d else '-' for d in paired)))
    return runs


ROLES = {'ladder': ('ce', 'kd', 'fitnet', 'raa', 'afp_nofeedback', 'fofa'),
         'baselines': ('ce', 'kd', 'ofa', 'dkd', 'fbt', 'hcd', 'fofa')}  # then hypotheses: fofa_*
COLORS = {c: f'C{i}' for i, c in enumerate(dict.fromkeys(ROLES['ladder'] + ROLES['baselines']))}
COLORS['fofa'] = 'black'  # the method itself, in every row


def curves(root, png):
    """Test top-1 per epoch, mean over seeds (line) and min to max (band): a row of panels per
    role (ROLES, then fofa and fofa_*), a column per pair. Returns {role: configs with runs}."""
    runs = load_runs(root)[0]
    ran = {c for configs in runs.values() for c, seeds in configs.items() if seeds}
    roles = {**ROLES, 'hypotheses': ['fofa'] + sorted(c for c in ran if c.startswith('fofa_'))}
    roles = {role: [c for c in cs if c in ran] for role, cs in roles.items() if ran & set(cs)}
    from matplotlib.figure import Figure  # here only: training never imports matplotlib; Agg draws
    fig = Figure(figsize=(4.2 * len(runs) + 1.8, 3.2 * len(roles)), layout='constrained')
    axes = fig.subplots(len(roles), len(runs), squeeze=False, sharex='col', sharey='col')
    for row, (role, configs) in zip(axes, roles.items()):
        for ax, (pair, of_pair) in zip(row, sorted(runs.items())):
            for c in (c for c in configs if of_pair.get(c)):
                top1 = [{e['epoch']: e['top1'] for e in r if e['top1'] is not None}
                        for r in of_pair[c].values()]
                tested = sorted(set.intersection(*map(set, top1)))  # tested in every seed
                accs = np.array([[t[e] for e in tested] for t in top1])  # (seeds, epochs)
                color = COLORS.get(c) or f'C{configs.index(c) % 10}'  # hypotheses
                ax.plot(tested, accs.mean(0), color=color, lw=2 if c == 'fofa' else 1.2, label=c)
                ax.fill_between(tested, accs.min(0), accs.max(0), color=color, alpha=0.15, lw=0)
            ax.set_title(f'{role}: {pair.replace("-", " -> ")}', fontsize=10)
            ax.grid(alpha=0.3)
        handles = {label: h for ax in row for h, label in zip(*ax.get_legend_handles_labels())}
        row[-1].legend([handles[c] for c in configs], configs, loc='center left',
                       bbox_to_anchor=(1, 0.5))  # right of the row
    fig.supxlabel('epoch')
    fig.supylabel('test top-1 (%)')
    fig.suptitle('Test top-1 per epoch\nline: mean over seeds, band: min to max over seeds')
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f'{png}: curves of {len(ran)} configs in {len(runs)} pairs, rows {", ".join(roles)}')
    return roles


PAPER_NUMBERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'paper_numbers.csv')
PAPER_GRID = {'teacher': 'T.', 'scratch': 'S.', 'kd': 'KD', 'dkd': 'DKD', 'dist': 'DIST',
              'ofa': 'OFA', 'fitnet': 'FitNet', 'cc': 'CC', 'rkd': 'RKD', 'crd': 'CRD',
              'fofa': 'FOFA', 'fbt': 'FBT', 'hcd': 'HCD'}  # Tables 1-2: config -> column
AFP_SETS = ['1', '2', '3', '4', '12', '13', '14', '23', '24', '34', '123', '124', '134', '234']
BASELINE = {'fitnet': 'Baseline (FitNet)'}
PAPER_ROWS = {  # Tables 4-6, all on ConvNeXt-T -> DeiT-T: config -> row
    '4': {**BASELINE, 'raa': 'RAA', 'afp_nofb': 'RAA + AFP w/o feedback', 'fofa': 'RAA + AFP'},
    '5': {**BASELINE, **{f'afp{s}': ','.join(s) for s in AFP_SETS}, 'fofa': '1,2,3,4',
          'paper_row5': "the paper's row 5", 'paper_row6': "the paper's row 6"},
    '6': {**BASELINE, 'nq36': '36', 'fofa': '64', 'nq80': '80', 'nq100': '100', 'nq144': '144'}}
METRICS = {  # --metric: a run's top-1
    'best': "the best tested epoch's top-1 of max(raw, EMA student), the official code's metric",
    'last': "the last epoch's top-1, raw student"}


def paper_table(root, table, metric):
    """paper.sh TABLE's runs under root beside PAPER_NUMBERS, cell by cell; Tables 1-2 end with
    the paper's last row, the mean gain over the student from scratch (S.)."""
    dataset = 'imagenet' if table == '2' else 'cifar100'
    runs, left = load_runs(os.path.join(root, dataset))
    with open(PAPER_NUMBERS, newline='') as f:
        rows = [r for r in csv.DictReader(f) if r['table'] == table]
    paper = {(r['pair'], r['config'], r['metric']): float(r['value']) for r in rows}
    pairs = list(dict.fromkeys(r['pair'] for r in rows if r['pair'] != 'average'))
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
    if table in PAPER_ROWS:
        print(f'{pairs[0].replace("-", " -> ")}\n')
        print(markdown('config', 'top-1', 'memory (GB)', head=True))
        for config, label in PAPER_ROWS[table].items():
            print(markdown(label, *(cell((pairs[0], config, m)) for m in ('top1', 'mem_gb'))))
    else:
        print(markdown('teacher -> student', *PAPER_GRID.values(), head=True))
        for pair in pairs:
            cells = (cell((pair, c, 'top1')) for c in PAPER_GRID)
            print(markdown(pair.replace('-', ' -> '), *cells))
        gains = {c: [mean(ours[p, c, 'top1']) - mean(ours[p, 'scratch', 'top1']) for p in pairs
                     if ours.get((p, c, 'top1')) and ours[p, 'scratch', 'top1']]
                 for c in list(PAPER_GRID)[2:]}  # ours: over the pairs with both, counted in ()
        ours.update({('average', c, 'gain'): [mean(g)] for c, g in gains.items() if g})
        cells = (cell(('average', c, 'gain'), len(g)) for c, g in gains.items())
        print(f'| average gain over S. (pairs) | | | {" | ".join(cells)} |')
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


def parser():
    p = train.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', help='architecture of the checkpoint (models.MODELS or a timm name)')
    p.add_argument('--ckpt', help="a checkpoint (PATH:ema: a timm checkpoint's EMA), or 'timm'")
    p.add_argument('--dataset', default='digits', choices=data.DATASETS)
    p.add_argument('--data-dir', default='data')
    p.add_argument('--img-size', type=train.COUNT, help="default: the model's (224; *_mini: 32)")
    p.add_argument('--batch-size', type=train.COUNT, default=100)
    p.add_argument('--workers', type=train.NATURAL, default=data.default_workers(),
                   help='data loader processes (default: the usable cores)')
    p.add_argument('--amp', action='store_true', help='bf16 autocast (as in training with --amp)')
    p.add_argument('--attn', metavar='PNG', help="draw RAA's attention map of a FOFA run's last.pt")
    p.add_argument('--summarize', metavar='DIR', help='tables of the runs under DIR (evidence.sh)')
    p.add_argument('--curves', metavar='PNG', help='with --summarize: draw their learning curves')
    p.add_argument('--paired', nargs='+', default=(), metavar='A:B',
                   help='with --summarize: a table of the paired final top-1 differences A - B')
    p.add_argument('--paper', choices=('1', '2', '4', '5', '6'), help="with --summarize: the runs "
                   "of paper.sh TABLE beside the paper's numbers (paper_numbers.csv)")
    p.add_argument('--metric', choices=tuple(METRICS), default='best',
                   help="with --paper, a run's top-1: " + '; or '.join(METRICS.values()))
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.summarize:
        root = train.check_path('--summarize', args.summarize, 'runs directory')
        if args.paper:
            return paper_table(root, args.paper, args.metric)
        if any(c.count(':') != 1 for c in args.paired):
            raise SystemExit('--paired takes configs in pairs, A:B (e.g. raa:fitnet).')
        train.check_path('--curves', args.curves, 'PNG file', new=True)
        return curves(root, args.curves) if args.curves else summarize(root, args.paired)
    if not args.ckpt:
        raise SystemExit('--ckpt is needed (or --summarize DIR).')
    ckpt = None if args.ckpt == 'timm' else args.ckpt.removesuffix(':ema')
    train.check_path('--ckpt', ckpt, 'checkpoint file')
    data_dir = args.data_dir if os.path.exists(args.data_dir) else None
    train.check_path('--data-dir', data_dir, 'dataset directory')
    if args.attn:
        train.check_path('--attn', args.attn, 'PNG file', new=True)
        return draw_attention(args)
    if not args.model:
        raise SystemExit('--model is needed: the architecture of the checkpoint.')
    return accuracy(args)


if __name__ == '__main__':
    main()
