"""The opt-in fused loss in the models' own forwards (``rewriter.compile(family, fused_loss=True)``): every LM-head
model of every family trains on the loss and gradients of its eager forward without ever holding [tokens,
vocabulary] logits for the backward, with ``Trainer`` (accumulation), peft (LoRA, on a 4-bit bitsandbytes model too),
gradient checkpointing, completion-only labels and TRL's ``SFTTrainer``; evaluation and generation keep the logits.

The oracle is each model's own eager forward (``rewriter.compile(family)``: the family's fixes, no fused loss) on
the same weights: the loss head has no upstream bug, only its memory.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from datasets import Dataset
from peft import LoraConfig, get_peft_model

import rewriter
from rewriter import fused_loss, testing
from tests.accumulation import train_one_step

LOSS_RTOL, GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-4, 1e-6  # the bounds (float32)
SFT_LOGS = ("loss", "mean_token_accuracy", "entropy")


# (family, how to build the model, extra inputs): every class the rule routes, tiny, with a 256-token vocabulary
MODELS = {
    "Gemma2ForCausalLM": ("gemma2", lambda: testing.gemma2_model("eager"), {}),
    "Gemma3ForCausalLM": ("gemma3", lambda: testing.text_model("gemma3"), {}),
    # its own mean loss over the positions the attention mask keeps: a batch with left padding
    "Gemma3ForConditionalGeneration": (
        "gemma3",
        lambda: transformers.Gemma3ForConditionalGeneration(testing.gemma3_vision_config()),
        {"attention_mask": torch.tensor([[1] * 12, [0] * 3 + [1] * 9]), "token_type_ids": torch.zeros(2, 12).long()},
    ),
    "Gemma3nForCausalLM": ("gemma3n", lambda: testing.text_model("gemma3n"), {}),
    "Gemma3nForConditionalGeneration": (
        "gemma3n",
        lambda: testing.gemma3n_multimodal(testing.gemma3n_config(), "gemma3n_vision", "gemma3n_audio"),
        {},
    ),
    "Gemma4ForCausalLM": ("gemma4", lambda: testing.text_model("gemma4"), {}),
    "Gemma4ForConditionalGeneration": (
        "gemma4",
        lambda: transformers.Gemma4ForConditionalGeneration(testing.vision_config()),
        {"mm_token_type_ids": torch.zeros(2, 12, dtype=int)},
    ),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: each family's fused entry is built (LibCST) once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def fused_calls(monkeypatch) -> list[str]:
    """The fused losses computed during the test, by name: the real functions, counted."""
    calls = []

    def counted(function):
        def call(*args, **kwargs):
            calls.append(function.__name__)
            return function(*args, **kwargs)

        return call

    for name in ("causal_lm_loss", "masked_mean_loss"):
        monkeypatch.setattr(fused_loss, name, counted(getattr(fused_loss, name)))
    return calls


def batch(extra: dict) -> dict:
    """Two rows of 12 tokens; the first row's prompt (5 tokens) unlabelled, as a completion-only collator does."""
    ids = testing.input_ids(batch=2, length=12)
    labels = ids.clone()
    labels[0, :5] = -100
    return {"input_ids": ids, "labels": labels, **extra}


def train_forward(model, inputs: dict) -> tuple[object, dict[str, torch.Tensor], int]:
    """The outputs and every parameter's gradient of one forward and backward, and the largest tensor as wide as
    the vocabulary that the forward saved for the backward (elements; 0 if none)."""
    vocabulary, largest = model.config.get_text_config().vocab_size, 0

    def saved(tensor):
        nonlocal largest
        if tensor.dim() and tensor.shape[-1] == vocabulary:
            largest = max(largest, tensor.numel())
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(saved, lambda tensor: tensor):
        outputs = model(**inputs)
    outputs.loss.backward()
    return outputs, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, largest


