"""Pruning engine: masks, allocation, Wanda by hand, sequential propagation, components, checkpoint, CLI errors."""
import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from models import tiny_decoder
from owled_ros.data.calib import write_synthetic
from owled_ros.model.checkpoint import load_weights, save_weights
from owled_ros.model.sparse_kernels import is_two_four
from owled_ros.model.vision import load_backbone_weights
from owled_ros.model.vlm import DrivingVLM
from owled_ros.pruning.alps import alps_
from owled_ros.pruning.engine import DEFAULT_LAM, LAM_GRID, M_GRID, OneShot, PruneSpec, prunable, prune_model, removal_mask
from owled_ros.pruning.run import PruneError, prune
from owled_ros.pruning.sparsegpt import sparsegpt_
from owled_ros.pruning.sparsity import (heavy_tail_alpha, nm_mask, nm_selection, outlier_ratio, owl_allocation, row_mask,
                                        row_ranks, wanda_scores)


class ToyBlock(nn.Module):
    def __init__(self, width, normalise):
        super().__init__()
        self.fc = nn.Linear(width, width, bias=False)
        self.norm = nn.LayerNorm(width, elementwise_affine=False) if normalise else nn.Identity()

    def forward(self, x):
        return self.norm(self.fc(x))


class Toy(nn.Module):
    """Two blocks; the first ends in a LayerNorm, so only it sees the planted outlier features."""

    def __init__(self, width=32):
        super().__init__()
        self.blocks = nn.ModuleList([ToyBlock(width, True), ToyBlock(width, False)])

    def components(self):
        return {"llm": self.blocks}

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def run(model, x):
    return model(x)


@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.7])
def test_row_mask_removes_the_same_count_from_every_row(sparsity):
    scores = torch.rand(17, 96)
    mask = row_mask(scores, sparsity)
    assert (mask.sum(1) == int(96 * sparsity)).all()
    removed_max = torch.where(mask, scores, -1).max(1).values
    kept_min = torch.where(~mask, scores, 2).min(1).values
    assert (removed_max <= kept_min).all()  # lowest scores go


@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.7])
def test_row_ranks_below_k_remove_what_row_mask_removes(sparsity):
    scores = torch.rand(17, 96)
    assert torch.equal(row_ranks(scores) < int(96 * sparsity), row_mask(scores, sparsity))


def test_one_shot_trials_remove_what_the_pruner_would_and_restore_every_weight():
    torch.manual_seed(0)
    toy = Toy()
    dense = copy.deepcopy(toy.state_dict())
    norms = {"llm": [{"fc": torch.rand(32) + 0.1} for _ in toy.blocks]}
    one_shot = OneShot(toy.components(), norms, "wanda")
    for first in (0.25, 0.6):  # a second allocation reuses the ranks of the first
        with one_shot.pruned({"llm": [{"fc": (first, None)}, {"fc": (None, (2, 4))}]}):
            for i, (sparsity, nm) in enumerate([(first, None), (None, (2, 4))]):
                expected = removal_mask(dense[f"blocks.{i}.fc.weight"], norms["llm"][i]["fc"], sparsity, nm)
                assert torch.equal(toy.blocks[i].fc.weight == 0, expected)
        for name, weight in toy.state_dict().items():
            assert torch.equal(weight, dense[name]), name


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_keeps_n_of_every_m(n, m):
    mask = nm_mask(torch.rand(8, 64), n, m)
    assert ((~mask).reshape(8, -1, m).sum(2) == n).all()


def test_owl_allocation_band_is_two_lambda_with_exact_weighted_mean():
    rng = np.random.default_rng(0)
    for _ in range(50):
        ratios = rng.exponential(size=12)
        weights = rng.integers(1, 10, size=12)
        s = np.array(owl_allocation(ratios, 0.6, 0.08, weights)[0])
        assert s.max() - s.min() == pytest.approx(0.16)  # no shrinking of the band
        assert abs(np.average(s, weights=weights) - 0.6) < 1e-9
        assert np.all(np.diff(s[np.argsort(ratios)]) <= 1e-12)  # more outliers, lower sparsity


def test_owl_allocation_is_the_published_formula():
    # D' = (r - min) / (max - min) * 2 lambda = [0, 0, 0.16]; S_l = S - (D'_l - mean D')
    sparsities, mean = owl_allocation([0.2, 0.2, 1.4], 0.5, 0.08)
    assert sparsities == pytest.approx([0.5 + 0.16 / 3, 0.5 + 0.16 / 3, 0.5 - 0.32 / 3]) and mean == pytest.approx(0.5)
    assert owl_allocation([0.0, 0.5, 1.0], 0.5, 0.08)[0] == pytest.approx([0.58, 0.5, 0.42])


