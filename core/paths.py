"""Where Wyckoff Lab finds its data (WYCKOFF_LAB_DATA or a user cache) and keeps its caches."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import socket
import threading
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from platformdirs import user_cache_dir

log = logging.getLogger(__name__)
T = TypeVar("T")

DATA_ENV = "WYCKOFF_LAB_DATA"
CACHE_ENV = "WYCKOFF_LAB_CACHE"

# The public CDVAE copies of MP-20, Perov-5 and MPTS-52 (CSV with CIFs), fetched on first use for real users.
PUBLIC_DATASET_URLS: dict[str, str] = {
    "mp_20": "https://raw.githubusercontent.com/txie-93/cdvae/main/data/mp_20/{split}.csv",
    "perov_5": "https://raw.githubusercontent.com/txie-93/cdvae/main/data/perov_5/{split}.csv",
    "mpts_52": "https://raw.githubusercontent.com/jiaor17/DiffCSP/main/data/mpts_52/{split}.csv",
}
CONNECT_TIMEOUT_S = 3
DOWNLOAD_TIMEOUT_S = 30


class DataUnavailableError(FileNotFoundError):
    """A dataset is neither in the data folder nor downloadable (offline, or not public)."""


class DownloadError(OSError):
    """A download that could not start or finish (offline, host unreachable, interrupted)."""


class CacheEntryError(ValueError):
    """A cache entry that does not read back as its schema (damaged, hand-edited, or from another program)."""


def download(url: str, target: Path) -> Path:
    """Fetch url into target (atomically, via a .part file), failing within seconds when offline.

    The host is probed first in a thread, because DNS lookups ignore socket timeouts and would otherwise hang;
    the download itself has a per-read timeout.
    """
    host = url.split("/")[2]
    reachable: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT_S).close()
            reachable.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_S)
    if not reachable:
        raise DownloadError(f"{host} is unreachable (offline?)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except OSError as exc:  # URLError and timeouts are OSErrors
        partial.unlink(missing_ok=True)
        raise DownloadError(f"could not download {url} ({exc})") from None
    partial.rename(target)
    return target


def cache_dir() -> Path:
    """Folder for derived caches (parsed datasets, relaxations, hull energies)."""
    path = Path(os.environ.get(CACHE_ENV) or user_cache_dir("wyckoff-lab"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """The data folder: WYCKOFF_LAB_DATA if set, else `<cache>/data` (filled by `fetch_split`)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    path = cache_dir() / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_split_file(dataset: str, split: str) -> Path | None:
    """The CSV of one split if it is present locally (`.csv.gz` preferred), else None."""
    folder = data_dir() / dataset
    for name in (f"{split}.csv.gz", f"{split}.csv"):
        if (folder / name).is_file():
            return folder / name
    return None


def fetch_split(dataset: str, split: str) -> Path:
    """Return the local CSV of a split, downloading the public copy into the data folder on first use.

    Raises DataUnavailableError with a readable message when the file is absent and cannot be fetched.
    """
    local = find_split_file(dataset, split)
    if local is not None:
        return local
    url_template = PUBLIC_DATASET_URLS.get(dataset)
    if url_template is None:
        raise DataUnavailableError(
            f"dataset {dataset!r} split {split!r} is not in {data_dir() / dataset} and has no public download; "
            f"set {DATA_ENV} to a folder that holds it"
        )
    url = url_template.format(split=split)
    try:
        return download(url, data_dir() / dataset / f"{split}.csv")
    except DownloadError as exc:
        raise DataUnavailableError(
            f"could not download {dataset}/{split}: {exc}; you seem to be offline. "
            f"Set {DATA_ENV} to a folder with {dataset}/{split}.csv[.gz]"
        ) from None


def file_digest(path: Path, n_bytes: int = 1 << 16) -> str:
    """A cheap content key for a source file: size plus SHA-256 of its head and tail."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(n_bytes))
        if size > n_bytes:
            f.seek(max(size - n_bytes, 0))
            h.update(f.read(n_bytes))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# versioned JSON cache entries

CACHE_VERSION_KEY = "format_version"


def read_cache_entry(
    path: Path | None, version: int, parse: Callable[[dict], T], what: str = "cache entry"
) -> T | None:
    """`parse(data)` of the JSON object at `path` (gzip if it ends in .gz), or None: absent, or to be recomputed.

    An entry whose format_version is not `version` is recomputed quietly (INFO: an upgrade makes many); anything
    else that does not read back as the schema (not JSON, not an object, `parse` raising) is recomputed with a
    warning. `parse` should raise on any field of the wrong type (see `entry_field`), never return half an entry.
    """
    if path is None or not path.is_file():
        return None
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        data = json.loads(raw)
    except (OSError, EOFError, ValueError, zlib.error) as exc:  # UnicodeDecodeError, JSONDecodeError: ValueErrors
        log.warning("ignoring unreadable %s %s (%s); recomputing it", what, path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("ignoring %s %s: a JSON %s, not an object; recomputing it", what, path, type(data).__name__)
        return None
    found = data.get(CACHE_VERSION_KEY)
    if found != version:
        if found is None or isinstance(found, int) and not isinstance(found, bool):  # an older or newer program's
            log.info("%s %s has format version %s, not %d; recomputing it", what, path, found, version)
        else:
            log.warning("ignoring %s %s: format version %r; recomputing it", what, path, found)
        return None
    try:
        return parse(data)
    except Exception as exc:  # noqa: BLE001 - whatever a damaged entry makes the parser raise, the entry is unusable
        log.warning("ignoring malformed %s %s (%s: %s); recomputing it", what, path, type(exc).__name__, exc)
        return None


def write_cache_entry(path: Path | None, version: int, payload: dict) -> None:
    """Write `payload` with its format_version at `path` (gzip if it ends in .gz), atomically: readers never see
    half a file, and concurrent writers (one .part per process) never mix."""
    if path is None:
        return
    raw = json.dumps({CACHE_VERSION_KEY: version, **payload}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    partial.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    partial.replace(path)


def entry_field(data: dict, key: str, kind: type) -> Any:
    """data[key] if it is a `kind` (float: any real number but a bool, returned as float); CacheEntryError else."""
    if key not in data:
        raise CacheEntryError(f"no {key!r}")
    value = data[key]
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if not ok:
        raise CacheEntryError(f"{key!r} is {type(value).__name__} {value!r:.40}, not {kind.__name__}")
    return float(value) if kind is float else value
