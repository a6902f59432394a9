"""Libraries in place of hand-written twins: sizes are parsed by accelerate's
``convert_file_size_to_int`` behind a thin normalising wrapper, and the output lock is a
``filelock.FileLock`` that still carries neuroal's holder record and error messages."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from neuroal.config.inputs import SIZE_HELP, parse_size
from neuroal.outputs.safety import OutputLock, OutputLockedError

# --------------------------------------------------------------------------- sizes

# What neuroal has always read, written out by hand: KB = 1000, KiB = 1024, any case means
# bytes, spaces allowed, TB / TiB, bare numbers and floats are bytes (truncated to an int).
SIZES = [
    ("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("80GiB", 80 * 2**30), ("1.5GB", 15 * 10**8),
    ("10KB", 10**4), ("3MiB", 3 * 2**20), ("12kib", 12 * 2**10), ("2gb", 2 * 10**9),
    ("100mb", 10**8), ("2 GB", 2 * 10**9), (" 3 gib ", 3 * 2**30), ("1TB", 10**12),
    ("2TiB", 2 * 2**40), ("1.5TB", 15 * 10**11), ("0.5TiB", 2**39), ("1e3GB", 10**12),
    ("2.5e-3GB", 25 * 10**5), ("0.3KB", 300), ("1000", 1000), ("5e8", 5 * 10**8),
    ("7b", 7), ("1.5B", 1), ("1.", 1), (500_000_000, 500_000_000), (1.5e9, 15 * 10**8),
    (2.7, 2),
]
NOT_SIZES = ["abc", "-1GB", "2 GBs", "nan", "GB", "1PB", True, None, [2]]
NOT_POSITIVE = ["0", "0.5B", "1e999GB", "1e300TB", "1e400", 0, -1, 0.5, float("nan"),
                float("inf")]


@pytest.mark.parametrize(("value", "expected"), SIZES)
def test_sizes_read_as_before(value: object, expected: int) -> None:
    got = parse_size(value, "x")
    assert got == expected and isinstance(got, int)


@pytest.mark.parametrize("value", NOT_SIZES)
def test_a_non_size_names_value_expectation_and_example(value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value, "engine.memory_limit")
    assert str(info.value) == f"engine.memory_limit={value!r}: expected {SIZE_HELP}"
    assert "e.g. 2GB" in str(info.value)


@pytest.mark.parametrize("value", NOT_POSITIVE)
def test_a_size_below_one_byte_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r"^x=.*: expected a positive size, bytes or"):
        parse_size(value, "x")


@pytest.mark.parametrize("text", ["1GB", "1GiB", "1MB", "1MiB", "1KB", "1KiB", "2.5GB",
                                  "0.75GiB", "24GB", "80GiB"])
def test_accelerate_convention_is_neuroals(text: str) -> None:
    """Where accelerate reads the spelling as bytes, the results are identical: GB = 10^9,
    GiB = 2^30 in both (the convention neuroal documents)."""
    from accelerate.utils import convert_file_size_to_int

    assert parse_size(text) == convert_file_size_to_int(text)
    assert parse_size("1GiB") - parse_size("1GB") == 2**30 - 10**9


def test_the_wrapper_calls_accelerate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every value reaches accelerate's parser, in a spelling it reads as bytes."""
    import accelerate.utils

    real = accelerate.utils.convert_file_size_to_int
    seen: list[object] = []

    def spy(size: int | str) -> int:
        seen.append(size)
        return real(size)

    monkeypatch.setattr(accelerate.utils, "convert_file_size_to_int", spy)
    assert [parse_size(v) for v in ("1GiB", "2 gb", "1.5TB", "2TiB", "1000", 7.9, 64)] == \
        [2**30, 2 * 10**9, 15 * 10**11, 2 * 2**40, 1000, 7, 64]
    assert seen == ["1GiB", "2GB", "1500.0GB", "2048GiB", 1000, 7, 64]