def assert_same_training(eager: tuple, fused: tuple) -> None:
    (eager_out, eager_grads, _), (fused_out, fused_grads, _) = eager, fused
    torch.testing.assert_close(fused_out.loss, eager_out.loss, rtol=LOSS_RTOL, atol=0)
    assert fused_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


@pytest.mark.parametrize("name", MODELS)
def test_training_forward_gives_the_eager_loss_and_gradients_without_logits(name, cache):
    family, build, extra = MODELS[name]
    rewriter.compile(family, cache_dir=cache, strict=True)
    model = testing.seeded(build()).train()
    inputs = batch(extra)
    logits_size = inputs["input_ids"].numel() * model.config.get_text_config().vocab_size

    eager = train_forward(model, inputs)
    assert eager[0].logits.numel() == logits_size and eager[2] >= logits_size  # the backward keeps the logits

    report = rewriter.compile(family, cache_dir=cache, strict=True, fused_loss=True)
    assert report.outcome("fused-loss").status == "applied"
    fused = train_forward(model, inputs)
    assert fused[0].logits is None and fused[2] == 0
    assert_same_training(eager, fused)

    with torch.no_grad():  # evaluation keeps the logits, and the eager loss
        evaluated = model(**inputs)
    torch.testing.assert_close(evaluated.logits, eager[0].logits)
    torch.testing.assert_close(evaluated.loss, eager[0].loss)


def test_generation_is_unchanged(cache):
    model = testing.seeded(testing.text_model("gemma4"))
    prompt = testing.input_ids(batch=1, length=6)
    rewriter.compile("gemma4", cache_dir=cache)
    eager = model.generate(prompt, max_new_tokens=5, do_sample=False)
    rewriter.compile("gemma4", cache_dir=cache, fused_loss=True)
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), eager)


def test_trainer_step_with_gradient_accumulation_equals_eager(cache, fused_calls):
    """``Trainer`` hands ``num_items_in_batch`` to the forward: 4 rows as one batch and as 4 accumulated ones."""
    rewriter.compile("gemma4", cache_dir=cache, strict=True)
    eager = train_one_step(batch_size=1, accumulation=4)
    assert fused_calls == []
    rewriter.compile("gemma4", cache_dir=cache, strict=True, fused_loss=True)
    for batch_size, accumulation in ((1, 4), (4, 1)):
        fused_calls.clear()
        loss, after = train_one_step(batch_size, accumulation)
        assert fused_calls == ["causal_lm_loss"] * accumulation
        assert loss == pytest.approx(eager[0], rel=LOSS_RTOL)
        for name, parameter in eager[1].items():
            torch.testing.assert_close(after[name], parameter, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


def with_lora(model, target_modules: list[str]):
    """``model`` with LoRA adapters (non-zero from the start, so that they get gradients) on ``target_modules``."""
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules, init_lora_weights=False)
    return get_peft_model(model, lora).train()


def lora_model(target_modules: list[str], checkpointing: bool = False):
    model = testing.seeded(testing.text_model("gemma4"))
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
    return with_lora(model, target_modules)


def eager_then_fused(model, cache) -> tuple[tuple, tuple]:
    """``train_forward`` of a Gemma-4 ``model`` on ``batch({})`` with the family's fixes, then with the fused loss."""
    rewriter.compile("gemma4", cache_dir=cache, strict=True)
    eager = train_forward(model, batch({}))
    rewriter.compile("gemma4", cache_dir=cache, strict=True, fused_loss=True)
    return eager, train_forward(model, batch({}))


def test_lora_with_gradient_checkpointing_and_a_frozen_head(cache):
    model = lora_model(["q_proj", "v_proj"], checkpointing=True)
    eager, fused = eager_then_fused(model, cache)
    assert fused[0].logits is None
    assert fused[1] and all("lora_" in name for name in fused[1])
    assert_same_training(eager, fused)


