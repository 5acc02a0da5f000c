"""rewriter.fused_loss against the eager loss head it replaces: ``F.linear``, Gemma's soft cap, ``.float()`` and
``F.cross_entropy`` (what transformers' ``ForCausalLMLoss`` computes), in float32 as transformers runs it and in
float64 as the oracle; and the memory it keeps, counted in bytes, not timed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers.loss.loss_utils import ForCausalLMLoss

from rewriter import testing
from rewriter.fused_loss import fused_linear_cross_entropy

ROWS, HIDDEN, VOCABULARY, CHUNK = 300, 48, 2_000, 64  # 300 rows: the last chunk is partial
LOSS_RTOL, GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-4, 1e-6


def eager_loss(hidden, weight, labels, softcap=None, num_items_in_batch=None, compute_dtype=None) -> torch.Tensor:
    """The eager loss head in the inputs' dtype (``compute_dtype``: float64 for the oracle, the whole way through)."""
    logits = F.linear(hidden, weight)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.to(compute_dtype or torch.float32).reshape(-1, weight.shape[0])
    labels = labels.reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch


def inputs(dtype=torch.float32, batch=2, seed=0, weight_grad=True):
    """Hidden states [batch, rows / batch, HIDDEN], a weight whose logits reach +-15 (where a cap of 30 bends them),
    and labels with the first third of each row ignored, as a prompt is under a completion-only loss."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, ROWS // batch, HIDDEN, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(VOCABULARY, HIDDEN, generator=generator) * 0.5).to(dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, VOCABULARY, (batch, ROWS // batch), generator=generator)
    labels[:, : ROWS // batch // 3] = -100
    return hidden, weight, labels


def loss_and_grads(compute, hidden, weight, labels, **options):
    """The loss ``compute`` returns on copies of the inputs in their own graph, and the copies' gradients."""
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_(weight.requires_grad)
    loss = compute(hidden, weight, labels, **options)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def fused(hidden, weight, labels, **options) -> torch.Tensor:
    return fused_linear_cross_entropy(hidden, weight, labels, chunk_size=CHUNK, **options)


def oracle(hidden, weight, labels, **options) -> torch.Tensor:
    return eager_loss(hidden.double(), weight.double(), labels, compute_dtype=torch.float64, **options)


def assert_matches(actual, expected):
    loss, *grads = actual
    expected_loss, *expected_grads = expected
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected_loss.double(), rtol=LOSS_RTOL, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        assert (grad is None) == (expected_grad is None)
        if grad is not None:
            torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize("softcap", [None, 30.0, 5.0], ids=["no-cap", "cap-30", "cap-5-saturating"])
@pytest.mark.parametrize("num_items_in_batch", [None, 173, torch.tensor(173)], ids=["mean", "int", "tensor"])
def test_loss_and_gradients_match_float32_eager_and_the_float64_oracle(softcap, num_items_in_batch):
    hidden, weight, labels = inputs()
    options = {"softcap": softcap, "num_items_in_batch": num_items_in_batch}
    actual = loss_and_grads(fused, hidden, weight, labels, **options)
    assert_matches(actual, loss_and_grads(eager_loss, hidden, weight, labels, **options))
    assert_matches(actual, loss_and_grads(oracle, hidden, weight, labels, **options))


def test_the_loss_is_transformers_for_causal_lm_loss_with_shift_labels():
    hidden, weight, labels = inputs()
    with torch.no_grad():
        logits = torch.tanh(F.linear(hidden, weight) / 30.0) * 30.0
        expected = ForCausalLMLoss(logits, None, VOCABULARY, num_items_in_batch=torch.tensor(173), shift_labels=labels)
        actual = fused(hidden, weight, labels, softcap=30.0, num_items_in_batch=torch.tensor(173))
    torch.testing.assert_close(actual, expected, rtol=LOSS_RTOL, atol=0)
    assert not actual.requires_grad  # no_grad: the loss alone, no gradients computed


