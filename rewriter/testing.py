"""Tiny random-weight Gemma models that reproduce every bug on a CPU in seconds.

Shared by the demo, the tests, the benchmarks and the fixture scripts; the layer pattern alternates sliding and
full attention, and full layers have a larger head_dim than sliding ones, as in the real checkpoints.
"""

from __future__ import annotations

import hashlib
import zlib

import torch


def text_config(num_kv_shared_layers: int, **overrides):
    """Six layers, window 8; ``num_kv_shared_layers=0`` shows bug 1, ``2`` shows bug 2."""
    from transformers import Gemma4TextConfig

    settings = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        layer_types=["sliding_attention", "full_attention"] * 3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        vocab_size_per_layer_input=256,
        hidden_size_per_layer_input=16,
        sliding_window=8,
        num_kv_shared_layers=num_kv_shared_layers,
        max_position_embeddings=512,
    )
    return Gemma4TextConfig(**{**settings, **overrides})


def e2b_text_config(**overrides):
    """Gemma-4 E2B's layer pattern at tiny widths: 35 layers, four sliding to one full, the last 20 KV-shared."""
    pattern = (["sliding_attention"] * 4 + ["full_attention"]) * 7
    return text_config(20, num_hidden_layers=35, layer_types=pattern, **overrides)


def layer_pattern_31b(num_hidden_layers: int = 60) -> list[str]:
    """Gemma-4 31B's layer pattern: five sliding layers to one full, no KV-shared layers."""
    return (["sliding_attention"] * 5 + ["full_attention"]) * (num_hidden_layers // 6)


SPECIAL_TOKENS = dict(
    image_token_id=255, boi_token_id=254, eoi_token_id=253, video_token_id=252, audio_token_id=251, boa_token_id=250
)


def vision_config(patch_size: int = 4, **text_overrides):
    """A multimodal config whose vision tower's ``input_proj`` takes 3 * patch_size**2 pixels (48 by default;
    bitsandbytes on the CPU needs 64 or more to quantize it: ``patch_size=8``). Special tokens fit the vocabulary."""
    from transformers import Gemma4Config

    return Gemma4Config(
        **SPECIAL_TOKENS,
        text_config=text_config(0, **text_overrides),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=16,
            patch_size=patch_size,
            position_embedding_size=64,
            pooling_kernel_size=2,
        ),
        audio_config=None,
    )


def overflowing_vision_model():
    """A multimodal model whose standardized vision tower, in float16, overflows where the pooler scales by
    sqrt(hidden_size) (the encoder output passes 65504 / 8), while its standardization (as trained checkpoints have)
    brings the image features back to order 1. Float32, in eval mode; ``image_patches()`` is its input."""
    from transformers import Gemma4ForConditionalGeneration

    config = vision_config()
    config.vision_config.standardize = True
    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(config).eval()
    tower = model.model.vision_tower
    pixels, positions = image_patches()
    with torch.no_grad():
        tower.patch_embedder.input_proj.weight.mul_(1e5)
        tower.std_bias.zero_(), tower.std_scale.fill_(1.0)
        scaled = tower(pixels, positions).last_hidden_state
        tower.std_bias.copy_(scaled.mean(0)), tower.std_scale.copy_(1 / scaled.std(0))
    return model


def causal_lm(num_kv_shared_layers: int, seed: int = 0, config=None):
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(seed)
    return Gemma4ForCausalLM(config or text_config(num_kv_shared_layers)).eval()


def gemma3_text_config(**overrides):
    """A Gemma-3 text model: six layers, two sliding to one full, window 8."""
    from transformers import Gemma3TextConfig

    settings = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        max_position_embeddings=512,
    )
    return Gemma3TextConfig(**{**settings, **overrides})


def gemma3_vision_config(**text_overrides):
    """A Gemma-3 multimodal config: a one-layer SigLIP tower on 16x16 images, four soft tokens per image."""
    from transformers import Gemma3Config

    return Gemma3Config(
        text_config=gemma3_text_config(**text_overrides).to_dict(),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
        ),
        mm_tokens_per_image=4,
        image_token_index=255,
        boi_token_index=254,
        eoi_token_index=253,
    )


