"""Copy-on-write memory maps of local files, so host outputs can share the page cache instead of copying it.

A load whose bytes are already in a local file (a complete cache entry, huggingface_hub's cache, or a local
path with ``memory_map="all"``) returns tensors over a private map of that file, as safetensors' default
``backend="mmap"`` does: no fresh memory to fault in and zero, no copy, pages read when first touched.
Writes to such a tensor stay in the process (``MAP_PRIVATE``). The map is made with ``mmap(2)`` through
ctypes rather than Python's ``mmap`` module, which keeps a duplicate descriptor open per map: a checkpoint of
thousands of shards would then hold thousands of descriptors for as long as its tensors live.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import weakref
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
logger = logging.getLogger(__name__)


def map_file(fd: int, size: int) -> Any:
    """The first ``size`` bytes of the file open as ``fd``, mapped copy-on-write: a writable buffer
    (``torch.frombuffer`` shares it) that unmaps itself when the last object using it is gone. False if the
    system refuses the map (a file system without mmap, no address space): the caller then reads the bytes.
    The descriptor may be closed afterwards."""
    if size <= 0:
        raise ValueError("nothing to map")
    address = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
    if address is None or address == _MAP_FAILED:
        code = ctypes.get_errno() or errno.ENOMEM
        logger.debug("mmap of %d bytes refused (%s): reading instead", size, os.strerror(code))
        return False
    buffer = (ctypes.c_char * size).from_address(address)
    weakref.finalize(buffer, _libc.munmap, address, size)
    return buffer
