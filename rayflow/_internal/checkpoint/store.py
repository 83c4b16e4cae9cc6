"""Parquet files under the checkpoint directory: a local path or a ``pyarrow.fs`` URI.

Every file is written under a unique name, first to a temporary name and then
moved into place, so a reader never sees half a file. Files only count once a
catalog row points at them (see ``catalog.py``); the rest is garbage.
"""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_remote(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI, keeping a URI's query (``?endpoint_override=``)."""
    path, sep, query = base.partition("?")
    joined = "/".join([path.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return f"{joined}{sep}{query}"


def _resolve(root: str) -> tuple[pafs.FileSystem, str]:
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), os.path.abspath(root)


class Store:
    """Reads and writes Parquet files relative to one root directory."""

    def __init__(self, root: str):
        self.root = root
        self.fs, self.base = _resolve(root)

    def full(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def write_parquet(self, rel: str, table: pa.Table, *, fast: bool = False) -> str:
        """Write ``table`` to ``rel`` atomically; returns ``rel``.

        ``fast``: for state files, which a commit writes while its partition
        waits: LZ4 and no dictionary encoding (keys and hashes are unique, so a
        dictionary only costs), about 80 ns a row against 125 for zstd with
        dictionaries (measured on a 1M-row delta of an Aggregate), for
        files about 15 % larger. Outputs, written once and read by users, keep zstd.
        """
        full = self.full(rel)
        parent = full.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        opts = {"compression": "lz4", "use_dictionary": False} if fast else {"compression": "zstd"}
        pq.write_table(table, tmp, filesystem=self.fs, row_group_size=1 << 20, **opts)
        self.fs.move(tmp, full)
        return rel

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small object atomically (a temporary name, then a move)."""
        full = self.full(rel)
        parent = full.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, full)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.full(rel)) as f:
            return f.read()

    def read_parquet(self, rel: str) -> pa.Table:
        return pq.read_table(self.full(rel), filesystem=self.fs)

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.full(rel)).type != pafs.FileType.NotFound

    def move(self, src: str, dst: str) -> None:
        full = self.full(dst)
        self.fs.create_dir(full.rsplit("/", 1)[0], recursive=True)
        self.fs.move(self.full(src), full)

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.full(rel))
        except FileNotFoundError:
            pass

    def list_files(self, rel_dir: str) -> list[str]:
        """Files under ``rel_dir`` (recursive), relative to the root; [] if it does not exist."""
        sel = pafs.FileSelector(self.full(rel_dir), recursive=True, allow_not_found=True)
        n = len(self.base) + 1
        return sorted(i.path[n:] for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)
