"""The boundary between compress-export and the paths it is given. Every model folder, dataset, recipe and export
comes from strangers; every output path is something of the user's that must not be damaged beyond what was asked.

The rules (README.md, "Safety") and where this module enforces them:
- no foreign code without --trust-remote-code: `check_remote_code` refuses a model or tokenizer that exists only as
  the folder's code, before transformers sees it (which is then always called with the user's own flag);
- nothing read from outside the folder: links must resolve inside it (or inside the hub cache repository it is a
  snapshot of), special files (FIFOs, sockets, devices; /proc, /sys, /dev) are refused (`scan_folder`,
  `regular_file`), and the file names a config points transformers to must be plain names inside it
  (`check_file_references`); copies are made from content, so outputs never contain links (`copy_file`,
  `copy_tree`);
- never damage what the user did not name as output: an output may not be, hold or sit inside an input, nor be the
  home folder, the root or the current folder, and --overwrite replaces only a folder compress-export wrote
  (`check_output`, `is_our_output`); marks are written and read without following links (`write_mark`,
  `read_mark`), and stale partial folders are removed only when their mark says the run that made them is gone
  (writer.remove_stale_partials).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

from compress_export.core.errors import UserError

log = logging.getLogger(__name__)

SYSTEM_TREES = (Path("/proc"), Path("/sys"), Path("/dev"))  # pseudo files: reading them leaks or blocks
MAX_JSON_BYTES = 64 << 20  # config.json and friends: anything larger is not a config
TRUST_FLAG = "--trust-remote-code (trust_remote_code=True in Python)"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # never read, never copied


def _inside(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a file or folder"


def allowed_roots(folder: Path) -> Tuple[Path, ...]:
    """Where files of `folder` may live: the folder itself and, when it is a hub cache snapshot
    (REPO/snapshots/REV, whose files link to REPO/blobs/SHA), that repository's blobs."""
    root = folder.resolve()
    roots = [root]
    blobs = root.parent.parent / "blobs"
    if root.parent.name == "snapshots" and blobs.is_dir() and not blobs.is_symlink():
        roots.append(blobs.resolve())
    return tuple(roots)


def _refuse_system(p: Path, what: str) -> None:
    if any(_inside(p, s) for s in SYSTEM_TREES):
        raise UserError(f"{what} {p} is a system pseudo-file; give a regular file or folder")


def check_entry(p: Path, roots: Sequence[Path], folder: Path) -> os.stat_result:
    """The stat of what `p` (an entry of `folder`) really is, after checking that a link resolves inside `roots`
    and that it is a regular file or a folder. Never opens it."""
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode):
        target = p.resolve()
        if not any(_inside(target, r) for r in roots):
            raise UserError(
                f"{p} is a link to {target}, outside {folder}; files are read only from inside the "
                "folder (copy the file in instead of linking to it)"
            )
        try:
            st = os.stat(target)
        except OSError:
            raise UserError(f"{p} is a broken link (to {target}); the folder is incomplete") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise UserError(
            f"{p} is not a regular file ({_kind(st.st_mode)}); model folders, datasets and exports "
            "must hold regular files only: remove it"
        )
    return st


def scan_folder(folder, what: str = "MODEL_DIR") -> Path:
    """Check every entry below `folder` (hidden folders such as .git are not read by anyone and are skipped):
    links resolve inside it, nothing is a special file. Returns the folder. Cheap: names and stats only."""
    folder = Path(folder)
    _refuse_system(folder.resolve(), what)
    roots = allowed_roots(folder)
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in dirnames + filenames:
            check_entry(Path(dirpath) / name, roots, folder)
    return folder


def regular_file(path, what: str) -> Path:
    """`path` (a file the user named: a dataset, a text, a recipe) after checking it is a regular file, so that
    reading it cannot block (FIFO) or leak (/proc). Returns the resolved path."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {p} does not exist")
    real = p.resolve()
    _refuse_system(real, what)
    st = os.stat(real)
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else _kind(st.st_mode)
        raise UserError(f"{what} {p} is not a regular file ({kind}); give a regular file")
    return real


def open_regular(path: Path):
    """Open for reading without following a final link and without blocking, then insist on a regular file: a
    FIFO swapped in after the checks is refused instead of hanging the run."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a regular file ({_kind(st.st_mode)}); remove it")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_json(path: Path, what: Optional[str] = None):
    """A small JSON file of a checked folder, read through open_regular and size-limited."""
    with open_regular(Path(path).resolve()) as fh:
        raw = fh.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise UserError(f"{what or path} is larger than {MAX_JSON_BYTES >> 20} MiB; it is not a settings file")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{what or path} is not valid JSON ({str(e)[:200]})") from None


def copy_file(src: Path, dst: Path) -> None:
    """Copy the content of `src` (checked: a regular file) into a new regular file `dst` (mode 0644): never a
    link, never the metadata or permissions of a stranger's file."""
    with open_regular(Path(src).resolve()) as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as fout:
            while True:
                chunk = fin.read(16 << 20)
                if not chunk:
                    break
                fout.write(chunk)


