"""One validated run configuration, parsed once from Flower's kebab-case run config.

Every entry point builds it through :func:`medfed.shared.config_sources.resolve_config` (defaults <
file < flags < ``--set``, merged raw, then validated here once).

The keys of ``[tool.flwr.app.config]`` in ``pyproject.toml`` (and ``--run-config`` overrides, and
the flags of ``medfed simulate``) are kebab-case; :class:`RunConfig` holds them as snake_case
fields. Unknown keys and bad values raise :class:`ConfigError` naming the key and the valid
choices, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

__all__ = [
    "ConfigError",
    "RunConfig",
    "TASKS",
    "PARTITIONS",
    "STRATEGIES",
    "ROBUST_STRATEGIES",
    "robust_min_sites",
    "NORMS",
    "OPTIMIZERS",
    "SERVER_OPTIMIZERS",
    "DEFAULT_SERVER_LEARNING_RATES",
    "BN_MODES",
    "LOSSES",
    "AUTO_LOSS",
    "DP_MAX_GRAD_NORM",
    "BAD_DATA_MODES",
    "PERSONALIZE_MODES",
    "TRAINABLE_MODES",
    "EVAL_PRECISIONS",
    "SIM_BACKENDS",
    "DECISION_THRESHOLDS",
    "DEFAULT_MIN_FIT_CLIENTS",
    "close_matches",
    "coerce_value",
    "parse_spacing",
    "sites_per_round",
]

Task = Literal["classification", "segmentation", "detection"]
Partition = Literal["iid", "dirichlet", "quantity", "source"]
StrategyName = Literal[
    "fedavg", "fedprox", "fedadam", "fedavgm", "fedyogi", "fedadagrad", "scaffold",
    "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan",
]
BnMode = Literal["global", "local-stats", "fedbn"]
LossName = Literal["auto", "ce", "balanced-softmax", "fedlc"]
Norm = Literal["batch", "group", "instance"]
Optimizer = Literal["sgd", "adam"]
ClientDP = Literal["off", "fixed", "adaptive"]
Accountant = Literal["rdp", "prv", "gdp"]
GradSampleMode = Literal["hooks", "ghost", "functorch", "bookkeeping"]
SecAggOnFailure = Literal["continue", "stop"]
SecAggMaskGenerator = Literal["aes-256-ctr", "flower-mt19937"]
BadData = Literal["strict", "skip"]
Personalize = Literal["off", "bn", "head", "bn+head"]
Trainable = Literal["all", "head", "last-block+head", "norm+head"]
EvalPrecision = Literal["auto", "fp32", "bf16"]
SimBackend = Literal["auto", "in-process", "processes", "ray"]
DecisionThreshold = Literal["youden", "accuracy"]

TASKS: tuple[str, ...] = get_args(Task)
SYNTHETIC_TASKS: tuple[str, ...] = ("classification", "segmentation")
"""Tasks the synthetic generator makes (detection runs on a box datalist)."""
PARTITIONS: tuple[str, ...] = get_args(Partition)
STRATEGIES: tuple[str, ...] = get_args(StrategyName)
SERVER_OPTIMIZERS: tuple[str, ...] = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
"""Server-side optimizers (Reddi et al. 2021, Hsu et al. 2019): they step on the trainable
parameters with the mean update as pseudo-gradient; buffers (BatchNorm statistics) are averaged."""
DEFAULT_SERVER_LEARNING_RATES: dict[str, float] = {
    "fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01, "fedadagrad": 0.1, "scaffold": 1.0,
}
"""The server step ``server-learning-rate = 0`` stands for, per strategy (FedAvgM: Hsu et al.
2019; FedAdam / FedYogi / FedAdagrad: Reddi et al. 2021's grid; SCAFFOLD: Karimireddy et al.
2020's global step 1)."""
DP_MAX_GRAD_NORM = 5.0
"""Default per-example clipping bound of DP-SGD (``dp-max-grad-norm``), measured in BENCHMARKS.md
("DP recipe that learns (issue 16)"). With the earlier 1.0, every BreastMNIST example was clipped
(per-example gradient norms 5.5-7.7 at the start, 11-15 for the minority class later), and clipping
every example moves the class balance a DP model settles at: with ``n0`` minority and ``n1``
majority examples the minority ones stay clipped until the majority's own gradients fall to about
``(n0 / n1) * C``, i.e. a mean class-1 probability of ``1 - (n0 / n1) * C / k`` (``k`` the
unclipped norm scale): 0.96-0.97 where the class-1 share is 0.73. Under DP noise the model then
predicts the majority class for every image (test NLL 0.73-0.94, the constant prior's is 0.58).
At 5.0 the same federated runs give a mean class-1 probability of 0.73-0.88 and test NLL
0.53-0.65 at the same test AUC. The noise scales with the bound (its standard deviation is the
noise multiplier times it), so a much larger bound costs signal. Measured on simplecnn (GroupNorm)
only: check another model's per-example norms with ``python -m medfed.simulations.bench.dp_clipping``."""
AUTO_LOSS = "balanced-softmax"
"""The classification loss of ``loss = "auto"`` (measured in BENCHMARKS.md, issue 14)."""
BN_MODES: tuple[str, ...] = get_args(BnMode)
LOSSES: tuple[str, ...] = get_args(LossName)
ROBUST_STRATEGIES: tuple[str, ...] = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
"""Byzantine-robust aggregation rules (Flower's own): they need every site's update in the clear."""
NORMS: tuple[str, ...] = get_args(Norm)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
CLIENT_DP_MODES: tuple[str, ...] = get_args(ClientDP)
ACCOUNTANTS: tuple[str, ...] = get_args(Accountant)
DP_GRAD_SAMPLE_MODES: tuple[str, ...] = get_args(GradSampleMode)
SECAGG_ON_FAILURE: tuple[str, ...] = get_args(SecAggOnFailure)
SECAGG_MASK_GENERATORS: tuple[str, ...] = get_args(SecAggMaskGenerator)
"""How SecAgg+ masks are expanded from their seeds (:mod:`medfed.shared.secagg_masks`)."""
BAD_DATA_MODES: tuple[str, ...] = get_args(BadData)
PERSONALIZE_MODES: tuple[str, ...] = get_args(Personalize)
TRAINABLE_MODES: tuple[str, ...] = get_args(Trainable)
"""Which parameters local training updates (``trainable``; :mod:`medfed.shared.trainable`)."""
DECISION_THRESHOLDS: tuple[str, ...] = get_args(DecisionThreshold)
"""How a binary model's decision threshold is chosen on validation data (``decision-threshold``;
:data:`medfed.shared.metrics.THRESHOLD_RULES`)."""
EVAL_PRECISIONS: tuple[str, ...] = get_args(EvalPrecision)
"""Precision of the evaluation and BatchNorm re-estimation passes (``eval-precision``;
:mod:`medfed.shared.precision`)."""
SIM_BACKENDS: tuple[str, ...] = get_args(SimBackend)
"""Where a simulation runs its sites (``sim-backend``; :mod:`medfed.simulations.in_process`)."""


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid."""


DEFAULT_MIN_FIT_CLIENTS = 2
"""The default ``min-fit-clients``: the one value capped to ``num-sites`` (a one-site run)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything one federated (or pooled) run needs.

    Parameters
    ----------
    dataset
        ``"synthetic"`` (a clearly labelled generated dataset), a path to a MedMNIST-style
        ``.npz`` file, a path to a MONAI-style datalist ``.json``, or ``"deployment"`` (each
        site reads its own datalist, named in its node config; the server has no data).
    synthetic_task, synthetic_dims, synthetic_samples, image_size
        Shape of the synthetic dataset; ``image_size`` is also the side length every image
        is resized to for datalists (``0`` keeps the npz files' own size).
    bad_data
        What a site does with unusable datalist entries (unreadable or truncated files, labels
        out of range, wrong dimensions or channels): ``"strict"`` (default) refuses to train
        and names every bad entry (the site's log and ``medfed site check``); ``"skip"`` leaves
        them out, logs their sections, indices and problem kinds, and reports how many in its
        fit metrics (``skipped-files``; a count only, never names). A site's own ``site.toml``
        ``bad-data`` overrides the run's. Strict is the default because a silently smaller
        dataset can drop a class or a scanner's cases and bias the federated model unnoticed;
        skipping is a decision the site makes on purpose.
    spacing
        Voxel size in mm that datalist images with patient axes (NIfTI, DICOM volumes) are
        resampled to after they are brought to RAS: ``""`` or ``"0"`` keeps each file's own
        spacing; one number (``"1.5"``) for every axis, or one per axis (``"1.0,1.0,2.0"``).
        A site's ``site.toml`` ``spacing`` overrides the run's (the site knows its scanners);
        MedMNIST ``.npz`` files have no spacing and ignore it. See ``docs/images.md``.
    num_sites
        Number of simulated hospitals (simulation only; deployment uses the real sites).
    num_server_rounds, local_epochs, batch_size, learning_rate, optimizer, weight_decay
        Federated schedule and local optimiser. The learning rate follows a cosine schedule
        over all rounds (the round number is sent to the sites).
    model, norm
        Registry name (see ``medfed.shared.models.MODELS``) and normalisation layer.
    init_weights
        A local weights file the initial global model starts from (``""``: a random
        initialisation): a state dict, a medfed checkpoint or run directory, or a MONAI bundle
        folder (``models/model.pt``). Relative paths start at the working directory, as
        ``dataset``'s. Entries are matched by name and shape; a head of another size stays newly
        initialised, and weights of another architecture are refused
        (:mod:`medfed.shared.init_weights`, ``docs/transfer-learning.md``). Only the coordinator
        reads it: the sites receive the loaded model as round 1's global model.
    trainable
        Which parameters local training updates (the sites' rounds and the pooled baseline, with
        or without DP-SGD): ``"all"`` (default), ``"head"``, ``"last-block+head"`` or
        ``"norm+head"`` (every normalisation layer's affine parameters and the head). The others
        are frozen (``requires_grad = False``, left out of the optimizer, and under DP-SGD out of
        Opacus's per-sample gradients); the privacy accounting is unchanged. The head and last
        block of each model are defined in ``medfed.shared.models.MODELS``
        (:mod:`medfed.shared.trainable`).
    strategy, proximal_mu, server_learning_rate, fraction_fit, fraction_evaluate,
    min_fit_clients
        Flower strategy and its knobs. Besides ``fedavg``, ``fedprox``, the server optimizers
        of :data:`SERVER_OPTIMIZERS` and ``scaffold`` (below), the
        Byzantine-robust rules of :data:`ROBUST_STRATEGIES` (Flower's ``FedMedian``,
        ``FedTrimmedAvg``, ``Krum`` without and with ``num_clients_to_keep`` (``multikrum``),
        ``Bulyan``); they ignore example counts, and they need each site's update in the clear,
        so ``secagg`` must be off (and ``client-dp`` too: its noise is calibrated for a mean).
        ``min_fit_clients`` is also the fewest sites whose training results a round needs
        (without SecAgg+): a round in which fewer sites answer leaves the global model
        unchanged (recorded, and the next round runs). It must not exceed ``num_sites``; only the
        default (:data:`DEFAULT_MIN_FIT_CLIENTS`) is capped to it, for a one-site run (a value a
        user gave is never lowered: ``medfed.shared.config_sources.resolve_config`` names both keys).
    server_learning_rate, server_momentum, server_beta_1, server_beta_2, server_tau
        Server optimizers (Flower's ``FedAvgM``, ``FedAdam``, ``FedYogi``, ``FedAdagrad``) and
        SCAFFOLD's global step: the server step size (``eta``; ``0``, the default, takes the
        strategy's own: :data:`DEFAULT_SERVER_LEARNING_RATES`), FedAvgM's momentum, the Adam /
        Yogi moment decays and the adaptivity ``tau`` (Reddi et al. 2021 tune ``eta`` in
        [1e-2, 1] and ``tau`` in [1e-3, 1e-1]). The server optimizers step on the trainable
        parameters only; BatchNorm statistics and counters are averaged as in FedAvg.
    bn_mode
        BatchNorm under federation: ``"global"`` (every BatchNorm entry is averaged),
        ``"local-stats"`` (SiloBN, Andreux et al. 2020: running statistics stay at the site;
        affine weights are averaged) or ``"fedbn"`` (FedBN, Li et al. 2021: all BatchNorm
        entries stay at the site). A site keeps its local entries in its site state between
        rounds (:mod:`medfed.shared.site_state`) and sends back the global values it received
        for them, so they never leave the site; the server re-estimates the global model's
        statistics on the data it evaluates with, also before writing its checkpoints
        (simulation: the pooled training split, the figure a federated statistics pass over the
        sites would give). In deployment the server holds no data: its checkpoints keep the
        initial statistics, and each site evaluates with its own.
    loss, fedlc_tau
        Classification loss: ``"ce"``, ``"balanced-softmax"`` (Ren et al. 2020: logits plus the
        log of the site's class prior) or ``"fedlc"`` (Zhang et al. 2022: logits minus
        ``fedlc_tau * n_c^(-1/4)`` for the site's class counts ``n_c``). Both use the site's own
        training class counts and change training only; evaluation uses plain logits.
        ``"auto"`` (the default) is :data:`AUTO_LOSS` for classification, and plain
        cross-entropy under DP-SGD; segmentation always trains with Dice + cross-entropy
        (:meth:`RunConfig.loss_for`).
    round_timeout
        Seconds the server waits for the sites' replies in each round's training and
        evaluation step; sites that have not answered by then count as failed for that round
        (recorded with the round) and are asked again in the next. ``0``: wait without limit.
        Under SecAgg+ the training step uses ``secagg_timeout`` per protocol stage instead.
    resume
        A run directory to continue: the server reloads the state it saved after the last
        completed round there (global weights, strategy state, random state, run-store run id)
        and runs the remaining rounds into the same directory and run-store run. Every other
        key must equal the run's own ``config.json`` (``medfed simulate --resume DIR`` reads
        it). See ``docs/faults.md``.
    trim_beta
        ``fedtrimmedavg``: the fraction of updates cut at each end, per coordinate, in ``[0,
        0.5)``; it must cut at least ``num_malicious_sites`` of the sites per round.
    num_malicious_sites
        How many malicious sites per round the robust rules must tolerate (``f``): ``krum`` and
        ``multikrum`` need ``2f + 3`` sites per round, ``bulyan`` ``4f + 3``, ``fedmedian``
        ``2f + 1``. Ignored by the non-robust strategies.
    num_sites_to_keep
        ``multikrum``: how many of the best-scored updates are averaged (``0``: all but
        ``num_malicious_sites``).
    max_update_norm
        Update validation (``server/validation.py``): the server rejects a site whose update
        (site weights - global weights, L2 norm over all floating-point state entries) is longer
        than this; ``0`` turns the norm check off. Updates with NaN or Inf, the wrong number,
        shapes or dtypes of arrays are always rejected. Under SecAgg+ the server cannot see
        single updates: each site then refuses to send a non-finite update and clips its update
        to this norm before masking (``client/update_mods.py``), and the server checks the
        aggregate. See ``docs/faults.md``.
    partition, dirichlet_alpha
        How one dataset is split into simulated sites (``"source"``: one site per source, the
        datalist entries' ``"site"`` attribute; see ``docs/segmentation.md``).
    patch_size
        Segmentation: train on random patches of this side (``RandCropByPosNegLabeld``, half
        centred on foreground) and evaluate whole images by sliding-window inference
        (``monai.inferers.sliding_window_inference``) with this window; 0: whole images both
        ways. At most ``image-size``; a UNet needs a multiple of 16.
    local_test_fraction
        Simulation: share of the training split kept for the sites' local test splits, each
        drawn with its site's class mix (``medfed.shared.partition.site_partitions``); 0: none.
        The official test split stays the global test.
    personalize, personalize_epochs
        After the last round each site derives a personalized model from the global one
        (``medfed.shared.personalization``): ``"bn"`` re-estimates the BatchNorm statistics on
        the site's training data, ``"head"`` fine-tunes the last layer for
        ``personalize_epochs`` epochs, ``"bn+head"`` both, ``"off"`` none; a site keeps it only
        where its own validation split scores it better than the global model. Simulation: it
        is scored on each site's local test split beside the global model (docs/evaluation.md).
    local_only_baseline
        Simulation: also train each site alone (same model, rounds and epochs) and score it on
        its local test split.
    cross_site, cross_site_min_count
        After the last round every site scores the final global model on its own local test
        split and reports its metrics, and per subgroup (datalist metadata ``sex``, ``age``,
        ``scanner``...) those of each subgroup with at least ``cross_site_min_count`` images
        (>= 2; a site's policy may raise it); smaller subgroups send nothing
        (``medfed.client.cross_site``, ``docs/evaluation.md``). ``fraction-evaluate = 0`` (no
        site evaluates) turns it off too.
    augment
        Random flips and small shifts while training.
    eval_precision
        Numeric precision of the passes that only run the model forward: every round's
        validation and test evaluation and the BatchNorm re-estimation pass after local
        training (sites, pooled baseline, server). ``"auto"`` (default): bfloat16 autocast for
        classification models on a device with native bf16 arithmetic (a CPU with AVX512-BF16 or
        AMX, a CUDA GPU of compute capability >= 8.0), else fp32 (segmentation and detection:
        fp32, not measured); ``"fp32"``; ``"bf16"``. Training, ``medfed predict``,
        ``medfed export``, checkpoints' statistics and the cross-site evaluation stay fp32.
        Measured in BENCHMARKS.md ("bf16 inference and BatchNorm re-estimation (issue 19)");
        see :mod:`medfed.shared.precision` and ``docs/precision.md``.
    sim_backend
        Simulation only: where the simulated sites run. ``"processes"``: one single-threaded
        site process per core, forked from the coordinator when the run starts (sites train in
        parallel; nothing to start or import again; Linux, no GPU); ``"in-process"``: in the
        coordinator's process, one site at a time with every core; ``"ray"``: Flower's Ray
        backend, one single-threaded worker process per core (seconds to start; GPUs shared by
        Ray); ``"auto"`` (default): Ray when torch sees an accelerator, in-process on one core,
        else processes where the platform forks, else in-process up to 2 cores and Ray above
        (:func:`medfed.simulations.in_process.choose_backend`; measured in BENCHMARKS.md,
        "Sites in the coordinator's process"). ``medfed simulate --dry-run`` says which one a run
        gets. All give the same figures when torch runs one thread (``processes`` and ``ray``
        always do); in-process with more threads, float sums are taken in another order, so its
        figures then depend on the number of cores.
    decision_threshold
        Binary classification: how each round's decision threshold (the one the checkpoint keeps
        and ``medfed predict`` applies) is chosen on validation data, never the test split:
        ``"youden"`` (default) maximises Youden's J, i.e. balanced accuracy; ``"accuracy"``
        maximises accuracy, for a model whose decisions should beat the majority rate on an
        imbalanced set (it predicts the majority class where the ranking is not sure enough).
        BENCHMARKS.md, "DP study: the 3D sets (2026-12-06)"; ``docs/dp-recipe.md``.
    seed
        The one seed; every random choice derives from it.
    run_dir
        Folder under which each run writes its own directory.
    store
        The run store (``medfed.server.store``) the server records every run into, as an SQLAlchemy
        URL: empty for ``sqlite:///<run_dir>/medfed.db`` (one database for all runs under the
        runs folder), ``sqlite:///PATH``, ``postgresql://...``, or ``"off"``. ``medfed
        dashboard`` reads it.
    dp, dp_noise_multiplier, dp_max_grad_norm, dp_target_epsilon, dp_delta, dp_budget_epsilon,
    dp_accountant, dp_secure_noise
        Sample-level DP-SGD at every site (Opacus, Poisson sampling). ``dp_target_epsilon > 0``
        derives the noise multiplier for the planned rounds instead of ``dp_noise_multiplier``.
        ``dp_budget_epsilon`` caps what a site spends: it declines a round that would exceed it.
        ``dp_secure_noise`` draws the noise from a generator seeded by the OS CSPRNG.
        ``dp_max_grad_norm`` defaults to :data:`DP_MAX_GRAD_NORM` (5.0, measured: see there).
    dp_grad_sample_mode
        How per-sample gradients are clipped: Opacus's ``"hooks"``, ``"ghost"`` (ghost / fast
        gradient clipping; classification only) or ``"functorch"``, or medfed's
        ``"bookkeeping"`` (:mod:`medfed.shared.dp_bookkeeping`: the same clipped sums in one
        backward pass without per-sample gradient tensors; models with layers it does not support
        train in ``"hooks"`` mode, logged). Same privacy, different speed and memory (see
        ``docs/dp-speed.md``).
    ledger_dir
        Where each site keeps its privacy ledger (empty: ``<run directory>/ledgers``).
    tracking_mlflow, tracking_tensorboard
        Live experiment tracking (``medfed.server.tracking``): the server writes each round, as
        it ends, into this MLflow tracking URI or local folder, and/or this TensorBoard log folder
        (empty: off; ``medfed export-run`` exports a run afterwards).
    intended_use
        The model's intended use, shown on its model card (``medfed report``); not used in training.
    client_dp, client_dp_noise_multiplier, client_dp_clipping_norm
        Client-level DP with Flower's wrappers: ``"fixed"`` or ``"adaptive"`` clipping at the
        sites and Gaussian noise added by the server.
    secagg, secagg_num_shares, secagg_reconstruction_threshold, secagg_clipping_range,
    secagg_quantization_range, secagg_max_weight, secagg_timeout
        Flower SecAgg+ secure aggregation (see ``flwr.server.workflow.SecAggPlusWorkflow``).
        ``secagg_max_weight`` must exceed the largest site's example count; the aggregate's
        precision scales with ``secagg_max_weight / secagg_quantization_range`` and the sum of
        the sites' quantised vectors must stay below 2^32 (``sites * quantization_range <
        2^32``: the default 2^26 allows up to 63 sites). See ``server/secure.py``.
    secagg_on_failure
        ``"continue"`` (a round whose secure aggregation fails, e.g. too few sites left for
        the reconstruction threshold, leaves the model unchanged and the next round runs) or
        ``"stop"`` (the run ends after that round).
    secagg_mask_generator
        How every mask is expanded from its secret seed: ``"aes-256-ctr"`` (AES-256 in counter
        mode keyed by the whole seed: cryptographic, and about 4x faster than Flower's) or
        ``"flower-mt19937"`` (Flower's ``pseudo_rand_gen``, for sites that run Flower's own
        ``secaggplus_mod``). The server names it to the sites each round; a site that masked
        with another generator is left out of that round as a dropout.
    in_channels, num_classes, spatial_dims
        The model's input channels, classes (segmentation: with background) and 2/3 spatial
        dims when ``dataset = "deployment"``: the server holds no data, so the model shape
        comes from here (with ``image_size``, which must then be > 0). Every site checks its
        own datalist against them.
    app_signature
        Set by ``medfed run``: the coordinator's ed25519 signature over the app bundle and this
        run config (see ``medfed.shared.app_signature``); sites refuse runs without a valid one. Not used
        by the training code.
    """

    dataset: str = "synthetic"
    synthetic_task: Task = "classification"
    synthetic_dims: int = 2
    synthetic_samples: int = 240
    image_size: int = 0
    patch_size: int = 0
    bad_data: BadData = "strict"
    spacing: str = ""
    num_sites: int = 3
    num_server_rounds: int = 3
    local_epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 0.05
    optimizer: Optimizer = "sgd"
    weight_decay: float = 0.0
    model: str = "densenet121"
    norm: Norm = "batch"
    init_weights: str = ""
    trainable: Trainable = "all"
    strategy: StrategyName = "fedavg"
    trim_beta: float = 0.2
    num_malicious_sites: int = 1
    num_sites_to_keep: int = 0
    max_update_norm: float = 0.0
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.0
    server_momentum: float = 0.9
    server_beta_1: float = 0.9
    server_beta_2: float = 0.99
    server_tau: float = 1e-3
    bn_mode: BnMode = "global"
    loss: LossName = "auto"
    fedlc_tau: float = 1.0
    fraction_fit: float = 1.0
    fraction_evaluate: float = 1.0
    min_fit_clients: int = DEFAULT_MIN_FIT_CLIENTS
    round_timeout: float = 0.0
    resume: str = ""
    partition: Partition = "iid"
    dirichlet_alpha: float = 0.5
    local_test_fraction: float = 0.1
    personalize: Personalize = "bn+head"
    personalize_epochs: int = 2
    local_only_baseline: bool = False
    cross_site: bool = True
    cross_site_min_count: int = 10
    augment: bool = True
    eval_precision: EvalPrecision = "auto"
    sim_backend: SimBackend = "auto"
    decision_threshold: DecisionThreshold = "youden"
    seed: int = 0
    run_dir: str = "runs"
    store: str = ""
    dp: bool = False
    dp_noise_multiplier: float = 1.0
    dp_max_grad_norm: float = DP_MAX_GRAD_NORM
    dp_target_epsilon: float = 0.0
    dp_delta: float = 1e-5
    dp_budget_epsilon: float = 10.0
    dp_accountant: Accountant = "rdp"
    dp_secure_noise: bool = True
    dp_grad_sample_mode: GradSampleMode = "bookkeeping"
    ledger_dir: str = ""
    tracking_mlflow: str = ""
    tracking_tensorboard: str = ""
    intended_use: str = ""
    client_dp: ClientDP = "off"
    client_dp_noise_multiplier: float = 0.1
    client_dp_clipping_norm: float = 1.0
    secagg: bool = False
    secagg_num_shares: int = 3
    secagg_reconstruction_threshold: int = 2
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 67108864
    secagg_max_weight: float = 100000.0
    secagg_timeout: float = 120.0
    secagg_on_failure: SecAggOnFailure = "continue"
    secagg_mask_generator: SecAggMaskGenerator = "aes-256-ctr"
    in_channels: int = 1
    num_classes: int = 2
    spatial_dims: int = 2
    app_signature: str = ""

    def __post_init__(self) -> None:
        _check_choice("synthetic-task", self.synthetic_task, SYNTHETIC_TASKS)
        _check_choice("partition", self.partition, PARTITIONS)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("bn-mode", self.bn_mode, BN_MODES)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("synthetic-dims", self.synthetic_dims, (2, 3))
        _check_choice("client-dp", self.client_dp, CLIENT_DP_MODES)
        _check_choice("dp-accountant", self.dp_accountant, ACCOUNTANTS)
        _check_choice("dp-grad-sample-mode", self.dp_grad_sample_mode, DP_GRAD_SAMPLE_MODES)
        _check_choice("decision-threshold", self.decision_threshold, DECISION_THRESHOLDS)
        _check_choice("secagg-on-failure", self.secagg_on_failure, SECAGG_ON_FAILURE)
        _check_choice("secagg-mask-generator", self.secagg_mask_generator, SECAGG_MASK_GENERATORS)
        _check_choice("spatial-dims", self.spatial_dims, (2, 3))
        _check_choice("bad-data", self.bad_data, BAD_DATA_MODES)
        _check_choice("personalize", self.personalize, PERSONALIZE_MODES)
        _check_choice("trainable", self.trainable, TRAINABLE_MODES)
        _check_choice("eval-precision", self.eval_precision, EVAL_PRECISIONS)
        _check_choice("sim-backend", self.sim_backend, SIM_BACKENDS)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(
                    f"{f.name.replace('_', '-')} = {value!r} is invalid: it must be a finite number."
                )
        _check_store(self.store)
        parse_spacing(self.spacing)
        for key, value, low in (
            ("num-sites", self.num_sites, 1),
            ("num-server-rounds", self.num_server_rounds, 1),
            ("local-epochs", self.local_epochs, 1),
            ("batch-size", self.batch_size, 1),
            ("min-fit-clients", self.min_fit_clients, 1),
            ("synthetic-samples", self.synthetic_samples, 8),
            ("image-size", self.image_size, 0),
            ("patch-size", self.patch_size, 0),
            ("secagg-num-shares", self.secagg_num_shares, 2),
            ("secagg-reconstruction-threshold", self.secagg_reconstruction_threshold, 1),
            ("secagg-quantization-range", self.secagg_quantization_range, 2),
            ("in-channels", self.in_channels, 1),
            ("num-classes", self.num_classes, 2),
            ("seed", self.seed, 0),
            ("num-malicious-sites", self.num_malicious_sites, 0),
            ("num-sites-to-keep", self.num_sites_to_keep, 0),
            ("personalize-epochs", self.personalize_epochs, 0),
            ("cross-site-min-count", self.cross_site_min_count, 2),
        ):
            if value < low:
                raise ConfigError(f"{key} = {value!r} is invalid: it must be an integer >= {low}.")
        for key, value in (
            ("learning-rate", self.learning_rate),
            ("dirichlet-alpha", self.dirichlet_alpha),
            ("server-tau", self.server_tau),
            ("dp-max-grad-norm", self.dp_max_grad_norm),
            ("dp-budget-epsilon", self.dp_budget_epsilon),
            ("client-dp-clipping-norm", self.client_dp_clipping_norm),
            ("secagg-clipping-range", self.secagg_clipping_range),
            ("secagg-max-weight", self.secagg_max_weight),
            ("secagg-timeout", self.secagg_timeout),
        ):
            if not value > 0:
                raise ConfigError(f"{key} = {value!r} is invalid: it must be > 0.")
        for key, value in (
            ("fraction-fit", self.fraction_fit),
            ("fraction-evaluate", self.fraction_evaluate),
        ):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key} = {value!r} is invalid: it must lie in [0, 1].")
        if not 0.0 <= self.max_update_norm < math.inf:
            raise ConfigError(
                f"max-update-norm = {self.max_update_norm!r} is invalid: it must be a finite number >= 0 "
                "(0 turns the norm check off)."
            )
        if not 0.0 <= self.local_test_fraction <= 0.5:
            raise ConfigError(
                f"local-test-fraction = {self.local_test_fraction!r} is invalid: it must lie in [0, 0.5] "
                "(0: no local test splits; 0.1 keeps a tenth of the training split)."
            )
        if not 0.0 <= self.trim_beta < 0.5:
            raise ConfigError(f"trim-beta = {self.trim_beta!r} is invalid: it must lie in [0, 0.5).")
        _check_robust(self)
        _check_recipe(self)
        if not (self.round_timeout >= 0 and math.isfinite(self.round_timeout)):
            raise ConfigError(
                f"round-timeout = {self.round_timeout!r} is invalid: give the seconds to wait for "
                "the sites in each round (> 0), or 0 to wait without limit."
            )
        for key, value in (
            ("proximal-mu", self.proximal_mu),
            ("fedlc-tau", self.fedlc_tau),
            ("server-learning-rate", self.server_learning_rate),
            ("weight-decay", self.weight_decay),
            ("dp-noise-multiplier", self.dp_noise_multiplier),
            ("dp-target-epsilon", self.dp_target_epsilon),
            ("client-dp-noise-multiplier", self.client_dp_noise_multiplier),
        ):
            if value < 0:
                raise ConfigError(f"{key} = {value!r} is invalid: it must be >= 0.")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp-delta = {self.dp_delta!r} is invalid: it must lie in (0, 1).")
        if self.secagg and self.secagg_reconstruction_threshold > self.secagg_num_shares:
            raise ConfigError(
                "secagg-reconstruction-threshold must be <= secagg-num-shares "
                f"(got {self.secagg_reconstruction_threshold} > {self.secagg_num_shares})."
            )
        if self.patch_size and self.image_size and self.patch_size > self.image_size:
            raise ConfigError(
                f"patch-size = {self.patch_size} is larger than image-size = {self.image_size}: use a patch "
                f"no larger than the images (--set patch-size={self.image_size}), or 0 for whole images."
            )
        if self.is_deployment and self.image_size <= 0:
            raise ConfigError(
                'dataset = "deployment" needs image-size > 0: the server builds the model for '
                "that input size and every site resizes its images to it."
            )
        if self.min_fit_clients > self.num_sites:
            if self.min_fit_clients != DEFAULT_MIN_FIT_CLIENTS:
                raise ConfigError(
                    f"min-fit-clients = {self.min_fit_clients} exceeds num-sites = {self.num_sites}: no round "
                    f"could collect {self.min_fit_clients} sites' results. Lower it (--set "
                    f"min-fit-clients={self.num_sites}) or add sites (--set num-sites={self.min_fit_clients})."
                )
            # Only the default is capped (a one-site run); shared.config_sources notes it.
            object.__setattr__(self, "min_fit_clients", self.num_sites)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The accepted kebab-case keys."""
        return tuple(f.name.replace("_", "-") for f in fields(cls))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, source: str = "run config") -> RunConfig:
        """Parse kebab-case (or snake_case) keys, coercing types and rejecting unknown keys.

        A shorthand for :func:`medfed.shared.config_sources.resolve_config` with one mapping layer
        (the model name is not checked here).

        Parameters
        ----------
        raw
            Mapping such as Flower's ``context.run_config``.
        source
            Where the mapping came from, quoted in error messages (a file name, say).
        """
        from medfed.shared.config_sources import mapping_layer, resolve_config

        return resolve_config(mapping_layer(raw, source=source), check_model=False).config

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        """Read a TOML file whose top level (or ``[tool.flwr.app.config]``) holds the keys.

        A shorthand for :func:`medfed.shared.config_sources.resolve_config` with one file layer.
        """
        from medfed.shared.config_sources import file_layer, resolve_config

        return resolve_config(file_layer(path), check_model=False).config

    def replace(self, **changes: Any) -> RunConfig:
        """Return a copy with snake_case fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flower-compatible kebab-case mapping (the inverse of :meth:`from_mapping`)."""
        return {
            f.name.replace("_", "-"): getattr(self, f.name)
            for f in fields(self)
        }

    # ------------------------------------------------------------------ derived
    def loss_for(self, task: str) -> str:
        """The training loss a site of ``task`` uses: ``loss``, with ``"auto"`` resolved
        (:data:`AUTO_LOSS` for classification, ``"ce"`` for segmentation, detection or under
        ``dp``; segmentation and detection always train with their own loss)."""
        if task == "detection":
            return "ce"
        if self.loss != "auto":
            return self.loss
        return "ce" if task == "segmentation" or self.dp else AUTO_LOSS

    @property
    def server_step(self) -> float:
        """The server step size: ``server-learning-rate``, or the strategy's default for ``0``."""
        return self.server_learning_rate or DEFAULT_SERVER_LEARNING_RATES.get(self.strategy, 1.0)

    @property
    def spacing_mm(self) -> tuple[float, ...]:
        """``spacing`` as millimetres per axis (:func:`parse_spacing`); ``()`` keeps the native spacing."""
        return parse_spacing(self.spacing)

    @property
    def is_synthetic(self) -> bool:
        """Whether the dataset is the generated demo dataset."""
        return self.dataset == "synthetic"

    @property
    def store_url(self) -> str | None:
        """The run store's URL (``None`` when ``store = "off"``)."""
        if self.store == "off":
            return None
        return self.store or f"sqlite:///{Path(self.run_dir) / 'medfed.db'}"

    @property
    def is_deployment(self) -> bool:
        """Whether sites bring their own data (``dataset = "deployment"``); the server has none."""
        return self.dataset == "deployment"


def sites_per_round(cfg: RunConfig, *, num_sites: int | None = None) -> int:
    """How many sites Flower's strategies sample per round (``FedAvg.num_fit_clients``).

    ``max(int(num_sites * fraction_fit), min(min_fit_clients, num_sites))``, with
    ``num_sites`` defaulting to ``cfg.num_sites`` (the connected sites in deployment).
    """
    n = cfg.num_sites if num_sites is None else num_sites
    return max(int(n * cfg.fraction_fit), min(cfg.min_fit_clients, n))


def robust_min_sites(cfg: RunConfig) -> int:
    """Fewest updates per round with which ``cfg.strategy`` keeps its robustness guarantee.

    ``fedmedian``: ``2f + 1`` (an honest majority per coordinate); ``krum``, ``multikrum``:
    ``2f + 3`` (Blanchard et al. 2017), and ``multikrum`` at least the updates it keeps;
    ``bulyan``: ``4f + 3`` (El Mhamdi et al. 2018; Flower refuses fewer);
    ``fedtrimmedavg``: the smallest ``n`` with ``int(trim_beta * n) >= f``. ``1`` for the
    non-robust strategies. ``f`` is ``num_malicious_sites``; ``cfg`` must be valid.
    """
    f = cfg.num_malicious_sites
    if cfg.strategy == "fedmedian":
        return 2 * f + 1
    if cfg.strategy == "krum":
        return 2 * f + 3
    if cfg.strategy == "multikrum":
        return max(2 * f + 3, cfg.num_sites_to_keep)
    if cfg.strategy == "bulyan":
        return 4 * f + 3
    if cfg.strategy == "fedtrimmedavg" and f > 0:  # a valid config has trim_beta > 0 here
        n = max(1, math.ceil(f / cfg.trim_beta) - 1)
        while int(cfg.trim_beta * n) < f:  # float rounding: find the first n that cuts f
            n += 1
        return n
    return 1


def _check_robust(cfg: RunConfig) -> None:
    """A robust ``strategy`` needs updates in the clear and enough sites per round."""
    if cfg.strategy not in ROBUST_STRATEGIES:
        return
    if cfg.secagg:
        raise ConfigError(
            f"strategy = {cfg.strategy!r} cannot run with secagg = true: a robust aggregation rule "
            "compares the sites' single updates, which SecAgg+ hides from the server. Set "
            "secagg = false, or use strategy = 'fedavg' with max-update-norm (the sites then clip "
            "their updates before masking; see docs/faults.md)."
        )
    if cfg.client_dp != "off":
        raise ConfigError(
            f"strategy = {cfg.strategy!r} cannot run with client-dp = {cfg.client_dp!r}: the server's DP "
            "noise and its epsilon are calibrated for a mean of clipped updates, not for "
            f"{cfg.strategy}. Set client-dp = 'off' or strategy = 'fedavg'."
        )
    m, f = sites_per_round(cfg), cfg.num_malicious_sites
    if cfg.strategy == "fedtrimmedavg":
        if int(cfg.trim_beta * m) < f:
            raise ConfigError(
                f"trim-beta = {cfg.trim_beta} cuts int({cfg.trim_beta} * {m}) = {int(cfg.trim_beta * m)} of "
                f"the {m} updates per round at each end, fewer than num-malicious-sites = {f}: raise "
                f"trim-beta to at least {f}/{m} (below 0.5), add sites, or lower num-malicious-sites."
            )
        return
    if cfg.strategy == "multikrum" and cfg.num_sites_to_keep > m:
        raise ConfigError(
            f"num-sites-to-keep = {cfg.num_sites_to_keep} exceeds the {m} sites per round: "
            f"use at most {m} (0 keeps all but num-malicious-sites)."
        )
    need = robust_min_sites(cfg)
    if m < need:
        raise ConfigError(
            f"strategy = {cfg.strategy!r} with num-malicious-sites = {f} needs at least {need} sites per "
            f"round, but num-sites = {cfg.num_sites}, fraction-fit = {cfg.fraction_fit} and "
            f"min-fit-clients = {cfg.min_fit_clients} select {m}: add sites or lower num-malicious-sites."
        )


def _check_recipe(cfg: RunConfig) -> None:
    """Server moment decays in [0, 1); ``bn-mode`` needs BatchNorm; a label-skew loss is not for
    DP-SGD; SCAFFOLD needs SGD and single updates in the clear (no SecAgg+, no DP)."""
    for key, value in (
        ("server-momentum", cfg.server_momentum),
        ("server-beta-1", cfg.server_beta_1),
        ("server-beta-2", cfg.server_beta_2),
    ):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} = {value!r} is invalid: it must lie in [0, 1).")
    if cfg.bn_mode != "global" and cfg.norm != "batch":
        raise ConfigError(
            f"bn-mode = {cfg.bn_mode!r} keeps BatchNorm entries at the sites, but norm = {cfg.norm!r} has no "
            "BatchNorm: set norm = 'batch' or bn-mode = 'global'."
        )
    if cfg.loss not in ("ce", "auto") and cfg.dp:
        raise ConfigError(
            f"loss = {cfg.loss!r} cannot run with dp = true: it uses the site's training class counts, which "
            "DP-SGD's accounting does not cover. Set loss = 'ce' with dp."
        )
    if cfg.strategy != "scaffold":
        return
    if cfg.optimizer != "sgd":
        raise ConfigError(
            f"strategy = 'scaffold' needs optimizer = 'sgd' (got {cfg.optimizer!r}): its control variates "
            "estimate gradients from SGD steps (Option II). Set optimizer = 'sgd'."
        )
    for key, on in (("secagg", cfg.secagg), ("dp", cfg.dp), ("client-dp", cfg.client_dp != "off")):
        if on:
            raise ConfigError(
                f"strategy = 'scaffold' cannot run with {key} on: SCAFFOLD's control variates are "
                "computed from each site's own update in the clear and are not covered by "
                f"{'SecAgg+ masking' if key == 'secagg' else 'the DP accounting'}. Turn {key} off "
                "or use strategy = 'fedprox' (whose correction is local)."
            )


def _check_store(value: str) -> None:
    scheme = value.partition("://")[0].partition("+")[0]
    if value in ("", "off") or (value.partition("://")[1] and scheme in ("sqlite", "postgresql")):
        return
    raise ConfigError(
        f"store = {value!r} is invalid: give an SQLAlchemy URL such as 'sqlite:///runs/medfed.db' "
        "or 'postgresql://user@host/db', leave it empty for <run-dir>/medfed.db, or 'off'."
    )


def parse_spacing(value: str | float, *, key: str = "spacing") -> tuple[float, ...]:
    """A ``spacing`` setting as millimetres per axis.

    ``""``, ``"0"`` or ``0`` -> ``()`` (keep each image's own spacing); ``"1.5"`` or ``1.5`` ->
    ``(1.5,)`` (every axis); ``"1,1,2"`` (or ``"1 1 2"``) -> ``(1.0, 1.0, 2.0)`` (per axis: 2
    values for 2D images, 3 for volumes).

    Raises
    ------
    ConfigError
        Not numbers, more than 3 values, or a value <= 0 or not finite (naming ``key``).
    """
    if isinstance(value, bool):
        parts: list[str] = ["bad"]
    elif isinstance(value, (int, float)):
        parts = [repr(float(value))]
    else:
        parts = [p for p in str(value).replace(",", " ").split() if p]
    try:
        numbers = tuple(float(p) for p in parts)
    except ValueError:
        numbers = (math.nan,)
    if numbers in ((), (0.0,)):
        return ()
    if len(numbers) > 3 or not all(0 < v < math.inf for v in numbers):
        raise ConfigError(
            f"{key} = {value!r} is invalid: give the voxel size in mm, one number for every axis "
            '("1.5") or one per axis ("1.0,1.0,2.0"), each > 0; "" or 0 keeps the images\' own spacing.'
        )
    return numbers


def close_matches(word: str, choices: tuple[str, ...] | list[str]) -> str:
    """``" Did you mean 'x'?"`` for the nearest of ``choices``, or ``""``.

    Choices that start with ``word`` come first (``dp-budget`` -> ``dp-budget-epsilon``), then
    ``difflib``'s closest; two at most.
    """
    prefixed = [c for c in choices if word and c.startswith(word)]
    near = list(dict.fromkeys([*prefixed, *difflib.get_close_matches(word, list(choices), n=2, cutoff=0.6)]))[:2]
    if not near:
        return ""
    return " Did you mean " + " or ".join(repr(n) for n in near) + "?"


def _check_choice(key: str, value: object, choices: tuple[object, ...]) -> None:
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        hint = close_matches(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise ConfigError(f"{key} = {value!r} is invalid.{hint} Valid choices: {valid}.")


_NUMBER_AS_TEXT = frozenset({"spacing"})
"""Text keys that also take a plain number (a TOML ``spacing = 1.5`` is ``"1.5"``)."""


def coerce_value(key: str, value: Any, default: Any, source: str) -> Any:
    """Coerce ``value`` to the type of ``default`` with an error naming the key and ``source``.

    Strings (from ``--set``) become bools (``true``/``false``/``1``/``0``/``yes``/``no``/``on``/
    ``off``), ints or floats as ``default`` is; a float with a fraction is no int.

    Raises
    ------
    ConfigError
        ``value`` does not convert (naming ``key``, ``source`` and the expected type).
    """
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in {"true", "1", "yes", "on"}:
                    return True
                if lowered in {"false", "0", "no", "off"}:
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError(value)
        if isinstance(default, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if isinstance(default, str):
            if key in _NUMBER_AS_TEXT and isinstance(value, (int, float)) and not isinstance(value, bool):
                return f"{value:g}"  # spacing = 1.5 in TOML or Flower's --run-config
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        kind = type(default).__name__
        raise ConfigError(
            f"{key} = {value!r} in {source} is invalid: expected a value of type {kind}."
        ) from None
    return value
