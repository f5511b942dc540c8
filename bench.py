"""Time and peak memory of a training step per method, on synthetic data (README, Speed and memory):
    python bench.py --teacher convnext_t --student deit_t --batch-size 128 --amp --compile
    python bench.py --selfcheck  # a new machine: the CUDA tests, two pairs, the loader; one table
"""
import copy
import ctypes
import gc
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext, redirect_stdout, suppress
from unittest import mock

import timm
import torch

import train


def release_memory(device):  # so that the next peak is the next method's
    gc.collect()
    if device != 'cpu':
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with suppress(OSError), open('/proc/self/clear_refs', 'w') as f:  # Linux
        ctypes.CDLL('libc.so.6').malloc_trim(0)  # freed pages back to the system
        f.write('5')  # the peak resident size (VmHWM) starts again from the current one


def bench(args, method, device, x, y, ctx):
    """img/s, ms/step (median), peak GiB (CUDA max allocated, or peak RSS). floor: FOFA's limit,
    KD's step and a teacher pass with autograd from its stage-1 input on (no prompts, no RAA)."""
    args.method = 'kd' if method == 'floor' else method
    torch.manual_seed(0)
    model = train.build(args, 1000 if args.dataset == 'imagenet' else 100).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    for net in (model.student, model.teacher) if args.compile else ():
        if net is not None:
            net.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # fused, as train.py's (timm)

    def step():
        with ctx:
            _, terms = model(x, y)
            if method == 'floor':  # the stage-1 hook: a new leaf that asks for its gradient
                t_logits, t_feats = model.teacher(x, {0: lambda m: m.detach().requires_grad_()})
                terms['total'] = terms['total'] + t_logits.float().mean() + sum(
                    f.float().mean() for f in t_feats)
        terms['total'].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(args.warmup):  # compile and allocator warm-up, outside the timing
        step()
    release_memory(device)
    times, sync = [], getattr(torch, device).synchronize  # queued GPU work (torch.cpu: no-op)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated() if device != 'cpu' else 0
    with suppress(OSError), open('/proc/self/status') as f:  # Linux: VmHWM in kB
        mem = mem or next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))
    ms = 1000 * statistics.median(times)
    return {'img/s': 1000 * len(x) / ms, 'ms/step': ms, 'peak GiB': mem / 2**30}


def compare(args, teacher, student, device, ctx, methods):
    """({method: medians over --rounds of bench's row and of its ratios to ce, kd, floor}, args)."""
    args = copy.copy(args)
    args.teacher, args.student, args.overwrite = teacher, student, True  # bench writes nothing
    args.method = 'ce' if methods == ['ce'] else 'kd'  # checked as a pair with or without a teacher
    args.teacher_ckpt, g = 'random', torch.Generator().manual_seed(0)
    train.resolve(args)
    x = torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, 100, (args.batch_size,), generator=g).to(device)
    runs = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            runs[m].append(bench(args, m, device, x, y, ctx))
            release_memory(device)
    rows = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    for m, rs in runs.items():
        rows[m].update({f'{name}/{b}': statistics.median(r[k] / q[k] for r, q in zip(rs, runs[b]))
                        for b in ('ce', 'kd', 'floor') if b in runs
                        for name, k in (('time', 'ms/step'), ('mem', 'peak GiB'))})
    return rows, args


def cuda_tests():  # test_smoke.py's tests that need CUDA: PASSED, FAILED or SKIPPED (why)
    ids = ['test_smoke.py::test_bf16_compile_channels_last_step_agrees_with_fp32_eager[cuda]',
           'test_smoke.py::test_ddp_two_processes_equal_one_process_with_twice_the_batch[nccl]']
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, '-m', 'pytest', '-vv', *ids], capture_output=True,
                       text=True, cwd=here, env=dict(os.environ, COLUMNS='999'))  # skip reasons fit
    if r.returncode:  # 1: a test failed; more: pytest could not run them
        print(r.stdout[-3000:], r.stderr[-1000:])
    lines = [line.split(' ', 1) for line in r.stdout.splitlines() if line.startswith(tuple(ids))]
    outcome = {test: rest.rsplit(' [', 1)[0].strip() for test, rest in lines}  # 'PASSED [ 50%]'
    return {test: {'result': outcome.get(test, 'not run')} for test in ids}


