import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bulk.errors import CorruptBlockError
from bulk.kv.quantization import quantize
from bulk.storage.serialization import BlockRecord, dumps, loads

KEY = bytes(range(32))
SHAPE = (2, 2, 2, 4, 8)


def _record(dtype=torch.float32, mode="none"):
    block = torch.randn(SHAPE).to(dtype)
    return BlockRecord((5, 6, 7, 8), mode, str(dtype).removeprefix("torch."), SHAPE, quantize(block, mode))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_round_trip_is_exact(dtype, mode):
    record = _record(dtype, mode)
    back = loads(KEY, dumps(KEY, record, None), None)
    assert back.tokens == record.tokens and back.shape == record.shape and back.dtype == record.dtype
    assert back.parts.keys() == record.parts.keys()
    for name, tensor in record.parts.items():
        assert back.parts[name].dtype == tensor.dtype and torch.equal(back.parts[name], tensor)


def test_format_is_a_typed_header_and_raw_bytes_not_pickle():
    data = dumps(KEY, _record(), None)
    assert data.startswith(b"BULKV\x01")
    (head_len,) = struct.unpack_from("<I", data, 6)
    assert data[10 : 10 + head_len].startswith(b'{"format":1')
    assert b"\x80\x04" not in data[:16]  # no pickle protocol header


def test_any_flipped_bit_is_rejected():
    data = bytearray(dumps(KEY, _record(), None))
    for position in (0, 8, 20, len(data) // 2, len(data) - 40, len(data) - 1):
        tampered = bytearray(data)
        tampered[position] ^= 0x01
        with pytest.raises(CorruptBlockError):
            loads(KEY, bytes(tampered), None)


def test_an_entry_moved_to_another_key_is_rejected():
    data = dumps(KEY, _record(), None)
    with pytest.raises(CorruptBlockError, match="integrity"):
        loads(bytes(32), data, None)


def test_hmac_needs_the_same_secret():
    data = dumps(KEY, _record(), b"secret-a")
    assert loads(KEY, data, b"secret-a").tokens == (5, 6, 7, 8)
    for other in (b"secret-b", None):
        with pytest.raises(CorruptBlockError):
            loads(KEY, data, other)


def _forge(header: bytes, body: bytes, key: bytes = KEY) -> bytes:
    """What someone with write access can build without the secret: a valid plain digest."""
    import hashlib

    data = struct.pack("<5sBI", b"BULKV", 1, len(header)) + header + body
    digest = hashlib.sha256(struct.pack("<I", len(key)) + key)
    digest.update(data)
    return data + digest.digest()


@pytest.mark.parametrize(
    "header,body",
    [
        (b"not json", b""),
        (b'{"format":1}', b""),
        (b'{"format":1,"quantization":"none","dtype":"float64","shape":[1],"tokens":[1],"parts":[]}', b""),
        (
            b'{"format":1,"quantization":"none","dtype":"float32","shape":[1],"tokens":[1],'
            b'"parts":[["kv","float32",[1000000]]]}',
            b"\0" * 8,
        ),
        (
            b'{"format":1,"quantization":"none","dtype":"float32","shape":[1],"tokens":[1],'
            b'"parts":[["kv","float32",[1]]]}',
            b"\0" * 8,  # trailing bytes
        ),
        (
            b'{"format":1,"quantization":"none","dtype":"float32","shape":[1],"tokens":["x"],'
            b'"parts":[["kv","float32",[1]]]}',
            b"\0" * 4,
        ),
        (
            b'{"format":1,"quantization":"none","dtype":"float32","shape":[1],"tokens":[1],"parts":[["kv","object",[1]]]}',
            b"",
        ),
    ],
)
def test_forged_well_tagged_blocks_are_refused_cleanly(header, body):
    with pytest.raises(CorruptBlockError):
        loads(KEY, _forge(header, body), None)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_raise_corrupt_block(data):
    for blob in (data, _forge(data, b"")):
        with pytest.raises(CorruptBlockError):
            loads(KEY, blob, None)
