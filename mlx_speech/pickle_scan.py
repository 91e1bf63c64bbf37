"""Opcode allowlist for the pickle of a ``torch.save`` tensor, checked before it is unpickled.

``pt_reader``'s restricted unpickler decides which *globals* a pickle may name; this module decides
which *opcodes* it may use at all. A tensor pickle needs only a few: push strings, ints, bools and
tuples, name a global, look up a persistent id (the storage), call (REDUCE) and memoize. The rest
are refused before anything runs, as classes:

- opcodes that write into an existing object: BUILD (``__setstate__`` / ``__dict__.update``),
  SETITEM(S), APPEND(S), ADDITEMS. BUILD could rewrite the unpickler's own stand-ins;
- opcodes that create objects other than through REDUCE, or import on their own: INST, OBJ,
  NEWOBJ(_EX), EXT1/2/4 (the copyreg extension registry), PERSID (text persistent ids);
- opcodes that allocate from a length the file declares: BINBYTES*, BYTEARRAY8, LONG4, ... (the
  C unpickler allocates BYTEARRAY8's claimed 2**62 bytes before reading them).

Memo indices are bounded too: CPython grows its memo list to the largest index it is given, so
``LONG_BINPUT 2**26`` in a 609-byte file costs 1 GiB.
"""

from __future__ import annotations

import io
import pickletools

# Every opcode torch.save writes for one tensor (protocol 2, its default; the golden voices use
# exactly PROTO GLOBAL BINPUT MARK BINUNICODE BININT1 BININT2 TUPLE TUPLE2 BINPERSID NEWFALSE
# EMPTY_TUPLE REDUCE STOP), plus what the same tensor needs at other sizes, flags or protocols:
# LONG_BINPUT and BINGET for more memo entries, BININT/LONG1 for larger ints, TUPLE1/TUPLE3 for
# other ranks, NEWTRUE for requires_grad, NONE, and FRAME/SHORT_BINUNICODE/MEMOIZE/STACK_GLOBAL
# for torch.save(..., pickle_protocol=4). STACK_GLOBAL is gated by the unpickler's find_class
# exactly like GLOBAL.
ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK",
    "GLOBAL", "STACK_GLOBAL", "BINPERSID", "REDUCE",
    "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET",
    "BINUNICODE", "SHORT_BINUNICODE",
    "BININT", "BININT1", "BININT2", "LONG1",
    "NONE", "NEWTRUE", "NEWFALSE",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
})

# More than any tensor pickle uses (the golden ones use 12); CPython sizes its memo by the index.
MAX_MEMO_INDEX = 1000

_MEMO_INDEXED = frozenset({"BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET"})

# Opcodes that build a container: named as such, since a state_dict saved by mistake is the
# likeliest way to meet them.
_CONTAINERS = {
    "EMPTY_LIST": "list", "LIST": "list", "APPEND": "list", "APPENDS": "list",
    "EMPTY_DICT": "dict", "DICT": "dict", "SETITEM": "dict", "SETITEMS": "dict",
    "EMPTY_SET": "set", "FROZENSET": "set", "ADDITEMS": "set",
}


class BadPickle(ValueError):
    """The pickle is malformed (truncated, unknown opcode, trailing bytes). No file name: the caller adds it."""


class RefusedPickle(BadPickle):
    """The pickle uses an opcode, or a memo index, that a tensor pickle never needs."""


def check_tensor_pickle(data: bytes) -> None:
    """Refuse ``data`` unless every opcode is in ``ALLOWED_OPCODES`` and its arguments are bounded.

    Each opcode is judged before its argument is read, and every argument read comes from
    ``data`` itself, so a claimed length can never allocate more than ``len(data)`` bytes.

    Raises:
        RefusedPickle: naming the first refused opcode and its byte offset.
        BadPickle: if the pickle is truncated, has an unknown opcode, or bytes after STOP.
    """
    stream = io.BytesIO(data)
    memoized = 0
    while True:
        pos = stream.tell()
        code = stream.read(1)
        if not code:
            raise BadPickle("the pickle ends without a STOP opcode")
        op = pickletools.code2op.get(code.decode("latin-1"))
        if op is None:
            raise BadPickle(f"unknown pickle opcode {code!r} at byte {pos}")
        if op.name not in ALLOWED_OPCODES:
            kind = _CONTAINERS.get(op.name)
            why = (f"the pickle holds a {kind}, expected exactly one tensor" if kind
                   else "a torch.save tensor never uses it")
            raise RefusedPickle(f"refused pickle opcode {op.name} at byte {pos}: {why}")
        try:
            arg = op.arg.reader(stream) if op.arg is not None else None
        except ValueError as e:  # truncated argument, or a string that is not UTF-8
            raise BadPickle(f"malformed argument of pickle opcode {op.name} at byte {pos}") from e
        if op.name in _MEMO_INDEXED and arg >= MAX_MEMO_INDEX:
            raise RefusedPickle(
                f"pickle opcode {op.name} at byte {pos} uses memo index {arg}; a tensor pickle "
                f"needs fewer than {MAX_MEMO_INDEX}"
            )
        if op.name == "MEMOIZE":
            memoized += 1
            if memoized >= MAX_MEMO_INDEX:
                raise RefusedPickle(f"the pickle memoizes more than {MAX_MEMO_INDEX} values")
        if op.name == "FRAME" and arg > len(data) - stream.tell():
            raise RefusedPickle(f"pickle FRAME at byte {pos} claims {arg} bytes; only {len(data) - stream.tell()} follow")
        if op.name == "STOP":
            break
    if stream.tell() != len(data):
        raise BadPickle(f"{len(data) - stream.tell()} bytes follow the pickle's STOP opcode")
