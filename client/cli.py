"""Hospital site commands: ``medfed site start``, ``medfed site check`` and ``medfed site keygen``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from medfed.client.site_config import SiteConfigError, load_kit, load_site_config
from medfed.shared.cli_options import HintedChoice
from medfed.shared.config import BAD_DATA_MODES

__all__ = ["site_app"]

console = Console(stderr=True)

site_app = typer.Typer(
    help="A hospital site: check its data, join the federation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold pixel data or paths
)


@site_app.command("start")
def site_start(
    kit: Annotated[Path, typer.Option("--kit", "-k", help="The startup kit folder from the coordinator.")],
    config: Annotated[Path, typer.Option("--config", "-c", help="The site's site.toml.")],
    superlink: Annotated[
        str | None, typer.Option(help="Override the SuperLink address of the kit (HOST:PORT); default: the kit's.")
    ] = None,
    max_connect_attempts: Annotated[
        int,
        typer.Option(min=1, help="Give up after this many failed connection attempts (before the first success)."),
    ] = 5,
) -> None:
    """Join the federation: a SuperNode with the kit's CA and key, running only coordinator-signed code."""
    from medfed.client.deploy import SiteStartError, run_site

    logging.basicConfig(level=logging.INFO, format="%(asctime)s medfed %(levelname)s: %(message)s", force=True)
    try:
        site = load_site_config(config)
        site_kit = load_kit(kit, auth_private_key=site.auth_key_path())
        code = run_site(site_kit, site, superlink=superlink, max_connect_attempts=max_connect_attempts)
    except (SiteConfigError, SiteStartError) as err:
        console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
        logging.getLogger("medfed.client.deploy").error("%s", err)
        raise typer.Exit(code=2) from None
    raise typer.Exit(code=code)


@site_app.command("check")
def site_check(
    config: Annotated[Path, typer.Option("--config", "-c", help="The site's site.toml.")],
    image_size: Annotated[
        int | None,
        typer.Option(help="Override the site config's image-size (0 = all images one size); default: site.toml's."),
    ] = None,
    num_classes: Annotated[
        int | None,
        typer.Option(help="Override the site config's num-classes (the federation's model); default: site.toml's."),
    ] = None,
    bad_data: Annotated[
        str | None,
        typer.Option(
            help="Override the site config's bad-data; default: site.toml's (strict when unset).",
            click_type=HintedChoice(BAD_DATA_MODES),
        ),
    ] = None,
    spacing: Annotated[
        str | None,
        typer.Option(
            help='Override the voxel size (mm) NIfTI/DICOM images are resampled to ("1.5", "1,1,2"; "0" = native); '
            "default: site.toml's spacing, else the --run-config's.",
        ),
    ] = None,
    run_config: Annotated[
        Path | None,
        typer.Option(
            "--run-config",
            help="A proposed run config (TOML, as the coordinator would submit it): also check it against "
            "this site's privacy policy; exit 1 naming every key that breaks it (default: the data checks only).",
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Read the site's datalist locally and report counts, shapes, spacings and every problem (contacts nobody).

    With --run-config, also the site's dry run of that run: accepted, or every way it asks for
    less privacy than site.toml's policy allows (the key, the run's value and the site's limit).
    """
    import json

    from medfed.client.site_check import check_run_policy, check_site, format_policy, format_report, training_entries
    from medfed.shared.config import ConfigError, parse_spacing
    from medfed.shared.config_sources import file_layer, mapping_layer, resolve_config

    logging.basicConfig(level=logging.WARNING, force=True)
    try:
        site = load_site_config(config, require_datalist=False)
        for flag, value in (("--image-size", image_size), ("--num-classes", num_classes)):
            if value is not None and value < 0:
                raise SiteConfigError(f"{flag} = {value} is invalid: it must be an integer >= 0.")
        run = None
        if run_config is not None:
            run = resolve_config(
                mapping_layer({"dataset": "deployment"}, source="deployment default"), file_layer(run_config)
            ).config
        # Training's order: the site's spacing wins over the run's (the site knows its scanners).
        spacing_text = spacing if spacing is not None else site.spacing or (run.spacing if run is not None else "")
        spacing_mm = parse_spacing(spacing_text, key="--spacing" if spacing is not None else "spacing")
    except (SiteConfigError, ConfigError) as err:
        console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
        raise typer.Exit(code=2) from None
    run_image_size = run.image_size if run is not None else site.image_size
    run_classes = run.num_classes if run is not None and run.num_classes else site.num_classes
    report = check_site(
        site.datalist,
        image_size=run_image_size if image_size is None else image_size,
        num_classes=run_classes if num_classes is None else num_classes,
        bad_data=site.bad_data if bad_data is None else bad_data,
        spacing=spacing_mm,
    )
    policy = None
    if run is not None:
        policy = check_run_policy(site.policy(), run, training_examples=training_entries(report))
    if json_output:
        payload = json.loads(report.to_json())
        if policy is not None:
            payload["policy"] = policy.to_dict()
        typer.echo(json.dumps(payload, indent=2))
    else:
        typer.echo(format_report(report))
        if policy is not None:
            typer.echo(f"run config {run_config}:")
            typer.echo(format_policy(policy))
    raise typer.Exit(code=0 if report.ok and (policy is None or policy.accepted) else 1)


@site_app.command("keygen")
def site_keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for site-auth.key (0600) and site-auth.pub.")],
    comment: Annotated[str, typer.Option(help="Comment in the public key line (e.g. the site's name).")] = "",
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing pair (the old private key is kept as *.old).")
    ] = False,
) -> None:
    """Generate this site's own authentication key pair: send only site-auth.pub to the coordinator.

    The coordinator enrols it with `medfed provision --site-public-key NAME=site-auth.pub`; then set
    auth-private-key in site.toml to the private key. Compare the fingerprint with the coordinator by phone.
    """
    from medfed.client.site_keys import KeygenError, keygen

    try:
        key = keygen(out, comment=comment, overwrite=force)
    except KeygenError as err:
        console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"private key: {key.private_key} (mode 0600; never send it)")
    typer.echo(f"public key:  {key.public_key} (send this file to the coordinator)")
    typer.echo(f"fingerprint: {key.fingerprint}")
    typer.echo(f'then set in site.toml:  auth-private-key = "{key.private_key}"')
