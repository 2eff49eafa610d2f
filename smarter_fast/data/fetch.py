"""Download of the CS224N default-project data files, resumable and verified by checksum.

The files come from the course repository at a pinned commit, so that every run trains on the same
bytes. Each is checked against its git blob SHA-1 (SHA-1 of `b"blob <size>\\0" + content`), the id
that commit's tree lists for it (`git ls-tree COMMIT data/`): a mirror's copy is checked against
the course repository's, with no second table to keep in step.

Downloads go to DIR/.partial/<name> and reach DIR/<name> only verified, by os.replace on the same
filesystem, so a final name never holds a partial or corrupt file. An interrupted download stays
in DIR/.partial and the next run resumes it with an HTTP Range request. Standard library only
(urllib), so that fetching needs nothing beyond the package's own dependencies.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from ..tasks import QUORA, SST, STS

REPOSITORY = "gpoesia/minbert-default-final-project"
COMMIT = "7ac8260577fc12a86c7aaf38918056c30054ef39"
DEFAULT_MIRROR = f"https://raw.githubusercontent.com/{REPOSITORY}/{COMMIT}/data/"
SOURCE_PAGE = f"https://github.com/{REPOSITORY}/tree/{COMMIT}/data"
DEFAULT_DIR = "data"  # where `python -m smarter_fast.train` looks without --data-dir
PARTIAL = ".partial"
CHUNK = 1 << 16
TIMEOUT = 30.0  # seconds without a byte before a connection counts as lost

# Git blob SHA-1 of each file at COMMIT, by (task, split); the names are the registry's.
_BLOB_SHA1 = {
    (SST, "train"): "9cb7333cb1dae49c2bd2a4b56a24882a6e8704b5",
    (SST, "dev"): "3171aa629a340809d2db4a50df8f6e5ec9420ab0",
    (SST, "test-student"): "bbd2313758825f86e24416d6aad64cd93370cf7a",
    (QUORA, "train"): "a3b5546f6a0e65b60a328a5d294d1038f5bed1da",
    (QUORA, "dev"): "de7cfa32428fd470b93f778fccc45a619e01336f",
    (QUORA, "test-student"): "f257ef00558555afb50819578a58205732b16354",
    (STS, "train"): "12b17760e7795fee35aeeabc290d5651de02622a",
    (STS, "dev"): "9392860e584717976b8d817cc40c9e6ceeec27e0",
    (STS, "test-student"): "25f0cf8fafdd1f82b9e2bb460c708af34341ce60",
}
CHECKSUMS = {task.file_name(split): sha for (task, split), sha in _BLOB_SHA1.items()}


class Unreachable(Exception):
    """No answer from the mirror at all (refused, unknown host, timeout): the other files would
    fail alike, so fetching stops."""


class Incomplete(Exception):
    """The body ended short or the connection dropped: the partial file is kept for resuming."""


@dataclass
class FetchResult:
    """What a fetch did, file by file; `problems` has one line per file not in place."""

    directory: Path
    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)    # already present and verified
    corrupt: list[str] = field(default_factory=list)    # failed the checksum; deleted
    partial: list[str] = field(default_factory=list)    # incomplete; kept in DIR/.partial
    failed: list[str] = field(default_factory=list)     # an HTTP error status
    problems: list[str] = field(default_factory=list)
    unreachable: str | None = None  # the one line saying the mirror could not be reached

    @property
    def ok(self) -> bool:
        return not self.problems and self.unreachable is None


def git_blob_sha1(path) -> str:
    """The id git gives the file's content, as `git hash-object` prints it."""
    path = Path(path)
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_url(mirror: str | None, name: str) -> str:
    """BASE/<name>, with or without a trailing slash on BASE."""
    return (mirror or DEFAULT_MIRROR).rstrip("/") + "/" + urllib.parse.quote(name)


def fetch(to=DEFAULT_DIR, mirror: str | None = None, checksums: dict[str, str] | None = None,
          timeout: float = TIMEOUT, progress: bool = True,
          say: Callable[[str], None] = print) -> FetchResult:
    """Fetches every file of `checksums` (default CHECKSUMS) from `mirror` (default the course
    repository at COMMIT) into `to`, verified; `say` gets one line per file as it goes. Stops at
    the first file whose mirror cannot be reached (result.unreachable); otherwise goes on past a
    bad file and lists it in result.problems."""
    checksums = CHECKSUMS if checksums is None else checksums
    directory = Path(to)
    result = FetchResult(directory)
    partial_dir, created = directory / PARTIAL, not directory.exists()
    for name, sha1 in checksums.items():
        try:
            problem = _fetch_one(name, sha1, directory, file_url(mirror, name), timeout, progress, say, result)
        except Unreachable as e:
            missing = [n for n, s in checksums.items() if not _verified(directory / n, s)]
            result.unreachable = (
                f"could not reach {file_url(mirror, name)} ({e}); to place the files by hand, "
                f"download {', '.join(missing)} from {SOURCE_PAGE} into {directory.resolve()}, "
                f"then rerun to verify them")
            break
        if problem:
            result.problems.append(problem)
            say(problem)
    for leftover in (partial_dir, directory if created else None):  # nothing empty left behind
        if leftover is not None and leftover.is_dir() and not any(leftover.iterdir()):
            leftover.rmdir()
    return result


