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


def local_path(path):
    """The file-system path that ``path`` (a local path or ``file://`` URL) names; None for a URL to fetch."""
    path = os.fspath(path)
    parsed = urllib.parse.urlparse(path)
    if parsed.scheme == "file":
        return urllib.request.url2pathname(parsed.path)
    return None if len(parsed.scheme) > 1 else path  # one letter: a Windows drive


def read_bytes(path: str) -> bytes:
    """All bytes of ``path``, a local path or any URL of the module's docstring."""
    path, local = os.fspath(path), local_path(path)
    if local is not None:
        if not os.path.exists(local):
            raise FileNotFoundError(f"checkpoint not found: {local}")
        if os.path.isdir(local):
            raise IsADirectoryError(f"checkpoint path is a directory, not a file: {local}")
        with open(local, "rb") as f:
            return f.read()
    if _is_blob_url(path):
        import blobfile as bf  # heavy import, only when needed

        if not bf.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        with bf.BlobFile(path, "rb") as f:
            return f.read()
    scheme = urllib.parse.urlparse(path).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL scheme {scheme!r} in {path!r}: use a local path, file://, gs://, az://, "
                         "or http(s):// (a local path with ':' in its name: prefix it with ./)")
    try:
        with urllib.request.urlopen(path, timeout=60) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise FileNotFoundError(f"checkpoint not found: {path} (HTTP 404)") from e
        raise OSError(f"cannot read {path}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise OSError(f"cannot read {path}: {e.reason}") from e