def test_the_incoming_gradient_scales_both_gradients():
    def scaled(loss):
        return lambda *args, **options: 2.5 * loss(*args, **options)

    hidden, weight, labels = inputs()
    assert_matches(
        loss_and_grads(scaled(fused), hidden, weight, labels, softcap=30.0),
        loss_and_grads(scaled(oracle), hidden, weight, labels, softcap=30.0),
    )


def test_a_frozen_weight_gets_no_gradient_and_none_is_computed():
    hidden, weight, labels = inputs(weight_grad=False)
    loss, hidden_grad, weight_grad = loss_and_grads(fused, hidden, weight, labels, softcap=30.0)
    assert weight_grad is None and weight.grad is None
    assert_matches((loss, hidden_grad), loss_and_grads(oracle, hidden, weight, labels, softcap=30.0)[:2])
    saved = saved_for_backward(lambda: fused(hidden, weight, labels, softcap=30.0))
    assert max(t.numel() for t in saved) == hidden.numel() * 2 // 3  # the labelled rows' gradient, no weight's


@pytest.mark.parametrize("num_items_in_batch", [None, torch.tensor(5)], ids=["mean", "accumulated"])
def test_a_batch_with_no_labelled_row_is_a_zero_loss_with_zero_gradients(num_items_in_batch):
    hidden, weight, labels = inputs()
    labels = torch.full_like(labels, -100)
    loss, hidden_grad, weight_grad = loss_and_grads(
        fused, hidden, weight, labels, softcap=30.0, num_items_in_batch=num_items_in_batch
    )
    assert loss.item() == 0.0
    assert not hidden_grad.any() and not weight_grad.any()
    eager = eager_loss(hidden, weight, labels, softcap=30.0, num_items_in_batch=num_items_in_batch)
    assert eager.isnan().item() == (num_items_in_batch is None)  # eager's mean of nothing is NaN


def test_bfloat16_matches_bfloat16_eager():
    """Both compute the same bfloat16 logits and soft cap, so the losses agree to float32 rounding. The gradients
    differ by bfloat16 rounding: eager rounds the logits' gradient to bfloat16 before the soft cap's derivative and
    after it, where this keeps it in float32 up to the matmuls. One bfloat16 step near the largest gradient is up to
    2^-8 of it (0.4%); they differ by 0.6% of the largest (measured), allowed 1%, and each is no further from the
    float64 oracle than 1.5 times eager bfloat16's own error (1.2 times measured)."""
    hidden, weight, labels = inputs(torch.bfloat16)
    loss, *grads = loss_and_grads(fused, hidden, weight, labels, softcap=30.0)
    expected_loss, *expected = loss_and_grads(eager_loss, hidden, weight, labels, softcap=30.0)
    _, *exact = loss_and_grads(oracle, hidden, weight, labels, softcap=30.0)
    assert grads[0].dtype == grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    for grad, eager_grad, oracle_grad in zip(grads, expected, exact):
        grad, eager_grad = grad.double(), eager_grad.double()
        assert (grad - eager_grad).abs().max() <= 0.01 * eager_grad.abs().max()
        assert (grad - oracle_grad).abs().max() <= 1.5 * (eager_grad - oracle_grad).abs().max()


def test_autocast_computes_the_head_in_the_autocast_dtype_as_eager():
    hidden, weight, labels = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = loss_and_grads(fused, hidden, weight, labels, softcap=30.0)
        expected = loss_and_grads(eager_loss, hidden, weight, labels, softcap=30.0)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=0)
    assert actual[1].dtype == actual[2].dtype == torch.float32  # gradients in the inputs' dtype
    for grad, expected_grad in zip(actual[1:], expected[1:]):
        assert (grad - expected_grad).abs().max() <= 0.01 * expected_grad.abs().max()


