"""Model names: GGUF files are read by their header before any conversion, with one clear error."""

import numpy as np
import pytest

from fedzip.errors import ModelError
from fedzip.models.load import gguf_architecture, resolve
from fedzip.models.lora import canonical, is_lora, is_lora_a, lora_a, lora_b, lora_modules


def write_gguf(path, arch: str):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_architecture_is_read_from_the_header(tmp_path):
    write_gguf(tmp_path / "m.gguf", "llama")
    assert gguf_architecture(tmp_path / "m.gguf") == "llama"


def test_gguf_of_an_architecture_transformers_cannot_read_is_one_clear_error(tmp_path, cache_dir):
    write_gguf(tmp_path / "exotic.gguf", "rwkv9")
    with pytest.raises(ModelError, match=r"cannot read the 'rwkv9' architecture from GGUF \(it reads: .*llama"):
        resolve(str(tmp_path / "exotic.gguf"), cache_dir)


def test_gguf_path_that_is_missing_or_not_gguf(tmp_path, cache_dir):
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve(str(tmp_path / "absent.gguf"), cache_dir)
    (tmp_path / "fake.gguf").write_text('{"not": "gguf"}')
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        resolve(str(tmp_path / "fake.gguf"), cache_dir)


def test_gguf_hash_is_computed_once_per_file_version(tmp_path, cache_dir, monkeypatch):
    import fedzip.models.load as load

    write_gguf(tmp_path / "m.gguf", "llama")
    calls = []
    real = load.file_sha256
    monkeypatch.setattr(load, "file_sha256", lambda p: calls.append(p) or real(p))
    first = load.gguf_digest(tmp_path / "m.gguf", cache_dir)
    assert load.gguf_digest(tmp_path / "m.gguf", cache_dir) == first == real(tmp_path / "m.gguf")
    assert len(calls) == 1
    write_gguf(tmp_path / "m.gguf", "qwen2")  # a changed file is hashed again
    assert load.gguf_digest(tmp_path / "m.gguf", cache_dir) != first and len(calls) == 2


def test_lora_pairs_are_found_by_one_helper():
    names = ["l0.q.lora_A.weight", "l0.q.lora_B.weight", "classifier.weight", "l1.v.lora_A.weight", "l1.v.lora_B.weight"]
    assert lora_modules(names) == ["l0.q", "l1.v"]
    assert [lora_a(m) for m in lora_modules(names)] == ["l0.q.lora_A.weight", "l1.v.lora_A.weight"]
    assert lora_b("l1.v") == "l1.v.lora_B.weight"
    assert [n for n in names if not is_lora(n)] == ["classifier.weight"]
    assert is_lora_a(canonical("base_model.model.l0.q.lora_A.default.weight"))
    assert not is_lora_a("l0.q.lora_B.weight")
    with pytest.raises(ModelError, match="without its B"):
        lora_modules(["l0.q.lora_A.weight"])
