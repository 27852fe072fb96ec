"""Run folders, atomic writes, provenance and progress reporting for experiment runs.

* :class:`RunFolder`: everything is written into a hidden temporary folder beside the final one and
  renamed into place by :meth:`RunFolder.commit`; on an error :meth:`RunFolder.abort` removes the temporary
  folder, so a failed run leaves nothing half-written. An existing final folder is refused unless
  ``overwrite`` (then it is replaced only at commit).
* :func:`atomic_write_text`, :func:`atomic_write_json`, :func:`atomic_save_npz`: temp file + ``os.replace``.
* :func:`environment`: software versions, devices, matmul precision, git commit.
* :class:`Progress`: a tqdm bar on a TTY, else a periodic log line with rate and ETA.
* :func:`to_jsonable`: numpy scalars/arrays and NaN to plain JSON.
* :class:`RunFolderExistsError`: the one-line error for an existing run folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class RunFolderExistsError(ValueError):
  """The run folder exists and ``--overwrite`` was not given."""


def to_jsonable(value: Any) -> Any:
  """Numpy types to Python; non-finite floats to None (JSON has no NaN)."""
  if isinstance(value, dict):
    return {str(key): to_jsonable(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(item) for item in value]
  if isinstance(value, np.ndarray):
    return to_jsonable(value.tolist())
  if isinstance(value, (np.bool_,)):
    return bool(value)
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, (float, np.floating)):
    value = float(value)
    return value if math.isfinite(value) else None
  return value


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _publish(temporary: str | os.PathLike, path: pathlib.Path, mode: int = 0o666) -> None:
  """Gives the temporary file the usual permissions (mkstemp makes it 0600), then renames it onto path."""
  os.chmod(temporary, mode & ~_umask())
  os.replace(temporary, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` to a temporary file in the same folder, then ``os.replace`` onto ``path``."""
  path = pathlib.Path(path)
  handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
  try:
    with os.fdopen(handle, "w", encoding="utf-8") as file:
      file.write(text)
    _publish(temporary, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(temporary)
    raise


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
  atomic_write_text(path, json.dumps(to_jsonable(value), indent=1, allow_nan=False) + "\n")


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
  """``np.savez`` (uncompressed) to a temporary file, then ``os.replace``."""
  path = pathlib.Path(path)
  handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
  try:
    with os.fdopen(handle, "wb") as file:
      np.savez(file, **{name: np.asarray(array) for name, array in arrays.items()})
    _publish(temporary, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(temporary)
    raise


class RunFolder:
  """A run folder written atomically: files go to ``.<name>.tmp-*`` and are renamed in at commit."""

  def __init__(self, final: str | os.PathLike, *, overwrite: bool = False):
    self.final = pathlib.Path(final).absolute()
    self.overwrite = overwrite
    check_run_folder(self.final, overwrite)
    self.final.parent.mkdir(parents=True, exist_ok=True)
    self.path = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
    os.chmod(self.path, 0o777 & ~_umask())
    self.committed = False

  def __truediv__(self, name: str) -> pathlib.Path:
    return self.path / name

  def commit(self) -> pathlib.Path:
    """Moves the finished folder into place (replacing the old one only when ``overwrite``)."""
    check_run_folder(self.final, self.overwrite)
    old = None
    if self.final.exists():
      old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
      os.replace(self.final, old)
    os.replace(self.path, self.final)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
    self.committed = True
    return self.final

  def abort(self) -> None:
    """Removes the temporary folder (nothing of the run remains)."""
    if not self.committed:
      shutil.rmtree(self.path, ignore_errors=True)


def check_run_folder(path: str | os.PathLike, overwrite: bool) -> None:
  """Raises :class:`RunFolderExistsError` when ``path`` exists and ``overwrite`` is false."""
  path = pathlib.Path(path)
  if path.exists() and not overwrite:
    raise RunFolderExistsError(f"run folder {path} already exists; pass --overwrite or choose another --workdir")


def git_commit(root: str | os.PathLike | None = None) -> str | None:
  """The checked-out commit of the project (``git rev-parse HEAD``), with ``+dirty`` if files changed."""
  root = pathlib.Path(root or pathlib.Path(__file__).resolve().parent.parent)
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                            timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    return commit + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return None


def environment(matmul_precision: str | None = None) -> dict[str, Any]:
  """Versions, devices and precision of this process (for ``results.json``)."""
  import importlib.metadata as metadata

  import jax

  versions = {}
  for package in ("jax", "jaxlib", "flax", "optax", "numpy", "scipy", "ml-collections", "gguf", "tokenizers"):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = None
  devices = jax.devices()
  return {
      "python": sys.version.split()[0], "platform": platform.platform(), "versions": versions,
      "backend": jax.default_backend(), "devices": [str(device) for device in devices],
      "device_kind": devices[0].device_kind if devices else None, "device_count": len(devices),
      "matmul_precision": matmul_precision or str(jax.config.jax_default_matmul_precision),
      "git_commit": git_commit(),
  }


class Progress:
  """Progress of one stage: a tqdm bar when stderr is a TTY, else a log line every ``every`` seconds."""

  def __init__(self, total: int, prefix: str, every: float = 30.0):
    self.total, self.prefix, self.every = max(int(total), 1), prefix, every
    self.start = self.last = time.perf_counter()
    self.done = 0
    self.bar = None
    if sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=self.total, desc=prefix, leave=False, dynamic_ncols=True)

  def update(self, done: int) -> None:
    """Sets the number of finished items."""
    if self.bar is not None:
      self.bar.update(done - self.done)
    self.done = done
    now = time.perf_counter()
    if self.bar is None and now - self.last >= self.every:
      self.last = now
      rate = self.done / max(now - self.start, 1e-9)
      eta = (self.total - self.done) / max(rate, 1e-9)
      logger.info("%s: %d/%d (%.1f/s, ETA %.0f s)", self.prefix, self.done, self.total, rate, eta)

  def close(self) -> float:
    """Closes the bar; returns the elapsed seconds."""
    if self.bar is not None:
      self.bar.close()
    return time.perf_counter() - self.start