def test_a_weight_tied_to_the_input_embedding_gets_both_gradients():
    def through_embedding(loss):
        def compute(hidden, weight, labels, **options):
            embedded = F.embedding(labels.clamp(min=0), weight)  # the same weight as input embedding
            return loss(hidden + embedded, weight, labels, **options)

        return compute

    hidden, weight, labels = inputs()
    assert_matches(
        loss_and_grads(through_embedding(fused), hidden, weight, labels, softcap=30.0),
        loss_and_grads(through_embedding(oracle), hidden, weight, labels, softcap=30.0),
    )


def test_a_gemma4_model_with_gradient_checkpointing_gets_eager_gradients():
    """The rewritten forward's emulation: the base model's hidden states through the fused loss, with the model's
    own soft cap and LM head (tied to the embedding), against the model's forward with labels; every parameter."""
    config = testing.text_config(2, vocab_size=1_024, final_logit_softcapping=30.0)
    ids = testing.input_ids(batch=2, length=16)

    def gradients(use_fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = testing.causal_lm(2, config=config).train()
        model.gradient_checkpointing_enable()
        assert model.lm_head.weight is model.model.embed_tokens.weight and model.is_gradient_checkpointing
        if use_fused:
            hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
            loss = fused(hidden, model.lm_head.weight, ids[:, 1:], softcap=model.config.final_logit_softcapping)
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    (loss, grads), (expected_loss, expected_grads) = gradients(True), gradients(False)
    torch.testing.assert_close(loss, expected_loss, rtol=LOSS_RTOL, atol=0)
    assert grads.keys() == expected_grads.keys() and len(grads) > 50
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


def test_rows_and_labels_must_agree():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match="labels for 300 rows"):
        fused(hidden, weight, labels[:, 1:])


# Memory: a longer batch, so that [rows, vocabulary] dwarfs the weight
MEMORY_ROWS, MEMORY_VOCABULARY = 1_024, 4_096
LOGITS_BYTES = MEMORY_ROWS * MEMORY_VOCABULARY * 4


def memory_inputs():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(MEMORY_ROWS, HIDDEN, generator=generator, requires_grad=True)
    weight = torch.randn(MEMORY_VOCABULARY, HIDDEN, generator=generator, requires_grad=True)
    return hidden, weight, torch.randint(0, MEMORY_VOCABULARY, (MEMORY_ROWS,), generator=generator)


def saved_for_backward(compute) -> list[torch.Tensor]:
    """Every tensor the graph of ``compute()`` saves for its backward."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute().backward()
    return saved


def peak_bytes(compute) -> int:
    """The peak of CPU tensor memory allocated while ``compute()`` and its backward run, from the profiler's
    allocation and free events, in the order they happened."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        compute().backward()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return peak


def test_no_rows_by_vocabulary_tensor_is_saved_for_backward():
    hidden, weight, labels = memory_inputs()
    fused_saved = saved_for_backward(lambda: fused(hidden, weight, labels, softcap=30.0))
    eager_saved = saved_for_backward(lambda: eager_loss(hidden, weight, labels, softcap=30.0))
    assert max(t.numel() for t in fused_saved) == weight.numel()  # the weight's float32 gradient
    assert sum(t.nbytes for t in fused_saved) <= 2 * (hidden.nbytes + weight.nbytes)
    assert sum(t.nbytes for t in eager_saved) >= 3 * LOGITS_BYTES  # the logits, /cap, tanh, log-softmax: 4 copies


def test_the_peak_holds_one_chunk_of_logits_not_all_of_them():
    hidden, weight, labels = memory_inputs()
    fused_peak = peak_bytes(lambda: fused(hidden, weight, labels, softcap=30.0))
    eager_peak = peak_bytes(lambda: eager_loss(hidden, weight, labels, softcap=30.0))
    chunk_buffers = 2 * CHUNK * MEMORY_VOCABULARY * 4  # the raw logits and the scores
    assert fused_peak <= chunk_buffers + 3 * (hidden.nbytes + weight.nbytes)
    assert eager_peak >= 4 * LOGITS_BYTES
