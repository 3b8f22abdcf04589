"""Export a searched architecture to training: ``arch.yaml``, ``weights.safetensors``, ``train.yaml``.

The trial is found in MLflow (by run id, or by campaign and trial number); its ``arch.yaml``
artifact is the architecture, and the campaign's parent run says which space and supernet
checkpoint it came from, so the weights written are the ones the search evaluated: the
checkpoint's hash must be the one the campaign recorded (``supernet_hash``), and the hash of the
weights written goes into ``train.yaml`` for ``vitnas train`` to verify. Export only reads the
store: a missing store, campaign or run is a one-line error, and nothing is created in it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from mlflow.exceptions import MlflowException

from nas.arch import ArchConfig, load_arch
from nas.errors import UserError
from nas.space import load_space
from nas.tracking import Campaign, connect
from nas.weights import file_hash, save_weights

README = """# {name}

Architecture {arch_hash} from campaign `{campaign}`, trial {trial} (MLflow run `{run_id}`).

| file | what it is |
|---|---|
| `arch.yaml` | the architecture |
| `weights.safetensors` | weights inherited from the supernet ({weights_note}) |
| `train.yaml` | a training recipe for `vitnas train` |

Train it (from scratch with `init: scratch`, or fine-tune the inherited weights with `init: inherited`):

```bash
vitnas train {out}/train.yaml
```

Use it in your own code:

```python
import nas, timm
model = timm.create_model("vitnas_subnet", arch="{out}/arch.yaml",
                          pretrained_file="{out}/weights.safetensors")
```

Validation accuracy with inherited weights: {accuracy}; latency {latency} ms on `{target}`.
"""


@dataclass
class ExportResult:
    out: Path
    run_id: str
    arch_hash: str
    files: list[str]


def export_trial(
    tracking_uri: str,
    out: str | Path,
    *,
    run_id: str | None = None,
    campaign: str | None = None,
    trial: int | None = None,
    epochs: int = 30,
) -> ExportResult:
    """Write the trial's architecture, inherited weights, training recipe and a README into ``out``."""
    if epochs < 1:
        raise UserError(f"--epochs {epochs}: must be at least 1 (a whole number)")
    client = connect(tracking_uri, read_only=True)
    if run_id is None:
        if campaign is None or trial is None:
            raise UserError("export needs --run-id, or --campaign and --trial")
        found = Campaign(tracking_uri, campaign, read_only=True)
        if not found.exists():
            raise UserError(f"no campaign {campaign!r} in {tracking_uri}")
        run_id = found.trial_run_id(trial)
    run = _get_run(client, tracking_uri, run_id)
    parent_id = run.data.tags.get("mlflow.parentRunId")
    if run.data.tags.get("vitnas.role") != "trial" or not parent_id:
        raise UserError(f"run {run_id} is not a vitnas trial run")
    parent = _get_run(client, tracking_uri, parent_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            arch = load_arch(client.download_artifacts(run_id, "arch.yaml", tmp))
        except (MlflowException, OSError) as err:
            raise UserError(f"run {run_id}: cannot read its arch.yaml artifact ({err})") from None
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "arch.yaml").write_text(arch.to_yaml())
    files = ["arch.yaml"]
    data = parent.data.params.get("data") or "digits"
    weights_hash = None
    if isinstance(arch, ArchConfig):
        scored = run.data.tags.get("supernet_hash") or parent.data.tags.get("supernet_hash")
        weights_note = _export_supernet_weights(parent.data.params, arch, out, scored)
        files.append("weights.safetensors")
        weights_hash = file_hash(out / "weights.safetensors")
    else:
        weights_note = "the timm model's own weights file, see the space"
    recipe = train_recipe(
        weights="weights.safetensors" if "weights.safetensors" in files else None,
        data=data,
        epochs=epochs,
        tracking_uri=tracking_uri,
        source_run_id=run_id,
        weights_hash=weights_hash,
    )
    (out / "train.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    metrics = run.data.metrics
    (out / "README.md").write_text(
        README.format(
            name=out.name,
            arch_hash=arch.arch_hash(),
            campaign=run.data.tags.get("vitnas.campaign"),
            trial=run.data.tags.get("trial_number"),
            run_id=run_id,
            out=out,
            weights_note=weights_note,
            accuracy=f"{metrics.get('val_accuracy', float('nan')):.4f}",
            latency=f"{metrics.get('latency_ms', float('nan')):.3f}",
            target=parent.data.params.get("target"),
        )
    )
    files += ["train.yaml", "README.md"]
    return ExportResult(out=out, run_id=run_id, arch_hash=arch.arch_hash(), files=files)


def _get_run(client, tracking_uri: str, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UserError(f"no run {run_id!r} in {tracking_uri}") from None
        raise


def _export_supernet_weights(params: dict, arch: ArchConfig, out: Path, scored_hash: str | None) -> str:
    """Extract ``arch`` from the campaign's checkpoint, refusing one that is not what was scored."""
    from nas.supernet import load_checkpoint

    checkpoint = params.get("supernet")
    if not checkpoint or checkpoint == "None":
        raise UserError("the campaign's parent run names no supernet checkpoint")
    space = load_space(params["space_file"])
    net, meta = load_checkpoint(checkpoint, space)  # verifies the file against its sidecar's hash
    if scored_hash and meta.get("weights_hash") and meta["weights_hash"] != scored_hash:
        raise UserError(
            f"{checkpoint}: checkpoint hash {meta['weights_hash']} is not {scored_hash}, the one the campaign "
            "scored this trial with (trained further or replaced since?): the exported weights would not be "
            "the weights scored"
        )
    save_weights(net.extract(arch), out / "weights.safetensors", metadata={"arch_hash": arch.arch_hash()})
    return f"checkpoint {Path(checkpoint).name}, epoch {meta.get('epoch')}"


def train_recipe(
    *, weights: str | None, data: str, epochs: int, tracking_uri: str | None, source_run_id: str | None,
    weights_hash: str | None = None,
) -> dict:
    """The default ``train.yaml``: fine-tune inherited weights when there are any (``weights_hash``:
    their ``file_hash``, which ``vitnas train`` verifies)."""
    from nas.train import Recipe

    return Recipe(
        init="inherited" if weights else "scratch",
        weights=weights,
        weights_hash=weights_hash,
        data=data,
        epochs=epochs,
        tracking_uri=tracking_uri,
        source_run_id=source_run_id,
    ).model_dump()
