"""`agegender serve`: a registered model over HTTP (MLflow's scoring protocol, `serving.app`),
one uvicorn worker in this process. Beyond loopback only with credentials, as `stack up --listen`.

Heavy imports (torch, MLflow, uvicorn) wait until the command runs: the `agegender` parser is
built for every command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

AUTH_VAR = "AGEGENDER_SERVE_AUTH"  # user:password of HTTP basic, from the environment or .env


def add_commands(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="a model over HTTP: MLflow's /invocations, plus /model, /metrics, limits",
        epilog="Settings (key=value, e.g. max_photos=16): "
        "model, run_root, host, port, allowed_hosts, device, detect, oversample, float_range, "
        "max_request_bytes, max_body_bytes_in_flight, max_photos, max_photo_pixels, "
        "max_request_pixels, decode_workers, max_decode_pixels, deadline_s, upload_timeout_s, "
        "batch_window_ms, max_batch (README: Serving).",
    )
    s.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or a folder",
    )
    s.add_argument("--run-root", default=None, help="the suite's, when no MLflow server is set")
    s.add_argument(
        "--host",
        "--listen",
        dest="host",
        default=None,
        help=f"listen address (default 127.0.0.1); beyond loopback only with {AUTH_VAR} set",
    )
    s.add_argument("--port", type=int, default=None, help="default 5001")
    s.add_argument("--device", default=None, help="auto|cpu|cuda[:N]")
    s.add_argument(
        "--float-range",
        default=None,
        choices=["refuse", "0..1", "0..255"],
        help="how float pixel arrays are read (default: refused)",
    )
    s.add_argument(
        "overrides", nargs="*", metavar="key=value", help="any setting, e.g. max_photos=16"
    )
    s.set_defaults(func=cmd_serve)


def settings_from(a: argparse.Namespace) -> Any:
    """ServeSettings from the flags and `key=value` overrides (values read as JSON where they
    parse, e.g. numbers and lists, else as text)."""
    from serving.settings import ServeSettings

    values: dict[str, Any] = {}
    for item in a.overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r}: expected key=value (e.g. max_photos=16)")
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            values[key] = text
    flags = {
        "model": a.model,
        "run_root": a.run_root,
        "host": a.host,
        "port": a.port,
        "device": a.device,
        "float_range": a.float_range,
    }
    values |= {k: v for k, v in flags.items() if v is not None}
    return ServeSettings(**values)


def serve_auth(host: str) -> str | None:
    """The credentials every request must carry, if set; required beyond loopback."""
    from deployments.credentials import MIN_PASSWORD, env_values
    from deployments.layout import is_loopback

    auth = env_values((AUTH_VAR,)).get(AUTH_VAR)
    if auth is not None:
        user, _, password = auth.partition(":")
        if not (user and password):
            raise ValueError(f"{AUTH_VAR} must be user:password")
        if len(password) < MIN_PASSWORD:
            raise ValueError(f"{AUTH_VAR}'s password is shorter than {MIN_PASSWORD} characters")
    if auth is None and not is_loopback(host):
        raise ValueError(
            f"--host {host} listens beyond this machine, and anyone who reaches it could use the "
            f"model: set {AUTH_VAR}=user:password (a password of {MIN_PASSWORD}+ characters) in "
            "the environment or .env, as `stack up --listen` asks for credentials"
        )
    return auth


def cmd_serve(a: argparse.Namespace) -> None:
    import uvicorn

    from agegender.predict import Predictor
    from serving.app import build_app
    from serving.engine import Engine
    from tracking.serving import served_model

    settings = settings_from(a)
    auth = serve_auth(settings.host)
    debug = bool(getattr(a, "debug", False))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    ours = logging.getLogger("agegender.serve")
    ours.addHandler(handler)
    ours.setLevel(logging.DEBUG if debug else logging.INFO)
    ours.propagate = False
    with tempfile.TemporaryDirectory(prefix="agegender-serve-") as tmp:
        model = served_model(settings.model, Path(settings.run_root), Path(tmp))
        predictor = Predictor.load(model.checkpoint, settings.device)
        engine = Engine(predictor, settings, model.input_schema)
        info = {
            "uri": model.uri,
            "name": model.name,
            "version": model.version,
            "alias": model.alias,
            "run_id": model.run_id,
            "config_hash": model.config_hash,
            "image_size": predictor.image_size,
            "crop": predictor.crop,
            "device": str(predictor.device),
            "labels": predictor.labels,
        }
        ours.info(
            "serving %s (%s) on http://%s:%d (%s)",
            model.uri,
            ", ".join(f"{k} {info[k]}" for k in ("name", "version", "run_id") if info[k]),
            settings.host,
            settings.port,
            "credentials required" if auth else "no authentication",
        )
        app = build_app(engine, settings, info, auth)
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            workers=1,
            access_log=False,  # ours has the latency
            log_level="debug" if debug else "info",
            lifespan="on",
        )
