"""config.pbtxt: a Triton ModelConfig given as its JSON-style dict (as pytriton's get_config builds it), written as
protobuf text. Pure: the repository builder (repository.py) builds the dicts and writes the text to files; tests
parse it back with Triton's own model_config_pb2.
"""
from __future__ import annotations

ENUM_FIELDS = {"data_type", "kind", "format"}  # written bare (TYPE_FP32), not quoted
MAP_FIELDS = {"parameters", "inputs"}  # map<string, ...>: written as repeated { key: ... value ... } entries


def to_pbtxt(config: dict) -> str:
    """Protobuf text format of a ModelConfig given as its JSON-style dict."""
    return "".join(_message_lines(config, 0))


def _scalar(key: str, value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if key in ENUM_FIELDS:
            return value
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    raise TypeError(f"cannot write {key}={value!r} ({type(value).__name__}) to config.pbtxt")


def _message_lines(message: dict, depth: int):
    pad = "  " * depth
    for key, value in message.items():
        if key in MAP_FIELDS:
            for map_key, map_value in value.items():
                yield f"{pad}{key} {{\n{pad}  key: {_scalar('key', map_key)}\n"
                if isinstance(map_value, dict):
                    yield f"{pad}  value {{\n"
                    yield from _message_lines(map_value, depth + 2)
                    yield f"{pad}  }}\n"
                else:
                    yield f"{pad}  value: {_scalar('value', map_value)}\n"
                yield f"{pad}}}\n"
        elif isinstance(value, dict):
            yield f"{pad}{key} {{\n"
            yield from _message_lines(value, depth + 1)
            yield f"{pad}}}\n"
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            yield f"{pad}{key} [\n"
            for i, item in enumerate(value):
                yield f"{pad}  {{\n"
                yield from _message_lines(item, depth + 2)
                yield f"{pad}  }}{',' if i < len(value) - 1 else ''}\n"
            yield f"{pad}]\n"
        elif isinstance(value, list):
            items = ", ".join(_scalar(key, v) for v in value)
            yield f"{pad}{key}: [ {items} ]\n" if items else f"{pad}{key}: [ ]\n"
        else:
            yield f"{pad}{key}: {_scalar(key, value)}\n"
