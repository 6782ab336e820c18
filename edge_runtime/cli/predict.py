"""`edgectl predict`: send one inference request to a device over HTTP (KServe v2) or MQTT."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from edge_runtime.cli.broker_options import broker_options
from edge_runtime.client.broker import Broker
from edge_runtime.client.predict import predict_http, predict_mqtt
from edge_runtime.core.errors import UsageError

if TYPE_CHECKING:
    from edge_runtime.core.types import InferResponse

__all__ = [
    "parse_input",
    "predict",
]


def parse_input(spec: str) -> tuple[str, np.ndarray]:
    """``name=file.npy``, ``name=file.json`` or ``name=<JSON array>`` as (name, array); floats become float32."""
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise UsageError(f"--input '{spec}' must look like name=file.npy, name=file.json or name=[1, 2, 3]")
    if value.endswith(".npy"):
        try:
            return name, np.load(value, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--input {name}: cannot read {value}: {exc}") from exc
    try:
        text = Path(value).read_text(encoding="utf-8") if value.endswith(".json") else value
        array = np.asarray(json.loads(text))
    except OSError as exc:
        raise UsageError(f"--input {name}: cannot read {value}: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"--input {name}: not a .npy file, a .json file or a JSON array: {exc}") from exc
    if array.dtype.kind not in "biuf":
        raise UsageError(f"--input {name}: the JSON must be a (nested) array of numbers")
    return name, array.astype(np.float32) if array.dtype.kind == "f" else array


def _print(response: InferResponse) -> None:
    click.echo(f"{response.model} version {response.version}")
    for name, array in response.outputs.items():
        values = np.array2string(np.asarray(array), precision=5, threshold=200, suppress_small=True)
        click.echo(f"{name} {list(array.shape)} {array.dtype}:\n{values}")


@click.command()
@click.argument("model")
@click.option(
    "--input",
    "-i",
    "inputs",
    multiple=True,
    required=True,
    help="name=file.npy | name=file.json | name=[...]",
)
@click.option("--http", "http_url", help="Device HTTP API, e.g. http://127.0.0.1:8000")
@broker_options("--mqtt", required=False, help_text="Broker HOST:PORT (needs --device).")
@click.option("--device", "device_id", help="Device id (MQTT).")
@click.option("--version", "model_version", help="Model version (default: the one serving).")
@click.option(
    "--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the answer."
)
@click.option("--json", "as_json", is_flag=True, help="Print the v2 response JSON instead of a summary.")
def predict(
    model: str,
    inputs: tuple[str, ...],
    http_url: str | None,
    broker: Broker | None,
    device_id: str | None,
    model_version: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Run MODEL on a device once and print its outputs."""
    from edge_runtime.codecs.v2 import encode_infer_response
    from edge_runtime.core.types import InferRequest

    if bool(http_url) == bool(broker):
        raise UsageError("give exactly one of --http URL or --mqtt HOST:PORT")
    if broker and not device_id:
        raise UsageError("--mqtt needs --device ID (the device's id in its settings)")
    tensors = dict(parse_input(spec) for spec in inputs)
    request = InferRequest(model=model, inputs=tensors, version=model_version, id=uuid.uuid4().hex[:8])
    if broker is None:
        response = predict_http(str(http_url), request, timeout=timeout)
    else:
        response = predict_mqtt(broker, str(device_id), request, timeout=timeout)
    if as_json:
        click.echo(encode_infer_response(response)[0].decode("utf-8"))
    else:
        _print(response)