def test_owl_allocation_floor_keeps_the_mean():
    sparsities, _ = owl_allocation([0.0, 0.1, 0.2, 5.0], 0.05, 0.08)
    assert min(sparsities) >= 0 and np.mean(sparsities) == pytest.approx(0.05)


def test_outlier_ratio_counts_scores_above_m_times_mean():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 40.0])]
    assert outlier_ratio(scores, 3.0) == pytest.approx(1 / 10)


@pytest.mark.parametrize("kind", ["per-layer", "pooled"])
def test_planted_outlier_features_give_that_block_lower_sparsity(kind):
    torch.manual_seed(0)
    model = Toy()
    samples = [torch.randn(20, 32) for _ in range(16)]
    for x in samples:
        x[:, :2] *= 60  # planted outlier input features of block 0
    records = prune_model(model, samples, run, PruneSpec("wanda", "owl", {"llm": 0.5}, m_factor=5, outlier_ratio=kind), progress=False)
    assert records[0].outlier_ratio > records[1].outlier_ratio
    assert records[0].target < 0.5 < records[1].target
    assert (records[0].target + records[1].target) / 2 == pytest.approx(0.5)


def test_wanda_keeps_what_a_hand_computation_keeps():
    model = Toy(4)
    model.blocks = nn.ModuleList([ToyBlock(4, normalise=False)])
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
    model.blocks[0].fc.weight.data = weight.clone()
    x = torch.tensor([[4.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.5]])  # column norms 4, 1, 1, 0.5
    prune_model(model, [x], run, PruneSpec("wanda", "uniform", {"llm": 0.5}), progress=False)
    # scores |W| * norm: row 0 -> 4, 2, 3, 2 ; row 1 -> 16, 3, 2, 0.5 ; each row drops its two lowest
    expected = torch.tensor([[1.0, 0.0, 3.0, 0.0], [4.0, 3.0, 0.0, 0.0]])
    assert torch.equal(model.blocks[0].fc.weight.data, expected)
    magnitude = Toy(4)
    magnitude.blocks = nn.ModuleList([ToyBlock(4, normalise=False)])
    magnitude.blocks[0].fc.weight.data = weight.clone()
    prune_model(magnitude, None, run, PruneSpec("magnitude", "uniform", {"llm": 0.5}), progress=False)
    assert torch.equal(magnitude.blocks[0].fc.weight.data, torch.tensor([[0.0, 0.0, 3.0, -4.0], [4.0, 3.0, 0.0, 0.0]]))


def test_sequential_pruning_feeds_pruned_outputs_to_the_next_block():
    torch.manual_seed(1)
    model = Toy()
    samples = [torch.randn(10, 32) for _ in range(4)]
    dense_first = [model.blocks[0](x).detach() for x in samples]
    seen = []
    model.blocks[1].fc.register_forward_hook(lambda _, args, __: seen.append(args[0].detach()))
    prune_model(model, samples, run, PruneSpec("wanda", "uniform", {"llm": 0.5}), progress=False)
    pruned_first = [model.blocks[0](x).detach() for x in samples]
    stats_inputs = seen[:len(samples)]  # block 1's statistics pass
    assert all(torch.allclose(a, b) for a, b in zip(stats_inputs, pruned_first))
    assert not any(torch.allclose(a, b) for a, b in zip(stats_inputs, dense_first))


class TwoComponents(nn.Module):
    """An image side and a language model, one after the other, two blocks each."""

    def __init__(self, width=32):
        super().__init__()
        self.vision = nn.ModuleList([ToyBlock(width, True), ToyBlock(width, False)])
        self.llm = nn.ModuleList([ToyBlock(width, True), ToyBlock(width, False)])

    def components(self):
        return {"vision": self.vision, "llm": self.llm}

    def forward(self, x):
        for block in [*self.vision, *self.llm]:
            x = block(x)
        return x