def copy_tree(src: Path, dst: Path, roots: Optional[Sequence[Path]] = None) -> None:
    """Copy folder `src` into a new folder `dst`, content only: links are followed only inside `roots` (default:
    src's allowed roots), special files refused, hidden entries left out."""
    src = Path(src)
    roots = roots or allowed_roots(src)
    check_entry(src, roots, src)
    Path(dst).mkdir()
    for entry in sorted(src.iterdir()):
        if entry.name.startswith(".") or entry.suffix in PICKLE_SUFFIXES:  # pickles are never copied
            continue
        st = check_entry(entry, roots, src)
        if stat.S_ISDIR(st.st_mode):
            copy_tree(entry, Path(dst) / entry.name, roots)
        else:
            copy_file(entry, Path(dst) / entry.name)


# -- foreign code ------------------------------------------------------------------------------------------------


def _code_files(auto_map) -> list:
    """The Python files an auto_map names ("modeling_x.XForCausalLM", "org/repo--modeling_x.X", [slow, fast])."""
    refs = []
    for v in auto_map.values() if isinstance(auto_map, dict) else [auto_map]:
        refs += v if isinstance(v, (list, tuple)) else [v]
    files = []
    for r in refs:
        if isinstance(r, str) and "." in r:
            files.append(r.split("--")[-1].rpartition(".")[0] + ".py")
    return sorted(set(files)) or ["its own code"]


def _builtin(kind: str, cfg: dict) -> bool:
    """Whether transformers has its own code for this config (then it never runs the folder's)."""
    if kind == "config.json":
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        model_type = cfg.get("model_type")
        return isinstance(model_type, str) and model_type in CONFIG_MAPPING
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    name = cfg.get("tokenizer_class")
    return isinstance(name, str) and tokenizer_class_from_name(name) is not None


_warned: set = set()


def check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """Refuse, before transformers sees the folder, a model or tokenizer that exists only as code shipped in the
    folder (an `auto_map` transformers has no class for), unless the user allowed it. Where transformers has
    its own class, that class is used and the folder's code is never imported (transformers' rule with
    trust_remote_code=False); one warning says so."""
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        f = folder / name
        if not f.exists():
            continue
        cfg = read_json(f)
        auto_map = cfg.get("auto_map") if isinstance(cfg, dict) else None
        if not auto_map:
            continue
        files = ", ".join(_code_files(auto_map))
        if not _builtin(name, cfg):
            raise UserError(
                f"{f}: its auto_map needs {files}, code shipped with the model; it runs only with "
                f"{TRUST_FLAG}: read that code first"
            )
        if str(f) not in _warned:  # once per file, though several steps of a run ask
            _warned.add(str(f))
            log.warning(
                "%s: auto_map names %s; transformers' own code is used instead (the folder's code is "
                "never run without --trust-remote-code)",
                f,
                files,
            )


# -- outputs -----------------------------------------------------------------------------------------------------

OUR_TAG = "compress-export:"  # the `quantizer` entry every export's config.json carries
REPORT_MARK = ".compress-export-report"  # in a validate report folder
GGUF_MARK = ".compress-export-gguf"  # in a GGUF export folder (it has no config.json to name us)


def is_our_output(d: Path) -> bool:
    """Whether folder `d` was written by compress-export: an export (its config.json names us as quantizer) or a
    validate report (its mark file)."""
    if (d / REPORT_MARK).is_file() or (d / GGUF_MARK).is_file() or _older_report(d):
        return True
    try:
        cfg = read_json(d / "config.json") if (d / "config.json").is_file() else None
    except (UserError, OSError):
        return False
    if not isinstance(cfg, dict):
        return False
    marks = [cfg.get("quantization_config"), cfg.get("compress_export_sparsity")]
    for m in marks:
        q = m.get("quantizer") if isinstance(m, dict) else None
        if any(isinstance(x, str) and x.startswith(OUR_TAG) for x in (q if isinstance(q, list) else [q])):
            return True
    return False


def _older_report(d: Path) -> bool:
    """A validate report of a version before the mark: report.json with the report's own fields."""
    try:
        r = read_json(d / "report.json") if (d / "report.json").is_file() else None
    except (UserError, OSError):
        return False
    return isinstance(r, dict) and {"runs", "verdict", "engine"} <= set(r)


def _protected(out: Path) -> Optional[str]:
    """Why `out` (resolved) must never be replaced: a folder that is or holds the home, the root or the cwd."""
    for home_or_cwd, name in ((Path.home, "your home folder"), (Path.cwd, "the current folder")):
        try:
            where = home_or_cwd().resolve()
        except (OSError, RuntimeError, KeyError):  # no HOME and no passwd entry; a removed cwd
            continue
        if _inside(where, out):
            return name if where == out else f"a folder holding {name}"
    return "the root folder" if out == Path(out.anchor) else None


