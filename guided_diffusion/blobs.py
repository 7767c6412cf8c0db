"""Reading a file's bytes from a local path, a ``file://`` URL, blobfile storage (gs://, az://, Azure https://)
or another http(s) URL (upstream's checkpoints are loaded from such URLs)."""

import os
import urllib.error
import urllib.parse
import urllib.request


def _is_blob_url(path: str) -> bool:
    parsed = urllib.parse.urlparse(path)
    return parsed.scheme in ("gs", "az") or (
        parsed.scheme == "https" and parsed.netloc.endswith(".blob.core.windows.net"))


def read_bytes(path: str) -> bytes:
    """All bytes of a local path, ``file://`` URL, blobfile URL (gs://, az://, Azure https://)
    or other http(s) URL."""
    path = os.fspath(path)
    parsed = urllib.parse.urlparse(path)
    if parsed.scheme == "file":
        path = urllib.request.url2pathname(parsed.path)
        parsed = urllib.parse.urlparse(path)
    if _is_blob_url(path):
        import blobfile as bf  # heavy import, only when needed

        if not bf.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        with bf.BlobFile(path, "rb") as f:
            return f.read()
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(path, timeout=60) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(f"checkpoint not found: {path} (HTTP 404)") from e
            raise OSError(f"cannot read {path}: HTTP {e.code} {e.reason}") from e
        except urllib.error.URLError as e:
            raise OSError(f"cannot read {path}: {e.reason}") from e
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise ValueError(f"unsupported URL scheme {parsed.scheme!r} in {path!r}: use a local path, "
                         "file://, gs://, az://, or http(s)://")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint path is a directory, not a file: {path}")
    with open(path, "rb") as f:
        return f.read()
