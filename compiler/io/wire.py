"""The protobuf wire format, walked just deep enough to find fields without parsing a whole message.

Used by ``lean`` (each initializer's ``raw_data`` read straight into its array), ``model_check`` (raw
lengths before anything is allocated) and ``output_guard`` (a model's external-data locations). The field
numbers are ONNX's: ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.raw_data = 9.
"""

from __future__ import annotations

MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9


def varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def proto_fields(buf, start: int, end: int):
    """(field number, field start, payload start, payload end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        begin = pos
        key, pos = varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = varint(buf, pos)
            yield number, begin, pos, pos
        elif wire == 2:
            length, pos = varint(buf, pos)
            yield number, begin, pos, pos + length
            pos += length
        elif wire == 1:
            pos += 8
            yield number, begin, pos, pos
        elif wire == 5:
            pos += 4
            yield number, begin, pos, pos
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf field")


def length_delimited(number: int, payload: bytes) -> bytes:
    return encode_varint((number << 3) | 2) + encode_varint(len(payload)) + payload
