"""A fused, chunked LM head and cross-entropy: the loss transformers' ``ForCausalLMLoss`` returns for
``lm_head(hidden_states)`` (soft-capped as Gemma caps it), without the [tokens, vocabulary] logits.

``fused_linear_cross_entropy`` is the loss; ``applies``, ``causal_lm_loss`` and ``masked_mean_loss`` are what the
opt-in fused-loss rule (``rewriter.compile(family, fused_loss=True)``) makes the models' forwards call.

At Gemma's 262,144-token vocabulary the eager loss head keeps several float32 copies of the logits (2 GiB each at
2,048 tokens); here only one chunk of rows is ever expanded to the vocabulary, in two buffers reused from chunk to
chunk: on the CPU, writing into a fresh 256 MiB tensor costs about as much again in page faults as the matmul that
fills it. The forward computes the gradients as well, already divided by the loss's denominator, and the backward
only scales them by the incoming gradient: 1.4 to 2.1 times faster on the CPU than saving each row's log-sum-exp and
projecting every chunk again in the backward. ``torch.compile`` of the per-chunk arithmetic measured 1.5 times slower
than these in-place eager operations (inductor computes ``tanh`` again in each kernel that reads it): none here.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger("rewriter")
_warned: set[str] = set()

# Rows expanded to the vocabulary at once: 256 x 262,144 float32 logits are 256 MiB a buffer. On the CPU, 128 to 512
# rows took the same time within noise, 1,024 rows longer.
DEFAULT_CHUNK_SIZE = 256


def applies(model: nn.Module, labels: torch.Tensor | None, *, own_loss: bool = False) -> bool:
    """Whether ``model``'s forward, patched by the fused-loss rule, computes its loss here instead of its logits:
    labels given and gradients on (evaluation and generation keep the logits), its LM head called through nothing
    but ``nn.Linear.forward`` (no hook, no wrapper, a floating-point weight, no bias) and, unless the forward
    computes its ``own_loss``, its loss transformers' ``ForCausalLMLoss``. Otherwise the forward computes the
    logits as upstream does, and this says why, once per reason."""
    if labels is None or not torch.is_grad_enabled():
        return False
    why = _why_not_fused(model, own_loss)
    if why is not None and why not in _warned:
        _warned.add(why)
        logger.warning("rewriter: fused loss off for %s (%s); computing the logits", type(model).__name__, why)
    return why is None


def _why_not_fused(model: nn.Module, own_loss: bool) -> str | None:
    from torch.nn.modules import module as modules
    from transformers.loss.loss_utils import ForCausalLMLoss

    head = model.lm_head
    if type(head).forward is not nn.Linear.forward or "forward" in vars(head):
        return f"its LM head is a {type(head).__name__} with its own forward (LoRA, quantized, device hooks)"
    hooks = (head._forward_hooks, head._forward_pre_hooks, head._backward_hooks, head._backward_pre_hooks)
    global_hooks = (modules._global_forward_hooks, modules._global_forward_pre_hooks, modules._global_backward_hooks)
    if any(hooks) or any(global_hooks) or modules._global_backward_pre_hooks:
        return "hooks would run on its LM head's call"
    if head.bias is not None or type(head.weight) not in (torch.Tensor, nn.Parameter):
        return f"its LM head's weight is a {type(head.weight).__name__}, or it has a bias"
    if not head.weight.is_floating_point():
        return f"its LM head's weight is {head.weight.dtype}"
    if not own_loss and model.loss_function is not ForCausalLMLoss:
        return f"its loss function is {getattr(model.loss_function, '__name__', model.loss_function)!r}"
    return None


def causal_lm_loss(
    lm_head: nn.Linear,
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """What ``ForCausalLMLoss(logits, labels, vocab_size, **kwargs)`` returns for the logits
    ``lm_head(hidden_states)`` soft-capped at ``softcap``, without them: labels shifted left by one (unless
    ``shift_labels`` are given), the sum over labelled positions divided by ``num_items_in_batch``, else their mean.
    Other ``kwargs`` are the forward's, which that loss ignores too (``attention_mask`` included)."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return fused_linear_cross_entropy(
        hidden_states,
        lm_head.weight,
        shift_labels,
        softcap=softcap,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
    )


