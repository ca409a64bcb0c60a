"""Progress of long work (training, sampling, features, statistics, search, conversion) as
a user sees it: on a terminal a tqdm bar with items/s and ETA, log lines printed above it rather
than through it; in a log file (no terminal) a plain line every `interval` seconds instead. Only
process 0 reports.
"""

import logging as py_logging
import sys
import time

import jax
import tqdm
from absl import logging


def _format_seconds(seconds):
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class _TqdmStream:
    """A stream for absl's log handler that writes through tqdm, so a log line goes above the
    bar instead of into it."""

    def write(self, text):
        if text.strip():
            tqdm.tqdm.write(text.rstrip("\n"), file=sys.stderr)

    def flush(self):
        sys.stderr.flush()


def _absl_stream_handler():
    """absl's Python handler (the one that writes log lines to stderr), or None."""
    handler = logging.get_absl_handler()
    return getattr(handler, "python_handler", None)


class Progress:
    """Counts `total` items (images, steps, evaluations) from `initial`.

    with Progress(50_000, "img", "sampling") as progress:
        for ...:
            progress.update(len(batch))
    """

    def __init__(self, total, unit, desc, initial=0, interval=30.0, terminal=None, enabled=True):
        self.total, self.unit, self.desc, self.interval = total, unit, desc, interval
        self.done = self.initial = initial
        self.start = self.last_report = time.perf_counter()
        self.enabled = enabled and jax.process_index() == 0
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar, self._redirected, self._finished_reported = None, None, False
        if self.enabled and self.terminal:
            self.bar = tqdm.tqdm(
                total=total, initial=initial, unit=unit, desc=desc, mininterval=1.0, smoothing=0.1
            )
            self._redirect_logging()
        elif self.enabled:  # A log file: say at once what is under way.
            logging.info("%s: %s of %s %s to go", desc, f"{total - initial:,}", f"{total:,}", unit)

    def _redirect_logging(self):
        handler = _absl_stream_handler()
        if isinstance(handler, py_logging.StreamHandler):
            self._redirected = (handler, handler.stream)
            handler.stream = _TqdmStream()

    def restart_clock(self):
        """Rates from here on: e.g. after the first call, which includes compiling."""
        self.start = self.last_report = time.perf_counter()
        self.initial = self.done
        if self.bar is not None:
            self.bar.reset(total=self.total)
            self.bar.update(self.done)

    def rate(self):
        """Items per second since the start (or `restart_clock`)."""
        return (self.done - self.initial) / max(time.perf_counter() - self.start, 1e-9)

    def line(self):
        """'desc: done/total unit (rate unit/s, ETA …)'."""
        rate = self.rate()
        eta = _format_seconds((self.total - self.done) / rate) if rate > 0 else "?"
        return (
            f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} "
            f"({rate:,.2f} {self.unit}/s, ETA {eta})"
        )

    def update(self, count=1, **postfix):
        self.done += count
        if not self.enabled:
            return
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(count)
            return
        now = time.perf_counter()
        finished = self.done >= self.total and not self._finished_reported
        if finished or (now - self.last_report >= self.interval and self.done < self.total):
            self.last_report, self._finished_reported = now, self.done >= self.total
            extra = "".join(f", {k} {v}" for k, v in postfix.items())
            logging.info("%s%s", self.line(), extra)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._redirected is not None:
            handler, stream = self._redirected
            handler.stream = stream
            self._redirected = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
