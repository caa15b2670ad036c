"""The JSON Schema of a model's answers: read, resolved from the training config, carried.

A model trained on the embedded IoT task answers with one JSON object of a known shape
(``tasks.iot.json_schema``); a user dataset may name its own (``schema=FILE.json``). The trainer
writes it into the adapter as ``schema.json``, every export carries it beside the model, and
``run`` / ``serve`` constrain decoding to it by default (``runtimes/constrain.py``).

Torch-free core: the runtimes read it too. Whether a schema compiles is checked against a
vocabulary, by the runtime (``constrain.Grammar``); here it must be a JSON object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, InputError, ManifestError

SCHEMA_FILE = "schema.json"
MAX_SCHEMA_BYTES = 256 << 10
NO_SCHEMA = "none"


def load_schema(source: str | Path | Mapping[str, Any], error: type[Exception] = InputError
                ) -> dict[str, Any]:
    """A JSON Schema from a mapping, JSON text (starting with ``{`` or ``[``) or a file path; a
    clear ``error`` when the file is missing, too big, not JSON or not a JSON object."""
    if isinstance(source, Mapping):
        schema: Any = dict(source)
    else:
        text, where = str(source), "the JSON schema"
        if isinstance(source, Path) or not text.lstrip().startswith(("{", "[")):
            path = Path(source)
            if not path.is_file():
                raise error(f"JSON schema {path} does not exist")
            if path.stat().st_size > MAX_SCHEMA_BYTES:
                raise error(f"JSON schema {path} is over {MAX_SCHEMA_BYTES >> 10} KiB")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise error(f"JSON schema {path} is not UTF-8 text") from None
            where = f"JSON schema {path}"
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise error(f"{where} is not valid JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise error(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    return schema


def resolve(data: str, schema: str) -> tuple[dict[str, Any] | None, str | None]:
    """(schema, where it came from) for a training config's ``data`` and ``schema`` keys:
    ``schema=FILE.json`` wins, ``schema=none`` means none, and the embedded task has its own."""
    if schema and schema.lower() == NO_SCHEMA:
        return None, None
    if schema:
        return load_schema(Path(schema), ConfigError), str(Path(schema).resolve())
    if data.startswith("embedded:iot"):
        from .tasks import iot

        return iot.json_schema(), "embedded:iot"
    return None, None


def write_schema(directory: str | Path, schema: Mapping[str, Any] | None) -> str | None:
    """Write ``schema`` as ``directory/schema.json``; the file name for the manifest, or None."""
    if schema is None:
        return None
    (Path(directory) / SCHEMA_FILE).write_text(
        json.dumps(schema, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return SCHEMA_FILE


def read_schema(directory: str | Path) -> dict[str, Any] | None:
    """The ``schema.json`` an adapter or export directory carries, or None when it has none."""
    path = Path(directory) / SCHEMA_FILE
    if not path.is_file():
        return None
    return load_schema(path, ManifestError)
