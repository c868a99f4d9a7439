"""Conformer-CTC acoustic model, SpecAugment and a parameter counter.

Layout of :class:`ConformerCTC` (shapes for a batch of B utterances, T feature frames):

    feats (B, T, n_mels), lengths (B,)
      → per-utterance mean/variance normalization over the valid frames   (B, T, n_mels)
      → conv2d subsampling ×4 (two 3×3 stride-2 convs, padded frames re-zeroed after each)
                                                                           (B, T', d_model)
      → + sinusoidal positions, n_layers × ConformerBlock (masked)         (B, T', d_model)
      → linear + log_softmax                                               (B, T', vocab)
      (training with intermediate CTC: the same linear + log_softmax on block k's output too)

Everything that depends on the sequence length is computed from tensor shapes and the
``lengths`` tensor (``x.shape[1]`` inside traced ops, ``torch.arange`` against lengths), never
from Python ints, so ``torch.onnx.export(..., dynamo=False, dynamic_axes=...)`` gives a graph
that is valid for any batch size and length. The normalization lives inside the model so the
ONNX file contains it and serving only needs the numpy log-mel front end.

Padded frames never influence valid ones: they are zeroed before every convolution and masked
out of attention, so an utterance decodes the same alone or padded in a batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def subsampled_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Output lengths of the ×4 subsampling: two convs with k=3, s=2, p=1 → ``(L-1)//2+1`` twice."""
    lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
    return torch.div(lengths - 1, 2, rounding_mode="floor") + 1