def test_owl_reads_the_calibration_data_once_more_than_uniform_and_later_components_see_the_pruned_ones():
    torch.manual_seed(2)
    samples = [torch.randn(10, 32) for _ in range(4)]
    forwards = {}
    for allocation in ("uniform", "owl"):
        model = TwoComponents()
        calls = []
        counted = lambda m, x: calls.append(1) or m(x)
        seen = []
        model.llm[0].fc.register_forward_hook(lambda _, args, __: seen.append(args[0].detach()))
        prune_model(model, samples, counted, PruneSpec("wanda", allocation, {"vision": 0.5, "llm": 0.5}, m_factor=5,
                                                       lam=0.08), progress=False)
        forwards[allocation] = len(calls)
        pruned_vision = [model.vision[1](model.vision[0](x)).detach() for x in samples]
        statistics_inputs = seen[-2 * len(samples):-len(samples)]  # llm block 0's last two passes: statistics, outputs
        assert all(torch.allclose(a, b) for a, b in zip(statistics_inputs, pruned_vision)), allocation
    # a capture per component; OWL's outlier pass captures both, and the pruning pass reuses the first's
    assert forwards == {"uniform": 2 * len(samples), "owl": 3 * len(samples)}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    tiny_decoder().save_pretrained(root / "model")
    write_synthetic(root / "calib", 24, seed=5)
    (root / "text.txt").write_text(" ".join(f"The car number {i} waits at the red light near the crossing." for i in range(400)))
    return root


def layer_sparsities(model_dir, component):
    model = DrivingVLM.from_pretrained(model_dir)
    blocks = model.components()[component]
    return {f"{i}.{n}": m.weight for i, b in enumerate(blocks) for n, m in b.named_modules() if isinstance(m, nn.Linear)}


def test_component_targets_are_met_per_row_and_the_result_loads_and_answers(tiny_dirs):
    out = tiny_dirs / "wanda"
    report = prune(tiny_dirs / "model", out, "wanda", "llm=0.5,vision=0.25", tiny_dirs / "calib", nsamples=16,
                   progress=False)
    for component, target in (("llm", 0.5), ("vision", 0.25), ("vision.fusion", 0.25)):  # fusion: the vision group
        for name, weight in layer_sparsities(out, component).items():
            assert ((weight == 0).sum(1) >= int(weight.shape[1] * target)).all(), name
            assert (weight == 0).float().mean().item() == pytest.approx(target, abs=1 / weight.shape[1])
        assert report["achieved"][component] == pytest.approx(target, abs=0.02)
    model = DrivingVLM.from_pretrained(out)
    assert model.compression["method"] == "wanda"
    assert isinstance(model.answer([{"CAM_FRONT": np.zeros((64, 96, 3), np.uint8)}], ["What should I do?"], 4)[0], str)
    assert (out / "sparsity.png").stat().st_size > 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["calibration"]["kind"] == "driving" and len(saved["calibration"]["sha256"]) == 64
    assert {"seconds", "peak_rss_mb", "blocks", "allocation"} <= set(saved)


def nm_groups_kept(weight, m=4):
    return (weight != 0).reshape(weight.shape[0], -1, m).sum(2)


@pytest.mark.parametrize("method", ["owled", "owled-sparsegpt", "wanda"])
def test_two_four_holds_on_every_pruned_linear(tiny_dirs, method):
    out = tiny_dirs / f"nm-{method}"
    report = prune(tiny_dirs / "model", out, method, None, tiny_dirs / "calib", nm="2:4", nsamples=16, progress=False)
    assert report["achieved"]["llm"] == pytest.approx(0.5)
    assert all((w != 0).all() for w in layer_sparsities(out, "vision.fusion").values())  # LM target only
    for name, weight in layer_sparsities(out, "llm").items():
        assert (nm_groups_kept(weight) <= 2).all(), name


def test_two_four_below_half_keeps_the_most_outlier_heavy_layers_dense(tiny_dirs):
    out = tiny_dirs / "nm-partial"
    prune(tiny_dirs / "model", out, "owled", "0.3", tiny_dirs / "calib", nm="2:4", nsamples=16, progress=False)
    weights = layer_sparsities(out, "llm")
    patterned = {name for name, w in weights.items() if (w == 0).any()}
    for name, weight in weights.items():
        if name in patterned:
            assert (nm_groups_kept(weight) == 2).all(), name
    total = sum(w.numel() for w in weights.values())
    removed = sum(int((w == 0).sum()) for w in weights.values())
    largest = max(w.numel() for w in weights.values()) / 2
    assert 0.3 * total <= removed < 0.3 * total + largest  # the target, overshot by less than one layer
    assert 0 < len(patterned) < len(weights)
    assert {name for name, w in weights.items() if is_two_four(w)} == patterned  # what the CUDA kernels would take
    with pytest.raises(ValueError, match="needs the owl allocation"):
        prune(tiny_dirs / "model", tiny_dirs / "nm-x", "wanda", "0.3", tiny_dirs / "calib", nm="2:4", nsamples=16)
    with pytest.raises(ValueError, match="above what 2:4 removes"):
        prune(tiny_dirs / "model", tiny_dirs / "nm-x", "owled", "0.6", tiny_dirs / "calib", nm="2:4", nsamples=16)
    assert not (tiny_dirs / "nm-x").exists()


