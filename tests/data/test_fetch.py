"""`python -m smarter_fast.data fetch`: downloads from a local HTTP server on 127.0.0.1 serving small
generated CS224N files, with a checksum table computed here; resume, servers that misbehave
(ignore Range, cut the body short, drop the connection), bad checksums, no server at all, and an
end-to-end fetch then train."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from smarter_fast import tasks as registry
from smarter_fast.data import fetch as fetch_module
from smarter_fast.data.__main__ import main, parser
from smarter_fast.data.demo import write_demo_data
from smarter_fast.data.fetch import CHECKSUMS, DEFAULT_DIR, PARTIAL, SOURCE_PAGE, fetch

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "SMARTER_FAST_NO_EXT": "1"}
SMALL = {t.name: {"train": 12, "dev": 6, "test-student": 6} for t in registry.TASKS}
NAMES = [t.file_name(split) for t in registry.TASKS for split in ("train", "dev", "test")]


def blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def generated_files(directory: Path, sizes=SMALL) -> dict[str, bytes]:
    """The nine CS224N files, as the package's demo writer makes them."""
    write_demo_data(directory, sizes=sizes)
    return {name: (directory / name).read_bytes() for name in NAMES}


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files; server.modes[name] makes it misbehave for that file: 'ignore-range'
    (200 and the whole body), 'truncate' (half the body, then a clean close), 'drop' (half the
    body, then a reset), 'stall' (half the body, then silence)."""

    def do_GET(self):
        state = self.server
        name = self.path.lstrip("/")
        state.requests.append((name, self.headers.get("Range")))
        body, mode = state.files.get(name), state.modes.get(name)
        if body is None:
            self.send_error(404)
            return
        start, ranged = 0, self.headers.get("Range")
        if ranged and mode != "ignore-range":
            start = int(ranged.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if mode in ("truncate", "drop", "stall"):
            self.wfile.write(payload[:len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            if mode == "drop":
                time.sleep(0.2)  # let the client read the half, then reset the connection
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            elif mode == "stall":
                state.release.wait(10)
            return
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A local server of the nine small files; .table is their checksum table, .url the base."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.files = generated_files(tmp_path / "generated")
    httpd.table = {name: blob_sha1(data) for name, data in httpd.files.items()}
    httpd.modes, httpd.requests, httpd.release = {}, [], threading.Event()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_fetch(to, server, **kw):
    lines = []
    result = fetch(to, server.url, checksums=kw.pop("checksums", server.table), progress=False,
                   say=lines.append, **kw)
    return result, "\n".join(lines)


def assert_in_place(directory: Path, server, names=NAMES):
    for name in names:
        assert (directory / name).read_bytes() == server.files[name], name
    assert not (directory / PARTIAL).exists()


def test_the_table_names_the_files_training_reads():
    assert list(CHECKSUMS) == NAMES  # every file of smarter_fast.tasks, train/dev/test-student
    assert all(len(sha) == 40 and int(sha, 16) >= 0 for sha in CHECKSUMS.values())
    assert DEFAULT_DIR == "data"


def test_a_clean_fetch_into_the_default_directory_is_what_training_finds(server, tmp_path, monkeypatch):
    from smarter_fast.training.run import resolve_data_dir
    monkeypatch.chdir(tmp_path)
    result, said = quiet_fetch(DEFAULT_DIR, server)
    assert result.ok and result.fetched == NAMES
    assert said.splitlines() == [f"{n}: fetched and verified ({len(server.files[n])} bytes)" for n in NAMES]
    assert_in_place(tmp_path / "data", server)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(NAMES)
    assert [r for r in server.requests if r[1]] == []  # nothing to resume: no Range
    directory, _, synthetic = resolve_data_dir(None, tmp_path / "run")
    assert directory == Path("data") and not synthetic


def test_mirror_with_or_without_a_trailing_slash(server, tmp_path):
    for i, url in enumerate((server.url, server.url + "/")):
        assert fetch(tmp_path / str(i), url, checksums=server.table, progress=False, say=len).ok
    assert {path for path, _ in server.requests} == set(NAMES)  # never //name


def test_a_partial_file_is_resumed_with_a_range_request(server, tmp_path):
    name, cut = NAMES[0], 100
    (tmp_path / "d" / PARTIAL).mkdir(parents=True)
    (tmp_path / "d" / PARTIAL / name).write_bytes(server.files[name][:cut])
    result, said = quiet_fetch(tmp_path / "d", server)
    assert result.ok
    assert (name, f"bytes={cut}-") in server.requests
    assert f"{name}: resuming at byte {cut}" in said
    assert_in_place(tmp_path / "d", server)


def test_a_server_that_ignores_range_makes_the_file_start_over(server, tmp_path):
    name = NAMES[1]
    server.modes[name] = "ignore-range"
    (tmp_path / "d" / PARTIAL).mkdir(parents=True)
    (tmp_path / "d" / PARTIAL / name).write_bytes(server.files[name][:100])
    result, said = quiet_fetch(tmp_path / "d", server)
    assert result.ok, result.problems
    assert (name, "bytes=100-") in server.requests
    assert f"{name}: the server ignored the range request; starting over" in said
    assert_in_place(tmp_path / "d", server)


def test_a_partial_longer_than_the_file_starts_over(server, tmp_path):
    name = NAMES[2]
    (tmp_path / "d" / PARTIAL).mkdir(parents=True)
    (tmp_path / "d" / PARTIAL / name).write_bytes(b"x" * (len(server.files[name]) + 5))
    result, said = quiet_fetch(tmp_path / "d", server)
    assert result.ok, result.problems
    assert "starting over" in said
    assert_in_place(tmp_path / "d", server)


def test_a_wrong_checksum_deletes_that_file_names_it_and_fetches_the_rest(server, tmp_path):
    bad = NAMES[3]
    table = {**server.table, bad: "0" * 40}
    result, said = quiet_fetch(tmp_path / "d", server, checksums=table)
    assert not result.ok and result.corrupt == [bad]
    assert f"{bad}: checksum mismatch (git blob SHA-1 {server.table[bad]}, expected {'0' * 40})" in said
    assert not (tmp_path / "d" / bad).exists() and not (tmp_path / "d" / PARTIAL).exists()
    assert_in_place(tmp_path / "d", server, [n for n in NAMES if n != bad])


def test_the_command_exits_non_zero_on_a_wrong_checksum(server, tmp_path, monkeypatch, capsys):
    bad = NAMES[4]
    monkeypatch.setattr(fetch_module, "CHECKSUMS", {**server.table, bad: "0" * 40})
    assert main(["fetch", "--mirror", server.url, "--to", str(tmp_path / "d"), "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert f"{bad}: checksum mismatch" in out
    assert err == f"error: 1 file(s) not fetched: {bad} (see above)\n"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(n for n in NAMES if n != bad)


@pytest.mark.parametrize("mode", ["truncate", "drop", "stall"])
def test_a_cut_download_leaves_only_a_partial_then_resumes(server, tmp_path, mode):
    """truncate: fewer bytes than Content-Length; drop: a reset mid-body; stall: silence mid-body."""
    name, d = NAMES[5], tmp_path / "d"
    server.modes[name] = mode
    result, said = quiet_fetch(d, server, timeout=1.5)  # short for the stall, ample for the rest
    assert not result.ok and result.partial == [name]
    assert not (d / name).exists()
    part = d / PARTIAL / name
    assert part.is_file() and part.read_bytes() == server.files[name][:part.stat().st_size]
    size = len(server.files[name])
    if mode == "truncate":
        assert part.stat().st_size == size // 2
        assert f"{name}: incomplete download (got {size // 2} of {size} bytes)" in said
    elif mode == "stall":
        assert f"{name}: incomplete download (connection lost after {size // 2} bytes: timed out)" in said
    else:  # a reset reads as an error or, when it comes after the last byte was read, as a short body
        assert f"{name}: incomplete download (" in said
    assert f"kept in {part} and a rerun resumes from there" in said
    assert [n for n in NAMES if (d / n).is_file()] == [n for n in NAMES if n != name]
    have, server.requests[:], server.modes = part.stat().st_size, [], {}
    result, said = quiet_fetch(d, server)
    assert result.ok and result.fetched == [name] and len(result.skipped) == len(NAMES) - 1
    assert server.requests == [(name, f"bytes={have}-" if have else None)]
    assert_in_place(d, server)


def test_an_already_present_verified_file_is_skipped(server, tmp_path):
    d, name = tmp_path / "d", NAMES[6]
    d.mkdir()
    (d / name).write_bytes(server.files[name])
    result, said = quiet_fetch(d, server)
    assert result.ok and result.skipped == [name] and name not in result.fetched
    assert f"{name}: already present and verified; skipped" in said
    assert name not in {path for path, _ in server.requests}
    assert_in_place(d, server)


def test_a_present_file_that_differs_is_replaced_only_by_a_verified_one(server, tmp_path):
    d, name = tmp_path / "d", NAMES[7]
    d.mkdir()
    (d / name).write_bytes(b"someone else's version\n")
    result, said = quiet_fetch(d, server)
    assert result.ok and name in result.fetched
    assert f"{name}: present but not the pinned file" in said
    assert_in_place(d, server)


def test_no_server_is_one_clear_line_without_a_traceback(tmp_path):
    port = free_port()
    p = subprocess.run([sys.executable, "-m", "smarter_fast.data", "fetch", "--mirror",
                        f"http://127.0.0.1:{port}/", "--to", "d"],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stdout == ""
    (line,) = p.stderr.splitlines()
    assert line.startswith(f"error: could not reach http://127.0.0.1:{port}/{NAMES[0]} (Connection refused); "
                           f"to place the files by hand, download {', '.join(NAMES)} from {SOURCE_PAGE} "
                           f"into {tmp_path / 'd'}")
    assert not (tmp_path / "d").exists()


def test_a_server_that_never_answers_counts_as_unreachable(tmp_path):
    with socket.socket() as listener:  # accepts connections (the backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        result = fetch(tmp_path / "d", f"http://127.0.0.1:{listener.getsockname()[1]}",
                       checksums={"a.csv": "0" * 40, "b.csv": "1" * 40}, timeout=0.3, progress=False)
    assert not result.ok and result.fetched == []
    assert result.unreachable.startswith("could not reach http://127.0.0.1:")
    assert "(timed out); to place the files by hand, download a.csv, b.csv from" in result.unreachable


def test_unreachable_lists_only_the_files_still_missing(server, tmp_path):
    d = tmp_path / "d"
    assert quiet_fetch(d, server)[0].ok
    (d / NAMES[8]).unlink()
    result = fetch(d, f"http://127.0.0.1:{free_port()}", checksums=server.table, progress=False, say=len)
    assert f"download {NAMES[8]} from {SOURCE_PAGE} into {d}," in result.unreachable


def test_help_lists_the_command_and_every_default(capsys):
    for argv in (["--help"], ["fetch", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "fetch     download the CS224N data files, verified by checksum" in out
    assert "--mirror BASE_URL" in out and "(default: data)" in out
    fetch_parser = parser()._subparsers._group_actions[0].choices["fetch"]
    for action in fetch_parser._actions:
        if action.dest != "help":
            assert "(default: " in action.help, action.dest


def test_the_command_line_entry_fetches_and_verifies(server, tmp_path):
    """`python -m smarter_fast.data fetch` as typed, against a server of small files: none is the
    pinned file, so each is named, deleted, and the command exits 1 with a progress bar shown."""
    p = subprocess.run([sys.executable, "-m", "smarter_fast.data", "fetch", "--mirror", server.url + "/",
                        "--to", "d"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    for name in NAMES:
        assert f"{name}: checksum mismatch (git blob SHA-1 {server.table[name]}, expected {CHECKSUMS[name]})" in p.stdout
    assert "B/s" in p.stderr or "B [" in p.stderr  # tqdm's byte counter
    assert p.stderr.splitlines()[-1] == f"error: 9 file(s) not fetched: {', '.join(NAMES)} (see above)"
    assert not (tmp_path / "d").exists()


RUN_FETCH_WITH_TABLE = """
import json, runpy, sys
import smarter_fast.data.fetch as f
f.CHECKSUMS = json.loads(sys.argv[1])  # the served files' table: the command reads it at run time
sys.argv = ["smarter_fast.data", *sys.argv[2:]]
runpy.run_module("smarter_fast.data", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_fetch_then_train_end_to_end(server, tmp_path, make_tiny_run):
    """The full demo set served, fetched by the command (with the served files' table) into ./d,
    then one epoch of `python -m smarter_fast.train --data-dir d` on a tiny random BERT."""
    ckpt, _ = make_tiny_run(SMALL, "tiny_fetch")
    server.files = generated_files(tmp_path / "full", sizes=None)
    table = {name: blob_sha1(data) for name, data in server.files.items()}
    p = subprocess.run([sys.executable, "-c", RUN_FETCH_WITH_TABLE, json.dumps(table), "fetch",
                        "--mirror", server.url, "--to", "d"],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("fetched and verified") == 9
    p = subprocess.run([sys.executable, "-m", "smarter_fast.train", "--data-dir", "d", "--limit", "200",
                        "--epochs", "1", "--out", "OUT", "--batch-size", "16", "--pretrained", str(ckpt),
                        "--max-length", "64", "--num-threads", "1", "--backend", "ref", "--lr", "1e-3"],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.startswith("data: CS224N data in d |")
    (row,) = [json.loads(x) for x in (tmp_path / "OUT" / "metrics.jsonl").read_text().splitlines()]
    assert row["epoch"] == 1 and row["train_examples_sst"] == 200