def valid_mask(lengths: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bool mask (B, T) of valid frames for ``x`` (B, T, ...); T taken from ``x`` as a traced shape."""
    t = torch.arange(x.shape[1], device=x.device, dtype=lengths.dtype)  # (T,)
    return t.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)


def normalize_features(feats: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-utterance, per-mel mean/variance normalization over valid frames; padded frames → 0.

    feats (B, T, F), lengths (B,) → (B, T, F) in the input dtype; statistics in float32 (a
    bf16/fp16 sum over hundreds of frames would lose most of its precision).
    """
    x = feats.float()
    mask = valid_mask(lengths, x).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    n = lengths.to(x.dtype).clamp(min=1.0).view(-1, 1, 1)  # (B, 1, 1)
    mean = (x * mask).sum(dim=1, keepdim=True) / n  # (B, 1, F)
    var = (((x - mean) * mask) ** 2).sum(dim=1, keepdim=True) / n  # (B, 1, F)
    return ((x - mean) / torch.sqrt(var + eps) * mask).to(feats.dtype)


def packed_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout whose mask takes a quarter of the random draws of ``torch.bernoulli_``.

    On CPU, PyTorch's dropout draws one Mersenne-Twister number per element, serially: in the
    torch profiler its mask (``bernoulli_``) was 29 % of the local model's bf16 training step (29
    dropout calls); this version makes that step 1.27× faster (bench/step_profile.py). Here every 64-bit draw gives four 16-bit uniforms, and an
    element is kept when its uniform is at or above ``round(p × 65536)`` (p is thus rounded to
    1/65536). Same expectation as ``nn.functional.dropout``: kept elements are scaled by
    1 / (1 - p'), with p' the rounded p. Draws from torch's global generator, so seeding and
    checkpointed RNG state reproduce it. x (any shape) → same shape and dtype.
    """
    n = x.numel()
    drop = round(p * 65536)
    if drop <= 0:
        return x
    if drop >= 65536:
        return x * 0.0
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    u = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    mask = (u >= (drop - 32768)).to(x.dtype)
    scale = 65536.0 / (65536 - drop)
    if x.dtype == torch.float32:
        return x * mask.mul_(scale)  # one saved mask, already scaled: fastest fwd+bwd in fp32
    return x * mask * scale  # bf16/fp16: the scale applied in the product, not rounded into the mask


class Dropout(nn.Module):
    """``nn.Dropout`` with :func:`packed_dropout` on CPU (PyTorch's own elsewhere: fused on GPUs).

    Identity in eval mode, so ONNX export and inference are unchanged. (B, ...) → (B, ...).
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, True)
        return packed_dropout(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Conv2dNHWC(nn.Conv2d):
    """``nn.Conv2d`` computed channels-last (NHWC): same parameters, values and (B, C, H, W) shape.

    A channels-last copy of the weight makes oneDNN run the convolution and its backward in
    NHWC: the local model's whole training step 1.14× faster in bf16 autocast, 1.07× in fp32
    (bench/step_profile.py, dropout unchanged). The parameter itself stays contiguous (DeepSpeed views parameters
    as bytes to broadcast them); copying a 64×64×3×3 weight costs nothing. It stays a module
    call, so hooks on it (ZeRO-3 parameter gathering) still fire. Plain NCHW when tracing for ONNX.
    """

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            # empty_like + copy_, not .contiguous(): with a single input channel the contiguous
            # weight already counts as channels-last, keeps its NCHW strides, and the conv stays NCHW
            weight = torch.empty_like(weight, memory_format=torch.channels_last).copy_(weight)
        return super()._conv_forward(x, weight, bias)


class ConvSubsampling(nn.Module):
    """Two 3×3 stride-2 Conv2d + ReLU over (time, mel), then a linear to ``d_model``.

    (B, T, F) → (B, T', d_model) with T' = subsampled_lengths(T). Frames past each utterance's
    length are zeroed between the convs so padding cannot leak into valid frames.
    """

    def __init__(self, n_mels: int, channels: int, d_model: int) -> None:
        super().__init__()
        self.conv1 = Conv2dNHWC(1, channels, 3, stride=2, padding=1)
        self.conv2 = Conv2dNHWC(channels, channels, 3, stride=2, padding=1)
        f = (n_mels - 1) // 2 + 1
        f = (f - 1) // 2 + 1
        self.out = nn.Linear(channels * f, d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        l1 = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
        l2 = torch.div(l1 - 1, 2, rounding_mode="floor") + 1
        x = torch.relu(self.conv1(x.unsqueeze(1)))  # (B, C, T1, F1)
        x = x * valid_mask(l1, x.transpose(1, 2)).to(x.dtype)[:, None, :, None]
        x = torch.relu(self.conv2(x))  # (B, C, T2, F2)
        x = x * valid_mask(l2, x.transpose(1, 2)).to(x.dtype)[:, None, :, None]
        b, c, t, f = x.shape
        x = x.permute(0, 2, 1, 3).flatten(2)  # (B, T2, C*F2)
        return self.out(x), l2


def sinusoidal_positions(x: torch.Tensor) -> torch.Tensor:
    """(B, T, D) → (1, T, D) sine/cosine positions computed from the traced length of ``x``.

    Computed in float32 (bf16 cannot even count past 256) and cast to ``x.dtype``.
    """
    d = x.shape[-1]
    pos = torch.arange(x.shape[1], device=x.device, dtype=torch.float32).unsqueeze(1)  # (T, 1)
    i = torch.arange(0, d, 2, device=x.device, dtype=torch.float32)  # (D/2,)
    freq = torch.exp(i * (-math.log(10000.0) / d))  # (D/2,)
    ang = pos * freq  # (T, D/2)
    pe = torch.stack([torch.sin(ang), torch.cos(ang)], dim=-1).flatten(1)  # (T, D)
    return pe.unsqueeze(0).to(x.dtype)


class FeedForward(nn.Module):
    """Pre-norm Swish feed-forward (macaron half used twice per block). (B, T, D) → (B, T, D)."""

    def __init__(self, d_model: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_model),
            nn.Linear(d_model, d_model * ff_mult),
            nn.SiLU(),
            Dropout(dropout),
            nn.Linear(d_model * ff_mult, d_model),
            Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with a key padding mask (plain matmuls: exports cleanly).

    x (B, T, D), mask (B, T) bool valid → (B, T, D).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} not divisible by n_heads {n_heads}")
        self.h = n_heads
        self.dk = d_model // n_heads
        self.norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm(x)).view(b, t, 3, self.h, self.dk).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, T, dk)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dk)  # (B, H, T, T)
        neg = torch.finfo(scores.dtype).min
        scores = scores.masked_fill(~mask[:, None, None, :], neg)
        attn = self.drop(torch.softmax(scores, dim=-1))
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.drop(self.proj(out))


