"""The package as a user meets it: version, console command, stubs, cimport."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pydmabuf

PKG_DIR = Path(pydmabuf.__file__).parent


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pydmabuf.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_version():
    assert isinstance(pydmabuf.__version__, str) and pydmabuf.__version__
    r = run_cli("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"pydmabuf {pydmabuf.__version__}"


def test_python_dash_m_pydmabuf_is_the_command():
    r = subprocess.run([sys.executable, "-m", "pydmabuf", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"pydmabuf {pydmabuf.__version__}"
    r = subprocess.run([sys.executable, "-m", "pydmabuf", "scenario", "--no-such-flag"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage: pydmabuf" in r.stderr  # argparse's exit status reaches the shell


def test_help_lists_the_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    assert "bench" in r.stdout
    r = run_cli("bench", "--help")
    assert r.returncode == 0 and "--quick" in r.stdout and "--json" in r.stdout


def test_bench_quick_json_and_csv(tmp_path):
    j, c = tmp_path / "out.json", tmp_path / "out.csv"
    r = run_cli("bench", "--quick", "--layouts", "contiguous,scattered", "--sizes", "64K,1M",
                "--json", str(j), "--csv", str(c), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "Scatterlist walk" in r.stdout
    import json

    data = json.loads(j.read_text())
    strategies = {cell["strategy"] for cell in data["cells"]}
    assert {"sg_from_pages", "c_floor", "numpy"} <= strategies
    assert all(cell["ns_per_page"] > 0 for cell in data["cells"])
    seg = {(c_["layout"], c_["npages"]): c_["counters"]["segments"] for c_ in data["cells"]
           if c_["strategy"] == "sg_from_pages"}
    assert seg[("contiguous", 256)] == 1 and seg[("scattered", 256)] > 200
    lines = c.read_text().splitlines()
    assert lines[0].startswith("layout,") and len(lines) == 1 + len(data["cells"])


def test_bench_plot_and_compare(tmp_path):
    pytest.importorskip("matplotlib")
    a, b, png = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "p.png"
    args = ["bench", "--quick", "--layouts", "fragmented", "--sizes", "64K,1M", "--no-progress"]
    assert run_cli(*args, "--json", str(a), "--plot", str(png)).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "p-work.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_cli(*args, "--json", str(b)).returncode == 0
    r = run_cli("bench", "--compare", str(a), str(b))
    assert r.returncode == 0 and "geometric mean new/old" in r.stdout
    assert "agreement within +-10%" in r.stdout
    r = run_cli("bench", "--compare", str(a), str(b), "--all")
    assert "dmabuf_dynamic" in r.stdout and "link_pages" in r.stdout
    assert run_cli("bench", "--compare", str(a), str(tmp_path / "missing.json")).returncode == 2


def test_bench_rejects_unknown_layouts_and_bad_sizes():
    assert run_cli("bench", "--layouts", "nonsense").returncode == 2
    assert run_cli("bench", "--sizes", "1000").returncode == 2


def test_bare_command_prints_usage_and_exits_2():
    r = run_cli()
    assert r.returncode == 2
    assert r.stderr.startswith("usage: pydmabuf") and "name a command" in r.stderr and not r.stdout


@pytest.mark.parametrize("option", ["--json", "--csv", "--markdown", "--plot"])
def test_bench_refuses_an_unwritable_output_before_running(tmp_path, option):
    missing = tmp_path / "no-such-dir" / "out"
    r = run_cli("bench", "--quick", "--no-progress", option, str(missing), timeout=60)
    assert r.returncode == 2
    assert r.stderr == f"pydmabuf bench: {option} {missing}: no directory {missing.parent}\n"
    assert not r.stdout  # refused before the run: no table
    r = run_cli("bench", "--quick", "--no-progress", option, str(tmp_path), timeout=60)
    assert r.returncode == 2 and r.stderr == f"pydmabuf bench: {option} {tmp_path}: is a directory\n"


def test_a_closed_pipe_stops_the_command_quietly():
    # The reader is gone before the table is written, as with
    # `pydmabuf bench | head -1` on a table longer than the pipe holds.
    with subprocess.Popen([sys.executable, "-m", "pydmabuf", "bench", "--quick", "--layouts", "contiguous",
                           "--sizes", "64K", "--no-progress"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        assert p.stdout is not None and p.stderr is not None
        p.stdout.close()
        err = p.stderr.read()
        assert p.wait(timeout=300) == 141, err
    assert err == ""


def test_bench_tables_align():
    # Every row of each table is exactly as long as its header: the columns
    # grow to their widest cell (a wide "median [q1-q3]" cell used to push
    # its row out of line).
    from pydmabuf import bench

    result = bench.run_study(["contiguous", "scattered"], [16, 4096], quick=True, progress=False)
    lines = bench.format_table(result).splitlines()
    tables = [i for i, line in enumerate(lines) if line and set(line) == {"-"}]
    assert len(tables) == 2
    for i in tables:
        width = len(lines[i - 1])
        assert len(lines[i]) == width
        rows = []
        for line in lines[i + 1:]:
            if line.startswith(("Mapping", "note:", "run:")):
                break
            if line:
                rows.append(line)
        assert rows and all(len(r) == width for r in rows), "\n".join(lines[i - 1:i + 1] + rows)


def test_sizes_share_one_syntax_with_machine_files():
    from pydmabuf import cli, errors
    from pydmabuf.machine import _num

    texts = ["4096", "0x2000", "16K", "16 KiB", "16kb", "1M", "2_048K", "1 GiB"]
    assert cli._sizes(",".join(texts)) == [_num(t, "size") // 4096 for t in texts] == [
        1, 2, 4, 4, 4, 256, 512, 262144]
    for bad in ["1.5M", "4X", "", "-4K"]:
        with pytest.raises(errors.InvalidArgument):
            _num(bad, "size")
        assert run_cli("bench", "--sizes", bad, timeout=60).returncode == 2


def test_bench_mapping_needs_the_exporters_bar():
    # The mapping study exports ranges of vfio0's BAR0; a machine without a
    # memory BAR0 there is refused up front, naming it.
    from pydmabuf import bench, errors
    from pydmabuf.machine import Machine

    m = Machine.default()
    m.device("vfio0").bars.clear()
    with pytest.raises(errors.NoDevice, match="vfio0 has no memory BAR0"):
        bench.run_study(["contiguous"], [16], parts=["mapping"], machine=m, quick=True, progress=False)


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "pydmabuf"
    if not exe.exists():
        pytest.skip("not installed as a distribution (running from a source tree)")
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and pydmabuf.__version__ in r.stdout


def test_typing_files_are_shipped():
    assert (PKG_DIR / "py.typed").exists()
    assert (PKG_DIR / "_core.pyi").exists()
    assert (PKG_DIR / "_core.pxd").exists()


def test_stubs_type_check_a_user_program(tmp_path):
    api = pytest.importorskip("mypy.api")
    prog = tmp_path / "user.py"
    prog.write_text(textwrap.dedent("""
        import numpy as np
        import pydmabuf
        t = pydmabuf.SgTable.from_pages(np.arange(4, dtype=np.uint64))
        n: int = t.nents
        r = pydmabuf.RangeTable()
        r.insert(0, 4096, kind=pydmabuf.RangeKind.RAM)
        hit = r.lookup(0)
        if hit is not None:
            last: int = hit.last
        gap: int = r.find_gap(4096, top_down=True)
        bad: str = t.nents
    """))
    out, err, status = api.run([str(prog), "--no-error-summary", "--cache-dir", str(tmp_path / ".mypy")])
    # Exactly the one deliberate error: the stubs are precise enough to catch it.
    assert status == 1, out + err
    errors = [line for line in out.splitlines() if ": error:" in line]
    bad_line = prog.read_text().splitlines().index("bad: str = t.nents") + 1
    assert len(errors) == 1, out
    assert f"user.py:{bad_line}:" in errors[0] and '"int"' in errors[0], out


def test_the_package_type_checks_strictly(tmp_path, monkeypatch):
    # mypy with the project's own configuration ([tool.mypy] in
    # pyproject.toml: strict, files = src/pydmabuf), from the repository
    # root as a developer runs it: zero errors.
    api = pytest.importorskip("mypy.api")
    root = Path(__file__).resolve().parent.parent
    config = root / "pyproject.toml"
    if not (config.is_file() and (root / "src" / "pydmabuf" / "__init__.py").is_file()):
        pytest.skip("no source tree next to the tests (running against an installed package)")
    monkeypatch.chdir(root)
    out, err, status = api.run(["--config-file", str(config), "--cache-dir", str(tmp_path / ".mypy")])
    assert status == 0, out + err
    assert out.startswith("Success: no issues found"), out + err


@pytest.mark.slow  # about 20 s: mypy analyses the whole package
def test_stubtest_passes():
    # The stubs against the built module and the package's own inferred
    # types; the allowlist holds only what Cython generates (see the file).
    pytest.importorskip("mypy.stubtest")
    root = Path(__file__).resolve().parent.parent
    allowlist = root / "stubtest-allowlist.txt"
    if not allowlist.is_file():
        pytest.skip("no source tree next to the tests (running against an installed package)")
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", "pydmabuf", "--allowlist", str(allowlist)],
                       capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert "Success: no issues found" in r.stdout


def test_all_is_static_and_complete():
    # pydmabuf.__all__ is one literal list (type checkers and stubtest read
    # it as written) and re-exports every dma-buf name.
    import ast

    from pydmabuf import dmabuf

    tree = ast.parse((PKG_DIR / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.AugAssign)
                and getattr(n.target, "id", None) == "__all__"]
    assert set(dmabuf.__all__) <= set(pydmabuf.__all__)
    assert all(hasattr(pydmabuf, name) for name in pydmabuf.__all__)


CONSUMER = '''
# cython: language_level=3
cimport pydmabuf._core as core
from libc.stdint cimport int64_t, uint64_t

def walk(core.SgTable t):
    """Count data entries with the core's own sg_next()."""
    cdef int64_t i = core.sg_first(&t.t)
    cdef int n = 0
    while i >= 0 and n < t.t.orig_nents:
        n += 1
        i = core.sg_next(&t.t, i)
    return n

