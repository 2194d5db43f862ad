"""Building hostile but internally consistent bundles: a changed spec or changed records, with the job id, Merkle
root and commitment recomputed, so every integrity check passes and only the rules under test can refuse them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pol.bundle import MANIFEST_NAME
from pol.canonical import compute_hash
from pol.spec import spec_from_dict
from pol.trace import compute_trace_commitment, record_from_dict

CODE = "ab" * 32  # any well-formed code digest: what a hostile spec claims for its "user code"


def rewrite_manifest(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Copy the bundle at `src` to `dst`, let `edit` change its manifest (spec, records), and recompute the job id,
    the Merkle root and the commitment so that the bundle opens cleanly."""
    shutil.copytree(src, dst)
    path = dst / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    spec = spec_from_dict(manifest["spec"], require_resolved=True)
    records = [record_from_dict(r, f"records[{i}]") for i, r in enumerate(manifest["records"])]
    job_id = compute_hash("pol/job/v1", spec.canonical()).hex()
    merkle, root = compute_trace_commitment(job_id, records)
    manifest.update(job_id=job_id, merkle_root=merkle, root=root)
    path.write_text(json.dumps(manifest))
    return dst


def with_spec(src: Path, dst: Path, **changes: Any) -> Path:
    """The bundle with spec fields replaced (e.g. model={"name": "os:system", ...})."""

    def edit(m: dict[str, Any]) -> None:
        m["spec"].update(changes)

    return rewrite_manifest(src, dst, edit)
