"""Physical pages behind Python buffers, from /proc/self/pagemap."""

import mmap

import numpy as np
import pytest

import pydmabuf
from pydmabuf import SgTable, errors

PAGE = 4096


def _pfns_readable() -> bool:
    try:
        pydmabuf.pagemap(bytearray(PAGE))
    except errors.NotPermitted:
        return False
    return True


needs_pfns = pytest.mark.skipif(not _pfns_readable(), reason="this process may not read PFNs (no CAP_SYS_ADMIN)")


@needs_pfns
def test_one_pfn_per_page_touched():
    buf = np.zeros(5 * PAGE + 10, dtype=np.uint8)
    pfns = pydmabuf.pagemap(buf)
    addr = buf.__array_interface__["data"][0]
    npages = (addr + buf.nbytes - 1) // PAGE - addr // PAGE + 1
    assert pfns.dtype == np.uint64 and len(pfns) == npages
    assert (pfns > 0).all()
    # Writable anonymous memory gets a frame per page (not the zero page).
    assert len(set(pfns.tolist())) == npages


@needs_pfns
def test_contents_unchanged_and_readonly_buffers_work():
    data = bytes(range(256)) * 64
    pfns = pydmabuf.pagemap(data)
    assert len(pfns) >= 4
    assert data == bytes(range(256)) * 64


@needs_pfns
def test_mmap_and_sgtable_from_buffer():
    m = mmap.mmap(-1, 8 * PAGE)
    t = SgTable.from_buffer(m)
    assert t.cpu_nbytes == 8 * PAGE
    assert (t.pfns() == pydmabuf.pagemap(m)).all()
    m.close()


@needs_pfns
def test_offset_inside_the_first_page():
    buf = np.zeros(3 * PAGE, dtype=np.uint8)
    view = buf[100 : 100 + PAGE]
    t = SgTable.from_buffer(view)
    addr = view.__array_interface__["data"][0]
    first = t.entries[0]
    assert int(first["offset"]) == addr % PAGE
    assert t.cpu_nbytes == PAGE


def test_empty_buffer_is_einval():
    with pytest.raises(errors.InvalidArgument):
        pydmabuf.pagemap(b"")


def test_non_contiguous_buffer_is_rejected():
    a = np.zeros((64, 64), dtype=np.uint8)[:, ::2]
    with pytest.raises(BufferError):
        pydmabuf.pagemap(a)


def test_not_a_buffer():
    with pytest.raises(TypeError):
        pydmabuf.pagemap(12345)


def test_not_populated_and_not_resident():
    m = mmap.mmap(-1, 4 * PAGE)
    try:
        with pytest.raises((errors.NotFound, errors.NotPermitted)):
            pydmabuf.pagemap(m, populate=False)
    finally:
        m.close()
