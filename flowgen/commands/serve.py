"""`flowgen serve`: the Runware task protocol on one port (REST + WebSocket), on uvicorn.

Checks everything before listening (keys vs host, models and their weights, the data dir), so a
bad setting is one `error:` line and exit 2, not a traceback from inside the server; says in one
line what it serves when it starts, and in one line that it stopped.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

import click

from flowgen.engine import ModelCard, list_cards, resolve_model
from flowgen.errors import FlowgenError


def default_data_dir() -> Path:
    """`serve` in flowgen's cache folder ($FLOWGEN_CACHE, else $XDG_CACHE_HOME/flowgen, else ~/.cache/flowgen)."""
    from flowgen.engine import flowgen_cache_dir

    return flowgen_cache_dir() / "serve"


def served_cards(names: Sequence[str]) -> list[ModelCard]:
    """The cards named by --model (card names or AIR ids), each with its weights on this machine
    (refused with `run`'s message otherwise: the card's own missing_weights()); when none is
    named, every built-in card whose weights are here (the tiny one always is)."""
    from flowgen.serve.tasks import TINY_AIR

    if not names:
        return [card for card in list_cards() if card.missing_weights() is None]
    cards = []
    for name in names:
        if name.strip().lower() == TINY_AIR:
            cards.append(next(card for card in list_cards() if card.tiny is not None))
            continue
        try:
            card = resolve_model(name)
        except (FlowgenError, LookupError, ValueError, OSError) as err:
            raise FlowgenError(f"--model {name}: {' '.join(str(err).split())}") from None
        problem = card.missing_weights()
        if problem is not None:
            raise FlowgenError(f"--model {name}: {problem}")
        cards.append(card)
    return cards


def serve_command(
    host: str,
    port: int,
    models: Sequence[str],
    data_dir: str | None,
    max_batch: int | None,
    window_ms: float,
    dtype: str | None,
    allow_hosts: Sequence[str] = (),
) -> None:
    try:
        import uvicorn

        from flowgen.serve.app import MAX_BODY_BYTES, create_app
    except ImportError as err:
        raise FlowgenError(
            f"flowgen serve needs the serve extra ({err.name} is missing): pip install 'flowgen[serve]'"
        ) from None
    from flowgen.net.policy import DestinationPolicy
    from flowgen.run.dtype import dtype_setting
    from flowgen.run.engine import PipelineEngine
    from flowgen.run.settings import max_batch_setting
    from flowgen.serve.auth import check_can_listen, load_keys
    from flowgen.serve.batcher import Batcher

    keys = load_keys()
    destinations = DestinationPolicy.from_env(allow_hosts)  # a bad entry: one error line, before listening
    check_can_listen(host, keys)
    cards = served_cards(models)
    check_port_free(host, port)
    setting = dtype_setting(dtype)
    multiple = _batch_multiple(cards, setting)  # a mesh the devices cannot hold: refused before anything is written
    folder = Path(data_dir).expanduser() if data_dir else default_data_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FlowgenError(f"--data-dir {folder}: cannot create it ({err.strerror or err})") from None
    by_name = {card.name: card for card in cards}

    def engine_for(name: str) -> PipelineEngine:
        from flowgen.run.dtype import resolve_dtype

        return PipelineEngine(by_name[name], resolve_dtype(setting))

    batcher = Batcher(
        engine_for, window_s=window_ms / 1000, max_batch=max_batch_setting(max_batch), batch_multiple=multiple
    )
    app = create_app(batcher=batcher, data_dir=folder, models=cards, keys=keys, destinations=destinations)
    served = ", ".join(app.state.server.service.models.label(card) for card in cards)
    click.echo(
        f"flowgen serve: http://{host}:{port}/v1 (REST and WebSocket), models {served}, data in {folder}, "
        f"{'API keys required' if keys else 'no API key (loopback only)'}",
        err=True,
    )
    # a WebSocket frame up to twice the body limit still reaches the app, which answers it with the
    # protocol's requestTooLarge error; only a larger one makes uvicorn drop the connection
    uvicorn.run(
        app, host=host, port=port, log_level="warning", ws_max_size=2 * MAX_BODY_BYTES, timeout_graceful_shutdown=60
    )
    click.echo(
        f"flowgen serve: stopped; every accepted task finished or is recorded as interrupted in {folder}", err=True
    )


def check_port_free(host: str, port: int) -> None:
    """A port another process holds is one `error:` line now, not a log line from inside uvicorn."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as err:
            raise FlowgenError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None


def _batch_multiple(cards, setting) -> int:
    """The device mesh's "data" size (--mesh / $FLOWGEN_MESH): batches of whole rows per device."""
    if not cards:
        return 1
    from flowgen.run.dtype import resolve_dtype
    from flowgen.run.engine import PipelineEngine

    multiple = getattr(PipelineEngine(cards[0], resolve_dtype(setting)), "batch_multiple", None)
    return multiple() if multiple is not None else 1  # stand-in engines have no mesh
