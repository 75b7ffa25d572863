"""One helper that defines a fused op from its pieces: the `torch.library.custom_op` pair
(forward and backward, each with its fake impl) that torch.compile needs, and the same
computation as a plain autograd.Function for eager calls."""

import functools
from typing import Callable

import torch


def first_order(op: str) -> Callable:
    """Decorates an autograd backward to refuse create_graph=True: the kernels' backwards are
    not differentiable, and their gradients would silently leave the op out of a
    second-order gradient."""
    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def call(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(f"{op}: gradients of gradients (create_graph=True) are not supported")
            return backward(ctx, *grads)
        return call
    return decorate


def define_op(name: str, forward: Callable, forward_fake: Callable, backward: Callable, backward_fake: Callable,
              setup_context: Callable, gradients: Callable, eager: Callable | None = None) -> Callable:
    """The op `pacofr::<name>` from its pieces.

    forward(*inputs) -> outputs and backward(...) -> gradients run the chosen backend; their
    type annotations give the custom ops' schemas, and `*_fake` give the outputs' shapes and
    dtypes. setup_context(ctx, inputs, output) saves what the backward takes;
    gradients(ctx, backward, *grad_outputs) returns one gradient per input, computing them with
    the `backward` it is given (the backward custom op under torch.compile, the plain function
    otherwise).

    Returns call(*inputs, **options): the custom op while torch.compile traces (one graph node),
    otherwise `eager` (default: an autograd.Function with the same forward and backward), which
    skips the custom op's per-call Python dispatch, host time a GPU would spend waiting.
    `options` reach the eager path only (fast paths the compiled graph does without).
    Differentiable once (see `first_order`).
    """
    op = torch.library.custom_op(f"pacofr::{name}", forward, mutates_args=())
    op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(f"pacofr::{name}_backward", backward, mutates_args=())
    backward_op.register_fake(backward_fake)
    op.register_autograd(lambda ctx, *grads: gradients(ctx, backward_op, *grads), setup_context=setup_context)

    if eager is None:
        def run(ctx, *inputs):
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        def run_backward(ctx, *grads):
            return gradients(ctx, backward, *grads)

        # grad_fn then reads e.g. MaskedAttentionQkvBackward
        function = type("".join(word.title() for word in name.split("_")), (torch.autograd.Function,),
                        {"forward": staticmethod(run), "backward": staticmethod(first_order(name)(run_backward))})
        eager = function.apply

    def call(*inputs, **options):
        return op(*inputs) if torch.compiler.is_compiling() else eager(*inputs, **options)
    return call
