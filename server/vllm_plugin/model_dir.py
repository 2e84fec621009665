"""Print the Hugging Face folder vLLM can load for a headwise model (default: the default model).

vLLM needs a Hugging Face folder (config.json + safetensors + tokenizer); headwise converts a GGUF
once into exactly that under ~/.cache/headwise/gguf/<key>/ (server/engine/gguf_convert.py). This
runs headwise's loader (converting on first use) and prints the folder; a Hugging Face folder is
printed as it is. Run it with headwise's own venv:

    .venv/bin/python -m server.vllm_plugin.model_dir [MODEL_PATH]
"""

from __future__ import annotations

import argparse
import os
import sys

from server.engine import gguf_convert
from server.engine.errors import ModelLoadError
from server.engine.loader import default_cache_dir, default_model_path, load_model


def hf_folder(path: str | None = None, cache_dir: str | None = None) -> str:
    """The Hugging Face folder for path (a GGUF file, a folder with one, or a HF folder)."""
    cache = cache_dir or default_cache_dir()
    loaded = load_model(path, cache_dir=cache)                        # converts a GGUF once
    source = os.path.abspath(loaded.source)
    if os.path.isdir(source):
        return source
    return gguf_convert.cache_folder(source, cache)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="GGUF file or model folder (default: the default model)")
    args = parser.parse_args(argv)
    try:
        print(hf_folder(args.model))
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