def gemma3n_text_config(num_kv_shared_layers: int = 2, **overrides):
    """A Gemma-3n text model: six layers, two sliding to one full, window 8, the last ``num_kv_shared_layers``
    KV-shared (the configuration of docs/bugs/kv-sharing-without-cache.md)."""
    from transformers import Gemma3nTextConfig

    settings = dict(
        vocab_size=256,
        vocab_size_per_layer_input=256,
        hidden_size=64,
        hidden_size_per_layer_input=16,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=8,
        num_kv_shared_layers=num_kv_shared_layers,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        laurel_rank=8,
        altup_num_inputs=2,
        activation_sparsity_pattern=[0.0] * 6,
        max_position_embeddings=512,
    )
    return Gemma3nTextConfig(**{**settings, **overrides})


def gemma3n_config(**text_overrides):
    """A Gemma-3n multimodal config: ``gemma3n_text_config(**text_overrides)`` and small vision and audio embedders."""
    from transformers import Gemma3nConfig

    towers = {"vision_config": {"hidden_size": 64}, "audio_config": {"hidden_size": 64}}
    return Gemma3nConfig(text_config=gemma3n_text_config(**text_overrides).to_dict(), **towers)


def text_model(family: str, seed: int = 0):
    """A tiny causal language model of ``family`` (``gemma3``, ``gemma3n`` or ``gemma4``), in eval mode."""
    import transformers

    configs = {"gemma3": gemma3_text_config, "gemma3n": gemma3n_text_config, "gemma4": lambda: text_config(2)}
    classes = {"gemma3": "Gemma3ForCausalLM", "gemma3n": "Gemma3nForCausalLM", "gemma4": "Gemma4ForCausalLM"}
    torch.manual_seed(seed)
    return getattr(transformers, classes[family])(configs[family]()).eval()


AUDIO_FEATURES, AUDIO_FRAMES = 16, 80  # the tiny audio tower's input width; 80 frames are 20 audio tokens


def audio_config(**overrides):
    """A two-layer Gemma-4 audio tower with the real checkpoints' chunking (chunks of 12 frames, 13 of left
    context), but for ``overrides``."""
    from transformers import Gemma4AudioConfig

    settings = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        subsampling_conv_channels=[16, 8],
        conv_kernel_size=3,
        output_proj_dims=48,
    )
    return Gemma4AudioConfig(**{**settings, **overrides})


def seeded(model):
    """``model`` with every parameter drawn from a generator seeded by its name: the same weights in any release.
    In eval mode."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def seeded_in_name_order(model, scale: float = 0.05):
    """``model`` with every parameter drawn, in name order, from one generator seeded with 0: the same weights in any
    release whose parameters have the same shapes in name order (``weights_digest`` tells), even where names differ."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def weights_digest(model) -> str:
    """Every parameter's shape and values, in name order: what makes two releases' seeded models the same."""
    digest = hashlib.sha256()
    for _, parameter in sorted(model.named_parameters()):
        digest.update(str(tuple(parameter.shape)).encode())
        digest.update(parameter.detach().double().numpy().tobytes())
    return digest.hexdigest()[:16]


def gemma3n_multimodal(config, *empty_towers: str):
    """``Gemma3nForConditionalGeneration(config)`` with the towers whose ``model_type`` is in ``empty_towers``
    (``"gemma3n_vision"``, ``"gemma3n_audio"``) built as empty modules: the vision tower is a timm model, and timm
    needs a torchvision that has no build for this torch; tests that feed a tower no input need not build it."""
    import transformers
    from transformers.models.gemma3n import modeling_gemma3n

    class Towers:
        def __init__(self, auto_model):
            self.auto_model = auto_model

        def from_config(self, config=None, **kwargs):
            config = config if config is not None else kwargs.pop("config")
            if config.model_type in empty_towers:
                return torch.nn.Module()
            return self.auto_model.from_config(config, **kwargs)

    auto_model, modeling_gemma3n.AutoModel = modeling_gemma3n.AutoModel, Towers(modeling_gemma3n.AutoModel)
    try:
        return transformers.Gemma3nForConditionalGeneration(config)
    finally:
        modeling_gemma3n.AutoModel = auto_model


