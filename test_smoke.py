"""CPU tests, no downloads: python -m pytest -q test_smoke.py"""
import math

import pytest
import torch
import torch.nn.functional as F

import models
from fofa import FOFA, RAA
from losses import hcl, kd

torch.set_num_threads(2)

# notes/official_code.md section 2: stage outputs (C, H, W) at 224
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


@pytest.mark.parametrize('name', PAPER_SHAPES)
def test_paper_stage_shapes(name):
    net = models.create(name, num_classes=100)
    assert net.shapes(224)[1] == PAPER_SHAPES[name]


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
    net = models.create('vit_mini', 10)
    tokens = torch.randn(2, 1 + 64, 96)
    m = net.to_map(tokens)
    assert torch.equal(m[:, :, 2, 5], tokens[:, 1 + 2 * 8 + 5])  # patch (row 2, col 5) is token 1 + 2*8 + 5
    assert torch.equal(net.from_map(m, tokens), tokens)


def test_unknown_model_and_bad_nq_are_clear_errors():
    with pytest.raises(ValueError, match='known: resnet18'):
        models.create('resnet_typo', 10)
    for nq in (0, 50, 63, 65):
        with pytest.raises(ValueError, match='4\\*k\\*k'):
            RAA([(8, 4, 4)] * 4, [(8, 4, 4)] * 4, nq=nq)
    assert RAA([(8, 4, 4)] * 4, [(8, 4, 4)] * 4, nq=36, dim=32, heads=4)([torch.rand(2, 8, 4, 4)] * 4)[0].shape \
        == (2, 8, 4, 4)


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
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    mse = lambda a, b: ((a - b) ** 2).mean()
    pool = lambda x, n: x.unflatten(3, (n, 8 // n)).unflatten(2, (n, 8 // n)).mean((3, 5))
    expected = (mse(fs, ft) + 0.5 * mse(pool(fs, 4), pool(ft, 4)) + 0.25 * mse(pool(fs, 2), pool(ft, 2))
                + 0.125 * mse(pool(fs, 1), pool(ft, 1))) / 1.875
    torch.testing.assert_close(hcl(fs, ft), expected)
    small_s, small_t = fs[..., :2, :2], ft[..., :2, :2]  # 2x2 maps: only the 1x1 level is smaller than the map
    expected = (mse(small_s, small_t) + 0.125 * mse(small_s.mean((2, 3)), small_t.mean((2, 3)))) / 1.125
    torch.testing.assert_close(hcl(small_s, small_t), expected)
