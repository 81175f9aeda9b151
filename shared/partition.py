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

import numpy as np

from medfed.shared.config import PARTITIONS, Partition

__all__ = [
    "MAX_DIRICHLET_ATTEMPTS",
    "METHODS",
    "class_counts",
    "partition_indices",
    "site_partitions",
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


def site_partitions(
    train_labels: np.ndarray,
    val_labels: np.ndarray,
    *,
    num_sites: int,
    method: Method,
    alpha: float,
    seed: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The simulated sites' shares of a dataset's training and validation splits.

    The one definition used by every simulated site (``medfed.client.site_data``) and by the run's
    pre-flight check (``medfed.shared.preflight``): the training split with ``seed`` and at least
    :data:`TRAIN_MIN_PER_SITE` samples per site, the validation split with ``seed + 1`` and at
    least :data:`VAL_MIN_PER_SITE`.

    Parameters
    ----------
    train_labels, val_labels
        Integer class labels of the two splits, shapes ``(N_train,)`` and ``(N_val,)``.
    num_sites, method, alpha
        As in :func:`partition_indices`.
    seed
        The run's seed.

    Returns
    -------
    tuple of list of np.ndarray
        ``(train_parts, val_parts)``, one index array per site each.

    Raises
    ------
    ValueError
        As :func:`partition_indices` (for example more sites than samples).
    """
    kwargs = {"num_sites": num_sites, "method": method, "alpha": alpha}
    train_parts = partition_indices(train_labels, seed=seed, min_per_site=TRAIN_MIN_PER_SITE, **kwargs)
    val_parts = partition_indices(val_labels, seed=seed + 1, min_per_site=VAL_MIN_PER_SITE, **kwargs)
    return train_parts, val_parts


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
