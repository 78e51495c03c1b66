"""Input sources: finding corpus files, reading their documents, and counting bad input.

Documents: a line of a .txt file; the ``text_key`` string of a .jsonl line or a .parquet row.
Bad input is skipped or repaired, never fatal, and counted per file (``FileReport``); the counts
of a run are written to ``STORE/report.json``.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence

from prism_megatron.files import write_atomic

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
REPORT = "report.json"
PARQUET_BATCH_ROWS = 1024


class InputError(ValueError):
    """An input spec or option names nothing usable, or a rerun does not match the run it resumes."""


# --- input discovery ------------------------------------------------------------------------------

def _supported(path: str) -> bool:
    return path.endswith(SUFFIXES)


def discover_inputs(specs: Sequence[str]) -> list[str]:
    """Files named by ``specs`` (files, directories searched recursively, globs), absolute,
    in spec order, sorted within a spec, each once."""
    files: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = [os.path.join(root, name) for root, _, names in os.walk(spec)
                     for name in names if _supported(name)]
        elif os.path.isfile(spec):
            if not _supported(spec):
                raise InputError(f"input {spec}: unsupported file type (expected one of "
                                 f"{', '.join(SUFFIXES)})")
            found = [spec]
        else:
            found = [p for p in glob.glob(spec, recursive=True)
                     if os.path.isfile(p) and _supported(p)]
        if not found:
            raise InputError(f"input {spec}: no {'/'.join(SUFFIXES)} files found")
        files.extend(sorted(os.path.abspath(p) for p in found))
    return list(dict.fromkeys(files))


# --- reading documents, counting bad input --------------------------------------------------------

@dataclasses.dataclass
class FileReport:
    """What one input file contributed, and what was wrong with it."""
    documents: int = 0
    invalid_json: int = 0      # lines that are not JSON (skipped)
    missing_text: int = 0      # records without a string under the text key (skipped)
    non_utf8: int = 0          # documents with invalid UTF-8 or lone surrogates (repaired)
    empty: int = 0             # empty or whitespace-only documents (skipped)
    truncated: int = 0         # 1 if the file ended early or could not be read (rest skipped)
    error: str = ""            # what ended the reading of the file early

    def add(self, other: FileReport) -> None:
        for field in dataclasses.fields(self):
            if field.name == "error":
                self.error = self.error or other.error
            else:
                setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def problems(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "documents" and v}


@dataclasses.dataclass(frozen=True)
class Piece:
    """A slice of one input file: a byte range [start, end) of a .txt/.jsonl file (the lines that
    start in it), a whole .jsonl.gz file, or row groups [start, end) of a .parquet file."""
    path: str
    start: int
    end: int
    size: int  # bytes on disk, for planning and progress


class Progress:
    """Input bytes consumed by a reader, for the progress bar."""

    def __init__(self) -> None:
        self.bytes = 0


def _text_or_none(value: object, report: FileReport) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            value = value.decode("utf-8", "replace")
            report.non_utf8 += 1
    if not isinstance(value, str):
        report.missing_text += 1
        return None
    if not value or value.isspace():
        report.empty += 1
        return None
    return value


def _document_from_json(line: bytes, text_key: str, report: FileReport) -> str | None:
    try:
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            report.non_utf8 += 1
            record = json.loads(line.decode("utf-8", "replace"))
    except ValueError:
        report.invalid_json += 1
        return None
    if not isinstance(record, dict) or text_key not in record:
        report.missing_text += 1
        return None
    text = _text_or_none(record[text_key], report)
    if text is not None and (b"\\ud" in line or b"\\uD" in line):
        # A JSON escape can encode a lone surrogate, which is not text sentencepiece can encode.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            report.non_utf8 += 1
            text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _lines_in_range(path: str, start: int, end: int, progress: Progress) -> Iterator[bytes]:
    """The lines that start in [start, end) of a file (the last may end past ``end``)."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the previous piece reads (and counts) this line
        position = f.tell()
        while position < end:
            line = f.readline()
            if not line:
                break
            position += len(line)
            progress.bytes += len(line)
            yield line


