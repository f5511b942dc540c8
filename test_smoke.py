"""CPU tests, no downloads: python -m pytest -q test_smoke.py"""
import csv
import hashlib
import json
import math
import os
import pickle
import shlex
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import urllib.error
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import data
import eval as evaluate_script
import models
import paper
import report
import train
from baselines import FBT, HCD, OFA
from fofa import AFP, FOFA, RAA, Distiller, conv_chain_mean
from losses import cc, dist, dkd, dkd_parts, hcl, info_nce, kd, ofa, orthogonality, rkd

torch.set_num_threads(2)

# the official code's stage outputs (C, H, W) at 224 (NOTES.md, Stage taps)
PAPER_SHAPES = {
    'resnet18': [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)],
    'resnet50': [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)],
    'mobilenetv2': [(24, 56, 56), (32, 28, 28), (96, 14, 14), (1280, 7, 7)],
    'convnext_t': [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)],
    'swin_t': [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)],
    'swin_p': [(48, 56, 56), (96, 28, 28), (192, 14, 14), (384, 7, 7)],
    'swin_n': [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)],
    'deit_t': [(192, 14, 14)] * 4,
    'vit_s': [(384, 14, 14)] * 4,
    'mixer_b16': [(768, 14, 14)] * 4,
    'resmlp_s12': [(384, 14, 14)] * 4,
}
PAIRS = [('convnext_mini', 'vit_mini'), ('vit_mini', 'resnet_mini'), ('convnext_mini', 'mixer_mini'),
         ('swin_mini', 'resnet_mini')]  # CNN->ViT, ViT->CNN, CNN->MLP, Swin->CNN


def small_fofa(teacher, student, seed=0, **kw):
    torch.manual_seed(seed)
    return FOFA(models.create(student, 10), models.create(teacher, 10), img_size=32, dim=64, heads=4, **kw)


TAPS = torch.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tests', 'fixtures', 'taps.pt'),
                  weights_only=True)


def sample(t):  # as tests/fixtures/taps.pt was made: 97 evenly spaced values, the sum and the absolute sum
    f = t.detach().double().flatten()
    return torch.cat([f[torch.linspace(0, f.numel() - 1, 97).long()], f.sum()[None], f.abs().sum()[None]])


@pytest.mark.parametrize('name', PAPER_SHAPES)
def test_paper_taps_and_prompt_positions_match_the_saved_ones(name):
    """The paper's 11 architectures at 224 px against tests/fixtures/taps.pt, saved by the per-family models.py
    before timm's feature levels: stage input/output shapes, logits and the 4 maps, and the same with an AFP (beta 0.5,
    random feedback) on each stage input."""
    torch.manual_seed(0)
    net, saved = models.create(name, 100).eval(), TAPS[name]
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    t_in, t_out = net.shapes(224)
    assert (t_in, t_out) == (saved['in_shapes'], saved['out_shapes']) and t_out == PAPER_SHAPES[name]
    assert net.layout == {'swin': 'nhwc', 'deit': 'nlc', 'vit_': 'nlc', 'mixe': 'nlc', 'resm': 'nlc'}.get(name[:4],
                                                                                                          'nchw')
    torch.manual_seed(2)
    afps = [AFP(i, o) for i, o in zip(t_in, t_out)]
    for a in afps:
        a.beta.data.fill_(0.5)
        a.feedback = torch.randn(1, *a.out_shape)
    with torch.no_grad():
        logits, feats = net(x)
        p_logits, p_feats = net(x, dict(enumerate(afps)))
    got = {'logits': sample(logits), 'feats': [sample(f) for f in feats], 'p_logits': sample(p_logits),
           'p_feats': [sample(f) for f in p_feats]}
    for key, value in got.items():
        torch.testing.assert_close(value, saved[key], rtol=1e-5, atol=1e-6, msg=key)


def test_isotropic_taps_are_blocks_2_4_10_12():
    net = models.create('deit_t', 10).eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        _, feats = net(x)
        taps = net.net.forward_intermediates((x - net.mean) / net.std, indices=[1, 3, 9, 11], output_fmt='NCHW',
                                                intermediates_only=True, norm=False)
    for f, t in zip(feats, taps):
        torch.testing.assert_close(f, t)


def test_token_map_layout_keeps_class_token_first():
    net = models.create('vit_mini', 10).eval()
    tokens = torch.randn(2, 1 + 64, 96)
    m = net.to_map(tokens, 1)  # stage 1's output
    assert torch.equal(m[:, :, 2, 5], tokens[:, 1 + 2 * 8 + 5])  # patch (row 2, col 5) is token 1 + 2*8 + 5
    inputs = []  # what stage 2 takes: a prompt on patch (2, 5) reaches token 1 + 2*8 + 5 only
    net.net.blocks[1].register_forward_pre_hook(lambda module, args: inputs.append(args[0]))

    def bump(m):
        m = m.clone()
        m[:, :, 2, 5] += 1
        return m
    with torch.no_grad():
        net(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
        net(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), {1: bump})
    expected = torch.zeros_like(inputs[0])
    expected[:, 1 + 2 * 8 + 5] = 1
    torch.testing.assert_close(inputs[1] - inputs[0], expected)


def test_unknown_model_and_bad_nq_are_clear_errors():
    with pytest.raises(SystemExit, match="unknown model 'resnet_typo': neither one of mobilenetv2, "):
        models.create('resnet_typo', 10)
    for nq in (0, 50, 63, 65):
        with pytest.raises(ValueError, match='4\\*k\\*k'):
            RAA([(8, 4, 4)] * 4, [(8, 4, 4)] * 4, nq=nq)
    assert RAA([(8, 4, 4)] * 4, [(8, 4, 4)] * 4, nq=36, dim=32, heads=4)([torch.rand(2, 8, 4, 4)] * 4)[0].shape \
        == (2, 8, 4, 4)


# Tiny configurations at 32 px of 14 architectures from 13 families (CNNs, isotropic and hierarchical transformers,
# MLPs, hybrids; NCHW maps, NHWC maps, tokens with and without a class token, a head conv ending stage 4)
TINY_MODELS = {'resnet_mini': {}, 'test_convnext2': {}, 'vit_mini': {}, 'swin_mini': {}, 'resmlp_mini': {},
        'eva02_tiny_patch14_224': dict(img_size=32, patch_size=4, depth=4, embed_dim=32, num_heads=2),
        'test_efficientnet': {}, 'test_byobnet': {}, 'test_nfnet': {}, 'poolformer_tiny': {},
        'test_coatnet': dict(img_size=32), 'test_mambaout': {},
        'fastvit_t8': dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128)),
        'pvt_v2_b0': dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), num_heads=(1, 1, 2, 4))}


def tiny_model(name, monkeypatch):
    from timm.models.metaformer import MetaFormer  # PoolFormer's class: its entry points fix the depths
    monkeypatch.setitem(models.MODELS, 'poolformer_tiny', (MetaFormer, dict(depths=(1,) * 4, dims=(16, 32, 64, 128))))
    return models.create(name, 10, **TINY_MODELS[name])


@pytest.mark.parametrize('teacher', TINY_MODELS)
def test_any_timm_pair_trains_and_its_prompts_start_as_the_teacher(teacher, monkeypatch):
    """A ring of pairs (each architecture is a teacher once and a student once): at beta = 0 the prompted teacher is
    the teacher bit for bit; each stage's prompt changes that stage and not the ones before; one FOFA step (the
    prompted teacher included) reaches the student, RAA and every prompt."""
    names = list(TINY_MODELS)
    torch.manual_seed(0)
    student = tiny_model(names[(names.index(teacher) + 1) % len(names)], monkeypatch)
    d = FOFA(student, tiny_model(teacher, monkeypatch), img_size=32, dim=32, heads=4)
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 10, (2,))
    with torch.no_grad():
        for afp in d.afp.values():
            afp.feedback = torch.randn(2, *afp.out_shape)
        logits, feats = d.teacher(x)
        p_logits, p_feats = d.prompted_teacher(x)
        assert torch.equal(logits, p_logits) and all(torch.equal(a, b) for a, b in zip(feats, p_feats))
        for i, afp in d.afp.items():
            afp.beta.fill_(0.1)
            p_feats = d.prompted_teacher(x)[1]
            afp.beta.fill_(0.0)
            assert all(torch.equal(a, b) for a, b in zip(feats[:int(i)], p_feats[:int(i)]))
            assert not torch.allclose(feats[int(i)], p_feats[int(i)]), i
    logits, losses = d(x, y)
    assert logits.shape == (2, 10) and all(torch.isfinite(v) for v in losses.values())
    losses['total'].backward()
    assert sum(p.grad.abs().sum() for p in d.student.parameters() if p.grad is not None) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.raa.parameters())
    assert all(afp.beta.grad.abs().item() > 0 for afp in d.afp.values())


@pytest.mark.parametrize('method', [OFA, FBT, HCD])
@pytest.mark.parametrize('teacher,student', [('test_efficientnet', 'eva02_tiny_patch14_224'),
                                             ('pvt_v2_b0', 'test_mambaout')])
def test_baselines_with_modules_build_from_the_stage_shapes_of_any_pair(method, teacher, student, monkeypatch):
    # a CNN with a head conv -> a ViT with a class token; a hierarchical transformer -> NHWC maps
    torch.manual_seed(0)
    pair = (tiny_model(student, monkeypatch), tiny_model(teacher, monkeypatch), 32)
    d = method(*pair) if method is FBT else method(*pair, 10)
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 10, (2,))
    _, losses = d(x, y)
    assert len(losses) > 2 and all(torch.isfinite(v) for v in losses.values())
    losses['total'].backward()
    assert sum(p.grad.abs().sum() for p in d.student.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in d.teacher.parameters())


def test_models_without_4_levels_in_grid_order_and_unknown_names_end_in_one_sentence():
    for name, words in (('levit_128s', "(LevitDistilled) has 3 feature levels in timm's feature_info"),
                        ('hiera_tiny_224', 'keeps its tokens in mask-unit order'),
                        ('resnet_typo', "unknown model 'resnet_typo'")):
        with torch.device('meta'), pytest.raises(SystemExit) as e:
            models.create(name, 10)
        assert words in str(e.value) and str(e.value).endswith('.') and '. ' not in str(e.value), str(e.value)
        with pytest.raises(SystemExit, match=re.escape(words)):  # train.py's --teacher/--student check
            models.probe(name, 224)
    sizes = {'vit_mini': 32, 'resnet_mini': 32, 'deit_t': 224, 'test_vit': 160, 'convnext_tiny.fb_in1k': 224}
    assert {name: models.input_size(name) for name in sizes} == sizes


@pytest.mark.parametrize('teacher,student', PAIRS)
def test_pair_trains_and_teacher_stays_frozen(teacher, student):
    d = small_fofa(teacher, student)
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    assert not any(p is q for p in d.parameters() for q in d.teacher.parameters())
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits, losses = d(x, y)
    assert logits.shape == (4, 10) and set(losses) == {'ce', 'kd', 'fd', 'reg', 'total'}
    losses['total'].backward()
    assert all(p.grad is not None for p in d.student.parameters())  # (zero-init residual BNs may get 0 grads)
    assert sum(p.grad.abs().sum() for p in d.student.parameters()) > 0
    for name, module in [('patchify', d.raa.patchify), ('attention', d.raa.qk), ('aligners', d.raa.align)]:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    assert all(afp.beta.grad.abs().item() > 0 for afp in d.afp.values())
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in d.teacher.state_dict().items())
    assert all(p.grad is None for p in d.teacher.parameters()) and not d.teacher.training


def test_bf16_autocast_step_on_cpu():
    d = small_fofa('convnext_mini', 'vit_mini')
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits, losses = d(x, y)
    assert logits.dtype == torch.bfloat16 and all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    losses['total'].backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in d.raa.parameters())
    assert all(afp.feedback.dtype == torch.float32 for afp in d.afp.values())


@pytest.mark.parametrize('teacher', ['convnext_mini', 'vit_mini', 'swin_mini', 'mixer_mini'])
def test_prompted_teacher_equals_teacher_at_beta_zero(teacher):
    d = small_fofa(teacher, 'resnet_mini')
    x = torch.rand(3, 3, 32, 32)
    for i, afp in d.afp.items():  # non-trivial feedback, so the whole prompt branch runs on real numbers
        afp.feedback = torch.randn(3, *afp.out_shape)
    prompts = {int(i): afp for i, afp in d.afp.items()}
    with torch.no_grad():
        logits, feats = d.teacher(x)
        p_logits, p_feats = d.teacher(x, prompts)
        assert torch.equal(logits, p_logits) and all(torch.equal(a, b) for a, b in zip(feats, p_feats))
        for afp in d.afp.values():
            afp.beta.fill_(0.1)
        assert not torch.allclose(feats[-1], d.teacher(x, prompts)[1][-1])  # (timm's Mixer head starts at zero)


@pytest.mark.parametrize('fusion,feedback', [('dw', True), ('full', True), ('dw', False)])
@pytest.mark.parametrize('in_shape,out_shape,nhwc', [((16, 8, 8), (32, 4, 4), False), ((8, 6, 6), (8, 6, 6), True),
                                                     ((8, 2, 2), (16, 1, 1), False), ((4, 1, 7), (4, 1, 7), True)])
