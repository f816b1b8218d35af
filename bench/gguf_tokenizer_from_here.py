"""Convert a bundled model on a machine whose transformers rebuilds its GGUF tokenizer wrongly.

transformers 5.17 (the lent GPU host's) turns Gemma-3's tokenizer into a Unigram model without BOS,
which mixllm.data refuses (check_gguf_tokenizer); 5.24 converts it correctly. The weights convert the
same under both. So: export the tokenizer where it converts correctly, carry it over, and build the
model's cache folder there from the GGUF's weights and that tokenizer:

    python3 bench/gguf_tokenizer_from_here.py export gemma3-270m .device_carry/gemma_tok   # here
    python3 bench/gguf_tokenizer_from_here.py convert gemma3-270m .device_carry/gemma_tok  # there

(`convert` writes data.model_dir(name) under $MIXLLM_CACHE, as a first load_model(name) would.)
"""

import lzma
import pathlib
import shutil
import sys
import tempfile

import transformers

from mixllm import data


def export(name: str, out: pathlib.Path) -> None:
    src = data.model_dir(name)  # converted here, with the check passing
    out.mkdir(parents=True, exist_ok=True)
    with open(src / "tokenizer.json", "rb") as f, lzma.open(out / "tokenizer.json.xz", "wb") as g:
        shutil.copyfileobj(f, g)
    shutil.copy(src / "tokenizer_config.json", out)
    print(f"{out}: tokenizer of {name} (transformers {transformers.__version__})")


def convert(name: str, src: pathlib.Path) -> None:
    tmp = pathlib.Path(tempfile.mkdtemp())
    with lzma.open(src / "tokenizer.json.xz") as f, open(tmp / "tokenizer.json", "wb") as g:
        shutil.copyfileobj(f, g)
    shutil.copy(src / "tokenizer_config.json", tmp)
    tok = transformers.AutoTokenizer.from_pretrained(tmp)
    print("converted:", data.model_dir(name, tokenizer=tok))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("export", "convert"):
        sys.exit(__doc__)
    (export if sys.argv[1] == "export" else convert)(sys.argv[2], pathlib.Path(sys.argv[3]))
