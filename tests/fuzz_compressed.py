"""Fuzzing ``load_compressed`` with damaged and edited copies of a real file, in a process of its own.

Every case must either load the original state exactly or raise ``ValueError`` and leave the model as it was. The
process measures its own peak memory, so that ``test_compressed`` can bound what a hostile file costs.

    python tests/fuzz_compressed.py 2000 0   # cases, seed; prints a JSON line
"""

from __future__ import annotations

import hashlib
import json
import lzma
import random
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.deploy.compressed import MAGIC, compressed_bytes, load_compressed, most_payload_bytes

#: Values an edited manifest field takes: out of range, of the wrong type, huge, nested.
HOSTILE = [-1, 0, 1, 7, 9, 33, 2**31, 10**8, 10**18, -(10**18), 1.5, "x", None, True, [], [0], [1, 2, 3], {}, [[[[]]]]]


def model() -> nn.Module:
    """A small model whose file holds every encoding: pruned positions (gaps, a bitmask), shared values (a codebook),
    raw floats."""
    torch.manual_seed(0)
    built = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        first, second = built[0].weight, built[2].weight
        first.mul_(torch.rand_like(first) < 0.1)  # sparse: gaps
        second.copy_(torch.round(second * 4) / 4)  # few distinct values: a codebook
        second.mul_(torch.rand_like(second) < 0.5)  # half: a bitmask
    return built


def with_payload(payload: bytes) -> bytes:
    return MAGIC + b"none %d %s\n" % (len(payload), hashlib.sha256(payload).hexdigest().encode()) + payload


def edited(payload: bytes, rng: random.Random) -> bytes:
    """``payload`` with one field of its manifest set to a hostile value, its checksum made anew."""
    line, _, blobs = payload.partition(b"\n")
    manifest = json.loads(line)
    entry = rng.choice(manifest["tensors"])
    target = rng.choice([entry, entry["positions"], entry["values"], manifest])
    key = rng.choice([*target.keys(), "bits", "count", "blob"])
    target[key] = rng.choice(HOSTILE)
    return with_payload(json.dumps(manifest).encode() + b"\n" + blobs)


def damaged(data: bytes, rng: random.Random) -> bytes:
    """``data`` with a few bytes flipped, or cut short."""
    if rng.random() < 0.3:
        return data[: rng.randrange(len(data))]
    flipped = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    return bytes(flipped)


def bombs(payload: bytes, most: int) -> list[bytes]:
    """Files that would cost far more memory than their size: a codebook of 10^8-bit indices (checksum made anew),
    a version 2 file (no declared length) whose xz stream inflates past what the model allows, and a header that
    declares a terabyte."""
    line, _, blobs = payload.partition(b"\n")
    manifest = json.loads(line)
    manifest["tensors"][2]["values"] = {"kind": "codebook", "bits": 10**8, "table": [0, 4], "blob": [0, 4]}
    zeros = lzma.compress(bytes(most + (1 << 20)), format=lzma.FORMAT_XZ)
    return [
        with_payload(json.dumps(manifest).encode() + b"\n" + blobs),
        b"lightning_compress.compressed/2\nxz\n" + zeros,
        MAGIC + b"xz %d %s\n" % (10**12, b"0" * 64) + zeros,
    ]


def fuzz(cases: int, seed: int) -> dict[str, Any]:
    original = model()
    data = compressed_bytes(original)
    header, _, body = data[len(MAGIC) :].partition(b"\n")
    payload = lzma.decompress(body) if header.startswith(b"xz ") else body
    files = [data, with_payload(payload)]  # xz and none
    rng = random.Random(seed)
    fresh = model()  # the same architecture and weights; loading must leave it as it was when it fails
    before = {name: tensor.clone() for name, tensor in fresh.state_dict().items()}
    outcomes = {"loaded": 0, "refused": 0}
    hostile = bombs(payload, most_payload_bytes(fresh))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "case.lcz"
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for case in range(cases):
            source = rng.choice(files)
            path.write_bytes(edited(payload, rng) if rng.random() < 0.5 else damaged(source, rng))
            try:
                load_compressed(fresh, path)
            except ValueError:
                outcomes["refused"] += 1
                state = fresh.state_dict()
                assert all(torch.equal(state[name], tensor) for name, tensor in before.items()), case
                continue
            outcomes["loaded"] += 1  # an edit of what loading does not read (the manifest's format, an unused field)
            state = fresh.state_dict()
            expected = original.state_dict()
            assert all(torch.equal(state[name], expected[name]) for name in expected), case
        for bomb in hostile:
            path.write_bytes(bomb)
            try:
                load_compressed(fresh, path)
            except ValueError:
                outcomes["refused"] += 1
            else:
                raise AssertionError("a bomb loaded")
        growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024  # KiB on Linux
    return {"cases": cases, **outcomes, "peak_growth_mib": growth}


if __name__ == "__main__":
    print(json.dumps(fuzz(int(sys.argv[1]), int(sys.argv[2]))))
