"""``benchmarks/hf_models/run.py --quick`` end to end (a few seconds), so the committed study does not rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

FOLDER = Path(__file__).resolve().parents[2] / "benchmarks" / "hf_models"


def _load_run():
    """Import run.py with its folder's ``tasks`` and ``report`` (plain script imports), then tidy up."""
    saved = {name: sys.modules.pop(name) for name in ("tasks", "report") if name in sys.modules}
    sys.path.insert(0, str(FOLDER))
    try:
        spec = importlib.util.spec_from_file_location("hf_models_run", FOLDER / "run.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(FOLDER))
        for name in ("tasks", "report"):
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def test_hf_models_quick_run_writes_its_results(tmp_path: Path) -> None:
    run = _load_run()
    threads = torch.get_num_threads()
    try:
        assert run.main(["--quick", "--out", str(tmp_path)]) == 0
    finally:  # run.main sets process-wide state for its timings; later tests (hypothesis) need subnormals back
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["tasks"]) == {"gpt2-stdlib", "bert-stdlib-pkg"}
    assert {"torch", "threads", "machine", "date", "wall_seconds"} <= set(results["meta"])
    for task in results["tasks"].values():
        assert set(task["methods"]) == {"adamw", "kfac", "singd", "adafisherw"}
        assert task["target"] is not None  # AdamW's final validation metric
        for record in task["methods"].values():
            assert len(record["trials"]) == results["meta"]["trials"]  # the same tuning budget for every method
            assert record["chosen"] in [t["hp"] for t in record["trials"]]
            assert record["summary"]["median_ms"] > 0
        assert task["ablation"]["rows"][0]["label"] == "kfac (chosen)"
    gpt2 = results["tasks"]["gpt2-stdlib"]["methods"]["kfac"]["coverage"]
    assert "transformer.h.0.attn.c_attn" in gpt2 and "shared by" in gpt2  # Conv1D covered, tied weight one block
    assert results["tasks"]["bert-stdlib-pkg"]["majority_accuracy"] == pytest.approx(1 / 8)
    md = (tmp_path / "results.md").read_text()
    assert "| kfac |" in md and "Reading:" in md and "Ablation of K-FAC" in md
