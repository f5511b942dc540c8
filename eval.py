"""Evaluate a saved student (top-1, top-5) or draw RAA's attention map (the paper's Fig. 3).

    python eval.py --model deit_t --ckpt runs/x/best.pt --dataset cifar100  # top-1, top-5 (+ JSON)
    python eval.py --ckpt runs/x/last.pt --attn attn.png                    # RAA attention (Fig. 3)
"""
import argparse
import json
import os

import torch

import data
import models
import train


def accuracy(args):
    img_size = args.img_size or models.input_size(args.model)
    models.probe(args.model, img_size)  # an unknown model, or a size it cannot take
    classes, norm = data.num_classes(args.dataset, args.data_dir), data.NORM[args.dataset]
    # --ckpt: a file, PATH:ema, or 'timm' (ImageNet weights)
    net = models.create(args.model, classes, args.ckpt, *(norm or (None, None)))
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    val = data.build_loaders(args.dataset, args.data_dir, img_size, args.batch_size,
                             workers=args.workers)[1]
    ctx = torch.autocast(device, torch.bfloat16, enabled=args.amp)
    top1, top5 = train.evaluate(net.to(device).eval(), val, device, ctx)
    print(f'{args.model} {args.ckpt}: top-1 {top1:.2f} top-5 {top5:.2f}')
    run = {'model': args.model, 'ckpt': args.ckpt, 'dataset': args.dataset}
    print(json.dumps({**run, 'top1': top1, 'top5': top5}))
    return top1, top5


def draw_attention(args):
    """RAA's attention (Eq. 4) of a FOFA run's last.pt, mean over a validation batch and heads."""
    ck = models.read_checkpoint(args.ckpt, '--ckpt')
    run = train.parser().parse_args(['--student', '-'])  # the defaults of flags newer than the run
    vars(run).update(ck.get('args', {}))
    if run.method != 'fofa' or getattr(run, 'no_raa', False) or 'model' not in ck:  # no_raa: old
        raise SystemExit(f'{args.ckpt} is not the last.pt of a FOFA run with RAA: --attn needs it.')
    run.teacher_ckpt = None  # RAA sees the student only; the teacher's architecture fixes shapes
    model = train.build(run, data.num_classes(run.dataset, run.data_dir)).eval()
    model.load_state_dict(ck['model'])
    val = data.build_loaders(run.dataset, run.data_dir, run.img_size, args.batch_size, workers=0)[1]
    with torch.no_grad():
        q, k, _ = model.raa.qkv(model.raa.tokens(model.student(next(iter(val))[0])[1]))
    attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)  # Eq. 4's weights
    attn = attn.mean((0, 1)).numpy()  # (N_q, N_q): N_q / 4 queries per stage
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


def parser():
    p = train.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', help='architecture of the checkpoint (models.MODELS or a timm name)')
    p.add_argument('--ckpt', required=True, help="a checkpoint, PATH:ema (its EMA) or 'timm'")
    p.add_argument('--dataset', default='digits', choices=data.DATASETS)
    p.add_argument('--data-dir', default='data')
    p.add_argument('--img-size', type=train.COUNT, help="default: the model's (224; *_mini: 32)")
    p.add_argument('--batch-size', type=train.COUNT, default=100)
    p.add_argument('--workers', type=train.NATURAL, default=data.default_workers(),
                   help='data loader processes (default: the usable cores)')
    p.add_argument('--amp', action='store_true', help='bf16 autocast (as in training with --amp)')
    p.add_argument('--attn', metavar='PNG', help="draw RAA's attention map of a FOFA run's last.pt")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
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
