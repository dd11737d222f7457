#!/usr/bin/env python3
"""Writes fixtures/fashion-mnist-subset: the first 2,000 training and 500 test images of
Fashion-MNIST (MIT licence), re-gzipped in the original IDX format.

Source: Debian's `dataset-fashion-mnist` (apt-get install -y dataset-fashion-mnist), which puts the
full set in /usr/share/datasets/fashion-mnist/. Standard library only.
"""
import gzip
import struct
import sys
from pathlib import Path

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parent.parent / "fixtures" / "fashion-mnist-subset"
COUNTS = {"train": 2000, "t10k": 500}


def subset(name, count):
    raw = gzip.open(SRC / f"{name}-ubyte.gz").read()
    magic, n = struct.unpack(">II", raw[:8])
    dims = magic & 0xFF
    shape = struct.unpack(">" + "I" * dims, raw[4:4 + 4 * dims])
    header = 4 + 4 * dims
    per_item = 1
    for d in shape[1:]:
        per_item *= d
    body = raw[header:header + count * per_item]
    new_header = struct.pack(">I", magic) + struct.pack(">" + "I" * dims, count, *shape[1:])
    # mtime=0 keeps the file byte-for-byte reproducible.
    with gzip.GzipFile(OUT / f"{name}-ubyte.gz", "wb", mtime=0) as f:
        f.write(new_header + body)


OUT.mkdir(parents=True, exist_ok=True)
for split, count in COUNTS.items():
    subset(f"{split}-images-idx3", count)
    subset(f"{split}-labels-idx1", count)
print("wrote", sorted(p.name for p in OUT.iterdir()))
