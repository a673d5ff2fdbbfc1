"""Regenerate the sample traces: ``python tests/data/traces/make_samples.py``.

The dma_map_phys / dma_map_sg / unmap lines come from
``pydmabuf.replay.synthesize_trace`` (DMA addresses chosen by the model's
IOVA allocator with the geometry of ``machine.toml``); the other lines
are written here in the kernel's print formats: a swiotlb bounce of a
32-bit device doing direct DMA (swiotlb_bounced prints the
original address, dma_map_page the bounce slot's), the IOMMU's own map/unmap calls, an IO
page fault, a sync, 6.12-format dma_map_page / dma_map_sg lines (no
nents=/ents=) of a device the machine file does not describe, and an
event the replay does not know (sched_switch).
"""

from __future__ import annotations

from pathlib import Path

from pydmabuf.replay import synthesize_trace

HERE = Path(__file__).parent


def _extra_trace() -> list[str]:
    return [
        "          <idle>-0       [001] d.h1.   101.000000: sched_switch: prev_comm=swapper/1 prev_pid=0 "
        "prev_prio=120 prev_state=R ==> next_comm=kworker/1:1 next_pid=41 next_prio=120\n",
        "     kworker/1:1-41     [001] .....   101.000100: swiotlb_bounced: dev_name: 0000:05:00.0 "
        "dma_mask=ffffffff dev_addr=17f000200 size=1500\n",
        "     kworker/1:1-41     [001] .....   101.000110: dma_map_page: 0000:05:00.0 dir=TO_DEVICE "
        "dma_addr=7c001200 size=1500 phys_addr=17f000200 attrs=\n",
        "     kworker/1:1-41     [001] .....   101.000300: dma_unmap_page: 0000:05:00.0 dir=TO_DEVICE "
        "dma_addr=7c001200 size=1500 attrs=\n",
        "     kworker/0:1-40     [000] .....   101.000400: map: IOMMU: iova=0x00000000fe000000 - "
        "0x00000000fe001000 paddr=0x0000000123456000 size=4096\n",
        "     kworker/0:1-40     [000] .....   101.000500: unmap: IOMMU: iova=0x00000000fe000000 - "
        "0x00000000fe001000 size=4096 unmapped_size=4096\n",
        "          <idle>-0       [000] d.h1.   101.000600: io_page_fault: IOMMU:nvme 0000:03:00.0 "
        "iova=0x00000000deadb000 flags=0x0000\n",
        "     kworker/0:1-40     [000] .....   101.000700: dma_sync_single_for_cpu: 0000:03:00.0 "
        "dir=FROM_DEVICE dma_addr=deadb000 size=512\n",
    ]


def _extra_report() -> list[str]:
    # trace-cmd report: no flags column, the event name padded
    return [
        "          <idle>-0     [000]   101.000000: sched_switch:         swapper/0:0 [120] R ==> kworker/0:1:40 [120]\n",
        "     kworker/0:1-40    [000]   101.000100: dma_map_page:         0000:06:00.0 dir=FROM_DEVICE "
        "dma_addr=fffff000 size=4096 phys_addr=2a4531000 attrs=SKIP_CPU_SYNC\n",
        "     kworker/0:1-40    [000]   101.000200: dma_map_sg:           0000:06:00.0 dir=TO_DEVICE "
        "dma_addrs={0xffe00000,0xffe10000} sizes={0x10000,0x3000} phys_addrs={0x3f0000000,0x3f0010000,"
        "0x3f0011000,0x12345000} attrs=\n",
        "     kworker/0:1-40    [000]   101.000300: dma_sync_sg_for_device: 0000:06:00.0 dir=TO_DEVICE "
        "dma_addrs={0xffe00000,0xffe10000} sizes={0x10000,0x3000}\n",
        "     kworker/0:1-40    [000]   101.000400: dma_unmap_sg:         0000:06:00.0 dir=TO_DEVICE "
        "phys_addrs={0x3f0000000,0x3f0010000,0x3f0011000,0x12345000} attrs=\n",
        "     kworker/0:1-40    [000]   101.000500: dma_unmap_page:       0000:06:00.0 dir=FROM_DEVICE "
        "dma_addr=fffff000 size=4096 attrs=SKIP_CPU_SYNC\n",
        "     kworker/0:1-40    [000]   101.000600: dma_map_sg_err:       0000:06:00.0 dir=TO_DEVICE "
        "dma_addrs={0x3f0000000} err=-12 attrs=\n",
    ]


def main() -> None:
    lines = list(synthesize_trace(ops=48, seed=11, flavour="trace", device="0000:03:00.0", strict=False,
                                  max_sg_entries=200, sg_share=0.4))
    (HERE / "nvme-lazy.trace").write_text("".join(lines + _extra_trace()))
    lines = list(synthesize_trace(ops=40, seed=12, flavour="report", device="0000:04:00.0", strict=True,
                                  max_sg_entries=200, sg_share=0.4))
    (HERE / "gpu-strict.report").write_text("".join(lines + _extra_report()))


if __name__ == "__main__":
    main()
