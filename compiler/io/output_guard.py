"""The output guard: every file a command writes goes through here.

Before (each command checked its own ``-o`` against its model, and wrote where it liked):

    tqc compile t.onnx -p fold -o t.plan      wrote t.onnx (the INPUT) beside the plan, then failed
    tqc compile m.onnx -o w.bin --report r    w.bin = the model's external weights: overwritten
    tqc compile m.onnx -o /dev/null           as root, the rename replaced the device with a file
    tqc diff a b --json j --plot p            wrote j, then refused p: half an answer, exit 2
    SIGTERM while writing                     left .out.onnx.XXXX.tmp behind; every output mode 0600

After:

    command starts ─► guard.reads_model(m)    the model, every external-data file it names (.plan: + .plan.json)
                      guard.reads_data(d)     calibration data (script.py:fn: the script), tables, tokenizer files
                      guard.writes(o, ...)    each output; a folder's predictable contents (--dump-dir)
                      ─► refused, one line, exit 2, before any work, when an output is (resolves to: symlink,
                         hard link = same st_dev/st_ino, '..') a file the command reads or another output, or
                         exists and is not a regular file (device, FIFO, socket, folder)
    work ────────────► atomic_write(): temp file in the destination folder, fsync, mode 0666 & ~umask;
                       a declared output is only *staged* (its temp file is kept)
    success ─────────► guard.commit(): every staged temp renamed into place, signals held meanwhile
    failure/signal ──► guard.abort() + cleanup_temps(): staged files and every registered temp file or
                       folder removed; the command wrote all of its outputs or none of them

Interrupts: ``install_signal_handlers`` makes SIGINT and SIGTERM raise ``Interrupted`` (a BaseException, so no
``except Exception`` swallows it and click does not turn it into an Abort); ``tqc.compiler.cli.main.main`` removes
every registered temp path and exits 128 + the signal number (130, 143).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import mmap
import os
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from tqc.compiler.core.errors import TqcError

_TERMINATING = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


# ------------------------------------------------------------------ temp registry and signals

_TEMPS: dict[str, str] = {}   # path -> when it is kept: "never", "success" (its command succeeded), "check-failed"
KEPT_WRITTEN = "written"      # an output written as it comes (--dump-dir): kept on success and on a failed check
_TEMPS_LOCK = threading.Lock()


def register_temp(path: str | os.PathLike, keep: str = "never") -> Path:
    with _TEMPS_LOCK:
        _TEMPS[str(path)] = keep
    return Path(path)


def release_temp(path: str | os.PathLike) -> None:
    """``path`` is no longer temporary (renamed into place, or meant to be kept)."""
    with _TEMPS_LOCK:
        _TEMPS.pop(str(path), None)


def remove_if_present(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def cleanup_temps(keep: Iterable[str] = ()) -> None:
    """Remove every registered temp path except those whose keep-policy is in ``keep``."""
    keep = set(keep)
    with _TEMPS_LOCK:
        items = list(_TEMPS.items())
    for path, policy in items:
        if policy in keep:
            release_temp(path)
        else:
            remove_if_present(path)
            release_temp(path)


def _cleanup_at_exit() -> None:
    cleanup_temps(keep=("success", "check-failed", KEPT_WRITTEN))  # outside the CLI: reproducers stay


atexit.register(_cleanup_at_exit)


def make_temp_dir(prefix: str, dir: str | os.PathLike | None = None, keep: str = "never") -> Path:
    """``tempfile.mkdtemp``, registered so that an interrupt or a failure removes it."""
    with signals_deferred():
        path = tempfile.mkdtemp(prefix=prefix, dir=dir)
        register_temp(path, keep)
    return Path(path)


def reproducer_dir() -> Path:
    """A folder for a failed check's reproducer: kept when the command ends with that failure, removed when it
    is interrupted (or the failure is handled and the command goes on)."""
    return make_temp_dir("tqc-repro-", keep="check-failed")


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> dict:
    """SIGINT/SIGTERM raise ``Interrupted``; returns the previous handlers (for ``restore_signal_handlers``)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in _TERMINATING:
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, _raise_interrupted)
    return previous


