"""Export a searched architecture: ``arch.yaml``, the weights scored, ``train.yaml`` (and ``model.onnx``).

The trial is found in MLflow (by run id, or by campaign and trial number); its ``arch.yaml``
artifact is the architecture, and the campaign's parent run records the weights it was scored
with: their hash and the frozen copy the campaign made under its workspace. The architecture's
family (``nas.families``) writes the weights from that copy, refusing any file whose hash is not
the one recorded, so the weights exported are the weights scored, whatever training did to the
checkpoint since. The hash of the weights written goes into ``train.yaml`` for ``vitnas train``
to verify. Export only reads the store: a missing store, campaign or run is a one-line error, and
nothing is created in it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from mlflow.exceptions import MlflowException

from nas.arch import load_arch
from nas.errors import UserError
from nas.families import family_of
from nas.names import ACCURACY, CAMPAIGN, LATENCY, ROLE, TRIAL_NUMBER
from nas.tracking import Campaign, connect

README = """# {name}

Architecture {arch_hash} from campaign `{campaign}`, trial {trial} (MLflow run `{run_id}`).

| file | what it is |
|---|---|
{files}

Train it (from scratch with `init: scratch`, or fine-tune the exported weights with `init: inherited`):

```bash
vitnas train {out}/train.yaml
```

Use it in your own code:

```python
{usage}
```

Validation accuracy with these weights: {accuracy}; latency {latency} ms on `{target}`.
"""

FILE_ROLES = {
    "arch.yaml": "the architecture",
    "weights.safetensors": "the weights the search scored ({note})",
    "model.onnx": "the model in ONNX (opset {opset}, dynamic batch), checked against PyTorch with ONNX Runtime",
    "train.yaml": "a training recipe for `vitnas train`",
}


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
    onnx: bool = False,
) -> ExportResult:
    """Write the trial's architecture, weights, training recipe, a README (and ``model.onnx``) into ``out``."""
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
    if run.data.tags.get(ROLE) != "trial" or not parent_id:
        raise UserError(f"run {run_id} is not a vitnas trial run")
    parent = _get_run(client, tracking_uri, parent_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            arch = load_arch(client.download_artifacts(run_id, "arch.yaml", tmp))
        except (MlflowException, OSError) as err:
            raise UserError(f"run {run_id}: cannot read its arch.yaml artifact ({err})") from None
    family = family_of(arch)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "arch.yaml").write_text(arch.to_yaml())
    record = {"params": parent.data.params, "tags": parent.data.tags, "trial_tags": run.data.tags}
    weights = family.export_weights(arch, record, out)
    files = ["arch.yaml", *weights.files]
    opset = None
    if onnx:
        opset = _export_onnx(family, arch, out, weights.files)
        files.append("model.onnx")
    recipe = train_recipe(
        weights=weights.files[0] if weights.files else None,
        data=parent.data.params.get("data") or "digits",
        epochs=epochs,
        tracking_uri=tracking_uri,
        source_run_id=run_id,
        weights_hash=weights.weights_hash,
    )
    (out / "train.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    files.append("train.yaml")
    metrics = run.data.metrics
    roles = "\n".join(f"| `{f}` | {FILE_ROLES[f].format(note=weights.note, opset=opset)} |" for f in files)
    (out / "README.md").write_text(
        README.format(
            name=out.name,
            arch_hash=arch.arch_hash(),
            campaign=run.data.tags.get(CAMPAIGN),
            trial=run.data.tags.get(TRIAL_NUMBER),
            run_id=run_id,
            out=out,
            files=roles,
            usage=weights.usage,
            accuracy=f"{metrics.get(ACCURACY, float('nan')):.4f}",
            latency=f"{metrics.get(LATENCY, float('nan')):.3f}",
            target=parent.data.params.get("target"),
        )
    )
    files.append("README.md")
    return ExportResult(out=out, run_id=run_id, arch_hash=arch.arch_hash(), files=files)


def _export_onnx(family, arch, out: Path, weight_files: list[str]) -> int:
    """``model.onnx`` of the exported model (with the exported weights), checked against PyTorch."""
    from nas.onnx_export import export_onnx
    from nas.weights import load_weights

    model = family.build(arch)
    if weight_files:
        load_weights(model, out / weight_files[0])
    check = export_onnx(model.eval(), out / "model.onnx", input_shape=family.input_chw(arch))
    return check.opset


def _get_run(client, tracking_uri: str, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UserError(f"no run {run_id!r} in {tracking_uri}") from None
        raise


def train_recipe(
    *,
    weights: str | None,
    data: str,
    epochs: int,
    tracking_uri: str | None,
    source_run_id: str | None,
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
