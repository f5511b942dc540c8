"""Speed and memory of one training step per method, in one process, on synthetic data at the pair's real input size.

    python bench.py --teacher convnext_t --student deit_t --batch-size 16 --steps 5            # CPU fp32
    python bench.py --teacher convnext_t --student deit_t --batch-size 128 --amp --compile     # CUDA

Accepts train.py's flags (--method is ignored; --methods lists what to time). Prints images/s, ms/step (median),
peak memory (CUDA max allocated, or peak RSS on CPU sampled during the steps), FLOPs per step, extra trainable
parameters (beyond the student), and the ratios to ce, kd and `floor`: FOFA's limit, measured in the same run as KD's
step plus one more teacher pass with autograd from its stage-1 input on (no prompts, no RAA; no weight gradients).
--rounds R repeats the methods in turn R times (interleaved) and reports the median of the rounds.
"""
import ctypes
import gc
import math
import os
import statistics
import threading
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

import train


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 2 ms (CPU has no allocator stats)."""

    def __enter__(self):
        self.peak, self.run = 0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        page = os.sysconf('SC_PAGE_SIZE')
        while self.run:
            with open('/proc/self/statm') as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.run = False
        self.thread.join()


def conv_backward_flops(grad_out_shape, x_shape, w_shape, *args, out_shape=None, **kwargs):
    # torch's formula ignores groups for the weight gradient (a depthwise conv's is counted C times over); both
    # gradients of a conv cost what its forward costs: 2 * B * output positions * weight elements
    output_mask = args[-1]
    return 2 * grad_out_shape[0] * math.prod(grad_out_shape[2:]) * math.prod(w_shape) * sum(map(bool, output_mask[:2]))


def flops(fn):
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops}) \
            as counter:
        fn()
    return counter.get_total_flops()


def release_memory(device):
    gc.collect()
    if device == 'cpu':
        ctypes.CDLL('libc.so.6').malloc_trim(0)  # hand freed pages back, so the next method's peak is its own
    else:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def saved_by_part(model, step):
    """MiB of the tensors autograd keeps for backward in one step, by the module whose forward made them: the student,
    the teacher (the floor's or FOFA's prompted pass), each of the method's own modules, or 'losses' (outside them).
    Weights count nowhere (resident anyway); a checkpointed block counts its inputs only, as autograd keeps them.
    Under --compile a module run inside the compiled student or teacher (an AFP) counts as that model."""
    parts, sizes, seen = ['losses'], {}, {p.untyped_storage().data_ptr() for p in (*model.parameters(),
                                                                              *model.buffers())}
    mods = [(n, c) for n, m in [*model.named_children(), ('teacher', model.teacher)] if m is not None
            for c in (m.children() if isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict)) else [m])]
    hooks = [h for name, m in mods for h in (
        m.register_forward_pre_hook(lambda *_, n=name: parts.append(n)),
        m.register_forward_hook(lambda *_: parts.pop() and None))]  # None: the output is kept
    if model.teacher is not None:
        seen |= {p.untyped_storage().data_ptr() for p in model.teacher.parameters()}

    def pack(t):
        if (ptr := t.untyped_storage().data_ptr()) not in seen:
            seen.add(ptr)
            sizes[parts[-1]] = sizes.get(parts[-1], 0) + t.untyped_storage().nbytes() / 2**20
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    for h in hooks:
        h.remove()
    return sizes


def grad_from_here(m):  # the floor's teacher pass: autograd from the stage-1 input on, as FOFA's prompted pass
    return m.detach().requires_grad_()


def bench(args, method, device, x, y, ctx):
    args.method = 'kd' if method == 'floor' else method
    torch.manual_seed(0)
    model = train.build(args, 1000 if args.dataset == 'imagenet' else 100).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if args.compile:
        model.student.compile()
        if model.teacher is not None:
            model.teacher.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # fused on CPU too, as train.py's (timm) optimizer

    def step():
        with ctx:
            _, terms = model(x, y)
            if method == 'floor':
                t_logits, t_feats = model.teacher(x, {0: grad_from_here})
                terms['total'] = terms['total'] + t_logits.float().mean() + sum(f.float().mean() for f in t_feats)
        terms['total'].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):  # compile and allocator warm-up, outside the timing
        step()
    release_memory(device)
    times = []
    with PeakRSS() as rss:
        for _ in range(args.steps):
            if device != 'cpu':
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device != 'cpu':
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated() if device != 'cpu' else rss.peak
    saved = saved_by_part(model, step)
    extra = sum(p.numel() for p in model.parameters() if p.requires_grad) - sum(
        p.numel() for p in model.student.parameters() if p.requires_grad)
    return dict(method=method, ms=1000 * statistics.median(times), mem=mem / 2**30, flops=flops(step) / 1e9,
                extra=extra / 1e6, saved=saved)


def main(argv=None):
    p = train.parser()
    p.add_argument('--steps', type=train.COUNT, default=5, help='timed steps')
    p.add_argument('--warmup', type=train.NATURAL, default=2, help='untimed steps first (compile, allocator)')
    p.add_argument('--methods', default='ce,kd,floor,fofa,fbt,hcd', help='comma list of train.METHODS and floor')
    p.add_argument('--rounds', type=train.COUNT, default=1, help='repeat the methods in turn; report the median round')
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(',')]
    if not set(methods) <= {*train.METHODS, 'floor'}:
        raise SystemExit(f"--methods {args.methods} names unknown methods: choose among {', '.join(train.METHODS)}, floor.")
    if set(methods) - {'ce'} and not args.teacher:
        raise SystemExit(f'--methods {args.methods} needs a --teacher: every method but ce distils from one.')
    args.method = 'kd' if args.teacher else 'ce'  # --method is ignored: checked as a pair with or without a teacher
    args.overwrite = True  # bench writes nothing to --out
    train.check_args(args)
    args.img_size = args.img_size or train.models.INPUT_SIZE.get(args.student, 224)
    if args.teacher:
        train.family_recipe(args.teacher, args.img_size, 'teacher')
    recipe = train.family_recipe(args.student, args.img_size)
    args.recipe = args.recipe or recipe
    args.smoothing, args.teacher_ckpt = 0.1, None
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cpu':
        torch.set_num_threads(os.cpu_count())
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp = args.amp if args.amp is not None else device != 'cpu'
    ctx = torch.autocast(device, dtype=torch.bfloat16) if amp else nullcontext()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, 100, (args.batch_size,), generator=g).to(device)
    name = torch.cuda.get_device_name() if device != 'cpu' else f'CPU x{os.cpu_count()}'
    print(f'{args.teacher} -> {args.student} at {args.img_size}px, batch {args.batch_size}, {name}, '
          f'{"bf16" if amp else "fp32"}{", compiled" if args.compile else ""}, torch {torch.__version__}, '
          f'{args.warmup} warm-up + {args.steps} timed steps (median)')
    runs = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            runs[m].append(bench(args, m, device, x, y, ctx))
            release_memory(device)
    rows = {m: {k: statistics.median(r[k] for r in rs) if k not in ('method', 'saved') else rs[0][k] for k in rs[0]}
            for m, rs in runs.items()}
    ce, kd, floor = rows.get('ce'), rows.get('kd'), rows.get('floor')
    print(f"{'method':8} {'img/s':>8} {'ms/step':>9} {'peak GB':>8} {'GFLOP':>8} {'extra M':>8} {'t/ce':>6} {'t/kd':>6} "
          f"{'mem/kd':>7} {'t/floor':>8} {'mem/floor':>9}")
    for m, r in rows.items():
        rel = lambda base, k: f"{r[k] / base[k]:.2f}" if base else '-'
        print(f"{m:8} {1000 * args.batch_size / r['ms']:8.1f} {r['ms']:9.1f} {r['mem']:8.2f} {r['flops']:8.1f} "
              f"{r['extra']:8.2f} {rel(ce, 'ms'):>6} {rel(kd, 'ms'):>6} {rel(kd, 'mem'):>7} {rel(floor, 'ms'):>8} "
              f"{rel(floor, 'mem'):>9}")
    print('saved for backward in one step, MiB, by the module that made it:')
    for m, r in rows.items():
        print(f"{m:8} {sum(r['saved'].values()):7.0f} = " + ', '.join(f'{k} {v:.0f}' for k, v in r['saved'].items()))
    if floor and 'fofa' in rows:  # per-round ratios, so that a slow round on a shared machine counts once
        ratio = lambda k: statistics.median(a[k] / b[k] for a, b in zip(runs['fofa'], runs['floor']))
        print(f"FOFA / floor (KD + a teacher pass with autograd from its stage-1 input, measured in this run): "
              f"time {ratio('ms'):.2f}x, memory {ratio('mem'):.2f}x, FLOPs {ratio('flops'):.2f}x")
    return rows


if __name__ == '__main__':
    main()
