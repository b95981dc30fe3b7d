"""Per-job port blocks are host-wide: Ray's C++ servers listen on every address of the host, so
two Ray nodes on one host (two jobs on a node, or the loopback test cluster) must not overlap."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys

from glmsnake.launch.addresses import PORT_LOW, ephemeral_low, free_port_block

CHILD = (
    "import random, sys, time\n"
    "from glmsnake.launch.addresses import free_port_block\n"
    "print(free_port_block(50, random.Random(3), sys.argv[1]), flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_port_in_use_on_another_address_is_not_picked(tmp_path):
    count = 4
    first = random.Random(7).randrange(PORT_LOW, ephemeral_low() - count - 1)  # what seed 7 tries first
    with socket.socket() as other_node:
        other_node.bind(("127.0.0.2", first + 2))
        other_node.listen()
        base = free_port_block(count, random.Random(7), str(tmp_path))
    assert not base <= first + 2 < base + count


def test_blocks_of_live_processes_do_not_overlap_and_ended_ones_are_freed(tmp_path):
    folder = str(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", CHILD, folder], stdout=subprocess.PIPE, text=True)
    try:
        theirs = int(child.stdout.readline())
        mine = free_port_block(50, random.Random(3), folder)  # the same seed tries their block first
        assert mine + 50 <= theirs or theirs + 50 <= mine
        assert sorted(p.name for p in tmp_path.iterdir() if p.name != "lock") == sorted([str(child.pid), str(os.getpid())])
    finally:
        child.kill()
        child.wait()
    # Their process ended: the block is free again (and replaces this process's earlier one).
    assert free_port_block(50, random.Random(3), folder) == theirs
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "lock") == [str(os.getpid())]

