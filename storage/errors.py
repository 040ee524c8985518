"""Errors raised on bad user input files (as opposed to bugs)."""

from __future__ import annotations


class VcfInputError(ValueError):
    """A VCF/BCF that embrag cannot use as given.

    The message always names the file, the offending record (``contig:pos``, 1-based record
    number) where there is one, and how to fix the input.
    """
