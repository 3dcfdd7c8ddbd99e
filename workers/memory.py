"""Process-wide memory settings. No dependencies: the scoring client uses them too."""

from __future__ import annotations

import ctypes


def keep_large_buffers() -> None:
    """Have glibc serve large allocations from the heap and keep freed memory: every
    request of an image model allocates several buffers of its size (received bytes,
    batch arrays, packed replies), and by default glibc maps each one fresh from the kernel
    and unmaps it when freed, paying a page fault per 4 KiB every time. (No-op off glibc.)"""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)
    libc.mallopt(m_trim_threshold, 512 * 2**20)