def masked_mean_loss(
    lm_head: nn.Linear,
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The multimodal models' own loss (Gemma-3 4.53.0 to 5.16.1) of the logits ``lm_head(hidden_states)``
    soft-capped at ``softcap``, without them: the mean cross-entropy over the shifted positions whose label token
    ``attention_mask`` keeps (its last columns, as many as the labels: peft's prefix tuning makes it longer),
    ``-100`` ignored; over every position without a mask."""
    if attention_mask is not None:
        kept = attention_mask[:, -labels.shape[1] :].to(labels.device) != 0
        labels = labels.masked_fill(~kept, -100)
    return causal_lm_loss(lm_head, hidden_states, labels, softcap)


def fused_linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    softcap: float | None = None,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """The float32 scalar ``ForCausalLMLoss(lm_head(hidden_states), shift_labels=labels)`` returns.

    ``hidden_states`` is [..., H] and ``labels`` its shape without H, already aligned (the caller shifts them);
    ``weight`` is the LM head's [V, H] weight, frozen or trainable (its gradient is computed only when it requires
    one; a weight tied to the input embedding gets both gradients summed by autograd). As in eager: the logits in the
    weight's dtype (autocast's, under autocast), the soft cap ``tanh(logits / softcap) * softcap`` in that dtype, then
    float32 log-softmax; the sum over labelled rows divided by ``num_items_in_batch`` when given, else their mean.
    Rows labelled ``ignore_index`` are never projected.

    A batch with no labelled row returns 0.0, with zero gradients, where eager's mean returns NaN: under gradient
    accumulation one NaN micro-batch would poison every weight, and a batch with nothing to learn from is a step of
    nothing to learn. The weight's gradient is accumulated in float32 across chunks (eager's one matmul accumulates
    in float32 too), then cast to its dtype. Not twice differentiable.
    """
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {hidden.shape[0]} rows of hidden states")
    rows = (labels != ignore_index).nonzero().squeeze(1)
    labelled = rows.numel()
    denominator = 1 if labelled == 0 else labelled if num_items_in_batch is None else num_items_in_batch
    denominator = torch.as_tensor(denominator, dtype=torch.float32, device=hidden.device)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    with torch.autocast(device, enabled=False):
        hidden, labels = hidden.index_select(0, rows), labels.index_select(0, rows)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _FusedLinearCrossEntropy.apply(hidden, weight, labels, softcap, denominator, dtype, chunk_size)
        losses = _chunked(hidden.to(dtype), weight.to(dtype), labels, softcap, denominator, chunk_size, None, None)
        return losses.sum() / denominator


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss and gradients in one pass over chunks of rows; the backward scales the saved gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, denominator, dtype, chunk_size):
        wants_hidden, wants_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_weight else None
        losses = _chunked(
            hidden.to(dtype), weight.to(dtype), labels, softcap, denominator, chunk_size, grad_hidden, grad_weight
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return losses.sum() / denominator

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None,
    denominator: torch.Tensor,
    chunk_size: int,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
) -> torch.Tensor:
    """Each row's cross-entropy, chunk by chunk; fills ``grad_hidden`` (rows) and adds to ``grad_weight`` (float32)
    the gradients of the loss, the sum over rows divided by ``denominator``, where they are given."""
    shape = (min(chunk_size, hidden.shape[0]), weight.shape[0])
    logits = hidden.new_empty(shape)
    scores = (
        logits if logits.dtype == torch.float32 and softcap is None else logits.new_empty(shape, dtype=torch.float32)
    )
    losses = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    scale = denominator.reciprocal()
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        rows, targets = hidden[chunk], labels[chunk]
        chunk_logits, chunk_scores = logits[: rows.shape[0]], scores[: rows.shape[0]]
        torch.mm(rows, weight.t(), out=chunk_logits)
        if softcap is not None:
            tanh = chunk_logits.div_(softcap).tanh_()
            torch.mul(tanh, softcap, out=chunk_scores)  # rounded to the logits' dtype first, as eager's .float()
        elif chunk_scores is not chunk_logits:
            chunk_scores.copy_(chunk_logits)
        losses[chunk] = _softmax_minus_target_(chunk_scores, targets, scale)
        if grad_hidden is None and grad_weight is None:
            continue
        grad = chunk_scores
        if softcap is not None:  # d(tanh(x / c) * c) / dx = 1 - tanh², in float32
            grad.addcmul_(grad, tanh.float().square_(), value=-1)
        if grad_hidden is not None:
            grad_hidden[chunk] = grad.to(weight.dtype) @ weight
        if grad_weight is not None:
            grad_weight.addmm_(grad.t(), rows.float())
    return losses


def _softmax_minus_target_(scores: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Each row's cross-entropy; ``scores`` becomes, in place, its gradient times ``scale``: softmax minus the
    one-hot target."""
    target = scores.gather(1, targets[:, None]).squeeze(1)
    peak = scores.amax(1, keepdim=True)
    total = scores.sub_(peak).exp_().sum(1, keepdim=True)
    scores.mul_(scale / total)
    scores[torch.arange(targets.shape[0], device=targets.device), targets] -= scale
    return (peak + total.log()).squeeze(1) - target
