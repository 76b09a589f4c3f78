"""A faithful baseline: LipConvnet as the SOC papers' released code computes it, for comparison.

Written from ../shared/spec/paper.md (sections 2 and 5), NOT used by lipcert itself: the SOC layer
divides the skew filter by the minimum of the four "fantastic four" power-iteration estimates
(50 steps at construction, 1 per training forward), evaluates a Taylor series of 6 terms in training
and 15 in evaluation (each step divides the convolution's output by the term index), rearranges
space to depth for stride 2, pads/slices channels, and has two backward modes: plain autograd and
the paper's fast backward (one saved tensor, one weight-gradient convolution). MaxMin activations,
max channel pooling, an orthogonal (1x1 SOC) head, float32, CIFAR normalisation inside the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm().clamp_min(1e-12)


def _transpose(w: torch.Tensor) -> torch.Tensor:
    return torch.flip(w.transpose(0, 1), (2, 3))


class _Fast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, skew, n):
        pad = skew.shape[-1] // 2
        z = x
        for i in range(n, 1, -1):
            z = x + F.conv2d(z, skew, padding=pad) / i
        ctx.save_for_backward(z, skew)
        ctx.n = n
        return x + F.conv2d(z, skew, padding=pad)

    @staticmethod
    def backward(ctx, g):
        z, skew = ctx.saved_tensors
        pad = skew.shape[-1] // 2
        w = g
        for i in range(ctx.n, 1, -1):
            w = g + F.conv2d(w, -skew, padding=pad) / i
        gw = torch.nn.grad.conv2d_weight(z, skew.shape, w, padding=pad)
        return g + F.conv2d(w, -skew, padding=pad), gw, None


class BaselineSOC(nn.Module):
    def __init__(self, cin, cout, k, stride=1, fast=True, train_terms=6, eval_terms=15):
        super().__init__()
        self.cout, self.stride, self.k, self.fast = cout, stride, k, fast
        self.cin = cin * stride * stride
        self.m = max(cout, self.cin)
        self.train_terms, self.eval_terms = train_terms, eval_terms
        m = self.m
        self.weight = nn.Parameter(torch.randn(m, m, k, k) / math.sqrt(m))
        self.bias = nn.Parameter((torch.rand(cout) * 2 - 1) / math.sqrt(m))
        for name, shape in {"u1": (1, m, 1, k), "v1": (m, 1, k, 1), "u2": (1, m, k, 1), "v2": (m, 1, 1, k),
                            "u3": (1, m, k, k), "v3": (m, 1, 1, 1), "u4": (m, 1, k, k), "v4": (1, m, 1, 1)}.items():
            self.register_buffer(name, _normalize(torch.randn(shape)))
        self._power(50)

    @torch.no_grad()
    def _power(self, iters):
        a = 0.5 * (self.weight - _transpose(self.weight))
        for _ in range(iters):
            self.v1 = _normalize((a * self.u1).sum((1, 3), keepdim=True))
            self.u1 = _normalize((a * self.v1).sum((0, 2), keepdim=True))
            self.v2 = _normalize((a * self.u2).sum((1, 2), keepdim=True))
            self.u2 = _normalize((a * self.v2).sum((0, 3), keepdim=True))
            self.v3 = _normalize((a * self.u3).sum((1, 2, 3), keepdim=True))
            self.u3 = _normalize((a * self.v3).sum(0, keepdim=True))
            self.v4 = _normalize((a * self.u4).sum((0, 2, 3), keepdim=True))
            self.u4 = _normalize((a * self.v4).sum(1, keepdim=True))

    def forward(self, x):
        if self.training:
            self._power(1)
        a = 0.5 * (self.weight - _transpose(self.weight))
        sigma = torch.minimum(torch.minimum((a * self.u1 * self.v1).sum(), (a * self.u2 * self.v2).sum()),
                              torch.minimum((a * self.u3 * self.v3).sum(), (a * self.u4 * self.v4).sum()))
        skew = a / sigma
        if self.stride > 1:
            x = F.pixel_unshuffle(x, self.stride)
        if self.cout > self.cin:
            x = F.pad(x, (0, 0, 0, 0, 0, self.cout - self.cin))
        n = (self.train_terms if self.training else self.eval_terms) - 1
        if self.fast and self.training:
            z = _Fast.apply(x, skew, n)
        else:
            z = x
            for i in range(n, 0, -1):
                z = x + F.conv2d(z, skew, padding=self.k // 2) / i
        if self.cout < self.m:
            z = z[:, : self.cout]
        return z + self.bias.view(1, -1, 1, 1)


class _MaxMin(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class _MaxPool(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.maximum(a, b)


class BaselineLipConvNet(nn.Module):
    """LipConvnet-N (N = 5 b) with MaxMin, max pooling and an orthogonal head, as released."""

    def __init__(self, depth=5, num_classes=10, width=32, fast=True):
        super().__init__()
        b = depth // 5
        self.register_buffer("mean", torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2507, 0.2507, 0.2507]).view(1, 3, 1, 1))
        layers = [BaselineSOC(3, width, 3, fast=fast), _MaxMin()]
        c = width
        for _ in range(4):
            for _ in range(b - 1):
                layers += [BaselineSOC(c, c, 3, fast=fast), _MaxMin()]
            layers += [BaselineSOC(c, 4 * c, 3, stride=2, fast=fast), _MaxPool()]
            c *= 2
        layers += [BaselineSOC(c, 4 * c, 1, stride=2, fast=fast)]
        for _ in range(b - 1):
            layers += [_MaxMin(), BaselineSOC(4 * c, 4 * c, 1, fast=fast)]
        layers += [_MaxPool()]
        self.body = nn.Sequential(*layers)
        self.head = BaselineSOC(2 * c, num_classes, 1, fast=fast)

    def forward(self, x):
        x = self.body((x - self.mean) / self.std)
        return self.head(x).flatten(1)
