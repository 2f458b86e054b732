from __future__ import annotations

from bulk.models.tokenizer import ByteTokenizer, TextStream


def test_bytes_round_trip_with_bos():
    tok = ByteTokenizer()
    ids = tok.encode("Crear estrategia de marketing: ñandú ✓")
    assert ids[0] == ByteTokenizer.BOS and all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids) == "Crear estrategia de marketing: ñandú ✓"


def test_invalid_utf8_is_replaced_not_raised():
    assert ByteTokenizer().decode([0xFF, 0x41]) == "\ufffdA"


def test_stream_holds_back_incomplete_characters():
    stream = TextStream(ByteTokenizer())
    deltas = [stream.push(b) for b in "ñ✓a".encode()]
    assert deltas == ["", "ñ", "", "", "✓", "a"]
    assert stream.text == "ñ✓a"


def test_stream_flushes_a_truncated_character():
    stream = TextStream(ByteTokenizer())
    stream.push("✓".encode()[0])
    assert stream.finish() == "\ufffd"
