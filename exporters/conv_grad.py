"""The gradient of a 2-D convolution written as forward convolutions, for tracing.

`aten.convolution_backward` has no ONNX or LiteRT lowering (DESIGN.md), so a traced step
graph of a conv block cannot be exported as is. Traced with `DECOMPOSITIONS`, make_fx
replaces it by ops every inference engine has:

  input gradient   a transposed convolution of the output gradient with the same weights
                   (ONNX ConvTranspose), output_padding chosen to give back the input's size
  weight gradient  a convolution of the input by the output gradient with batch and channel
                   axes swapped: the batch becomes the summed-over channel axis, stride and
                   dilation trade places; groups are kept apart by folding them into channels
  bias gradient    the output gradient summed over batch and space

Supported: 2-D, non-transposed convolutions with any stride, padding, dilation and groups.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def conv2d_grads(grad_out, x, weight, stride, padding, dilation, groups, need=(True, True, True)):
    """(grad_input, grad_weight, grad_bias) of y = conv2d(x, weight, bias, stride, padding, dilation, groups)."""
    n, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    g_in = g_w = g_b = None
    if need[0]:
        # The transposed convolution's natural size can fall short of the input's when the
        # stride skipped the last rows or columns: output_padding restores them.
        out_pad = [size - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
                   for size, o, s, p, d, k in zip((h, w), grad_out.shape[2:], stride, padding, dilation, (kh, kw))]
        g_in = F.conv_transpose2d(grad_out, weight, None, stride, padding, out_pad, groups, dilation)
    if need[1]:
        ho, wo = grad_out.shape[2:]
        c_out_g = c_out // groups
        # batch (n) becomes the reduced channel axis; each group's channels stay in its group
        xs = x.reshape(n, groups, c_in_g, h, w).permute(2, 1, 0, 3, 4).reshape(c_in_g, groups * n, h, w)
        gs = grad_out.reshape(n, groups, c_out_g, ho, wo).permute(1, 2, 0, 3, 4).reshape(c_out, n, ho, wo)
        g_w = F.conv2d(xs, gs, None, dilation, padding, stride, groups)  # stride and dilation swap places
        g_w = g_w.transpose(0, 1)[:, :, :kh, :kw]  # positions past the kernel come from unused rows
    if need[2]:
        g_b = grad_out.sum(dim=(0, 2, 3))
    return g_in, g_w, g_b


def _convolution_backward(grad_out, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                          groups, output_mask):
    if transposed or x.dim() != 4:
        raise NotImplementedError("edgeprop decomposes the gradient of 2-D, non-transposed convolutions only")
    return conv2d_grads(grad_out, x, weight, stride, padding, dilation, groups, tuple(output_mask))


DECOMPOSITIONS = {aten.convolution_backward.default: _convolution_backward}