def _gzip_lines(path: str, progress: Progress) -> Iterator[bytes]:
    with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as f:
        counted = 0
        for line in f:
            progress.bytes += raw.tell() - counted  # compressed bytes, as the plan counts them
            counted = raw.tell()
            yield line


def _read_lines(piece: Piece, text_key: str, report: FileReport,
                progress: Progress) -> Iterator[str]:
    is_json = not piece.path.endswith(".txt")
    if piece.path.endswith(".gz"):
        lines = _gzip_lines(piece.path, progress)
    else:
        lines = _lines_in_range(piece.path, piece.start, piece.end, progress)
    try:
        for line in lines:
            if not is_json:
                text = _text_or_none(line.rstrip(b"\r\n"), report)
            elif line.isspace():
                report.empty += 1
                continue
            else:
                text = _document_from_json(line, text_key, report)
            if text is not None:
                report.documents += 1
                yield text
    except (EOFError, OSError, zlib.error) as e:  # a truncated or corrupt .gz, a failing disk
        report.truncated = 1
        report.error = f"{type(e).__name__}: {e}"
    finally:
        lines.close()


def _read_parquet(piece: Piece, text_key: str, report: FileReport,
                  progress: Progress) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(piece.path)
        if text_key not in parquet.schema_arrow.names:
            report.missing_text += sum(parquet.metadata.row_group(i).num_rows
                                       for i in range(piece.start, piece.end))
            return
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_key],
                                       row_groups=range(piece.start, piece.end))
        for batch in batches:
            for value in batch.column(0).to_pylist():
                text = _text_or_none(value, report)
                if text is not None:
                    report.documents += 1
                    yield text
    except (OSError, pa.ArrowException) as e:
        report.truncated = 1
        report.error = f"{type(e).__name__}: {e}"
    finally:
        progress.bytes += piece.size


def read_piece(piece: Piece, text_key: str, report: FileReport,
               progress: Progress) -> Iterator[str]:
    reader = _read_parquet if piece.path.endswith(".parquet") else _read_lines
    return reader(piece, text_key, report, progress)


def file_pieces(path: str) -> list[Piece]:
    """A file's indivisible units: the whole file, or for .parquet each row group."""
    size = os.path.getsize(path)
    if not path.endswith(".parquet"):
        return [Piece(path, 0, size, size)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException):  # unreadable: one piece whose reading reports it
        return [Piece(path, 0, 0, size)]
    groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
    sizes = [sum(g.column(c).total_compressed_size for c in range(g.num_columns)) for g in groups]
    return [Piece(path, i, i + 1, n) for i, n in enumerate(sizes)] or [Piece(path, 0, 0, 0)]


def read_documents(files: Sequence[str], text_key: str = "text") -> Iterator[str]:
    """Every document of ``files`` in order (bad input skipped; counts discarded)."""
    for path in files:
        for piece in file_pieces(path):
            yield from read_piece(piece, text_key, FileReport(), Progress())


# --- reports ---------------------------------------------------------------------------------------

def combine_reports(parts: Iterable[dict[str, dict]]) -> dict:
    """One report from per-shard (or per-store) {file: counts}: counts summed per file."""
    files: dict[str, FileReport] = {}
    for part in parts:
        for path, counts in part.items():
            files.setdefault(path, FileReport()).add(FileReport(**counts))
    totals = FileReport()
    for report in files.values():
        totals.add(report)
    totals.error = ""
    return {"files": {path: dataclasses.asdict(r) for path, r in files.items()},
            "totals": dataclasses.asdict(totals)}


def write_report(store: str, report: dict) -> None:
    os.makedirs(store, exist_ok=True)
    write_atomic(os.path.join(store, REPORT), json.dumps(report, indent=1))


def print_report(report: dict, store: str) -> None:
    totals = report["totals"]
    print(f"{store}: {totals['documents']:,} documents from {len(report['files'])} files")
    for path, counts in report["files"].items():
        problems = FileReport(**counts).problems()
        if problems:
            print(f"  {path}: " + ", ".join(f"{k}={v}" for k, v in problems.items()))
    if FileReport(**totals).problems():
        print(f"  bad input counted per file in {os.path.join(store, REPORT)}")
