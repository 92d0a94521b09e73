"""bench.py end to end at toy settings on the CPU: every figure is there and positive.
No timing thresholds: the test machine is shared and noisy; real figures come from a quiet run."""
import json
import math
import tempfile

import pytest
import torch

import bench

TINY = ["--device", "cpu", "--size", "32", "--batch", "2", "--steps", "1", "--warmup", "0", "--images", "4",
        "--cache-images", "12", "--workers", "0", "--peak-seconds", "0.05"]
PER_MODEL = ("model_img_s", "loop_img_s", "naive_img_s", "loop_reported_img_s", "b_over_a", "b_over_c",
             "flops_per_img", "model_flop_s", "loop_flop_s", "model_peak_share", "loop_peak_share")
CACHE = ("cache_peak_rss_bytes", "cache_peak_rss_10k_bytes", "cache_array_10k_bytes", "cache_build_s",
         "cache_hit_s", "cache_hit_ratio", "loop_preprocess_s", "loop_cache_hit_s", "startup_ratio")


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared, busy machine, spinning OpenMP threads slow a toy run 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bench_writes_every_figure(tmp_path, one_thread):
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    returned = bench.main(TINY + ["--work", str(work), "--json", str(out)], log=lambda *a: None)
    saved = json.loads(out.read_text())
    assert saved["size"] == 32 and saved["batch"] == 2
    assert positive(saved["peak_flops"]) and positive(saved["jpeg_mean_bytes"])
    for key in CACHE:
        assert positive(saved[key]), key
    assert saved["cache_images"] == 12 and saved["cache_extrapolated"] is True
    assert saved["cache_array_10k_bytes"] == 3 * 224 * 224 * 10_000
    for model in ("classifier", "unet"):
        for key in PER_MODEL:
            assert positive(saved[model][key]), (model, key)
    assert saved["unet"]["flops_per_img"] > saved["classifier"]["flops_per_img"]   # full-size decoder
    assert saved["classifier"] == pytest.approx(returned["classifier"])
    assert len(list((work / "train" / "data").glob("*/*.jpg"))) == 4                # a given --work is kept
    assert not (work / "cache_mem").exists()                                         # the big cache is not


def test_work_folder_given_kept_temporary_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with bench.work_folder(None, keep=False) as work:
        (work / "x.jpg").write_bytes(b"x")
    assert not work.exists()
    with bench.work_folder(None, keep=True) as work:
        pass
    assert work.exists()
    with bench.work_folder(tmp_path / "mine", keep=False) as work:
        (work / "x.jpg").write_bytes(b"x")
    assert (tmp_path / "mine" / "x.jpg").exists()


@pytest.mark.parametrize("argv", [["--size", "48"], ["--models", "vit"], ["--images", "8", "--batch", "8"],
                                  ["--cache-images", "-1"]])
def test_bad_flags_are_refused(argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
