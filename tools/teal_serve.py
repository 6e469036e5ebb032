"""`teal serve` as a child process on a free port, for the client checks in this folder
(llamacpp-server-check, openai-client). Standard library only."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
from typing import Optional, Sequence
from urllib.parse import urlsplit


class TealServer:
    """`teal serve -m MODEL --port 0 -c CTX EXTRA...` until stopped (Ctrl-C, then kill):
    `url`, `host` and `port` where it listens, `log` its output lines."""

    def __init__(self, teal: str, model: str, ctx: int, extra: Sequence[str] = ()):
        self.cmd = [teal, "serve", "-m", model, "--port", "0", "-c", str(ctx), *extra]
        self.log: list[str] = []
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        self.url: Optional[str] = None
        found = threading.Event()

        # Read the output to its end, so that the server never blocks on a full pipe.
        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.log.append(line.rstrip("\n"))
                m = re.search(r"listening on (http://\S+)", line)
                if m and self.url is None:
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        found.wait(timeout=300)
        if self.url is None:
            self.stop()
            raise RuntimeError(
                f"teal serve did not start: {' '.join(self.cmd)}\n" + "\n".join(self.log[-20:])
            )
        where = urlsplit(self.url)
        self.host, self.port = where.hostname, where.port

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "TealServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
