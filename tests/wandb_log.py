"""Read an offline W&B run's transaction log (`run-<id>.wandb`) back, for tests (no network).

The file is a 7-byte header (`:W&B`, magic 0xBEE1, version) and then LevelDB's log format:
32 KiB blocks of records, each `crc32 (4) | length (2, little-endian) | type (1)` and its data
(FULL = 1, or FIRST/MIDDLE/LAST = 2/3/4 fragments); each payload is a wandb `Record` protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7


def records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:8]
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            out.append(pending)
            pending = b""
    return out


def history(run_dir: Path) -> list[dict]:
    """The rows an offline run logged with `run.log`."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for payload in records(next(Path(run_dir).glob("*.wandb"))):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "history":
            rows.append({"/".join(item.nested_key) if item.nested_key else item.key: json.loads(item.value_json)
                         for item in rec.history.item})
    return rows