def test_an_lm_head_that_is_not_a_plain_linear_keeps_the_logits_and_says_so(cache, caplog, monkeypatch):
    """LoRA on the LM head: its weight alone is not the head, so the forward computes the logits, with one warning."""
    model = lora_model(["q_proj", "lm_head"])
    monkeypatch.setattr(fused_loss, "_warned", set())  # once per reason and process
    with caplog.at_level(logging.WARNING, logger="rewriter"):
        eager, kept = eager_then_fused(model, cache)
        train_forward(model, batch({}))
    assert kept[0].logits is not None
    assert_same_training(eager, kept)
    warnings = [record.getMessage() for record in caplog.records if "fused loss off" in record.getMessage()]
    assert len(warnings) == 1 and "Linear with its own forward" in warnings[0]


def test_lora_on_a_4bit_model(cache, tmp_path):
    """QLoRA: bitsandbytes quantizes every linear but the LM head, which the fused loss reads."""
    config = testing.text_config(2, hidden_size=128, intermediate_size=256)  # bitsandbytes quantizes 64 wide or more
    testing.seeded(transformers.Gemma4ForCausalLM(config)).save_pretrained(tmp_path)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.Gemma4ForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    eager, fused = eager_then_fused(with_lora(model, ["q_proj", "v_proj"]), cache)
    assert fused[0].logits is None
    assert_same_training(eager, fused)


def test_sft_trainer_completion_only_logs_what_it_logs_eager(cache, tmp_path, fused_calls):
    """TRL's SFTTrainer (1.x) computes its loss and token accuracy with its own fused LM head, from the backbone,
    never calling the rewritten head: with the fused loss installed, the same losses, accuracies and weights, on
    prompt-completion data (completion-only)."""
    from trl import SFTConfig, SFTTrainer

    sentences = testing.sentences()
    data = Dataset.from_dict({"prompt": sentences[::2], "completion": [" " + words for words in sentences[1::2]]})
    runs = []
    for fused in (False, True):
        rewriter.compile("gemma4", cache_dir=cache, strict=True, fused_loss=fused)
        model = testing.seeded(testing.text_model("gemma4"))
        args = SFTConfig(
            output_dir=str(tmp_path),
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            max_steps=2,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=testing.word_tokenizer())
        trainer.train()
        logged = [entry[key] for entry in trainer.state.log_history if "loss" in entry for key in SFT_LOGS]
        runs.append((logged, {name: p.detach().clone() for name, p in model.named_parameters()}))
    assert fused_calls == []
    (eager_logs, eager_weights), (fused_logs, fused_weights) = runs
    assert len(eager_logs) == 2 * len(SFT_LOGS) and fused_logs == pytest.approx(eager_logs, rel=LOSS_RTOL)
    for name, weight in eager_weights.items():
        torch.testing.assert_close(fused_weights[name], weight, msg=name)


def test_the_causal_lm_loss_ignores_an_attention_mask_as_for_causal_lm_loss_does():
    """Only Gemma-3's own loss drops the positions the mask pads; ``ForCausalLMLoss`` takes and ignores the mask."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    head = torch.nn.Linear(16, 64, bias=False)
    hidden = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    eager = ForCausalLMLoss(head(hidden), labels, 64, attention_mask=mask)
    torch.testing.assert_close(fused_loss.causal_lm_loss(head, hidden, labels, None, attention_mask=mask), eager)
    assert not torch.allclose(fused_loss.masked_mean_loss(head, hidden, labels, None, mask), eager)


def test_compile_on_import_gives_the_fused_loss_to_the_families_that_have_it(cache):
    import transformers.models.gemma4.modeling_gemma4  # noqa: F401  (imported: compiled at once)
    import transformers.trainer  # noqa: F401

    with pytest.raises(ValueError, match="trainer has no feature fused-loss"):
        rewriter.compile_on_import("trainer", fused_loss=True)
    rewriter.compile_on_import(cache_dir=cache, fused_loss=True)
    assert rewriter.compiled("gemma4").outcome("fused-loss").status == "applied"
    assert [outcome.rule for outcome in rewriter.compiled("trainer").outcomes] == ["accumulation-double-division"]
