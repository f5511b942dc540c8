"""Tables and curves of many runs: DIR/<pair>/<config>/<seed>/log.jsonl, as evidence.sh keeps them.

    python report.py results/evidence                          # mean +- std over seeds, per pair
    python report.py results/evidence --paired fofa:kd raa:ce  # and paired differences A - B
    python report.py results/evidence --curves curves.png      # learning curves instead
"""
import argparse
import glob
import json
import os
from collections import defaultdict
from statistics import mean, stdev

import numpy as np

import train


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
        raise SystemExit(f'{root} holds no finished runs: expected '
                         '<pair>/<config>/<seed>/log.jsonl files.')
    return runs, {k: f'{d} diverged, {u} unfinished' for k, (d, u) in left.items()}


METRICS = {  # a run's top-1 (paper.py --metric)
    'best': "the best tested epoch's top-1 of max(raw, EMA student), the official code's metric",
    'last': "the last epoch's top-1, raw student"}


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
    from matplotlib.figure import Figure  # here only: the tables need no plotting library
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


def parser():
    p = train.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', metavar='DIR', help='the runs: DIR/<pair>/<config>/<seed>/log.jsonl')
    p.add_argument('--paired', nargs='+', default=(), metavar='A:B',
                   help='a table of the paired final top-1 differences A - B (same seed)')
    p.add_argument('--curves', metavar='PNG', help='draw the learning curves instead of the tables')
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    root = train.check_path('DIR', args.runs, 'runs directory')
    if any(c.count(':') != 1 for c in args.paired):
        raise SystemExit('--paired takes configs in pairs, A:B (e.g. raa:fitnet).')
    train.check_path('--curves', args.curves, 'PNG file', new=True)
    return curves(root, args.curves) if args.curves else summarize(root, args.paired)


if __name__ == '__main__':
    main()
