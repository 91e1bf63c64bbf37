"""Write mono float audio to wav/flac/ogg(/mp3) files, atomically; encode it in memory.

Audio is written to a hidden temporary file next to the target and moved into place
with ``os.replace`` only once complete, so an error or interruption never leaves a
half-written file under the requested name. A failed write (full disk, I/O error) removes the
temporary file and raises ``AudioWriteError``, one line naming the file the caller asked for.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import uuid

import numpy as np
import soundfile as sf

# Name -> (libsndfile format, subtype). PCM_16 for wav/flac: what players expect; "pcm" is
# headerless 16-bit little-endian mono.
_CODECS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "pcm": ("RAW", "PCM_16"),
}
# MP3 writing exists only in libsndfile >= 1.1 builds with LAME; offer it only then.
if "MP3" in sf.available_formats():
    _CODECS["mp3"] = ("MP3", "MPEG_LAYER_III")

# File extension -> codec, for write_audio (a headerless .pcm file is not offered).
_FORMATS = {f".{n}": _CODECS[n] for n in ("wav", "flac", "ogg", "mp3") if n in _CODECS}


def supported_extensions() -> list[str]:
    """File extensions :func:`write_audio` accepts with this libsndfile build."""
    return sorted(_FORMATS)


_FULL_DISK_BYTES = 64 << 10  # less free space than this after a failed write: say the disk is full


class AudioWriteError(OSError):
    """Writing an audio file failed (full disk, I/O error, no permission).

    The message names the file the caller asked for, never the hidden temporary file, and
    nothing is left behind: the temporary file is removed before this is raised.
    """


def _libsndfile_reason(file) -> str | None:
    """What the failed system call said ("No space left on device"): soundfile's exception only
    says "System error.", libsndfile's per-file error string has the rest (private API, hence
    guarded)."""
    try:
        text = sf._ffi.string(sf._snd.sf_strerror(file._file)).decode("utf-8", "replace")
    except Exception:
        return None
    return text.split(":", 1)[1].strip().rstrip(".") if text.startswith("System error :") else None


def _write_error(path: str, error: BaseException, file=None) -> AudioWriteError:
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:  # libsndfile reports a failed write(2) as just "System error."
        reason = (file is not None and _libsndfile_reason(file)) or str(error).strip() or type(error).__name__
    try:
        if shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < _FULL_DISK_BYTES:
            reason += " (the disk is full)"
    except OSError:
        pass
    return AudioWriteError(f"cannot write {path}: {reason}")


def _resolve(path: str | os.PathLike) -> tuple[str, str, str]:
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FORMATS:
        raise ValueError(
            f"Unsupported audio file extension {ext or '(none)'!r} in {path}; "
            f"use one of {supported_extensions()}"
        )
    if os.path.isdir(path):
        raise IsADirectoryError(f"Output path {path} is a folder; give a file name inside it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        if os.path.exists(parent):
            raise NotADirectoryError(f"Output folder {parent} is a file, not a folder")
        raise FileNotFoundError(f"Output folder {parent} does not exist")
    fmt, subtype = _FORMATS[ext]
    return path, fmt, subtype


def check_output_path(path: str | os.PathLike) -> None:
    """Raise before any work if ``path`` cannot be written: bad extension, a folder in its place,
    no folder, or a folder where no file can be created (tried for real: permission bits,
    read-only mounts and root all answer correctly)."""
    path, _, _ = _resolve(path)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.remove(_temp_path(path))
    except PermissionError:
        raise PermissionError(f"Output folder {parent} is not writable") from None
    except OSError as e:
        raise _write_error(path, e) from None


def _check_sample_rate(sample_rate: int) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    return int(sample_rate)


def _as_mono(audio, what: str = "audio") -> np.ndarray:
    samples = np.asarray(audio, dtype=np.float32)
    if samples.ndim == 2 and samples.shape[1] == 1:
        samples = samples[:, 0]
    if samples.ndim != 1:
        raise ValueError(f"{what} must be mono with shape (samples,), got shape {samples.shape}")
    if not np.all(np.isfinite(samples)):
        raise ValueError(f"{what} contains NaN or infinite samples")
    # libsndfile does not clip float -> PCM by default; out-of-range samples would wrap around.
    return np.clip(samples, -1.0, 1.0)


def _temp_path(path: str) -> str:
    # Same folder so os.replace is an atomic rename, never a cross-device copy.
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.part")
    # os.open with 0o666 applies the umask, unlike mkstemp's 0o600 which the final file would keep.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return tmp


class AudioFileWriter:
    """Incrementally write a mono audio file, e.g. while streaming generation.

    Chunks go to a temporary file in the target folder; :meth:`close` finalizes it
    under ``path``, :meth:`abort` deletes it. Used as a context manager, a clean exit
    closes; an exception aborts (nothing is left behind) unless ``keep_partial=True``,
    in which case the audio written so far is finalized.

    Args:
        path: Output file; the format follows the extension (see :func:`supported_extensions`).
        sample_rate: Samples per second, e.g. 24000.
        keep_partial: On an exception inside ``with``, keep what was written.

    Raises:
        ValueError: Unsupported extension or invalid sample rate.
        FileNotFoundError: The output folder does not exist.
        IsADirectoryError: ``path`` is an existing folder.
        AudioWriteError: The file cannot be created or written (here, in ``write`` or ``close``).
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int, keep_partial: bool = False):
        self.path, fmt, subtype = _resolve(path)
        self.sample_rate = _check_sample_rate(sample_rate)
        self.keep_partial = keep_partial
        self.frames_written = 0
        try:
            self._tmp = _temp_path(self.path)
        except OSError as e:
            raise _write_error(self.path, e) from None
        try:
            self._file = sf.SoundFile(self._tmp, "w", self.sample_rate, 1, subtype=subtype, format=fmt)
        except BaseException as e:
            os.remove(self._tmp)
            if isinstance(e, Exception):
                raise _write_error(self.path, e) from None
            raise
        self._done = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` or :meth:`abort` has run."""
        return self._done

    def write(self, chunk) -> None:
        """Append a mono float chunk (shape ``(samples,)``, nominal range [-1, 1])."""
        if self._done:
            raise ValueError(f"AudioFileWriter for {self.path} is already closed")
        samples = _as_mono(chunk, "chunk")
        try:
            self._file.write(samples)
        except Exception as e:  # OSError, LibsndfileError, soundfile's short-write assertion
            error = _write_error(self.path, e, self._file)
            self.abort()
            raise error from None
        self.frames_written += samples.shape[0]

    def close(self) -> None:
        """Finish the file and move it to ``path``. Idempotent."""
        if self._done:
            return
        self._done = True
        try:
            self._file.close()
            os.replace(self._tmp, self.path)
        except BaseException as e:
            _remove_quietly(self._tmp)
            if isinstance(e, Exception):
                raise _write_error(self.path, e) from None
            raise

    def abort(self) -> None:
        """Discard everything written; ``path`` is left untouched. Idempotent."""
        if self._done:
            return
        self._done = True
        try:
            self._file.close()
        except Exception:
            pass  # discarding anyway: a failed flush of what is thrown away does not matter
        finally:
            _remove_quietly(self._tmp)

    def __enter__(self) -> "AudioFileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or self.keep_partial:
            self.close()
        else:
            self.abort()


def _remove_quietly(path: str) -> None:
    # Cleanup after a failure: the original error matters, a vanished temp file does not.
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def write_audio(path: str | os.PathLike, audio, sample_rate: int) -> None:
    """Write mono float audio to ``path``; the format follows the extension.

    Samples are clipped to [-1, 1]. The file appears under ``path`` only when fully
    written (an existing file is replaced atomically).

    Args:
        path: ``.wav``, ``.flac``, ``.ogg`` (Vorbis) or, if libsndfile supports it, ``.mp3``.
        audio: 1-D float array (``np.ndarray`` or ``mx.array``), shape ``(samples,)``.
        sample_rate: Samples per second, e.g. 24000.

    Raises:
        ValueError: Unsupported extension, non-mono or non-finite audio, bad sample rate.
        FileNotFoundError: The output folder does not exist.
    """
    samples = _as_mono(audio)
    with AudioFileWriter(path, sample_rate) as writer:
        writer.write(samples)


# ---- in-memory encoding, for the server ---------------------------------------------------------
# The server's response formats (as OpenAI's: no ogg).
_ENCODINGS = {n: _CODECS[n] for n in ("wav", "flac", "pcm", "mp3") if n in _CODECS}


def encodable_formats() -> list[str]:
    """Formats :func:`encode_audio` supports with this libsndfile build."""
    return sorted(_ENCODINGS)


def encode_audio(audio, sample_rate: int, fmt: str) -> bytes:
    """Encode mono float audio in memory: ``wav``/``flac`` (16-bit), ``mp3`` (if libsndfile has
    it) or ``pcm`` (raw signed 16-bit little-endian, the samples a 16-bit wav holds).

    Samples are clipped to [-1, 1]; the conversion to 16 bits is libsndfile's, exactly as in
    files written by :func:`write_audio`.

    Raises:
        ValueError: unknown format (the message lists the supported ones), non-mono or
            non-finite audio, bad sample rate.
    """
    if fmt not in _ENCODINGS:
        raise ValueError(f"Unsupported audio format {fmt!r}; use one of {encodable_formats()}")
    samples = _as_mono(audio)
    sample_rate = _check_sample_rate(sample_rate)
    container, subtype = _ENCODINGS[fmt]
    buffer = io.BytesIO()
    endian = "LITTLE" if fmt == "pcm" else "FILE"
    sf.write(buffer, samples, sample_rate, subtype=subtype, format=container, endian=endian)
    return buffer.getvalue()


_UNKNOWN_SIZE = 0xFFFFFFFF


def wav_header(sample_rate: int, data_bytes: int | None = None) -> bytes:
    """The 44-byte header of a mono 16-bit PCM wav, for streaming it before its length is known.

    With ``data_bytes=None`` the RIFF and data sizes are 0xFFFFFFFF ("unknown"), which players,
    ffmpeg and libsndfile read as "until the end of the stream". Followed by
    ``encode_audio(..., "pcm")`` chunks it makes a wav file.
    """
    sample_rate = _check_sample_rate(sample_rate)
    riff = _UNKNOWN_SIZE if data_bytes is None else 36 + data_bytes
    data = _UNKNOWN_SIZE if data_bytes is None else data_bytes
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, 2 * sample_rate, 2, 16)  # PCM, mono, 16-bit
    return b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt \
        + b"data" + struct.pack("<I", data)
