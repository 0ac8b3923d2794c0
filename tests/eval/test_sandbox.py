"""The sandbox: passes what passes, fails what fails, and stops endless loops, memory bombs and network use
within its limits."""
from __future__ import annotations

import time

from idlm.eval.sandbox import network_isolation, run_python


def test_a_passing_and_a_failing_program():
    assert run_python("assert sum([1, 2]) == 3").passed
    bad = run_python("assert sum([1, 2]) == 4, 'wrong sum'")
    assert bad.status == "failed" and "wrong sum" in bad.detail


def test_an_endless_loop_is_killed_at_the_time_limit():
    t0 = time.perf_counter()
    r = run_python("import subprocess\nsubprocess.Popen(['sleep', '60'])\nwhile True:\n    pass\n", timeout=2)
    assert r.status == "timeout" and time.perf_counter() - t0 < 10


def test_a_memory_bomb_fails_within_the_memory_limit():
    t0 = time.perf_counter()
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(50 << 20))\n", timeout=20, memory_mb=512)
    assert r.status == "failed" and "MemoryError" in r.detail and time.perf_counter() - t0 < 20


def test_no_network_and_an_empty_working_directory():
    r = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)\n")
    assert r.status == "failed" and network_isolation() in ("namespace", "guard")
    assert run_python("import os\nassert os.listdir('.') == []\nopen('f', 'w').write('x')\n").passed
    assert run_python("import os\nassert not os.path.exists('f')\n").passed  # each run starts clean