def test_afp_fast_paths_match_the_plain_layers(in_shape, out_shape, nhwc, fusion, feedback):
    # AFP runs the official SE's branches from per-tap sums (speed); the plain layer chain on contiguous maps gives the
    # same values and gradients, and the output keeps the input's memory format
    torch.manual_seed(0)
    afp = AFP(in_shape, out_shape, feedback, fusion)
    if feedback:
        afp.feedback = torch.randn(3, *out_shape)
    with torch.no_grad():
        afp.beta.fill_(0.7)
    x = torch.randn(3, *in_shape[1:], in_shape[0]).permute(0, 3, 1, 2) if nhwc else torch.randn(3, *in_shape)
    x.requires_grad_(True)
    w = torch.randn(3, *in_shape)

    def reference():
        xc = x.contiguous()
        if not feedback:
            return xc + afp.beta * afp.prompt(xc)
        fb = F.interpolate(afp.fb_align(afp.feedback), size=in_shape[1:], mode='nearest')
        return xc + afp.beta * afp.prompt(afp.fusion(torch.cat([fb, xc], 1)))

    results = []
    for f in (afp, lambda _: reference()):
        out = f(x)
        results.append([out, *torch.autograd.grad((out * w).sum(), [x, *afp.parameters()])])
    assert results[0][0].is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_afp_keeps_for_backward_only_what_it_needs():
    # the prompt keeps no map of its input's size for backward (its convolutions run on tap sums), so checkpointing
    # it could only add
    afp, x = AFP((8, 24, 24), (16, 12, 12)), torch.rand(2, 8, 24, 24, requires_grad=True)
    saved = []

    def keep(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        afp(x)
    assert len(saved) > 2 and max(t.numel() for t in saved) < x.numel()


@pytest.mark.parametrize('groups', [1, 4])
@pytest.mark.parametrize('parts,size', [(1, (6, 6)), (2, (5, 9)), (2, (1, 3)), (1, (2, 2))])
def test_conv_chain_mean_is_the_mean_of_the_plain_convs(parts, size, groups):
    # its docstring: c(b(a(torch.cat(parts, 1)))).mean((2, 3), keepdim=True), here with a 5x5 b on maps smaller than 5
    torch.manual_seed(0)
    a, b, c = nn.Conv2d(8 * parts, 8, 1), nn.Conv2d(8, 8, 5, padding=2, groups=groups), nn.Conv2d(8, 8, 1)
    xs = [torch.randn(3, 8, *size) for _ in range(parts)]
    torch.testing.assert_close(conv_chain_mean((a, b, c), *xs),
                               c(b(a(torch.cat(xs, 1)))).mean((2, 3), keepdim=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('teacher', ['convnext_mini', 'swin_mini'])
def test_official_squeeze_excitation_is_a_channel_bias(teacher):
    d = small_fofa(teacher, 'vit_mini')
    afp = d.afp['1']
    afp.feedback, x = torch.randn(2, *afp.out_shape), torch.randn(2, *afp.in_shape)
    with torch.no_grad():
        afp.beta.fill_(1.0)
        bias = afp(x) - x  # the official SE output replaces the feature: a per-sample, per-channel bias
    torch.testing.assert_close(bias, bias[..., :1, :1].expand_as(bias))
    assert bias.abs().sum() > 0
    _, losses = d(torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    losses['total'].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in afp.parameters())


def test_feedback_comes_from_the_previous_iteration():
    d = small_fofa('convnext_mini', 'vit_mini')  # no BatchNorm on the student side: recomputation is exact
    a, b = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    prompts = {int(i): afp for i, afp in d.afp.items()}
    with torch.no_grad():
        d(a, y)  # step 1: zero feedback; beta = 0, so the prompted teacher is the teacher
        fb_a = {i: afp.feedback.clone() for i, afp in d.afp.items()}
        aligned_a, t_a = d.raa(d.student(a)[1]), d.teacher(a)[1]
        for i, afp in d.afp.items():
            torch.testing.assert_close(fb_a[i], aligned_a[int(i)] - t_a[int(i)])
            afp.beta.fill_(0.5)
        d(b, y)  # step 2 must prompt with step 1's gap (batch a), then store batch b's gap
        fb_b = {i: afp.feedback.clone() for i, afp in d.afp.items()}
        aligned_b = d.raa(d.student(b)[1])
        for i, afp in d.afp.items():
            afp.feedback = fb_a[i]
        t_b = d.teacher(b, prompts)[1]
        for i, afp in d.afp.items():
            afp.feedback = torch.zeros_like(fb_a[i])
        t_b_without_feedback = d.teacher(b, prompts)[1]
    for i in d.afp:
        torch.testing.assert_close(fb_b[i], aligned_b[int(i)] - t_b[int(i)])
        assert not torch.allclose(t_b[int(i)], t_b_without_feedback[int(i)])


def test_kd_and_hcl_match_hand_written_formulas():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[0.5, 2.5, 0.0], [1.0, 0.0, 2.0]])
    for T in (1.0, 4.0):
        ps, pt = (s / T).softmax(-1), (t / T).softmax(-1)
        expected = (pt * (pt.log() - ps.log())).sum(-1).mean() * T * T
        torch.testing.assert_close(kd(s, t, T), expected)


def _reviewkd_hcl(fs, ft):
    """ReviewKD's hcl for one pair of maps, written from its source loop: pool both maps, halve cnt per used level."""
    h = fs.shape[2]
    loss, cnt, tot = F.mse_loss(fs, ft), 1.0, 1.0
    for level in [4, 2, 1]:
        if level >= h:
            continue
        cnt /= 2.0
        loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level)) * cnt
        tot += cnt
    return loss / tot


@pytest.mark.parametrize('size,weights', [(8, (1 / 2, 1 / 4, 1 / 8)), (7, (1 / 2, 1 / 4, 1 / 8)),
                                          (4, (1 / 2, 1 / 4)), (2, (1 / 2,)), (1, ())])
def test_hcl_follows_reviewkd_level_weights(size, weights):
    g = torch.Generator().manual_seed(size)
    fs, ft = torch.randn(2, 3, size, size, generator=g), torch.randn(2, 3, size, size, generator=g)
    torch.testing.assert_close(hcl(fs, ft), _reviewkd_hcl(fs, ft))
    mse = F.mse_loss(fs, ft)  # and by hand: the used levels (4, 2, 1 below the height) weigh 1/2, 1/4, 1/8 in turn
    levels = [n for n in (4, 2, 1) if n < size]
    pooled = [F.mse_loss(F.adaptive_avg_pool2d(fs, n), F.adaptive_avg_pool2d(ft, n)) for n in levels]
    expected = (mse + sum(w * p for w, p in zip(weights, pooled))) / (1 + sum(weights))
    torch.testing.assert_close(hcl(fs, ft), expected)


# ---------------------------------------------------------------- FBT and HCD (baselines.py)
# CNN->ViT: the fused model takes the teacher's CNN stages; ViT->CNN and Swin->MLP (no CNN): the student's stages 1-3
BASELINE_PAIRS = [('convnext_mini', 'vit_mini', True), ('vit_mini', 'resnet_mini', False),
                  ('swin_mini', 'mixer_mini', False)]


def small_baseline(method, teacher, student, seed=0):
    torch.manual_seed(seed)
    s, t = models.create(student, 10), models.create(teacher, 10)
    return FBT(s, t, img_size=32) if method == 'fbt' else HCD(s, t, img_size=32, num_classes=10)


def test_info_nce_matches_a_loop_with_positives_on_the_diagonal():
    q, k = _rand(5, 8, seed=30, scale=1.0), _rand(5, 8, seed=31, scale=1.0)
    for tau in (0.07, 1.0):
        total = 0.0
        for i in range(5):
            sims = [float(q[i] @ k[j] / (q[i].norm() * k[j].norm())) / tau for j in range(5)]
            total -= sims[i] - math.log(sum(math.exp(s) for s in sims))
        assert abs(info_nce(q, k, torch.tensor(math.log(1 / tau))).item() - total / 5) < 1e-4
    with torch.autocast('cpu', dtype=torch.bfloat16):  # similarities stay float32
        assert abs(info_nce(q.bfloat16(), k.bfloat16(), torch.tensor(0.0)).item() - total / 5) < 1e-2
    cap = info_nce(q, k, torch.tensor(math.log(100.0)))  # 1 / tau is capped at 100, as in CLIP
    assert torch.allclose(info_nce(q, k, torch.tensor(8.0)), cap)
    scale = torch.tensor(2.0, requires_grad=True)
    info_nce(q, k, scale).backward()
    assert scale.grad.abs() > 0  # the temperature is learnable


def test_orthogonality_zero_hand_value_and_bf16_masking():
    y = torch.tensor([0])
    assert orthogonality(torch.tensor([[[9.0, 1.0, 0.0], [9.0, 0.0, 1.0]]]), y).item() == 0  # orthogonal without y
    z = torch.tensor([[[5.0, 1.0, 0.0], [-5.0, 1.0, 1.0]]])  # cos = 1 / sqrt(2) once column 0 is zeroed
    assert abs(orthogonality(z, y).item() - (2 ** -0.5 - 0.5) ** 2) < 1e-6
    assert orthogonality(z, y, theta=0.75).item() == 0
    # bf16: the target column is zeroed, not set to -1e6 (which swamps every cosine in bf16, and overflows fp16)
    z = torch.tensor([[[3e4, 1, 0, 2], [-3e4, 0, 1, 0]], [[1, 2, 3, 4], [4, 3, 2, 1]]], dtype=torch.bfloat16,
                     requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = orthogonality(z, torch.tensor([0, 1]))
    cos = 14 / (26 ** 0.5 * 21 ** 0.5)  # second sample, column 1 zeroed: [1, 0, 3, 4] . [4, 0, 2, 1]
    assert loss.dtype == torch.float32 and abs(loss.item() - 2 * (cos - 0.5) ** 2 / 4) < 1e-6
    loss.backward()
    assert torch.isfinite(z.grad.float()).all()


@pytest.mark.parametrize('method', ['fbt', 'hcd'])
@pytest.mark.parametrize('teacher,student,teacher_first', BASELINE_PAIRS)
def test_fbt_hcd_step_trains_every_new_module_not_the_teacher(method, teacher, student, teacher_first):
    d = small_baseline(method, teacher, student)
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits, losses = d(x, y)
    if method == 'fbt':  # the fused model: stages 1-3 of side a, L2G, stage 4 and head of side b
        assert d.t_first == teacher_first
        a, b = (d.teacher, d.student) if teacher_first else (d.student, d.teacher)
        assert (d.l2g[0].in_channels, d.l2g[0].out_channels) == (a.shapes(32)[1][2][0], b.shapes(32)[0][3][0])
        # L(t, f) reaches the student's stage 4 when it is side b, its stage 1 when it is side a
        reached = [any(g is not None and g.abs().sum() > 0 for g in torch.autograd.grad(
            losses['teacher_fused'], list(d.student.net.get_submodule(d.student._bounds[i + 1]).parameters()),
            retain_graph=True, allow_unused=True))
            for i in (0, 3)]
        assert reached == [not teacher_first, teacher_first]
    losses['total'].backward()
    new = {n: p for n, p in d.named_parameters() if not n.startswith('student.')}
    assert new and [n for n, p in new.items() if p.grad is None or not p.grad.abs().sum()] == []
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in d.teacher.state_dict().items())
    assert all(p.grad is None for p in d.teacher.parameters()) and not d.teacher.training
    if method == 'fbt':
        assert d.eval().extra_evals()['fused'](x)[0].shape == (4, 10)


def test_hcd_sub_logit_kl_teaches_the_student_only_mean_over_stages_and_warms_up():
    """The term at fault in the miniature: KL(sub-logits || student), weight 6. Summed over 4 stages and not detached,
    it dragged the sub-logits to the untrained student and blew the student up at the warm-up's end. Now: the mean
    over stages, by a loop, of the batch-mean KL over each sample's n sub-logits; no gradient to the mapper or
    projector through it; its weight rises linearly over the first 20/240 of the run."""
    d = small_baseline('hcd', 'swin_mini', 'resnet_mini')
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits, feats = d.student(x)
    with torch.no_grad():
        t_logits, t_feats = d.teacher(x)
    losses = d.distill(x, y, logits.float(), feats, t_logits.float(), t_feats)
    f_t = t_feats[3].mean((2, 3))
    per_stage = []
    for proj, cfm, f in zip(d.proj, d.cfm, feats):
        z = cfm(torch.cat([proj(f), f_t], 1)).view(4, d.n, 10) + t_logits[:, None]
        kls = [(z[b, j].softmax(-1) * (z[b, j].log_softmax(-1) - logits[b].log_softmax(-1))).sum()
               for b in range(4) for j in range(d.n)]
        per_stage.append(sum(kls) / len(kls))
    torch.testing.assert_close(losses['sub_kl'], sum(per_stage) / 4)
    grads = torch.autograd.grad(losses['sub_kl'], [logits, *d.cfm.parameters(), *d.proj.parameters()],
                                allow_unused=True)
    assert grads[0].abs().sum() > 0  # the student's logits learn from the sub-logits
    assert all(g is None for g in grads[1:])  # the mapper and projector learn from their CE and orthogonality only
    for progress, factor in ((1 / 240, 1 / 20), (10 / 240, 0.5), (20 / 240, 1.0), (1.0, 1.0)):
        d.progress = progress
        assert abs(d.weight('sub_kl') - 6 * factor) < 1e-12
    assert d.weight('sub_ce') == 1.0 and d.weight('orth') == 1.0


@pytest.mark.parametrize('method', ['fbt', 'hcd'])
def test_fbt_hcd_bf16_autocast_step_and_checkpoint_round_trip(method):
    d = small_baseline(method, 'convnext_mini', 'vit_mini')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, losses = d(torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    losses['total'].backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for n, p in d.named_parameters() if not n.startswith('student.'))
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.01)  # moved away from their initial values, temperatures included
    other = small_baseline(method, 'convnext_mini', 'vit_mini', seed=1)
    other.load_state_dict(d.state_dict())  # strict: the same modules, parameters and temperatures
    assert all(torch.equal(p, q) for p, q in zip(d.parameters(), other.parameters()))
    if method == 'fbt':
        assert 'log_scale' in d.state_dict()


# ---------------------------------------------------------------- trainer, eval, DDP (digits, offline)
HERE = os.path.dirname(os.path.abspath(__file__))
CPU_ENV = {**os.environ, 'CUDA_VISIBLE_DEVICES': ''}  # two processes on the CPU even where one GPU is present
TINY = ['--dataset', 'digits', '--train-fraction', '0.3', '--batch-size', '32', '--dim', '64', '--log-every', '1000']


