"""Test helpers for the data / CLI tests: a character-level tokenizer that fits the tiny-llama fixture's
256-token vocabulary, and a model directory = the float32 fixture + that tokenizer (the fixture ships none)."""
import pathlib
import shutil
import string

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_FLOAT = REPO.parent / "shared" / "fixtures" / "tiny-llama" / "float32"

# One token per character: ASCII printable plus the accented letters of the shipped dataset's languages.
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHARS = [c for c in string.printable if c not in "\x0b\x0c\r"] + list("àâäçéèêëîïôöùûüÿñáíóúÀÂÄÇÉÈÊËÎÏÔÖÙÛÜÑÁÍÓÚß¿¡")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer(chat_template: bool = False):
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    assert len(vocab) <= 256
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
        tok.eos_token = "<|im_end|>"
    return tok


def make_tiny_model_dir(dst: pathlib.Path, chat_template: bool = False) -> pathlib.Path:
    """dst/ = the tiny-llama float32 fixture (config, weights) + a character tokenizer."""
    if not TINY_FLOAT.is_dir():
        raise FileNotFoundError(f"{TINY_FLOAT} is missing: the tests need the shared fixtures beside the repo")
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(TINY_FLOAT / f, dst / f)
    char_tokenizer(chat_template).save_pretrained(str(dst))
    return dst
