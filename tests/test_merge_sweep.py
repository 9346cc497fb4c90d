"""`rlgen merge --sweep`: the weight grid, every point merged and evaluated, the Pareto front."""
import json

import pytest
import torch

from cli_helpers import rlgen, rlgen_ok
from rlgen.errors import RlgenError
from rlgen.api.merge_sweep import hypervolume_reference, objectives, simplex_grid
from rlgen.rewards.base import RewardSpec



def test_simplex_grid_two_models_goes_from_first_to_last():
    assert simplex_grid(2, 3) == [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]
    assert len(simplex_grid(2, 11)) == 11


def test_simplex_grid_three_models_covers_the_simplex():
    grid = simplex_grid(3, 3)
    assert len(grid) == 6  # C(2 + 2, 2)
    assert all(abs(sum(w) - 1.0) < 1e-12 for w in grid)
    assert set(grid) == {(1.0, 0.0, 0.0), (0.5, 0.5, 0.0), (0.5, 0.0, 0.5), (0.0, 1.0, 0.0), (0.0, 0.5, 0.5),
                         (0.0, 0.0, 1.0)}


def test_objectives_follow_the_sign_of_the_weight():
    specs = [RewardSpec.parse("exact-match"), RewardSpec.parse("length:-1")]
    assert objectives({"exact-match": 0.5, "length": 3.0}, specs) == [0.5, -3.0]


def test_hypervolume_reference_is_fixed_or_given():
    specs = [RewardSpec.parse("exact-match"), RewardSpec.parse("length:-1")]
    # the default: the worst end of a [0, 1] reward in each direction, the same for every sweep
    assert hypervolume_reference(specs) == ([0.0, 1.0], "default")
    assert hypervolume_reference(specs, "0.25, 40") == ([0.25, 40.0], "--hv-ref")
    assert hypervolume_reference(specs, [0, -3]) == ([0.0, -3.0], "--hv-ref")
    for given, message in (("0", "1 value"), ("0,1,2", "3 value"), ("a,b", "comma-separated numbers"),
                           ("0,nan", "finite")):
        with pytest.raises(RlgenError, match=message):
            hypervolume_reference(specs, given)


def fake_sweep_points(monkeypatch):
    """run_sweep with the merge and the evaluation replaced: each grid point's rewards are a function of
    its weights (w = the first model's weight), so the hypervolume can be worked out by hand."""
    import rlgen.merging.merge as merge_module
    import rlgen.api.merge_sweep as sweep_module

    table = {1.0: {"exact-match": 0.2, "length": 2.0}, 0.5: {"exact-match": 0.5, "length": 5.0},
             0.0: {"exact-match": 0.8, "length": 8.0}}
    monkeypatch.setattr(merge_module, "merge_models", lambda config, out, **_: None)
    monkeypatch.setattr(sweep_module, "merge_models", lambda config, out, **_: None)  # the name run_sweep calls
    monkeypatch.setattr(sweep_module, "_lm_evaluator",
                        lambda settings, rewards: lambda model_dir: table[float(model_dir.name.split("-")[0])])


@pytest.mark.parametrize("extra, reference, source, hv, outside", [
    # objectives (0.2, -2), (0.5, -5), (0.8, -8) above (0, -10): 0.8 * 2 + 0.5 * 3 + 0.2 * 3 = 3.7
    (["--hv-ref", "0,10"], [0.0, 10.0], "--hv-ref", 3.7, 0),
    # the sweep's own worst point (0.2, -8), the old reference, would give 0.3 * 3 = 0.9 and move with the sweep
    (["--hv-ref", "0.2,8"], [0.2, 8.0], "--hv-ref", 0.9, 2),
    # the default (0 for exact-match, 1 for a length to minimise): no length is below 1, nothing counts
    ([], [0.0, 1.0], "default", 0.0, 3),
])
def test_sweep_summary_states_a_fixed_hypervolume_reference(tmp_path, monkeypatch, extra, reference, source,
                                                            hv, outside):
    fake_sweep_points(monkeypatch)
    out = tmp_path / "sweep"
    result = rlgen_ok("merge", "tiny-arith", "tiny-arith", "--sweep", "--grid", 3, "--task", "arithmetic", "--reward",
                      "exact-match", "--reward", "length:-1", "--out", out, "--json", "--quiet", *extra)
    summary = json.loads(result.out)
    assert summary["front"] == [0, 1, 2]
    assert summary["hypervolume_reference"] == reference and summary["hypervolume_reference_source"] == source
    assert summary["hypervolume"] == pytest.approx(hv)
    assert summary["front_points_outside_reference"] == outside
    assert json.loads((out / "summary.json").read_text())["hypervolume_reference"] == reference


