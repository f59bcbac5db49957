"""Tiny models built from a config, for fast tests (float64, so that batching
a tree through one forward cannot move an argmax by rounding)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specbench.targets.hf import HFTarget

VOCAB = 96


def tiny_llama(seed: int, layers: int = 2, hidden: int = 48, vocab: int = VOCAB, std: float = 0.3) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    # a larger init spreads the logits so greedy decoding is not near-uniform
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    return model


def perturbed(model: LlamaForCausalLM, noise: float, seed: int = 99) -> LlamaForCausalLM:
    """A copy of `model` with Gaussian noise on every weight: a draft that agrees often, not always."""
    import copy

    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * noise)
    return draft


def tiny_target(seed: int = 0, **kw) -> HFTarget:
    return HFTarget(tiny_llama(seed, **kw), name=f"tiny-{seed}")


def prompts(n: int, seed: int = 123, length: tuple[int, int] = (4, 24), vocab: int = VOCAB) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(length[0], length[1], (1,), generator=g))
        # small alphabet with repeats so prompt lookup finds n-grams
        out.append(torch.randint(3, 3 + vocab // 4, (L,), generator=g))
    return out


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def char_tokenizer():
    """A character-level tokenizer over printable ASCII (+ <unk>, <s>, </s>), with a chat template."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_model(directory, seed: int, **kw):
    """A tiny Llama with the char tokenizer, saved as a local model directory (as a user would pass it)."""
    tokenizer = char_tokenizer()
    model = tiny_llama(seed, vocab=len(tokenizer), **kw)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
