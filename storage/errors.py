"""User-facing errors of the storage layer: bad input files, corrupt artifacts, lineage, busy run dirs.

All are :class:`embrag.errors.UserError` (one line naming the file, the record or stage, and the
fix), which the CLI prints without a traceback.
"""

from __future__ import annotations

from embrag.errors import UserError


class VcfInputError(UserError):
    """A VCF/BCF that embrag cannot use as given.

    The message always names the file, the offending record (``contig:pos``, 1-based record
    number) where there is one, and how to fix the input.
    """


class IntegrityError(UserError):
    """An artifact is missing, truncated or altered: it disagrees with its manifest or cannot be decoded."""


class LineageError(UserError):
    """An artifact was made from other prepared data or other settings than the run now has."""


class RunDirBusyError(UserError):
    """Another live process holds the run directory (or output file) for writing."""
