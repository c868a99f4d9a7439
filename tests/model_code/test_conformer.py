"""ConformerCTC shapes, padding invariance, ONNX parity; SpecAugment behaviour."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_code.conformer import (
    ConformerCTC,
    Conv2dNHWC,
    Dropout,
    SpecAugment,
    count_parameters,
    normalize_features,
    packed_dropout,
    sinusoidal_positions,
    subsampled_lengths,
    valid_mask,
)

KW = dict(n_mels=80, vocab_size=29, d_model=32, n_layers=2, n_heads=4, ff_mult=2, conv_kernel=7,
          dropout=0.1, subsampling_channels=16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ConformerCTC(**KW).eval()


def test_shapes_and_log_probs(model):
    x = torch.randn(3, 101, 80)
    lens = torch.tensor([101, 77, 5])
    with torch.no_grad():
        lp, ol = model(x, lens)
    assert lp.shape == (3, 26, 29)
    assert ol.tolist() == subsampled_lengths(lens).tolist() == [26, 20, 2]
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3, 26), atol=1e-5)
    assert count_parameters(model) > 10_000


def test_padding_does_not_change_valid_outputs(model):
    """An utterance padded in a batch gives the same log-probs as alone (masks everywhere)."""
    torch.manual_seed(1)
    x = torch.randn(2, 120, 80) * 4 + 3
    lens = torch.tensor([120, 70])
    x[1, 70:] = 1000.0  # garbage in the padding must not leak
    with torch.no_grad():
        lp, ol = model(x, lens)
        alone, _ = model(x[1:2, :70], lens[1:2])
    assert torch.allclose(lp[1, : ol[1]], alone[0], atol=1e-4)


def test_feature_normalization_inside_model(model):
    """Scaling/shifting the input features per utterance does not change the output."""
    x = torch.randn(1, 64, 80)
    lens = torch.tensor([64])
    with torch.no_grad():
        a, _ = model(x, lens)
        b, _ = model(x * 3.0 + 7.0, lens)
    assert torch.allclose(a, b, atol=1e-3)


def test_onnx_export_matches_onnxruntime(model, tmp_path):
    path = tmp_path / "m.onnx"
    x = torch.randn(2, 64, 80)
    lens = torch.tensor([64, 40])
    torch.onnx.export(
        model, (x, lens), str(path), dynamo=False, opset_version=17,
        input_names=["feats", "lengths"], output_names=["log_probs", "out_lengths"],
        dynamic_axes={"feats": {0: "batch", 1: "time"}, "lengths": {0: "batch"},
                      "log_probs": {0: "batch", 1: "time_out"}, "out_lengths": {0: "batch"}},
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(3)
    for b, t in [(3, 157), (1, 41)]:  # neither equals the export shape (2, 64)
        feats = torch.randn(b, t, 80, generator=gen) * 3 + 2
        lens = torch.full((b,), t, dtype=torch.long)
        lens[1:] = torch.randint(t // 2, t, (b - 1,), generator=gen)
        with torch.no_grad():
            lp, ol = model(feats, lens)
        got_lp, got_ol = sess.run(None, {"feats": feats.numpy(), "lengths": lens.numpy()})
        assert got_lp.shape == tuple(lp.shape)
        np.testing.assert_array_equal(got_ol, ol.numpy())
        for i in range(b):  # compare valid frames only
            n = int(ol[i])
            np.testing.assert_allclose(got_lp[i, :n], lp[i, :n].numpy(), atol=1e-4, rtol=0)


def test_gradients_flow():
    torch.manual_seed(0)
    m = ConformerCTC(**KW).train()
    x = torch.randn(2, 50, 80)
    lens = torch.tensor([50, 33])
    lp, ol = m(x, lens)
    tgt = torch.randint(1, 29, (2, 5))
    loss = torch.nn.functional.ctc_loss(lp.transpose(0, 1), tgt, ol, torch.tensor([5, 4]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_specaugment_train_only_seeded_and_within_length():
    sa = SpecAugment(freq_masks=2, freq_mask_width=10, time_masks=2, time_mask_width=20)
    x = torch.randn(3, 100, 80) + 5
    lens = torch.tensor([100, 50, 30])
    sa.eval()
    assert torch.equal(sa(x, lens), x)
    sa.train()
    torch.manual_seed(7)
    y1 = sa(x, lens)
    torch.manual_seed(7)
    y2 = sa(x, lens)
    assert torch.equal(y1, y2)
    changed = y1 != x
    assert changed.any()
    # time masks stay inside each utterance: a padded frame only changes through a freq mask,
    # i.e. a changed mel bin there is changed for every padded frame
    pad = changed[2, 30:]  # (70, 80)
    assert torch.equal(pad.all(0), pad.any(0))
    # masked cells hold the utterance's per-mel mean over its valid frames
    mean = x[2, :30].mean(0)
    bins = torch.nonzero(changed[2, 0]).flatten()
    if len(bins):
        assert torch.allclose(y1[2, 0, bins], mean[bins], atol=1e-5)


def test_bf16_forward_close_to_fp32(model):
    """DeepSpeed bf16 casts the whole model: log-probs come out in fp32, finite and close to fp32's."""
    import copy

    m16 = copy.deepcopy(model).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1200, 80, generator=gen) * 3 + 5  # 300 output frames: past bf16's exact 256
    lens = torch.tensor([1200, 900])
    with torch.no_grad():
        ref, ol = model(x, lens)
        got, ol16 = m16(x.to(torch.bfloat16), lens)
    assert got.dtype == torch.float32 and torch.equal(ol, ol16)
    p_ref, p_got = ref.exp(), got.float().exp()
    for i in range(2):
        n = int(ol[i])
        assert torch.isfinite(got[i, :n]).all()
        # bf16 rounding alone gives ~0.002 here; positions computed in bf16 gave ~0.03
        assert (p_ref[i, :n] - p_got[i, :n]).abs().max() < 0.01


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3000), st.floats(0.0, 0.95), st.sampled_from([torch.float32, torch.bfloat16]),
       st.integers(0, 2**31 - 1))
