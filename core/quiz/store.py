"""The class's quiz answers and the teacher's chosen images, in one SQLite file beside the runs.

Answers are anonymous: a browser session is a random token (`new_session_token`), never a name, and no
column takes free text. The text columns hold the token (checked to be 32 hex digits), the dataset's
fingerprint, an image id and run ids of the dataset and runs themselves, a model's registry name, the kind of
region and the marks as JSON numbers (checked in `core.quiz.scoring.checked_marks`).

Several browser sessions answer at once, each in a thread of the one server process (or several servers on
one folder): every call opens its own connection, the file is in WAL mode so readers never wait for a
writer, and writers wait for each other (busy timeout) instead of failing.

    answers        one row per answer: session, dataset, image, label, answer, confidence, marks, region scores
    model_answers  per answer, each model's P(malignant), decision threshold and map scores on that image
    quiz_sets      per dataset, the images the teacher chose (in order)
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core.quiz.scoring import REGION_KINDS, Marks, checked_marks

QUIZ_FILE = "quiz.db"
BUSY_TIMEOUT_MS = 30_000
TOKEN = re.compile(r"[0-9a-f]{32}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    answer_id INTEGER PRIMARY KEY,
    session TEXT NOT NULL CHECK (length(session) = 32 AND session NOT GLOB '*[^0-9a-f]*'),
    answered_at REAL NOT NULL,
    dataset TEXT NOT NULL,
    image_id TEXT NOT NULL,
    label INTEGER NOT NULL CHECK (label IN (0, 1)),
    answer INTEGER NOT NULL CHECK (answer IN (0, 1)),
    confidence REAL NOT NULL CHECK (confidence BETWEEN 0.5 AND 1),
    region TEXT NOT NULL CHECK (region IN ('none', 'points', 'box')),
    marks TEXT NOT NULL CHECK (json_valid(marks) AND json_type(marks) = 'array'),
    share_inside REAL,
    pointing_hit REAL,
    iou REAL
);
CREATE INDEX IF NOT EXISTS answers_by_dataset ON answers (dataset, session);
CREATE TABLE IF NOT EXISTS model_answers (
    answer_id INTEGER NOT NULL REFERENCES answers (answer_id) ON DELETE CASCADE,
    run_id TEXT NOT NULL,
    model TEXT NOT NULL,
    probability REAL NOT NULL CHECK (probability BETWEEN 0 AND 1),
    threshold REAL NOT NULL,
    energy_inside REAL,
    pointing_hit REAL,
    top_iou REAL,
    PRIMARY KEY (answer_id, run_id)
);
CREATE TABLE IF NOT EXISTS quiz_sets (
    dataset TEXT PRIMARY KEY,
    image_ids TEXT NOT NULL CHECK (json_valid(image_ids)),
    chosen_at REAL NOT NULL
);
"""


def new_session_token() -> str:
    """A random, anonymous id for one browser session's answers."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class ModelAnswer:
    """One model's answer on the image a student answered, and how its map scored against the lesion."""

    run_id: str
    model: str  # the registry name
    probability: float  # P(malignant)
    threshold: float  # the run's decision threshold
    energy_inside: float = math.nan
    pointing_hit: float = math.nan
    top_iou: float = math.nan


