"""A tiny Llama-architecture model built from a config, with a BPE tokenizer trained here on local text.

Seconds to build, a few hundred kilobytes, no download: what the language-model tests run on.
`build_base` writes a transformers directory (safetensors, tokenizer, ChatML chat template);
`train_adapter` trains a LoRA adapter on it for a few steps through `agent.lm.train`, the code
path `sitewarden lm train-adapter` takes; `lora_adapter` writes an untrained one (random weights,
so that it changes the answers) in a second, for tests that need another version or another base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from agent.lm import artifacts, train
from sitewarden import lm_task

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus() -> list[str]:
    lines = [text for text, _ in lm_task.examples(300, seed=1)]
    lines += [lm_task.SYSTEM, '{"queue": "cards", "ok": true, "n": [1, 2, 3]}', "IBAN DE89 3704 0044 0532 0130 00"]
    lines += list(lm_task.QUEUES) * 20
    return lines


def build_base(directory: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def train_adapter(
    base: Path, out: Path, *, base_ref: dict[str, str] | None = None, steps: int = 6, seed: int = 0
) -> dict:
    data = out.parent / f"{out.name}.jsonl"
    lm_task.write_jsonl(data, 40, seed=seed)
    ref = artifacts.BaseRef(**base_ref) if base_ref else None
    params = train.Hyperparameters(max_steps=steps, batch_size=8, learning_rate=1e-2, seed=seed)
    return train.train(base, data, out, params, base_release=ref, metadata={"note": json.dumps({"seed": seed})})


def lora_adapter(base: Path, out: Path, *, seed: int = 0, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A LoRA adapter of `base` with random weights (PEFT's `init_lora_weights=False`), written as PEFT does."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)
    return out


def build_embedding(directory: Path, base: Path) -> Path:
    """A tiny sentence-transformers model (BERT from a config, mean pooling, normalised), with `base`'s tokenizer."""
    encoder = directory.parent / f"{directory.name}-encoder"
    fast = PreTrainedTokenizerFast.from_pretrained(base)
    fast.save_pretrained(encoder)
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=len(fast),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=fast.pad_token_id,
    )
    BertModel(config).save_pretrained(encoder, safe_serialization=True)
    model = SentenceTransformer(modules=[Transformer(str(encoder), max_seq_length=128), Pooling(32), Normalize()])
    model.save(str(directory), safe_serialization=True)
    return directory
