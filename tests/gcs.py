"""A real local GCS server for tests: `gcp-storage-emulator` in its own process.

    with GcsEmulator() as gcs:          # or the `gcs` pytest fixture (tests/conftest.py)
        os.environ.update(gcs.env)      # clients then talk to it: gcsfs/etils.epath and TensorStore
        path = gcs.new_bucket()         # "gs://<fresh bucket>"

The server runs in a subprocess (`python tests/gcs.py --port N`) so that training processes the tests
kill with SIGKILL never take it down, and so that its request handling does not share the test's GIL.

One test-only patch: the emulator omits `x-goog-generation` / `x-goog-metageneration` on media
downloads. TensorStore's conditional writes read the generation from that header, so Orbax's OCDBT
manifest update fails against the stock emulator with "Malformed StorageGeneration". Real GCS always
sends the headers, so the library needs nothing; the server process adds them here.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid


def _patch_download_headers() -> None:
    """Adds the generation headers real GCS sends on downloads (must run before importing `server`)."""
    from gcp_storage_emulator.handlers import objects

    original = objects.download

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # noqa: BLE001 - a missing object: the original handler answers 404
            obj = None
        if obj is not None:
            response["x-goog-generation"] = str(obj.get("generation", 1))
            response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
        return original(request, response, storage, *args, **kwargs)

    objects.download = download  # `objects.get` (alt=media) looks the name up at call time too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """Starts the server on a free port and waits (with a deadline) until it answers."""

    def __init__(self, startup_timeout_s: float = 60.0):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,      # gcsfs / google-cloud-storage, hence etils.epath
            "TENSORSTORE_GCS_HTTP_URL": self.url,   # TensorStore's gcs kvstore, hence Orbax arrays
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",  # TensorStore skips credential discovery
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no bucket-type probe (and warning) per call
            "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential search (a metadata-server probe per process)
        }
        self._timeout = startup_timeout_s
        self._proc = self._log = None

    def start(self) -> "GcsEmulator":
        # Its log goes to a file: the server logs every request, and an unread pipe would fill and block it.
        self._log = tempfile.NamedTemporaryFile(prefix="gcs-emulator-", suffix=".log", delete=False)
        self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--port", str(self.port)],
                                      stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self._timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"gcp-storage-emulator exited at start ({self._log.name}): "
                                   + open(self._log.name, errors="replace").read()[-2000:])
            try:
                urllib.request.urlopen(self.url + "/", timeout=2).read()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"gcp-storage-emulator did not answer on {self.url} "
                                       f"within {self._timeout:.0f} s")
                time.sleep(0.1)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._log is not None:
            self._log.close()
            os.unlink(self._log.name)
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def new_bucket(self, prefix: str = "test") -> str:
        """Creates an empty bucket through the JSON API; returns its gs:// URL."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                         data=('{"name": "%s"}' % name).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).read()
        return f"gs://{name}"

    def object_sizes(self, url: str) -> dict[str, int]:
        """{object name: bytes} under a gs://bucket/prefix, straight from the server's listing."""
        import json
        import urllib.parse

        bucket, _, prefix = url.removeprefix("gs://").partition("/")
        sizes, token = {}, None
        while True:
            query = {"prefix": prefix, "maxResults": "1000"} | ({"pageToken": token} if token else {})
            listing = json.loads(urllib.request.urlopen(
                f"{self.url}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}", timeout=30).read())
            sizes.update({o["name"]: int(o["size"]) for o in listing.get("items", [])})
            token = listing.get("nextPageToken")
            if not token:
                return sizes


def _serve(port: int) -> None:
    _patch_download_headers()
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", port, in_memory=True)
    server.run()  # until SIGTERM


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    _serve(parser.parse_args().port)
