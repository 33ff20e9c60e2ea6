"""The service's durable state in SQLite (WAL, ``synchronous=FULL``).

Tables: ``tokens`` (SHA-256 of each device token; revocable), ``samples`` (every acknowledged upload,
unique on ``(device, client, seq)`` so retries are idempotent; ``processed`` marks those the worker
has learned from, and processed rows are the device's FIFO replay buffer, trimmed to its size),
``versions`` (each parameter set sent to a device) and ``adapters`` (each device's adapted teacher
and student, so a restarted service continues where it stopped). A sample is acknowledged only
after its insert has committed, so a restart loses nothing that was acknowledged.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, device TEXT NOT NULL, created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, client TEXT NOT NULL, seq INTEGER NOT NULL,
    x BLOB NOT NULL, entropy REAL NOT NULL, received REAL NOT NULL, processed INTEGER NOT NULL DEFAULT 0,
    UNIQUE (device, client, seq));
CREATE INDEX IF NOT EXISTS samples_pending ON samples (device, processed, id);
CREATE TABLE IF NOT EXISTS versions (
    device TEXT NOT NULL, version INTEGER NOT NULL, params BLOB NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (device, version));
CREATE TABLE IF NOT EXISTS adapters (device TEXT PRIMARY KEY, state BLOB NOT NULL, version INTEGER NOT NULL);
"""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- tokens -----------------------------------------------------------------------------------
    def issue_token(self, device: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._db.execute("INSERT INTO tokens VALUES (?, ?, ?, 0)", (token_hash(token), device, time.time()))
        return token

    def revoke(self, device: str) -> int:
        with self._lock:
            return self._db.execute(
                "UPDATE tokens SET revoked = 1 WHERE device = ? AND revoked = 0", (device,)
            ).rowcount

    def token_device(self, token: str) -> str | None:
        """The device a live token belongs to (None when unknown or revoked)."""
        with self._lock:
            row = self._db.execute(
                "SELECT device FROM tokens WHERE hash = ? AND revoked = 0", (token_hash(token),)
            ).fetchone()
        return row[0] if row else None

    # -- samples ----------------------------------------------------------------------------------
    def add_samples(self, device: str, client: str, seq: np.ndarray, x: np.ndarray, entropy: np.ndarray) -> int:
        """Store a validated batch in one transaction; returns how many were new (others: retries)."""
        now = time.time()
        rows = [
            (device, client, int(s), np.ascontiguousarray(sample, np.float16).tobytes(), float(e), now)
            for s, sample, e in zip(seq, x, entropy, strict=True)
        ]
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT OR IGNORE INTO samples (device, client, seq, x, entropy, received) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._db.execute("COMMIT")
            return self._db.total_changes - before

    def pending_devices(self) -> list[str]:
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT DISTINCT device FROM samples WHERE processed = 0")]

    def pending(self, device: str, limit: int) -> tuple[list[int], list[bytes], float | None]:
        """The oldest ``limit`` samples not learned from yet: ids, blobs, and when the first arrived."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, x, received FROM samples WHERE device = ? AND processed = 0 ORDER BY id LIMIT ?",
                (device, limit),
            ).fetchall()
        return [row[0] for row in rows], [row[1] for row in rows], (rows[0][2] if rows else None)

    def replay_size(self, device: str) -> int:
        """How many samples the device's replay buffer holds (its processed samples)."""
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM samples WHERE device = ? AND processed = 1", (device,))
            return int(row.fetchone()[0])

    def replay(self, device: str, count: int) -> list[bytes]:
        """A random draw from the device's replay buffer (its processed samples)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT x FROM samples WHERE device = ? AND processed = 1 ORDER BY RANDOM() LIMIT ?",
                (device, count),
            ).fetchall()
        return [row[0] for row in rows]

    def last_version(self, device: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(version) FROM versions WHERE device = ?", (device,)).fetchone()
        return int(row[0] or 0)

    def commit_update(
        self,
        device: str,
        version: int,
        ids: list[int],
        params: bytes,
        state: bytes,
        replay_size: int,
        keep_versions: int = 16,
    ) -> None:
        """Atomically: mark samples learned, trim the replay FIFO, record the new version (one writer)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("UPDATE samples SET processed = 1 WHERE id = ?", [(i,) for i in ids])
            self._db.execute(
                "DELETE FROM samples WHERE device = ? AND processed = 1 AND id NOT IN "
                "(SELECT id FROM samples WHERE device = ? AND processed = 1 ORDER BY id DESC LIMIT ?)",
                (device, device, replay_size),
            )
            self._db.execute("INSERT INTO versions VALUES (?, ?, ?, ?)", (device, version, params, time.time()))
            self._db.execute(
                "DELETE FROM versions WHERE device = ? AND version <= ?", (device, version - keep_versions)
            )
            self._db.execute("INSERT OR REPLACE INTO adapters VALUES (?, ?, ?)", (device, state, version))
            self._db.execute("COMMIT")

    def latest(self, device: str, since: int) -> tuple[int, bytes] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT version, params FROM versions WHERE device = ? AND version > ? ORDER BY version DESC LIMIT 1",
                (device, since),
            ).fetchone()
        return (row[0], row[1]) if row else None

    def adapter_state(self, device: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM adapters WHERE device = ?", (device,)).fetchone()
        return row[0] if row else None

    def counts(self, device: str | None = None) -> dict[str, int]:
        where, args = ("WHERE device = ?", (device,)) if device else ("", ())
        with self._lock:
            total, pending = self._db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(processed = 0), 0) FROM samples {where}", args
            ).fetchone()
            received = self._db.execute("SELECT COUNT(*) FROM versions " + where, args).fetchone()[0]
        return {"samples": int(total), "pending": int(pending), "versions": int(received)}

    def sample_keys(self, device: str) -> set[tuple[str, int]]:
        """Every stored (client, seq) of a device — tests use it to prove nothing acknowledged was lost."""
        with self._lock:
            return {
                (row[0], row[1])
                for row in self._db.execute("SELECT client, seq FROM samples WHERE device = ?", (device,))
            }
