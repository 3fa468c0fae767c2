"""The run store: one folder per run under checkpoints/, written atomically.

    checkpoints/<run_id>/run.json         config, dataset, weights, status, history, metrics, environment
    checkpoints/<run_id>/model.pt         the best epoch's state_dict (torch.load(..., weights_only=True))
    checkpoints/<run_id>/predictions.csv  image_id, split, label, prob_malignant (validation and test)
    checkpoints/<run_id>/split.csv        image_id, label, split of every image the run used
    checkpoints/<run_id>/resume.pt        model, optimizer, scheduler and random states after the last
                                          finished epoch; kept only while the run can be resumed

Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file under its real name. A run whose process died while 'running' is shown as failed,
and a stopped or failed run with a resume.pt can be continued from its last finished epoch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # loaded where used: listing runs (python -m core list) needs neither torch nor pandas
    import pandas as pd


STATUSES = ("running", "completed", "stopped", "diverged", "failed")
RESUMABLE_STATUSES = ("stopped", "failed")
RESUME_FILE = "resume.pt"


def default_runs_dir() -> Path:
    """checkpoints/, or the folder named by the SKIN_RUNS_DIR environment variable."""
    return Path(os.environ.get("SKIN_RUNS_DIR", "checkpoints"))


class RunStoreError(OSError):
    """The run store cannot be read or written (missing, read-only or full folder)."""


def _json_safe(value: Any) -> Any:
    """NaN and infinity become null: run.json stays valid JSON for every reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy and torch scalars
        return _json_safe(value.item())
    return value


def write_atomically(path: Path, write) -> None:
    """Call write(temporary_path), flush it to disk, then rename it over `path`."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise RunStoreError(f"cannot write {path}: {error.strerror or error}") from error
    except RuntimeError as error:  # torch.save reports a full disk as "enforce fail ... unexpected pos"
        full = _free_bytes(path.parent) < 1 << 20
        temporary.unlink(missing_ok=True)
        raise RunStoreError(f"cannot write {path}: {'No space left on device' if full else error}") from error


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62


def write_json(path: Path, content: dict) -> None:
    text = json.dumps(_json_safe(content), indent=2, allow_nan=False)
    write_atomically(path, lambda temporary: temporary.write_text(text))


def new_run_id(model: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{model}-{secrets.token_hex(2)}"


@dataclass
class RunFolder:
    """Writes one run's files; the training engine holds one while it trains."""

    path: Path
    record: dict

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    def update(self, **fields: Any) -> dict:
        self.record.update(fields)
        self.record["updated_at"] = time.time()
        write_json(self.path / "run.json", self.record)
        return self.record

    def save_model(self, state_dict: dict) -> None:
        import torch

        cpu_state = {k: v.detach().to("cpu") for k, v in state_dict.items()}
        write_atomically(self.path / "model.pt", lambda temporary: torch.save(cpu_state, temporary))

    def save_table(self, name: str, table: pd.DataFrame) -> None:
        write_atomically(self.path / name, lambda temporary: table.to_csv(temporary, index=False))

    def save_resume_state(self, state: dict) -> None:
        import torch

        write_atomically(self.path / RESUME_FILE, lambda temporary: torch.save(state, temporary))

    def discard_resume_state(self) -> None:
        (self.path / RESUME_FILE).unlink(missing_ok=True)