def _contents(d: Path, n: int = 4) -> str:
    names = sorted(p.name for p in d.iterdir())
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "") if names else "nothing"


def check_output(out, inputs: Iterable[Path], overwrite: bool, flag: str = "-o") -> Path:
    """Refuse an output that would damage anything but itself: equal to, inside or holding an input; a protected
    folder; an existing folder without --overwrite; with --overwrite, a folder compress-export did not write.
    Returns the path as given."""
    out = Path(out)
    real = out.resolve()
    _refuse_system(real, flag)
    for src in inputs:
        src = Path(src).resolve()
        if _inside(real, src):
            raise UserError(
                f"output {out} ({flag}) is {'the' if real == src else 'inside the'} input model "
                f"directory {src}; choose another {flag}"
            )
        if _inside(src, real):
            raise UserError(f"output {out} ({flag}) contains the input model directory {src}; choose another {flag}")
    why = _protected(real)
    if why:
        raise UserError(f"{flag} {out} is {why}; refusing to write there: choose a new folder")
    if not os.path.lexists(out):
        return out
    if out.is_symlink():
        raise UserError(f"{flag} {out} is a link; name a real folder")
    if not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory; choose another {flag}")
    if not overwrite:
        raise UserError(
            f"output {out} exists; pass --overwrite to replace it (only a folder compress-export "
            f"wrote is replaced) or choose another {flag}"
        )
    if any(out.iterdir()) and not is_our_output(out):
        raise UserError(
            f"{flag} {out} was not written by compress-export (it holds {_contents(out)}); "
            f"--overwrite replaces only compress-export's own outputs: choose another {flag}"
        )
    return out


def check_file_output(path, inputs: Iterable[Path], overwrite: bool, flag: str, ours) -> Path:
    """A single output file (a recipe): not inside an input, not a folder; an existing one only with --overwrite
    and only when `ours(path)` says we wrote it."""
    p = Path(path)
    real = p.resolve()
    _refuse_system(real, flag)
    for src in inputs:
        if _inside(real, Path(src).resolve()):
            raise UserError(f"{flag} {p} is inside the input {Path(src).resolve()}; choose another {flag}")
    if os.path.lexists(p):
        if p.is_symlink() or not p.is_file():
            raise UserError(f"{flag} {p} exists and is not a plain file; choose another {flag}")
        if not overwrite:
            raise UserError(f"{flag} {p} exists; pass --overwrite to replace it or choose another {flag}")
        if not ours(p):
            raise UserError(f"{flag} {p} was not written by compress-export; choose another {flag}")
    return p


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small file beside its final name, then rename it into place: never half a file, never through a
    link planted at the final name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_mark(path: Path, text: str) -> None:
    """Create a small bookkeeping file (an owner mark) in a folder that may be the user's: whatever stands at that
    name is removed, never followed (a planted link would make us overwrite its target)."""
    path = Path(path)
    if os.path.lexists(path):
        if path.is_dir() and not path.is_symlink():
            raise UserError(f"{path} is a folder where compress-export keeps a mark file; remove it")
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def read_mark(path: Path, limit: int = 4096) -> str:
    """A mark file's text, read without following a link or blocking on a FIFO (OSError/UserError when it is not a
    small regular file)."""
    with open_regular(Path(path)) as fh:
        return fh.read(limit).decode("utf-8", "replace")


# -- file names a config hands to transformers ------------------------------------------------------------------


def _reaches_outside(v, folder: Path, roots: Sequence[Path]) -> bool:
    """Whether a file name from a config, opened as transformers would (as given, or inside the folder), is an
    existing file outside the folder. A stale path from the author's machine that exists nowhere here is
    harmless (transformers cannot open it either) and is let through, as such configs are common."""
    if not isinstance(v, str) or not v:
        return False
    for candidate in (Path(v), folder / v):
        try:
            if candidate.exists() and not any(_inside(candidate.resolve(), r) for r in roots):
                return True
        except (OSError, ValueError):
            return True  # unresolvable (a NUL in the name, a loop): not to be opened
    return False


def check_file_references(folder: Path) -> None:
    """transformers opens the files tokenizer_config.json names (vocab_file, merges_file, fast_tokenizer_files…)
    and may build from another file than config.json (configuration_files): none may reach a file outside the
    folder, and the model is built from the config.json that was checked."""
    roots = allowed_roots(folder)
    tok = folder / "tokenizer_config.json"
    cfg = read_json(tok) if tok.is_file() else None
    for key, value in cfg.items() if isinstance(cfg, dict) else ():
        if not (key.endswith("_file") or key.endswith("_files")) or value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if _reaches_outside(v, folder, roots):
                raise UserError(
                    f"{tok}: {key} names {str(v)[:120]!r}, a file outside the folder; files are read "
                    "only from inside it: fix or remove that entry"
                )
    conf = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    if isinstance(conf, dict) and conf.get("configuration_files"):
        raise UserError(
            f"{folder / 'config.json'}: configuration_files makes transformers build the model from "
            "another file than the config.json that was checked; remove that entry"
        )