def test_open_m_and_lambda_are_chosen_by_calibration_loss_and_the_choice_prunes_as_if_fixed(tiny_dirs):
    searched = prune(tiny_dirs / "model", tiny_dirs / "searched", "owled", "0.6", tiny_dirs / "calib", nsamples=8,
                     progress=False)
    points = {(p["M"], p["lambda"]): p["calibration_loss"] for p in searched["allocation_search"]}
    chosen = searched["M"], searched["lambda"]
    # M first at OWL's default lambda, then lambda at the best M
    assert set(points) == {(m, DEFAULT_LAM) for m in M_GRID} | {(chosen[0], lam) for lam in LAM_GRID}
    assert chosen[0] == min(M_GRID, key=lambda m: points[m, DEFAULT_LAM])
    assert chosen[1] == min(LAM_GRID, key=lambda lam: points[chosen[0], lam])
    best = {"M": chosen[0], "lambda": chosen[1]}
    assert len(set(points.values())) > 1  # the points differ: each pruned its own way
    # every point's trial pruning was undone: the same choice given by hand prunes to the same weights
    fixed = prune(tiny_dirs / "model", tiny_dirs / "fixed", "owled", "0.6", tiny_dirs / "calib", nsamples=8,
                  progress=False, m_factor=best["M"], lam=best["lambda"])
    assert fixed["allocation_search"] is None
    assert [b["layers"] for b in fixed["blocks"]] == [b["layers"] for b in searched["blocks"]]
    searched_weights = DrivingVLM.from_pretrained(tiny_dirs / "searched").state_dict()
    for name, weight in DrivingVLM.from_pretrained(tiny_dirs / "fixed").state_dict().items():
        assert torch.equal(weight, searched_weights[name]), name
    alpha = prune(tiny_dirs / "model", tiny_dirs / "alpha-searched", "wanda", "0.5", tiny_dirs / "calib", nsamples=8,
                  progress=False, allocation="alpha")
    assert {(p["M"], p["lambda"]) for p in alpha["allocation_search"]} == {(None, lam) for lam in LAM_GRID}


def test_nm_selection_takes_fewest_outliers_first_until_the_target():
    layers = [("a", 100, 0.3), ("b", 300, 0.1), ("c", 200, 0.2), ("d", 400, 0.4)]  # (key, numel, rank)
    assert nm_selection(layers, 0.15, 2, 4) == {"b"}  # 150 of 1000 removed
    assert nm_selection(layers, 0.2, 2, 4) == {"b", "c"}  # 150 < 200 -> add c: 250
    assert nm_selection(layers, 0.5, 2, 4) == {"a", "b", "c", "d"}
    assert nm_selection(layers, 0.0, 2, 4) == set()


def correlated_inputs(tokens, features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features ** 0.5
    scale = torch.linspace(0.2, 3.0, features)[torch.randperm(features, generator=generator)]  # unsorted, as in LMs
    return (torch.randn(tokens, features, generator=generator) @ mixing + 0.3 * torch.randn(tokens, features, generator=generator)) * scale


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.7, None), (None, (2, 4))])
def test_sparsegpt_reconstructs_better_than_wanda_at_the_same_density(sparsity, nm):
    x = correlated_inputs(1024, 256)
    weight = torch.randn(64, 256)
    wanda = weight.clone()
    scores = wanda_scores(wanda, (x * x).sum(0))
    wanda[nm_mask(scores, *nm) if nm else row_mask(scores, sparsity)] = 0
    sparse = weight.clone()
    sparsegpt_(sparse, x.T @ x, sparsity, nm)
    assert (sparse == 0).float().mean().item() == pytest.approx((wanda == 0).float().mean().item(), abs=1e-3)
    if nm:
        assert (nm_groups_kept(sparse) <= 2).all()
    error = lambda w: torch.linalg.norm(x @ weight.T - x @ w.T).item()
    assert error(sparse) < 0.9 * error(wanda), (error(sparse), error(wanda))


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.7, None), (None, (2, 4))])
def test_alps_reconstructs_better_than_sparsegpt_at_the_same_density(sparsity, nm):
    x = correlated_inputs(1024, 256)
    weight = torch.randn(64, 256)
    reference, sparse = weight.clone(), weight.clone()
    sparsegpt_(reference, x.T @ x, sparsity, nm)
    alps_(sparse, x.T @ x, sparsity, nm)
    assert (sparse == 0).sum() == (reference == 0).sum()  # the same count removed (a whole layer's, not per row)
    if nm:
        assert (nm_groups_kept(sparse) <= 2).all()
    error = lambda w: torch.linalg.norm(x @ weight.T - x @ w.T).item()
    assert error(sparse) < 0.9 * error(reference), (error(sparse), error(reference))


