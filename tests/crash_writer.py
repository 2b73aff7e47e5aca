"""A writer for the crash test: 16 threads append and print each acknowledged index.

Run as `python -m tests.crash_writer LOG_DIR KEY_FILE ROUND`; it writes forever (and
signs a checkpoint every few milliseconds) until it is killed.
"""

from __future__ import annotations

import sys
import threading
import time

from audit import Log

THREADS = 16


def entry(round_: int, thread: int, n: int) -> bytes:
    return f'{{"n":{n},"pad":"{"p" * (n % 50)}","round":{round_},"t":{thread}}}'.encode()


def main() -> None:
    log_dir, key_file, round_ = sys.argv[1], sys.argv[2], int(sys.argv[3])
    log = Log.open(log_dir, key_file)
    out_lock = threading.Lock()

    def writer(t: int) -> None:
        n = 0
        while True:
            index = log.append(entry(round_, t, n))
            with out_lock:
                sys.stdout.write(f"{index} {t} {n}\n")
                sys.stdout.flush()
            n += 1

    def signer() -> None:
        while True:
            log.checkpoint()
            time.sleep(0.005)

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for t in range(THREADS):
        threading.Thread(target=writer, args=(t,), daemon=True).start()
    threading.Thread(target=signer, daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
