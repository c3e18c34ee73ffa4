"""Console records: the console shield's format (sans-IO: no I/O, no clock, no randomness).

Theory of operation
-------------------
With the console shield on, every write of the app to stdout or stderr becomes one or more
*records*, each ONE line of ASCII text (``psc1:`` + base64 of the binary record + ``\\n``),
so that terminals, ``docker logs`` and ``kubectl logs`` carry them unchanged.  A binary
record is::

    kind (1) | stream (1) | run (16) | gseq (8) | sseq (8) | AES-256-GCM(payload) + tag (16)

The first 34 bytes are the associated data: none of them can change unnoticed.

* ``run`` is 16 random bytes the enclave picks at start (the caller passes them in: this
  module draws no randomness).  Each run seals with its own key, HKDF-SHA256 of the
  owner's 32-byte key with the run as salt and a label as info, so a GCM nonce (the
  ``gseq``, big-endian) is never reused across runs although the owner's key is, and a
  record of another run (or another app with the same key) is recognised as such.
* ``gseq`` numbers all output records of a run, stdout and stderr together: two log files
  (``docker logs`` separates the streams) are merged back into the app's interleaving.
* ``sseq`` numbers the records of one stream, so that a decoder given one stream alone
  still sees a record missing from it.
* A run begins with a START record on each stream (``sseq`` 0) and, on a clean exit, ends
  with an END record on each stream carrying the app's exit status, the run's record
  count and how many children it forked.  No END means the app did not exit cleanly (a
  crash, ``SIGKILL``) *or* the host cut the log: the two cannot be told apart, and the
  decoder says exactly that, never "tampered".
* A forked child is a run of its own (a new random run: its own key, its counters from 0),
  never the parent's encoder continued (that would reuse the parent's nonces).  Its START
  records name the parent's run and the parent's ``gseq`` at the fork, so the decoder
  links the family's runs in one log (:mod:`~pyscone.protect.console_decoder`).
* stdin records (made by the owner with ``pyscone console --encode-input``) use a key
  derived with another label: an output record fed back as input does not verify.

The decoder classifies every deviation: *forged* (does not verify), *replayed* (a record
seen before, or of another run), *reordered* (a record after one that follows it),
*dropped* (a gap that stays open), *unlinked* (a child run of no run in the log),
*truncated* (no end record), *unstarted* (a forked child's run is missing).  A gap is held
open for :data:`REORDER_WINDOW` records before it is called a drop, so a swap of two lines
is reported as the reordering it is, and the output comes out in the right order.

This module is the façade: the records are :mod:`~pyscone.protect.console_records`, the
decoder :mod:`~pyscone.protect.console_decoder`.
"""

from __future__ import annotations

from pyscone.protect.console_decoder import UNCLEAN, Decoder, Event, InputReader, Output, Problem, Run, merge
from pyscone.protect.console_records import (
    INPUT_LABEL,
    KEY_SIZE,
    MAX_PAYLOAD,
    OUTPUT_LABEL,
    PREFIX,
    REORDER_WINDOW,
    RUN_SIZE,
    STREAM_NAMES,
    TAG_SIZE,
    ConsoleError,
    Encoder,
    End,
    Kind,
    Lineage,
    Record,
    Stream,
    _Keys,
    end_of,
    is_record,
    line_overhead,
    lineage_of,
    open_line,
    parse_key,
    payload_for_line,
    run_cipher,
)

__all__ = [
    "INPUT_LABEL",
    "KEY_SIZE",
    "MAX_PAYLOAD",
    "OUTPUT_LABEL",
    "PREFIX",
    "REORDER_WINDOW",
    "RUN_SIZE",
    "STREAM_NAMES",
    "TAG_SIZE",
    "UNCLEAN",
    "ConsoleError",
    "Decoder",
    "Encoder",
    "End",
    "Event",
    "InputReader",
    "Kind",
    "Lineage",
    "Output",
    "Problem",
    "Record",
    "Run",
    "Stream",
    "_Keys",
    "end_of",
    "is_record",
    "line_overhead",
    "lineage_of",
    "merge",
    "open_line",
    "parse_key",
    "payload_for_line",
    "run_cipher",
]