class ConvModule(nn.Module):
    """Conformer convolution module: pointwise+GLU, depthwise conv, LayerNorm, Swish, pointwise.

    Padded frames are zeroed before the depthwise conv. LayerNorm (not BatchNorm) keeps the
    result independent of what else is in the batch. x (B, T, D), mask (B, T) → (B, T, D).
    """

    def __init__(self, d_model: int, kernel: int, dropout: float) -> None:
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError("conv_kernel must be odd")
        self.norm = nn.LayerNorm(d_model)
        self.pw1 = nn.Conv1d(d_model, 2 * d_model, 1)
        self.dw = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.pw2 = nn.Conv1d(d_model, d_model, 1)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(1).to(x.dtype)  # (B, 1, T)
        y = self.norm(x).transpose(1, 2)  # (B, D, T)
        y = nn.functional.glu(self.pw1(y), dim=1) * m
        y = self.dw(y)  # (B, D, T)
        y = nn.functional.silu(self.norm2(y.transpose(1, 2))).transpose(1, 2)
        y = self.pw2(y).transpose(1, 2)  # (B, T, D)
        return self.drop(y)


class ConformerBlock(nn.Module):
    """½FFN → MHSA → Conv → ½FFN → LayerNorm (Gulati et al. 2020). (B, T, D) → (B, T, D)."""

    def __init__(self, d_model: int, n_heads: int, ff_mult: int, conv_kernel: int, dropout: float) -> None:
        super().__init__()
        self.ff1 = FeedForward(d_model, ff_mult, dropout)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.conv = ConvModule(d_model, conv_kernel, dropout)
        self.ff2 = FeedForward(d_model, ff_mult, dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x, mask)
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.ff2(x)
        return self.norm(x)


class ConformerCTC(nn.Module):
    """Conformer encoder + CTC head. See the module docstring for the layout.

    ``forward(feats (B, T, n_mels) float32, lengths (B,) int64)`` →
    ``(log_probs (B, T', vocab_size), out_lengths (B,))`` with ``T' = ((T-1)//2+1 - 1)//2 + 1``.
    Output frames past ``out_lengths`` are meaningless and must be ignored.
    """

    def __init__(
        self,
        n_mels: int = 80,
        vocab_size: int = 29,
        d_model: int = 144,
        n_layers: int = 4,
        n_heads: int = 4,
        ff_mult: int = 4,
        conv_kernel: int = 15,
        dropout: float = 0.1,
        subsampling_channels: int = 144,
        pos_encoding: str = "sinusoidal",
    ) -> None:
        super().__init__()
        if pos_encoding not in ("sinusoidal", "none"):
            raise ValueError(f"pos_encoding must be 'sinusoidal' or 'none', got {pos_encoding!r}")
        self.pos_encoding = pos_encoding
        self.n_mels = n_mels
        self.vocab_size = vocab_size
        self.subsample = ConvSubsampling(n_mels, subsampling_channels, d_model)
        self.pos_scale = math.sqrt(d_model)
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(
            [ConformerBlock(d_model, n_heads, ff_mult, conv_kernel, dropout) for _ in range(n_layers)]
        )
        self.head = nn.Linear(d_model, vocab_size)

    def forward(
        self, feats: torch.Tensor, lengths: torch.Tensor, inter_layer: int = 0
    ) -> tuple[torch.Tensor, ...]:
        """``inter_layer = k > 0`` (training only) also returns the log-probs of the shared head on
        the output of block k, for intermediate CTC (Lee & Watanabe 2021): ``(log_probs, out_lengths,
        inter_log_probs (B, T', V))``. It adds no parameter, so the weights and the exported graph
        (which never passes it) are the same with or without it."""
        if inter_layer and not 0 < inter_layer < len(self.blocks):
            raise ValueError(f"inter_layer must be in 1..{len(self.blocks) - 1}, got {inter_layer}")
        x = normalize_features(feats, lengths)  # (B, T, F)
        x, out_lengths = self.subsample(x, lengths)  # (B, T', D)
        if self.pos_encoding == "sinusoidal":
            x = x * self.pos_scale + sinusoidal_positions(x)
        # "none": positions only through the convolutions (shift-equivariant: chunked long-form
        # decoding sees speech at any offset the way training did)
        x = self.drop(x)
        mask = valid_mask(out_lengths, x)  # (B, T')
        inter = None
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, mask)
            if i == inter_layer:
                inter = torch.log_softmax(self.head(x).float(), dim=-1)  # (B, T', V); blocks end in a LayerNorm
        # log-probs always in fp32: under bf16 (autocast or bf16 weights) the head's output has
        # 8 bits of mantissa, too coarse for the CTC lattice; a no-op in an fp32 model
        log_probs = torch.log_softmax(self.head(x).float(), dim=-1)  # (B, T', V)
        return (log_probs, out_lengths) if inter is None else (log_probs, out_lengths, inter)


