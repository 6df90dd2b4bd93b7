"""How far a long `gptforge prepare` pass has got: MB of text, tokens, MB/s and the time left.

On a terminal it is a tqdm bar redrawn in place; anywhere else (a log file, CI, a pipe) it is a plain line
every `interval` seconds and one at the end, so logs stay readable. This module knows counts and time,
nothing of text or tokens beyond their numbers.
"""

import sys
import time
from typing import TextIO

from tqdm import tqdm

PLAIN_INTERVAL = 30.0  # seconds between the lines written when stderr is not a terminal


class Progress:
    """Bytes of text done out of `total` (an estimate: it may end short of it), and tokens written."""

    def __init__(
        self,
        desc: str,
        total: int,
        done: int = 0,
        stream: TextIO | None = None,
        interval: float = PLAIN_INTERVAL,
    ):
        self.desc, self.total, self.done, self.tokens = desc, max(total, 1), done, 0
        self.stream = stream or sys.stderr
        self.interval, self.start, self.first = interval, time.monotonic(), done
        self.last_line = self.start
        self.bar = None
        if self.stream.isatty():
            self.bar = tqdm(
                total=self.total,
                initial=done,
                unit="B",
                unit_scale=True,
                desc=desc,
                file=self.stream,
                dynamic_ncols=True,
            )

    def update(self, nbytes: int, tokens: int = 0) -> None:
        self.done += nbytes
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(nbytes)
            if tokens:
                self.bar.set_postfix_str(f"{self.tokens:,} tokens", refresh=False)
        elif time.monotonic() - self.last_line >= self.interval:
            self.line()

    def skip(self, nbytes: int) -> None:
        """Count bytes an earlier run did as done, outside the rate."""
        self.done += nbytes
        self.first += nbytes
        if self.bar is not None:
            self.bar.n = self.bar.last_print_n = self.done
            self.bar.refresh()

    def line(self, final: bool = False) -> None:
        """`desc: 41% 412.3/1,000.0 MB, 6.9 MB/s, 103,077,120 tokens, 1m25s left`."""
        self.last_line = now = time.monotonic()
        rate = (self.done - self.first) / max(now - self.start, 1e-9)
        going = rate > 0 and self.done < self.total and not final
        left = f", {_duration((self.total - self.done) / rate)} left" if going else ""
        tokens = f", {self.tokens:,} tokens" if self.tokens else ""
        share, done, total = min(self.done / self.total, 1), self.done / 1e6, self.total / 1e6
        print(
            f"{self.desc}: {share:.0%} {done:,.1f}/{total:,.1f} MB, {rate / 1e6:.1f} MB/s{tokens}{left}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self.line(final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02}m" if hours else f"{minutes}m{seconds:02}s"
