"""Opening one shard url for reading: webdataset's `gopen`, with `pipe:` commands (curl, ...) guarded against stalls, so
a hung download is one failed shard, not a loader that waits forever; and reading its members into samples, with a shard
cut short failing as one, and the skip reason of a sample the shard's layout broke saying so."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import tarfile
from typing import Any, Callable, Iterator

from webdataset.gopen import Pipe, gopen
from webdataset.tariterators import group_by_keys

CLOSE_GRACE_S = 1.0  # how long a pipe: command may take to exit once its shard is closed before it is killed
# The longest wait select() is given: past ~9.2e9 s (int64 nanoseconds) it raised OverflowError, so `--data_timeout inf`
# (or 1e10) failed every pipe: shard at once; 1e9 s (31 years) is forever.
MAX_WAIT_S = 1e9


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and its descendants: a `pipe:` command runs under `sh -c`, which may fork it, and a survivor would
    keep running (and hold the trainer's stdout/stderr open) after its shell is gone."""
    children: dict[int, list[int]] = {}
    try:
        entries = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        entries = []
    for d in entries:
        try:
            with open(f"/proc/{d}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


class _StallGuard:
    """A `pipe:` shard stream whose read() gives up after `timeout` seconds without data: a hung download or command
    is then one failed shard (its command killed), not a run that waits forever."""

    def __init__(self, pipe: Pipe, timeout: float) -> None:
        self.pipe, self.timeout, self.stalled = pipe, timeout, False
        self.fd = pipe.stream.fileno()

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        ready, _, _ = select.select([self.fd], [], [], min(self.timeout, MAX_WAIT_S))
        if not ready:
            self.stalled = True
            _kill_tree(self.pipe.proc.pid)
            raise TimeoutError(f"no data for {self.timeout:g} s (--data_timeout)")
        data = os.read(self.fd, size)  # unbuffered, so select() sees every byte not yet read; tarfile takes short reads
        if not data:
            # The end of its output: a command that failed is exiting. Without waiting for it, tarfile's "empty file" or
            # "unexpected end of data" was the shard's reason, not the command's exit status.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.pipe.proc.wait(timeout=CLOSE_GRACE_S)
        self._raise_on_failure(self.pipe.check_status)  # a command that exited non-zero raises, as Pipe.read does
        return data

    def _raise_on_failure(self, check: Any) -> None:
        """Run webdataset's status `check`, re-raising its failure as one plain line naming the command and its status."""
        try:
            check()
        except OSError:
            # webdataset says "(('curl -L -s URL',), {'shell': True, 'bufsize': 8192}): exit 37 (read) {}": the repr
            # of its Popen arguments, which hides the command a user has to fix.
            args = getattr(self.pipe, "args", None)  # webdataset's (Popen args, Popen kwargs)
            command = args[0][0] if isinstance(args, tuple) and args and args[0] else args
            raise OSError(f"pipe: command {command!r} exited with status {self.pipe.status}") from None

    def close(self) -> None:
        """Close the stream, kill the command if it still runs, reap it. webdataset's `Pipe.close` waits up to 2 hours for
        the command to exit: one that lingers after its data, or a download stalled when the reader leaves mid-shard (the
        end of training), held the loader that long, or outlived a loader worker that torch terminates 5 s into its
        shutdown. Its data is no longer wanted, so nothing is lost by the kill, and the status the kill gives it is not
        raised: the shard's data was read whole, or its reader left for a reason of its own (already counted)."""
        self.pipe.stream.close()
        try:  # a command that has sent all its data is exiting: a kill then would read as a failed download
            self.pipe.proc.wait(timeout=CLOSE_GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_tree(self.pipe.proc.pid)
            self.pipe.status = self.pipe.proc.wait()  # reaps it; -9 is the kill's status, not a failed download
            return
        self._raise_on_failure(self.pipe.wait_for_child)  # reaps it; a non-zero exit of its own raises, as Pipe.close does


def open_shard(url: str, stall_timeout: float) -> Any:
    """`gopen(url)`; a `pipe:` stream is guarded against stalls (`_StallGuard`) when `stall_timeout` > 0."""
    stream = gopen(url)
    return _StallGuard(stream, stall_timeout) if isinstance(stream, Pipe) and stall_timeout > 0 else stream


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (__key__, __index__/...): not sample fields


class _WholeTarInfo(tarfile.TarInfo):
    """A tar header that is cut short, missing or damaged after the first raises, as one inside a member's data does. Python's
    tarfile takes it for the end of the archive (only two zero blocks, an end header, mean that): a shard cut inside a
    header or between two members read as a whole, shorter shard, and its lost samples went uncounted."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exn:
            if tar.offset == 0:
                raise  # tarfile's own refusal of the file ("empty file", not a tar)
            # tarfile's next() raises this one as a ReadError, where it ends the archive on the others.
            if isinstance(exn, tarfile.EmptyHeaderError):
                # Still a shard_error, not a milder kind: a download cut at a member boundary looks exactly like this,
                # and the members after the cut are lost (a writer that left the end out lost nothing, but cannot be told apart).
                raise tarfile.SubsequentHeaderError(f"the tar ends after a whole member at byte {tar.offset}, without its end "
                                                    "blocks: cut short there (any later members lost) or written unterminated") from None
            raise tarfile.SubsequentHeaderError(f"unexpected end of data: {exn} at byte {tar.offset}, before the tar's end") from None


def tar_members(url: str, stream: Any, handler: Callable[[Exception], Any]) -> Iterator[dict[str, Any]]:
    """webdataset's `tar_file_expander` for one opened shard (its files as `fname`/`data` dicts, then the `{}` end marker
    that `group_by_keys` flushes on), reading headers with `_WholeTarInfo`; the first error goes to `handler` and ends it."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_WholeTarInfo)
        for info in tar:
            if info.isreg() and not _META.match(info.name):
                yield dict(fname=info.name, data=tar.extractfile(info).read(), __url__=url)
            tar.members = []  # a stream's TarFile keeps every header read otherwise
    except Exception as exn:
        handler(exn)
        return
    yield {}


def group_samples(files: Iterator[dict[str, Any]], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """webdataset's `group_by_keys`; a sample whose key came before in the shard is marked `__split__`: it groups adjacent
    files only, so a tar not written in name order (`tar cf x.tar -C dir .` stores the folder's listing order) cuts a
    sample into parts, each lacking the others' files."""
    seen: set[str] = set()
    for raw in group_by_keys(files, handler=handler):
        raw["__split__"] = raw["__key__"] in seen
        seen.add(raw["__key__"])
        yield raw


def missing_reason(raw: dict[str, Any], what: str, exts: tuple[str, ...]) -> str:
    """The skip reason of the sample `raw`, which has no file with one of `exts` (its `what`): its fields, and why where its
    shard's layout tells."""
    fields = sorted(k for k in raw if not k.startswith("__"))
    dotted = [k for k in fields if k.rsplit(".", 1)[-1] in exts]
    hint = ""
    if dotted:  # a key ends at its first dot: a.b.jpg is file b.jpg of sample a
        hint = f" (a key ends at the first dot: {raw.get('__key__')}.{dotted[0]} is field {dotted[0]!r}; drop the dots before the extension)"
    elif raw.get("__split__"):
        hint = " (its other files came earlier in the shard: a sample's files must be adjacent in the tar; write it with tar --sort=name)"
    return f"no {what} among {fields}{hint}"
