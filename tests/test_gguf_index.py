"""hfbridge's GGUF header walk against gguf's own GGUFReader: the same tensors (name, type, shape, bytes) and the
same scalar fields, on the bundled SmolLM2 file and on a file written here with every field type; bad files raise
errors that say where."""
import gguf
import numpy as np
import pytest
import torch

from hfbridge.quantization.gguf_index import read_index


def assert_same_as_gguf_reader(path):
    ours, theirs = read_index(path), gguf.GGUFReader(str(path))
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert mine.tensor_type == int(reference.tensor_type), mine.name
        assert mine.shape == tuple(int(d) for d in reference.shape), mine.name
        assert mine.data.dtype == reference.data.dtype and mine.data.shape == reference.data.shape, mine.name
        assert np.array_equal(mine.data.view(np.uint8), np.asarray(reference.data).view(np.uint8)), mine.name
    scalars = {key: field.contents() for key, field in theirs.fields.items()
               if field.types and field.types[0] != gguf.GGUFValueType.ARRAY and not key.startswith("GGUF.")}
    assert ours.metadata == pytest.approx(scalars)
    return ours


def test_the_bundled_file_reads_as_gguf_reads_it(smollm2_gguf):
    index = assert_same_as_gguf_reader(smollm2_gguf)
    assert index.metadata["general.architecture"] == "llama" and len(index.tensors) == 272


def test_every_field_and_tensor_type(tmp_path):
    path = tmp_path / "all.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 7)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 700)
    writer.add_int16("t.i16", -700)
    writer.add_uint32("t.u32", 70000)
    writer.add_int32("t.i32", -70000)
    writer.add_float32("t.f32", 0.5)
    writer.add_uint64("t.u64", 1 << 40)
    writer.add_int64("t.i64", -(1 << 40))
    writer.add_float64("t.f64", 0.25)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.strs", ["a", "bc", ""])
    writer.add_array("t.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((4, 6)).astype(np.float16))
    bf16 = torch.randn(2, 8).to(torch.bfloat16).view(torch.uint8).numpy()
    writer.add_tensor("bf16", bf16, raw_dtype=gguf.GGMLQuantizationType.BF16)
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("vec", rng.standard_normal(7).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    index = assert_same_as_gguf_reader(path)
    assert index.metadata["t.str"] == "héllo" and "t.strs" not in index.metadata  # arrays are skipped


def test_bad_files_raise_errors_that_say_where(tmp_path, smollm2_gguf):
    data = smollm2_gguf.read_bytes()
    cases = {"header.gguf": (data[:100_000], EOFError, "inside"), "tail.gguf": (data[:-1000], EOFError, "past the end"),
             "not.gguf": (b"PK\x03\x04" + data[4:2000], OSError, "not a GGUF file")}
    for name, (content, error, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(error, match=message):
            read_index(tmp_path / name)
