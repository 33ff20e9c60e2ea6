"""A bounded, crash-safe on-disk queue of selected samples waiting for upload.

SQLite in WAL mode with ``synchronous=FULL``: ``put`` returns only after the samples are durable,
so a killed or power-cycled edge loses nothing it selected. Rows leave only when the server has
acknowledged them (``ack``). When full, the oldest rows are dropped and counted (``dropped``):
a bound is a bound, and on a device the newest frames are the more useful ones.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (seq INTEGER PRIMARY KEY AUTOINCREMENT, x BLOB NOT NULL, entropy REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class DiskQueue:
    def __init__(self, path: str | Path, sample_shape: tuple[int, ...], max_items: int = 100_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sample_shape = tuple(sample_shape)
        self.max_items = max_items
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='client'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('client', ?)", (uuid.uuid4().hex,))
            self._db.execute("INSERT INTO meta VALUES ('dropped', '0')")
            row = self._db.execute("SELECT value FROM meta WHERE key='client'").fetchone()
        self.client = row[0]  # idempotency namespace: a new queue file never collides with an old one

    def put(self, x: np.ndarray, entropy: np.ndarray) -> list[int]:
        """Store samples durably (float16, one row each); returns their sequence numbers."""
        x = np.ascontiguousarray(x, dtype=np.float16)
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"sample shape {x.shape[1:]} != queue's {self.sample_shape}")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            seqs = []
            for sample, ent in zip(x, np.asarray(entropy, dtype=np.float64), strict=True):
                cursor = self._db.execute(
                    "INSERT INTO pending (x, entropy) VALUES (?, ?)", (sample.tobytes(), float(ent))
                )
                seqs.append(int(cursor.lastrowid))
            overflow = self._count() - self.max_items
            if overflow > 0:
                self._db.execute(
                    "DELETE FROM pending WHERE seq IN (SELECT seq FROM pending ORDER BY seq LIMIT ?)",
                    (overflow,),
                )
                self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key='dropped'", (overflow,))
            self._db.execute("COMMIT")
        return seqs

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM pending").fetchone()[0])

    def __len__(self) -> int:
        with self._lock:
            return self._count()

    @property
    def dropped(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()[0])

    def peek(self, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The oldest ``limit`` samples: ``(seq int64, x float16, entropy float32)``; they stay queued."""
        with self._lock:
            rows = self._db.execute("SELECT seq, x, entropy FROM pending ORDER BY seq LIMIT ?", (limit,)).fetchall()
        seq = np.asarray([row[0] for row in rows], dtype=np.int64)
        x = (
            np.stack([np.frombuffer(row[1], np.float16).reshape(self.sample_shape) for row in rows])
            if rows
            else np.zeros((0, *self.sample_shape), np.float16)
        )
        ent = np.asarray([row[2] for row in rows], dtype=np.float32)
        return seq, x, ent

    def ack(self, seqs: np.ndarray | list[int]) -> None:
        """Forget samples the server acknowledged."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM pending WHERE seq = ?", [(int(s),) for s in seqs])
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