class RunStore:
    """All runs under one folder (checkpoints/ by default)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_runs_dir()

    @property
    def cache_dir(self) -> Path:
        """Decoded-image and synthetic-set caches live beside the runs, in a hidden folder."""
        return self.root / ".cache"

    def create(self, model: str, record: dict) -> RunFolder:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            run_id = new_run_id(model)
            path = self.root / run_id
            path.mkdir()
        except OSError as error:
            raise RunStoreError(f"cannot create a run folder in {self.root}: {error.strerror or error}") from error
        folder = RunFolder(path, {"run_id": run_id, "model": model, "status": "running", "pid": os.getpid(),
                                  "created_at": time.time(), **record})
        folder.update()
        return folder

    def open(self, run_id: str) -> RunFolder:
        """The folder of an existing run, to continue writing it (resuming)."""
        run = self.load(run_id)
        if run is None:
            raise KeyError(f"no run {run_id} in {self.root}")
        return RunFolder(self.root / run_id, run)

    def list_runs(self) -> list[dict]:
        """Every run with a readable run.json, newest first."""
        if not self.root.is_dir():
            return []
        runs = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue
            run = self.load(path.name)
            if run is not None:
                runs.append(run)
        return sorted(runs, key=lambda run: run.get("created_at", 0), reverse=True)

    def load(self, run_id: str) -> dict | None:
        """run.json of one run, or None when it has none (yet) or it is unreadable."""
        path = self.root / run_id / "run.json"
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if run.get("status") == "running" and not _process_alive(run.get("pid")):
            run["status"] = "failed"
            run["error"] = run.get("error") or "the training process ended without finishing this run"
            remove_partial_writes(path.parent)
        run["resumable"] = run.get("status") in RESUMABLE_STATUSES and (path.parent / RESUME_FILE).is_file()
        return run

    def resume_path(self, run_id: str) -> Path:
        return self.root / run_id / RESUME_FILE

    def discard_resume_state(self, run_id: str) -> None:
        """For a stopped run that should not go on (a pruned trial): frees its optimizer state."""
        self.resume_path(run_id).unlink(missing_ok=True)

    def model_path(self, run_id: str) -> Path:
        return self.root / run_id / "model.pt"

    def predictions(self, run_id: str) -> pd.DataFrame:
        import pandas as pd

        return pd.read_csv(self.root / run_id / "predictions.csv")

    def delete(self, run_id: str) -> None:
        path = self.root / run_id
        if not (path / "run.json").exists() and not path.is_dir():
            raise KeyError(f"no run {run_id}")
        shutil.rmtree(path)


def run_purpose(run: dict) -> str:
    """What a run was trained for, from its tags: 'Tune trial 3 of study hybrid-ham',
    'Ablation: + augmentation (study ablation-components)', or 'Training' for an ordinary run (from
    the Train page or the CLI)."""
    tags = run.get("tags") or {}
    if "study" in tags:
        return f"Tune trial {tags.get('trial', '?')} of study {tags['study']}"
    if "ablation" in tags:
        return f"Ablation: {tags.get('cell', '?')} (study {tags['ablation']})"
    return "Training"


def is_ordinary_run(run: dict) -> bool:
    """Started to train a model, not as a tuning trial or an ablation cell (whose recipes differ on
    purpose: the ablation's baseline has no augmentation, sampler, smoothing or scheduler)."""
    tags = run.get("tags") or {}
    return "study" not in tags and "ablation" not in tags


def run_label(run: dict, display_name: str) -> str:
    """The one way a run is named in every run list: model, purpose (when not ordinary) and run id."""
    purpose = "" if is_ordinary_run(run) else f" · {run_purpose(run)}"
    return f"{display_name}{purpose} · {run['run_id']}"


@contextlib.contextmanager
def claimed_for_resume(folder: Path, error: type[Exception] = RunStoreError):
    """Hold a run folder for one process at a time (two dashboards, or a dashboard and the CLI, resuming
    the same run); raises `error` when another live process holds it. The lock file holds the owner's
    pid; one left by a dead process is taken over."""
    lock = folder / ".resume.lock"
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                text, age = lock.read_text(), time.time() - lock.stat().st_mtime
            except OSError:
                continue  # released meanwhile: try again
            holder = int(text) if text.strip().isdigit() else None
            if (holder is not None and _process_alive(holder)) or (holder is None and age < 10):
                raise error(f"{folder.name} is already being resumed by process {holder or '?'}") from None
            lock.unlink(missing_ok=True)
        except OSError as failure:
            raise error(f"cannot claim {folder.name}: {failure.strerror or failure}") from failure
    else:
        raise error(f"cannot claim {folder.name}: its lock keeps changing")
    try:
        os.write(descriptor, str(os.getpid()).encode())
    finally:
        os.close(descriptor)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def remove_partial_writes(folder: Path) -> None:
    """Delete the temporary files a killed process left behind (`.NAME.PID.HEX.tmp`, see
    write_atomically); a live process's files are left alone. Never raises: a read-only store keeps them."""
    try:
        candidates = list(folder.glob(".*.tmp"))
    except OSError:
        return
    for candidate in candidates:
        parts = candidate.name.split(".")
        pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
        if pid is None or not _process_alive(pid):
            with contextlib.suppress(OSError):
                candidate.unlink()


def _process_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
