"""The ceiling client: THREADS threads of stdlib ``http.client``, keep-alive, PART-byte ranged GETs read with
``readinto`` into one reused buffer per thread, bytes discarded; no torch, nothing else imported.

    python raw_get.py URL SIZE THREADS PART [--check LOCAL]

Prints ``RESULT {"seconds", "bytes", "rss_hwm_mib"}`` (seconds: from the first request to the last byte); with
``--check`` it compares every range with the local file and prints ``verified N bytes``. Standard library only:
it runs as a script from this folder, in any Python.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
import urllib.parse


def main(argv: list[str]) -> None:
    url, size, threads, part = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    local = argv[5] if argv[4:5] == ["--check"] else None
    u = urllib.parse.urlsplit(url)
    target = u.path + ("?" + u.query if u.query else "")
    parts = iter([(s, min(s + part, size)) for s in range(0, size, part)])
    lock = threading.Lock()
    done, errors = [0] * threads, list[BaseException]()

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=120)
        buf = memoryview(bytearray(part))
        file = open(local, "rb") if local else None  # noqa: SIM115
        try:
            while not errors:
                with lock:
                    p = next(parts, None)
                if p is None:
                    break
                s, e = p
                conn.request("GET", target, headers={"Range": f"bytes={s}-{e - 1}"})
                r = conn.getresponse()
                if r.status != 206:
                    raise RuntimeError(f"HTTP {r.status} for bytes={s}-{e - 1}: {r.read(300)!r}")
                n, want = 0, e - s
                while n < want:
                    k = r.readinto(buf[n:want])
                    if not k:
                        raise RuntimeError(f"short read at {s + n} (wanted {want} from {s})")
                    n += k
                if r.read(1):
                    raise RuntimeError(f"more than {want} bytes for bytes={s}-{e - 1}")
                if file is not None:
                    file.seek(s)
                    if file.read(want) != buf[:want]:
                        raise RuntimeError(f"bytes {s}-{e - 1} differ from the file")
                done[i] += n
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()
            if file is not None:
                file.close()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    if sum(done) != size:
        raise RuntimeError(f"got {sum(done)} bytes, expected {size}")
    with open("/proc/self/status") as status:  # the peak resident set, as the GPU rows report theirs
        hwm = next((int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:")), None)
    print("RESULT " + json.dumps({"seconds": seconds, "bytes": size, "rss_hwm_mib": hwm}), flush=True)
    if local:
        print(f"verified {size} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