def test_digits_teacher_then_fofa_student_and_eval_round_trip(tmp_path, capsys):
    out, teachers = str(tmp_path / 'run'), str(tmp_path / 'teachers')
    train.main(TINY + ['--teacher', 'convnext_mini', '--student', 'vit_mini', '--epochs', '2', '--out', out,
                       '--teacher-dir', teachers, '--ema', '0.9'])
    cached = os.listdir(teachers)
    assert 'convnext_mini_digits_32px_10cls_frac0.3.pt' in cached
    logs = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert [r['epoch'] for r in logs] == [1, 2]
    assert {'ce', 'kd', 'fd', 'reg', 'total', 'top1', 'top1_ema', 'lr', 'img_per_s', 'peak_mem_gb'} <= logs[0].keys()
    best = torch.load(os.path.join(out, 'best.pt'), weights_only=True)
    top1, _ = evaluate_script.main(['--model', 'vit_mini', '--ckpt', os.path.join(out, 'best.pt')])
    expected = max(max(r['top1'], r['top1_ema']) for r in logs)
    assert abs(top1 - expected) < 1e-6 and best['which'] in ('raw', 'ema')
    assert 'best top-1' in capsys.readouterr().out
    # prompted_teacher_top1 is the prompted pass with the run's feedback buffers: last.pt reproduces it, and with
    # every beta at 0 it is the teacher's own top-1
    ck = torch.load(os.path.join(out, 'last.pt'), weights_only=True)
    run = train.parser().parse_args(['--student', 'vit_mini'])
    vars(run).update(ck['args'])
    model = train.build(run, 10)
    model.load_state_dict(ck['model'])
    _, val_loader, _ = data.build_loaders('digits', None, 32, run.batch_size, workers=0)
    ctx = torch.autocast('cpu', enabled=False)
    assert train.evaluate(model.prompted_teacher, val_loader, 'cpu', ctx)[0] == logs[-1]['prompted_teacher_top1']
    assert all(afp.beta.abs().item() > 0 for afp in model.afp.values())
    with torch.no_grad():
        for afp in model.afp.values():
            afp.beta.zero_()
    assert train.evaluate(model.prompted_teacher, val_loader, 'cpu', ctx)[0] == logs[-1]['teacher_top1']
    png = tmp_path / 'attn.png'  # RAA's attention map (Fig. 3) from the run's last.pt
    attn = evaluate_script.main(['--ckpt', os.path.join(out, 'last.pt'), '--attn', str(png)])
    assert attn.shape == (64, 64) and np.allclose(attn.sum(1), 1, atol=1e-5)  # softmax over keys
    img = np.asarray(Image.open(png).convert('RGB'))
    assert 400 < img.shape[0] < 2000 and 400 < img.shape[1] < 2000 and img.std() > 0
    # a second run reuses the cached teacher: no teacher training this time
    # (and --eval-every: the untested epoch logs top1 null; the last epoch is always tested and saved as the best)
    train.main(TINY + ['--teacher', 'convnext_mini', '--student', 'vit_mini', '--epochs', '2', '--method', 'kd',
                       '--out', str(tmp_path / 'kd'), '--teacher-dir', teachers, '--eval-every', '5'])
    assert 'training convnext_mini' not in capsys.readouterr().out
    logs = [json.loads(line) for line in open(tmp_path / 'kd' / 'log.jsonl')]
    assert logs[0]['top1'] is None and logs[1]['top1'] is not None and 'kd' in logs[0]
    assert all(0 <= log['data_wait'] < 1 for log in logs)  # the share of each epoch's loop spent in next(loader)
    assert torch.load(tmp_path / 'kd' / 'best.pt', weights_only=True)['epoch'] == 2


@pytest.mark.parametrize('method', train.METHODS)
def test_every_method_trains_a_step_on_a_heterogeneous_pair(method, tmp_path):
    teacher = tmp_path / 'teacher.pt'
    torch.save(models.create('swin_mini', 10).net.state_dict(), teacher)
    args = train.parser().parse_args(['--teacher', 'swin_mini', '--student', 'mixer_mini', '--method', method, '--dim', '64',
                           '--teacher-ckpt', str(teacher), '--out', str(tmp_path / 'run')])
    train.resolve(args)
    torch.manual_seed(0)
    model = train.build(args, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    _, terms = model(x, y)
    assert (len(terms) == 2) == (method == 'ce') and all(torch.isfinite(v) for v in terms.values())
    terms['total'].backward()
    before = [p.detach().clone() for p in model.student.parameters()]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.student.parameters()))


def test_bench_prints_ratios_and_the_floor(capsys):
    import bench
    rows = bench.main(['--teacher', 'convnext_mini', '--student', 'vit_mini', '--batch-size', '4', '--steps', '1',
                       '--warmup', '0', '--dim', '32'])
    pair = 'convnext_mini -> vit_mini: '
    assert list(rows) == [pair + m for m in ('ce', 'kd', 'floor', 'fofa', 'fbt', 'hcd')]
    for r in rows.values():  # one round: the ratios are those of the rows
        assert r['ms/step'] > 0 and r['peak GiB'] > 0 and r['img/s'] == pytest.approx(4000 / r['ms/step'])
        assert r['time/floor'] == pytest.approx(r['ms/step'] / rows[pair + 'floor']['ms/step'])
        assert r['mem/kd'] == pytest.approx(r['peak GiB'] / rows[pair + 'kd']['peak GiB'])
    out = capsys.readouterr().out
    assert '| | img/s | ms/step | peak GiB | time/ce | mem/ce | time/kd | mem/kd | time/floor | mem/floor |' in out
    assert f'| {pair}fofa | ' in out and 'batch 4 at 32 px, fp32' in out


def test_selfcheck_on_cpu_runs_every_part_and_reports_the_cuda_tests(capsys):
    import bench
    table = bench.main(['--selfcheck', '--pairs', 'convnext_mini:vit_mini,swin_mini:resnet_mini', '--batch-size',
                        '4', '--steps', '1', '--warmup', '0', '--loader-steps', '2', '--dim', '32'])
    tests = [f'test_smoke.py::{t}' for t in ('test_bf16_compile_channels_last_step_agrees_with_fp32_eager[cuda]',
                                              'test_ddp_two_processes_equal_one_process_with_twice_the_batch[nccl]')]
    pairs = ['convnext_mini -> vit_mini', 'swin_mini -> resnet_mini']
    loader = 'convnext_mini -> vit_mini: fofa, train.py'
    assert list(table) == tests + [f'{p}: {m}' for p in pairs for m in ('ce', 'kd', 'floor', 'fofa')] + [loader]
    for t, gpus in zip(tests, (1, 2)):  # the skip marks of the tests decide, reasons shown
        assert table[t]['result'].startswith('SKIPPED (' if torch.cuda.device_count() < gpus else 'PASSED')
    for p in pairs:
        fofa = table[f'{p}: fofa']
        assert all(math.isfinite(fofa[k]) and fofa[k] > 0 for k in ('img/s', 'peak GiB', 'time/kd', 'mem/kd',
                                                                     'time/floor', 'mem/floor'))
    assert math.isfinite(table[loader]['img/s']) and table[loader]['img/s'] > 0
    assert f"next(loader), {data.default_workers()} workers; the step alone" in table[loader]['result']
    out = capsys.readouterr().out
    assert all(f'| {row} | ' in out for row in table) and 'torch 2' in out and 'timm' in out


def test_summarize_pairs_seeds_and_draws_curves(tmp_path, capsys):
    # top-1 at epochs 1-3; epoch 1 is tested in one run only (--eval-every), so no best is taken from it
    curves = {'kd': [(None, 60.0, 80.0), (99.0, 62.0, 84.0)], 'fofa': [(None, 70.0, 82.0), (None, 75.0, 86.0)]}
    for config, seeds in curves.items():
        for seed, accs in enumerate(seeds):
            d = tmp_path / 'cnn-vit' / config / f'seed{seed}'
            d.mkdir(parents=True)
            (d / 'log.jsonl').write_text(''.join(json.dumps({'epoch': e + 1, 'top1': a, 'top1_ema': None,
                                                             'teacher_top1': 95.0, 'prompted_teacher_top1': 90.0 + seed,
                                                             'skipped_steps': int(a == 0)})
                                                 + '\n' for e, a in enumerate(accs)))
            (d / 'args.json').write_text(json.dumps({'epochs': 3}))
    for seed, accs in ((2, [50.0, 0.0]), (3, [40.0])):  # a run stopped by non-finite losses, and one still running
        d = tmp_path / 'cnn-vit' / 'fofa' / f'seed{seed}'
        d.mkdir(parents=True)
        (d / 'log.jsonl').write_text(''.join(json.dumps({'epoch': e + 1, 'top1': a, 'skipped_steps': int(a == 0)})
                                             + '\n' for e, a in enumerate(accs)))
        (d / 'args.json').write_text(json.dumps({'epochs': 3}))
    report.main([str(tmp_path), '--paired', 'fofa:kd', 'kd:ofa'])
    out = capsys.readouterr().out
    assert 'cnn -> vit, teacher top-1 95.00' in out
    # drift: epoch 3 (the last 20%) minus epoch 2 (the 20% before); paired to kd: 2 and 2
    assert '| kd | 2 | 82.00 ± 2.83 | 82.00 ± 2.83 | 21.00 ± 1.41 | 0.00 ± 0.00 | - | -2.00 ± 0.00 | 90.50 ± 0.71 |' in out
    assert ('| fofa | 2 (1 diverged, 1 unfinished) | 84.00 ± 2.83 | 84.00 ± 2.83 | 11.50 ± 0.71 | 2.00 ± 0.00 | - | '
            '0.00 ± 0.00 | 90.50 ± 0.71 |' in out)
    # the paired table: one column per pair, seeds both configs finished; '-' where a config has no runs
    assert '| paired difference of the final top-1 | cnn -> vit |\n|---|---|\n| fofa - kd | 2.00 ± 0.00 (n = 2) |' in out
    assert '| kd - ofa | - |' in out
    for config in ('fofa_gamma16', 'dist'):  # a hypothesis (one seed: no band) and a config of no role
        d = tmp_path / 'cnn-vit' / config / 'seed0'
        d.mkdir(parents=True)
        (d / 'log.jsonl').write_text(''.join(json.dumps({'epoch': e, 'top1': 50.0 + e}) + '\n' for e in (1, 2, 3)))
        (d / 'args.json').write_text(json.dumps({'epochs': 3}))
    png = tmp_path / 'curves.png'
    rows = report.main([str(tmp_path), '--curves', str(png)])
    assert rows == {'ladder': ['kd', 'fofa'], 'baselines': ['kd', 'fofa'], 'hypotheses': ['fofa', 'fofa_gamma16']}
    img = np.asarray(Image.open(png).convert('RGB')).astype(int)
    assert 400 < img.shape[0] < 2000 and 400 < img.shape[1] < 2000  # 3 rows of 1 panel
    kd_line, kd_band = (255, 127, 14), (255, 240, 231)  # matplotlib's C1; at alpha 0.15 on white
    for color, pixels in ((kd_line, 200), (kd_band, 100)):  # kd's mean line and 2-seed band, 2 rows
        assert (np.abs(img - color).sum(-1) <= 6).sum() > pixels, color


def test_training_does_not_import_matplotlib():
    # the figures import it inside eval.py's and report.py's functions only: training and the tables need none
    code = 'import sys, train, eval, paper; assert "matplotlib" not in sys.modules, "matplotlib was imported"'
    subprocess.run([sys.executable, '-c', code], cwd=os.path.dirname(os.path.abspath(__file__)), check=True)


def test_torchrun_two_processes_on_cpu(tmp_path):
    teacher = tmp_path / 'teacher.pt'
    torch.save(models.create('resnet_mini', 10).net.state_dict(), teacher)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'train.py', *TINY,
           '--teacher', 'resnet_mini', '--student', 'mixer_mini', '--teacher-ckpt', str(teacher), '--epochs', '1',
           '--method', 'fbt', '--out', str(tmp_path / 'ddp')]  # (FOFA under torchrun: the DDP-equals-one test)
    r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300, env=CPU_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'global batch 64' in r.stdout and os.path.isfile(tmp_path / 'ddp' / 'last.pt')
    log = json.loads(open(tmp_path / 'ddp' / 'log.jsonl').read())  # the fused model (student stage 4) is tested too
    assert 0 <= log['fused_top1'] <= 100 and {'teacher_student', 'teacher_fused', 'fused_student'} <= log.keys()



# ---------------------------------------------------------------- reliability: resume, safe files, errors, DDP
def random_teacher(path, name='convnext_mini', classes=10):
    torch.manual_seed(1)
    torch.save(models.create(name, classes).net.state_dict(), path)
    return str(path)


def run_train(args, **kw):
    return subprocess.run([sys.executable, 'train.py', *args], cwd=HERE, capture_output=True, text=True, **kw)


def start_until(cmd, text, **kw):
    """cmd started, its output (stderr too) read until a line holds text: (process, lines read)."""
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, **kw)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if text in line:
            break
    return p, lines


def assert_same_run(whole, cut, epochs):
    """cut (stopped, then resumed) ended with whole's weights, bit for bit, and logged each epoch
    once, with whole's losses."""
    a, b = (torch.load(d / 'last.pt', weights_only=True) for d in (whole, cut))
    for key in ('model', 'ema'):  # student, RAA, AFP and its feedback buffers, EMA
        assert (a[key] or {}).keys() == (b[key] or {}).keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key] or {}), key
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()
    logs = [[json.loads(line) for line in open(d / 'log.jsonl')] for d in (whole, cut)]
    assert [r['epoch'] for r in logs[1]] == list(range(1, epochs + 1))
    timed = ('img_per_s', 'peak_mem_gb', 'data_wait')  # measurements of the machine, not the run
    untimed = [[{k: v for k, v in r.items() if k not in timed} for r in log] for log in logs]
    assert untimed[0] == untimed[1]  # an epoch cut in two logs the whole epoch's losses