def _verified(path: Path, sha1: str) -> bool:
    return path.is_file() and git_blob_sha1(path) == sha1


def _fetch_one(name, sha1, directory, url, timeout, progress, say, result) -> str | None:
    """Puts one file in place, recording it in `result`; returns the problem line when it could not."""
    final, part = directory / name, directory / PARTIAL / name
    if final.is_file():
        if git_blob_sha1(final) == sha1:
            result.skipped.append(name)
            say(f"{name}: already present and verified; skipped")
            return None
        say(f"{name}: present but not the pinned file (checksum differs); downloading to replace it")
    part.parent.mkdir(parents=True, exist_ok=True)
    if not _verified(part, sha1):  # a verified partial only missed its move into place
        try:
            _download(url, part, timeout, progress, name, say)
        except Incomplete as e:
            result.partial.append(name)
            return (f"{name}: incomplete download ({e}); the {part.stat().st_size} bytes received are "
                    f"kept in {part} and a rerun resumes from there")
        except urllib.error.HTTPError as e:
            result.failed.append(name)
            return f"{name}: HTTP {e.code} {e.reason} from {url}"
        got = git_blob_sha1(part)
        if got != sha1:
            part.unlink()
            result.corrupt.append(name)
            return (f"{name}: checksum mismatch (git blob SHA-1 {got}, expected {sha1}); the download "
                    f"was deleted")
    os.replace(part, final)
    result.fetched.append(name)
    say(f"{name}: fetched and verified ({final.stat().st_size} bytes)")
    return None


def _download(url, part: Path, timeout, progress, name, say) -> None:
    """Fills `part` with the body of `url`, continuing from its current size where it has one."""
    have = part.stat().st_size if part.is_file() else 0
    response = _open(url, have, timeout)
    content_range = response.headers.get("Content-Range") or "no Content-Range"
    if have and response.status == 206 and content_range.startswith(f"bytes {have}-"):
        say(f"{name}: resuming at byte {have}")
    elif have:
        why = {200: "the server ignored the range request",
               416: "the partial file is no shorter than the file yet does not verify",
               }.get(response.status, f"the server answered the range request with {content_range}")
        say(f"{name}: {why}; starting over")
        if response.status != 200:
            response.close()
            response = _open(url, 0, timeout)
        have = 0
    with response:
        _stream(response, part, have, progress, name)


def _open(url: str, start: int, timeout: float):
    """The response to GET `url` from byte `start`; Unreachable when nothing answers. An HTTP
    error status other than 416 propagates as urllib.error.HTTPError."""
    headers = {"User-Agent": "smarter_fast-fetch"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:
            return e
        raise
    except urllib.error.URLError as e:
        raise Unreachable(_reason(e.reason)) from None
    except (OSError, http.client.HTTPException) as e:
        raise Unreachable(_reason(e)) from None


def _reason(error) -> str:
    """A short phrase for an error; timeouts arrive as several types."""
    if isinstance(error, TimeoutError) or str(error) == "timed out":
        return "timed out"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _stream(response, part: Path, have: int, progress: bool, name: str) -> None:
    """Appends the body to `part` (rewrites it when `have` is 0); Incomplete when it ends short of
    Content-Length or the connection drops."""
    length = response.headers.get("Content-Length")
    total = have + int(length) if length is not None else None
    received = have
    with open(part, "ab" if have else "wb") as out, \
            tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=name, disable=not progress, leave=False) as bar:
        while True:
            try:
                chunk = response.read1(CHUNK)  # what has arrived, so that a stall loses none of it
            except (OSError, http.client.HTTPException) as e:
                raise Incomplete(f"connection lost after {received} bytes: {_reason(e)}") from None
            if not chunk:
                break
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    if total is not None and received < total:
        raise Incomplete(f"got {received} of {total} bytes")


__all__ = ["CHECKSUMS", "COMMIT", "DEFAULT_DIR", "DEFAULT_MIRROR", "FetchResult", "REPOSITORY",
           "SOURCE_PAGE", "fetch", "file_url", "git_blob_sha1"]
