"""Mixed precision's math (compress_export/math/allocate.py) against independent facts: the optimum found by trying
every combination, the budget in bytes, and the weighted error against what it stands for, measured directly: with a
per-input weighting on inputs whose columns are orthogonal, the output error; with the Fisher weighting on one-hot
inputs, the sum of squared first-order loss changes, token by token."""

import itertools
import random

import pytest
import torch

from compress_export.core.errors import UserError
from compress_export.core.scheme import Scheme
from compress_export.math.allocate import Candidate, allocate, fisher_diagonal, weighted_error
from compress_export.math.quant import rtn_quantize


def _random_entries(rng: random.Random, k: int, c: int, scale: int):
    """k entries of c candidates: more bytes buy less error (as more bits do), with random steps."""
    entries = []
    for _ in range(k):
        sizes = sorted(rng.randint(1, 20) * scale for _ in range(c))
        errors = sorted((rng.random() * 10 for _ in range(c)), reverse=True)
        entries.append([Candidate(s, e) for s, e in zip(sizes, errors)])
    return entries


def _brute_force(entries, budget):
    """The least total error over every combination whose bytes fit the budget."""
    best = None
    for combo in itertools.product(*(range(len(c)) for c in entries)):
        nbytes = sum(entries[k][j].nbytes for k, j in enumerate(combo))
        err = sum(entries[k][j].error for k, j in enumerate(combo))
        if nbytes <= budget and (best is None or err < best):
            best = err
    return best


def _total(entries, choice, what):
    return sum(getattr(entries[k][j], what) for k, j in enumerate(choice))


@pytest.mark.parametrize("seed", range(40))
def test_allocation_is_the_optimum_of_every_combination_when_sizes_are_whole_steps(seed):
    rng = random.Random(seed)
    entries = _random_entries(rng, k=5, c=3, scale=1)
    smallest = sum(min(c.nbytes for c in cands) for cands in entries)
    budget = rng.randint(smallest, smallest + 40)
    choice = allocate(entries, budget)  # budget ≤ DEFAULT_UNITS: one byte a step, no rounding
    assert _total(entries, choice, "nbytes") <= budget
    assert _total(entries, choice, "error") == pytest.approx(_brute_force(entries, budget), abs=1e-9)


@pytest.mark.parametrize("seed", range(20))
def test_the_budget_in_bytes_always_holds_and_rounding_costs_at_most_a_step_an_entry(seed):
    """Sizes of real tensors (tens of kB) against a budget cut into 64 steps: the choice never exceeds the budget,
    and it is at least as good as the best combination fitting in the budget less one step per entry."""
    rng = random.Random(seed)
    entries = _random_entries(rng, k=6, c=3, scale=4099)
    smallest = sum(min(c.nbytes for c in cands) for cands in entries)
    budget = rng.randint(smallest, smallest + 60 * 4099)
    units = 64
    choice = allocate(entries, budget, units=units)
    assert _total(entries, choice, "nbytes") <= budget
    step = -(-budget // units)
    reference = _brute_force(entries, budget - len(entries) * step)
    if reference is not None:
        assert _total(entries, choice, "error") <= reference + 1e-9


def test_a_budget_below_the_smallest_choice_is_refused_with_the_sizes():
    entries = [[Candidate(3_000_000, 1.0), Candidate(5_000_000, 0.5)]] * 2
    with pytest.raises(UserError, match="6.0 MB"):
        allocate(entries, 5_000_000)


def test_a_generous_budget_buys_the_least_error_and_a_tight_one_the_smallest():
    entries = [[Candidate(1, 4.0), Candidate(2, 1.0), Candidate(4, 0.0)]] * 3
    assert allocate(entries, 12) == [2, 2, 2]
    assert allocate(entries, 3) == [0, 0, 0]
    assert allocate(entries, 100) == [2, 2, 2]  # no size is bought for nothing: equal error, fewer bytes
    assert allocate([[Candidate(1, 1.0), Candidate(5, 1.0)]], 10) == [0]


def test_a_column_weighting_gives_the_output_error_on_inputs_with_orthogonal_columns():
    """With XᵀX diagonal the diagonal weighting is exact: weighted_error equals ‖X Wᵀ − X Ŵᵀ‖²/n, measured."""
    torch.manual_seed(0)
    n, d_in, d_out = 256, 64, 32
    q, _ = torch.linalg.qr(torch.randn(n, d_in, dtype=torch.float64))
    X = q * torch.linspace(0.5, 8.0, d_in, dtype=torch.float64) * n**0.5  # orthogonal columns of growing norm
    W = torch.randn(d_out, d_in)
    h = (X * X).mean(0)
    for scheme in (Scheme(3, 32, True), Scheme(4, 32, True), Scheme(8, 64, False)):
        What = rtn_quantize(W, scheme).dequantize().double()
        measured = (X @ (W.double() - What).t()).pow(2).sum().item() / n
        assert weighted_error(W, h.float(), scheme) == pytest.approx(measured, rel=1e-4)


def test_more_bits_cost_less_weighted_error_and_a_column_no_token_fires_costs_nothing():
    torch.manual_seed(1)
    W = torch.randn(48, 128)
    h = torch.rand(128) + 0.1
    errs = [weighted_error(W, h, Scheme(b, 64, True)) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 100
    dead = h.clone()
    dead[:64] = 0  # the first group's columns: no calibration token fires them
    W2 = W.clone()
    W2[:, :64] = torch.randn(48, 64) * 100  # anything there, however badly rounded, costs nothing
    assert weighted_error(W2, dead, Scheme(4, 64, True)) == pytest.approx(weighted_error(W, dead, Scheme(4, 64, True)))
    with pytest.raises(ValueError, match=r"shape \[64\], the weight \[48, 128\]"):
        weighted_error(W, h[:64], Scheme(4, 64, True))


def test_the_fisher_weighting_is_the_sum_of_squared_first_order_loss_changes_on_one_hot_inputs():
    """F = fisher_diagonal(x, g); with one input column live per token, Σ F ⊙ ΔW² equals Σ_t Σ_o (g_to · δy_to)²,
    δy = ΔW x_t the output change rounding makes: measured directly, token by token."""
    torch.manual_seed(2)
    n, d_in, d_out = 200, 64, 16
    cols = torch.randint(0, d_in, (n,))
    X = torch.zeros(n, d_in, dtype=torch.float64)
    X[torch.arange(n), cols] = torch.randn(n, dtype=torch.float64) * 3
    G = torch.randn(n, d_out, dtype=torch.float64)  # the loss gradient at the outputs, per token
    W = torch.randn(d_out, d_in)
    F = fisher_diagonal(X.reshape(4, 50, d_in), G.reshape(4, 50, d_out))  # any leading shape: tokens
    assert F.shape == (d_out, d_in)
    for scheme in (Scheme(3, 32, True), Scheme(4, 64, False)):
        dW = W.double() - rtn_quantize(W, scheme).dequantize().double()
        measured = (G * (X @ dW.t())).pow(2).sum().item()
        assert weighted_error(W, F, scheme) == pytest.approx(measured, rel=1e-4)