def test_heavy_tail_alpha_is_lower_for_a_heavier_tailed_spectrum():
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(256, 256, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(256, 256, generator=generator))
    ranks = torch.arange(1, 257, dtype=torch.float32)
    spectrum = lambda exponent: u @ torch.diag(ranks ** -exponent) @ v.T  # eigenvalues of WᵀW ~ rank^-2e
    assert heavy_tail_alpha(spectrum(1.0)) < heavy_tail_alpha(spectrum(0.3))
    # Hill's estimate for eigenvalues ~ rank^-2: tail density ~ lambda^-1.5
    assert heavy_tail_alpha(spectrum(1.0)) == pytest.approx(1.5, abs=0.15)


def test_alpha_allocation_prunes_the_blocks_with_lighter_tails_more(tiny_dirs):
    out = tiny_dirs / "alpha"
    report = prune(tiny_dirs / "model", out, "wanda", "0.5", tiny_dirs / "calib", nsamples=8, progress=False,
                   allocation="alpha", lam=0.1)
    model = DrivingVLM.from_pretrained(tiny_dirs / "model")
    blocks = model.components()["llm"]
    alphas = [np.mean([heavy_tail_alpha(m.weight.detach()) for m in prunable(b).values()]) for b in blocks]
    targets = [b["target"] for b in report["blocks"] if b["component"] == "llm"]
    assert np.argsort(alphas).tolist() == np.argsort(targets).tolist()
    assert max(targets) - min(targets) == pytest.approx(0.2) and report["achieved"]["llm"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("reconstruct", [sparsegpt_, alps_])
def test_reconstructing_pruners_leave_never_active_inputs_pruned_and_the_rest_finite(reconstruct):
    x = correlated_inputs(256, 64)
    x[:, 5] = 0
    weight = torch.randn(16, 64)
    reconstruct(weight, x.T @ x, 0.5)
    assert (weight[:, 5] == 0).all() and torch.isfinite(weight).all()


def test_owl_uses_text_and_owled_needs_driving_data(tiny_dirs):
    report = prune(tiny_dirs / "model", tiny_dirs / "owl", "owl", "0.5", tiny_dirs / "text.txt", nsamples=8,
                   progress=False)
    assert report["calibration"]["kind"] == "text"
    assert report["allocation"]["llm"]["parameter_weighted_mean"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="driving data"):
        prune(tiny_dirs / "model", tiny_dirs / "x", "owled", "0.5", tiny_dirs / "text.txt", nsamples=8)
    assert not (tiny_dirs / "x").exists()


def test_sparse_checkpoint_is_smaller_and_bit_identical(tmp_path):
    weight = torch.randn(256, 256)
    weight[row_mask(weight.abs(), 0.5)] = 0
    weight[0, 0] = -0.0
    save_weights(tmp_path / "dense.safetensors", {"w": weight})
    save_weights(tmp_path / "sparse.safetensors", {"w": weight}, sparse_names={"w"})
    ratio = (tmp_path / "sparse.safetensors").stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio < 0.6
    loaded = load_weights(tmp_path / "sparse.safetensors")["w"]
    assert torch.equal(loaded.view(torch.int32), weight.view(torch.int32))


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.0"], "outside [0, 1)"),
    (["--sparsity", "-0.1"], "outside [0, 1)"),
    (["--nm", "4:4"], "0 < N < M"),
    (["--calib", "EMPTY"], "no samples"),
    (["--nsamples", "500"], "fewer than the 500 samples"),
    (["--model", "MISSING"], "model directory not found"),
    (["--calib", "NOPE"], "not found"),
])
def test_bad_input_gives_one_line_error_and_no_output(tiny_dirs, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    replace = {"EMPTY": str(tmp_path / "empty"), "MISSING": str(tmp_path / "missing"), "NOPE": str(tmp_path / "nope")}
    base = {"--model": str(tiny_dirs / "model"), "--calib": str(tiny_dirs / "calib"), "--nsamples": "8"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = replace.get(value, value)
    command = [sys.executable, "-m", "owled_ros.cli", "prune", "--out", str(tmp_path / "out")]
    command += [x for kv in base.items() for x in kv]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_peak_rss_of_a_prune_process_is_its_own_not_its_parents():
    ballast = bytearray(1_500 * 2**20)  # the parent's peak, which ru_maxrss would hand down to the child
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    child = subprocess.run([sys.executable, "-c", "from owled_ros.model.checkpoint import peak_rss_mb; print(peak_rss_mb())"],
                           capture_output=True, text=True, check=True)
    assert 0 < float(child.stdout) < 1_000


def driving_run(model, sample):
    return model([sample[0]], [sample[1]], [sample[2]])


@pytest.mark.parametrize("family", ["decoder", "t5"])
def test_block_reruns_see_their_own_keys_and_values_and_grow_no_cache(family, tmp_path):
    """The captured arguments must not carry the capture forward's KV cache: a re-run of a block would
    attend to the stale keys/values it holds instead of its own."""
    from owled_ros.pruning.engine import capture, run_block
    from models import tiny_t5

    model = tiny_decoder() if family == "decoder" else tiny_t5(tmp_path)
    frames = {"CAM_FRONT": np.full((64, 96, 3), 90, np.uint8)}
    samples = [(frames, "What should the ego vehicle do?", "Stop."), (frames, "Is the light red?", "Yes.")]
    component = "llm" if family == "decoder" else "llm.decoder"
    blocks = model.components()[component]
    inputs, calls = capture(model, blocks, samples, driving_run)
    block, (args, kwargs) = blocks[0], calls[0][0]
    first = run_block(block, inputs[0], args, kwargs)
    again = run_block(block, inputs[0], args, kwargs)
    assert torch.equal(first, again)
    attention = block.self_attn if family == "decoder" else block.layer[0].SelfAttention
    value = attention.v_proj if family == "decoder" else attention.v
    with torch.no_grad():
        value.weight.zero_()
    assert not torch.allclose(run_block(block, inputs[0], args, kwargs), first)
    assert not any(type(v).__name__.endswith("Cache") for v in list(args) + list(kwargs.values()))  # nothing to grow


class ConvBlock(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


def conv_toy(conv):
    model = Toy()
    model.blocks = nn.ModuleList([ConvBlock(conv)])
    return model


def test_wanda_scores_a_convolution_by_the_input_norm_at_each_kernel_position():
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False)
    samples = [torch.randn(2, 3, 9, 11) * torch.tensor([3.0, 1.0, 0.2]).view(1, 3, 1, 1) for _ in range(3)]
    weight = conv.weight.detach().clone()
    # by hand: the squared input seen by weight [o, c, i, j] over every output position, from the padded input
    out_h, out_w = conv(samples[0]).shape[2:]
    sq = torch.zeros(3, 3, 3)
    for x in samples:
        padded = nn.functional.pad(x, (1, 1, 1, 1))
        for i in range(3):
            for j in range(3):
                seen = padded[:, :, i:i + 2 * (out_h - 1) + 1:2, j:j + 2 * (out_w - 1) + 1:2]
                sq[:, i, j] += (seen ** 2).sum((0, 2, 3))
    scores = weight.abs() * sq.sqrt()[None]
    expected = weight.reshape(5, -1).clone()
    expected[row_mask(scores.reshape(5, -1), 0.5)] = 0
    model = conv_toy(conv)
    records = prune_model(model, samples, run, PruneSpec("wanda", "uniform", {"llm": 0.5}), progress=False)
    assert torch.equal(conv.weight.detach().reshape(5, -1), expected)
    assert records[0].layers["conv"] == (5 * int(27 * 0.5), 5 * 27)


def test_depthwise_convolutions_stay_dense():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    before = conv.weight.detach().clone()
    records = prune_model(conv_toy(conv), [torch.randn(1, 4, 6, 6)], run, PruneSpec("wanda", "uniform", {"llm": 0.5}),
                          progress=False)
    assert torch.equal(conv.weight, before) and records[0].layers == {}


@pytest.mark.parametrize("index", [0, 18])  # the 3x3 convolution on RGB, the last 1x1 convolution (320 -> 1280)
def test_sparsegpt_reconstructs_a_mobilenet_v2_convolution_better_than_wanda(index):
    from owled_ros.data.calib import read_samples
    from owled_ros.data.metadrive_world import DEMO_FRAMES
    from owled_ros.model.build import IMAGENET
    from owled_ros.model.vision import mobilenet_v2

    features, _ = mobilenet_v2()
    holder = nn.Module()
    holder.stem = features
    load_backbone_weights(holder)
    features.eval()
    mean, std = (torch.tensor(IMAGENET[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    frames = [torch.from_numpy(np.stack(list(s.images().values()))).permute(0, 3, 1, 2) / 255 for s in read_samples(DEMO_FRAMES)[:3]]
    with torch.no_grad():
        samples = [features[:index]((x - mean) / std) for x in frames]  # the block's real inputs
    errors = {}
    for pruner in ("wanda", "sparsegpt"):
        block = copy.deepcopy(features[index])
        prune_model(conv_toy(block), samples, run, PruneSpec(pruner, "uniform", {"llm": 0.5}), progress=False)
        conv = block[0]
        assert (conv.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
        with torch.no_grad():
            errors[pruner] = sum(torch.linalg.norm(features[index](x) - block(x)).item() for x in samples)
    assert errors["sparsegpt"] < 0.7 * errors["wanda"], errors


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_the_mobilenet_v2_encoder_is_pruned_layer_by_layer_and_reloads(tmp_path, method):
    from models import TINY_BACKBONE_VISION

    model = tiny_decoder(vision=TINY_BACKBONE_VISION)
    load_backbone_weights(model.vision)
    model.save_pretrained(tmp_path / "model")
    write_synthetic(tmp_path / "calib", 8, seed=5)
    dense = dict(model.named_modules())
    report = prune(tmp_path / "model", tmp_path / "out", method, "vision=0.5", tmp_path / "calib", nsamples=8,
                   progress=False)
    assert report["achieved"]["vision.encoder"] == pytest.approx(0.5, abs=0.01)
    pruned = DrivingVLM.from_pretrained(tmp_path / "out")
    convs = {n: m for n, m in pruned.vision.named_modules() if isinstance(m, nn.Conv2d) and not n.startswith("crops.")}
    assert len(convs) == 53  # MobileNetV2's 52 convolutions and the patch embedding
    for name, crop_weight in pruned.vision.crops.state_dict().items():  # the crops are no pruning target
        assert torch.equal(crop_weight, model.vision.crops.state_dict()[name]), name
    for name, conv in convs.items():
        rows = conv.weight.reshape(conv.out_channels, -1)
        if conv.groups > 1:
            assert torch.equal(conv.weight, dense[f"vision.{name}"].weight), name
        elif method == "wanda":  # per output row
            assert ((rows == 0).sum(1) == int(rows.shape[1] * 0.5)).all(), name
        else:  # per block of columns
            assert (rows == 0).float().mean().item() == pytest.approx(0.5, abs=0.02), name
    assert all((p != 0).all() for n, p in pruned.lm.named_parameters() if n.endswith("proj.weight"))  # vision only


def test_one_component_of_a_group_can_be_pruned_alone(tmp_path):
    model = tiny_decoder()
    model.save_pretrained(tmp_path / "model")
    write_synthetic(tmp_path / "calib", 8, seed=5)
    report = prune(tmp_path / "model", tmp_path / "out", "wanda", "vision.encoder=0.5", tmp_path / "calib", nsamples=8,
                   progress=False)
    assert set(report["achieved"]) == {"pruned_components", "whole_model", "vision.encoder"}
    assert report["achieved"]["vision.encoder"] == pytest.approx(0.5, abs=0.01)
    pruned = DrivingVLM.from_pretrained(tmp_path / "out")
    dense = model.state_dict()
    changed = {name for name, tensor in pruned.state_dict().items() if not torch.equal(tensor, dense[name])}
    encoder = {f"vision.{n}.weight" for n, m in model.vision.named_modules()
               if isinstance(m, nn.Conv2d) and (n.startswith("stem.") or n == "conv_proj")}
    assert changed == encoder  # the fusion unit and the language model untouched
    with pytest.raises(PruneError, match="vision.roof: not a component of tiny-decoder .*vision.encoder"):
        prune(tmp_path / "model", tmp_path / "out2", "wanda", "vision.roof=0.3", tmp_path / "calib", progress=False)
    with pytest.raises(PruneError, match="unknown component 'camera.front'"):
        prune(tmp_path / "model", tmp_path / "out2", "wanda", "camera.front=0.3", tmp_path / "calib", progress=False)


def test_frame_sets_without_answers_or_asked_to_calibrate_on_the_dense_models_own_answers(tiny_dirs, tmp_path):
    from owled_ros.data.bags import driving_questions
    from owled_ros.data.calib import ShardWriter, read_samples
    from owled_ros.pruning.calibration import dense_answers

    frame_sets = read_samples(tiny_dirs / "calib")[:4]
    writer = ShardWriter(tmp_path / "recorded", "car-0000")
    for s in frame_sets:
        writer.add(f"car-{s.id}", s.images(), qa=driving_questions())  # as the recorder writes them: no answers
    writer.close()
    model = DrivingVLM.from_pretrained(tiny_dirs / "model")
    question = "What should the ego vehicle do?"
    samples = [(s.images(), question, "") for s in frame_sets[:3]] + [(frame_sets[3].images(), question, "Stop.")]
    filled, count = dense_answers(model, list(samples), batch=2)
    assert count == 3 and filled[3] == samples[3]
    assert [answer for *_, answer in filled[:3]] == model.answer([s[0] for s in samples[:3]], [question] * 3)
    report = prune(tiny_dirs / "model", tmp_path / "out", "wanda", "0.5", tmp_path / "recorded", nsamples=4, progress=False)
    assert report["calibration"]["dense_model_answers"] == 4
    # --answers dense: every answer the dense model's, reference answers included
    replaced, count = dense_answers(model, list(samples), replace_all=True, batch=2)
    assert count == 4 and replaced[3][2] == model.answer([samples[3][0]], [question])[0] != "Stop."
    report = prune(tiny_dirs / "model", tmp_path / "self", "wanda", "0.5", tiny_dirs / "calib", nsamples=4,
                   progress=False, answers="dense")
    assert report["calibration"]["answers"] == "dense" and report["calibration"]["dense_model_answers"] == 4
    with pytest.raises(PruneError, match="--answers dense needs driving calibration"):
        prune(tiny_dirs / "model", tmp_path / "text", "wanda", "0.5", tiny_dirs / "text.txt", nsamples=4, answers="dense")
    assert not (tmp_path / "text").exists()


def test_questions_take_each_frame_set_again_with_its_next_question(tiny_dirs, tmp_path):
    from owled_ros.data.calib import read_samples
    from owled_ros.pruning.calibration import driving_samples

    write_synthetic(tmp_path / "calib", 4, seed=5)
    frame_sets = read_samples(tmp_path / "calib")  # 6 questions each

    def sources(triples):
        """(frame set id, question) of each triple, its answer checked against that frame set's."""
        found = []
        for images, question, answer in triples:
            source = next(s for s in frame_sets if all((s.images()[view] == images[view]).all() for view in images))
            assert (question, answer) in [(p["question"], p["answer"]) for p in source.qa]
            found.append((source.id, question))
        return found

    one = sources(driving_samples(tmp_path / "calib", 3)[0])
    three = sources(driving_samples(tmp_path / "calib", 3, questions=3)[0])
    assert three[:3] == one and len(three) == 9  # the first turn as before, then each set's next question
    assert [i for i, _ in three] == [i for i, _ in one] * 3 and len(set(three)) == 9  # never a question twice
    assert len(set(sources(driving_samples(tmp_path / "calib", 4, questions=10)[0]))) == 24  # all a set has
    report = prune(tiny_dirs / "model", tmp_path / "out", "wanda", "0.5", tiny_dirs / "calib", nsamples=4, questions=2,
                   progress=False)
    assert report["calibration"]["nsamples"] == 8 and report["calibration"]["questions"] == 2
    with pytest.raises(PruneError, match="--questions 2 needs driving calibration"):
        prune(tiny_dirs / "model", tmp_path / "text", "wanda", "0.5", tiny_dirs / "text.txt", nsamples=4, questions=2)
    assert not (tmp_path / "text").exists()