def test_sigterm_and_sigkill_mid_epoch_then_resume_are_bit_exact(tmp_path):
    common = ['--dataset', 'digits', '--train-fraction', '0.15', '--batch-size', '16', '--dim', '64',
              '--teacher', 'convnext_mini', '--student', 'vit_mini', '--recipe', 'vit', '--ema',
              '0.9', '--epochs', '2', '--log-every', '1', '--teacher-ckpt',
              random_teacher(tmp_path / 't.pt')]  # mixup, EMA; 11 steps an epoch
    whole, term, kill = tmp_path / 'whole', tmp_path / 'term', tmp_path / 'kill'
    assert run_train(common + ['--out', str(whole)], timeout=300).returncode == 0
    # SIGTERM (SLURM, Kubernetes): the step ends, last.pt is written, a line says how to go on
    p, _ = start_until([sys.executable, 'train.py', *common, '--out', str(term)], 'epoch 1 step 3/')
    p.send_signal(signal.SIGTERM)
    out = p.stdout.read()
    assert p.wait() == train.STOPPED == 75, out[-2000:]
    line = out.strip().splitlines()[-1]
    ck = torch.load(term / 'last.pt', weights_only=True)
    assert ck['epoch'] == 0 and 3 <= ck['step'] < 11, line
    assert line == (f"SIGTERM: stopped at epoch 1 step {ck['step']}/11, saved in {term}/last.pt; "
                    'to continue, run the same command with --resume.'), line
    assert run_train(common + ['--out', str(term), '--resume'], timeout=300).returncode == 0
    assert_same_run(whole, term, 2)
    # SIGKILL after a checkpoint inside the epoch (--save-every-minutes), maybe while writing one
    p, _ = start_until([sys.executable, 'train.py', *common, '--out', str(kill),
                        '--save-every-minutes', '0.0001'], 'epoch 2 step 3/')
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, 'the run ended before it could be killed'
    ck = torch.load(kill / 'last.pt', weights_only=True)
    assert ck['epoch'] == 1 and 1 <= ck['step'] < 11
    (kill / 'last.pt.tmp').write_bytes(b'half a checkpoint')  # killed while saving: ignored
    r = run_train(common + ['--out', str(kill), '--resume'], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(whole, kill, 2)


def test_image_pipeline_with_workers_resumes_inside_an_epoch_bit_exact(fake_cifar, no_download,
                                                                       monkeypatch, capsys):
    """CIFAR-100 through RandAugment, erasing and mixup, in 2 loader workers: a SIGTERM in step 3
    of 5 (the process signals itself), then --resume, give the uninterrupted run's weights."""
    handler = signal.getsignal(signal.SIGTERM)
    args = ['--dataset', 'cifar100', '--data-dir', str(fake_cifar), '--teacher', 'convnext_mini',
            '--student', 'vit_mini', '--method', 'kd', '--recipe', 'vit', '--batch-size', '4',
            '--epochs', '1', '--workers', '2',
            '--teacher-ckpt', random_teacher(fake_cifar / 't.pt', classes=100)]
    train.main(args + ['--out', str(fake_cifar / 'whole')])
    kd, steps = train.losses.kd, []

    def signal_in_step_3(*a):
        steps.append(len(steps))
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return kd(*a)
    monkeypatch.setattr(train.losses, 'kd', signal_in_step_3)
    with pytest.raises(SystemExit) as e:  # the ranks agree at progress lines: every 2 steps here
        train.main(args + ['--out', str(fake_cifar / 'cut'), '--log-every', '2'])
    assert e.value.code == 75 and 'SIGTERM: stopped at epoch 1 step 4/5' in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is handler  # the handlers are put back
    monkeypatch.setattr(train.losses, 'kd', kd)
    train.main(args + ['--out', str(fake_cifar / 'cut'), '--resume'])
    assert_same_run(fake_cifar / 'whole', fake_cifar / 'cut', 1)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / 'last.pt'
    models.write_checkpoint({'epoch': 1}, str(path))

    def crash(obj, f):
        f.write(b'truncated')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError):
        models.write_checkpoint({'epoch': 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {'epoch': 1}


class CodePayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def user_error_cases(tmp_path):
    t = random_teacher(tmp_path / 'teacher.pt')
    other_arch = random_teacher(tmp_path / 'vit.pt', 'vit_mini')
    other_classes = random_teacher(tmp_path / 'c100.pt', 'convnext_mini', 100)
    truncated = tmp_path / 'trunc.pt'
    truncated.write_bytes((tmp_path / 'teacher.pt').read_bytes()[:5000])
    text = tmp_path / 'notes.txt'
    text.write_text('not a checkpoint')
    payload = tmp_path / 'payload.pt'
    torch.save({'state_dict': CodePayload(tmp_path / 'payload_ran')}, payload)
    empty = tmp_path / 'empty'
    empty.mkdir()
    teachers = ['--teacher-dir', str(tmp_path / 'teachers')]  # must stay absent: no teacher is trained
    ok = ['--teacher', 'convnext_mini', '--student', 'vit_mini', '--teacher-ckpt', t, '--epochs', '1']
    # a run to resume: last.pt holds the args of `ok` as train.main completes them (no training needed)
    run = train.resolve(train.parser().parse_args(ok + ['--out', str(tmp_path / 'resumable')]))
    vars(run).update(recipe='vit', img_size=32, amp=False, opt='adamw', lr=5e-4, wd=0.05, warmup_epochs=1 / 15)
    (tmp_path / 'resumable').mkdir()
    models.write_checkpoint({'epoch': 1, 'args': vars(run)}, str(tmp_path / 'resumable' / 'last.pt'))
    resume = ok + ['--resume', '--out', str(tmp_path / 'resumable')]
    resumable, fitnet = str(tmp_path / 'resumable' / 'last.pt'), str(tmp_path / 'fitnet.pt')  # for --attn
    models.write_checkpoint({'epoch': 1, 'args': {**vars(run), 'method': 'fitnet'}, 'model': {}}, fitnet)  # no RAA
    (tmp_path / 'broken').mkdir()
    (tmp_path / 'broken' / 'last.pt').write_bytes(truncated.read_bytes())
    return [  # (argv, words the one-sentence message must contain); argv[0] names eval.py or bench.py, else train.py
        (['--teacher', 'convnext_typo', '--student', 'vit_mini'], 'unknown model'),
        (['--teacher', 'convnext_mini', '--student', 'vit_typo'], 'unknown model'),
        (ok + ['--afp-stages', '1,5'], 'afp-stages'),
        (ok + ['--afp-stages', 'first'], 'afp-stages'),
        (ok + ['--method', 'ofa', '--ofa-stages', '1,x'], 'ofa-stages'),
        (['--teacher', 'convnext_mini', '--student', 'vit_mini', '--teacher-ckpt', 'missing.pt'], 'does not exist'),
        (['--teacher', 'convnext_mini', '--student', 'vit_mini', '--teacher-ckpt', str(truncated)], 'truncated'),
        (['--teacher', 'convnext_mini', '--student', 'vit_mini', '--teacher-ckpt', str(text)], 'not a readable'),
        (['--teacher', 'convnext_mini', '--student', 'vit_mini', '--teacher-ckpt', other_arch], 'not a convnext_mini'),
        (['--teacher', 'convnext_mini', '--student', 'vit_mini', '--teacher-ckpt', other_classes], '100 classes'),
        (['--teacher', 'convnext_mini', '--student', 'vit_mini', '--teacher-ckpt', str(payload)], 'pickled code'),
        (ok + ['--dataset', 'imagenet', '--data-dir', str(tmp_path / 'nowhere')], 'not found'),
        (ok + ['--dataset', 'imagenet', '--data-dir', str(empty)], 'train/<class>'),
        (ok + ['--out', str(tmp_path / 'fresh'), '--resume'], 'does not exist'),
        (ok + ['--out', str(tmp_path / 'finished')], 'already holds a run'),
        (['--student', 'vit_mini', '--method', 'fofa'], 'needs a --teacher'),
        (ok + ['--dataset', 'mnist'], "--dataset: invalid choice: 'mnist'"),
        (ok + ['--method', 'magic'], "--method: invalid choice: 'magic'"),
        (ok + ['--opt', 'adamx2'], "--opt: 'adamx2' is not a timm optimizer"),
        (ok + ['--no-such-flag'], 'unrecognized arguments'),
        # 1. input size against the models: probed before anything is written, naming the model and its size
        (ok + ['--img-size', '30'], 'does not fit the teacher convnext_mini'),
        (['--teacher', 'deit_t', '--student', 'vit_mini'] + teachers, 'does not fit the teacher deit_t'),
        (['--teacher', 'vit_mini', '--student', 'resnet_mini', '--img-size', '64'] + teachers, 'it takes 32'),
        (['--teacher', 'resnet_mini', '--student', 'swin_mini', '--img-size', '48'] + teachers,
         'does not fit the student swin_mini'),
        (['--student', 'convnext_mini', '--method', 'ce', '--img-size', '8'], 'Kernel size'),  # below 1 px
        # 2. numbers out of range, refused where they are parsed, with the range
        (ok + ['--nq', '50'], '4*k*k'),
        (ok + ['--batch-size', '0'], '--batch-size: \'0\' is not an integer >= 1'),
        (ok + ['--epochs', '2.5'], '--epochs: \'2.5\' is not an integer >= 1'),
        (ok + ['--lr', 'nan'], '--lr: \'nan\' is not a number > 0'),
        (ok + ['--lr', '-0.1'], 'is not a number > 0'),
        (ok + ['--wd', 'inf'], '--wd: \'inf\' is not a number >= 0'),
        (ok + ['--ema', '1'], '--ema: \'1\' is not in [0, 1)'),
        (ok + ['--train-fraction', '0'], 'is not in (0, 1]'),
        (ok + ['--warmup-epochs', '-1'], '--warmup-epochs'),
        (ok + ['--alpha', '-1'], '--alpha'),
        (ok + ['--gamma', 'nan'], '--gamma'),
        (ok + ['--kd-t', '0'], '--kd-t'),
        (ok + ['--method', 'dkd', '--dkd', '1', '8', '0'], 'temperatures'),
        (ok + ['--method', 'dist', '--dist', '1', '-1', '1'], '--dist'),
        (ok + ['--ofa-eps', '0'], '--ofa-eps'),
        (ok + ['--dim', '100'], 'a positive multiple of 8'),
        (ok + ['--workers', '-1'], '--workers'),
        (ok + ['--log-every', '0'], '--log-every'),
        (ok + ['--seed', '-3'], '--seed'),
        (ok + ['--img-size', '0'], '--img-size'),
        # 3. paths: what the path is, not "does not exist"
        (ok + ['--out', str(text)], 'is a file, not a run directory'),
        (ok + ['--out', str(text / 'run')], 'cannot be made: '),
        (['--teacher', 'convnext_mini', '--student', 'vit_mini', '--teacher-ckpt', str(empty)],
         'is a directory, not a checkpoint file'),
        (['--teacher', 'convnext_mini', '--student', 'vit_mini', '--teacher-dir', str(text / 'cache')],
         '--teacher-dir'),
        (ok + ['--dataset', 'cifar100', '--data-dir', str(text)], 'is a file, not a dataset directory'),
        # 4. --resume against the run's flags: the differing flags are named, with the run's values
        (resume + ['--method', 'kd'], 'was run with --method fofa'),
        (resume + ['--student', 'resnet_mini'], 'was run with --student vit_mini'),
        (resume + ['--nq', '36', '--afp-stages', '1,2'], '--nq 64, --afp-stages 1,2,3,4'),
        (resume + ['--lr', '0.1'], '--lr 0.0005'),
        (resume + ['--dataset', 'cifar100', '--data-dir', str(empty)], '--dataset digits'),
        (resume + ['--dkd', '1', '8', '2'], '--dkd 1.0 8.0 4.0'),
        (ok + ['--resume', '--out', str(tmp_path / 'broken')], 'not a readable PyTorch checkpoint'),
        # 5. eval.py and bench.py
        (['eval.py', '--ckpt', str(empty)], '--ckpt'),
        (['eval.py', '--ckpt', str(tmp_path / 'missing.pt'), '--model', 'vit_mini'], 'does not exist'),
        (['eval.py', '--ckpt', t, '--model', 'convnext_typo'], 'unknown model'),
        (['eval.py', '--ckpt', t, '--model', 'vit_mini', '--img-size', '64'], 'does not fit the model vit_mini'),
        (['eval.py', '--ckpt', t, '--model', 'convnext_mini', '--batch-size', '0'], '--batch-size'),
        (['eval.py', '--ckpt', t, '--model', 'convnext_mini', '--workers', 'two'], '--workers'),
        (['eval.py', '--ckpt', t, '--model', 'convnext_mini', '--dataset', 'mnist'], '--dataset'),
        (['eval.py', '--ckpt', str(truncated), '--attn', str(tmp_path / 'a.png')], 'not a readable'),
        (['eval.py', '--ckpt', t, '--attn', str(empty)], 'is a directory, not a PNG file'),
        (['eval.py', '--ckpt', fitnet, '--attn', str(tmp_path / 'a.png')], 'not the last.pt of a FOFA run'),
        (['eval.py', '--ckpt', resumable, '--attn', str(tmp_path / 'a.png')], 'with RAA: --attn needs it'),
        (['report.py', str(tmp_path / 'nowhere')], 'does not exist'),
        (['report.py', str(empty)], 'holds no finished runs'),
        (['report.py', str(empty), '--paired', 'raa'], '--paired takes configs in pairs'),
        (['report.py', str(empty), '--curves', str(empty)], 'is a directory, not a PNG file'),
        (['paper.py', '3', '--list'], "table: invalid choice: '3'"),
        (['paper.py', '4', '--lsit'], 'unrecognized arguments: --lsit'),
        (['paper.py', '4', '--list', '--gpus', '3'], 'global batch 128 of convnext_t-deit_t/fitnet is not a multiple'),
        (['paper.py', '4', '--list', '--only', 'nothing'], 'matches no cell of Table 4'),
        (['paper.py', '4', '--list', '--only', '(fofa'], 'is not a regular expression'),
        (['paper.py', '4', '--list', '--seeds', 'a'], "--seeds: 'a' is not an integer >= 0"),
        (['paper.py', '4', '--list', '--compare'], 'not allowed with argument --list'),
        (['paper.py', '4', '--compare', '--runs', str(tmp_path / 'nowhere')], 'does not exist'),
        (['paper.py', '2', '--compare', '--runs', str(empty)], 'holds no finished runs'),
        (['bench.py'] + ok + ['--methods', 'ce,magic'], '--methods'),
        (['bench.py', '--student', 'vit_mini', '--methods', 'ce,kd'], 'needs a --teacher'),
        (['bench.py'] + ok + ['--steps', '0'], '--steps'),
        (['bench.py'] + ok + ['--warmup', '-1'], '--warmup'),
        (['bench.py'] + ok + ['--img-size', '30'], 'does not fit'),
        (['bench.py', '--selfcheck', '--pairs', 'convnext_mini:vit_mini,swin_mini'], '--pairs'),
    ]


def test_user_errors_are_one_sentence_and_touch_nothing(tmp_path):
    import time
    import bench
    finished = tmp_path / 'finished'
    finished.mkdir()
    models.write_checkpoint({'epoch': 1}, str(finished / 'last.pt'))
    (finished / 'log.jsonl').write_text('{"epoch": 1}\n')
    cases = user_error_cases(tmp_path)
    snapshot = lambda: {str(p): p.read_bytes() for p in sorted(tmp_path.rglob('*')) if p.is_file()}
    before = snapshot()
    mains = {'eval.py': evaluate_script.main, 'bench.py': bench.main, 'report.py': report.main,
             'paper.py': paper.main}
    assert len(cases) >= 40
    for argv, words in cases:
        main = mains.get(argv[0], train.main)
        if argv[0] in mains:
            argv = argv[1:]
        if main in (train.main, bench.main) and '--out' not in argv:
            argv = argv + ['--out', str(finished), '--overwrite']  # a failing run must not touch the existing one
        t0 = time.time()
        with pytest.raises(SystemExit) as e:
            main(argv)
        msg = str(e.value.code)
        assert words in msg and '\n' not in msg and msg.endswith('.'), (argv, msg)
        assert time.time() - t0 < 20, argv
        assert snapshot() == before, argv  # nothing written, nothing touched, anywhere under tmp_path
    assert not (tmp_path / 'payload_ran').exists()


def test_resume_may_change_epochs_workers_and_log_every_and_takes_unset_flags_from_the_run(tmp_path, capsys):
    user_error_cases(tmp_path)
    out = str(tmp_path / 'resumable')
    args = train.parser().parse_args(['--teacher', 'convnext_mini', '--student', 'vit_mini', '--teacher-ckpt',
                           str(tmp_path / 'teacher.pt'), '--epochs', '5', '--workers', '0', '--log-every', '7',
                           '--resume', '--out', out])
    train.resolve(args)
    assert (args.epochs, args.lr, args.recipe, args.img_size, args.warmup_epochs) == (5, 5e-4, 'vit', 32, 1 / 15)
    with pytest.raises(SystemExit) as e:  # --help still prints the usage and exits 0
        train.main(['--help'])
    assert e.value.code == 0 and 'usage' in capsys.readouterr().out


def test_resume_with_more_epochs_follows_the_longer_schedule(tmp_path):
    args = TINY + ['--teacher', 'convnext_mini', '--student', 'resnet_mini', '--method', 'kd', '--teacher-ckpt',
                   random_teacher(tmp_path / 't.pt'), '--epochs', '2', '--eval-every', '9']
    train.main(args + ['--out', str(tmp_path / 'fresh')])
    train.main(args[:-3] + ['1', '--eval-every', '9', '--out', str(tmp_path / 'extended')])  # 1 epoch, then 2
    train.main(args + ['--out', str(tmp_path / 'extended'), '--resume'])
    lrs = [[json.loads(line)['lr'] for line in open(tmp_path / d / 'log.jsonl')] for d in ('fresh', 'extended')]
    assert lrs[1][1] == lrs[0][1] != lrs[1][0]  # epoch 2 on the 2-epoch cosine, not the 1-epoch run's end


def test_runs_of_older_versions_resume_unless_their_model_is_gone(tmp_path):
    """Older runs hold removed flags in their args (afp_prompt, no_raa): ignored, the run resumes; a run whose model
    this version no longer builds (here: RAA without its attention) is refused in one sentence."""
    run = tmp_path / 'run'
    args = TINY + ['--teacher', 'convnext_mini', '--student', 'vit_mini', '--teacher-ckpt',
                   random_teacher(tmp_path / 't.pt'), '--train-fraction', '0.1', '--eval-every', '9', '--out', str(run)]
    train.main(args + ['--epochs', '1'])
    ck = torch.load(run / 'last.pt', weights_only=True)
    model = {k: v for k, v in ck['model'].items() if not k.startswith('raa.qk')}
    models.write_checkpoint({**ck, 'model': model}, str(run / 'last.pt'))
    with pytest.raises(SystemExit, match=r'does not build \(Missing key\(s\).*raa\.qk.*--overwrite\.$'):
        train.main(args + ['--epochs', '2', '--resume'])
    models.write_checkpoint({**ck, 'args': {**ck['args'], 'afp_prompt': 'channel', 'no_raa': False}}, str(run / 'last.pt'))
    train.main(args + ['--epochs', '2', '--resume'])
    assert [json.loads(line)['epoch'] for line in open(run / 'log.jsonl')] == [1, 2]


def test_user_error_exits_nonzero_without_traceback(tmp_path):
    pair = ['--teacher', 'convnext_mini', '--student', 'vit_mini', '--out', str(tmp_path / 'run')]
    cmds = [['train.py', *pair, '--nq', '63'],  # argparse's type path
            ['train.py', *pair, '--img-size', '30'],  # the size probe
            ['eval.py', '--ckpt', str(tmp_path)], ['bench.py', *pair, '--methods', 'kd,magic'],
            ['report.py', str(tmp_path / 'runs')], ['paper.py', '4', '--list', '--gpus', '3']]
    procs = [subprocess.Popen([sys.executable, *cmd], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for cmd in cmds]
    for cmd, p in zip(cmds, procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 1 and 'Traceback' not in err and err.strip().count('\n') == 0 and not out, (cmd, err)
    assert os.listdir(tmp_path) == []


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch, capsys):
    real_kd, calls = train.losses.kd, [0]

    def sometimes_nan(s, t, T):
        calls[0] += 1
        return real_kd(s, t, T) * (float('nan') if calls[0] % 3 == 0 else 1.0)
    monkeypatch.setattr(train.losses, 'kd', sometimes_nan)
    args = TINY + ['--teacher', 'convnext_mini', '--student', 'vit_mini', '--method', 'kd', '--epochs', '1',
                   '--teacher-ckpt', random_teacher(tmp_path / 't.pt')]
    train.main(args + ['--out', str(tmp_path / 'a')])
    log = json.loads(open(tmp_path / 'a' / 'log.jsonl').read())
    assert log['skipped_steps'] == calls[0] // 3 > 0 and math.isfinite(log['kd'])
    monkeypatch.setattr(train.losses, 'kd', lambda s, t, T: real_kd(s, t, T) * float('inf'))
    with pytest.raises(SystemExit, match=r'non-finite loss \(kd\)'):
        train.main(args + ['--out', str(tmp_path / 'b')])


@pytest.mark.parametrize('backend', ['gloo', pytest.param('nccl', marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason='needs 2 GPUs'))])
def test_ddp_two_processes_equal_one_process_with_twice_the_batch(tmp_path, backend):
    common = ['--dataset', 'digits', '--train-fraction', '0.2', '--dim', '64', '--teacher', 'convnext_mini',
              '--student', 'vit_mini', '--recipe', 'cnn', '--epochs', '1', '--teacher-ckpt', random_teacher(
                  tmp_path / 't.pt'), '--no-amp']  # LayerNorm student, no mixup: nothing depends on the split
    env = CPU_ENV if backend == 'gloo' else os.environ  # train.py takes NCCL on CUDA, gloo on the CPU
    one = run_train(common + ['--batch-size', '16', '--out', str(tmp_path / 'one')], timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                          'train.py', *common, '--batch-size', '8', '--out', str(tmp_path / 'two')],
                         cwd=HERE, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / 'last.pt', weights_only=True) for d in ('one', 'two'))
    assert a['student'].keys() == b['student'].keys()
    moved = False
    init = models.create('vit_mini', 10).net.state_dict()
    tol = dict(rtol=1e-4, atol=1e-5) if backend == 'gloo' else dict(rtol=1e-2, atol=1e-3)  # CUDA: TF32 matmuls
    for k in a['student']:
        torch.testing.assert_close(a['student'][k], b['student'][k], **tol, msg=k)
        moved |= not torch.allclose(a['student'][k], init[k])
    assert moved


