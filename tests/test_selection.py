"""Selection of chunk centres (docs/campaign.md, "The loop"): threshold, fraction, separation, exclusion, order, limit."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from pipeline.science.examples import rattled_cuboctahedron
from pipeline.science.selection import candidate_pool, farthest_point_reports, select_chunk_centers, selection_report

pytestmark = pytest.mark.timeout(60)


def _line(n_atoms: int, spacing: float = 10.0) -> Atoms:
    """Atoms far apart on a line, so separation never matters unless a test wants it to."""
    return Atoms(f"Pt{n_atoms}", positions=[[spacing * i, 0.0, 0.0] for i in range(n_atoms)])


def test_threshold_picks_atoms_above_it_most_uncertain_first():
    delta = np.array([0.05, 0.4, 0.1, 0.9, 0.2, 0.1000001])
    picked = select_chunk_centers(delta, _line(6), threshold=0.1, max_count=10, min_separation_angstrom=6.5)
    assert picked == [3, 1, 4, 5]  # 0.1 itself is not above the threshold
    assert all(type(i) is int for i in picked)


def test_nothing_above_threshold_selects_nothing():
    assert select_chunk_centers(np.full(4, 0.05), _line(4), 0.1, 10, 6.5) == []


def test_equal_uncertainties_are_taken_in_index_order():
    delta = np.array([0.3, 0.5, 0.3, 0.5, 0.3])
    assert select_chunk_centers(delta, _line(5), 0.1, 10, 0.0) == [1, 3, 0, 2, 4]


def test_at_most_max_count():
    delta = np.linspace(1.0, 2.0, 8)
    assert select_chunk_centers(delta, _line(8), 0.1, 3, 6.5) == [7, 6, 5]


def test_fraction_takes_that_share_of_the_most_uncertain_atoms():
    cluster = rattled_cuboctahedron()
    delta = np.random.default_rng(0).uniform(0.0, 1.0, len(cluster))
    picked = select_chunk_centers(delta, cluster, None, 1000, 0.0, select_fraction=0.1)
    assert picked == np.argsort(-delta)[:26].tolist()


def test_fraction_replaces_the_threshold_and_picks_at_least_one():
    delta = np.array([0.01, 0.03, 0.02])
    assert select_chunk_centers(delta, _line(3), 0.1, 10, 6.5, select_fraction=0.01) == [1]
    assert select_chunk_centers(delta, _line(3), 0.1, 10, 6.5, select_fraction=1.0) == [1, 2, 0]


def test_close_atoms_are_skipped_in_favour_of_the_more_uncertain():
    atoms = Atoms("Pt4", positions=[[0, 0, 0], [2.8, 0, 0], [20, 0, 0], [26, 0, 0]])
    delta = np.array([0.5, 0.9, 0.8, 0.7])
    # 0 lies 2.8 Å from 1 (picked first); 3 lies 6 Å from 2: both closer than 6.5 Å.
    assert select_chunk_centers(delta, atoms, 0.1, 10, 6.5) == [1, 2]
    assert select_chunk_centers(delta, atoms, 0.1, 10, 5.0) == [1, 2, 3]
    assert select_chunk_centers(delta, atoms, 0.1, 10, 0.0) == [1, 2, 3, 0]


def test_separation_uses_the_minimum_image_across_the_cell_boundary():
    positions = [[0.5, 5.0, 5.0], [9.5, 5.0, 5.0]]  # 9 Å apart directly, 1 Å through the x face
    periodic = Atoms("Pt2", positions=positions, cell=[10.0, 10.0, 10.0], pbc=True)
    isolated = Atoms("Pt2", positions=positions)
    delta = np.array([0.9, 0.8])
    assert select_chunk_centers(delta, periodic, 0.1, 10, 6.5) == [0]
    assert select_chunk_centers(delta, isolated, 0.1, 10, 6.5) == [0, 1]


def test_separation_in_a_triclinic_cell():
    parent = bulk("Pt", "fcc", a=3.92).repeat((3, 3, 3))  # 60° cell angles, 8.3 Å edges, 27 atoms
    parent.positions += np.random.default_rng(5).normal(0.0, 0.05, size=parent.positions.shape)
    delta = np.random.default_rng(6).uniform(0.2, 1.0, len(parent))
    shifts = np.array(np.meshgrid(*[np.arange(-2, 3)] * 3, indexing="ij")).reshape(3, -1).T @ parent.cell.array

    def nearest_image(first: int, second: int) -> float:
        return float(np.linalg.norm(parent.positions[second] + shifts - parent.positions[first], axis=1).min())

    expected: list[int] = []
    for index in np.argsort(-delta):
        if all(nearest_image(int(index), other) >= 4.5 for other in expected):
            expected.append(int(index))
    picked = select_chunk_centers(delta, parent, 0.1, 100, 4.5)
    assert picked == expected
    # Without periodic images the same atoms lie up to 16 Å apart and far more would be picked.
    assert len(picked) < len(select_chunk_centers(delta, Atoms(parent.numbers, parent.positions), 0.1, 100, 4.5))


def test_excluded_atoms_are_skipped_and_do_not_block_neighbours():
    atoms = Atoms("Pt3", positions=[[0, 0, 0], [2.8, 0, 0], [30, 0, 0]])
    delta = np.array([0.5, 0.9, 0.3])
    # Atom 1's chunk is already stored: skip it; atom 0 (2.8 Å away) is now free to be picked.
    assert select_chunk_centers(delta, atoms, 0.1, 10, 6.5, exclude=[1]) == [0, 2]
    assert select_chunk_centers(delta, atoms, 0.1, 10, 6.5, exclude=np.array([1, 0])) == [2]


def test_exclusion_applies_within_the_fraction():
    delta = np.array([0.9, 0.8, 0.7, 0.6])
    assert select_chunk_centers(delta, _line(4), None, 10, 6.5, exclude=[0], select_fraction=0.5) == [1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"uncertainties": np.zeros(3)}, "shape"),
        ({"uncertainties": np.array([0.1, np.nan, 0.2, 0.3])}, "finite"),
        ({"threshold": None}, "threshold or select_fraction"),
        ({"threshold": -0.1}, "threshold"),
        ({"select_fraction": 0.0}, "select_fraction"),
        ({"select_fraction": 1.5}, "select_fraction"),
        ({"max_count": 0}, "max_count"),
        ({"max_count": 2.5}, "max_count"),
        ({"min_separation_angstrom": -1.0}, "min_separation"),
        ({"exclude": [4]}, "out of range"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs, message):
    arguments = {
        "uncertainties": np.array([0.1, 0.2, 0.3, 0.4]),
        "atoms": _line(4),
        "threshold": 0.1,
        "max_count": 10,
        "min_separation_angstrom": 6.5,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        select_chunk_centers(**arguments)


# -- the selection report: why selectable atoms were not picked -----------------------------------


def test_the_report_counts_every_skip_reason_exactly():
    x = [0, 2, 20, 40, 60, 62, 80, 83, 100, 21, 22]  # Å along a line
    atoms = Atoms("Pt11", positions=[[value, 0.0, 0.0] for value in x])
    delta = np.array([0.9, 0.8, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.05, 0.35])
    report = selection_report(delta, atoms, 0.1, 2, 5.0, exclude=[2, 3], failed=[3])
    # δ > 0.1: atoms 0-8 and 10 (atom 9 is below the threshold). Greedy, most uncertain first:
    # 0 free (picked), 1 2 Å from 0 (too close), 2 chunked, 3 chunked with a failed job, 4 free
    # (picked), 5 2 Å from 4 (too close), 6 free (over the limit), 7 3 Å from 6 (too close: 6 would be
    # picked with a larger limit), 8 free (over), 10 free (over: chunked atom 2 blocks no neighbour).
    assert report.picked == [0, 4]
    assert report.counts() == {
        "selectable": 10,
        "selected": 2,
        "already_chunked": 1,
        "reference_failed": 1,
        "too_close": 3,
        "over_limit": 3,
    }
    assert select_chunk_centers(delta, atoms, 0.1, 2, 5.0, exclude=[2, 3]) == [0, 4]
    unlimited = selection_report(delta, atoms, 0.1, 100, 5.0, exclude=[2, 3], failed=[3])
    assert unlimited.picked == [0, 4, 6, 8, 10] and unlimited.over_limit == 0 and unlimited.too_close == 3


def test_the_report_by_fraction_counts_only_the_fraction():
    delta = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    report = selection_report(delta, _line(10), None, 2, 6.5, exclude=[1], select_fraction=0.5)
    assert report.picked == [0, 2]
    assert report.counts() == {
        "selectable": 5,
        "selected": 2,
        "already_chunked": 1,
        "reference_failed": 0,
        "too_close": 0,
        "over_limit": 2,
    }


@pytest.mark.parametrize("max_count", [1, 3, 10, 1000])
def test_the_report_picks_what_select_chunk_centers_picks_and_accounts_for_every_atom(max_count):
    cluster = rattled_cuboctahedron()
    delta = np.random.default_rng(1).uniform(0.0, 1.0, len(cluster))
    exclude = np.random.default_rng(2).choice(len(cluster), 30, replace=False)
    report = selection_report(delta, cluster, 0.3, max_count, 4.0, exclude=exclude, failed=exclude[:7])
    assert report.picked == select_chunk_centers(delta, cluster, 0.3, max_count, 4.0, exclude=exclude)
    counts = report.counts()
    assert counts["selectable"] == int(np.sum(delta > 0.3))
    assert (
        counts["selected"] + sum(counts[key] for key in ("already_chunked", "reference_failed", "too_close", "over_limit"))
        == counts["selectable"]
    )
    assert counts["reference_failed"] == int(np.sum(delta[exclude[:7]] > 0.3))
    assert counts["already_chunked"] == int(np.sum(delta[exclude[7:]] > 0.3))
    free = selection_report(delta, cluster, 0.3, 10_000, 4.0, exclude=exclude).picked
    assert free[:max_count] == report.picked and len(free) - len(report.picked) == counts["over_limit"]


def test_a_ranking_orders_the_picks_and_the_fraction_while_the_threshold_stays_on_delta():
    delta = np.array([0.9, 0.5, 0.05, 0.7])
    energy_spread = np.array([0.01, 0.03, 0.09, 0.02])  # atom 2 is below the force threshold
    report = selection_report(delta, _line(4), 0.1, 10, 6.5, ranking=energy_spread)
    assert report.picked == [1, 3, 0] and report.selectable == 3
    assert selection_report(delta, _line(4), None, 10, 6.5, select_fraction=0.5, ranking=energy_spread).picked == [2, 1]
    with pytest.raises(ValueError, match="shape"):
        selection_report(delta, _line(4), 0.1, 10, 6.5, ranking=energy_spread[:3])


# -- farthest-point selection in descriptor space --------------------------------------------------


def _pool(delta, atoms=None, exclude=(), threshold=0.1):
    delta = np.asarray(delta, dtype=float)
    return candidate_pool(delta, atoms if atoms is not None else _line(len(delta)), threshold, exclude=exclude)


def test_farthest_point_takes_one_per_cluster_where_most_uncertain_takes_one_cluster():
    """Three tight clusters of environments; the most uncertain atoms are all in the first. The
    greedy rule picks them; farthest-point takes the most uncertain atom, then one of each other cluster."""
    features = np.array([[0.0, 0.0], [0.01, 0.0], [0.0, 0.01], [5.01, 0.0], [5.0, 0.0], [0.0, 5.0]])
    delta = [0.9, 0.8, 0.7, 0.3, 0.2, 0.25]
    pool = _pool(delta)
    assert selection_report(np.asarray(delta), pool.atoms, 0.1, 3, 0.0).picked == [0, 1, 2]
    picks, (report,) = farthest_point_reports([pool], [features], [pool.atoms.numbers], [()], 3, 0.0)
    assert [atom for _, atom in picks] == [0, 3, 5]
    assert report.picked == [0, 3, 5]
    assert report.counts()["selectable"] == 6 and report.over_limit == 3


def test_farthest_point_avoids_environments_already_trained_in_any_parent():
    """An atom whose environment equals a chunk centre's (here in the other parent) is picked last."""
    first, second = _line(3), _line(2)
    features_first = np.array([[0.0], [1.0], [3.0]])
    features_second = np.array([[3.0], [9.0]])  # atom 1 has a chunk; atom 0 looks like first's atom 2
    pools = [_pool([0.5, 0.4, 0.9], first), _pool([0.2, 0.95], second, exclude=[1])]
    picks, reports = farthest_point_reports(pools, [features_first, features_second], [first.numbers, second.numbers], [(), [1]], 10, 0.0)
    assert picks[0] == (0, 0)  # 9 away from the trained environment: the farthest
    assert picks[-1] in {(0, 2), (1, 0)}  # the two copies of the same environment come last
    assert reports[1].already_chunked == 1 and len(picks) == 4


