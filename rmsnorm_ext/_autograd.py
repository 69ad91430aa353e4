"""Autograd for the forward ops: each forward op's backward is its *_bwd op."""
import torch

_ops = torch.ops.rmsnorm_ext


def _rms_setup(ctx, inputs, output):
    x, normalized_shape, weight, _eps, weight_offset = inputs
    ctx.save_for_backward(x, output[1], weight)
    ctx.normalized_shape = normalized_shape
    ctx.weight_offset = weight_offset
    ctx.mark_non_differentiable(output[1])


def _rms_backward(ctx, grad_y, _grad_rstd):
    x, rstd, weight = ctx.saved_tensors
    want_w = weight is not None and ctx.needs_input_grad[2]
    dx, dw = _ops.rms_norm_bwd(grad_y, x, rstd, weight, ctx.normalized_shape, ctx.weight_offset,
                               None, want_w)
    return (dx if ctx.needs_input_grad[0] else None, None, dw if want_w else None, None, None)


def _ln_setup(ctx, inputs, output):
    x, normalized_shape, weight, bias, _eps = inputs
    ctx.save_for_backward(x, output[1], output[2], weight)
    ctx.normalized_shape = normalized_shape
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(output[1], output[2])


def _ln_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, mean, rstd, weight = ctx.saved_tensors
    want_w = weight is not None and ctx.needs_input_grad[2]
    want_b = ctx.bias_dtype is not None and ctx.needs_input_grad[3]
    dx, dw, db = _ops.layer_norm_bwd(grad_y, x, mean, rstd, weight, ctx.normalized_shape,
                                     want_w, want_b)
    if want_b and db.dtype != ctx.bias_dtype:
        # Only for a bias without a weight, in a dtype other than the input's.
        db = db.to(ctx.bias_dtype)
    return (dx if ctx.needs_input_grad[0] else None, None, dw if want_w else None,
            db if want_b else None, None)


def _fused_setup(ctx, inputs, output):
    x, _residual, normalized_shape, weight, _eps, weight_offset = inputs
    _y, h, rstd = output
    ctx.save_for_backward(h, rstd, weight)
    ctx.normalized_shape = normalized_shape
    ctx.weight_offset = weight_offset
    ctx.input_dtype = x.dtype
    ctx.mark_non_differentiable(rstd)


def _fused_backward(ctx, grad_y, grad_h, _grad_rstd):
    h, rstd, weight = ctx.saved_tensors
    want_w = weight is not None and ctx.needs_input_grad[3]
    # d(h) = rms_norm backward + the gradient reaching h directly, fused in one kernel;
    # h = input + residual, so both receive it.
    dh, dw = _ops.rms_norm_bwd(grad_y, h, rstd, weight, ctx.normalized_shape,
                               ctx.weight_offset, grad_h, want_w)
    dx = dh if dh.dtype == ctx.input_dtype else dh.to(ctx.input_dtype)  # fp32 residual stream
    return (dx if ctx.needs_input_grad[0] else None, dh if ctx.needs_input_grad[1] else None,
            None, dw if want_w else None, None, None)


torch.library.register_autograd("rmsnorm_ext::rms_norm_fwd", _rms_backward,
                                setup_context=_rms_setup)
torch.library.register_autograd("rmsnorm_ext::layer_norm_fwd", _ln_backward,
                                setup_context=_ln_setup)
torch.library.register_autograd("rmsnorm_ext::fused_add_rms_norm_fwd", _fused_backward,
                                setup_context=_fused_setup)