def worker_pid(launcher, rank):
    """The pid of torchrun's worker of this rank (a child process of the launcher)."""
    for task in os.listdir(f'/proc/{launcher}/task'):
        for pid in open(f'/proc/{launcher}/task/{task}/children').read().split():
            env = open(f'/proc/{pid}/environ', 'rb').read().split(b'\0')
            if f'RANK={rank}'.encode() in env:
                return int(pid)
    raise AssertionError(f'torchrun {launcher} has no worker of rank {rank}')


def test_torchrun_restarts_a_killed_worker_and_the_run_goes_on_bit_exact(tmp_path):
    common = ['--dataset', 'digits', '--train-fraction', '0.1', '--dim', '64', '--teacher',
              'convnext_mini', '--student', 'vit_mini', '--recipe', 'vit', '--epochs', '2',
              '--batch-size', '8', '--teacher-ckpt',
              random_teacher(tmp_path / 't.pt')]  # FOFA's feedback and mixup per rank; 7 steps
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
                '2', '--max-restarts', '1', 'train.py', *common]
    # torchrun's c10d rendezvous keeps its store, stale keys included, across restarts unless it
    # is told not to share it with the workers: https://github.com/pytorch/pytorch/issues/135712
    env = {**CPU_ENV, 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}
    whole = subprocess.run(torchrun + ['--out', str(tmp_path / 'whole')], cwd=HERE, env=env,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    p, lines = start_until(torchrun + ['--out', str(tmp_path / 'cut'), '--overwrite'],
                           '{"epoch": 1,', env=env)
    os.kill(worker_pid(p.pid, 1), signal.SIGKILL)  # after epoch 1: torchrun restarts both workers
    out = p.stdout.read()
    assert p.wait() == 0, out[-3000:]
    printed = ''.join(lines) + out  # epoch 1 was not redone: the restarted workers kept the run
    assert printed.count('{"epoch": 1,') == printed.count('{"epoch": 2,') == 1, out[-3000:]
    assert_same_run(tmp_path / 'whole', tmp_path / 'cut', 2)  # despite --overwrite


def fast_path_gap(device, compile=True):
    """One FOFA step (prompts on, feedback from a first step) in train.py's fast path: bf16 autocast, student and
    teacher compiled, channels_last, against the fp32 eager step on `device`. Returns (the largest loss gap relative to
    max(1, |loss|), the cosine of the two steps' whole gradient vectors, the smallest per-parameter cosine)."""
    import copy
    torch.manual_seed(0)
    ref = FOFA(models.create('resnet_mini', 10), models.create('convnext_mini', 10), 32, dim=64).to(device)
    with torch.no_grad():
        for afp in ref.afp.values():
            afp.beta.fill_(0.5)  # prompts that change the teacher (beta starts at 0)
    fast = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    for net in (fast.student, fast.teacher) if compile else ():
        net.compile()
    x, y = torch.rand(16, 3, 32, 32, device=device), torch.randint(0, 10, (16,), device=device)
    terms, grads = [], []
    for model, ctx, xs in ((ref, nullcontext(), x), (fast, torch.autocast(device, torch.bfloat16),
                                                     x.contiguous(memory_format=torch.channels_last))):
        for _ in range(2):  # the second step runs on the first step's feedback
            model.zero_grad(set_to_none=True)
            with ctx:
                _, t = model(xs, y)
            t['total'].backward()
        terms.append(t)
        grads.append([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    loss_gap = max(abs(terms[0][k].item() - terms[1][k].item()) / max(1, abs(terms[0][k].item())) for k in terms[0])
    cos = lambda a, b: F.cosine_similarity(a, b, 0, 1e-12).item()
    per_param = [cos(a, b) for a, b in zip(*grads) if a.norm() > 1e-6]
    return loss_gap, cos(torch.cat(grads[0]), torch.cat(grads[1])), min(per_param)


# Tolerance: bf16 keeps 8 mantissa bits. Measured on the 2-core CPU: loss gap 4e-4 (eager) and 6e-4 (compiled),
# gradient cosine 0.979 whole and 0.95 for the worst parameter, with or without compile.
@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='CUDA only: compiling on this CPU takes minutes'))])
def test_bf16_compile_channels_last_step_agrees_with_fp32_eager(device):
    loss_gap, cos_all, cos_min = fast_path_gap(device, compile=device == 'cuda')
    assert loss_gap < 0.02 and cos_all > 0.95 and cos_min > 0.9, (loss_gap, cos_all, cos_min)

# ---------------------------------------------------------------- data.py (fake CIFAR, tiny ImageFolder, digits)
def _md5(path):
    return hashlib.md5(open(path, 'rb').read()).hexdigest()


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """A small CIFAR-100 in torchvision's on-disk format. Python 3 pickles: str keys, as torchvision
    reads the original Python 2 pickles with encoding='latin1'. The md5 checks are passed by
    pointing the class's expected checksums at the fake files (monkeypatch restores them)."""
    folder = tmp_path / 'cifar-100-python'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (('train', 20), ('test', 10)):
        with open(folder / name, 'wb') as f:
            pickle.dump({'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         'fine_labels': [i % 100 for i in range(n)],
                         'coarse_labels': [i % 20 for i in range(n)],
                         'filenames': [f'{i}.png' for i in range(n)]}, f)
    with open(folder / 'meta', 'wb') as f:
        pickle.dump({'fine_label_names': [f'c{i}' for i in range(100)],
                     'coarse_label_names': [f's{i}' for i in range(20)]}, f)
    C = torchvision.datasets.CIFAR100
    monkeypatch.setattr(C, 'train_list', [['train', _md5(folder / 'train')]])
    monkeypatch.setattr(C, 'test_list', [['test', _md5(folder / 'test')]])
    monkeypatch.setattr(C, 'meta', dict(C.meta, md5=_md5(folder / 'meta')))
    return tmp_path


@pytest.fixture
def no_download(monkeypatch):
    def fail(*args, **kwargs):
        raise urllib.error.URLError('no network in tests')
    monkeypatch.setattr(torchvision.datasets.cifar, 'download_and_extract_archive', fail)


@pytest.mark.parametrize('recipe', ['cnn', 'vit'])
def test_cifar100(fake_cifar, no_download, recipe):
    train, val, mixup = data.build_loaders('cifar100', str(fake_cifar), img_size=32, batch_size=8,
                                           recipe=recipe, workers=0)
    assert (mixup is None) == (recipe == 'cnn')
    assert len(train) == 2  # 20 images, batch 8, drop_last
    batches = list(train)
    assert len(batches) == 2
    for x, y in batches + list(val):
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < 100
    if recipe == 'cnn':  # vit's random erasing fills with noise outside [0, 1]
        assert 0 <= x.min() and x.max() <= 1
    assert [len(y) for _, y in val] == [10]  # evaluation batches are 4x the training batch
    x, y = next(iter(val))
    assert 0 <= x.min() and x.max() <= 1


