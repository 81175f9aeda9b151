"""Split one labelled dataset into simulated hospital sites (and into train/val/test).

Three ways to spread ``N`` samples over ``num_sites`` sites:

``"iid"``
    A seeded shuffle cut into near-equal parts: every site sees the same label mix.
``"dirichlet"``
    Label skew (Hsu et al., 2019, "Measuring the effects of non-identical data
    distribution"): for each class ``c`` the share of its samples given to each site is drawn
    from ``Dir(alpha * 1_K)``. Small ``alpha`` (0.1) gives sites dominated by one or two
    classes; large ``alpha`` (100) approaches IID. The draw is repeated until every site has at
    least ``min_per_site`` samples (at most :data:`MAX_DIRICHLET_ATTEMPTS` times).
``"quantity"``
    Quantity skew: site sizes follow ``min_per_site + Dir(alpha * 1_K)`` shares of the rest;
    labels are IID within each site.
``"source"``
    One site per source (a datalist entry's ``"site"`` attribute: scanner, hospital, slice
    range): the realistic split where the data says where each image comes from. The number of
    sources must equal ``num_sites``; site ``k`` holds the ``k``-th source in sorted order.

Why not ``flwr_datasets``
-------------------------
Flower's ``flwr_datasets.partitioner`` (``IidPartitioner``, ``DirichletPartitioner``,
``SizePartitioner``...) implements the same schemes, but every partitioner operates on a
HuggingFace ``datasets.Dataset``: ``flwr-datasets`` 0.6.1 requires ``datasets>=4`` (which
pulls ``pyarrow``, ``pandas``, ``huggingface-hub``...), ``matplotlib`` and ``seaborn``, none of
which this project otherwise needs. Wrapping an in-memory integer label array in an Arrow
table just to get index lists back is heavier than the ~100 lines of NumPy below, so these
functions are written with NumPy and mirror ``DirichletPartitioner``'s
resample-until-``min_partition_size`` behaviour. MONAI's ``partition_dataset`` /
``partition_dataset_classes`` only do IID/stratified ratio splits and may silently drop a
sample to rounding, so they are not used for :func:`split_train_val_test` either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from medfed.shared.config import PARTITIONS, Partition

__all__ = [
    "MAX_DIRICHLET_ATTEMPTS",
    "METHODS",
    "class_counts",
    "local_test_size",
    "partition_indices",
    "SiteSplits",
    "site_partitions",
    "source_names",
    "source_parts",
    "training_pool",
    "split_train_val_test",
    "TRAIN_MIN_PER_SITE",
    "VAL_MIN_PER_SITE",
]

logger = logging.getLogger(__name__)

Method = Partition
METHODS: tuple[str, ...] = PARTITIONS
"""The split methods: the run-config ``partition`` values."""
MAX_DIRICHLET_ATTEMPTS = 100
TRAIN_MIN_PER_SITE = 2
"""The fewest training samples a simulated site gets (one sample makes a useless site)."""
VAL_MIN_PER_SITE = 1
"""The fewest validation samples a simulated site gets (every site evaluates each round)."""


def partition_indices(
    labels: np.ndarray,
    *,
    num_sites: int,
    method: Method,
    alpha: float = 0.5,
    seed: int,
    min_per_site: int = 2,
    sources: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Assign every sample index to exactly one site.

    Parameters
    ----------
    labels
        Integer class labels, shape ``(N,)`` (for segmentation use
        :meth:`medfed.shared.data.ImageSet.class_labels`). Only their number matters for ``"iid"``
        and ``"quantity"``.
    num_sites
        Number of sites ``K >= 1``; at most ``N``.
    method
        ``"iid"``, ``"dirichlet"`` (label skew) or ``"quantity"`` (size skew).
    alpha
        Dirichlet concentration ``> 0`` (ignored by ``"iid"``); smaller is more skewed.
    seed
        Same seed, same split.
    min_per_site
        Minimum number of samples on every site (``>= 0``).
    sources
        ``"source"``: each sample's source, shape ``(N,)`` (see :func:`source_parts`).

    Returns
    -------
    list of np.ndarray
        ``K`` sorted ``int64`` index arrays, shapes ``(n_k,)`` with ``sum(n_k) == N``; their
        union is ``range(N)`` and they are pairwise disjoint.

    Raises
    ------
    ValueError
        Bad ``num_sites``, ``alpha``, ``method``, ``min_per_site`` or ``labels``, or no
        Dirichlet draw gave every site ``min_per_site`` samples.
    """
    labels = _check_labels(labels)
    n = len(labels)
    if isinstance(num_sites, bool) or not isinstance(num_sites, (int, np.integer)) or num_sites < 1:
        raise ValueError(f"num-sites = {num_sites!r} is invalid: it must be an integer >= 1 (--sites 3).")
    if num_sites > n:
        raise ValueError(
            f"num-sites = {num_sites} is more than the {n} samples: every site needs at least one "
            f"sample. Use fewer sites (--sites {max(1, n)}) or a larger dataset."
        )
    if not alpha > 0:
        raise ValueError(f"dirichlet-alpha = {alpha!r} is invalid: it must be > 0 (--alpha 0.5).")
    if method not in METHODS:
        raise ValueError(f"partition = {method!r} is invalid. Valid choices: {', '.join(METHODS)} (--partition iid).")
    if min_per_site < 0:
        raise ValueError(f"min_per_site = {min_per_site!r} is invalid: it must be >= 0.")
    if method == "source":  # the sources decide the sizes (a site may hold one patient): no min_per_site
        return source_parts(sources, num_sites=num_sites)
    if min_per_site * num_sites > n:
        raise ValueError(
            f"{num_sites} sites (num-sites) with at least {min_per_site} samples each (min_per_site) need "
            f"{min_per_site * num_sites} samples but there are only {n}. Use fewer sites "
            f"(--sites {max(1, n // max(min_per_site, 1))}) or a larger dataset."
        )

    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = np.array_split(rng.permutation(n), num_sites)
    elif method == "quantity":
        parts = _quantity(n, num_sites, alpha, min_per_site, rng)
    else:
        parts = _dirichlet(labels, num_sites, alpha, min_per_site, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def source_names(sources: np.ndarray | None) -> list[str]:
    """The distinct sources in sorted order: site ``k`` of ``partition = "source"`` holds the ``k``-th."""
    if sources is None:
        return []
    return sorted({str(s) for s in np.asarray(sources, dtype=object).tolist()})


def source_parts(
    sources: np.ndarray | None, *, num_sites: int, names: list[str] | None = None
) -> list[np.ndarray]:
    """Indices of each source's samples, one array per site (``partition = "source"``).

    Parameters
    ----------
    sources
        Each sample's source, shape ``(N,)`` (the datalist's ``"site"`` attributes).
    num_sites
        Must equal the number of distinct sources in ``names``.
    names
        The sources in site order (default: :func:`source_names` of ``sources``); a sample
        whose source is not among them raises.

    Raises
    ------
    ValueError
        No sources, or a number of sources other than ``num_sites`` (the message names them).
    """
    if sources is None:
        raise ValueError(
            "partition = 'source' needs each image's source: give every datalist entry a \"site\" "
            "(medfed data segmentation-datalist writes one), or use --partition iid."
        )
    values = np.asarray([str(s) for s in np.asarray(sources, dtype=object).tolist()], dtype=object)
    names = names if names is not None else source_names(values)
    if len(names) != num_sites:
        raise ValueError(
            f"partition = 'source': the data has {len(names)} sources ({', '.join(names)}) but num-sites = "
            f"{num_sites}. Use --sites {len(names)}."
        )
    unknown = sorted(set(values.tolist()) - set(names))
    if unknown:
        raise ValueError(
            f"partition = 'source': source(s) {', '.join(unknown)} of the validation or test entries are not "
            f"among the training sources ({', '.join(names)}). Give them the training entries' site names."
        )
    return [np.flatnonzero(values == name).astype(np.int64) for name in names]


@dataclass(frozen=True)
class SiteSplits:
    """Every simulated site's training, validation and local test indices.

    Attributes
    ----------
    train
        Per site, indices into the dataset's training split, shapes ``(n_k,)``.
    val
        Per site, indices into the dataset's validation split; together they cover it.
    test
        Per site, indices into the dataset's *training* split (disjoint from every ``train``):
        the site's local test split, drawn with the site's own class mix. Empty arrays when
        ``local_test_fraction = 0``. The official test split stays the global test.
    """

    train: list[np.ndarray]
    val: list[np.ndarray]
    test: list[np.ndarray]


def local_test_size(num_train: int, fraction: float) -> int:
    """How many of ``num_train`` training samples :func:`site_partitions` keeps for the sites'
    local test splits (``local-test-fraction``): ``round(fraction * num_train)``, at least one
    when ``fraction > 0`` and ``num_train >= 3`` (as :func:`split_train_val_test`)."""
    if fraction <= 0 or num_train == 0:
        return 0
    return max(1, int(round(fraction * num_train))) if num_train >= 3 else 0


def training_pool(
    train_labels: np.ndarray, *, seed: int, local_test_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """The training split cut into the sites' training pool and their local test pool.

    Step 1 of :func:`site_partitions`, alone: the pooled baseline trains on the same pool as
    the sites together (``medfed.simulations.pooled``).

    Returns
    -------
    tuple of np.ndarray
        ``(pool, test_pool)``: sorted ``int64`` indices into the training split, disjoint,
        covering it; ``test_pool`` holds :func:`local_test_size` samples, stratified by class
        (seed ``seed + 2``).
    """
    train_labels = _check_labels(train_labels)
    n_test = local_test_size(len(train_labels), local_test_fraction)
    if not n_test:
        return np.arange(len(train_labels), dtype=np.int64), np.zeros(0, dtype=np.int64)
    pool, _, test_pool = split_train_val_test(
        train_labels, val_fraction=0.0, test_fraction=n_test / len(train_labels), seed=seed + 2
    )
    return pool, test_pool


def site_partitions(
    train_labels: np.ndarray,
    val_labels: np.ndarray,
    *,
    num_sites: int,
    method: Method,
    alpha: float,
    seed: int,
    local_test_fraction: float = 0.0,
    train_sources: np.ndarray | None = None,
    val_sources: np.ndarray | None = None,
) -> SiteSplits:
    """The simulated sites' shares of a dataset: training, validation and local test indices.

    The one definition used by every simulated site (``medfed.client.site_data``), the pooled
    baseline and the run's pre-flight check (``medfed.shared.preflight``).

    1. ``local_test_fraction`` of the training split (stratified, seed ``seed + 2``) is set
       aside as the local test pool; the rest is the training pool.
    2. The training pool is partitioned with ``method`` (:func:`partition_indices`, ``seed``,
       at least :data:`TRAIN_MIN_PER_SITE` per site): the one draw that decides each site's
       class mix.
    3. The validation split and the local test pool are cut class by class in the same
       proportions: site ``k`` gets the share ``n_train[k, c] / n_train[:, c].sum()`` of class
       ``c`` (largest remainder rounding), so every site validates and tests on the class mix
       it trains on (a site that trains on one class validates on that class). Every site gets
       at least :data:`VAL_MIN_PER_SITE` validation samples: a site left without moves one
       from the site with the most, of the class it trains on most.

    Parameters
    ----------
    train_labels, val_labels
        Integer class labels of the two splits, shapes ``(N_train,)`` and ``(N_val,)``.
    num_sites, method, alpha
        As in :func:`partition_indices`.
    seed
        The run's seed (same seed, same splits).
    local_test_fraction
        Share of the training split kept for local test splits, in ``[0, 1)``.
    train_sources, val_sources
        ``method = "source"``: each sample's source (:func:`source_parts`). The training pool
        and the local test pool are cut by source; the validation split too when
        ``val_sources`` is given, else in the sites' training proportions (step 3).

    Returns
    -------
    SiteSplits
        One index array per site for each of ``train``, ``val`` and ``test``.

    Raises
    ------
    ValueError
        As :func:`partition_indices` (for example more sites than samples), or fewer
        validation samples than sites.
    """
    train_labels, val_labels = _check_labels(train_labels), _check_labels(val_labels)
    if not 0.0 <= local_test_fraction < 1.0:
        raise ValueError(f"local-test-fraction = {local_test_fraction!r} is invalid: it must lie in [0, 1).")
    pool, test_pool = training_pool(train_labels, seed=seed, local_test_fraction=local_test_fraction)
    parts = partition_indices(
        train_labels[pool], num_sites=num_sites, method=method, alpha=alpha, seed=seed,
        min_per_site=TRAIN_MIN_PER_SITE, sources=None if train_sources is None else train_sources[pool],
    )  # fmt: skip
    train_parts = [np.sort(pool[p]).astype(np.int64) for p in parts]
    if method == "source":
        return _by_source(train_parts, train_sources, val_labels, val_sources, test_pool, num_sites=num_sites)
    num_classes = int(max(train_labels.max(initial=0), val_labels.max(initial=0))) + 1
    counts = class_counts(train_labels, train_parts, num_classes)
    if len(val_labels) < num_sites * VAL_MIN_PER_SITE:
        raise ValueError(
            f"{num_sites} sites (num-sites) need at least {VAL_MIN_PER_SITE} validation sample each but "
            f"the validation split has {len(val_labels)}. Use fewer sites (--sites {len(val_labels)})."
        )
    val_parts = _cut_like(val_labels, counts, rng=np.random.default_rng(seed + 1), min_per_site=VAL_MIN_PER_SITE)
    test_local = _cut_like(train_labels[test_pool], counts, rng=np.random.default_rng(seed + 3), min_per_site=0)
    test_parts = [np.sort(test_pool[p]).astype(np.int64) for p in test_local]
    return SiteSplits(train=train_parts, val=val_parts, test=test_parts)


def _by_source(
    train_parts: list[np.ndarray],
    train_sources: np.ndarray | None,
    val_labels: np.ndarray,
    val_sources: np.ndarray | None,
    test_pool: np.ndarray,
    *,
    num_sites: int,
) -> SiteSplits:
    """:func:`site_partitions` for ``"source"``: validation and local test splits by source too."""
    assert train_sources is not None  # partition_indices raised otherwise
    names = source_names(train_sources)
    if val_sources is not None:
        val_parts = source_parts(val_sources, num_sites=num_sites, names=names)
        empty = [names[k] for k, p in enumerate(val_parts) if len(p) < VAL_MIN_PER_SITE]
        if empty:
            raise ValueError(
                f"partition = 'source': source(s) {', '.join(empty)} have no validation images. Give each "
                "source validation entries, or leave the validation section out to split it off training."
            )
    else:
        sizes = np.asarray([[len(p)] for p in train_parts], dtype=np.int64)
        val_parts = _cut_like(np.zeros(len(val_labels), dtype=np.int64), sizes, rng=np.random.default_rng(0),
                              min_per_site=VAL_MIN_PER_SITE)  # fmt: skip
    local = source_parts(train_sources[test_pool], num_sites=num_sites, names=names) if len(test_pool) else []
    test_parts = [np.sort(test_pool[p]).astype(np.int64) for p in local] or [np.zeros(0, np.int64)] * num_sites
    return SiteSplits(train=train_parts, val=val_parts, test=test_parts)


def class_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Samples of each class on each site.

    Parameters
    ----------
    labels
        Integer labels, shape ``(N,)`` with values in ``[0, num_classes)``.
    parts
        Site index arrays as returned by :func:`partition_indices`.
    num_classes
        Number of classes ``C``.

    Returns
    -------
    np.ndarray
        ``int64`` array of shape ``(num_sites, C)``.
    """
    labels = _check_labels(labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, num_classes = {num_classes}); got values in "
            f"[{labels.min()}, {labels.max()}]. Pass the dataset's num_classes."
        )
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for k, part in enumerate(parts):
        counts[k] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return counts


def split_train_val_test(
    labels: np.ndarray,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    stratify: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic (optionally stratified) train/validation/test split of ``N`` samples.

    Validation and test each get ``round(fraction * N)`` samples, at least one when the
    fraction is ``> 0`` and ``N >= 3``; training keeps the rest (never empty). With
    ``stratify`` every split keeps the label mix as closely as the sizes allow.

    Parameters
    ----------
    labels
        Integer labels, shape ``(N,)``.
    val_fraction, test_fraction
        Fractions in ``[0, 1)`` with a sum below 1.
    seed
        Same seed, same split.
    stratify
        Keep class proportions in every split.

    Returns
    -------
    tuple of np.ndarray
        Sorted ``int64`` index arrays ``(train, val, test)``, disjoint, covering ``range(N)``.
    """
    labels = _check_labels(labels)
    n = len(labels)
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} = {frac!r} is invalid: it must lie in [0, 1).")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} must be < 1 so that "
            "training keeps some samples."
        )
    rng = np.random.default_rng(seed)

    def size(frac: float) -> int:
        if frac == 0 or n == 0:
            return 0
        return max(1, int(round(frac * n))) if n >= 3 else 0

    n_val, n_test = size(val_fraction), size(test_fraction)
    while n_val + n_test >= n and (n_val or n_test):  # keep >= 1 training sample
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1

    if stratify:
        # Stratified order: each class's members get evenly spaced keys in [0, 1) (in random
        # order, with a random phase), so any prefix of the order has ~ the overall label mix.
        key = np.empty(n, dtype=np.float64)
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            key[members] = (np.arange(len(members)) + rng.random()) / len(members)
        order = np.lexsort((rng.random(n), key))
    else:
        order = rng.permutation(n)
    test = np.sort(order[:n_test]).astype(np.int64)
    val = np.sort(order[n_test : n_test + n_val]).astype(np.int64)
    train = np.sort(order[n_test + n_val :]).astype(np.int64)
    return train, val, test


