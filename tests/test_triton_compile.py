"""Every Triton kernel variant compiles to sm_80 and sm_90 cubins, here, without a GPU, and fits
the hardware: at most 255 registers, no local-memory spills or stack, shared memory within the
per-block limit. The variant list is fastdiff.kernels.report.VARIANTS, the same list the
generated report (benchmarks/results/triton_compile_report.md) covers."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiling needs the kernels built without TRITON_INTERPRET", allow_module_level=True)

from fastdiff.kernels import report  # noqa: E402

pytestmark = pytest.mark.triton
VARIANTS = report.variants()


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_compiles_for_sm80_and_sm90(variant):
    for arch in report.ARCHS:
        r = report.compile_variant(variant, arch)
        assert r.cubin_bytes > 0
        assert r.shared <= report.MAX_SMEM_PER_BLOCK[arch], f"sm_{arch}: {r.shared} B of shared memory"
        if r.registers is not None:     # cuobjdump ships with triton; None only if it is missing
            assert r.registers <= 255
            assert r.spill_bytes == 0, f"sm_{arch}: {r.spill_bytes} B of local memory (spills/stack)"


def test_report_lists_every_variant(tmp_path):
    out = tmp_path / "report.md"
    assert report.main(["--out", str(out), "--arch", "80"]) == 0     # cached compiles: seconds
    text = out.read_text()
    for v in VARIANTS:
        assert f"| {v.name} | sm_80 |" in text
