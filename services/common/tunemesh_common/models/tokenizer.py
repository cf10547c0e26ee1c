"""The tiny models' tokenizer: a byte-level BPE trained in code on a built-in corpus.

Also reads the tokenizer files of any materialised model directory, which services
send to clients so that clients need no model hub.
"""

from __future__ import annotations

import random
from pathlib import Path

VOCAB_SIZE = 1024
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
MODEL_CONFIG_FILE = "config.json"

_SUBJECTS = ("the cat", "a dog", "my friend", "the teacher", "our model", "the student",
             "a bird", "the old man", "this machine", "the river", "she", "he", "they", "we")
_VERBS = ("sees", "likes", "writes", "reads", "finds", "counts", "trains", "answers",
          "asks", "learns", "builds", "moves", "holds", "opens")
_OBJECTS = ("a book", "the answer", "some numbers", "the door", "a question", "the data",
            "a small tree", "the last word", "an apple", "the code", "ten stones", "the map")
_ENDINGS = (".", "!", "?", " today.", " again.", " every day.", " in the morning.")


def _sentence(rng: random.Random) -> str:
    text = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
    return text[0].upper() + text[1:]


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    op = rng.choice("+-*")
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    if rng.random() < 0.5:
        return f"{a}{op}{b}={result}"
    return f"What is {a} {op} {b}? The answer is {result}."


def corpus(lines: int = 6000, seed: int = 0) -> list[str]:
    """Deterministic English-ish text with digits and arithmetic."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.45:
            out.append(_sentence(rng))
        elif kind < 0.9:
            out.append(_arithmetic(rng))
        else:
            out.append(" ".join(str(rng.randint(0, 10**rng.randint(1, 6))) for _ in range(5)))
    return out


def train_tiny_tokenizer():
    """Train the byte-level BPE (a `tokenizers.Tokenizer`); deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer


def save_tiny_tokenizer(directory: Path) -> None:
    """Write the tiny tokenizer as a transformers fast tokenizer with a chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_tiny_tokenizer(),
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))


def tokenizer_files(path: Path) -> dict[str, bytes]:
    """The tokenizer files present in a materialised model directory, by file name, with
    its `config.json` when it has any (Hugging Face loaders reading a hub cache need one);
    empty when the directory has no tokenizer."""
    path = Path(path)
    files = {
        name: (path / name).read_bytes()
        for name in TOKENIZER_FILE_NAMES
        if (path / name).is_file()
    }
    if files and (path / MODEL_CONFIG_FILE).is_file():
        files[MODEL_CONFIG_FILE] = (path / MODEL_CONFIG_FILE).read_bytes()
    return files
