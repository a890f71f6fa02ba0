"""MetaGPT (Model Exclusive Task Arithmetic) merge methods for mergekit.

Importing this package registers ``metagpt`` in mergekit's merge-method registry
(idempotently). With the package installed, a start-up hook does the same as soon
as ``mergekit.merge_methods`` is imported, so ``mergekit-yaml`` needs no import.
"""

__version__ = "0.1.0"

from mergekit_metagpt.registration import register_all

register_all()

__all__ = ["register_all", "__version__"]
