"""Audit results stored beside each run, so that they are computed once: a teacher prepares the audit and
the class opens it, and a restarted dashboard shows it at once.

A result lives in `<run folder>/audit/<check>-<method>-<key>.json`, where the key hashes everything the
result depends on: the check, the method, the image ids, the seed and the check's own settings. The
example images of the artefact test sit beside it as a .npz (plain arrays, loaded without pickle).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np

from core.runs import write_atomically, write_json

AUDIT_FOLDER = "audit"


def result_key(check: str, method: str, image_ids: list[str], seed: int, settings: dict) -> str:
    text = json.dumps({"check": check, "method": method, "images": list(image_ids), "seed": seed,
                       "settings": settings}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def result_path(run_folder: Path, check: str, method: str, key: str) -> Path:
    return Path(run_folder) / AUDIT_FOLDER / f"{check}-{method}-{key}.json"


def save_result(run_folder: Path, record: dict, arrays: dict[str, np.ndarray] | None = None) -> Path:
    """Write one result (and its example arrays) atomically, stamping `saved_at` on it; returns the JSON's path."""
    path = result_path(run_folder, record["check"], record["method"], record["key"])
    path.parent.mkdir(exist_ok=True)
    if arrays:
        def write_arrays(temporary: Path) -> None:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **arrays)
            temporary.write_bytes(buffer.getvalue())

        write_atomically(path.with_suffix(".npz"), write_arrays)
    record["saved_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(path, {key: value for key, value in record.items() if key != "path"})
    return path


def load_result(run_folder: Path, check: str, method: str, key: str) -> dict | None:
    """A stored result, or None when there is none (or it cannot be read: it is then computed again)."""
    return _read(result_path(run_folder, check, method, key))


def load_arrays(json_path: Path | str) -> dict[str, np.ndarray]:
    """The example arrays stored beside a result (empty when there are none)."""
    path = Path(json_path).with_suffix(".npz")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError):
        return {}


def stored_results(run_folder: Path, check: str | None = None, method: str | None = None) -> list[dict]:
    """Every readable stored result of a run (optionally one check and method), newest first; each gets
    its file's path as `path`."""
    folder = Path(run_folder) / AUDIT_FOLDER
    pattern = f"{check or '*'}-{method or '*'}-*.json"
    results = []
    for path in folder.glob(pattern) if folder.is_dir() else []:
        record = _read(path)
        if record is not None and (check is None or record.get("check") == check) and (
                method is None or record.get("method") == method):
            results.append({**record, "path": str(path)})
    return sorted(results, key=lambda record: record.get("saved_at", ""), reverse=True)


def sanity_verdict(run_folder: Path, method: str) -> dict | None:
    """The newest randomisation check of a run's method: {'fails', 'final_spearman', 'images', ...}, or None
    when it has not been audited. What the Explain page shows next to that map."""
    results = stored_results(run_folder, "randomisation", method)
    if not results:
        return None
    summary = results[0]["summary"]
    fails = summary.get("fails")
    return {"fails": None if fails is None else bool(fails), "final_spearman": summary.get("final_spearman"),
            "fail_threshold": summary.get("fail_threshold"), "images": len(results[0].get("images", [])),
            "saved_at": results[0].get("saved_at")}


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "summary" in record else None
