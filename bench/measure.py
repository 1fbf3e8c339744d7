"""Run a command and report its wall time and peak RSS as JSON (the last line of stdout).

    python bench/measure.py [--timeout S] [--capture] -- CMD ARGS...

Why a separate, small launcher: Linux keeps a process's ``ru_maxrss`` across ``exec``, so a child
forked from a big parent (``bench/run.py`` holds models in memory) inherits the parent's resident
size as its starting peak. This launcher imports nothing heavy, so the child it forks starts from
~10 MiB and ``wait4`` reports the command's own peak.

With ``--capture`` the command's stdout is kept and returned (``stdout``); otherwise it is dropped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    timeout, capture = 1800.0, False
    while argv and argv[0] != "--":
        a = argv.pop(0)
        if a == "--timeout":
            timeout = float(argv.pop(0))
        elif a == "--capture":
            capture = True
        else:
            raise SystemExit(f"unknown option {a}")
    cmd = argv[1:]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=subprocess.PIPE)
    # read the pipes in threads so that a chatty child never blocks, then reap it with wait4
    import threading

    chunks = {"out": [], "err": []}

    def pump(stream, key):
        for block in iter(lambda: stream.read(65536), b""):
            chunks[key].append(block)

    threads = [threading.Thread(target=pump, args=(p.stderr, "err"), daemon=True)]
    if capture:
        threads.append(threading.Thread(target=pump, args=(p.stdout, "out"), daemon=True))
    for t in threads:
        t.start()
    timed_out = False
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - t0 > timeout:
            timed_out = True
            p.kill()
            pid, status, ru = os.wait4(p.pid, 0)
            break
        time.sleep(0.005)
    wall = time.perf_counter() - t0
    for t in threads:
        t.join(timeout=5)
    res = {"rc": "timeout" if timed_out else os.waitstatus_to_exitcode(status), "wall_s": wall,
           "peak_rss_mb": ru.ru_maxrss / 1024.0, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
           "stderr": b"".join(chunks["err"]).decode(errors="replace")[-4000:]}
    if capture:
        res["stdout"] = b"".join(chunks["out"]).decode(errors="replace")
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
