"""Where run artefacts live: a local folder or an object store (gs://, s3://), behind one path type.

Every path that may be remote (workdirs, checkpoints, exports, token shards, metrics, outputs) is an
`etils.epath.Path`, Orbax's own path type. `pathlib.Path("gs://b/run")` would silently become the
local folder `./gs:/b/run`.

Object stores differ from a disk in three ways that matter here:
- no append: an object is written whole, so a growing file (metrics.jsonl, TensorBoard events) is kept
  locally and the whole object rewritten (`write_atomic`, `MirroredDir`);
- an object appears all at once when its upload completes, so a single object needs no temporary
  name; a local file does (`write_atomic`);
- some readers open only local files (ArrayRecord's C++ reader: given a gs:// name it hangs), so
  their inputs are copied down first (`local_copy`).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid

from etils import epath

PathLike = str | os.PathLike

_COPY_CHUNK = 16 << 20  # streamed copies: bounded memory for shards of any size


def is_remote(path: PathLike) -> bool:
    """True for object-store URLs (gs://, s3://, ...), False for local paths."""
    text = os.fspath(path)
    if re.match(r"[a-z][a-z0-9+.-]*:/[^/]", text):
        raise ValueError(f"{text!r} is a URL that went through pathlib.Path (which turns gs:// into gs:/, a local "
                         "folder); keep paths that may be remote as str or etils.epath.Path")
    return "://" in text


def resolve(path: PathLike) -> epath.Path:
    """The path as an epath.Path; local paths made absolute (Orbax requires it), URLs kept as they are."""
    p = epath.Path(path)
    return p if is_remote(p) else p.absolute()


def write_atomic(path: PathLike, data: str | bytes) -> None:
    """Readers see the old content or the new, never a part: one object upload, or a local rename."""
    path = epath.Path(path)
    write = epath.Path.write_text if isinstance(data, str) else epath.Path.write_bytes
    if is_remote(path):
        write(path, data)
        return
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    write(tmp, data)
    os.replace(tmp, path)


def upload(local_file: PathLike, dest: PathLike) -> None:
    """Copies a local file to `dest` (local or remote); `dest` appears only once complete."""
    dest = epath.Path(dest)
    if not is_remote(dest):
        tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        shutil.copyfile(local_file, tmp)
        os.replace(tmp, dest)
        return
    with open(local_file, "rb") as src, dest.open("wb") as dst:
        shutil.copyfileobj(src, dst, _COPY_CHUNK)


def _version(url: str) -> str:
    """What changes when the object is rewritten (generation / etag / md5), plus its size."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(url)
    info = fs.info(p)
    stamp = next((str(info[k]) for k in ("generation", "md5Hash", "ETag", "etag", "mtime", "LastModified")
                  if info.get(k)), "")
    return f"{info.get('size')}:{stamp}"


def default_cache_dir() -> str:
    """CHAMELEON_JAX_CACHE if set, else a folder under the system temp dir."""
    return os.environ.get("CHAMELEON_JAX_CACHE") or os.path.join(tempfile.gettempdir(), "chameleon_jax_cache")


def local_copy(path: PathLike, cache_dir: PathLike | None = None) -> str:
    """A local file with `path`'s content: `path` itself if local, else a cached download.

    The cache key includes the object's version, so a rewritten object is fetched again. Concurrent
    processes on one host may race; each downloads to its own temporary name and renames, so a reader
    never sees a partial file.
    """
    if not is_remote(path):
        return os.fspath(path)
    url = os.fspath(path)
    key = hashlib.sha256(f"{url}\n{_version(url)}".encode()).hexdigest()[:16]
    cache = os.path.join(os.fspath(cache_dir or default_cache_dir()), "objects")
    os.makedirs(cache, exist_ok=True)
    local = os.path.join(cache, f"{key}-{os.path.basename(url)}")
    if not os.path.exists(local):
        tmp = f"{local}.{uuid.uuid4().hex[:8]}.tmp"
        with epath.Path(url).open("rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
        os.replace(tmp, local)
    return local


class MirroredDir:
    """A local staging folder whose files are copied whole to a remote folder at each `sync()`.

    For writers that append to local files (tensorboardX event files, profiler traces): they write
    into `.local`; `sync()` uploads every file whose size changed since its last upload (whole: an
    object store has no append), at most once per `min_interval_s` unless forced; `close()` forces the
    last one. A local `remote` needs no mirror: `.local` is then `remote` itself and `sync()` does nothing.
    """

    def __init__(self, remote: PathLike, prefix: str = "mirror-", min_interval_s: float = 0.0):
        self.remote = epath.Path(remote)
        self._mirrored = is_remote(remote)
        self._min_interval_s, self._last_sync = min_interval_s, float("-inf")
        if self._mirrored:
            self.local = tempfile.mkdtemp(prefix=prefix)
        else:
            self.remote.mkdir(parents=True, exist_ok=True)
            self.local = os.fspath(self.remote)
        self._uploaded: dict[str, int] = {}

    def sync(self, force: bool = False) -> None:
        """Uploads what changed; unless `force`, at most once per `min_interval_s`."""
        if not self._mirrored or (not force and time.monotonic() - self._last_sync < self._min_interval_s):
            return
        self._last_sync = time.monotonic()
        for root, _, files in os.walk(self.local):
            for name in files:
                src = os.path.join(root, name)
                rel = os.path.relpath(src, self.local)
                size = os.path.getsize(src)
                if self._uploaded.get(rel) != size:
                    upload(src, self.remote / rel)
                    self._uploaded[rel] = size

    def close(self) -> None:
        self.sync(force=True)
        if self._mirrored:
            shutil.rmtree(self.local, ignore_errors=True)