def test_lower_case_units_stay_bytes() -> None:
    """accelerate reads a lower-case ``gb`` as gigabits (1/8); neuroal keeps bytes for every
    case, as it documents, so ``80gb`` of GPU memory is not silently 10 GB."""
    from accelerate.utils import convert_file_size_to_int

    assert convert_file_size_to_int("80gb") == 10**10
    assert parse_size("80gb") == parse_size("80GB") == 8 * 10**10


# --------------------------------------------------------------------------- lock

_TRY = ("import sys, time; from pathlib import Path; from neuroal.outputs.safety import OutputLock\n"
        "start = Path(sys.argv[2])\n"
        "while not start.exists(): time.sleep(0.01)\n"
        "lock = OutputLock(Path(sys.argv[1]))\n"
        "try:\n"
        "    lock.acquire()\n"
        "except Exception as exc:\n"
        "    print('refused', type(exc).__name__, exc, flush=True)\n"
        "else:\n"
        "    print('locked', flush=True); time.sleep(6); lock.release()\n")


def test_two_concurrent_runs_one_refused_with_the_holder_named(tmp_path: Path) -> None:
    """Two processes started together on one output: one takes the lock, the other gets the
    same error as before the FileLock (holder's PID, host, start and command; the fix)."""
    tmp, start = tmp_path / "out.neuroal-tmp", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _TRY, str(tmp), str(start)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        time.sleep(0.5)
        start.touch()
        lines = {p.pid: p.stdout.readline().strip() for p in procs if p.stdout is not None}
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert sorted(line.split()[0] for line in lines.values()) == ["locked", "refused"], lines
    winner = next(pid for pid, line in lines.items() if line == "locked")
    refusal = next(line for line in lines.values() if line.startswith("refused"))
    expected = (rf"^refused OutputLockedError another run is writing {re.escape(repr(str(tmp_path / 'out')))}"
                rf": the lock {re.escape(repr(str(tmp / 'lock')))} is held by PID {winner} on host "
                rf"{re.escape(socket.gethostname())} since \S+ \(.*\); wait for it to finish or "
                r"choose another --output$")
    assert re.match(expected, refusal), refusal


def test_the_lock_is_a_filelock(tmp_path: Path) -> None:
    """While neuroal holds the output, filelock itself sees the file locked; the holder record
    is in the file; release removes the file and the folders acquire() made."""
    from filelock import FileLock, Timeout

    lock = OutputLock(tmp_path / "a" / "out.neuroal-tmp")
    lock.acquire()
    try:
        assert json.loads(lock.file.read_text())["pid"] == os.getpid()
        with pytest.raises(Timeout):
            FileLock(lock.file, thread_local=False).acquire(blocking=False)
        with pytest.raises(OutputLockedError, match=rf"is held by PID {os.getpid()}"):
            OutputLock(lock.tmp).acquire()
    finally:
        lock.release()
    assert list(tmp_path.iterdir()) == []
    with FileLock(tmp_path / "free.lock", thread_local=False).acquire(blocking=False):
        pass


def test_without_flock_the_holder_record_is_the_lock(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that refuses ``flock`` (ENOSYS): the record still keeps a second run out,
    a record of a dead process is taken over, and release removes it."""
    import filelock._native._unix as unix

    def no_flock(fd: int) -> bool:
        raise OSError(errno.ENOSYS, "flock not supported")

    monkeypatch.setattr(unix, "lock_fd_nonblocking", no_flock)
    first = OutputLock(tmp_path / "out.neuroal-tmp")
    first.acquire()
    with pytest.raises(OutputLockedError, match=rf"held by PID {os.getpid()} on host .*wait for"):
        OutputLock(first.tmp).acquire()
    first.release()
    assert not first.tmp.exists()
    first.tmp.mkdir()
    first.file.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    second = OutputLock(first.tmp)
    second.acquire()
    assert json.loads(second.file.read_text())["pid"] == os.getpid()
    second.release()
    assert not first.tmp.exists()
