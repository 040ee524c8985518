"""Token vocabulary and sentinels, shared by every stage.

The ids follow the original prototype (seed note) so checkpoints and token arrays are comparable:
PAD and MISSING are distinct because a missing call is *data* (the site exists, the call is
unknown) while PAD is *no site at all* and is excluded from attention.
"""

from __future__ import annotations

PAD = 0  # no site: past the end of a short window; ignored by attention and loss
MISSING = 1  # site present, call missing in the VCF ('.')
RESERVED_2 = 2  # kept free (prototype's <sos>) so ids match the seed
RESERVED_3 = 3  # kept free (prototype's <eos>)
MASK = 4  # site hidden from the model: simulated untyped site in training, untyped site in imputation
REF = 5  # allele 0
ALT = 6  # allele 1
VOCAB_SIZE = 7

# Sample roles. The panel never contains a query sample (checked in storage.harmonise).
ROLES = ("panel", "train", "val", "test")

# Minor-allele-frequency bins used by every accuracy report (upper bounds are exclusive except the last).
MAF_BINS = ((0.0, 0.005), (0.005, 0.01), (0.01, 0.05), (0.05, 0.5))
MAF_BIN_NAMES = ("maf_0-0.5pct", "maf_0.5-1pct", "maf_1-5pct", "maf_5-50pct")
RARE_MAF = 0.05  # "rare" for rare-F1, as in the seed's metrics