def test_packed_dropout_zeroes_or_scales_every_element(n, p, dtype, seed):
    """Any size (not only multiples of 4), any p: each element is 0 or x / (1 - p'), dtype kept."""
    torch.manual_seed(seed)
    x = (torch.rand(n) + 0.5).to(dtype)
    y = packed_dropout(x, p)
    assert y.shape == x.shape and y.dtype == dtype
    drop = round(p * 65536)
    scale = 65536.0 / (65536 - drop) if drop < 65536 else 0.0
    kept = y != 0
    expect = (x.float() * scale).to(dtype)
    assert torch.equal(y[kept], expect[kept])
    if drop == 0:
        assert torch.equal(y, x)


def test_packed_dropout_share_independence_expectation_and_seed():
    """The share dropped is p, neighbours (lanes of one 64-bit draw) are independent, the
    expectation is kept, the global seed reproduces the mask, and the gradient is mask × scale."""
    x = torch.ones(400_000, requires_grad=True)
    for p in (0.1, 0.3):
        torch.manual_seed(3)
        y = packed_dropout(x, p)
        keep = (y.detach() != 0).float()
        assert abs(float(keep.mean()) - (1 - p)) < 0.004
        assert abs(float(y.detach().mean()) - 1.0) < 0.006
        # lanes k and k+1 of one draw, and the same lane of consecutive draws: P(both kept) = (1-p)^2
        k4 = keep.view(-1, 4)
        for a, b in ((k4[:, 0], k4[:, 1]), (k4[:, 2], k4[:, 3]), (k4[:-1, 0], k4[1:, 0])):
            assert abs(float((a * b).mean()) - (1 - p) ** 2) < 0.006
        torch.manual_seed(3)
        assert torch.equal(packed_dropout(x, p), y)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.equal(g, keep / (1 - round(p * 65536) / 65536))


def test_model_dropout_is_packed_on_cpu_and_off_in_eval():
    torch.manual_seed(0)
    m = ConformerCTC(**KW)
    assert not any(type(mod) is torch.nn.Dropout for mod in m.modules())
    assert sum(isinstance(mod, Dropout) for mod in m.modules()) == 1 + 6 * KW["n_layers"]  # the input, 2 per feed-forward, attention, conv
    x, lens = torch.randn(2, 60, 80), torch.tensor([60, 41])
    m.train()
    torch.manual_seed(1)
    a, _ = m(x, lens)
    torch.manual_seed(2)
    b, _ = m(x, lens)
    torch.manual_seed(1)
    a2, _ = m(x, lens)
    assert not torch.equal(a, b) and torch.equal(a, a2)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x, lens)[0], m(x, lens)[0])
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5)


def test_front_end_runs_channels_last_with_contiguous_parameters():
    """The convs compute NHWC (fast on CPU) yet give the NCHW result, and every parameter stays
    contiguous: DeepSpeed views each parameter as bytes to broadcast it."""
    torch.manual_seed(0)
    for c_in in (1, 16):  # one input channel: the case where .contiguous() would keep NCHW
        mod = Conv2dNHWC(c_in, 16, 3, stride=2, padding=1)
        ref = torch.nn.Conv2d(c_in, 16, 3, stride=2, padding=1)
        ref.load_state_dict(mod.state_dict())
        x = torch.randn(3, c_in, 101, 80)
        got = mod(x)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(got, ref(x), atol=1e-5)
    m = ConformerCTC(**KW)
    assert isinstance(m.subsample.conv1, Conv2dNHWC) and isinstance(m.subsample.conv2, Conv2dNHWC)
    lp, _ = m(torch.randn(2, 60, 80), torch.tensor([60, 41]))
    lp.sum().backward()
    assert all(p.is_contiguous() and (p.grad is None or p.grad.is_contiguous()) for p in m.parameters())


def test_intermediate_ctc_head_reads_block_k_and_leaves_the_output_unchanged(model):
    """``inter_layer=k`` adds the shared head's log-probs on block k's output; the final output is
    the same as without it (eval mode, so no dropout draws differ)."""
    torch.manual_seed(1)
    x = torch.randn(2, 50, 80)
    lens = torch.tensor([50, 33])
    with torch.no_grad():
        plain, plain_lens = model(x, lens)
        lp, out_lens, inter = model(x, lens, inter_layer=1)
        # by hand: the front end, block 1, the shared head
        h, hl = model.subsample(normalize_features(x, lens), lens)
        h = h * model.pos_scale + sinusoidal_positions(h)
        h = model.blocks[0](h, valid_mask(hl, h))
        want = torch.log_softmax(model.head(h).float(), dim=-1)
    assert torch.equal(lp, plain) and torch.equal(out_lens, plain_lens)
    assert inter.shape == lp.shape
    torch.testing.assert_close(inter, want)
    assert not torch.allclose(inter, lp)  # a different layer, not the final one again
    with pytest.raises(ValueError, match="inter_layer"):
        model(x, lens, inter_layer=KW["n_layers"])  # the last block is the final output