def audio_tower(attn_implementation: str, dtype: torch.dtype = torch.float32):
    """``audio_config()``'s tower, seeded, with the attention implementation (the mask format) asked for."""
    from transformers import Gemma4AudioModel

    return seeded(Gemma4AudioModel._from_config(audio_config(), attn_implementation=attn_implementation)).to(dtype)


def audio_clips(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Input features and mask of ``batch`` clips; the second one is shorter (its last 30 frames are padding)."""
    features = torch.randn(batch, AUDIO_FRAMES, AUDIO_FEATURES, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(batch, AUDIO_FRAMES, dtype=torch.bool)
    mask[1:, AUDIO_FRAMES - 30 :] = False
    return features, mask


def audio_features(tower, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tower's features of ``audio_clips()``."""
    features, mask = audio_clips()
    with torch.no_grad():
        return tower(features.to(dtype), mask).last_hidden_state


def gemma2_model(implementation: str | None = None):
    """A tiny Gemma-2 causal language model whose attention logits the cap (1.0 here; 50.0 by default) bites on:
    weights drawn from one seeded generator in parameter order, whatever the release's initialisation, with large
    query and key projections. ``implementation`` is the ``attn_implementation`` asked for (none: the default).
    In eval mode."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    asked = {"attn_implementation": implementation} if implementation else {}
    config = Gemma2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attn_logit_softcapping=1.0,
        **asked,
    )
    model = Gemma2ForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = 0.4 if name.endswith(("q_proj.weight", "k_proj.weight")) else 0.05
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


def per_layer_inputs_model(family: str, dtype: torch.dtype = torch.float32):
    """A tiny Gemma-4 (hidden 96: ``sqrt(96)`` is not a bfloat16 number) or Gemma-3n causal language model whose
    per-layer inputs count: random per-layer weights, and Gemma-3n's AltUp correction scale, which starts at zero
    (it multiplies the per-layer branch), made non-zero as in real checkpoints. In eval mode, in ``dtype``."""
    from transformers import Gemma3nForCausalLM, Gemma4ForCausalLM

    torch.manual_seed(0)
    if family == "gemma4":
        model = Gemma4ForCausalLM(text_config(2, hidden_size=96))
    else:
        model = Gemma3nForCausalLM(gemma3n_text_config())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "per_layer" in name or "correct_output_scale" in name:
                parameter.normal_(std=0.5)
    return model.eval().to(dtype)


def input_ids(batch: int = 1, length: int = 12, seed: int = 1) -> torch.Tensor:
    """Random text tokens, none of them special."""
    return torch.randint(0, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


def image_prompt(soft_tokens: int = 4) -> torch.Tensor:
    """Text around one image: ``boi``, ``soft_tokens`` image tokens, ``eoi``."""
    image = [SPECIAL_TOKENS["boi_token_id"], *[SPECIAL_TOKENS["image_token_id"]] * soft_tokens, SPECIAL_TOKENS["eoi_token_id"]]
    return torch.tensor([[2, 17, 42, *image, 99, 7]])


def image_patches(grid: int = 4, seed: int = 2, patch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """One image as the processor hands it over: ``grid * grid`` patches of 3 * patch_size**2 pixels, and their
    (x, y) positions. The vision tower pools them into ``(grid // 2) ** 2`` soft tokens."""
    pixels = torch.rand(1, grid * grid, 3 * patch_size**2, generator=torch.Generator().manual_seed(seed))
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return pixels, torch.stack([xs.flatten(), ys.flatten()], dim=-1).unsqueeze(0)


def word_tokenizer():
    """A tokenizer of the words ``w0`` to ``w99`` (ids 4 to 103), built here, since nothing can be downloaded.
    Like Gemma's own tokenizers it returns no token types."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"w{i}" for i in range(100))]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )


def sentences(count: int = 8, words: int = 11) -> list[str]:
    """Text-only training rows of ``w...`` words, all the same length."""
    return [" ".join(f"w{(row * 7 + i * 3) % 100}" for i in range(words)) for row in range(count)]


CHAT_TEMPLATE = (  # Gemma's shape: the template writes <bos> itself
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }} {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>{% else %}{{ part['text'] }}{% endif %} {% endfor %}<end_of_turn> "
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model {% endif %}"
)
MEDIA_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
    "boa_token": "<start_of_audio>",
    "eoa_token": "<end_of_audio>",
    "audio_token": "<audio_soft_token>",
}


def chat_tokenizer():
    """A word-level tokenizer of ``w0`` to ``w99`` and the chat and media tokens, which, as Gemma's, puts ``<bos>``
    before what it encodes, and whose chat template writes ``<bos>`` itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", *MEDIA_TOKENS.values()]
    vocabulary = {word: i for i, word in enumerate([*specials, "user", "model", *(f"w{i}" for i in range(100))])}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        extra_special_tokens=MEDIA_TOKENS,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def processor(family: str):
    """A Gemma-3 or Gemma-3n processor of ``chat_tokenizer`` and real image (and audio) processors, Pillow's, four
    soft tokens an image or a clip."""
    tokenizer = chat_tokenizer()
    if family == "gemma3n":
        from transformers import Gemma3nProcessor, SiglipImageProcessor
        from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor

        parts = (Gemma3nAudioFeatureExtractor(), SiglipImageProcessor(), tokenizer)
        return Gemma3nProcessor(*parts, chat_template=CHAT_TEMPLATE, audio_seq_length=4, image_seq_length=4)
    from transformers import Gemma3Processor

    try:
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil as ImageProcessor
    except ImportError:  # before 5.15.0 the Pillow processor is the plain one
        from transformers.models.gemma3.image_processing_gemma3 import Gemma3ImageProcessor as ImageProcessor
    return Gemma3Processor(ImageProcessor(), tokenizer, chat_template=CHAT_TEMPLATE, image_seq_length=4)


def flash_attention_stand_in():
    """A context manager under which ``"flash_attention_2"`` runs what FlashAttention-2 computes, on the CPU through
    sdpa: causal attention over a 2D padding mask, the only mask FlashAttention takes (sliding windows aside)."""
    import contextlib

    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def flash_attention(module, query, key, value, attention_mask, **kwargs):
        if attention_mask is not None and attention_mask.dim() != 2:
            raise AssertionError(f"FlashAttention takes a 2D padding mask, not {tuple(attention_mask.shape)}")
        queries, keys = query.shape[2], key.shape[2]
        causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)[None, None]
        mask = causal if attention_mask is None else causal & attention_mask[:, None, None, -keys:].bool()
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, mask.expand(query.shape[0], 1, -1, -1), **kwargs)

    @contextlib.contextmanager
    def installed():
        mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
        before = mapping["flash_attention_2"]
        mapping["flash_attention_2"] = flash_attention
        try:
            yield
        finally:
            mapping["flash_attention_2"] = before

    return installed()


def gemma3_image_model(implementation: str = "sdpa"):
    """A Gemma-3 multimodal model (``gemma3_vision_config``, seed 0) whose text layers use ``implementation``; its
    sliding window is wider than any test input, as ``flash_attention_stand_in`` has no window."""
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    config = gemma3_vision_config(sliding_window=512)
    config._attn_implementation = implementation
    return Gemma3ForConditionalGeneration(config).eval()


def gemma3_image_inputs() -> dict:
    """``image_prompt`` with one random 16x16 image and its image token types, as the processor hands them over."""
    ids = image_prompt()
    image_token = gemma3_vision_config().image_token_index
    return {"input_ids": ids, "pixel_values": torch.rand(1, 3, 16, 16), "token_type_ids": (ids == image_token).long()}


def use_attention(model, implementation: str) -> None:
    """Make a Gemma-3 multimodal model's text layers and masks use ``implementation`` (the vision tower keeps its own)."""
    model.config.text_config._attn_implementation = implementation
    model.model.language_model.config._attn_implementation = implementation  # a copy of its own in 4.x
