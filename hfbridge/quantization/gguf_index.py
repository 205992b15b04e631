"""A GGUF file's tensors, found from its header without parsing the vocabulary.

gguf's GGUFReader builds an object for every part of every metadata field before it reaches the tensor table: on a
file that carries its tokenizer (49,152 tokens and as many merges in the bundled SmolLM2) that is most of the load.
Here the header is walked with struct: scalar fields are kept, arrays are stepped over (a string array by its
length prefixes), then the tensor table gives each tensor's type, shape and offset, and its data is a view of the
file's mapping. The views have the layout GGUFReader gives (tests/test_gguf_index.py holds them equal): block types
(and BF16) as uint8 [..., row bytes], F32/F16 as their values in numpy's order (GGUF's dimensions reversed).

Layout (little-endian, versions 2 and 3): magic "GGUF", u32 version, u64 tensor count, u64 field count; each field a
string key, a u32 value type and the value (an array: u32 item type, u64 count, items); each tensor a string name,
u32 dimension count, u64 dimensions (the row length first), u32 type and u64 offset from the data start, which is
the end of the table rounded up to `general.alignment` (32 by default). A string is a u64 length and its bytes."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# value type -> (struct code, size) of GGUF's fixed-size scalars
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4), 7: ("?", 1),
            10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_STRING, _ARRAY = 8, 9
_VALUES = {0: np.float32, 1: np.float16}  # tensor types read as values; every other type as its bytes


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: int  # a gguf.GGMLQuantizationType number
    shape: tuple[int, ...]  # GGUF's order: the row length first
    data: np.ndarray  # a view of the file: see the module docstring


@dataclass(frozen=True)
class GGUFIndex:
    metadata: dict[str, Any]  # the scalar and string fields (arrays are skipped)
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, buffer: memoryview):
        self.buffer, self.pos = buffer, 0

    def take(self, code: str, size: int):
        if self.pos + size > len(self.buffer):
            raise EOFError(f"the file ends at byte {len(self.buffer)}, inside its header")
        value = struct.unpack_from("<" + code, self.buffer, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("Q", 8)
        end = self.pos + length
        if end > len(self.buffer):
            raise EOFError(f"the file ends at byte {len(self.buffer)}, inside a string of its header")
        text = bytes(self.buffer[self.pos : end]).decode("utf-8", errors="replace")
        self.pos = end
        return text

    def skip_string(self) -> None:
        length = self.take("Q", 8)  # (not `self.pos += self.take(...)`: that adds to pos as it was before the take)
        self.pos += length

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            self.skip_array()
            return None
        if value_type not in _SCALARS:
            raise KeyError(f"unknown GGUF value type {value_type} at byte {self.pos}")
        return self.take(*_SCALARS[value_type])

    def skip_array(self) -> None:
        item_type, count = self.take("I", 4), self.take("Q", 8)
        if item_type in _SCALARS:
            self.pos += count * _SCALARS[item_type][1]
        elif item_type == _STRING:
            for _ in range(count):
                self.skip_string()
        elif item_type == _ARRAY:
            for _ in range(count):
                self.skip_array()
        else:
            raise KeyError(f"unknown GGUF array item type {item_type} at byte {self.pos}")


def read_index(path: Path) -> GGUFIndex:
    """OSError for a file that is not GGUF, EOFError for a truncated one (each names what it found)."""
    import gguf

    data = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(data))
    magic = bytes(data[:4])
    if magic != b"GGUF":
        raise OSError(f"not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    cursor.pos = 4
    version = cursor.take("I", 4)
    if version not in (2, 3):
        raise OSError(f"GGUF version {version} (big-endian or unknown); hfbridge reads versions 2 and 3")
    num_tensors, num_fields = cursor.take("Q", 8), cursor.take("Q", 8)
    metadata = {}
    for _ in range(num_fields):
        key = cursor.string()
        value = cursor.value(cursor.take("I", 4))
        if value is not None:
            metadata[key] = value
    table = []
    for _ in range(num_tensors):
        name = cursor.string()
        dims = tuple(cursor.take("Q", 8) for _ in range(cursor.take("I", 4)))
        table.append((name, dims, cursor.take("I", 4), cursor.take("Q", 8)))
    alignment = int(metadata.get("general.alignment", 32))
    start = -(-cursor.pos // alignment) * alignment
    tensors = []
    for name, dims, tensor_type, offset in table:
        try:
            block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor_type)]
        except ValueError:
            raise KeyError(f"tensor {name} has type {tensor_type}, which no GGUF reader knows") from None
        count = int(np.prod(dims, dtype=np.int64))
        begin, size = start + offset, count // block * type_bytes
        if begin + size > len(data):
            raise EOFError(f"tensor {name} ends at byte {begin + size}, past the end of the file ({len(data)} bytes)")
        view = data[begin : begin + size].view(np.ndarray)
        if tensor_type in _VALUES:
            view = view.view(_VALUES[tensor_type]).reshape(dims[::-1])
        else:
            view = view.reshape(*dims[:0:-1], dims[0] // block * type_bytes)
        tensors.append(GGUFTensor(name, tensor_type, dims, view))
    return GGUFIndex(metadata, tensors)