@pytest.mark.parametrize('recipe, train_split', [('cnn', True), ('cnn', False), ('vit', True)])
def test_transforms_give_unnormalised_images(recipe, train_split):
    """cnn and test pipelines drop timm's Normalize; vit's undoes it after RandAugment and erasing
    (whose fill and noise live in normalised space)."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    tf = data._transform('cifar100', 64, recipe, train_split)
    norms = [t for t in tf.transforms if isinstance(t, torchvision.transforms.Normalize)]
    assert len(norms) == (2 if recipe == 'vit' else 0)
    x = torchvision.transforms.functional.to_tensor(img)
    if norms:  # the second undoes the first
        assert torch.allclose(norms[1](norms[0](x.clone())), x, atol=1e-6)
    out = tf(img)
    assert out.shape == (3, 64, 64) and (recipe == 'vit' or 0 <= out.min() and out.max() <= 1)


@pytest.mark.parametrize('workers', [0, 2])
def test_cifar100_epoch_determinism(fake_cifar, no_download, workers):
    """Order and augmentation (RandomResizedCrop, flip, RandAugment, erasing) follow (seed, epoch),
    both in-process and in worker processes."""
    train, _, _ = data.build_loaders('cifar100', str(fake_cifar), 32, 8, recipe='vit', workers=workers)
    def first(epoch):
        data.set_epoch(train, epoch, seed=3)
        return next(iter(train))
    a, b, c = first(2), first(2), first(5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_timed_loader_counts_the_time_in_next_not_the_steps(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(data.time, 'perf_counter', lambda: clock[0])

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            clock[0] += 1  # a second to load an image
            return torch.zeros(1)
    loader = data.TimedLoader(Slow(), batch_size=1)
    for epoch in range(2):
        for batch in loader:
            clock[0] += 10  # a step: 10 seconds outside next(loader)
        assert loader.wait == 3  # this epoch's, not the run's


@pytest.mark.parametrize('cores, local, workers', [(8, None, 8), (8, '2', 4), (2, '4', 1)])
def test_default_workers_share_the_usable_cores_among_local_processes(monkeypatch, cores, local, workers):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(cores)), raising=False)
    if local:
        monkeypatch.setenv('LOCAL_WORLD_SIZE', local)
    else:
        monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    assert data.default_workers() == workers
    assert train.parser().parse_args(['--student', 'vit_mini']).workers == workers
    assert train.parser().parse_args(['--student', 'vit_mini', '--workers', '0']).workers == 0  # the flag wins

@pytest.mark.parametrize('dataset', ['cifar100', 'digits'])
def test_augmentation_is_per_image_whatever_the_workers_the_ranks_or_the_first_step(
        dataset, fake_cifar, no_download):
    """Each image is augmented from (seed, epoch, index): the batches do not depend on the loader
    workers, on the rank (two ranks' batches interleave into one process's batch of twice the
    size) or on where the epoch starts (set_epoch at step k gives the epoch's batches from k on,
    and loads only those)."""
    def epoch(workers=0, rank=0, world=1, batch=4, step=0):
        loader, _, _ = data.build_loaders(dataset, str(fake_cifar), 32, batch, recipe='vit',
                                          workers=workers, rank=rank, world_size=world, seed=3,
                                          train_fraction=0.016)
        data.set_epoch(loader, 1, 3, step)
        assert len(loader) == 20 // world // batch - step  # 20 images (digits: 1.6% of 1257)
        return [(x, y) for x, y in loader]
    same = lambda a, b: torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    whole = epoch()
    assert len(whole) == 5 and all(map(same, whole, epoch(workers=2)))
    assert all(map(same, whole[3:], epoch(workers=2, step=3)))
    ranks = [epoch(rank=r, world=2, batch=2) for r in (0, 1)]
    interleaved = [(torch.stack([a, b], 1).flatten(0, 1), torch.stack([y, z], 1).flatten())
                   for (a, y), (b, z) in zip(*ranks)]
    assert all(map(same, whole, interleaved))


def test_cifar100_missing(tmp_path, no_download):
    with pytest.raises(SystemExit, match='cifar-100-python'):
        data.build_loaders('cifar100', str(tmp_path / 'nowhere'), 32, 8, workers=0)


def _image_folder(root, n_classes=3, n_images=4):
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for c in range(n_classes):
            d = root / split / f'n{c:08d}'
            d.mkdir(parents=True)
            for i in range(n_images):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f'{i}.png')
    return root


@pytest.mark.parametrize('dataset', ['folder', 'imagenet'])
def test_image_folder(tmp_path, dataset):
    root = _image_folder(tmp_path)
    assert data.num_classes(dataset, str(root)) == 3 and data.NORM[dataset] is None
    train, val, mixup = data.build_loaders(dataset, str(root), img_size=32, batch_size=4,
                                           recipe='vit', workers=0)
    assert len(train) == 3 and mixup.num_classes == 3
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and y.max() < 3
    seen = torch.cat([y for _, y in val])
    assert sorted(seen.tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_image_folder_missing(tmp_path):
    with pytest.raises(SystemExit, match=str(tmp_path / 'train')):
        data.build_loaders('folder', str(tmp_path), 32, 8, workers=0)
    (tmp_path / 'train').mkdir()  # no class folder
    with pytest.raises(SystemExit, match='train/<class>'):
        data.num_classes('imagenet', str(tmp_path))
    (tmp_path / 'train' / 'a').mkdir(parents=True)
    with pytest.raises(SystemExit, match=str(tmp_path / 'val')):
        data.build_loaders('folder', str(tmp_path), 32, 8, workers=0)


def test_a_class_folder_without_images_is_one_sentence(tmp_path):
    root = _image_folder(tmp_path)
    empty = root / 'train' / 'n00000001'
    for image in empty.iterdir():
        image.unlink()
    (empty / 'notes.txt').write_text('not an image')
    with pytest.raises(SystemExit) as e:
        data.build_loaders('folder', str(root), 32, 4, workers=0)
    msg = str(e.value.code)
    assert str(empty) in msg and '.png' in msg and '\n' not in msg and msg.endswith('.'), msg


def test_unreadable_images_are_replaced_by_the_next_one_and_named_once(tmp_path, capfd):
    """A corrupt file (here random bytes) does not stop a run: its sample is the next image of
    the split, augmented from the corrupt one's key, so a resumed run and every rank agree."""
    root = _image_folder(tmp_path)  # 3 classes x 4 images per split
    bad, bad_val = root / 'train' / 'n00000001' / '1.png', root / 'val' / 'n00000001' / '3.png'
    for path in (bad, bad_val):
        path.write_bytes(np.random.default_rng(1).bytes(300))
    loader, val, _ = data.build_loaders('folder', str(root), 32, 4, recipe='vit', workers=2,
                                        seed=3)
    folder = loader.dataset.dataset
    k = [path for path, _ in folder.samples].index(str(bad))
    epochs = []
    for epoch in (1, 2):
        data.set_epoch(loader, epoch, 3)
        epochs.append(list(loader))
    assert [len(batches) for batches in epochs] == [3, 3] and loader.unreadable == 1
    assert torch.cat([y for _, y in val]).tolist() == [0] * 4 + [1] * 3 + [2] * 5  # the next one
    err = capfd.readouterr().err
    assert err.count(str(bad)) == 1 and err.count(str(bad_val)) == 1, err  # once, 2 epochs
    assert 'remove or fix it' in err
    row = list(loader.sampler).index((k, 3, 2))  # the corrupt image's place in epoch 2
    data.seed_globals(3, 2, k, cuda=False)
    path, label = folder.samples[k + 1]
    expected = folder.transform(folder.loader(path))
    x, y = epochs[1][row // 4]
    assert torch.equal(x[row % 4], expected) and y[row % 4] == label
    for path in (root / 'val').rglob('*.png'):
        path.write_bytes(b'not an image')
    with pytest.raises(SystemExit, match=f"No image in {root / 'val'} can be read"):
        data.build_loaders('folder', str(root), 32, 4, workers=0)


def _all_labels(loader):
    return torch.cat([y for _, y in loader])


def test_digits_split_and_determinism():
    train, val, mixup = data.build_loaders('digits', None, img_size=32, batch_size=64, seed=0)
    assert mixup is None and train.num_workers == 0
    n_train, n_val = len(train.dataset), len(val.dataset)
    assert n_train + n_val == 1797 and n_val == 540
    counts = torch.bincount(val.dataset.tensors[1], minlength=10)
    assert counts.min() >= 50 and counts.max() <= 56  # stratified: ~54 per class
    x, y = next(iter(train))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.5
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    # the split does not depend on the run seed
    train2, val2, _ = data.build_loaders('digits', None, 32, 64, seed=123)
    assert torch.equal(val.dataset.tensors[0], val2.dataset.tensors[0])
    assert torch.equal(train.dataset.dataset.tensors[0], train2.dataset.dataset.tensors[0])
    # order and augmentation are a function of (seed, epoch) only
    def first(loader, epoch, seed):
        data.set_epoch(loader, epoch, seed)
        return next(iter(loader))
    a, b, c = first(train, 3, 7), first(train2, 3, 7), first(train, 4, 7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # same samples in a different order would still differ: check the shift itself is seeded
    data.set_epoch(train, 3, 7)
    epoch = list(train)
    data.set_epoch(train, 3, 7)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(epoch, train))
    shifted = [train.dataset[(i, 7, e)][0] for i in range(10) for e in (3, 4)]
    assert not all(torch.equal(a, b) for a, b in zip(shifted[::2], shifted[1::2]))


def test_digits_train_fraction():
    full, _, _ = data.build_loaders('digits', None, 32, 16)
    sub, _, _ = data.build_loaders('digits', None, 32, 16, train_fraction=0.2, seed=1)
    sub2, _, _ = data.build_loaders('digits', None, 32, 16, train_fraction=0.2, seed=2)
    (x_full, _), (x, y), (x2, _) = (s.dataset.dataset.tensors for s in (full, sub, sub2))
    n = len(y)
    assert abs(n - 0.2 * len(x_full)) <= 1
    assert torch.equal(x, x2)  # fixed subset
    counts = torch.bincount(y, minlength=10)
    assert counts.min() >= n // 10 - 2 and counts.max() <= n // 10 + 2  # stratified
    # the subset is drawn from the training part, never from the val set
    full_rows = {tuple(r.flatten()[::7].tolist()) for r in x_full}
    assert all(tuple(r.flatten()[::7].tolist()) in full_rows for r in x)


def test_digits_vit_mixup():
    train, _, mixup = data.build_loaders('digits', None, 32, 16, recipe='vit')
    assert mixup is not None
    x, y = next(iter(train))
    xm, ym = mixup(x, y)
    assert xm.shape == x.shape and ym.shape == (16, 10)
    assert torch.allclose(ym.sum(1), torch.ones(16))
    assert ym.min() > 0  # label smoothing is folded in


def test_digits_distributed_shards():
    trains, vals = [], []
    for r in range(2):
        train, val, _ = data.build_loaders('digits', None, 32, 16, rank=r, world_size=2, seed=5)
        data.set_epoch(train, 1, 5)
        trains.append(list(train.sampler))
        vals.append(list(val.sampler))
        assert len(list(val)) == len(val)
    n_train, n_val = len(train.dataset), len(val.dataset)
    assert not set(trains[0]) & set(trains[1])
    assert len(trains[0]) == len(trains[1]) == n_train // 2
    assert sorted(vals[0] + vals[1]) == list(range(n_val))


def test_randaugment_posterize_zero_bits():
    """timm's RandAugment reaches posterize(bits=0) at magnitude 10, which Pillow >= 12 rejects."""
    from timm.data.auto_augment import AugmentOp
    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    out = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)(img)
    assert np.asarray(out).max() == 0
    assert np.asarray(AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=5)(img)).max() > 0


def test_bad_arguments():
    with pytest.raises(SystemExit, match='batch-size'):
        data.build_loaders('digits', None, 32, 5000)
    with pytest.raises(SystemExit, match='even'):
        data.build_loaders('digits', None, 32, 15, recipe='vit')


# ---------------------------------------------------------------- baseline losses vs hand-written references
def _rand(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _targets(B, C, seed=0):
    return torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(seed + 100))