class SpecAugment(nn.Module):
    """Frequency and time masking (Park et al. 2019) on (B, T, F) features, training mode only.

    Uses ``torchaudio.functional.mask_along_axis_iid`` (an independent mask per utterance) and
    draws from torch's global RNG, so ``torch.manual_seed`` makes it reproducible. Masked cells
    are set to the utterance's per-mel mean over its valid frames (0 after the model's own
    normalization), so masking does not skew the normalization statistics. Time masks
    are clipped to each utterance's valid length when ``lengths`` is given, so short utterances
    are not wiped out and padding is not "masked" instead of speech.
    """

    def __init__(self, freq_masks: int = 2, freq_mask_width: int = 15, time_masks: int = 2,
                 time_mask_width: int = 25) -> None:
        super().__init__()
        self.freq_masks = freq_masks
        self.freq_mask_width = freq_mask_width
        self.time_masks = time_masks
        self.time_mask_width = time_mask_width

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """feats (B, T, F) → (B, T, F); identity in eval mode."""
        if not self.training:
            return feats
        from torchaudio.functional import mask_along_axis_iid

        if lengths is None:
            lengths = torch.full((feats.shape[0],), feats.shape[1], dtype=torch.long, device=feats.device)
        m = (torch.arange(feats.shape[1], device=feats.device)[None, :] < lengths[:, None]).to(feats.dtype)
        mean = (feats * m[..., None]).sum(1, keepdim=True) / lengths.clamp(min=1).to(feats.dtype).view(-1, 1, 1)
        # the masks are drawn on a tensor of ones (fill 0) and then applied: kept cells stay bit-exact
        x = torch.ones_like(feats).transpose(1, 2).unsqueeze(1)  # (B, 1, F, T): torchaudio's layout
        fill = 0.0
        for _ in range(self.freq_masks):
            if self.freq_mask_width > 0:
                x = mask_along_axis_iid(x, self.freq_mask_width, fill, axis=2)
        if self.time_masks and self.time_mask_width > 0:
            # per utterance: widths bounded by 20% of its own length (and time_mask_width)
            outs = []
            for i, li in enumerate(lengths.tolist()):  # one host sync, not one per utterance
                xi = x[i : i + 1]
                w = min(self.time_mask_width, max(li // 5, 0))
                if w > 0:
                    valid = xi[..., :li]
                    for _ in range(self.time_masks):
                        valid = mask_along_axis_iid(valid, w, fill, axis=3)
                    xi = torch.cat([valid, xi[..., li:]], dim=-1)
                outs.append(xi)
            x = torch.cat(outs, dim=0)
        keep = x.squeeze(1).transpose(1, 2) > 0.5  # (B, T, F)
        return torch.where(keep, feats, mean.expand_as(feats)).contiguous()
