"""Precision "auto": measured where the CPU has native bf16, fp32 where it has not; bf16 results
agree with fp32 (checked where bf16 runs natively)."""
import time

import pytest
import torch

import occface.precision as precision
from occface.scoring import extract_features
from occface.models import ModelConfig, OccFaceModel
from occface.models.qaconv import QAConv

NATIVE = precision.cpu_bf16_support()[0]
needs_native_bf16 = pytest.mark.skipif(not NATIVE, reason=f"this CPU has no native bf16 ({precision.cpu_bf16_support()[1]}): "
                                                          "bf16 would be emulated, hundreds of times slower")


@pytest.fixture(autouse=True)
def fresh_measurements(monkeypatch):
    monkeypatch.setattr(precision, "_measured", {})
    monkeypatch.delenv("OCCFACE_PRECISION", raising=False)


def test_auto_is_fp32_without_native_bf16_and_measures_nothing(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (False, "no avx512_bf16 or amx_bf16 CPU flag"))
    never = lambda: pytest.fail("nothing is timed on a CPU without native bf16")  # noqa: E731
    assert precision.resolve_precision("auto", key="k", fp32_run=never, bf16_run=never) == "fp32"
    assert precision.resolve_precision("auto", "cuda") == "bf16"
    assert precision.resolve_precision("fp32") == "fp32" and precision.resolve_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="bf16 on this CPU would be emulated"):
        precision.check_cpu_bf16(torch.bfloat16, "cpu", "extract_features")


@pytest.mark.parametrize("fp32_seconds, bf16_seconds, expected", [(0.02, 0.005, "bf16"), (0.005, 0.02, "fp32"),
                                                                   (0.01, 0.0095, "fp32")])
def test_auto_picks_what_measures_faster_on_a_native_cpu(monkeypatch, fp32_seconds, bf16_seconds, expected):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (True, "CPU flags avx512_bf16"))
    calls = []

    def work(seconds):
        return lambda: (calls.append(seconds), time.sleep(seconds))

    assert precision.resolve_precision("auto", key="work", fp32_run=work(fp32_seconds), bf16_run=work(bf16_seconds)) == expected
    counted = len(calls)
    # Measured once per key and process.
    assert precision.resolve_precision("auto", key="work", fp32_run=work(1.0), bf16_run=work(1.0)) == expected
    assert len(calls) == counted
    assert precision.measured_speedups()["work"] == pytest.approx(fp32_seconds / bf16_seconds, rel=0.5)
    assert "work: bf16 " in precision.describe_precision("auto")


def test_a_measurement_is_kept_for_the_machine_and_read_by_later_processes(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (True, "CPU flags avx512_bf16"))
    monkeypatch.setenv("OCCFACE_HOME", str(tmp_path))
    slow, fast = (lambda: time.sleep(0.02)), (lambda: time.sleep(0.005))
    assert precision.resolve_precision("auto", key=("network", 64), fp32_run=slow, bf16_run=fast) == "bf16"
    stored = (tmp_path / "precision.json").read_text()
    assert precision.machine_id() in stored and "('network', 64)" in stored
    # A new process (no measurements in memory) reads it instead of measuring again ...
    monkeypatch.setattr(precision, "_measured", {})
    never = lambda: pytest.fail("measured again although the machine's result is kept")  # noqa: E731
    assert precision.resolve_precision("auto", key=("network", 64), fp32_run=never, bf16_run=never) == "bf16"
    # ... unless asked to measure anew.
    monkeypatch.setattr(precision, "_measured", {})
    monkeypatch.setenv("OCCFACE_PRECISION_REMEASURE", "1")
    assert precision.resolve_precision("auto", key=("network", 64), fp32_run=fast, bf16_run=slow) == "fp32"


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("OCCFACE_PRECISION", "fp32")
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (True, "CPU flags avx512_bf16"))
    assert precision.resolve_precision("auto") == "fp32"
    monkeypatch.setenv("OCCFACE_PRECISION", "fp64")
    with pytest.raises(ValueError, match="OCCFACE_PRECISION must be one of"):
        precision.resolve_precision("auto")


@needs_native_bf16
@pytest.mark.parametrize("channels, side", [(512, 7), (128, 14)])
def test_qaconv_scores_in_bf16_agree_with_fp32(channels, side):
    torch.manual_seed(0)
    matcher = QAConv(channels, side, side).eval()
    with torch.no_grad():
        for parameter in matcher.parameters():
            parameter.normal_(0, 0.1)
    maps, occ = torch.randn(40, channels, side, side), torch.rand(40, 1, side, side)
    exact = matcher.score_all(maps[:20], maps[20:], occ[:20], occ[20:])
    fast = matcher.score_all(maps[:20], maps[20:], occ[:20], occ[20:], dtype=torch.bfloat16)
    pairs = matcher.score_pairs(maps[:20], maps[20:], occ[:20], occ[20:], dtype=torch.bfloat16)
    assert fast.dtype == torch.float32 and pairs.dtype == torch.float32
    # Within 1% of the spread of the scores: bf16 keeps 8 bits of mantissa in each correlation, and
    # the maxima and the head are fp32.
    assert (fast - exact).abs().max() < 0.01 * exact.std()
    assert (pairs - exact.diagonal()).abs().max() < 0.01 * exact.std()


@needs_native_bf16
def test_features_in_bf16_agree_with_fp32():
    from occface.data import ProceduralFaceDataset, ProceduralFaces

    torch.manual_seed(0)
    model = OccFaceModel(ModelConfig(arch="mobilefacenet", feature_level="block3")).eval()
    model.backbone.apply(lambda m: m.reset_running_stats() if isinstance(m, torch.nn.BatchNorm2d) else None)
    dataset = ProceduralFaceDataset(ProceduralFaces(2, 4, seed=0), input_size=112)
    exact = extract_features(model, dataset, batch_size=8, precision="fp32")
    fast = extract_features(model, dataset, batch_size=8, precision="bf16")
    assert fast.embedding.dtype == torch.float32 and fast.feature_map.dtype == torch.float32
    assert torch.allclose(fast.embedding.norm(dim=1), torch.ones(8), atol=1e-5)  # normalised in fp32
    cosine = (fast.embedding * exact.embedding).sum(1)
    assert cosine.min() > 0.99, cosine
    assert (fast.occlusion - exact.occlusion).abs().max() < 0.05