def loader_check(args, device, folder):
    """train.py, 2 epochs of FOFA on a fake CIFAR-100 (torchvision's files); its 2nd epoch's log."""
    steps, g = max(1, args.loader_steps // 2), torch.Generator().manual_seed(0)
    os.makedirs(f'{folder}/cifar-100-python')
    for name, n in (('train', steps * args.batch_size), ('test', args.batch_size), ('meta', 0)):
        with open(f'{folder}/cifar-100-python/{name}', 'wb') as f:  # one dict fits the three files
            images = torch.randint(0, 256, (n, 3072), dtype=torch.uint8, generator=g)
            pickle.dump({'data': images.numpy(), 'fine_labels': [i % 100 for i in range(n)],
                         'fine_label_names': [f'c{i}' for i in range(100)]}, f)
    vars(args).update(dataset='cifar100', data_dir=folder, method='fofa', epochs=2, eval_every=2,
                      out=f'{folder}/run')
    with mock.patch('torchvision.datasets.cifar.check_integrity', return_value=True), \
            open(f'{folder}/train.log', 'w') as log, redirect_stdout(log):  # not the real md5 sums
        train.train(args, device=device)
    with open(f'{folder}/run/log.jsonl') as f:
        epoch = json.loads(f.readlines()[-1])
    return {'img/s': epoch['img_per_s'], 'result': f"epoch 2 of 2, {steps} steps: "
            f"{100 * epoch['data_wait']:.1f}% of the loop in next(loader), {args.workers} workers"}


def machine(device):  # torch and timm versions; the GPU (model, driver) or the CPU model (Linux)
    cmd = ['grep', '-m1', 'model name', '/proc/cpuinfo'] if device == 'cpu' else \
        ['nvidia-smi', '--query-gpu=name,driver_version', '--format=csv']  # and its header line
    with suppress(OSError):  # no such program
        device += ' ' + subprocess.run(cmd, capture_output=True, text=True).stdout.split(':')[-1]
    versions = f'torch {torch.__version__} (CUDA {torch.version.cuda}), timm {timm.__version__}'
    return f"{versions}, {' '.join(device.split())}"


def parser():
    p = train.parser()
    a = p.add_argument
    a('--steps', type=train.COUNT, help='timed steps (default: 5; 20 with --selfcheck)')
    a('--warmup', type=train.NATURAL, help='untimed steps first (compile): default 2; 3')
    a('--methods', default='ce,kd,floor,fofa,fbt,hcd', help='comma list of train.METHODS and floor')
    a('--rounds', type=train.COUNT, default=1, help='run the methods in turn R times; medians')
    a('--selfcheck', action='store_true', help='CUDA tests; ce,kd,floor,fofa on --pairs; train.py')
    a('--pairs', default='convnext_t:deit_t,swin_t:resnet18', help='--selfcheck: TEACHER:STUDENT')
    a('--loader-steps', type=train.COUNT, default=200, help='--selfcheck: FOFA steps, half timed')
    a('--channels-last', action='store_true', help='channels_last memory format (CNNs on CUDA)')
    p.set_defaults(batch_size=None)  # 64; 128 with --selfcheck
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)  # --selfcheck: the pairs are in --pairs
    args = parser().parse_args(argv + ['--student', ''] if '--selfcheck' in argv else argv)
    args.batch_size, args.steps, args.warmup = (d if v is None else v for v, d in zip(
        (args.batch_size, args.steps, args.warmup), (128, 20, 3) if args.selfcheck else (64, 5, 2)))
    methods = ['ce', 'kd', 'floor', 'fofa'] if args.selfcheck else args.methods.split(',')
    pairs = [pair.split(':') for pair in args.pairs.split(',')] if args.selfcheck else [
        (args.teacher, args.student)]
    if not set(methods) <= {*train.METHODS, 'floor'}:
        raise SystemExit(f"--methods {args.methods} names unknown methods: choose among "
                         f"{', '.join(train.METHODS)}, floor.")
    if {len(pair) for pair in pairs} != {2}:
        raise SystemExit(f'--pairs {args.pairs} is not a comma list of TEACHER:STUDENT.')
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args.amp = device != 'cpu' if args.amp is None else args.amp
    args.compile |= args.selfcheck and device != 'cpu'
    torch.set_num_threads(os.cpu_count())  # the CPU's share of the step (all of it without CUDA)
    if device != 'cpu':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast(device, torch.bfloat16) if args.amp else nullcontext()
    start, table, first = time.perf_counter(), cuda_tests() if args.selfcheck else {}, None
    for teacher, student in pairs:
        print(f'{time.perf_counter() - start:.0f} s: {teacher} -> {student}', flush=True)
        rows, pair_args = compare(args, teacher, student, device, ctx, methods)
        table.update({f'{teacher} -> {student}: {m}': r for m, r in rows.items()})
        first = first or (f'{teacher} -> {student}: fofa, train.py', pair_args, rows)
    if args.selfcheck:  # train.py with the first pair, next to its FOFA step alone
        with tempfile.TemporaryDirectory() as folder:
            table[first[0]] = loader_check(first[1], device, folder)
        table[first[0]]['result'] += f"; the step alone {first[2]['fofa']['img/s']:.2f} img/s"
    print(f"\n{time.perf_counter() - start:.0f} s; {machine(device)}; batch {args.batch_size} at "
          f"{first[1].img_size} px, {'bf16' if args.amp else 'fp32'}, compiled: {args.compile}; "
          f"{args.warmup} warm-up + {args.steps} timed steps, median of {args.rounds} round(s)")
    cols = list(dict.fromkeys(k for r in table.values() for k in r))  # a markdown table, '-': none
    print(f"| | {' | '.join(cols)} |\n|---|{'---|' * len(cols)}")
    for name, r in table.items():
        cells = [f'{v:.2f}' if isinstance(v, float) else v for v in (r.get(c, '-') for c in cols)]
        print(f"| {name} | {' | '.join(cells)} |")
    return table


if __name__ == '__main__':
    main()
