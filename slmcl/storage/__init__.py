"""Where artifacts live: ``open_store(url)`` for a folder or an object store, behind one protocol.

The embedded mode uses a ``LocalStore`` on the results directory; the services open
``s3://bucket`` (the S3 store registers itself from outside the core), so the core never
knows which one it writes to.
"""

from slmcl.storage.base import ArtifactStore, check_key, get_dir, put_dir
from slmcl.storage.factory import STORES, open_store
from slmcl.storage.local import LocalStore
from slmcl.storage.prefixed import PrefixedStore

__all__ = ["STORES", "ArtifactStore", "LocalStore", "PrefixedStore", "check_key", "get_dir", "open_store", "put_dir"]