def restore_signal_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the block runs (a rename series, a temp file and its registration); a signal
    that arrived meanwhile is delivered right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _TERMINATING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ------------------------------------------------------------------ file modes and atomic writes

def umask_mode(base: int = 0o666) -> int:
    """``base & ~umask`` (what ``open()`` would give a new file), read without changing the umask."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return base & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return base & ~mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def refuse_special(path: Path, what: str = "output") -> None:
    """An existing path that a rename would replace must be a regular file (never a device, FIFO, folder)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TqcError(f"{what} '{path}' cannot be examined: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise TqcError(f"{what} '{path}' is a directory; expected a file path")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a character device" if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
                else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "not a regular file")
        raise TqcError(f"{what} '{path}' is {kind}; tqc writes regular files only (choose a file path)")


def temp_file_beside(final: Path) -> Path:
    """An empty temp file in ``final``'s folder (so a rename onto ``final`` is atomic), registered so that an
    interrupt or a failure removes it."""
    with signals_deferred():
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        register_temp(tmp)
    os.close(fd)
    return Path(tmp)


def move_beside(built: Path, final: Path) -> Path:
    """Move a file finished in a scratch folder to a registered temp file beside ``final``, ready for
    ``place_file`` (callers writing several files move them all first, then place them)."""
    moved = temp_file_beside(final)
    os.replace(built, moved)
    return moved


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(fh)``: temp file in the same folder, fsync, mode 0666 & ~umask, then a
    rename; when the active command declared ``path`` as an output, the rename waits for its commit. A symlink
    is followed: the file it points at is replaced, the link stays."""
    def save(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())

    return write_with(path, save)


def write_with(path: str | os.PathLike, save: Callable[[str], None]) -> Path:
    """``atomic_write`` for writers that take a path (polygraphy's ``save_json``, ``RunResults.save``): they
    write a temp file in the destination folder, which is then placed (or staged) like any output."""
    refuse_special(Path(path))
    out = Path(os.path.realpath(path))
    tmp = None
    try:
        tmp = temp_file_beside(out)
        save(str(tmp))
        if not place_file(tmp, out):  # placed now (not staged): make the rename durable
            _fsync_dir(out.parent)
        tmp = None
    except OSError as exc:
        raise TqcError(f"cannot write '{path}': {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            remove_if_present(str(tmp))
            release_temp(tmp)
    return Path(path)


def place_file(tmp: Path, out: Path) -> bool:
    """Move a finished temp file (same folder as ``out``) into place, or stage it for the active command;
    True when staged (the rename then waits for the command's commit)."""
    os.chmod(tmp, umask_mode())
    guard = current()
    if guard is not None and guard.stages(out):
        guard._stage(tmp, out)
        return True
    with signals_deferred():
        os.replace(tmp, out)
        release_temp(tmp)
    return False


# ------------------------------------------------------------------ what a model file reads

def external_data_files(model_path: str | os.PathLike) -> list[Path]:
    """The external-data files an ONNX file names (initializers and tensor attributes), found by walking its
    protobuf fields without reading any weights. An unreadable file gives [] (its loader says why)."""
    import onnx

    from tqc.compiler.io.wire import proto_fields

    path = Path(model_path)
    locations: set[str] = set()

    def tensor_location(buf, start: int, end: int) -> None:
        kept = b"".join(bytes(buf[b:e]) for n, b, s, e in proto_fields(buf, start, end) if n in (13, 14))
        if not kept:
            return
        tensor = onnx.TensorProto()
        tensor.ParseFromString(kept)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)

    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                return []
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                for number, _begin, start, end in proto_fields(buf, 0, size):
                    if number != 7:  # ModelProto.graph
                        continue
                    for g_number, _b, g_start, g_end in proto_fields(buf, start, end):
                        if g_number == 5:  # GraphProto.initializer
                            tensor_location(buf, g_start, g_end)
                        elif g_number == 1:  # GraphProto.node: tensor attributes may live outside too
                            node = onnx.NodeProto()
                            node.ParseFromString(bytes(buf[g_start:g_end]))
                            for attr in node.attribute:
                                for tensor in [attr.t] * attr.HasField("t") + list(attr.tensors):
                                    if tensor.data_location == onnx.TensorProto.EXTERNAL:
                                        locations.update(e.value for e in tensor.external_data if e.key == "location")
    except (OSError, ValueError, IndexError, TypeError, Exception):  # a corrupt model: the loader reports it
        return []
    base = path.parent
    return [base / location for location in sorted(locations)]


# ------------------------------------------------------------------ the guard of one command

def _identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    resolved = os.path.realpath(path)  # symlinks first, then '..' (as the kernel walks the path)
    try:
        st = os.stat(path)
        return resolved, (st.st_dev, st.st_ino)
    except OSError:
        return resolved, None


class OutputGuard:
    """What one command reads and writes; refuses collisions before any work and commits outputs together."""

    def __init__(self, command: str):
        self.command = command
        self._reads: list[tuple[Path, str, tuple]] = []
        self._writes: list[tuple[Path, str, tuple, bool]] = []
        self._staged: list[tuple[Path, Path]] = []
        self._staged_dirs: list[tuple[Path, Path, list[Path]]] = []  # (temp folder, final, folders to create)
        self._done = False

    # ---- declarations
    def reads(self, path: str | os.PathLike | None, what: str = "an input") -> None:
        if path is None or str(path) == "":
            return
        p = Path(path)
        ident = _identity(p)
        for w, w_what, w_ident, _ in self._writes:
            if self._same(ident, w_ident):
                raise TqcError(f"{w_what} '{w}' is {what} '{p}': tqc never writes over a file it reads; "
                               "choose another path")
        self._reads.append((p, what, ident))

    def reads_model(self, path: str | os.PathLike | None, what: str = "the input model") -> None:
        """The model file and every external-data file it names; a ``.plan`` and its ``.plan.json``."""
        if path is None:
            return
        p = Path(path)
        self.reads(p, what)
        if p.suffix == ".plan":
            self.reads(p.with_name(p.name + ".json"), f"the metadata of {what}")
        elif p.suffix == ".xml":  # OpenVINO IR: its weights beside it
            self.reads(p.with_suffix(".bin"), f"the weights (.bin) of {what}")
        elif p.is_file():
            for data in external_data_files(p):
                self.reads(data, f"an external-data file of {what}")

    def reads_data(self, spec: str | None, what: str = "the data") -> None:
        """``--data``/``--calib``: a file, or the script of ``script.py:function``."""
        if not spec:
            return
        path = spec.rpartition(":")[0] if ".py:" in spec else spec
        self.reads(path, what)

    def reads_folder(self, folder: str | os.PathLike | None, what: str = "an input folder") -> None:
        """Every file of a folder that is read as a whole (a tokenizer, a model folder)."""
        if not folder:
            return
        p = Path(folder)
        if p.is_dir():
            for child in sorted(p.rglob("*")):
                if child.is_file():
                    self.reads(child, f"a file of {what}")
        else:
            self.reads(p, what)

    def reads_tokenizer(self, tokenizer: str | None, data: str | None) -> None:
        """``--tokenizer DIR``; for ``.txt`` data without one, the packaged MiniLM's tokenizer may be used."""
        from tqc.compiler.io.packaged import PACKAGED_MINILM_NAMES

        if tokenizer and tokenizer not in PACKAGED_MINILM_NAMES:
            self.reads_folder(tokenizer, "--tokenizer")
        elif tokenizer or (data and data.lower().endswith(".txt")):
            self.reads_packaged_model()

    def reads_packaged_model(self) -> None:
        """The packaged all-MiniLM-L6-v2 folder (weights, tokenizer): never an output."""
        try:
            from tqc.compiler.io.packaged import packaged_minilm_path

            self.reads_folder(packaged_minilm_path(), "the packaged MiniLM")
        except Exception:  # not installed: nothing there to protect
            pass

    def writes(self, path: str | os.PathLike | None, what: str = "output", staged: bool = True,
               parents: bool = False) -> Path | None:
        """Declare an output file: refused when it collides with a read or another output, is not a regular
        file, or its folder cannot be written. ``staged`` outputs are renamed into place on ``commit``."""
        if path is None or str(path) == "":
            return None
        p = Path(path)
        refuse_special(p, what)
        ident = _identity(p)
        for r, r_what, r_ident in self._reads:
            if self._same(ident, r_ident):
                raise TqcError(f"{what} '{p}' is {r_what} '{r}': tqc never writes over a file it reads; "
                               "choose another path")
        for w, w_what, w_ident, _ in self._writes:
            if self._same(ident, w_ident):
                raise TqcError(f"{what} '{p}' and {w_what} '{w}' are the same file; choose different paths")
        if p.exists() and not os.access(p, os.W_OK):
            raise TqcError(f"{what} '{p}' is not writable")
        if not parents:
            _check_folder(Path(os.path.realpath(p)).parent, what)
        self._writes.append((p, what, ident, staged))
        return p

    def writes_model(self, path: str | os.PathLike, what: str = "output") -> Path:
        """An ONNX output and the external-data file it gets when large (``<name>.data``)."""
        p = self.writes(path, what)
        self.writes(p.with_name(p.name + ".data"), f"the external-data file of {what}")
        return p

    def writes_into(self, folder: str | os.PathLike | None, names: Iterable[str], what: str) -> Path | None:
        """A folder the command fills with files of known names (--dump-dir, --save-dir): written as they come
        (not staged), each checked like an output. What the command creates there (the folder and its missing
        parents, or the files not there before) is registered as temporary with the ``KEPT_WRITTEN`` policy:
        kept when the command succeeds or a check fails (the dump is the evidence), removed when it fails
        otherwise (a full disk) or is interrupted; files that existed before are never removed."""
        if not folder:
            return None
        p = Path(folder)
        if p.exists() and not p.is_dir():
            raise TqcError(f"{what} '{p}' exists and is not a directory")
        existing = _nearest_existing(p)
        if not existing.is_dir():
            raise TqcError(f"{what} '{p}': '{existing}' is not a directory")
        _check_folder(existing, what)
        missing = [q for q in [p, *p.parents] if not q.exists()]
        for name in names:
            target = self.writes(p / name, f"{what} file", staged=False, parents=True)
            if not missing and not target.exists():
                register_temp(target, KEPT_WRITTEN)
        if missing:
            register_temp(missing[-1], KEPT_WRITTEN)  # the topmost folder tqc creates: removed whole
        return p

    def writes_folder(self, folder: str | os.PathLike, what: str) -> Path:
        """A folder created whole on commit (a Triton model folder): must not exist; its parents may be created
        then (and are removed again on failure)."""
        p = Path(folder)
        if p.exists() or p.is_symlink():
            raise TqcError(f"{what} '{p}' exists; choose another name or location")
        for parent in [p.parent, *p.parent.parents]:
            if parent.exists():
                if not parent.is_dir():
                    raise TqcError(f"{what}: '{parent}' is a file, not a folder")
                break
        _check_folder(_nearest_existing(p), what)
        ident = _identity(p)
        for r, r_what, r_ident in self._reads:
            if ident[0] == r_ident[0] or r_ident[0].startswith(ident[0] + os.sep):
                raise TqcError(f"{what} '{p}' would hold {r_what} '{r}'; choose another location")
        self._writes.append((p, what, ident, True))
        return p

    @staticmethod
    def _same(a: tuple, b: tuple) -> bool:
        return a[0] == b[0] or (a[1] is not None and a[1] == b[1])

    def stages(self, path: Path) -> bool:
        ident = _identity(path)
        return not self._done and any(staged and self._same(ident, w_ident) for _, _, w_ident, staged in self._writes)

    # ---- staging and commit
    def _stage(self, tmp: Path, final: Path) -> None:
        for old_tmp, old_final in list(self._staged):
            if old_final == final:  # written twice: the last one wins
                remove_if_present(str(old_tmp))
                release_temp(old_tmp)
                self._staged.remove((old_tmp, old_final))
        self._staged.append((tmp, final))

    def stage_dir(self, final: str | os.PathLike) -> Path:
        """A temp folder next to ``final`` (creating its missing parents, remembered for removal), renamed to
        ``final`` on commit."""
        final = Path(final)
        created: list[Path] = []
        missing = [q for q in [final.parent, *final.parent.parents] if not q.exists()]
        try:
            for q in reversed(missing):
                q.mkdir()
                os.chmod(q, umask_mode(0o777))
                created.append(q)
                register_temp(q)
            tmp = make_temp_dir(f".{final.name}-", dir=final.parent)
            os.chmod(tmp, umask_mode(0o777))
        except OSError as exc:
            for q in reversed(created):
                remove_if_present(str(q))
                release_temp(q)
            raise TqcError(f"cannot create '{final}': {exc.strerror or exc}") from None
        self._staged_dirs.append((tmp, final, created))
        return tmp

    def temp_dir(self, folder: str | os.PathLike | None = None, prefix: str = ".tqc-") -> Path:
        """A scratch folder removed when the command ends, whatever happens."""
        return make_temp_dir(prefix, dir=folder)

    def commit(self) -> None:
        """Rename every staged output into place (signals held meanwhile)."""
        if self._done:
            return
        folders = set()
        try:
            with signals_deferred():
                for tmp, final in self._staged:
                    os.replace(tmp, final)
                    release_temp(tmp)
                    folders.add(final.resolve().parent)
                for tmp, final, created in self._staged_dirs:
                    os.rename(tmp, final)
                    release_temp(tmp)
                    for q in created:
                        release_temp(q)
                    folders.add(final.parent.resolve())
                with _TEMPS_LOCK:
                    kept = [p for p, policy in _TEMPS.items() if policy == "success"]
                for p in kept:
                    release_temp(p)
        except OSError as exc:
            self.abort()
            raise TqcError(f"cannot move the outputs into place: {exc.strerror or exc}") from None
        finally:
            self._done = True
        for folder in folders:
            _fsync_dir(folder)

    def abort(self) -> None:
        """Remove everything staged (and folders created for it)."""
        for tmp, _final in self._staged:
            remove_if_present(str(tmp))
            release_temp(tmp)
        for tmp, _final, created in self._staged_dirs:
            remove_if_present(str(tmp))
            release_temp(tmp)
            for q in reversed(created):
                try:
                    q.rmdir()
                except OSError:
                    pass
                release_temp(q)
        self._staged, self._staged_dirs = [], []
        self._done = True


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.realpath(path))
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path("/")