def kind_at(core.RangeTable r, uint64_t addr):
    cdef const core.rt_node *node = core.rt_lookup(&r.t, addr)
    return -1 if node == NULL else node.kind

def page_size():
    return core.PDB_PAGE_SIZE
'''


@pytest.mark.slow
def test_a_cython_consumer_cimports_the_core(tmp_path):
    pytest.importorskip("Cython")
    (tmp_path / "consumer.pyx").write_text(CONSUMER)
    build = textwrap.dedent("""
        from setuptools import setup, Extension
        from Cython.Build import cythonize
        setup(ext_modules=cythonize([Extension("consumer", ["consumer.pyx"])], quiet=True))
    """)
    (tmp_path / "setup.py").write_text(build)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *map(os.path.abspath, sys.path)]))
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    code = textwrap.dedent("""
        import numpy as np, pydmabuf, consumer
        t = pydmabuf.SgTable.from_pages(np.arange(1000, dtype=np.uint64) * 2)
        assert consumer.walk(t) == 1000
        r = pydmabuf.RangeTable(); r.insert(0x1000, 0x1000, kind=pydmabuf.RangeKind.MMIO)
        assert consumer.kind_at(r, 0x1800) == 2 and consumer.kind_at(r, 0) == -1
        assert consumer.page_size() == 4096
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_the_compiled_core_imports_only_layer_zero():
    # The core (src/_core*.pyx and the .pxi files they include) sits just
    # above the leaves in the layer map: its Python imports of pydmabuf
    # modules may name only the leaves and the core's own modules, at any
    # indentation (a function-level import counts too).
    import re

    src = PKG_DIR.parent
    files = sorted(src.glob("_core*.pyx")) + sorted(src.glob("_core*.pxi"))
    if not files:
        pytest.skip("the core's sources are not beside this install")
    leaves = {"errors", "_types", "_sites"}
    found = set()
    for f in files:
        for m in re.finditer(r"^\s*(?:from\s+pydmabuf(?:\.(\w+))?\s+c?import\s+([\w, ()]+)|import\s+pydmabuf\.(\w+))",
                             f.read_text(), re.M):
            if m.group(1) or m.group(3):
                found.add(m.group(1) or m.group(3))
            else:
                found.update(n.split()[0] for n in m.group(2).strip("()").split(",") if n.strip())
    assert found, "no import found: the pattern is stale"
    upward = {name for name in found if name not in leaves and not name.startswith("_core")}
    assert not upward, f"the core imports modules above it: {sorted(upward)}"