def test_farthest_point_never_compares_different_elements():
    """A candidate of an element with nothing trained is infinitely far: it is picked first even with
    the lowest δ, and its features (whatever their values) do not shrink other elements' distances."""
    atoms = _line(3)
    atoms.numbers[2] = 29
    features = np.array([[0.0], [0.1], [0.05]])
    pool = _pool([0.9, 0.8, 0.2], atoms)
    picks, _ = farthest_point_reports([pool], [features], [atoms.numbers], [[0]], 2, 0.0)
    assert picks == [(0, 2), (0, 1)]


def test_farthest_point_blocks_close_atoms_in_the_same_parent_only():
    close = Atoms("Pt3", positions=[[0, 0, 0], [2.0, 0, 0], [20.0, 0, 0]])
    other = Atoms("Pt1", positions=[[1.0, 0, 0]])
    features = [np.array([[0.0], [10.0], [4.0]]), np.array([[7.0]])]
    pools = [_pool([0.9, 0.5, 0.4], close), _pool([0.3], other)]
    picks, reports = farthest_point_reports(pools, features, [close.numbers, other.numbers], [(), ()], 10, 6.5)
    assert (0, 1) not in picks and set(picks) == {(0, 0), (0, 2), (1, 0)}
    assert reports[0].too_close == 1 and reports[0].over_limit == 0


def test_farthest_point_with_nothing_selectable():
    pool = _pool([0.01, 0.02])
    picks, (report,) = farthest_point_reports([pool], [np.zeros((2, 3))], [pool.atoms.numbers], [()], 5, 0.0)
    assert picks == [] and report.counts()["selectable"] == 0