def _number(value) -> float | None:
    """NaN (nothing measured) is stored as NULL."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


class QuizStore:
    """The quiz's SQLite file. Every method opens and closes its own connection, so one object may be
    shared by every session of the server."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connection() as connection:
            connection.execute("PRAGMA journal_mode = WAL")  # persistent: set once for the file
            connection.executescript(SCHEMA)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA foreign_keys = ON")
            yield connection
        finally:
            connection.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; IMMEDIATE takes the write lock at once, so two writers queue on the busy
        timeout instead of one failing when it upgrades a read lock."""
        with self._connection() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def record_answer(self, session: str, dataset: str, image_id: str, label: int, answer: int, confidence: float,
                      marks: Marks, region_scores: dict | None, models: list[ModelAnswer]) -> int:
        """Store one answer and the models' answers on the same image; returns the answer's id. Raises
        ValueError for a session that is not a token, or marks that are not numbers in [0, 1]."""
        if not isinstance(session, str) or not TOKEN.fullmatch(session):
            raise ValueError("a session is a token from new_session_token(), never a name")
        marks = checked_marks(marks)
        if marks.kind not in REGION_KINDS:
            raise ValueError(f"unknown kind of region {marks.kind}")
        region_scores = region_scores or {}
        with self._writing() as connection:
            cursor = connection.execute(
                "INSERT INTO answers (session, answered_at, dataset, image_id, label, answer, confidence, region, "
                "marks, share_inside, pointing_hit, iou) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (session, time.time(), str(dataset), str(image_id), int(label), int(answer), float(confidence),
                 marks.kind, json.dumps(marks.as_list()), _number(region_scores.get("share_inside")),
                 _number(region_scores.get("pointing_hit")), _number(region_scores.get("iou"))))
            answer_id = int(cursor.lastrowid)
            connection.executemany(
                "INSERT INTO model_answers (answer_id, run_id, model, probability, threshold, energy_inside, "
                "pointing_hit, top_iou) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(answer_id, model.run_id, model.model, float(model.probability), float(model.threshold),
                  _number(model.energy_inside), _number(model.pointing_hit), _number(model.top_iou))
                 for model in models])
        return answer_id

    def answers(self, dataset: str, session: str | None = None) -> pd.DataFrame:
        """The answers on a dataset (of one session, if given), oldest first, with their marks decoded."""
        query = "SELECT * FROM answers WHERE dataset = ?" + (" AND session = ?" if session else "")
        with self._connection() as connection:
            table = pd.read_sql_query(query + " ORDER BY answer_id", connection,
                                      params=(dataset, session) if session else (dataset,))
        table["marks"] = [Marks.from_list(kind, json.loads(text)) for kind, text in zip(table["region"],
                                                                                         table["marks"])]
        for column in ("share_inside", "pointing_hit", "iou"):
            table[column] = table[column].astype(float)
        return table

    def model_answers(self, dataset: str, session: str | None = None) -> pd.DataFrame:
        """The models' answers beside those `answers` returns."""
        query = ("SELECT m.* FROM model_answers m JOIN answers a USING (answer_id) WHERE a.dataset = ?"
                 + (" AND a.session = ?" if session else ""))
        with self._connection() as connection:
            table = pd.read_sql_query(query + " ORDER BY m.answer_id", connection,
                                      params=(dataset, session) if session else (dataset,))
        for column in ("energy_inside", "pointing_hit", "top_iou"):
            table[column] = table[column].astype(float)
        return table

    def answered_images(self, dataset: str, session: str) -> list[str]:
        """The images one session has answered, oldest first."""
        with self._connection() as connection:
            rows = connection.execute("SELECT image_id FROM answers WHERE dataset = ? AND session = ? "
                                      "ORDER BY answer_id", (dataset, session)).fetchall()
        return [row[0] for row in rows]

    def set_quiz_images(self, dataset: str, image_ids: list[str]) -> None:
        """The teacher's chosen images for a dataset, in order; an empty list goes back to random images."""
        with self._writing() as connection:
            if image_ids:
                connection.execute("INSERT OR REPLACE INTO quiz_sets (dataset, image_ids, chosen_at) VALUES (?, ?, ?)",
                                   (dataset, json.dumps([str(i) for i in image_ids]), time.time()))
            else:
                connection.execute("DELETE FROM quiz_sets WHERE dataset = ?", (dataset,))

    def quiz_images(self, dataset: str) -> list[str]:
        """The teacher's chosen images for a dataset, or [] when the quiz draws at random."""
        with self._connection() as connection:
            row = connection.execute("SELECT image_ids FROM quiz_sets WHERE dataset = ?", (dataset,)).fetchone()
        return json.loads(row[0]) if row else []


def quiz_store(runs_dir: str | Path) -> QuizStore:
    """The quiz's store in the run store's folder (checkpoints/quiz.db)."""
    return QuizStore(Path(runs_dir) / QUIZ_FILE)