def _softmax_np(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


# ---------------- OFA ----------------

@pytest.mark.parametrize('B,C,seed', [(1, 5, 0), (4, 10, 1), (16, 100, 2)])
@pytest.mark.parametrize('T', [1.0, 2.0])
def test_ofa_eps1_is_soft_target_ce(B, C, seed, T):
    s, t, y = _rand(B, C, seed=seed), _rand(B, C, seed=seed + 50), _targets(B, C, seed)
    ref = F.cross_entropy(s / T, F.softmax(t / T, -1))  # soft-target CE (probabilities as targets)
    assert torch.allclose(ofa(s, t, y, eps=1.0, T=T), ref, atol=1e-5)


def test_ofa_eps15_matches_loop():
    B, C = 3, 6
    s, t, y = _rand(B, C, seed=3), _rand(B, C, seed=4), _targets(B, C, 3)
    total = 0.0
    for b in range(B):
        ps, pt = _softmax_np(s[b].tolist()), _softmax_np(t[b].tolist())
        for c in range(C):
            onehot = 1.0 if c == int(y[b]) else 0.0
            total += -((pt[c] + onehot) ** 1.5 - onehot) * math.log(ps[c])
    assert abs(ofa(s, t, y, eps=1.5).item() - total / B) < 1e-4


def test_ofa_soft_targets_use_argmax():
    B, C = 8, 10
    s, t, y = _rand(B, C, seed=5), _rand(B, C, seed=6), _targets(B, C, 5)
    # mixup-like soft labels: 0.7 on y, 0.3 on another class, then label smoothing 0.1
    other = (y + 3) % C
    soft = 0.7 * F.one_hot(y, C).float() + 0.3 * F.one_hot(other, C).float()
    soft = soft * 0.9 + 0.1 / C
    for eps in (1.0, 1.5):
        assert torch.allclose(ofa(s, t, soft, eps=eps), ofa(s, t, y, eps=eps), atol=1e-6)
    assert not torch.allclose(ofa(s, t, soft, eps=1.5), ofa(s, t, other, eps=1.5))


# ---------------- DKD ----------------

def _dkd_loop(s, t, y, T):
    """Per-sample (KL(p_T||p_S), TCKD, NCKD, b_T) at temperature T, no T^2, by explicit loops in float64."""
    out = []
    for b in range(s.shape[0]):
        zs, zt, g = [v / T for v in s[b].tolist()], [v / T for v in t[b].tolist()], int(y[b])
        ps, pt = _softmax_np(zs), _softmax_np(zt)
        kl = sum(pt[c] * math.log(pt[c] / ps[c]) for c in range(len(zs)))
        bs, bt = [ps[g], 1 - ps[g]], [pt[g], 1 - pt[g]]
        tckd = sum(bt[k] * math.log(bt[k] / bs[k]) for k in range(2))
        idx = [c for c in range(len(zs)) if c != g]
        qs, qt = _softmax_np([zs[c] for c in idx]), _softmax_np([zt[c] for c in idx])
        nckd = sum(qt[k] * math.log(qt[k] / qs[k]) for k in range(len(idx)))
        out.append((kl, tckd, nckd, pt[g]))
    return np.array(out)


@pytest.mark.parametrize('T', [1.0, 4.0])
def test_dkd_parts_match_loop_and_identity(T):
    B, C = 6, 10
    s, t, y = _rand(B, C, seed=7), _rand(B, C, seed=8), _targets(B, C, 7)
    ref = _dkd_loop(s, t, y, T)
    tckd, nckd, bt = dkd_parts(s, t, y, T)
    assert np.allclose(tckd.numpy(), ref[:, 1], atol=1e-5)
    assert np.allclose(nckd.numpy(), ref[:, 2], atol=1e-5)
    assert np.allclose(bt.numpy(), ref[:, 3], atol=1e-6)
    # DKD Eq. 4, per sample, both sides WITHOUT T^2: KL(p_T || p_S) = TCKD + (1 - b_T) NCKD
    assert np.allclose(ref[:, 0], ref[:, 1] + (1 - ref[:, 3]) * ref[:, 2], atol=1e-9)
    assert np.allclose((tckd + (1 - bt) * nckd).numpy(), ref[:, 0], atol=1e-5)
    # batch form, both sides WITH T^2: kd(T) = T^2 mean(TCKD + (1 - b_T) NCKD), and dkd(1, 1) exceeds it by T^2 mean(b_T NCKD)
    assert torch.allclose(kd(s, t, T), (tckd + (1 - bt) * nckd).mean() * T * T, atol=1e-4)
    assert torch.allclose(dkd(s, t, y, alpha=1.0, beta=1.0, T=T) - kd(s, t, T), (bt * nckd).mean() * T * T, atol=1e-4)
    # the loss itself with the paper's alpha 1, beta 8
    assert abs(dkd(s, t, y, T=T).item() - T * T * (ref[:, 1] + 8 * ref[:, 2]).mean()) < 1e-3


def test_dkd_warmup_follows_the_dkd_authors_factor(tmp_path, monkeypatch):
    """mdistiller's DKD: loss * min(epoch / warmup, 1), epochs from 1. Ours is per step over a share of the run; with
    one step per epoch the two are the same numbers: 1/20 at the first step, 1/2 at the tenth, 1 from the 20th."""
    ref = lambda epoch: min(epoch / 20, 1.0)
    d = Distiller(models.create('resnet_mini', 10), models.create('resnet_mini', 10))
    d.ramps['dkd'] = 20 / 240
    for epoch in (1, 10, 19, 20, 21, 240):
        d.progress = epoch / 240  # the loop's progress after `epoch` of 240 steps
        assert abs(d.weight('dkd') - ref(epoch)) < 1e-12
    assert d.weight('ce') == 1.0 and d.weight('kd') == 1.0  # other terms have no ramp
    seen = []  # the real loop: progress after each step, and the weight the DKD term got in the total
    forward = Distiller.forward

    def recording_forward(self, images, targets):
        if 'dkd' in self.ramps:  # not the teacher's own CE run, which trains first
            seen.append(self.weight('dkd'))
        return forward(self, images, targets)
    monkeypatch.setattr(Distiller, 'forward', recording_forward)
    args = TINY + ['--teacher', 'resnet_mini', '--student', 'resnet_mini', '--method', 'dkd', '--epochs', '2',
                   '--train-fraction', '0.1', '--dkd-warmup', '0.5', '--eval-every', '2',
                   '--teacher-dir', str(tmp_path / 'teachers')]
    train.main(args + ['--out', str(tmp_path / 'run')])
    steps = len(seen) // 2  # 2 epochs, one share each: the first epoch is the warm-up
    assert seen == pytest.approx([min((j + 1) / steps, 1.0) for j in range(2 * steps)])


def test_dkd_extreme_logits_finite():
    s, t = _rand(4, 10, seed=9, scale=200.0), _rand(4, 10, seed=10, scale=200.0)
    y = _targets(4, 10, 9)
    s = s.clone().requires_grad_()
    loss = dkd(s, t, y, T=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert dkd(t, t, y).abs().item() < 1e-5


# ---------------- DIST ----------------

def test_dist_zero_for_identical_positive_otherwise():
    s, t = _rand(8, 10, seed=11), _rand(8, 10, seed=12)
    assert dist(s, s).abs().item() < 1e-6
    assert dist(s, s, tau=4.0).abs().item() < 1e-6
    assert dist(s, t).item() > 0.1


@pytest.mark.parametrize('beta,gamma,tau', [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_numpy_corrcoef(beta, gamma, tau):
    B, C = 8, 10
    s, t = _rand(B, C, seed=13), _rand(B, C, seed=14)
    ps = np.stack([_softmax_np(r) for r in (s / tau).tolist()])
    pt = np.stack([_softmax_np(r) for r in (t / tau).tolist()])
    inter = 1 - np.mean([np.corrcoef(ps[i], pt[i])[0, 1] for i in range(B)])
    intra = 1 - np.mean([np.corrcoef(ps[:, c], pt[:, c])[0, 1] for c in range(C)])
    ref = (beta * inter + gamma * intra) * tau ** 2
    assert abs(dist(s, t, beta, gamma, tau).item() - ref) < 1e-4


# ---------------- RKD / CC ----------------

def _rkd_loop(s, t, w_dist, w_angle):
    s, t = s.double().numpy(), t.double().numpy()
    B = len(s)

    def huber(a, b):
        d = abs(a - b)
        return 0.5 * d * d if d < 1 else d - 0.5

    def dists(e):
        d = np.array([[np.sqrt(((e[i] - e[j]) ** 2).sum()) for j in range(B)] for i in range(B)])
        return d / (d.sum() / (B * (B - 1)))

    def angles(e):
        a = np.zeros((B, B, B))
        for i in range(B):
            for j in range(B):
                for k in range(B):
                    u, v = e[j] - e[i], e[k] - e[i]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    a[i, j, k] = 0.0 if nu == 0 or nv == 0 else u @ v / (nu * nv)
        return a

    ds, dt, as_, at = dists(s), dists(t), angles(s), angles(t)
    ld = np.mean([huber(x, y) for x, y in zip(ds.ravel(), dt.ravel())])
    la = np.mean([huber(x, y) for x, y in zip(as_.ravel(), at.ravel())])
    return w_dist * ld + w_angle * la


def test_rkd_matches_loop_zero_and_scale_invariant():
    s, t = _rand(5, 7, seed=15, scale=1.0), _rand(5, 12, seed=16, scale=1.0)  # different dims on purpose
    assert abs(rkd(s, t).item() - _rkd_loop(s, t, 25.0, 50.0)) < 1e-4
    assert abs(rkd(s, t, 1.0, 2.0).item() - _rkd_loop(s, t, 1.0, 2.0)) < 1e-5
    assert rkd(s, s).abs().item() < 1e-6
    assert rkd(s, 7.5 * s).abs().item() < 1e-5
    assert torch.allclose(rkd(s, 3.0 * t), rkd(s, t), atol=1e-5)
    assert rkd(s, t).item() > 0


def test_cc_matches_loop_and_zero():
    s, t = _rand(5, 7, seed=17, scale=1.0), _rand(5, 12, seed=18, scale=1.0)
    sn, tn = s.double().numpy(), t.double().numpy()
    B, tot = len(sn), 0.0
    for i in range(B):
        for j in range(B):
            cs = sn[i] @ sn[j] / (np.linalg.norm(sn[i]) * np.linalg.norm(sn[j]))
            ct = tn[i] @ tn[j] / (np.linalg.norm(tn[i]) * np.linalg.norm(tn[j]))
            tot += (cs - ct) ** 2
    assert abs(cc(s, t).item() - tot / B ** 2) < 1e-6
    assert cc(s, s).abs().item() < 1e-6
    assert cc(s, t).item() > 0


# ---------------- common ----------------

def _calls(dtype):
    B, C, D = 6, 10, 8
    s, t, y = _rand(B, C, seed=19).to(dtype), _rand(B, C, seed=20).to(dtype), _targets(B, C, 19)
    es, et = _rand(B, D, seed=21, scale=1.0).to(dtype), _rand(B, 2 * D, seed=22, scale=1.0).to(dtype)
    return [
        (lambda x: dkd(x, t, y), s),
        (lambda x: dist(x, t), s),
        (lambda x: ofa(x, t, y, eps=1.5), s),
        (lambda x: ofa(x, t, F.one_hot(y, C).float() * 0.9 + 0.01), s),
        (lambda x: rkd(x, et), es),
        (lambda x: cc(x, et), es),
    ]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_scalar_float32_and_grad_flows(dtype):
    for fn, x in _calls(dtype):
        x = x.clone().requires_grad_()
        loss = fn(x)
        assert loss.dim() == 0 and loss.dtype == torch.float32
        loss.backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------- teacher checkpoints: files written by timm 0.6.5 (tests/fixtures), releases, timm's weights ----
FIXTURES = os.path.join(HERE, 'tests', 'fixtures')
FIXTURE_SPEC = json.load(open(os.path.join(FIXTURES, 'fixtures.json')))
TIMM065 = torch.load(os.path.join(FIXTURES, 'expected.pth'), weights_only=True)  # input and timm 0.6.5's logits


def timm065_arch(monkeypatch, family):
    """Register the fixture's architecture (as timm 0.6.5 built it) under a models.MODELS name: what --teacher takes."""
    from timm.layers import get_act_layer
    from timm.models import EfficientNet, MlpMixer, mlp_mixer
    from timm.models._efficientnet_builder import decode_arch_def
    spec = FIXTURE_SPEC[family]
    kw = {k: getattr(mlp_mixer, v) if k in ('block_layer', 'norm_layer') else v for k, v in spec['kwargs'].items()}
    if family == 'mobilenet':  # timm's block builder consumes the decoded block args: decode them per build
        arch, act = kw.pop('arch_def'), get_act_layer(kw.pop('act_layer'))
        model = lambda **k: EfficientNet(decode_arch_def(arch), act_layer=act, **k)
    else:
        model = {'MlpMixer': MlpMixer}.get(spec['model'], spec['model'])
    monkeypatch.setitem(models.MODELS, f'timm065_{family}', (model, kw))
    return f'timm065_{family}'


def teacher_logits(name, weights, classes=10):
    """Logits of a teacher loaded the way train.build loads --teacher-ckpt (models.create)."""
    net = models.create(name, classes, weights=weights).net.eval()
    with torch.no_grad():
        return net(TIMM065['input'])


def assert_logits(got, want, family):
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * max(1.0, want.abs().max().item()), msg=family)


@pytest.mark.parametrize('family', list(FIXTURE_SPEC))
def test_timm065_checkpoints_give_timm065_logits(family, monkeypatch):
    name, path = timm065_arch(monkeypatch, family), os.path.join(FIXTURES, family)
    raw, ema = TIMM065[family]['raw'], TIMM065[family]['ema']
    assert (raw - ema).abs().max() > 1e-2  # the fixture can tell which weights were loaded
    assert_logits(teacher_logits(name, path + '.pth'), raw, family)  # plain state_dict
    assert_logits(teacher_logits(name, path + '.pth.tar'), raw, family)  # CheckpointSaver: its raw state_dict
    assert_logits(teacher_logits(name, path + '.pth.tar:ema'), ema, family)  # ... and its state_dict_ema
    with pytest.raises(SystemExit, match='holds no EMA weights'):
        teacher_logits(name, path + '.pth:ema')


def test_official_release_formats_load(tmp_path, monkeypatch):
    """Facebook's ConvNeXt ({'model': ...}, downsample_layers.* and pwconv names), DeiT's and Swin's ({'model': ...};
    timm 0.6.5's Swin names are the original Swin's) go through timm's own filters."""
    import re
    sd = torch.load(os.path.join(FIXTURES, 'convnext.pth'), weights_only=True)
    for a, b in [(r'^stem\.', 'downsample_layers.0.'), (r'stages\.(\d+)\.downsample\.', r'downsample_layers.\1.'),
                 (r'stages\.(\d+)\.blocks\.', r'stages.\1.'), ('conv_dw', 'dwconv'), (r'mlp\.fc', 'pwconv'),
                 (r'^head\.norm', 'norm'), (r'^head\.fc', 'head')]:  # timm's names -> Facebook's
        sd = {re.sub(a, b, k): v for k, v in sd.items()}
    assert any(k.startswith('downsample_layers.1.') for k in sd) and 'head.weight' in sd and 'norm.weight' in sd
    for family, state in (('convnext', sd), ('vit', None), ('swin', None)):
        state = state or torch.load(os.path.join(FIXTURES, f'{family}.pth'), weights_only=True)
        torch.save({'model': state, 'epoch': 299}, tmp_path / f'{family}_release.pth')
        got = teacher_logits(timm065_arch(monkeypatch, family), str(tmp_path / f'{family}_release.pth'))
        assert_logits(got, TIMM065[family]['raw'], family)


def test_checkpoint_saver_args_are_allowed_but_nothing_else(tmp_path, monkeypatch):
    name = timm065_arch(monkeypatch, 'convnext')
    with pytest.raises(pickle.UnpicklingError):  # timm 0.6.5's file: plain weights_only=True refuses its Namespace
        torch.load(os.path.join(FIXTURES, 'convnext.pth.tar'), weights_only=True)
    assert_logits(teacher_logits(name, os.path.join(FIXTURES, 'convnext.pth.tar')), TIMM065['convnext']['raw'], 'cnx')
    import argparse
    sd = torch.load(os.path.join(FIXTURES, 'convnext.pth'), weights_only=True)
    torch.save({'state_dict': sd, 'args': argparse.Namespace(model=CodePayload(tmp_path / 'ran'))}, tmp_path / 'p.tar')
    with pytest.raises(SystemExit, match='pickled code') as e:
        models.create(name, 10, weights=str(tmp_path / 'p.tar'))
    assert not (tmp_path / 'ran').exists() and str(e.value.code).endswith('.')
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # allowed while loading only


def test_teacher_ckpt_timm_loads_timms_pretrained_weights(tmp_path, monkeypatch):
    """'--teacher-ckpt timm' goes through timm.create_model(pretrained=True); offline, timm's pretrained config overlay
    points it at a local file instead of the Hugging Face hub."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)  # nothing may touch the network
    arch = dict(layers=(1, 1, 1, 1), channels=(4, 8, 8, 16), stem_type='deep', stem_width=4)
    torch.manual_seed(3)
    weights = models.create('resnet18', 1000, **arch).net.state_dict()
    torch.save(weights, tmp_path / 'in1k.pth')
    monkeypatch.setitem(models.MODELS, 'tiny_in1k', ('resnet18', dict(arch, pretrained_cfg_overlay=dict(
        file=str(tmp_path / 'in1k.pth')))))
    loaded = models.create('tiny_in1k', 1000, weights='timm').net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    import safetensors.torch  # the hub's own file (model.safetensors) given as --teacher-ckpt works as well
    safetensors.torch.save_file(weights, tmp_path / 'model.safetensors')
    loaded = models.create('tiny_in1k', 1000, weights=str(tmp_path / 'model.safetensors')).net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    args = train.parser().parse_args(['--teacher', 'tiny_in1k', '--student', 'vit_mini', '--teacher-ckpt', 'timm', '--out',
                           str(tmp_path / 'run')])
    train.resolve(args)  # the spelling passes the flag checks, and train.build refuses it for 10 classes
    with pytest.raises(SystemExit) as e:
        train.build(args, 10)
    msg = str(e.value.code)
    assert '1000-class' in msg and 'not 10 classes' in msg and msg.endswith('.') and '\n' not in msg
    monkeypatch.setitem(models.MODELS, 'tiny_other', ('resnet18', dict(arch, channels=(8, 8, 8, 16),
                        pretrained_cfg_overlay=dict(file=str(tmp_path / 'in1k.pth')))))
    with pytest.raises(SystemExit, match='no ImageNet weights that fit tiny_other: Error'):  # weights of another shape
        models.create('tiny_other', 1000, weights='timm')
    # --pretrained starts the student of any method from timm's weights (a new head for 10 classes)
    args = train.resolve(train.parser().parse_args(['--teacher', 'vit_mini', '--student', 'tiny_in1k', '--pretrained',
                                         '--method', 'kd', '--teacher-ckpt', 'random', '--img-size', '32',
                                         '--out', str(tmp_path / 'kd')]))
    student = train.build(args, 10).student.net.state_dict()
    assert all(torch.equal(student[k], v) for k, v in weights.items() if not k.startswith('fc.'))
    with pytest.raises(SystemExit, match='mixer_mini has no timm pretrained weights'):  # was silently random
        train.build(train.parser().parse_args(['--student', 'mixer_mini', '--method', 'ce', '--pretrained']), 10)


def test_pretrained_offline_stops_with_one_sentence(tmp_path, monkeypatch):
    import time
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hf'))  # empty cache
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        train.main(['--student', 'resnet18', '--method', 'ce', '--pretrained', '--img-size', '32', '--out',
                    str(tmp_path / 'run')])
    msg = str(e.value.code)
    assert time.time() - t0 < 30 and msg.endswith('.') and '\n' not in msg, msg
    for words in ('could not fetch', 'timm/resnet18', str(tmp_path / 'hf'), 'pretrained_cfg_overlay', '--teacher-ckpt'):
        assert words in msg, (words, msg)
    assert not (tmp_path / 'run').exists()


def test_eval_reads_checkpoint_saver_ema(monkeypatch, capsys):
    name, batch = timm065_arch(monkeypatch, 'resnet'), (TIMM065['input'], torch.arange(2))
    monkeypatch.setattr(evaluate_script.data, 'build_loaders', lambda *a, **k: (None, [batch], None))  # one batch
    evaluate_script.main(['--model', name, '--ckpt', os.path.join(FIXTURES, 'resnet.pth.tar:ema'), '--img-size', '32'])
    assert 'top-1' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='holds no EMA weights'):
        evaluate_script.main(['--model', name, '--ckpt', os.path.join(FIXTURES, 'resnet.pth:ema'), '--img-size', '32'])


# ---------------------------------------------------- paper.py, paper_numbers.csv
PAPER_CSV = os.path.join(HERE, 'paper_numbers.csv')


def test_paper_numbers_give_the_papers_average_rows_and_cite_each_number():
    """The transcription checked against the paper itself: Tables 1-2 end with the mean gain of
    each method over the student from scratch, which the transcribed cells give back."""
    rows = list(csv.DictReader(open(PAPER_CSV, newline='')))
    keys = [(r['table'], r['pair'], r['config'], r['metric']) for r in rows]
    assert len(keys) == len(set(keys))
    for r in rows:  # the arXiv versions the numbers were read from; FBT's beside FOFA's in Tables 1-2
        fbt = r['config'] == 'fbt' and r['table'] in ('1', '2')
        paper_of_number = 'FBT, arXiv 2410.12342' if fbt else 'FOFA, arXiv 2501.08885'
        assert r['source'] == f"{paper_of_number}, Table {r['table']}", r
    averages = [r for r in rows if r['pair'] == 'average']
    assert len(averages) == 9 + 1 + 9  # Table 1 and FBT's, Table 2
    for avg in averages:  # S.: FOFA's column (FBT prints the same)
        top1 = {(r['pair'], r['config']): float(r['value']) for r in rows
                if r['table'] == avg['table'] and r['metric'] == 'top1'}
        pairs = {p for p, c in top1 if c == avg['config']}
        gain = statistics.mean(top1[p, avg['config']] - top1[p, 'scratch'] for p in pairs)
        assert len(pairs) == {'1': 12, '2': 4}[avg['table']], avg
        assert abs(gain - float(avg['value'])) < 0.006, avg  # printed to 2 decimals


FAKE_TRAIN = """import json, os, sys
out, epochs = sys.argv[sys.argv.index('--out') + 1], sys.argv[sys.argv.index('--epochs') + 1]
with open(os.path.join(out, 'log.jsonl'), 'a') as f:
    f.write(json.dumps({'epoch': int(epochs), 'gpu': os.environ.get('CUDA_VISIBLE_DEVICES')}) + '\\n')
print('top-1 99.00')
"""  # stands in for train.py: the run is finished at once


def test_paper_lists_skips_finished_resumes_interrupted_and_shares_the_gpus(tmp_path, capsys, monkeypatch):
    runs = tmp_path / 'runs' / 'cifar100' / 'convnext_t-deit_t'
    for seed, epochs in ((0, 300), (1, 7)):  # seed 1 stopped after epoch 7, seed 2 never ran
        log = ''.join(json.dumps({'epoch': e + 1, 'top1': 1.0}) + '\n' for e in range(epochs))
        (runs / 'fofa' / f'seed{seed}').mkdir(parents=True)
        (runs / 'fofa' / f'seed{seed}' / 'log.jsonl').write_text(log)
    (runs / 'fofa' / 'seed1' / 'last.pt').write_bytes(b'')
    at = ['--runs', str(tmp_path / 'runs')]
    paper.main(['4', '--list', '--gpus', '2'] + at)
    out = capsys.readouterr().out
    assert out.count('global batch 128 = 2 GPU(s) x 64') == 12
    assert 'convnext_t-deit_t/fofa seed 0: global batch 128 = 2 GPU(s) x 64, done' in out
    assert '# Table 4: 11 runs to do' in out and '--workers' not in out  # workers: train.py's default
    lines = out.splitlines()
    resumed = lines[lines.index('# cifar100 convnext_t-deit_t/fofa seed 1: global batch 128 = 2 '
                                'GPU(s) x 64, resumes after epoch 7') + 1]
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
              os.path.relpath(paper.TRAIN)]
    assert resumed.startswith(shlex.join(launch + ['--teacher', 'convnext_t', '--teacher-ckpt',
                                                   'teachers/convnext_tiny_cifar100.pth', '--student', 'deit_t']))
    assert resumed.endswith(f"--seed 1 --out {runs / 'fofa' / 'seed1'} --resume")
    for table, config, flags in (('4', 'raa', '--method fofa --afp-stages none'),
                                 ('4', 'afp_nofb', '--no-feedback'),
                                 ('5', 'afp134', '--afp-stages 1,3,4'), ('6', 'nq36', '--nq 36'),
                                 ('1', 'hcd', '--method hcd --dataset cifar100'),
                                 ('2', 'fofa', '--method fofa --nq 144 --dataset imagenet')):
        paper.main([table, '--list', '--only', f'^convnext_t-deit_t/{config}$', '--seeds', '0'] + at)
        out = capsys.readouterr().out
        assert flags in out and out.count('\n') == 3, out
    paper.main(['2', '--list', '--only', '^swin_t-resnet18/kd$', '--seeds', '0', '--imagenet', 'in1k'] + at)
    out = capsys.readouterr().out
    assert 'swin_tiny_patch4_window7_224.ms_in1k --teacher-ckpt timm' in out and '--data-dir in1k' in out
    assert '--lr 0.1 --wd 1e-4' in out and 'global batch 256' in out and '--epochs 100' in out
    fake = tmp_path / 'fake_train.py'
    fake.write_text(FAKE_TRAIN)
    monkeypatch.setattr(paper, 'TRAIN', str(fake))
    paper.main(['6', '--parallel', '2'] + at)  # 2 at once
    out = capsys.readouterr().out
    assert out.count('\nstarted ') == 14 and out.count(': top-1 99.00\n') == 14 and 'all runs finished' in out
    assert (runs / 'nq36' / 'seed2' / 'train.log').read_text() == 'top-1 99.00\n'  # each run's output
    gpus = {json.loads(open(log).readlines()[-1]).get('gpu') for log in runs.glob('*/seed*/log.jsonl')}
    assert gpus == {'0', '1', None}  # each worker on a GPU of its own; None: the run done before
    paper.main(['6', '--list'] + at)
    assert capsys.readouterr().out.count(', done\n') == 15
    fake.write_text('import sys; print("no GPU here"); sys.exit(1)')
    with pytest.raises(SystemExit, match='3 of 3 runs failed: see the FAILED lines'):
        paper.main(['4', '--only', 'raa', '--seeds', '0', '1', '2'] + at)
    assert capsys.readouterr().out.count(': no GPU here\n') == 3


def test_paper_dry_run_builds_and_steps_every_pair_and_method(tmp_path, capsys):
    """Table 1's twelve pairs with FOFA and one pair with every method, each built at 224 px and
    trained two steps on CPU (fake CIFAR-100, random teachers): a cell that cannot fails here."""
    only = '/fofa$|^convnext_t-deit_t/|^scratch-deit_t/'
    (tmp_path / 'tmp').mkdir()
    r = subprocess.run([sys.executable, 'paper.py', '1', '--dry-run', '--only', only, '--parallel', '2'],
                       cwd=HERE, capture_output=True, text=True, timeout=900,
                       env={**CPU_ENV, 'TMPDIR': str(tmp_path / 'tmp')})  # 2 processes of a thread each
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count(': ok, 224 px, loss ') == 22 and '# Table 1: 22 of 22 cells built and stepped' in r.stdout
    assert 'cifar100 mixer_b16-swin_p/fofa (global batch 128): ok' in r.stdout
    assert not [p for p in os.listdir(tmp_path / 'tmp') if not p.startswith('pymp-')]  # fake data and runs gone
    # a cell's line: ok with its input size and loss, or train.py's sentence; its run directory is removed
    tiny = ['--teacher', 'convnext_mini', '--student', 'vit_mini', '--teacher-ckpt', 'random', '--dim', '32',
            '--epochs', '1', '--train-fraction', '0.01', '--batch-size', '2', '--workers', '0', '--out',
            str(tmp_path / 'c')]
    assert paper.dry_run_cell('mini', tiny) and not (tmp_path / 'c').exists()
    assert not paper.dry_run_cell('bad', tiny + ['--nq', '50'])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('mini: ok, 32 px, loss ') and lines[1].startswith("bad: FAIL: --nq: '50' is not")


def test_paper_compare_puts_our_cells_beside_the_papers(tmp_path, capsys):
    def run(path, epochs, done=2):  # epochs: (raw, EMA) top-1 per epoch; done: its --epochs
        path.mkdir(parents=True)
        path.joinpath('args.json').write_text(json.dumps({'epochs': done}))
        path.joinpath('log.jsonl').write_text(''.join(json.dumps(
            {'epoch': e + 1, 'top1': raw, 'top1_ema': ema, 'teacher_top1': 95.0, 'skipped_steps': 0,
             'peak_mem_gb': 10.0 + 2 * e}) + '\n' for e, (raw, ema) in enumerate(epochs)))
    c100 = tmp_path / 'cifar100'
    run(c100 / 'scratch-resnet18' / 'ce' / 'seed0', [(70.0, None), (74.0, None)])
    run(c100 / 'scratch-resnet18' / 'ce' / 'seed1', [(72.0, None), (76.0, None)])
    run(c100 / 'swin_t-resnet18' / 'fofa' / 'seed0', [(70.0, 80.0), (79.0, 78.0)])  # best: EMA's
    run(c100 / 'swin_t-resnet18' / 'fofa' / 'seed1', [(75.0, 82.0), (81.0, 80.0)])
    run(c100 / 'swin_t-resnet18' / 'kd' / 'seed0', [(70.0, None)])  # still running
    run(c100 / 'convnext_t-deit_t' / 'nq36' / 'seed0', [(70.0, None), (79.5, None)])
    paper.main(['1', '--compare', '--runs', str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith('| swin_t -> resnet18 |'))
    assert row.startswith('| swin_t -> resnet18 | 95.00 / 89.26 (+5.74) | '
                          '75.00 ± 1.41 / 74.01 (+0.99) | - / 78.74 |')  # T., S. (ce), KD
    assert row.endswith('| 81.00 ± 1.41 / 81.22 (-0.22) | - / 81.61 | - / - |')  # FOFA, FBT, HCD
    row = next(line for line in lines if line.startswith('| convnext_t -> deit_t |'))
    assert '| - / 65.94 | - / 79.59 |' in row  # CRD (not implemented here), FOFA
    gains = next(line for line in lines if line.startswith('| average gain'))
    assert '| - / 3.17 |' in gains and '| 6.00 / 8.17 (-2.17) (1) |' in gains  # KD; FOFA: 1 pair
    assert 'left out, swin_t-resnet18/kd: 0 diverged, 1 unfinished' in lines
    assert any('Acc 80.49' in line for line in lines)  # the notes
    paper.main(['1', '--compare', '--runs', str(tmp_path), '--metric', 'last'])
    assert '| 80.00 ± 1.41 / 81.22 (-1.22) |' in capsys.readouterr().out  # the last raw top-1
    paper.main(['6', '--compare', '--runs', str(tmp_path)])
    out = capsys.readouterr().out
    assert '| 36 | 79.50 / 79.03 (+0.47) | 12.00 / 13.79 (-1.79) |' in out  # memory: its peak
    assert '| 80 | - / 80.14 | - / 14.37 |' in out and '| 100 | - / - | - / - |' in out
    assert 'left out' not in out  # the unfinished kd run is no cell of Table 6
    with pytest.raises(SystemExit, match='holds no finished runs'):
        paper.main(['2', '--compare', '--runs', str(tmp_path)])  # no imagenet/ runs


# ---------------------------------------------------------------- the docs cannot drift from the flags
SCRIPTS = ('train.py', 'bench.py', 'eval.py', 'report.py', 'paper.py')


def doc_commands(path):
    """(script, argv) of every command of the project's scripts (SCRIPTS) in a markdown file: code blocks
    (continuation lines joined, `for X in a b; do ...; done` expanded over its values) and inline code."""
    text = open(path).read()
    blocks = re.findall(r'```[a-z]*\n(.*?)```', text, re.S)
    lines = [line for b in blocks for line in b.replace('\\\n', ' ').splitlines()]
    prose = re.sub(r'```.*?```', '', text, flags=re.S)
    lines += re.findall(r'`((?:python|torchrun) [^`\n]*)`', prose)
    commands, variables = [], dict(re.findall(r'^(\w+)="([^"]*)"$', '\n'.join(lines), re.M))
    for line in lines:
        loop = re.match(r'\s*for (\w+) in ([^;]+); do (.*); done', line)
        bodies = [line]
        if loop:
            bodies = [loop.group(3).replace(f'${loop.group(1)}', v) for v in loop.group(2).split()]
        for body in (b for b in bodies if re.search(r'\b(train|bench|eval|report|paper)\.py', b)):
            for name, value in variables.items():  # NAME="..." lines of the same file
                body = body.replace(f'${name}', value)
            tokens = shlex.split(body.split(';')[0].split('|')[0], comments=True)
            for i, token in enumerate(tokens):
                if token in SCRIPTS and '...' not in tokens:
                    commands.append((token, [t for t in tokens[i + 1:] if not t.startswith('>')]))
    return commands


@pytest.mark.parametrize('doc', ['README.md', 'RESULTS.md'])
def test_every_command_in_the_docs_parses_with_the_projects_parsers(doc):
    import bench
    parsers = {'train.py': train.parser, 'bench.py': bench.parser, 'eval.py': evaluate_script.parser,
               'report.py': report.parser, 'paper.py': paper.parser}
    commands = doc_commands(os.path.join(HERE, doc))
    scripts = {script for script, _ in commands}
    assert scripts >= (set(SCRIPTS) if doc == 'README.md' else {'eval.py', 'report.py'})
    for script, argv in commands:
        if script == 'bench.py' and '--selfcheck' in argv:
            argv = argv + ['--student', '']  # bench.py takes the pairs from --pairs there
        try:
            parsers[script]().parse_args(argv)
        except SystemExit as e:  # --help exits with 0
            assert e.code == 0, f'{doc}: {script} {" ".join(argv)}: {e}'
