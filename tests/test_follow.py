"""FileFollower: what another process appends to the driver log reaches the rule's log."""

from __future__ import annotations

import io
import subprocess
import sys
import time

from glmsnake.launch.follow import FileFollower


def test_copies_appends_from_another_process_and_the_last_bytes(tmp_path):
    log = tmp_path / "driver.log"
    log.write_bytes(b"an earlier run's output\n")  # already in that run's rule log: skipped
    out = io.BytesIO()
    writer = (
        "import sys, time\n"
        "with open(sys.argv[1], 'ab', buffering=0) as f:\n"
        "    for i in range(40):\n"
        "        f.write(b'line %d\\n' % i)\n"
        "    sys.stdin.read()\n"  # then it waits, still running, until told to finish
    )
    with FileFollower(log, out, interval_s=0.02) as follower:
        proc = subprocess.Popen([sys.executable, "-c", writer, str(log)], stdin=subprocess.PIPE)
        deadline = time.time() + 10
        while b"line 39" not in out.getvalue() and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None and b"line 39" in out.getvalue()  # copied while the writer runs
        proc.communicate(b"")
        assert proc.returncode == 0
        with open(log, "ab") as f:
            f.write(b"written just before the job ended\n")
    expect = b"".join(b"line %d\n" % i for i in range(40)) + b"written just before the job ended\n"
    assert out.getvalue() == expect
    assert follower.offset == log.stat().st_size


def test_file_created_late_and_replaced(tmp_path):
    log = tmp_path / "late.log"
    out = io.BytesIO()
    follower = FileFollower(log, out)
    with follower:
        assert follower.drain() == 0  # not there yet: nothing, no error
        log.write_bytes(b"first attempt\n")
        assert follower.drain() == len(b"first attempt\n")
        log.write_bytes(b"new\n")  # replaced by a shorter file: read from its start
        assert follower.drain() == 4
    assert out.getvalue() == b"first attempt\nnew\n"