def test_hv_ref_goes_with_sweep(tmp_path):
    code, _, err = rlgen("merge", "tiny-arith", "tiny-arith", "--out", tmp_path / "m", "--hv-ref", "0,1")
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--hv-ref go with --sweep" in err, err
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def perturbed_copy(tmp_path_factory):
    """tiny-arith with every weight moved by noise: a second 'fine-tune' of the same architecture."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlgen.models.causal_lm import resolve_model_path

    base = resolve_model_path("tiny-arith")
    model = AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    out = tmp_path_factory.mktemp("perturbed")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.mark.slow
def test_sweep_end_to_end(tmp_path, perturbed_copy):
    out = tmp_path / "sweep"
    result = rlgen_ok("merge", "tiny-arith", str(perturbed_copy), "--sweep", "--grid", "3", "--method", "linear",
                      "--task", "arithmetic", "--limit", "12", "--reward", "exact-match",
                      "--reward", "length:-1", "--out", str(out), "--json", "--quiet")
    summary = json.loads(result.out)
    points = summary["points"]
    assert [p["weights"] for p in points] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    # The first point is tiny-arith itself: its accuracy is what `rlgen eval` reports on the same problems.
    direct = rlgen_ok("eval", "--model", "tiny-arith", "--task", "arithmetic", "--limit", "12", "--json",
                      "--quiet")
    assert points[0]["rewards"]["exact-match"] == pytest.approx(json.loads(direct.out)["accuracy"])
    # The front is exactly the non-dominated points of the oriented objectives.
    specs = [RewardSpec.parse("exact-match"), RewardSpec.parse("length:-1")]
    values = [objectives(p["rewards"], specs) for p in points]
    for i, point in enumerate(points):
        dominated = any(all(b >= a for a, b in zip(values[i], other)) and other != values[i] for other in values)
        assert point["on_front"] == (not dominated)
    assert (out / "front.png").stat().st_size > 1000
    assert len((out / "sweep.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in out.iterdir()) == ["front.png", "summary.json", "sweep.jsonl"]  # no leftovers


def test_sweep_keeps_the_merged_models_when_asked(tmp_path, perturbed_copy):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sweep"
    rlgen_ok("merge", "tiny-arith", str(perturbed_copy), "--sweep", "--grid", "2", "--task", "arithmetic",
             "--limit", "4", "--reward", "exact-match", "--keep-models", "--out", str(out), "--quiet")
    kept = sorted(p.name for p in (out / "models").iterdir())
    assert kept == ["0.00-1.00", "1.00-0.00"]
    merged = AutoModelForCausalLM.from_pretrained(out / "models" / "0.00-1.00")
    copy = AutoModelForCausalLM.from_pretrained(perturbed_copy)
    for (name, a), (_, b) in zip(merged.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a, b), name


def test_sweep_leaves_out_a_base_listed_among_the_models(tmp_path, perturbed_copy):
    """mergekit lists the base among `models`: the grid weighs only the fine-tunes, not the base too."""
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_method: task_arithmetic\nbase_model: tiny-arith\n"
                      f"models:\n  - model: tiny-arith\n  - model: {perturbed_copy}\n  - model: {perturbed_copy}\n")
    out = tmp_path / "sweep"
    result = rlgen_ok("merge", "--config", str(config), "--sweep", "--grid", "2", "--task", "arithmetic",
                      "--limit", "2", "--reward", "exact-match", "--out", str(out), "--json", "--quiet")
    summary = json.loads(result.out)
    assert [p["weights"] for p in summary["points"]] == [[1.0, 0.0], [0.0, 1.0]]
    assert summary["models"] == [str(perturbed_copy)] * 2


@pytest.mark.parametrize("args, message", [
    (["--task", "arithmetic"], "--reward"),
    (["--reward", "exact-match"], "--task"),
    (["--task", "arithmetic", "--reward", "exact-match", "--grid", "1"], "--grid"),
    (["--task", "arithmetic", "--reward", "exact-match", "--method", "frankenmerge"], "frankenmerge"),
    (["--task", "arithmetic", "--reward", "exact-match", "--method", "ties"], "base"),
    (["--task", "arithmetic", "--reward", "exact-match", "--reward", "length:-1", "--hv-ref", "0"], "--hv-ref has 1 value"),
    (["--task", "arithmetic", "--reward", "exact-match", "--hv-ref", "inf"], "--hv-ref values must be finite"),
])
def test_sweep_bad_input_is_one_line_and_leaves_nothing(tmp_path, args, message):
    out = tmp_path / "sweep"
    code, _, err = rlgen("merge", "tiny-arith", "tiny-arith", "--sweep", "--out", out, "--quiet", *args)
    err = err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("rlgen: error: ") and message in err, err
    assert not out.exists()


@pytest.mark.slow
def test_sweep_of_image_pipelines(tmp_path):
    """Two diffusers pipelines (tiny-digits and a perturbed copy): each point's image rewards at fixed seeds;
    the first point is tiny-digits itself, so it matches `rlgen eval` with the same sampler and seeds."""
    import shutil

    from safetensors.torch import load_file, save_file

    from rlgen.diffusion.pipeline import resolve_pipeline_path

    base = resolve_pipeline_path("tiny-digits")
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    generator = torch.Generator().manual_seed(0)
    tensors = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})

    out = tmp_path / "sweep"
    result = rlgen_ok("merge", "tiny-digits", str(copy), "--sweep", "--grid", "2", "--task", "digits",
                      "--limit", "2", "--images-per-prompt", "2", "--reward", "digit-classifier",
                      "--reward", "brightness:-1", "--out", str(out), "--json", "--quiet")
    points = json.loads(result.out)["points"]
    assert [p["weights"] for p in points] == [[1.0, 0.0], [0.0, 1.0]]
    assert points[0]["rewards"] != points[1]["rewards"]
    direct = rlgen_ok("eval", "--model", "tiny-digits", "--task", "digits", "--limit", "2", "-k", "2",
                      "--reward", "digit-classifier", "--json", "--quiet")
    assert points[0]["rewards"]["digit-classifier"] == pytest.approx(
        json.loads(direct.out)["rewards/digit-classifier/mean"], abs=1e-6)
    assert (out / "front.png").is_file()