def _check_folder(folder: Path, what: str) -> None:
    if not folder.exists():
        raise TqcError(f"output folder '{folder}' does not exist")
    if not folder.is_dir():
        raise TqcError(f"output folder '{folder}' is not a directory")
    try:  # a real probe: os.access says yes to root on read-only or virtual file systems
        with tempfile.NamedTemporaryFile(prefix=".tqc-probe-", dir=folder):
            pass
    except OSError as exc:
        raise TqcError(f"output folder '{folder}' is not writable ({exc.strerror or exc})") from None


# ------------------------------------------------------------------ the active command

_ACTIVE: OutputGuard | None = None


def current() -> OutputGuard | None:
    return _ACTIVE


@contextlib.contextmanager
def command(name: str) -> Iterator[OutputGuard]:
    """The guard of a command: a new one committed on success and aborted on failure, or the one already
    active (an outer command commits it)."""
    global _ACTIVE
    if _ACTIVE is not None and not _ACTIVE._done:
        yield _ACTIVE
        return
    guard = OutputGuard(name)
    _ACTIVE = guard
    try:
        yield guard
        guard.commit()
    except BaseException:
        guard.abort()
        raise
    finally:
        if _ACTIVE is guard:
            _ACTIVE = None


def guarded(name: str):
    """Decorator for a CLI command body: runs it inside ``command(name)`` (use ``current()`` inside)."""
    def wrap(func):
        @functools.wraps(func)
        def run(*args, **kwargs):
            with command(name):
                return func(*args, **kwargs)
        return run
    return wrap


def end_command(keep: Iterable[str] = ()) -> None:
    """After a CLI run, whatever happened: abort an uncommitted guard and remove every temp path."""
    global _ACTIVE
    if _ACTIVE is not None and not _ACTIVE._done:
        _ACTIVE.abort()
    _ACTIVE = None
    cleanup_temps(keep)
