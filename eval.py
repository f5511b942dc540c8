"""Top-1/top-5 of a saved student: python eval.py --model deit_t --ckpt runs/x/best.pt --dataset cifar100"""
import argparse
import json
from contextlib import nullcontext

import torch

import data
import models
from train import evaluate, load_weights


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--model', required=True, help='architecture of the checkpoint (models.MODELS or a timm name)')
    p.add_argument('--ckpt', required=True, help='best.pt / last.pt of a run, or any timm state_dict')
    p.add_argument('--dataset', default='digits', choices=data.DATASETS)
    p.add_argument('--data-dir', default='data')
    p.add_argument('--img-size', type=int, help="default: the model's (224, or 32 for *_mini)")
    p.add_argument('--batch-size', type=int, default=100)
    p.add_argument('--workers', type=int, default=4)
    p.add_argument('--amp', action='store_true', help='bf16 autocast (as in training with --amp)')
    args = p.parse_args(argv)
    img_size = args.img_size or models.INPUT_SIZE.get(args.model, 224)
    nc = data.num_classes(args.dataset, args.data_dir)
    norm = data.NORM[args.dataset] or (None, None)
    try:
        net = models.create(args.model, nc, mean=norm[0], std=norm[1])
    except ValueError as e:
        raise SystemExit(str(e))
    load_weights(args.ckpt, net.net, f'{args.model} ({nc} classes)')
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    _, val_loader, _ = data.build_loaders(args.dataset, args.data_dir, img_size, args.batch_size, workers=args.workers)
    ctx = torch.autocast(device, torch.bfloat16) if args.amp else nullcontext()
    top1, top5 = evaluate(net.to(device), val_loader, device, ctx)
    print(f'{args.model} {args.ckpt}: top-1 {top1:.2f} top-5 {top5:.2f}')
    print(json.dumps({'model': args.model, 'ckpt': args.ckpt, 'dataset': args.dataset, 'top1': top1, 'top5': top5}))
    return top1, top5


if __name__ == '__main__':
    main()
