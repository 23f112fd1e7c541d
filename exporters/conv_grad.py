"""The gradient of a 2-D convolution written as forward convolutions, for tracing.

`aten.convolution_backward` has no ONNX or LiteRT lowering (docs/architecture.md), so a traced step
graph of a conv block cannot be exported as is. Traced with `DECOMPOSITIONS`, make_fx
replaces it by ops every inference engine has:

  input gradient   a transposed convolution of the output gradient with the same weights
                   (ONNX ConvTranspose), unpadded, then cropped to the input's size
  weight gradient  a convolution of the input by the output gradient with batch and channel
                   axes swapped: the batch becomes the summed-over channel axis, stride and
                   dilation trade places; groups are kept apart by folding them into channels
  bias gradient    the output gradient summed over batch and space

Supported: 2-D, non-transposed convolutions with any stride, padding, dilation and groups.

Max-pooling's gradient (`aten.max_pool2d_with_indices_backward`, a scatter by the argmax
indices) has no LiteRT lowering either, and LiteRT's argmax indices do not follow torch's
numbering (seen: a CNN's first-layer gradient came out zero). So the winners are found again
from the input: for each kernel offset in torch's scan order, a strided slice gives every
window's element there, and it wins where it equals the window's max and no earlier offset
won (torch keeps the first max). A depthwise transposed convolution with a one-hot kernel
carries each winner's gradient back to its input position. Exact, ties included, for any
kernel, stride, padding and dilation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def transposed(t, weight, stride, padding, dilation, groups, size):
    """conv_transpose2d(t, weight, stride, padding, dilation, groups) at spatial `size`.

    Run unpadded and cropped: LiteRT has no transposed convolution with explicit padding
    (TFLite's is SAME or VALID only). The crop also restores rows the forward convolution's
    stride skipped (what ONNX's output_padding is for), as zeros when the full output ends
    before them."""
    full = F.conv_transpose2d(t, weight, None, stride, 0, 0, groups, dilation)
    (ph, pw), (h, w) = padding, size
    full = F.pad(full, (0, max(0, pw + w - full.shape[3]), 0, max(0, ph + h - full.shape[2])))
    return full[:, :, ph:ph + h, pw:pw + w]


def conv2d_grads(grad_out, x, weight, stride, padding, dilation, groups, need=(True, True, True)):
    """(grad_input, grad_weight, grad_bias) of y = conv2d(x, weight, bias, stride, padding, dilation, groups)."""
    n, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    g_in = g_w = g_b = None
    if need[0]:
        g_in = transposed(grad_out, weight, stride, padding, dilation, groups, (h, w))
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


def max_pool2d_grad(grad_out, x, kernel_size, stride, padding, dilation):
    """grad_input of y = max_pool2d(x, kernel_size, stride, padding, dilation)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    ho, wo = grad_out.shape[2:]
    # The window element at offset (a, b) of every output, as one strided slice of the
    # padded input; padding never wins (a window always holds a real element).
    low = torch.finfo(x.dtype).min
    extra_h = max(0, (kh - 1) * dh + (ho - 1) * sh + 1 - (h + 2 * ph))
    extra_w = max(0, (kw - 1) * dw + (wo - 1) * sw + 1 - (w + 2 * pw))
    xp = F.pad(x, (pw, pw + extra_w, ph, ph + extra_h), value=low)
    offsets = [(a, b) for a in range(kh) for b in range(kw)]  # torch's scan order: first max wins
    at = {(a, b): xp[:, :, a * dh:a * dh + (ho - 1) * sh + 1:sh, b * dw:b * dw + (wo - 1) * sw + 1:sw]
          for a, b in offsets}
    y = at[offsets[0]]
    for key in offsets[1:]:
        y = torch.maximum(y, at[key])
    grad_in, claimed = torch.zeros_like(x), torch.zeros_like(y)
    one_hot = torch.zeros(len(offsets), c, 1, (kh - 1) * dh + 1, (kw - 1) * dw + 1, dtype=x.dtype)
    for i, (a, b) in enumerate(offsets):
        wins = (at[(a, b)] == y).to(x.dtype) * (1 - claimed)
        claimed = claimed + wins
        one_hot[i, :, :, a * dh, b * dw] = 1.0
        grad_in = grad_in + transposed(grad_out * wins, one_hot[i], stride, padding, (1, 1), c, (h, w))
    return grad_in


def _max_pool2d_with_indices_backward(grad_out, x, kernel_size, stride, padding, dilation, ceil_mode, indices):
    if x.dim() != 4:
        raise NotImplementedError("edgeprop decomposes the gradient of batched 2-D max-pooling only")
    def pair(v):
        return tuple(v) * 2 if len(v) == 1 else tuple(v)
    # torch's default stride is the kernel size; the indices are not used (see the module doc)
    return max_pool2d_grad(grad_out, x, pair(kernel_size), pair(stride or kernel_size), pair(padding), pair(dilation))


DECOMPOSITIONS = {aten.convolution_backward.default: _convolution_backward,
                  aten.max_pool2d_with_indices_backward.default: _max_pool2d_with_indices_backward}


def avg_pool2d_grad(grad_out, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """grad_input of y = avg_pool2d(x, ...): average pooling is a depthwise convolution with
    a uniform kernel, so its gradient is that convolution transposed (`transposed`). Exact when
    every window divides by the kernel's area: no padding, or padding counted (torch's
    default); other cases are refused when the model is captured (capture.check_ops)."""
    if x.dim() != 4 or ceil_mode or (any(padding) and not count_include_pad):
        raise NotImplementedError("edgeprop decomposes the gradient of 2-D average pooling without ceil_mode, "
                                  "with padding counted in the average")
    def pair(v):
        return tuple(v) * 2 if len(v) == 1 else tuple(v)
    (kh, kw), c = pair(kernel_size), x.shape[1]
    area = divisor_override or kh * kw
    if pair(stride or kernel_size) == (kh, kw) and not any(padding):
        # Windows that tile the input (AvgPool2d(k)): each output's gradient spreads evenly
        # over its window, a nearest-neighbour upsampling (LiteRT's layout pass mishandles
        # a broadcast feeding the transposed convolution below).
        up = F.interpolate(grad_out / area, scale_factor=(kh, kw), mode="nearest")
        return F.pad(up, (0, x.shape[3] - up.shape[3], 0, x.shape[2] - up.shape[2]))
    kernel = torch.full((c, 1, kh, kw), 1.0 / area, dtype=x.dtype)
    return transposed(grad_out, kernel, pair(stride or kernel_size), pair(padding), (1, 1), c, x.shape[2:])


DECOMPOSITIONS[aten.avg_pool2d_backward.default] = avg_pool2d_grad


def _torch_decompositions(ops):
    from torch._decomp import get_decompositions
    return get_decompositions(ops)


# The forward pass of a captured model (exporters/capture.py) in elementary ops, so that
# every gradient is made of ops each engine has (no HardSwishGrad, LayerNormGrad, ...).
FORWARD_DECOMPOSITIONS = _torch_decompositions([
    aten.hardswish, aten.hardsigmoid, aten.silu, aten.gelu, aten.native_layer_norm, aten._softmax,
    aten._log_softmax, aten.hardtanh, aten.mish, aten.native_batch_norm, aten.elu])


def _var_mean(x, dim=None, *, correction=None, keepdim=False):
    """LayerNorm's statistics in elementary ops (torch's own decomposition ends in prims.var)."""
    dims = list(range(x.dim())) if dim is None else list(dim)
    n = 1
    for d in dims:
        n *= x.shape[d]
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).sum(dims, keepdim=keepdim) / max(n - (1 if correction is None else correction), 1)
    return var, mean if keepdim else mean.squeeze(dims)


FORWARD_DECOMPOSITIONS[aten.var_mean.correction] = _var_mean


def _attention(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """Scaled dot-product attention (a ViT's) as matrix products and a softmax: torch's fused
    CPU kernel has no lowering. Returns (output, log-sum-exp) as the kernel does."""
    if dropout_p or is_causal or attn_mask is not None:
        raise NotImplementedError("edgeprop writes attention without dropout, causal or explicit masks")
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    scores = query @ key.transpose(-2, -1) * scale
    top = scores.amax(dim=-1, keepdim=True)
    lse = (top + torch.log(torch.exp(scores - top).sum(dim=-1, keepdim=True))).squeeze(-1)
    return torch.softmax(scores, dim=-1) @ value, lse


FORWARD_DECOMPOSITIONS[aten._scaled_dot_product_flash_attention_for_cpu.default] = _attention


def _split_with_sizes(x, sizes, dim=0):
    """Pieces of `x` as slices: torch.onnx lowers a split to a tensor sequence, whose shapes
    ONNX's shape inference leaves unknown (the planner needs them), and chunk() is a split."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [aten.slice.Tensor(x, dim, a, a + n) for a, n in zip(starts, sizes)]


def _split(x, size, dim=0):
    n = x.shape[dim]
    return _split_with_sizes(x, [min(size, n - a) for a in range(0, n, size)], dim)


FORWARD_DECOMPOSITIONS[aten.split.Tensor] = _split
FORWARD_DECOMPOSITIONS[aten.split_with_sizes.default] = _split_with_sizes
def _pad_along(t, dim: int, before: int, after: int):
    pads = []
    for d in reversed(range(t.dim())):
        pads += [before, after] if d == dim else [0, 0]
    return aten.constant_pad_nd.default(t, pads, 0.0)


def _slice_backward(grad, input_sizes, dim, start, end, step):
    """A slice's gradient as zero padding (torch.onnx lowers slice_backward with a Range whose
    length ONNX shape inference cannot know)."""
    if step != 1:
        raise NotImplementedError("edgeprop writes the gradient of unit-step slices only")
    dim, size = dim % len(input_sizes), input_sizes[dim]
    start = min(max(start + size if start < 0 else start, 0), size)
    end = min(max(end + size if end < 0 else end, start), size)
    return _pad_along(grad, dim, start, size - end)


def _select_backward(grad, input_sizes, dim, index):
    dim = dim % len(input_sizes)
    index = index % input_sizes[dim]
    return _pad_along(grad.unsqueeze(dim), dim, index, input_sizes[dim] - index - 1)


# ... and the gradients of elementary ops that have no lowering of their own.
STEP_DECOMPOSITIONS = {**DECOMPOSITIONS, **_torch_decompositions([
    aten.sigmoid_backward, aten.tanh_backward, aten.hardtanh_backward, aten.leaky_relu_backward,
    aten._softmax_backward_data, aten._log_softmax_backward_data, aten.native_layer_norm_backward,
    aten.gelu_backward, aten.silu_backward, aten.hardswish_backward, aten.hardsigmoid_backward]),
    aten.slice_backward.default: _slice_backward, aten.select_backward.default: _select_backward}
