"""MetaGPT (Model Exclusive Task Arithmetic) merge methods for mergekit.

Importing this package registers ``metagpt``, ``metagpt_ties``, ``metagpt_dare`` and ``metagpt_dare_ties`` in
mergekit's merge-method registry (idempotently). With the package installed, a start-up hook does the same as soon
as ``mergekit.merge_methods`` is imported, so ``mergekit-yaml`` needs no import.
"""

__version__ = "0.1.0"
#: The paper (Zhou et al., 2024), linked from the method spec, the record and the card.
PAPER_URL = "https://arxiv.org/abs/2406.11385"

import logging as _logging

from mergekit_metagpt.errors import PrintableRecords as _PrintableRecords
from mergekit_metagpt.registration import MergekitUnusable, register_all

_LOG = _logging.getLogger("mergekit_metagpt")
if not any(type(f).__name__ == "PrintableRecords" for f in _LOG.filters):  # (once, reloads too)
    _LOG.addFilter(_PrintableRecords())

#: Why mergekit fails to import in this Python (a version of it, or of its dependencies, that
#: does not load), or None; ``mergekit-metagpt --version`` says it, where any other use of
#: mergekit meets the error itself.
MERGEKIT_IMPORT_ERROR = None

try:
    register_all()
except ModuleNotFoundError as _error:  # mergekit not installed: nothing to register in; the
    if _error.name != "mergekit":  # CLI says so (--version, or one line); a mergekit that
        raise                         # lacks a module is another error
except MergekitUnusable as _error:
    MERGEKIT_IMPORT_ERROR = _error.__cause__

__all__ = ["register_all", "__version__"]