# ---------------------------------------------------------------------------- internals
def _check_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of shape (N,); got shape {arr.shape}.")
    if len(arr) and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"labels must be integers; got dtype {arr.dtype}.")
    return arr.astype(np.int64, copy=False)


def _quantity(
    n: int, num_sites: int, alpha: float, min_per_site: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Sizes ``min_per_site + Dir(alpha)``-shares of the remainder; IID contents."""
    rest = n - min_per_site * num_sites
    shares = rng.dirichlet(np.full(num_sites, alpha))
    extra = np.floor(shares * rest).astype(np.int64)
    # hand the rounding remainder to the sites with the largest fractional parts
    leftover = rest - int(extra.sum())
    if leftover:
        frac = shares * rest - extra
        extra[np.argsort(-frac, kind="stable")[:leftover]] += 1
    sizes = min_per_site + extra
    cuts = np.cumsum(sizes)[:-1]
    return np.split(rng.permutation(n), cuts)


def _dirichlet(
    labels: np.ndarray, num_sites: int, alpha: float, min_per_site: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per-class ``Dir(alpha)`` shares over sites, redrawn until every site is big enough."""
    classes = np.unique(labels)
    smallest = 0
    for attempt in range(1, MAX_DIRICHLET_ATTEMPTS + 1):
        site_parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for k, chunk in enumerate(np.split(members, cuts)):
                site_parts[k].append(chunk)
        parts = [np.concatenate(p) for p in site_parts]
        smallest = min(len(p) for p in parts)
        if smallest >= min_per_site:
            if attempt > 1:
                logger.debug("Dirichlet partition met min_per_site after %d draws.", attempt)
            return parts
    raise ValueError(
        f"Dirichlet partition with dirichlet-alpha = {alpha} over {num_sites} sites left a site with only "
        f"{smallest} samples (< min_per_site = {min_per_site}) in all "
        f"{MAX_DIRICHLET_ATTEMPTS} draws. Increase dirichlet-alpha (--alpha 0.5), use fewer sites (--sites), "
        "or use partition = 'iid'."
    )


def _cut_like(
    labels: np.ndarray, train_counts: np.ndarray, *, rng: np.random.Generator, min_per_site: int
) -> list[np.ndarray]:
    """Cut ``labels``' indices class by class in the sites' training proportions.

    ``train_counts`` is ``(K, C)``: site ``k`` gets ``train_counts[k, c] / train_counts[:, c].sum()``
    of class ``c`` (largest remainder, ties in random order); a class no site trains on is cut
    by the sites' sizes. Sites below ``min_per_site`` then take one sample at a time from the
    site with the most (of the class they train on most, when the donor holds it).
    """
    num_sites = train_counts.shape[0]
    sizes = train_counts.sum(axis=1).astype(np.float64)
    site_parts: list[list[int]] = [[] for _ in range(num_sites)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        column = train_counts[:, c] if c < train_counts.shape[1] else np.zeros(num_sites)
        shares = column / column.sum() if column.sum() > 0 else sizes / sizes.sum()
        exact = shares * len(members)
        take = np.floor(exact).astype(np.int64)
        leftover = len(members) - int(take.sum())
        if leftover:
            order = np.lexsort((rng.random(num_sites), -(exact - take)))
            take[order[:leftover]] += 1
        for k, chunk in enumerate(np.split(members, np.cumsum(take)[:-1])):
            site_parts[k].extend(int(i) for i in chunk)
    for needy in range(num_sites):
        while len(site_parts[needy]) < min_per_site:
            donor = max(range(num_sites), key=lambda k: (len(site_parts[k]), -k))
            if len(site_parts[donor]) <= min_per_site:
                raise ValueError(f"cannot give each of {num_sites} sites {min_per_site} samples of {len(labels)}.")
            held = labels[site_parts[donor]]
            order = np.argsort(-train_counts[needy], kind="stable")
            wanted = [c for c in order if train_counts[needy, c] > 0 and (held == c).any()]
            pick = max(j for j, label in enumerate(held) if label == wanted[0]) if wanted else len(held) - 1
            site_parts[needy].append(site_parts[donor].pop(pick))
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in site_parts]
