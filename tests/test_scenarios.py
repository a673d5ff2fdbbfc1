"""Every scenario of ``pydmabuf scenario`` runs as a test, and says what
it should."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pydmabuf import checks, errors, scenarios

#: What each scenario's summary must say (a subset of its facts).
EXPECTED = {
    "stale-importer": {
        "invalidations delivered": 2,
        "stale DMA caught": 1,
        "culprit": "LazyNic",
        "data after the move": "packet 1",
    },
    "vfio-iommufd-kvm": {
        "iommufd page tables": 2,
        "DMA after the revoke": "2 faulted (EFAULT)",
        "guest access while revoked": "EIO (IOFailure)",
        "after decode comes back": "KVM re-faults (BAR data); iommufd stays revoked",
    },
    "vfio-rdma-p2p": {
        "route": "THRU_HOST_BRIDGE (IOMMU-mapped MMIO)",
        "MR faults": "2 (registration, then after the reset)",
        "zaps by the reset": 1,
    },
    "vfio-gpu-bus-offset": {
        "route": "BUS_ADDR (through the switch, no IOMMU)",
        "DMA address": "phys - 0x3000000000",
        "CPU physical address on the bus": "IommuFault",
        # mapping types: the SGT P2P match checks the route at attach
        "gpu0 (other host bridge)": "NOT_SUPPORTED: attach refused (EINVAL)",
    },
    "device-reset": {
        "importers told": 4,
        "importers working after the reset": "3 of 3 dynamic",
        "faults afterwards": "1 deliberate stale access (IommuFault) + iommufd's revoked area (IommuFault)",
        # Only after the flush: on a lazy domain a cached translation outlives the unmap.
        "stale access faults": "after the IOTLB flush (DMA-FQ domain)",
    },
    "lazy-iotlb-window": {
        "lazy: before the flush": "stale hit reaches the old page (b'frame 1')",
        "lazy: stale window": "1 queued unmap(s), 64 KiB",
        "culprit": "<importer _Polite>",
        "DMA-FQ: after the flush": "IommuFault (EFAULT)",
        "DMA: after the unmap": "IommuFault (EFAULT)",
    },
    "private-memory": {
        "trusted importers served": 1,
        "untrusted imports refused": "2 (EPERM)",
        "host mmap": "refused (EPERM)",
        "untrusted DMA that reached the pages": "2 faulted (EFAULT)",
    },
    "mapping-types": {
        "GPU driver": "DMA Mapped Scatter Gather Table (P2P)",
        "iommufd": "Physical Address List (2 ranges)",
        "PF driver": "Xe IOV interconnect",
        "static importer": "refused (EINVAL): nothing matches",
    },
    "vram-eviction": {
        "moves": 3,
        "DMA before the move fence caught": 1,
        "culprit": "B (skips the fence wait)",
        "A read after waiting": "frame 0001",
        "pinned eviction": "refused (EBUSY)",
    },
    "ranges-to-table": {
        "ranges": 3,
        "model layout": "each range at its running offset",
        "kernel_compat": "second range collides: AlreadyExists (EEXIST)",
    },
}


def test_every_scenario_has_expectations():
    assert set(scenarios.names()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scenario(name):
    checks.clear()
    r = scenarios.run(name, out=None)
    for k, v in EXPECTED[name].items():
        assert r.summary[k] == v, (k, r.text)
    assert r.summary["left behind"].startswith("nothing")
    assert r.text.startswith(f"{name}: ") and "\nSummary\n" in r.text
    assert r.steps >= 3
    assert checks.mode() == "strict"  # a scenario restores the checker's mode
    assert not checks.reports()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scenario_output_is_repeatable(name):
    assert scenarios.run(name, out=None).text == scenarios.run(name, out=None).text


def test_unknown_scenario():
    with pytest.raises(errors.NotFound):
        scenarios.run("no-such-thing", out=None)


def test_cli_lists_and_runs():
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pydmabuf.cli", "scenario", *args],
                              capture_output=True, text=True, timeout=300)

    r = cli("--list")
    assert r.returncode == 0
    assert [line.split()[0] for line in r.stdout.splitlines()] == scenarios.names()
    r = cli("stale-importer")
    assert r.returncode == 0, r.stderr
    assert r.stdout == scenarios.run("stale-importer", out=None).text
    assert r.stderr == ""  # the checker's report-mode log stays quiet
    assert cli("nope").returncode == 2


def test_the_docs_show_every_scenario_as_it_runs():
    """docs/scenarios.md is the output of ``python -m pydmabuf.scenarios``."""
    from pathlib import Path

    doc = Path(__file__).resolve().parent.parent / "docs" / "scenarios.md"
    if not doc.exists():
        pytest.skip("no docs/ next to the tests (not a source checkout)")
    assert doc.read_text() == scenarios.markdown(), "regenerate: python -m pydmabuf.scenarios > docs/scenarios.md"
