"""``angioexp promote``: move a registry alias by hand.

    angioexp promote --model angio-stage1 --version 3 --alias champion
    angioexp promote --model angio-stage1 --from-alias challenger            # → champion
    angioexp promote --model angio-stage2 --version 2 --alias challenger --reason "re-check"

The move is recorded as version tags (``alias.<alias>`` on the new and the previous holder).
"""

from __future__ import annotations

import argparse

from angioexp.errors import InputError
from angioexp.tracking.models import CHAMPION, get_alias_version, move_alias


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="registered model, e.g. angio-stage1")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--version", help="version number to point the alias at")
    source.add_argument("--from-alias", help="take the version another alias points at (e.g. challenger)")
    parser.add_argument("--alias", default=CHAMPION, help="alias to move (default: champion)")
    parser.add_argument("--reason", default="", help="free text stored with the move")


def promote(model: str, alias: str, *, version: str | None = None, from_alias: str | None = None, reason: str = "", client=None) -> tuple[str, str | None]:
    """Point ``alias`` of ``model`` at ``version`` (or at what ``from_alias`` points to).

    Returns (new version, previous version or None). Errors name the model/version/alias.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient()
    try:
        client.get_registered_model(model)
    except MlflowException:
        raise InputError(f"registered model '{model}' does not exist", key="--model") from None
    if from_alias:
        holder = get_alias_version(client, model, from_alias)
        if holder is None:
            raise InputError(f"alias '{from_alias}' is not set on '{model}'", key="--from-alias")
        version = str(holder.version)
    try:
        client.get_model_version(model, str(version))
    except MlflowException:
        raise InputError(f"'{model}' has no version {version}", key="--version") from None
    how = "manual: angioexp promote" + (f" from {from_alias}" if from_alias else "") + (f"; {reason}" if reason else "")
    previous = move_alias(model, alias, str(version), reason=how, client=client)
    return str(version), previous


def run(args: argparse.Namespace) -> int:
    from angioexp.tracking.uri import check_tracking_server, configure_mlflow

    uri = configure_mlflow()
    check_tracking_server(uri)
    version, previous = promote(args.model, args.alias, version=args.version, from_alias=args.from_alias, reason=args.reason)
    before = f" (was v{previous})" if previous and previous != version else ""
    print(f"{args.model}@{args.alias} → v{version}{before}")
    return 0
