"""zbigarray: big NumPy arrays stored in ZODB (the data model of WCFS for Python).

* ``ZBigFile``   -- a sparse file of fixed-size blocks (``zbigarray.file``).
* ``ZBlk0``, ``ZBlk1``, ``ZData`` -- the block formats (wendelin.core compatible).
* ``ZBigArray``  -- an n-dimensional array over a ZBigFile (``zbigarray.array``).
* ``install_wendelin_aliases()`` -- load databases written by wendelin.core.
* ``open_filestorage()`` -- open FileStorage files, Python 2 ones included (read-only).

Classes pickle under the stable path ``zbigarray.<Name>`` whatever module
defines them, so refactoring the package never breaks stored databases.
"""
from .array import ZBigArray
from .compat import install_wendelin_aliases
from .file import ZBigFile, ZBlk0, ZBlk1, ZBlkError, ZData
from .storage import open_filestorage

for _cls in (ZBigFile, ZBlk0, ZBlk1, ZData, ZBigArray):
    _cls.__module__ = __name__
del _cls

__all__ = ["ZBigFile", "ZBlk0", "ZBlk1", "ZData", "ZBigArray", "ZBlkError",
           "install_wendelin_aliases", "open_filestorage"]
